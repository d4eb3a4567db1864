"""A trained model back from its workdir (or one checkpoint), ensembles included, and images for it.

  model = load_trained_model("runs/omniglot")                        # best checkpoint by validation accuracy
  model = load_trained_model("runs/omniglot", checkpoint="latest")   # or a step, or a checkpoint path
  embeddings = model.embed(images_uint8)                              # [N, D]; other sizes are resized
  similarities = model.scorer.pair_similarities(embeddings[:1], embeddings[1:])

The model is rebuilt from `<workdir>/config.json` exactly as training built it (`models.create` with
the data's image shape), split into `nnx.Param` and the rest, and only those two parts of the
checkpoint's `state` item are read (`checkpoint.restore_variables`; the optimizer state is never
loaded). Its `scorer` is the Koch head's probability for a model with a pair head, else the embedding
distance (`metrics.scoring`).

A workdir holding `ensemble.json` (written by `modes.ensemble.make_ensemble`) loads as one model: its
embedding of an image is its members' embeddings side by side, each divided by the member's
root-mean-square embedding length on the validation images and by sqrt(#members). Its squared
distance is then the mean of the members' squared distances, each in its member's typical units, so a
member with larger embeddings (a wider network) does not outvote the others, and a class prototype is
the members' prototypes side by side. The first member's config is the ensemble's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from siamese_jax import models
from siamese_jax.checkpoint import restore_variables, select_checkpoint
from siamese_jax.data import pipeline, sources
from siamese_jax.errors import UserError
from siamese_jax.metrics import embedding, scoring
from siamese_jax.workdir import CONFIG_FILENAME, ENSEMBLE_FILENAME, config_hash, read_config

INVERT_CHOICES = ("auto", "yes", "no")


# --------------------------------------------------------------------------------------------------
# One trained model


@dataclasses.dataclass
class TrainedModel:
  """A restored model: `embed_fn(variables, images)` and the `scorer` that compares its embeddings."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path | None
  checkpoint_dir: pathlib.Path
  step: int
  selected_by: str
  image_shape: tuple[int, int, int]
  graphdef: Any
  variables: Any  # (params, model_state), what embed_fn takes
  embed_fn: Callable
  scorer: scoring.Scorer  # the pair head's probability for a model with one, else the embedding distance
  config_hash: str
  members: tuple = ()  # an ensemble's member models; empty for one model

  @property
  def has_pair_head(self) -> bool:
    return self.scorer.name == "pair_head"

  @property
  def invert(self) -> bool:
    """Whether image files are inverted on reading: Omniglot's are (dark ink -> ink = 255), as in training."""
    return self.config.data.source == "omniglot"

  @property
  def resize(self) -> str:
    """How image files of other proportions reach the model's size: as its training data did (data.resize)."""
    return self.config.data.get("resize", "stretch")  # absent from configs written before it

  def scorer_for(self, scoring_name: str = "auto") -> scoring.Scorer:
    """The scorer a `--scoring` choice names: "auto" is the model's own, "distance" the embedding distance
    (also for a model with a pair head), "pair_head" the head (an error for a model without one)."""
    if scoring.resolve_scoring(scoring_name, self.has_pair_head) == "pair_head":
      return self.scorer
    return scoring.DISTANCE

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
                      f"(data.image_size={self.image_shape[:2]}, data.channels={self.image_shape[2]}): load "
                      "the source with that image_shape.")
    return embedding.embed_images(self.embed_fn, self.variables, images, batch_size, progress)

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
  path to a `checkpoints/<step>` directory (`checkpoint.select_checkpoint`). A workdir holding
  ensemble.json loads as one model (`load_ensemble`).
  """
  workdir_path = pathlib.Path(workdir).expanduser() if workdir else None
  if workdir_path is not None and not workdir_path.is_dir():
    raise UserError(f"workdir {workdir_path}: not found (or not a directory).")
  if is_ensemble(workdir_path):
    return load_ensemble(workdir_path, checkpoint, config)
  step_dir, step, selected_by = select_checkpoint(workdir_path, checkpoint)
  if config is None:
    candidates = [workdir_path / CONFIG_FILENAME] if workdir_path is not None else []
    candidates.append(step_dir.parent.parent / CONFIG_FILENAME)  # <run>/checkpoints/<step>
    found = next((c for c in candidates if c.is_file()), candidates[0])
    config = read_config(found)
  for field in ("data", "model", "eval"):
    if field not in config:
      raise UserError(f"the config has no '{field}' section; is it a siamese_jax training config?")
  image_shape = pipeline.image_shape(config.data)
  # Shapes only (nnx.eval_shape): the checkpoint fills every variable, so a large backbone is not initialised
  # for nothing.
  model = nnx.eval_shape(lambda: models.create(config.model, image_shape=image_shape,
                                               rngs=nnx.Rngs(int(config.get("seed", 0)))))
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = restore_variables(step_dir, params, model_state)
  variables = (params, model_state)
  scorer = (scoring.pair_head_scorer(models.make_pair_score_fn(models.make_pair_logits_fn(graphdef), variables))
            if models.has_pair_head(model) else scoring.DISTANCE)
  return TrainedModel(
      config=config, workdir=workdir_path, checkpoint_dir=step_dir, step=step, selected_by=selected_by,
      image_shape=image_shape, graphdef=graphdef, variables=variables,
      embed_fn=models.make_embed_fn(graphdef, int(config.eval.get("tta_shift_px", 0))),
      scorer=scorer, config_hash=config_hash(config))


# --------------------------------------------------------------------------------------------------
# Ensembles: several trained workdirs as one model


def is_ensemble(workdir: pathlib.Path | None) -> bool:
  return workdir is not None and (pathlib.Path(workdir) / ENSEMBLE_FILENAME).is_file()


def combined_embed_fn(embed_fns: Sequence[Callable], scales: Sequence[float]) -> Callable:
  """`embed_fn(variables, images)` of the ensemble: `variables` is the tuple of the members' variables."""
  def embed_fn(variables, images):
    return jnp.concatenate([fn(v, images) * scale for fn, v, scale in zip(embed_fns, variables, scales)],
                           axis=-1)
  return embed_fn


def _under(base: pathlib.Path, path: str) -> pathlib.Path:
  return pathlib.Path(os.path.normpath(base / path))


def load_ensemble(workdir: pathlib.Path, checkpoint: str = "best", config=None):
  """The ensemble in `<workdir>/ensemble.json` as one `TrainedModel`, scored by embedding distance."""
  path = workdir / ENSEMBLE_FILENAME
  if str(checkpoint) != "best" or config is not None:
    raise UserError(f"{workdir} is an ensemble ({path}): its members' checkpoints and configs were fixed "
                    "when it was made; drop --checkpoint/--config, or make another with --mode=ensemble.")
  try:
    record = json.loads(path.read_text())
    base = workdir.resolve()  # paths are relative to the ensemble's workdir (absolute ones still load)
    members = [(_under(base, m["workdir"]), _under(base, m["checkpoint"]), float(m["scale"]),
                str(m["selected_by"])) for m in record["members"]]
    fingerprint_of = [f"{m['checkpoint']}{float(m['scale'])!r}" for m in record["members"]]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise UserError(f"{path}: not a readable ensemble record ({type(error).__name__}: {error}); make it "
                    "again with --mode=ensemble.") from error
  member_models = []
  for member_workdir, member_checkpoint, _, selected_by in members:
    if not member_checkpoint.is_dir():
      raise UserError(f"{path}: member checkpoint {member_checkpoint} is gone; make the ensemble again "
                      "with --mode=ensemble.")
    model = load_trained_model(member_workdir, checkpoint=member_checkpoint)
    member_models.append(dataclasses.replace(model, selected_by=selected_by))  # why it was chosen, when made
  first = member_models[0]
  scales = [scale for _, _, scale, _ in members]
  fingerprint = hashlib.sha256("".join(m.config_hash + f for m, f in zip(member_models, fingerprint_of))
                               .encode()).hexdigest()[:16]
  return TrainedModel(
      config=first.config, workdir=workdir, checkpoint_dir=path, step=first.step,
      selected_by=f"ensemble of {len(member_models)} members", image_shape=first.image_shape, graphdef=None,
      variables=tuple(m.variables for m in member_models),
      embed_fn=combined_embed_fn([m.embed_fn for m in member_models], scales), scorer=scoring.DISTANCE,
      config_hash=fingerprint, members=tuple(member_models))


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
                    invert: bool, resize: str = "stretch") -> tuple[np.ndarray, str | None]:
  """(uint8 [H, W, C] in the model's shape, a note if it had to be resized or colour converted)."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"image {path}: not found.")
  data = path.read_bytes()
  image = sources.decode_image(data, image_shape, invert=invert, name=str(path), resize=resize)
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
  return sorted(p for p in folder.iterdir() if p.is_file() and sources.is_image_name(p.name))


def load_gallery(folder: str | os.PathLike, image_shape: tuple[int, int, int], *, invert: bool,
                 resize: str = "stretch"):
  """A gallery folder (one sub-folder per class, or group/class) as an in-memory ImageSource."""
  folder = pathlib.Path(folder).expanduser()
  if folder.is_dir() and _image_files_directly_in(folder) and not any(p.is_dir() for p in folder.iterdir()):
    raise UserError(f"gallery {folder}: holds images but no class folders; a gallery needs one sub-folder "
                    "per class (gallery/<class>/<image>), the folder name being the class.")
  try:
    return sources.image_folder_source(folder, image_shape, invert=invert, resize=resize)
  except UserError as error:
    raise UserError(f"gallery: {error}") from error


def load_queries(path: str | os.PathLike, image_shape: tuple[int, int, int], *,
                 invert: bool, resize: str = "stretch") -> LabelledImages:
  """Query images: one file, a folder of files (classes unknown), or class sub-folders (classes known)."""
  path = pathlib.Path(path).expanduser()
  if path.is_file():
    image, _ = load_image_file(path, image_shape, invert=invert, resize=resize)
    return LabelledImages(image[None], [path.name], None)
  if not path.is_dir():
    raise UserError(f"queries {path}: not found; expected an image file or a folder of images.")
  files = _image_files_directly_in(path)
  if files:
    images = np.stack([load_image_file(f, image_shape, invert=invert, resize=resize)[0] for f in files])
    return LabelledImages(images, [f.name for f in files], None)
  try:
    source = sources.image_folder_source(path, image_shape, invert=invert, resize=resize)
  except UserError as error:
    raise UserError(f"queries: {error}") from error
  return LabelledImages(np.asarray(source.images), list(source.file_ids),
                        [source.class_names[label] for label in source.labels])
