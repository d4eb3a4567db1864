r"""Omniglot, the best result: four triplet networks of configs/omniglot_best_single.py's recipe, as one model.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best_ensemble.py --workdir=runs/best
Trains each member into runs/best/members/<name> (run again: resumes the unfinished one), then combines their
best checkpoints into runs/best/ensemble.json; every mode on a trained workdir works on runs/best.
Expected [results/render.py]: 214 min (53 + 57 + 31 + 73) of training on 2 CPU cores; figures in docs/results.md.
One member alone: `--config=configs/omniglot_best_ensemble.py:<name>`, a name of MEMBERS. `:smoke`: two tiny members.
"""

from siamese_jax.configs import omniglot_best_single
from siamese_jax.modes import ensemble

# Members in the order they are combined (a ConfigDict lists its keys sorted, so the names sort in this order;
# the first member's config is the ensemble's: its splits and seed).
MEMBERS = {
    "seed0": dict(seed=0, num_steps=12000, rotations=False),
    "seed1": dict(seed=1, num_steps=12000, rotations=False),
    "seed2_rotations_6k": dict(seed=2, num_steps=6000, rotations=True),
    "seed4_rotations": dict(seed=4, num_steps=12000, rotations=True),
}
SMOKE_MEMBERS = ("seed0", "seed1")


def member(name: str, smoke: bool = False):
  return omniglot_best_single.recipe(**MEMBERS[name], smoke=smoke)


def get_config(arg: str | None = None):
  """`arg`: None (the ensemble), a name of MEMBERS (that network alone) or `smoke`."""
  return ensemble.ensemble_config(arg, member, tuple(MEMBERS), SMOKE_MEMBERS)
