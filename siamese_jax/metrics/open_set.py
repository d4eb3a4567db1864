"""Open set: queries of classes a gallery does not hold must be rejected, those of its classes accepted
with the right class, at a similarity threshold calibrated for a query against a whole gallery."""

from __future__ import annotations

from typing import Any

import numpy as np

from siamese_jax.errors import UserError
from siamese_jax.metrics.retrieval import gallery_class_similarities
from siamese_jax.metrics.scoring import DISTANCE, Scorer
from siamese_jax.metrics.verification import midpoint_thresholds


def open_set_report(class_similarities: np.ndarray, query_labels: np.ndarray, threshold: float) -> dict:
  """Open-set recognition at a similarity threshold.

  `query_labels[q]`: the query's gallery class, or -1 for a class the gallery does not know. A query
  is accepted when its best class similarity >= threshold, and then labelled with that class.
  known_accuracy: known queries accepted with the right class; closed_set_accuracy: right class
  ignoring the threshold; known_rejection_rate: known queries rejected; unknown_rejection_rate:
  unknown queries rejected (the goal: 1).
  """
  class_similarities = np.asarray(class_similarities)
  query_labels = np.asarray(query_labels)
  predicted = class_similarities.argmax(axis=1)
  accepted = class_similarities.max(axis=1) >= threshold
  known = query_labels >= 0
  report: dict[str, Any] = {"known_queries": int(known.sum()), "unknown_queries": int((~known).sum())}
  if known.any():
    right = predicted[known] == query_labels[known]
    report.update(known_accuracy=float(np.mean(right & accepted[known])),
                  closed_set_accuracy=float(np.mean(right)),
                  known_rejection_rate=float(np.mean(~accepted[known])))
  if (~known).any():
    report["unknown_rejection_rate"] = float(np.mean(~accepted[~known]))
  return report


def calibrate_open_set_threshold(class_similarities: np.ndarray, query_labels: np.ndarray) -> float:
  """The similarity threshold of highest balanced open-set accuracy on calibration queries.

  Balanced: the mean of `open_set_report`'s known_accuracy and unknown_rejection_rate, so the share of
  unknown queries does not tilt it. Placed midway between two neighbouring best-class similarities
  (the smallest such threshold on ties). A query's best similarity over a gallery of many classes is
  higher than a single pair's, so this threshold, not the pair one, is the one to reject unknowns with.
  """
  class_similarities = np.asarray(class_similarities)
  query_labels = np.asarray(query_labels)
  known = query_labels >= 0
  if not known.any() or known.all():
    raise UserError("open-set calibration needs both known and unknown queries.")
  best = class_similarities.max(axis=1)
  right = known & (class_similarities.argmax(axis=1) == query_labels)
  values = np.unique(best)
  candidates = midpoint_thresholds(values)
  right_scores, unknown_scores = np.sort(best[right]), np.sort(best[~known])
  known_accuracy = (len(right_scores) - np.searchsorted(right_scores, candidates, side="left")) / known.sum()
  unknown_rejection = np.searchsorted(unknown_scores, candidates, side="left") / len(unknown_scores)
  return float(candidates[int(np.argmax(known_accuracy + unknown_rejection))])


def open_set_split(labels: np.ndarray, *, known_fraction: float = 0.5, gallery_shots: int = 1,
                   seed: int | np.random.SeedSequence = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(gallery records, their class [0..known), query records, their class or -1), deterministic.

  A seeded `known_fraction` of the classes is known: `gallery_shots` random records of each go to the
  gallery and the rest are queries; every record of the other classes is an unknown query.
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max(initial=-1)) + 1
  if not 0 < known_fraction < 1:
    raise UserError(f"known_fraction={known_fraction}: expected a fraction in (0, 1).")
  num_known = int(round(known_fraction * num_classes))
  if num_known < 1 or num_known >= num_classes:
    raise UserError(f"open set needs known and unknown classes; {num_classes} classes with "
                    f"known_fraction={known_fraction} gives {num_known} known.")
  rng = np.random.default_rng(seed)
  known_classes = np.sort(rng.permutation(num_classes)[:num_known])
  class_map = np.full(num_classes, -1)
  class_map[known_classes] = np.arange(num_known)
  per_class = np.bincount(labels, minlength=num_classes)
  if per_class[known_classes].min() <= gallery_shots:
    raise UserError(f"open set with gallery_shots={gallery_shots} needs {gallery_shots + 1} images in every "
                    f"known class; one has {per_class[known_classes].min()}.")
  keys = rng.random(len(labels))
  order = np.lexsort((keys, labels))  # records by class, random inside each class
  rank = np.empty(len(labels), np.int64)
  starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
  rank[order] = np.arange(len(labels)) - starts[labels[order]]
  in_gallery = (class_map[labels] >= 0) & (rank < gallery_shots)
  gallery = np.flatnonzero(in_gallery)
  queries = np.flatnonzero(~in_gallery)
  return gallery, class_map[labels[gallery]], queries, class_map[labels[queries]]


OPEN_SET_CALIBRATION_SPLITS = 8


def calibrate_gallery_threshold(embeddings: np.ndarray, labels: np.ndarray, *, seed: int,
                                splits: int = OPEN_SET_CALIBRATION_SPLITS,
                                scorer: Scorer = DISTANCE) -> tuple[float, dict, int]:
  """(similarity threshold, its open-set report, known classes per split) for queries against a gallery.

  The evaluation's open-set protocol (`open_set_split`: half the classes known, one gallery image each,
  nearest image) drawn `splits` times from `seed`, every split's queries pooled into one
  `calibrate_open_set_threshold`: one split's threshold hangs on which classes happened to be known
  and which image each got, and pooling several draws averages that out (tests/test_evaluate.py
  checks that the threshold then moves less with the seed).
  """
  similarities, query_labels = [], []
  for split_seed in np.random.SeedSequence(seed).spawn(splits):
    gallery, gallery_labels, queries, labels_of_queries = open_set_split(labels, seed=split_seed)
    num_known = int(gallery_labels.max()) + 1  # the same in every split: round(known_fraction * classes)
    similarities.append(gallery_class_similarities(embeddings[queries], embeddings[gallery], gallery_labels,
                                                   num_known, "nearest", scorer))
    query_labels.append(labels_of_queries)
  similarities, query_labels = np.concatenate(similarities), np.concatenate(query_labels)
  threshold = calibrate_open_set_threshold(similarities, query_labels)
  return threshold, open_set_report(similarities, query_labels, threshold), num_known
