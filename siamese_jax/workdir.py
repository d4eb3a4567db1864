"""What a workdir holds, by name: every file and folder that training and the modes read or write.

  <workdir>/config.json          the resolved config of the training run (`read_config`)
  <workdir>/checkpoints/<step>/  Orbax steps (siamese_jax/checkpoint.py)
  <workdir>/metrics.jsonl        training's log, one JSON record a line (siamese_jax/writers.py)
  <workdir>/tensorboard/         the same log for TensorBoard
  <workdir>/results.json         training's final report
  <workdir>/ensemble.json        instead of checkpoints, for an ensemble of trained workdirs
  <workdir>/members/<name>/      an ensemble config's members, each a training workdir
  <workdir>/eval/results.json    what --mode=eval reports
  <workdir>/eval/threshold.json  the calibrated same/different threshold (`threshold_path`)
  <workdir>/eval/plots/          --mode=plots' PNGs
  <workdir>/eval/index/          --mode=index's gallery index (siamese_jax/index.py)
  <workdir>/eval/search.csv      --mode=search's k nearest index items of each query
  <workdir>/eval/model.zip       --mode=export_model's served model (siamese_jax/serving.py)
  <workdir>/eval/projector/      --mode=projector's embeddings, labels and sprite for TensorBoard
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import ml_collections
import numpy as np

from siamese_jax.errors import UserError

CONFIG_FILENAME = "config.json"
CHECKPOINTS_DIRNAME = "checkpoints"
METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
RESULTS_FILENAME = "results.json"
ENSEMBLE_FILENAME = "ensemble.json"
MEMBERS_DIRNAME = "members"
EVAL_DIRNAME = "eval"
THRESHOLD_FILENAME = "threshold.json"
PLOTS_DIRNAME = "plots"
INDEX_DIRNAME = "index"
SEARCH_FILENAME = "search.csv"
SERVED_MODEL_FILENAME = "model.zip"
PROJECTOR_DIRNAME = "projector"


def threshold_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / EVAL_DIRNAME / THRESHOLD_FILENAME


def write_json(path: str | os.PathLike, payload: dict) -> None:
  """Writes `payload` as indented JSON (numpy scalars as numbers), via a temporary file and a rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
  temporary.replace(path)


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote (`<workdir>/config.json`, or that file) as a ConfigDict."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / CONFIG_FILENAME
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
