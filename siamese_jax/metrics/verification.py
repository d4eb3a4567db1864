"""Verification, same or different: seeded pairs, the ROC curve, its area and equal error rate, and a
same/different threshold calibrated on one set of pairs and applied to others.

A pair is called "same" when its similarity (`scoring.Scorer`, higher = more alike) is at least the
threshold. A threshold is kept in similarity units and saved for people as a distance or a probability
(`threshold_record`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from siamese_jax.errors import UserError

THRESHOLD_METHODS = ("max_accuracy", "far")


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Record index pairs (first[p], second[p]); same[p] says whether they share a class."""

  first: np.ndarray
  second: np.ndarray
  same: np.ndarray


def sample_pairs(labels: np.ndarray, *, num_pairs: int, seed: int) -> Pairs:
  """num_pairs // 2 same-class pairs and the rest different-class pairs, deterministic from `seed`.

  Same: a record of a class with >= 2 records and another record of its class. Different: a record,
  then one of any other class, uniformly (never resampled, so this is vectorised and exact).
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max(initial=-1)) + 1
  if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 2:
    raise UserError(f"num_pairs={num_pairs!r}: expected an integer >= 2")
  per_class = np.bincount(labels, minlength=num_classes)
  if np.count_nonzero(per_class) < 2:
    raise UserError(f"verification pairs need at least 2 classes; the split has {np.count_nonzero(per_class)}.")
  if per_class.max() < 2:
    raise UserError("verification pairs need a class with at least 2 images; every class has one.")
  rng = np.random.default_rng(seed)
  order = np.argsort(labels, kind="stable")  # records grouped by class
  position = np.empty(len(labels), np.int64)
  position[order] = np.arange(len(labels))
  starts = np.concatenate([[0], np.cumsum(per_class)])[:-1]
  num_same = num_pairs // 2
  num_different = num_pairs - num_same
  eligible = np.flatnonzero(per_class[labels] >= 2)
  first_same = rng.choice(eligible, size=num_same)
  classes = labels[first_same]
  offset = (position[first_same] - starts[classes] + 1 + rng.integers(0, per_class[classes] - 1)) % per_class[classes]
  second_same = order[starts[classes] + offset]
  first_different = rng.integers(0, len(labels), size=num_different)
  classes = labels[first_different]
  # A uniform position among the records of the other classes, stepping over this class's block.
  other = rng.integers(0, len(labels) - per_class[classes])
  other = np.where(other >= starts[classes], other + per_class[classes], other)
  second_different = order[other]
  return Pairs(first=np.concatenate([first_same, first_different]),
               second=np.concatenate([second_same, second_different]),
               same=np.concatenate([np.ones(num_same, bool), np.zeros(num_different, bool)]))


def _split_scores(similarities, same) -> tuple[np.ndarray, np.ndarray]:
  similarities = np.asarray(similarities, np.float64)
  same = np.asarray(same, bool)
  if similarities.shape != same.shape or similarities.ndim != 1:
    raise ValueError(f"similarities {similarities.shape} and same {same.shape} must be equal 1-D shapes")
  positives, negatives = similarities[same], similarities[~same]
  if len(positives) == 0 or len(negatives) == 0:
    raise UserError(f"verification needs both same and different pairs; got {len(positives)} same and "
                    f"{len(negatives)} different.")
  return positives, negatives


def _roc_counts(similarities, same) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
  """(false accepts, true accepts, thresholds, positives, negatives) with thresholds decreasing from +inf."""
  positives, negatives = _split_scores(similarities, same)
  values = np.unique(np.concatenate([positives, negatives]))[::-1]
  # Accepted at t = values[i]: every score >= t, i.e. all but those strictly below.
  true_accepts = len(positives) - np.searchsorted(np.sort(positives), values, side="left")
  false_accepts = len(negatives) - np.searchsorted(np.sort(negatives), values, side="left")
  return (np.concatenate([[0], false_accepts]), np.concatenate([[0], true_accepts]),
          np.concatenate([[np.inf], values]), len(positives), len(negatives))


def roc_curve(similarities: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false accept rates, true accept rates, thresholds), thresholds decreasing from +inf.

  At threshold t a pair is accepted as "same" when its similarity >= t; one point per distinct
  similarity, plus (0, 0) at +inf, ending at (1, 1).
  """
  false_accepts, true_accepts, thresholds, num_positives, num_negatives = _roc_counts(similarities, same)
  return false_accepts / num_negatives, true_accepts / num_positives, thresholds


def roc_auc(similarities: np.ndarray, same: np.ndarray) -> float:
  """Area under the ROC curve = P(a same pair scores above a different pair), ties counted half."""
  far, tar, _ = roc_curve(similarities, same)
  return float(np.sum((far[1:] - far[:-1]) * (tar[1:] + tar[:-1]) / 2))


def equal_error_rate(similarities: np.ndarray, same: np.ndarray) -> tuple[float, float]:
  """(EER, threshold): where the false accept rate equals the false reject rate on the ROC curve.

  Between two ROC points the rates are interpolated linearly; the threshold returned is the first one
  (from the strict end) at which false accepts reach false rejects. The crossing is found in integer
  counts, so equal rates are found equal (1/3 - (1 - 2/3) is not 0 in floating point).
  """
  false_accepts, true_accepts, thresholds, num_positives, num_negatives = _roc_counts(similarities, same)
  false_rejects = num_positives - true_accepts
  # far - frr, times positives * negatives: rises from -P*N at (0, 0) to +P*N at (1, 1).
  gap = false_accepts * num_positives - false_rejects * num_negatives
  far = false_accepts / num_negatives
  i = int(np.argmax(gap >= 0))
  if gap[i] == 0 or i == 0:
    return float(far[i]), float(thresholds[i])
  fraction = -gap[i - 1] / (gap[i] - gap[i - 1])
  return float(far[i - 1] + fraction * (far[i] - far[i - 1])), float(thresholds[i])


def midpoint_thresholds(values: np.ndarray) -> np.ndarray:
  """Candidate thresholds for sorted unique scores: below all, midway between neighbours, above all."""
  return np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])


def calibrate_threshold(similarities: np.ndarray, same: np.ndarray, method: str = "max_accuracy",
                        target_far: float = 0.001) -> float:
  """A similarity threshold (same iff similarity >= threshold) chosen on calibration pairs.

  "max_accuracy": the threshold of highest accuracy on these pairs, placed midway between two
  neighbouring scores (the smallest such threshold on ties). "far": the smallest threshold whose false
  accept rate is at most `target_far`, midway between the last rejected different pair and the next score.
  """
  if method not in THRESHOLD_METHODS:
    raise UserError(f"threshold method '{method}' is not one of {THRESHOLD_METHODS}.")
  positives, negatives = _split_scores(similarities, same)
  values = np.unique(np.concatenate([positives, negatives]))
  if method == "max_accuracy":
    candidates = midpoint_thresholds(values)
    correct = (len(positives) - np.searchsorted(np.sort(positives), candidates, side="left")
               + np.searchsorted(np.sort(negatives), candidates, side="left"))
    return float(candidates[int(np.argmax(correct))])
  if not 0.0 <= target_far < 1.0:
    raise UserError(f"target_far={target_far}: expected a false accept rate in [0, 1).")
  allowed = int(np.floor(target_far * len(negatives) + 1e-9))  # different pairs that may be accepted
  highest_rejected = np.sort(negatives)[::-1][allowed]
  above = values[values > highest_rejected]
  return float((highest_rejected + above[0]) / 2 if len(above) else highest_rejected + 1.0)


def rates_at_threshold(similarities: np.ndarray, same: np.ndarray, threshold: float) -> dict:
  """Accuracy, false accept rate and false reject rate when "same" means similarity >= threshold."""
  positives, negatives = _split_scores(similarities, same)
  false_rejects = np.count_nonzero(positives < threshold)
  false_accepts = np.count_nonzero(negatives >= threshold)
  total = len(positives) + len(negatives)
  return {"accuracy": 1.0 - (false_rejects + false_accepts) / total,
          "false_accept_rate": false_accepts / len(negatives),
          "false_reject_rate": false_rejects / len(positives)}


def verification_report(similarities: np.ndarray, same: np.ndarray, threshold: float | None = None) -> dict:
  """ROC-AUC, EER (and its similarity threshold) and, given a threshold, the rates at it."""
  eer, eer_threshold = equal_error_rate(similarities, same)
  report = {"roc_auc": roc_auc(similarities, same), "eer": eer, "eer_similarity_threshold": eer_threshold,
            "pairs": int(len(same)), "same_pairs": int(np.count_nonzero(same))}
  if threshold is not None:
    report.update({f"{name}_at_threshold": value
                   for name, value in rates_at_threshold(similarities, same, threshold).items()})
  return report


def threshold_record(similarity_threshold: float, scoring: str, **details) -> dict:
  """The threshold as a record for people (what a workdir's threshold.json holds): in distance or probability
  units, with `details` such as how it was calibrated."""
  if scoring == "distance":
    record = {"scoring": "distance", "threshold": -similarity_threshold,
              "same_if": "euclidean distance between the embeddings <= threshold"}
  else:
    record = {"scoring": "pair_head", "threshold": similarity_threshold,
              "same_if": "pair head probability >= threshold"}
  return {**record, **details}


def similarity_threshold(record: dict, use: str = "pair") -> float:
  """The similarity threshold of a `threshold_record`: for one pair (`use="pair"`), or for a query against
  a gallery of classes (`use="gallery"`: its `gallery_threshold` where calibrated, else the pair one)."""
  value = float(record.get("gallery_threshold", record["threshold"]) if use == "gallery" else record["threshold"])
  return -value if record["scoring"] == "distance" else value
