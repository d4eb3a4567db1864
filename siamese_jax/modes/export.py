"""Embeddings to `.npz`, written batch by batch, and the loader for them.

  python launch.py --mode=export --workdir=runs/omniglot --split=test        # -> runs/omniglot/eval/embeddings_test.npz
  data = load_embeddings("runs/omniglot/eval/embeddings_test.npz")   # siamese_jax.modes.export

The file is an ordinary NumPy `.npz` (`np.load` reads it; no pickles):

  embeddings    float32 [N, D]   what `embed_fn` gives (the same numbers the eval mode computes)
  labels        int32 [N]        class index of each record
  class_names   str [C]          e.g. "Greek/character03"
  class_groups  int32 [C]        group (alphabet) of each class
  group_names   str [G]          e.g. "Greek"; one "" when the data have no groups
  file_ids      str [N]          path of each image inside its zip or folder
  drawers       int32 [N]        Omniglot drawer 1..20, -1 where unknown
  split         str              "train", "validation", "test" or "folder"
  step          int64            checkpoint step
  config_hash   str              `workdir.config_hash` of the run's config
  checkpoint    str              checkpoint directory
  model         str              model.name

Memory stays bounded: images are read one batch at a time (lazy sources decode per batch) and each
batch of embeddings is streamed into the zip member as it is computed, so neither all images nor all
embeddings are ever held at once.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from typing import Any, Iterable

import numpy as np

from siamese_jax.data import pipeline, sources
from siamese_jax.errors import UserError
from siamese_jax.metrics.embedding import embedding_batches
from siamese_jax.trained import TrainedModel, load_trained_model, resolve_invert
from siamese_jax.workdir import EVAL_DIRNAME

EXPORT_SPLITS = ("train", "validation", "test")
_REQUIRED = ("embeddings", "labels", "class_names", "class_groups", "group_names", "file_ids", "split",
             "step", "config_hash")


@dataclasses.dataclass
class ExportedEmbeddings:
  """The contents of an export file (see the module docstring for each field)."""

  embeddings: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  class_groups: np.ndarray
  group_names: list[str]
  file_ids: list[str]
  drawers: np.ndarray
  split: str
  step: int
  config_hash: str
  checkpoint: str
  model: str

  def __len__(self) -> int:
    return len(self.labels)


def _write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
  with archive.open(f"{name}.npy", "w", force_zip64=True) as file:
    np.lib.format.write_array(file, np.asarray(array), allow_pickle=False)


def _strings(values: Iterable[str]) -> np.ndarray:
  values = [str(v) for v in values]
  return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def write_embeddings(path: str | os.PathLike, batches: Iterable[np.ndarray], *, num_records: int,
                     metadata: dict[str, Any]) -> tuple[int, int]:
  """Streams float32 embedding batches into `path` (.npz) with the given metadata arrays.

  Written to `<path>.tmp` and renamed when complete, so a stopped export never leaves a file that looks
  whole. Returns (records, dimension).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  batches = iter(batches)
  first = np.asarray(next(batches), np.float32)
  dim = first.shape[1]
  written = 0
  try:
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
      with archive.open("embeddings.npy", "w", force_zip64=True) as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                   "shape": (num_records, dim)})
        for batch in _chain(first, batches):
          batch = np.ascontiguousarray(batch, dtype="<f4")
          file.write(batch.tobytes())
          written += len(batch)
      if written != num_records:
        raise RuntimeError(f"export wrote {written} embeddings, expected {num_records}")
      for name, value in metadata.items():
        _write_member(archive, name, value)
    temporary.replace(path)
  finally:
    temporary.unlink(missing_ok=True)
  return written, dim


def _chain(first, rest):
  yield first
  yield from rest


def export_embeddings(model: TrainedModel, source, path: str | os.PathLike, *, split: str,
                      batch_size: int | None = None, progress: bool = True) -> dict:
  """Embeds every record of `source` with `model` into `path` (.npz)."""
  if tuple(source.image_shape) != tuple(model.image_shape):
    raise UserError(f"source images are {tuple(source.image_shape)}; this model takes {model.image_shape}.")
  if len(source) == 0:
    raise UserError(f"the {split} split has no images to export.")
  batch_size = batch_size or int(model.config.eval.batch_size)
  batches = embedding_batches(model.embed_fn, model.variables, source, batch_size, progress,
                              description=f"export {split}")
  metadata = {
      "labels": np.asarray(source.labels, np.int32),
      "class_names": _strings(source.class_names),
      "class_groups": np.asarray(source.class_groups, np.int32),
      "group_names": _strings(source.group_names),
      "file_ids": _strings(source.file_ids),
      "drawers": np.asarray(source.drawers, np.int32),
      "split": np.array(split),
      "step": np.array(model.step, np.int64),
      "config_hash": np.array(model.config_hash),
      "checkpoint": np.array(str(model.checkpoint_dir)),
      "model": np.array(str(model.config.model.name)),
  }
  records, dim = write_embeddings(path, batches, num_records=len(source), metadata=metadata)
  return {"path": str(path), "records": records, "dim": dim, "split": split, "step": model.step,
          "classes": len(source.class_names)}


def export_workdir(workdir: str | os.PathLike, *, split: str = "test", images: str | os.PathLike | None = None,
                   output: str | os.PathLike | None = None, checkpoint: str = "best", config=None,
                   invert: str | bool = "auto", batch_size: int | None = None, progress: bool = True) -> dict:
  """Exports the embeddings of a split of the run's data, or of an image folder (`images`), to .npz.

  `split`: train | validation | test, the run's own (seeded) class splits. `images`: a folder with one
  sub-folder per class (or group/class), decoded batch by batch. Default output:
  `<workdir>/eval/embeddings_<split or folder name>.npz`.
  """
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  if images is not None:
    folder = pathlib.Path(images).expanduser()
    source = sources.image_folder_source(folder, model.image_shape, in_memory=False,
                                         invert=resolve_invert(invert, model))
    split, name = "folder", folder.name or "folder"
  else:
    if split not in EXPORT_SPLITS:
      raise UserError(f"split='{split}' is not one of {EXPORT_SPLITS}.")
    splits = pipeline.load_splits(model.config.data, seed=model.config.seed)
    source = getattr(splits, split)
    if source is None:
      raise UserError(f"this run has no {split} split (data.validation / data.validation_fraction hold "
                      "no classes out); export train or test.")
    name = split
  output = pathlib.Path(output) if output else pathlib.Path(workdir) / EVAL_DIRNAME / f"embeddings_{name}.npz"
  return export_embeddings(model, source, output, split=split, batch_size=batch_size, progress=progress)


def load_embeddings(path: str | os.PathLike) -> ExportedEmbeddings:
  """Reads an export file written by `export_embeddings`."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"{path}: not found; write it with `python launch.py --mode=export --workdir=...`.")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [key for key in _REQUIRED if key not in data.files]
      if missing:
        raise UserError(f"{path}: not a siamese_jax embedding export (missing {missing}).")
      get = lambda key, default: data[key] if key in data.files else default
      return ExportedEmbeddings(
          embeddings=data["embeddings"], labels=data["labels"], class_names=data["class_names"].tolist(),
          class_groups=data["class_groups"], group_names=data["group_names"].tolist(),
          file_ids=data["file_ids"].tolist(),
          drawers=get("drawers", np.full(len(data["labels"]), -1, np.int32)),
          split=str(data["split"]), step=int(data["step"]), config_hash=str(data["config_hash"]),
          checkpoint=str(get("checkpoint", "")), model=str(get("model", "")))
  except (zipfile.BadZipFile, ValueError, OSError) as error:
    raise UserError(f"{path}: cannot read it as an .npz export ({type(error).__name__}: {error}).") from error
