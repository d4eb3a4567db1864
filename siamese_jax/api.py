"""The Python API, what `import siamese_jax` offers (docs/python.md shows each in use).

  import siamese_jax
  config = siamese_jax.get_config("omniglot:smoke")           # a shipped config, by name
  model = siamese_jax.train(config, "runs/smoke")             # trains (resumes), evaluates, calibrates
  model = siamese_jax.load("runs/smoke")                      # a workdir, an ensemble or a served model file
  embeddings = model.embed(["a.png", pil_image, array])       # any size, dtype, PIL image or path
  result = model.compare("a.png", "b.png")                    # distance, probability, same or not

`launch.py` calls the same functions, so a run started from Python and one started from the command line
are the same run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import pkgutil

import ml_collections

from siamese_jax import configs as shipped_configs
from siamese_jax import training
from siamese_jax.errors import UserError
from siamese_jax.modes import ensemble
from siamese_jax.trained import TrainedModel, load_trained_model


def config_names() -> list[str]:
  """The shipped configs by name: "omniglot", "folder_pretrained", ..., "ablations/omniglot_triplet"."""
  prefix = f"{shipped_configs.__name__}."
  return sorted(module.name[len(prefix):].replace(".", "/")
                for module in pkgutil.walk_packages(shipped_configs.__path__, prefix) if not module.ispkg)


def get_config(name: str) -> ml_collections.ConfigDict:
  """A config by name, with its variant after a colon ("omniglot:smoke", "ablations/omniglot_pretrained:
  finetune"), or by the path of a config file ("my_config.py:variant"), as `--config` takes it."""
  base, _, variant = str(name).partition(":")
  if base.endswith(".py"):
    path = pathlib.Path(base).expanduser()
    if not path.is_file():
      raise UserError(f"config {name!r}: no config file {str(path)!r}.")
    spec = importlib.util.spec_from_file_location(f"_siamese_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    if base not in config_names():
      raise UserError(f"config {name!r}: no shipped config {base!r}; the shipped configs are "
                      f"{', '.join(config_names())}.")
    module = importlib.import_module(f"{shipped_configs.__name__}.{base.replace('/', '.')}")
  try:
    return module.get_config(variant) if variant else module.get_config()
  except ValueError as error:  # an unknown variant: the config's own message names the known ones
    raise UserError(f"config {name!r}: {error}") from error


def run_training(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains `config` into `workdir` (resuming what is there), evaluates on the test classes and calibrates the
  same/different thresholds on the validation classes (`<workdir>/eval/threshold.json`, what compare,
  gallery and openset decide with); an ensemble config trains its members, then combines them. Returns the
  results; `{"preempted": True, ...}` when a signal stopped it (run it again to resume)."""
  if ensemble.is_ensemble_config(config):
    return ensemble.train_ensemble(config, workdir)
  return training.train_and_evaluate(config, workdir)


def train(config: ml_collections.ConfigDict | str, workdir: str | os.PathLike) -> TrainedModel:
  """Trains a config (a ConfigDict or a name for `get_config`) into `workdir` (`run_training`) and returns the
  trained model: the best checkpoint by validation accuracy, with its calibrated threshold."""
  if isinstance(config, str):
    config = get_config(config)
  results = run_training(config, workdir)
  if results.get("preempted"):
    raise UserError(f"training into {workdir} was stopped by a signal at step {results.get('step')}; call "
                    "train() again with the same workdir to resume.")
  return load_trained_model(workdir)
