r"""Omniglot on Vinyals et al.'s split, the best result: three variants of configs/omniglot_vinyals.py as one model.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_vinyals_ensemble.py --workdir=runs/ve
Trains each member into runs/ve/members/<name> (run again: resumes the unfinished one), then combines their
best checkpoints into runs/ve/ensemble.json; every mode on a trained workdir works on runs/ve.
Expected [results/render.py]: 257 min (86 + 113 + 58) of training on 2 CPU cores; figures in docs/results.md.
One member alone: `--config=configs/omniglot_vinyals_ensemble.py:<name>`, a name of MEMBERS. `:smoke`: two tiny members.
"""

from siamese_jax.configs import omniglot_vinyals
from siamese_jax.modes import ensemble

# Members in the order they are combined (a ConfigDict lists its keys sorted, so the names sort in this order;
# the first member's config is the ensemble's), each omniglot_vinyals.py with these fields changed.
MEMBERS = {
    "run1_width96": {"model.width": 96},
    "run2_steps24k": {"train.num_steps": 24000},
    "run3_batches60x4": {"sampling.m_per_class": 4},  # 60 classes x 4 images
}
SMOKE_MEMBERS = ("run1_width96", "run2_steps24k")


def member(name: str, smoke: bool = False):
  """omniglot_vinyals.py (its smoke run when `smoke`) with member `name`'s fields; a smoke member keeps the
  smoke run's number of steps."""
  config = omniglot_vinyals.get_config("smoke" if smoke else None)
  for field, value in MEMBERS[name].items():
    if smoke and field == "train.num_steps":
      continue
    group, key = field.split(".")
    config[group][key] = value
  return config


def get_config(arg: str | None = None):
  """`arg`: None (the ensemble), a name of MEMBERS (that network alone) or `smoke`."""
  return ensemble.ensemble_config(arg, member, tuple(MEMBERS), SMOKE_MEMBERS)
