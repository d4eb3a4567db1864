"""The index and search modes: a gallery folder embedded once into a saved `GalleryIndex`
(`<workdir>/eval/index/` by default), and query images searched against it for their k nearest items."""

from __future__ import annotations

import csv
import os
import pathlib
import time
from typing import Any

import numpy as np

from siamese_jax.index import GalleryIndex, gallery_distance_threshold
from siamese_jax.trained import load_queries, load_trained_model, resolve_invert
from siamese_jax.workdir import EVAL_DIRNAME, INDEX_DIRNAME, SEARCH_FILENAME

PRINTED_RESULTS = 20  # the search summary lists this many queries; the CSV has them all


def default_index_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / EVAL_DIRNAME / INDEX_DIRNAME


def build_index(workdir: str | os.PathLike, gallery: str | os.PathLike, *, output: str | os.PathLike | None = None,
                backend: str = "exact", threshold: float | None = None, checkpoint: str = "best", config=None,
                invert: str | bool = "auto", batch_size: int | None = None) -> dict:
  """Embeds a gallery folder (one sub-folder per class) with the workdir's model and saves the index.

  Its open-set threshold is `threshold` (a distance) if given, else the workdir's calibrated gallery
  threshold (`<workdir>/eval/threshold.json`, distance scoring); with `backend="usearch"` the graph is
  built and saved too.
  """
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  started = time.perf_counter()
  index = GalleryIndex.from_folder(model, gallery, threshold=threshold, backend=backend, invert=invert,
                                   batch_size=batch_size)
  embedded = time.perf_counter()
  if backend == "usearch":
    index.build_ann()
  path = index.save(output or default_index_path(workdir))
  summary: dict[str, Any] = {"index": str(path), "items": len(index), "classes": len(index.class_names),
                             "dim": index.dim, "backend": backend, "threshold": index.threshold, "step": model.step,
                             "embed_seconds": round(embedded - started, 2),
                             "build_and_save_seconds": round(time.perf_counter() - embedded, 2)}
  if index.threshold is None:
    record = getattr(model, "threshold", None)
    summary["note"] = ("no threshold: the model's is a pair-head probability; calibrate with --scoring=distance "
                       "or pass --threshold (a distance) for open-set rejection" if record and
                       gallery_distance_threshold(record) is None else
                       "no threshold: run --mode=calibrate or pass --threshold (a distance) for open-set rejection")
  return summary


def search_index(workdir: str | os.PathLike, queries: str | os.PathLike, *, index: str | os.PathLike | None = None,
                 k: int = 5, output: str | os.PathLike | None = None, backend: str | None = None,
                 checkpoint: str = "best", config=None, invert: str | bool = "auto",
                 batch_size: int | None = None) -> dict:
  """The k nearest index items of each query image (a file, a folder, or class sub-folders), as a CSV
  (query, [true class,] rank, id, label, distance) and a summary: accuracy@1 and recall@k when the
  queries come in class folders (over queries of classes the index holds)."""
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  index_path = pathlib.Path(index) if index else default_index_path(workdir)
  gallery = GalleryIndex.load(index_path)
  gallery.check_model(model)
  flip = resolve_invert(invert, model)
  query_set = load_queries(queries, model.image_shape, invert=flip, resize=model.resize)
  embeddings = model.embed(query_set.images, batch_size=batch_size)
  started = time.perf_counter()
  found = gallery.search(embeddings, k, backend=backend)
  seconds = time.perf_counter() - started
  truth = query_set.class_names

  output = pathlib.Path(output) if output else pathlib.Path(workdir) / EVAL_DIRNAME / SEARCH_FILENAME
  output.parent.mkdir(parents=True, exist_ok=True)
  with output.open("w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["query"] + (["true_class"] if truth is not None else []) + ["rank", "id", "label", "distance"])
    for q, query_id in enumerate(query_set.file_ids):
      for rank in range(found.ids.shape[1]):
        writer.writerow([query_id] + ([truth[q]] if truth is not None else []) +
                        [rank + 1, found.ids[q, rank], found.labels[q, rank], f"{found.distances[q, rank]:.6g}"])

  summary: dict[str, Any] = {"queries": len(query_set.file_ids), "k": int(found.ids.shape[1]),
                             "index": str(index_path), "index_items": len(gallery),
                             "index_classes": len(gallery.class_names), "backend": backend or gallery.backend,
                             "search_seconds": round(seconds, 3), "csv": str(output), "step": model.step}
  if found.note:
    summary["note"] = found.note
  if gallery.threshold is not None:
    summary["threshold"] = gallery.threshold
    summary["nearest_within_threshold"] = int(np.sum(found.distances[:, 0] <= gallery.threshold))
  if truth is not None:
    truth = np.asarray(truth, dtype=str)
    known = np.isin(truth, gallery.class_names)
    if known.any():
      summary["accuracy_at_1"] = float(np.mean(found.labels[known, 0] == truth[known]))
      summary[f"recall_at_{found.ids.shape[1]}"] = float(np.mean((found.labels[known] == truth[known, None]).any(1)))
    summary["unknown_class_queries"] = int((~known).sum())
  shown = min(len(query_set.file_ids), PRINTED_RESULTS)
  summary["results"] = [f"{query_set.file_ids[q]} -> {found.labels[q, 0]} ({found.ids[q, 0]}, distance "
                        f"{found.distances[q, 0]:.4g})" for q in range(shown)]
  if shown < len(query_set.file_ids):
    summary["results"].append(f"... {len(query_set.file_ids) - shown} more in the CSV")
  return summary
