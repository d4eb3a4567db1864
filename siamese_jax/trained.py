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

from siamese_jax import models, serving
from siamese_jax.checkpoint import restore_variables, select_checkpoint
from siamese_jax.data import pipeline, sources
from siamese_jax.errors import UserError
from siamese_jax.metrics import embedding, scoring, verification
from siamese_jax.metrics.open_set import OPEN_SET_CALIBRATION_SPLITS, calibrate_gallery_threshold
from siamese_jax.workdir import CONFIG_FILENAME, ENSEMBLE_FILENAME, config_hash, read_config, threshold_path

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
  threshold: dict | None = None  # the calibrated threshold record (<workdir>/eval/threshold.json), if any

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

  def embed(self, images, *, invert: str | bool = "auto", batch_size: int | None = None,
            progress: bool = False) -> np.ndarray:
    """float32 [N, D] embeddings of images: arrays of any size and dtype, PIL images, file paths, a list
    mixing them (`prepare_images`), or an ImageSource of the model's image shape (read batch by batch).

    `invert` applies to files and PIL images: "auto" reads them as training read its files (Omniglot:
    dark ink -> bright), "yes"/"no" (or a bool) decide. Arrays are the model's pixels, never inverted.
    """
    batch_size = batch_size or int(self.config.eval.batch_size)
    if isinstance(images, sources.ImageSource):
      if tuple(images.image_shape) != self.image_shape:
        raise UserError(f"images of shape {tuple(images.image_shape)}; this model takes {self.image_shape} "
                        f"(data.image_size={self.image_shape[:2]}, data.channels={self.image_shape[2]}): load "
                        "the source with that image_shape.")
    else:
      images = prepare_images(images, self.image_shape, invert=resolve_invert(invert, self), resize=self.resize)
    return embedding.embed_images(self.embed_fn, self.variables, images, batch_size, progress)

  def compare(self, image1, image2, *, invert: str | bool = "auto", threshold: float | None = None) -> Comparison:
    """Two images (each anything `embed` takes, one image) compared: their embedding distance, the pair
    head's probability for a model with one, and same/different at `threshold` (in the units of the
    model's scoring: a distance, or a probability for a pair-head model) or else at the calibrated one."""
    images, notes = image_pair(self, image1, image2, invert)
    embeddings = embedding.embed_images(self.embed_fn, self.variables, images, 2, False)
    probability = (float(self.scorer.pair_similarities(embeddings[:1], embeddings[1:])[0])
                   if self.has_pair_head else None)
    record = given_threshold(threshold, self.scorer.name) if threshold is not None else self.threshold
    return decide(embeddings[0], embeddings[1], probability, record, notes)

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
  model = TrainedModel(
      config=config, workdir=workdir_path, checkpoint_dir=step_dir, step=step, selected_by=selected_by,
      image_shape=image_shape, graphdef=graphdef, variables=variables,
      embed_fn=models.make_embed_fn(graphdef, int(config.eval.get("tta_shift_px", 0))),
      scorer=scorer, config_hash=config_hash(config))
  run_dir = workdir_path if workdir_path is not None else step_dir.parent.parent  # <run>/checkpoints/<step>
  model.threshold = load_threshold(run_dir, model)
  return model


# --------------------------------------------------------------------------------------------------
# A served model file (--mode=export_model) with the same API


@dataclasses.dataclass
class ExportedModel:
  """A served model file (`serving.load_artifact`) with `TrainedModel`'s embed and compare: images of any
  kind go in, decoded and resized as the spec says; same/different at the threshold exported with it."""

  served: serving.ServedModel
  scorer: scoring.Scorer = scoring.DISTANCE  # the artifact holds the embedding function only
  has_pair_head: bool = False

  @property
  def path(self) -> pathlib.Path:
    return self.served.path

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.served.image_shape)

  @property
  def invert(self) -> bool:
    return self.served.invert

  @property
  def resize(self) -> str:
    return self.served.spec["preprocessing"].get("resize", "stretch")

  @property
  def threshold(self) -> dict | None:
    return self.served.spec.get("threshold")

  @property
  def step(self) -> int:
    return int(self.served.spec.get("step", -1))

  @property
  def config_hash(self) -> str:
    return str(self.served.spec.get("config_hash", ""))

  def embed(self, images, *, invert: str | bool = "auto", batch_size: int | None = None,
            progress: bool = False) -> np.ndarray:
    """float32 [N, D] embeddings of anything `TrainedModel.embed` takes (an ImageSource is read whole)."""
    del progress  # the served function runs in a few calls; nothing to show
    if isinstance(images, sources.ImageSource):
      images = pipeline.all_images(images)
    images = prepare_images(images, self.image_shape, invert=resolve_invert(invert, self), resize=self.resize)
    return self.served.embed(images, batch_size=batch_size or serving.DEFAULT_BATCH_SIZE)

  def compare(self, image1, image2, *, invert: str | bool = "auto", threshold: float | None = None) -> Comparison:
    """As `TrainedModel.compare`, by embedding distance."""
    images, notes = image_pair(self, image1, image2, invert)
    embeddings = self.served.embed(images)
    record = given_threshold(threshold, "distance") if threshold is not None else self.threshold
    return decide(embeddings[0], embeddings[1], None, record, notes)


def load(path: str | os.PathLike, *, checkpoint: str | os.PathLike = "best") -> TrainedModel | ExportedModel:
  """A model from a workdir (`load_trained_model`: its best checkpoint, or `checkpoint`), an ensemble
  workdir, or a served model file written by --mode=export_model (`ExportedModel`)."""
  path = pathlib.Path(path).expanduser()
  if path.is_file():
    if str(checkpoint) != "best":
      raise UserError(f"{path} is a served model file: it holds one checkpoint; drop checkpoint=.")
    return ExportedModel(serving.load_artifact(path))
  return load_trained_model(path, checkpoint=checkpoint)


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
  model = TrainedModel(
      config=first.config, workdir=workdir, checkpoint_dir=path, step=first.step,
      selected_by=f"ensemble of {len(member_models)} members", image_shape=first.image_shape, graphdef=None,
      variables=tuple(m.variables for m in member_models),
      embed_fn=combined_embed_fn([m.embed_fn for m in member_models], scales), scorer=scoring.DISTANCE,
      config_hash=fingerprint, members=tuple(member_models))
  model.threshold = load_threshold(workdir, model)
  return model


# --------------------------------------------------------------------------------------------------
# Same or different: the calibrated threshold and one decision


@dataclasses.dataclass
class Comparison:
  """Two images compared (`TrainedModel.compare`)."""

  distance: float  # Euclidean distance between the embeddings
  probability: float | None  # the pair head's probability that they are the same, for a model with one
  same: bool | None  # the decision at the threshold; None when the model has no calibrated threshold
  threshold: float | None  # in the units of `scoring`
  scoring: str | None  # "distance" or "pair_head": what the threshold applies to
  notes: list[str]  # images resized or converted, a threshold calibrated for another checkpoint


def given_threshold(threshold: float, scoring_name: str) -> dict:
  """A threshold record for a threshold a user gives (a distance, or a pair-head probability)."""
  record = {"scoring": scoring_name, "threshold": threshold}
  return verification.threshold_record(verification.similarity_threshold(record), scoring_name, method="given")


def load_threshold(workdir: str | os.PathLike, model, *, threshold: float | None = None,
                   required: bool = False) -> dict | None:
  """The threshold record to decide same/different with: `threshold` (in the units of the model's scoring)
  if given, else `<workdir>/eval/threshold.json` (training writes it at its end; --mode=calibrate
  rewrites it), else None (or an error when `required`)."""
  scoring_name = model.scorer.name
  if threshold is not None:
    return given_threshold(threshold, scoring_name)
  path = threshold_path(workdir)
  if not path.is_file():
    if required:
      raise UserError(f"{path}: no calibrated threshold. Run `python launch.py --mode=calibrate "
                      f"--workdir={workdir}` (or --mode=eval) first, or pass --threshold.")
    return None
  try:
    record = json.loads(path.read_text())
    verification.similarity_threshold(record)
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise UserError(f"{path}: not a readable threshold record ({type(error).__name__}: {error}); write it "
                    f"again with `python launch.py --mode=calibrate --workdir={workdir}`.") from error
  if record.get("scoring") == "pair_head" and not model.has_pair_head:
    raise UserError(f"{path}: calibrated on pair-head probabilities, but this model has no pair head; "
                    "recalibrate with --mode=calibrate.")
  if record.get("step") not in (None, model.step):
    record["warning"] = (f"calibrated for the checkpoint at step {record.get('step')}, used with step "
                         f"{model.step}; run --mode=calibrate with the same --checkpoint to recalibrate")
  return record


def decide(first: np.ndarray, second: np.ndarray, probability: float | None, record: dict | None,
           notes: list[str]) -> Comparison:
  """The `Comparison` of two embeddings at the threshold `record` (None: no decision)."""
  distance = float(np.linalg.norm(np.asarray(first, np.float64) - np.asarray(second, np.float64)))
  notes = list(notes)
  if record is None:
    notes.append("no calibrated threshold: training writes one at its end (or run --mode=calibrate); "
                 "pass threshold= for a decision")
    return Comparison(distance, probability, None, None, None, notes)
  if record["scoring"] == "pair_head" and probability is None:
    raise UserError("the threshold is a pair-head probability, but this model has no pair head.")
  similarity = -distance if record["scoring"] == "distance" else probability
  if "warning" in record:
    notes.append(record["warning"])
  return Comparison(distance, probability, bool(similarity >= verification.similarity_threshold(record)),
                    float(record["threshold"]), record["scoring"], notes)


def _calibration_split(splits) -> tuple[Any, str]:
  if splits.validation is not None and len(splits.validation):
    return splits.validation, "validation"
  return splits.train, "train"  # no held-out classes: the best that is left (noted in the record)


def calibrate(model: TrainedModel, splits, *, scoring: str = "auto", method: str = "max_accuracy",
              target_far: float = 0.001, num_pairs: int = 10000, seed: int | None = None,
              batch_size: int | None = None, progress: bool = False) -> dict:
  """Calibrates the same/different threshold of `model` on validation pairs.

  Returns the threshold record (`verification.threshold_record`) with the calibration rates and the
  gallery threshold; `seed` defaults to the run's seed. Validation classes are never trained on, like
  the classes the threshold will meet. `scoring`: auto | distance | pair_head (`TrainedModel.scorer_for`).
  """
  scorer = model.scorer_for(scoring)
  seed = model.config.seed if seed is None else seed
  source, split_name = _calibration_split(splits)
  embeddings = model.embed(source, batch_size=batch_size, progress=progress)
  pairs = verification.sample_pairs(source.labels, num_pairs=num_pairs, seed=seed)
  similarities = scorer.indexed_pair_similarities(embeddings, pairs.first, pairs.second)
  threshold = verification.calibrate_threshold(similarities, pairs.same, method, target_far)
  rates = verification.rates_at_threshold(similarities, pairs.same, threshold)
  return verification.threshold_record(
      threshold, scorer.name, method=method, target_far=target_far if method == "far" else None,
      calibrated_on=split_name, pairs=int(len(pairs.same)), seed=seed,
      **{f"calibration_{name}": value for name, value in rates.items()},
      **_open_set_calibration(embeddings, source.labels, scorer, seed),
      step=model.step, checkpoint=str(model.checkpoint_dir), config_hash=model.config_hash)


def _open_set_calibration(embeddings, labels, scorer: scoring.Scorer, seed: int) -> dict:
  """The gallery threshold's fields of the threshold record (`open_set.calibrate_gallery_threshold`)."""
  try:
    threshold, report, num_known = calibrate_gallery_threshold(embeddings, labels, seed=seed, scorer=scorer)
  except UserError as error:
    return {"gallery_threshold_skipped": str(error)}
  return {"gallery_threshold": scoring.similarity_for_people(threshold, scorer.name),
          "gallery_threshold_classes": num_known, "gallery_calibration_splits": OPEN_SET_CALIBRATION_SPLITS,
          **{f"gallery_calibration_{name}": report[name] for name in ("known_accuracy", "unknown_rejection_rate")}}


# --------------------------------------------------------------------------------------------------
# Images from arrays and files


def to_uint8(array: np.ndarray, name: str = "images") -> np.ndarray:
  """uint8 pixels from an array of another dtype, by what its values say; anything ambiguous is refused.

  bool: True = 255. Floats: [0, 1] is scaled by 255; [0, 255] is taken as pixel values. uint16 (16-bit
  PNGs): divided by 257. Other integers must lie in 0..255.
  """
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if array.dtype == np.uint16:
    return (array // 257).astype(np.uint8)
  if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.floating):
      if not np.isfinite([low, high]).all():
        raise UserError(f"{name}: {array.dtype} values that are not finite (NaN or inf); expected pixels.")
      if 0 <= low and high <= 1:
        return np.round(array * 255).astype(np.uint8)
    if 0 <= low and high <= 255:
      return np.round(array).astype(np.uint8)
    raise UserError(f"{name}: {array.dtype} values in [{low:g}, {high:g}]; expected pixels 0..255 (or floats in "
                    "[0, 1]).")
  raise UserError(f"{name}: dtype {array.dtype}; expected image pixels (uint8, or floats in [0, 1]).")


def _as_image_array(array: np.ndarray, name: str, image_shape) -> np.ndarray:
  """[N, H, W, C] from [N, H, W, C], one image [H, W, C] (C in 1, 3, 4) or [H, W], or a gray batch [N, H, W]."""
  shape = array.shape
  if array.ndim == 2:
    array = array[None, :, :, None]
  elif array.ndim == 3:
    array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
  if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape[1:3]:
    raise UserError(f"{name}: shape {shape}; expected [N, H, W, C] with C = 1, 3 or 4, one image [H, W, C] or "
                    f"[H, W] (this model takes {tuple(image_shape)}).")
  return array


def _prepare(images: Any, image_shape: tuple[int, int, int], *, invert: bool, resize: str,
             name: str) -> tuple[np.ndarray, list[str]]:
  """(uint8 [N, H, W, C] in the model's shape, notes on files that were resized or converted)."""
  if isinstance(images, (str, os.PathLike)):
    image, note = load_image_file(images, image_shape, invert=invert, resize=resize)
    return image[None], [note] if note else []
  if isinstance(images, Image.Image):
    return sources.convert_image(images, tuple(image_shape), invert=invert, resize=resize)[None], []
  if isinstance(images, (list, tuple)):
    if not images:
      raise UserError(f"{name}: an empty list; expected images.")
    parts = [_prepare(item, image_shape, invert=invert, resize=resize, name=f"{name}[{i}]")
             for i, item in enumerate(images)]
    return np.concatenate([array for array, _ in parts]), [note for _, notes in parts for note in notes]
  try:
    array = np.asarray(images)
  except ValueError as error:  # e.g. nested sequences of different lengths
    raise UserError(f"{name}: not an image array ({error}); pass a list of images of any sizes.") from error
  if array.dtype == object:
    raise UserError(f"{name}: a {type(images).__name__} numpy cannot read as pixels; expected arrays, PIL images, "
                    "file paths or a list of them.")
  array = _as_image_array(to_uint8(array, name), name, image_shape)
  if array.shape[1:] == tuple(image_shape):
    return array, []
  converted = np.empty((len(array), *image_shape), np.uint8)
  for i, image in enumerate(array):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    converted[i] = sources.convert_image(pil, tuple(image_shape), resize=resize)
  return converted, [f"{name}: {len(array)} images of {array.shape[1:]} resized/converted to the model's "
                     f"{tuple(image_shape)}"]


def image_pair(model, image1, image2, invert: str | bool) -> tuple[np.ndarray, list[str]]:
  """uint8 [2, H, W, C] of two images for `model.compare` (each anything `prepare_images` takes, one image),
  read as the model's files were, and the notes on them."""
  flip = resolve_invert(invert, model)
  first, notes1 = _prepare(image1, model.image_shape, invert=flip, resize=model.resize, name="image1")
  second, notes2 = _prepare(image2, model.image_shape, invert=flip, resize=model.resize, name="image2")
  if len(first) != 1 or len(second) != 1:
    raise UserError(f"compare takes one image each; got {len(first)} and {len(second)}.")
  return np.concatenate([first, second]), notes1 + notes2


def prepare_images(images: Any, image_shape: tuple[int, int, int], *, invert: bool = False,
                   resize: str = "stretch", name: str = "images") -> np.ndarray:
  """uint8 [N, H, W, C] in the model's shape from arrays, PIL images, image file paths or a list of them.

  Arrays: [N, H, W, C], one image [H, W, C] (C in 1, 3, 4) or [H, W], or a gray batch [N, H, W], of any
  size and pixel dtype (`to_uint8`); they hold pixels as the model sees them (an Omniglot model: ink
  bright) and are never inverted. Files and PIL images are decoded as training read its files:
  `invert` flips dark ink to bright. Other sizes are resized by `resize` (data.resize; LANCZOS) and
  colour converted (RGB <-> gray; transparency onto white). A list may mix kinds and sizes.
  """
  array, notes = _prepare(images, image_shape, invert=invert, resize=resize, name=name)
  for note in notes:
    logging.info("%s", note)
  return array


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
