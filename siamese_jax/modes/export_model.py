"""The export_model mode: a trained model (or ensemble) as one servable file, run with only jax and numpy.

  python launch.py --mode=export_model --workdir=runs/omniglot      # -> runs/omniglot/eval/model.zip
  served = siamese_jax.serving.load_artifact("runs/omniglot/eval/model.zip")

The model's `embed_fn`, its trained weights closed over as constants, is lowered with `jax.export` for
uint8 images [b, H, W, C] with a symbolic batch b, for CPU and CUDA, and written with its input spec and
the calibrated distance threshold (`siamese_jax/serving.py` documents the file). The artifact embeds
images exactly as the eval mode does: same function, same weights, test-time augmentation included.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from siamese_jax import models, serving
from siamese_jax.data import pipeline
from siamese_jax.errors import UserError
from siamese_jax.trained import TrainedModel, calibrate, load_threshold, load_trained_model
from siamese_jax.workdir import EVAL_DIRNAME, SERVED_MODEL_FILENAME, threshold_path

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")
CHECK_IMAGES = 4  # random images embedded by the model and by the written artifact, as a check


def normalisation(model: TrainedModel) -> dict:
  """What the exported function does to the uint8 pixels it takes, for the spec (informational)."""
  if model.members:
    return {"members": [normalisation(member) for member in model.members],
            "combined": "each member's embedding times its scale (ensemble.json), side by side"}
  config = model.config.model
  preprocessing = None
  if config.name in models.BACKBONES:
    usual = models.BACKBONES[config.name][1]
    preprocessing = usual.get(config.weights_layout) if config.preprocessing == "auto" else config.preprocessing
  return {"scale": "x / 255: uint8 0..255 -> float32 0..1", "backbone_preprocessing": preprocessing,
          "tta_shift_px": int(model.config.eval.get("tta_shift_px", 0)),
          "l2_normalize": bool(config.get("l2_normalize", False))}


def model_spec(model: TrainedModel, embedding_dim: int) -> dict:
  """The spec fields that describe the model and its input (serving.py's docstring lists them all)."""
  height, width, channels = model.image_shape
  spec = {
      "input": {"shape": [None, height, width, channels], "dtype": "uint8", "layout": "NHWC",
                "channels": channels, "range": [0, 255]},
      "output": {"shape": [None, embedding_dim], "dtype": "float32", "embedding_dim": embedding_dim},
      "distance": "euclidean",
      "preprocessing": {"invert": model.invert, "resize": model.resize, "color": "L" if channels == 1 else "RGB"},
      "normalisation": normalisation(model),
      "model": "ensemble" if model.members else str(model.config.model.name),
      "step": model.step, "config_hash": model.config_hash,
      "exported_from": {"workdir": str(model.workdir), "checkpoint": str(model.checkpoint_dir),
                        "selected_by": model.selected_by},
  }
  if model.members:
    spec["members"] = [{"model": str(m.config.model.name), "step": m.step, "config_hash": m.config_hash}
                       for m in model.members]
  return spec


def export_embed_fn(model: TrainedModel, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> export.Exported:
  """`model.embed_fn` with its weights as constants, for uint8 [b, H, W, C] with a symbolic batch b."""
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise UserError(f"platforms={list(platforms)}: expected some of {PLATFORMS}.")
  batch, = export.symbolic_shape("b")
  embed = jax.jit(lambda images: model.embed_fn(model.variables, images))
  try:
    return export.export(embed, platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((batch, *model.image_shape), jnp.uint8))
  except (ValueError, NotImplementedError) as error:
    raise UserError(f"the model does not lower for platforms {list(platforms)} ({type(error).__name__}: "
                    f"{error}); try --platforms=cpu.") from error


def served_threshold(workdir: str | os.PathLike, model: TrainedModel, *, batch_size: int | None = None,
                     progress: bool = False) -> tuple[dict | None, str | None]:
  """(the distance threshold record for the artifact or None, a note on where it came from or why not).

  The artifact gives embeddings only, so its threshold is in distance units: `<workdir>/eval/threshold.json`
  when calibrated by distance; for a pair-head model, whose threshold is the head's probability, a distance
  threshold calibrated here on the run's validation classes (when its data are at hand).
  """
  record = load_threshold(workdir, model)
  path = threshold_path(workdir)
  if record is None:
    return None, f"no calibrated threshold ({path}): run --mode=calibrate, then export again"
  if record["scoring"] == "distance":
    return record, record.get("warning")
  try:
    splits = pipeline.load_splits(model.config.data, seed=model.config.seed)
  except UserError as error:
    return None, (f"{path} holds the pair head's threshold, which the artifact (embeddings only) cannot use, "
                  f"and the run's data are not at hand to calibrate a distance threshold ({error})")
  method = record.get("method", "max_accuracy")
  record = calibrate(model, splits, scoring="distance", method=method if method != "given" else "max_accuracy",
                     target_far=record.get("target_far") or 0.001, batch_size=batch_size, progress=progress)
  return record, (f"{path} holds the pair head's threshold; the artifact's is a distance threshold calibrated "
                  f"now on {record['pairs']} {record['calibrated_on']} pairs")


def export_served_model(model: TrainedModel, path: str | os.PathLike, *, threshold: dict | None = None,
                        threshold_note: str | None = None,
                        platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
  """Writes `model` as a served model at `path` and checks, where it can run here, that it embeds as `model`."""
  exported = export_embed_fn(model, platforms)
  spec = model_spec(model, int(exported.out_avals[0].shape[1]))
  spec["threshold"] = threshold
  if threshold_note:
    spec["threshold_note"] = threshold_note
  path = serving.write_artifact(path, exported, spec)
  result = {"written": str(path), "bytes": path.stat().st_size, "platforms": list(exported.platforms),
            "input": f"uint8 [b, {', '.join(map(str, model.image_shape))}]",
            "embedding_dim": spec["output"]["embedding_dim"], "step": model.step,
            "threshold": None if threshold is None else threshold["threshold"],
            "gallery_threshold": None if threshold is None else threshold.get("gallery_threshold")}
  if threshold_note:
    result["threshold_note"] = threshold_note
  here = export.default_export_platform()
  if here in exported.platforms:
    images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, *model.image_shape), dtype=np.uint8)
    difference = np.abs(serving.load_artifact(path).embed(images) - model.embed(images)).max()
    result["check_max_abs_difference"] = float(difference)
  else:
    result["check"] = f"not run: this machine runs on {here}"
  return result


def export_model_workdir(workdir: str | os.PathLike, *, output: str | os.PathLike | None = None,
                         checkpoint: str = "best", config=None, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                         batch_size: int | None = None, progress: bool = True) -> dict:
  """Exports a trained workdir's model (or ensemble) to `output` (default `<workdir>/eval/model.zip`)."""
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  threshold, note = served_threshold(workdir, model, batch_size=batch_size, progress=progress)
  output = pathlib.Path(output) if output else pathlib.Path(workdir) / EVAL_DIRNAME / SERVED_MODEL_FILENAME
  return export_served_model(model, output, threshold=threshold, threshold_note=note, platforms=platforms)
