"""A trained model back from its workdir (or one checkpoint), and what to do with it on new images.

  model = load_trained_model("runs/omniglot")                 # best checkpoint by validation accuracy
  model = load_trained_model("runs/omniglot", checkpoint="latest")   # or a step, or a checkpoint path
  embeddings = model.embed(images_uint8)                       # [N, D]; other sizes are resized
  probabilities = model.pair_score_fn(e1, e2)                  # Koch-head models only

The model is rebuilt from `<workdir>/config.json` exactly as training built it (`models.create` with
the data's image shape), split into `nnx.Param` and the rest, and only those two parts of the
checkpoint's `state` item are read (the optimizer state is never loaded). Before reading, the
checkpoint's array names and shapes are compared with the rebuilt model's, so a checkpoint from another
config is a clear error, not an Orbax traceback.

The mode functions at the end (`compare_images`, `classify_gallery`, `open_set`) are what `launch.py`
calls for images on disk; they use the threshold `evaluate.calibrate_workdir` saved in
`<workdir>/eval/threshold.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from siamese_jax import ensemble, evaluate, models
from siamese_jax.errors import UserError

CHECKPOINT_CHOICES = ("best", "latest")
INVERT_CHOICES = ("auto", "yes", "no")
_STEP_DIR = re.compile(r"^\d+$")
_BEST_METRIC = "validation_accuracy"  # what checkpoint.py stores in <step>/metrics/metrics
PRINTED_PREDICTIONS = 20  # gallery/openset summaries list this many predictions; the CSV has them all


# --------------------------------------------------------------------------------------------------
# Config and checkpoint selection


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote (`<workdir>/config.json`) as a ConfigDict."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise UserError(f"{path}: not found. A workdir made by `launch.py --mode=train` holds config.json; "
                    "for another directory pass --config=<the config file the model was trained with>.")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{path}: not a JSON config ({error}).") from error


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short, stable hash of the resolved config (sorted-key JSON), to tell runs apart in exports."""
  canonical = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def checkpoint_steps(checkpoints_dir: pathlib.Path) -> list[int]:
  """Finished checkpoint steps: all-digit directories holding a `state` item (Orbax's temporary
  directories and `<step>.unreadable` ones set aside by a resume are not steps)."""
  if not checkpoints_dir.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints_dir.iterdir()
                if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state").is_dir())


def _validation_accuracy(step_dir: pathlib.Path) -> float | None:
  try:
    value = json.loads((step_dir / "metrics" / "metrics").read_text()).get(_BEST_METRIC)
  except (OSError, ValueError, AttributeError):
    return None
  return float(value) if isinstance(value, (int, float)) else None


def select_checkpoint(workdir: pathlib.Path | None, checkpoint: str | os.PathLike = "best"
                      ) -> tuple[pathlib.Path, int, str]:
  """(step directory, step, why it was chosen) for `checkpoint`.

  "best": the step with the highest validation accuracy (the later one on ties); the latest when no
  step has one. "latest": the highest step. A number: that step. Anything else: a path to a step
  directory (`.../checkpoints/<step>`), e.g. from another workdir.
  """
  text = str(checkpoint)
  if text in CHECKPOINT_CHOICES or text.isdigit():
    if workdir is None:
      raise UserError(f"checkpoint={text!r} picks a step of a workdir; give the workdir too.")
    directory = workdir / "checkpoints"
    steps = checkpoint_steps(directory)
    if not steps:
      raise UserError(f"{directory}: no checkpoint there. Train first (python launch.py --config=... "
                      f"--workdir={workdir}) or pass --checkpoint=<path to a checkpoints/<step> directory>.")
    if text == "latest":
      return directory / str(steps[-1]), steps[-1], "latest"
    if text.isdigit():
      if int(text) not in steps:
        raise UserError(f"checkpoint step {int(text)} is not in {directory}; it holds steps {steps}.")
      return directory / text, int(text), f"step {int(text)}"
    scored = [(accuracy, step) for step in steps
              if (accuracy := _validation_accuracy(directory / str(step))) is not None]
    if not scored:
      return directory / str(steps[-1]), steps[-1], "latest (no checkpoint has a validation accuracy)"
    accuracy, step = max(scored)
    return directory / str(step), step, f"best validation accuracy {accuracy:.4f}"
  path = pathlib.Path(text).expanduser()
  if path.name == "state" and path.is_dir():
    path = path.parent
  if not path.is_dir():
    raise UserError(f"checkpoint={text!r}: not 'best', 'latest', a step number, or an existing "
                    "checkpoint directory (<workdir>/checkpoints/<step>).")
  if not (path / "state").is_dir():
    steps = checkpoint_steps(path)
    hint = f"; it holds steps {steps}: pass {path / str(steps[-1])}" if steps else ""
    raise UserError(f"checkpoint {path}: has no 'state' item, so it is not a checkpoint step directory "
                    f"(<workdir>/checkpoints/<step>){hint}.")
  step = int(path.name) if _STEP_DIR.match(path.name) else -1
  return path, step, "given path"


# --------------------------------------------------------------------------------------------------
# Restoring


def restore_variables(step_dir: pathlib.Path, params: Any, model_state: Any) -> tuple[Any, Any]:
  """Reads (params, model_state) from the checkpoint's `state` item into the given structures.

  The checkpoint's names and shapes are checked against the model's first: a mismatch lists the first
  differences (a checkpoint of another model or size), instead of a deep Orbax error.
  """
  import orbax.checkpoint as ocp
  from siamese_jax import checkpoint as checkpoints
  state_dir = (step_dir / "state").absolute()
  target = {"params": params, "model_state": model_state}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    stored = {name: shape for name, shape in checkpoints.stored_shapes(state_dir).items()
              if name.split(".")[0] in target}
  except Exception as error:  # noqa: BLE001 -- any unreadable metadata is the same user problem
    raise UserError(f"checkpoint {step_dir}: cannot read it ({type(error).__name__}: {error}). The "
                    "checkpoint is incomplete or damaged; pick another with --checkpoint.") from error
  differences = checkpoints.shape_differences(stored, checkpoints.tree_shapes(abstract))
  if differences:
    shown = "\n  ".join(differences[:6]) + (f"\n  ... and {len(differences) - 6} more" if len(differences) > 6 else "")
    raise UserError(f"checkpoint {step_dir} does not match the model the config builds "
                    f"({len(differences)} arrays differ):\n  {shown}\nUse the config the checkpoint was "
                    "trained with (the workdir's config.json: leave out --config) or a checkpoint of this model.")
  try:
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except Exception as error:  # noqa: BLE001
    raise UserError(f"checkpoint {step_dir}: cannot read its arrays ({type(error).__name__}: {error}); "
                    "pick another with --checkpoint.") from error
  return restored["params"], restored["model_state"]


@dataclasses.dataclass
class TrainedModel:
  """A restored model: `embed_fn(variables, images)` and, for Koch models, the pair head."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path | None
  checkpoint_dir: pathlib.Path
  step: int
  selected_by: str
  image_shape: tuple[int, int, int]
  graphdef: Any
  variables: Any  # (params, model_state), what embed_fn takes
  embed_fn: Callable
  pair_logits_fn: Callable | None
  config_hash: str
  members: tuple = ()  # an ensemble's member models (siamese_jax/ensemble.py); empty for one model

  @property
  def has_pair_head(self) -> bool:
    return self.pair_logits_fn is not None

  @property
  def invert(self) -> bool:
    """Whether image files are inverted on reading: Omniglot's are (dark ink -> ink = 255), as in training."""
    return self.config.data.source == "omniglot"

  @functools.cached_property
  def pair_score_fn(self) -> Callable | None:
    """`(e1 [P, D], e2 [P, D]) -> [P]` probability that two images show the same class (Koch head)."""
    if self.pair_logits_fn is None:
      return None
    return models.make_pair_score_fn(self.pair_logits_fn, self.variables)

  def embed(self, images, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """float32 [N, D] embeddings of uint8 images [N, H, W, C] (or an ImageSource, read batch by batch).

    Arrays of another size or channel count are resized/converted to the model's input (see
    `prepare_images`); an ImageSource must already have the model's image shape.
    """
    batch_size = batch_size or int(self.config.eval.batch_size)
    if isinstance(images, np.ndarray) or not hasattr(images, "image_shape"):
      images = prepare_images(images, self.image_shape)
    elif tuple(images.image_shape) != self.image_shape:
      raise UserError(f"images of shape {tuple(images.image_shape)}; this model takes {self.image_shape} "
                      f"(data.image_size={self.image_shape[0]}, data.channels={self.image_shape[2]}): load "
                      "the source with that image_shape.")
    return evaluate.embed_images(self.embed_fn, self.variables, images, batch_size, progress)

  def describe(self) -> dict:
    return {"step": self.step, "path": str(self.checkpoint_dir), "selected_by": self.selected_by,
            "model": str(self.config.model.name), "image_shape": list(self.image_shape),
            "config_hash": self.config_hash,
            **({"members": [m.describe() for m in self.members]} if self.members else {})}


def load_trained_model(workdir: str | os.PathLike | None = None, *, checkpoint: str | os.PathLike = "best",
                       config: ml_collections.ConfigDict | None = None) -> TrainedModel:
  """Restores a trained model from `workdir` (or from the checkpoint path `checkpoint`).

  The config is `config` if given, else `<workdir>/config.json`, else the config.json of the workdir the
  checkpoint path lies in. `checkpoint`: "best" (by validation accuracy), "latest", a step number, or a
  path to a `checkpoints/<step>` directory. A workdir made by `--mode=ensemble` loads as one model
  (siamese_jax/ensemble.py).
  """
  workdir_path = pathlib.Path(workdir).expanduser() if workdir else None
  if workdir_path is not None and not workdir_path.is_dir():
    raise UserError(f"workdir {workdir_path}: not found (or not a directory).")
  if ensemble.is_ensemble(workdir_path):
    return ensemble.load_ensemble(workdir_path, checkpoint, config)
  step_dir, step, selected_by = select_checkpoint(workdir_path, checkpoint)
  if config is None:
    candidates = [workdir_path / "config.json"] if workdir_path is not None else []
    candidates.append(step_dir.parent.parent / "config.json")  # <run>/checkpoints/<step>
    found = next((c for c in candidates if c.is_file()), candidates[0])
    config = read_config(found)
  for field in ("data", "model", "eval"):
    if field not in config:
      raise UserError(f"the config has no '{field}' section; is it a siamese_jax training config?")
  image_shape = (int(config.data.image_size), int(config.data.image_size), int(config.data.channels))
  model = models.create(config.model, image_shape=image_shape, rngs=nnx.Rngs(int(config.get("seed", 0))))
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = restore_variables(step_dir, params, model_state)
  return TrainedModel(
      config=config, workdir=workdir_path, checkpoint_dir=step_dir, step=step, selected_by=selected_by,
      image_shape=image_shape, graphdef=graphdef, variables=(params, model_state),
      embed_fn=models.make_embed_fn(graphdef, int(config.eval.get("tta_shift_px", 0))),
      pair_logits_fn=models.make_pair_logits_fn(graphdef) if models.has_pair_head(model) else None,
      config_hash=config_hash(config))


# --------------------------------------------------------------------------------------------------
# Images from arrays and files


def prepare_images(images: Any, image_shape: tuple[int, int, int], *, name: str = "images") -> np.ndarray:
  """uint8 [N, H, W, C] in the model's shape, from uint8 arrays of any size and 1, 3 or 4 channels.

  Accepted: [N, H, W, C], one image [H, W, C] (C in 1, 3, 4) or [H, W], a grayscale batch [N, H, W].
  Other sizes are resized (LANCZOS, as the data sources do) and colour converted (RGB <-> gray; RGBA
  onto white). Pixel values must be uint8 0..255, ink bright for Omniglot models (the model scales to
  [0, 1] itself); anything else is explained, not guessed.
  """
  array = np.asarray(images)
  if array.dtype != np.uint8:
    raise UserError(f"{name}: dtype {array.dtype}; expected uint8 pixels 0..255 (the model converts to "
                    "[0, 1] itself). For floats in [0, 1] pass (x * 255).round().astype(np.uint8).")
  if array.ndim == 2:
    array = array[None, :, :, None]
  elif array.ndim == 3:
    array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
  if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape[1:3]:
    raise UserError(f"{name}: shape {np.asarray(images).shape}; expected [N, H, W, C] with C = 1, 3 or 4 "
                    f"(this model takes {image_shape}).")
  if array.shape[1:] == tuple(image_shape):
    return array
  from PIL import Image
  from siamese_jax.data import sources
  converted = np.empty((len(array), *image_shape), np.uint8)
  for i, image in enumerate(array):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    converted[i] = sources.convert_image(pil, tuple(image_shape))
  logging.info("%s: converted %d images of %s to the model's %s", name, len(array), array.shape[1:], image_shape)
  return converted


def resolve_invert(invert: str | bool, model: TrainedModel) -> bool:
  """"auto" reads files the way the model's training data were read (Omniglot: inverted)."""
  if isinstance(invert, bool):
    return invert
  if invert not in INVERT_CHOICES:
    raise UserError(f"invert='{invert}' is not one of {INVERT_CHOICES}.")
  return model.invert if invert == "auto" else invert == "yes"


def load_image_file(path: str | os.PathLike, image_shape: tuple[int, int, int], *,
                    invert: bool) -> tuple[np.ndarray, str | None]:
  """(uint8 [H, W, C] in the model's shape, a note if it had to be resized or colour converted)."""
  from PIL import Image
  from siamese_jax.data import sources
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"image {path}: not found.")
  data = path.read_bytes()
  image = sources.decode_image(data, image_shape, invert=invert, name=str(path))
  with Image.open(io.BytesIO(data)) as original:
    width, height = original.size
    mode = original.mode
  channels = 1 if mode in ("1", "L", "I", "I;16", "F") else 3
  note = None
  if (height, width) != tuple(image_shape[:2]) or channels != image_shape[2]:
    note = (f"{path.name}: {width}x{height} (PIL mode {mode}) resized/converted to the model's {image_shape[1]}x"
            f"{image_shape[0]}x{image_shape[2]}")
  return image, note


@dataclasses.dataclass
class LabelledImages:
  """Images read from a folder: uint8 [N, H, W, C], per-image ids, and class names (None if unknown)."""

  images: np.ndarray
  file_ids: list[str]
  class_names: list[str] | None  # per image


def _image_files_directly_in(folder: pathlib.Path) -> list[pathlib.Path]:
  from siamese_jax.data import sources
  return sorted(p for p in folder.iterdir() if p.is_file() and sources.is_image_name(p.name))


def load_gallery(folder: str | os.PathLike, image_shape: tuple[int, int, int], *, invert: bool):
  """A gallery folder (one sub-folder per class, or group/class) as an in-memory ImageSource."""
  from siamese_jax.data import sources
  folder = pathlib.Path(folder).expanduser()
  if folder.is_dir() and _image_files_directly_in(folder) and not any(p.is_dir() for p in folder.iterdir()):
    raise UserError(f"gallery {folder}: holds images but no class folders; a gallery needs one sub-folder "
                    "per class (gallery/<class>/<image>), the folder name being the class.")
  try:
    return sources.image_folder_source(folder, image_shape, invert=invert)
  except UserError as error:
    raise UserError(f"gallery: {error}") from error


def load_queries(path: str | os.PathLike, image_shape: tuple[int, int, int], *,
                 invert: bool) -> LabelledImages:
  """Query images: one file, a folder of files (classes unknown), or class sub-folders (classes known)."""
  from siamese_jax.data import sources
  path = pathlib.Path(path).expanduser()
  if path.is_file():
    image, _ = load_image_file(path, image_shape, invert=invert)
    return LabelledImages(image[None], [path.name], None)
  if not path.is_dir():
    raise UserError(f"queries {path}: not found; expected an image file or a folder of images.")
  files = _image_files_directly_in(path)
  if files:
    images = np.stack([load_image_file(f, image_shape, invert=invert)[0] for f in files])
    return LabelledImages(images, [f.name for f in files], None)
  try:
    source = sources.image_folder_source(path, image_shape, invert=invert)
  except UserError as error:
    raise UserError(f"queries: {error}") from error
  return LabelledImages(np.asarray(source.images), list(source.file_ids),
                        [source.class_names[label] for label in source.labels])


# --------------------------------------------------------------------------------------------------
# Modes on images from disk


def threshold_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / evaluate.EVAL_DIRNAME / evaluate.THRESHOLD_FILENAME


def load_threshold(workdir: str | os.PathLike, model: TrainedModel, *, threshold: float | None = None,
                   required: bool = False) -> dict | None:
  """The threshold record to decide same/different with: `threshold` (in the model's default scoring's
  units) if given, else `<workdir>/eval/threshold.json`, else None (or an error when `required`)."""
  scoring = "pair_head" if model.has_pair_head else "distance"
  if threshold is not None:
    return evaluate.threshold_record(evaluate.similarity_threshold({"scoring": scoring, "threshold": threshold}),
                                     scoring, method="given")
  path = threshold_path(workdir)
  if not path.is_file():
    if required:
      raise UserError(f"{path}: no calibrated threshold. Run `python launch.py --mode=calibrate "
                      f"--workdir={workdir}` (or --mode=eval) first, or pass --threshold.")
    return None
  record = json.loads(path.read_text())
  if record.get("scoring") == "pair_head" and not model.has_pair_head:
    raise UserError(f"{path}: calibrated on pair-head probabilities, but this model has no pair head; "
                    "recalibrate with --mode=calibrate.")
  if record.get("step") not in (None, model.step):
    record["warning"] = (f"calibrated for the checkpoint at step {record.get('step')}, used with step "
                         f"{model.step}; run --mode=calibrate with the same --checkpoint to recalibrate")
  return record


def compare_images(workdir: str | os.PathLike, image1: str | os.PathLike, image2: str | os.PathLike, *,
                   checkpoint: str = "best", config=None, invert: str | bool = "auto",
                   threshold: float | None = None) -> dict:
  """Distance (and pair-head probability) of two image files, and the decision at the calibrated threshold."""
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  flip = resolve_invert(invert, model)
  (first, note1), (second, note2) = (load_image_file(p, model.image_shape, invert=flip) for p in (image1, image2))
  embeddings = model.embed(np.stack([first, second]))
  distance = float(np.linalg.norm(embeddings[0].astype(np.float64) - embeddings[1]))
  result: dict[str, Any] = {"image1": str(image1), "image2": str(image2), "distance": distance,
                            "step": model.step, "notes": [n for n in (note1, note2) if n]}
  if model.has_pair_head:
    result["probability"] = float(np.asarray(model.pair_score_fn(embeddings[:1], embeddings[1:]))[0])
  record = load_threshold(workdir, model, threshold=threshold)
  if record is None:
    result["decision"] = None
    result["notes"].append(f"no calibrated threshold ({threshold_path(workdir)}): run --mode=calibrate "
                           "or pass --threshold for a same/different decision")
    return result
  similarity = -distance if record["scoring"] == "distance" else result["probability"]
  result["threshold"] = record["threshold"]
  result["threshold_rule"] = f"same if {record['same_if']}"
  result["decision"] = "same" if similarity >= evaluate.similarity_threshold(record) else "different"
  if "warning" in record:
    result["notes"].append(record["warning"])
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
  if method not in evaluate.GALLERY_METHODS:
    raise UserError(f"method='{method}' is not one of {evaluate.GALLERY_METHODS}.")
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  flip = resolve_invert(invert, model)
  gallery_source = load_gallery(gallery, model.image_shape, invert=flip)
  query_set = load_queries(queries, model.image_shape, invert=flip)
  if open_set_mode and query_set.class_names is None:
    raise UserError(f"open set: queries {queries} must come in class folders (queries/<class>/<image>) so "
                    "known and unknown queries can be told apart; classes not in the gallery are unknown.")
  record = load_threshold(workdir, model, threshold=threshold, required=open_set_mode)
  scoring = record["scoring"] if record else ("pair_head" if model.has_pair_head else "distance")
  pair_score_fn = model.pair_score_fn if scoring == "pair_head" else None
  gallery_embeddings = model.embed(gallery_source)
  query_embeddings = model.embed(query_set.images)
  num_classes = gallery_source.num_classes
  similarities = evaluate.gallery_class_similarities(query_embeddings, gallery_embeddings, gallery_source.labels,
                                                     num_classes, method, pair_score_fn)
  order = np.argsort(-similarities, axis=1, kind="stable")
  best, runner_up = order[:, 0], (order[:, 1] if num_classes > 1 else order[:, 0])
  rows = np.arange(len(best))
  unit = "distance" if scoring == "distance" else "probability"
  score_of = lambda columns: evaluate.similarity_for_people(similarities[rows, columns], scoring)
  accepted = None
  if record is not None:  # a query against many classes: the gallery threshold (evaluate.similarity_threshold)
    accepted = similarities[rows, best] >= evaluate.similarity_threshold(record, "gallery")
  names = gallery_source.class_names
  truth = query_set.class_names
  index_of = {name: i for i, name in enumerate(names)}
  query_labels = None if truth is None else np.array([index_of.get(name, -1) for name in truth])

  output = pathlib.Path(output) if output else (
      pathlib.Path(workdir) / evaluate.EVAL_DIRNAME / f"{'openset' if open_set_mode else 'gallery'}_{method}.csv")
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
    summary["threshold"] = evaluate.similarity_for_people(evaluate.similarity_threshold(record, "gallery"), scoring)
    summary["accepted"] = int(accepted.sum())
    if note := gallery_size_note(record, num_classes):
      summary["note"] = note
  if query_labels is not None:
    known = query_labels >= 0
    if known.any():
      summary["accuracy"] = float(np.mean(best[known] == query_labels[known]))
    summary["unknown_class_queries"] = int((~known).sum())
  if open_set_mode:
    summary["open_set"] = evaluate.open_set_report(similarities, query_labels,
                                                   evaluate.similarity_threshold(record, "gallery"))
  return summary


def open_set(workdir: str | os.PathLike, gallery: str | os.PathLike, queries: str | os.PathLike, *,
             method: str = "nearest", output: str | os.PathLike | None = None, checkpoint: str = "best",
             config=None, invert: str | bool = "auto", threshold: float | None = None) -> dict:
  """Open-set recognition: query classes absent from the gallery must be rejected at the threshold.

  Queries come in class folders; a class the gallery lacks is "unknown". Reports accuracy on known
  queries and the rejection rate of unknown ones (see evaluate.open_set_report), and writes the CSV.
  """
  return classify_gallery(workdir, gallery, queries, method=method, output=output, checkpoint=checkpoint,
                          config=config, invert=invert, threshold=threshold, open_set_mode=True)
