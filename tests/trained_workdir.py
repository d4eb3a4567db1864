"""A tiny trained workdir shared by the evaluation, export and plot tests (trained once per session).

`configs/omniglot.py:smoke` on synthetic data (no files): 100 fake classes in 4 groups, 20 images each,
28x28; the seeded class split leaves 20 test and 10 validation classes. 12 steps, checkpoints at 6 and
12, both validated. Not a test module (no `test_` prefix): test modules import `trained_workdir`.
"""

import pathlib
import shutil

from siamese_jax.configs import omniglot as omniglot_config
from siamese_jax import training

SYNTHETIC_CLASSES = 100
TEST_CLASSES = 20


def smoke_config():
  config = omniglot_config.get_config("smoke")
  config.data.source = "synthetic"
  config.data.synthetic_classes = SYNTHETIC_CLASSES
  config.eval.test_ways = (5,)
  config.eval.test_shots = (1,)
  config.eval.test_episodes = 50
  return config


def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """Trains the smoke run once per session (under pytest's session temp dir) and returns its workdir.

  Callers that write into the workdir must copy it first (`copy_of`), so tests stay independent.
  """
  workdir = tmp_path_factory.getbasetemp() / "trained_synthetic_smoke"
  if not (workdir / "results.json").exists():
    shutil.rmtree(workdir, ignore_errors=True)
    training.train_and_evaluate(smoke_config(), workdir)
  return workdir


def copy_of(workdir: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
  shutil.copytree(workdir, destination)
  return destination
