"""The compare, gallery and openset modes: a trained model on image files, decided at the threshold
`--mode=calibrate` saved in `<workdir>/eval/threshold.json` (or one given with --threshold)."""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Any

import numpy as np

from siamese_jax.errors import UserError
from siamese_jax.metrics.open_set import open_set_report
from siamese_jax.metrics.retrieval import GALLERY_METHODS, gallery_class_similarities
from siamese_jax.metrics.scoring import similarity_for_people
from siamese_jax.metrics.verification import similarity_threshold
from siamese_jax.trained import load_gallery, load_queries, load_threshold, load_trained_model, resolve_invert
from siamese_jax.workdir import EVAL_DIRNAME

PRINTED_PREDICTIONS = 20  # gallery/openset summaries list this many predictions; the CSV has them all


def compare_images(workdir: str | os.PathLike, image1: str | os.PathLike, image2: str | os.PathLike, *,
                   checkpoint: str = "best", config=None, invert: str | bool = "auto",
                   threshold: float | None = None) -> dict:
  """Distance (and pair-head probability) of two image files, and the decision at the calibrated threshold
  (`TrainedModel.compare`), as a mapping to print."""
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  compared = model.compare(image1, image2, invert=invert, threshold=threshold)
  result: dict[str, Any] = {"image1": str(image1), "image2": str(image2), "distance": compared.distance}
  if compared.probability is not None:
    result["probability"] = compared.probability
  if compared.same is not None:
    result["threshold"] = compared.threshold
    result["threshold_rule"] = ("same if euclidean distance <= threshold" if compared.scoring == "distance"
                                else "same if pair head probability >= threshold")
  result["decision"] = None if compared.same is None else ("same" if compared.same else "different")
  result["step"] = model.step
  result["notes"] = compared.notes
  return result


def gallery_size_note(record: dict, num_classes: int, factor: float = 2.0) -> str | None:
  """A note when a gallery is `factor` times larger or smaller than the one the gallery threshold was
  calibrated on: an unknown query's nearest class is closer in a larger gallery, so fewer are rejected
  (and more in a smaller one) than the calibration's rates say."""
  calibrated = record.get("gallery_threshold_classes")
  if not calibrated or 1 / factor <= num_classes / calibrated <= factor:
    return None
  more = num_classes > calibrated
  return (f"the gallery threshold was calibrated on a gallery of {calibrated} classes, this one has "
          f"{num_classes}: expect {'fewer' if more else 'more'} unknown queries rejected than the calibration's "
          f"{record['gallery_calibration_unknown_rejection_rate']:.1%}; check it with "
          "--mode=openset on labelled queries, or set your own with --threshold.")


def classify_gallery(workdir: str | os.PathLike, gallery: str | os.PathLike, queries: str | os.PathLike, *,
                     method: str = "nearest", output: str | os.PathLike | None = None,
                     checkpoint: str = "best", config=None, invert: str | bool = "auto",
                     threshold: float | None = None, open_set_mode: bool = False) -> dict:
  """Classifies query images against a gallery folder and writes a CSV of predictions.

  `method`: nearest gallery image, class centroid, or class medoid. Each CSV row: the query, its
  predicted class and the distance (or pair-head probability) to it, the runner-up and its score, the
  true class when the queries come in class folders, and, given a calibrated threshold, whether the
  query is accepted as a known class (else "unknown"). Returns a summary (accuracy when classes are
  known, and the open-set report with `open_set_mode`).
  """
  if method not in GALLERY_METHODS:
    raise UserError(f"method='{method}' is not one of {GALLERY_METHODS}.")
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  flip = resolve_invert(invert, model)
  gallery_source = load_gallery(gallery, model.image_shape, invert=flip, resize=model.resize)
  query_set = load_queries(queries, model.image_shape, invert=flip, resize=model.resize)
  if open_set_mode and query_set.class_names is None:
    raise UserError(f"open set: queries {queries} must come in class folders (queries/<class>/<image>) so "
                    "known and unknown queries can be told apart; classes not in the gallery are unknown.")
  record = load_threshold(workdir, model, threshold=threshold, required=open_set_mode)
  scorer = model.scorer_for(record["scoring"] if record else "auto")
  scoring = scorer.name
  gallery_embeddings = model.embed(gallery_source)
  query_embeddings = model.embed(query_set.images)
  num_classes = gallery_source.num_classes
  similarities = gallery_class_similarities(query_embeddings, gallery_embeddings, gallery_source.labels,
                                            num_classes, method, scorer)
  order = np.argsort(-similarities, axis=1, kind="stable")
  best, runner_up = order[:, 0], (order[:, 1] if num_classes > 1 else order[:, 0])
  rows = np.arange(len(best))
  unit = "distance" if scoring == "distance" else "probability"
  score_of = lambda columns: similarity_for_people(similarities[rows, columns], scoring)
  accepted = None
  if record is not None:  # a query against many classes: the gallery threshold (similarity_threshold)
    accepted = similarities[rows, best] >= similarity_threshold(record, "gallery")
  names = gallery_source.class_names
  truth = query_set.class_names
  index_of = {name: i for i, name in enumerate(names)}
  query_labels = None if truth is None else np.array([index_of.get(name, -1) for name in truth])

  output = pathlib.Path(output) if output else (
      pathlib.Path(workdir) / EVAL_DIRNAME / f"{'openset' if open_set_mode else 'gallery'}_{method}.csv")
  output.parent.mkdir(parents=True, exist_ok=True)
  with output.open("w", newline="") as file:
    writer = csv.writer(file)
    header = ["query", "predicted", unit, "runner_up", f"runner_up_{unit}"]
    header += ["true_class", "correct"] if truth is not None else []
    header += ["decision"] if accepted is not None else []
    writer.writerow(header)
    best_scores, second_scores = score_of(best), score_of(runner_up)
    for q in rows:
      row = [query_set.file_ids[q], names[best[q]], f"{best_scores[q]:.6g}", names[runner_up[q]],
             f"{second_scores[q]:.6g}"]
      if truth is not None:
        known = query_labels[q] >= 0
        if accepted is None:
          correct = int(best[q] == query_labels[q]) if known else ""
        else:  # a known query must be accepted with its class; an unknown one must be rejected
          correct = int(bool(accepted[q]) and best[q] == query_labels[q]) if known else int(not accepted[q])
        row += [truth[q], correct]
      if accepted is not None:
        row.append(names[best[q]] if accepted[q] else "unknown")
      writer.writerow(row)

  summary: dict[str, Any] = {"queries": len(rows), "gallery_classes": num_classes,
                             "gallery_images": len(gallery_source), "method": method, "scoring": scoring,
                             "csv": str(output), "step": model.step}
  shown = min(len(rows), PRINTED_PREDICTIONS)
  summary["predictions"] = [
      f"{query_set.file_ids[q]} -> {names[best[q]] if accepted is None or accepted[q] else 'unknown'} "
      f"({unit} {best_scores[q]:.4g} to {names[best[q]]})" for q in rows[:shown]]
  if shown < len(rows):
    summary["predictions"].append(f"... {len(rows) - shown} more in the CSV")
  if record is not None:
    summary["threshold"] = similarity_for_people(similarity_threshold(record, "gallery"), scoring)
    summary["accepted"] = int(accepted.sum())
    if note := gallery_size_note(record, num_classes):
      summary["note"] = note
  if query_labels is not None:
    known = query_labels >= 0
    if known.any():
      summary["accuracy"] = float(np.mean(best[known] == query_labels[known]))
    summary["unknown_class_queries"] = int((~known).sum())
  if open_set_mode:
    summary["open_set"] = open_set_report(similarities, query_labels, similarity_threshold(record, "gallery"))
  return summary


def open_set(workdir: str | os.PathLike, gallery: str | os.PathLike, queries: str | os.PathLike, *,
             method: str = "nearest", output: str | os.PathLike | None = None, checkpoint: str = "best",
             config=None, invert: str | bool = "auto", threshold: float | None = None) -> dict:
  """Open-set recognition: query classes absent from the gallery must be rejected at the threshold.

  Queries come in class folders; a class the gallery lacks is "unknown". Reports accuracy on known
  queries and the rejection rate of unknown ones (see open_set_report), and writes the CSV.
  """
  return classify_gallery(workdir, gallery, queries, method=method, output=output, checkpoint=checkpoint,
                          config=config, invert=invert, threshold=threshold, open_set_mode=True)
