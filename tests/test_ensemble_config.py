"""An ensemble config trains its members in <workdir>/members/<name>, combines them, and resumes.

Two synthetic smoke members (trained_workdir's config with seeds 0 and 1), so no data files are read.
"""

import json

import ml_collections
import pytest

from siamese_jax import training
from siamese_jax.errors import UserError
from siamese_jax.modes import ensemble
from trained_workdir import smoke_config


def ensemble_config():
  members = {}
  for seed in (0, 1):
    member = smoke_config()
    member.seed = seed
    member.data.split_seed = 0  # the same class split for both: new weights and batches, the same held-out classes
    members[f"seed{seed}"] = member
  return ml_collections.ConfigDict({"members": members, "checkpoint": "best"})


def test_trains_every_member_then_combines_and_resumes(tmp_path, monkeypatch):
  config = ensemble_config()
  trained = []
  real_train = training.train_and_evaluate

  def spy(member_config, member_workdir):
    trained.append(member_workdir.name)
    return real_train(member_config, member_workdir)

  monkeypatch.setattr(training, "train_and_evaluate", spy)
  results = ensemble.train_ensemble(config, tmp_path, progress=False)
  assert trained == ["seed0", "seed1"]
  record = json.loads((tmp_path / "ensemble.json").read_text())
  assert [m["workdir"] for m in record["members"]] == ["members/seed0", "members/seed1"]
  # The ensemble is then evaluated as --mode=eval would be: on the members' checkpoints that ensemble.json
  # fixed, with the report written where eval mode writes it.
  assert [m["step"] for m in results["checkpoint"]["members"]] == [m["step"] for m in record["members"]]
  written = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert written["episodes"] == results["episodes"] and written["checkpoint"] == results["checkpoint"]

  # Run again with the second member unfinished: only it trains (it resumes), then the ensemble is made again.
  (tmp_path / "members" / "seed1" / "results.json").unlink()
  trained.clear()
  ensemble.train_ensemble(config, tmp_path, progress=False)
  assert trained == ["seed1"]
  assert json.loads((tmp_path / "ensemble.json").read_text())["members"] == record["members"]


def test_refuses_one_member_and_a_training_workdir(tmp_path):
  config = ensemble_config()
  del config.members["seed1"]
  with pytest.raises(UserError, match="at least 2 members"):
    ensemble.train_ensemble(config, tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(UserError, match="holds a training run"):
    ensemble.train_ensemble(ensemble_config(), tmp_path)
