r"""Ablation: three prototype-loss networks of configs/ablations/omniglot_cpu_hour.py's recipe, as one model.

  python launch.py --config=configs/ablations/omniglot_best.py --workdir=runs/ablation_best
Trains each member into runs/ablation_best/members/<name> (run again: resumes the unfinished one), then combines their
best checkpoints into runs/ablation_best/ensemble.json. No time limit: a slower machine still finishes each schedule.
Expected [results/render.py]: 145 min (52 + 59 + 34) of training on 2 CPU cores; figures in docs/results.md.
One member alone: `--config=configs/ablations/omniglot_best.py:<name>`, a name of MEMBERS. `:smoke`: two tiny members.
"""

from siamese_jax.configs.ablations import omniglot_cpu_hour
from siamese_jax.modes import ensemble

# Members in the order they are combined (a ConfigDict lists its keys sorted, so the names sort in this order;
# the first member's config is the ensemble's).
MEMBERS = {
    "batches120": dict(batches120=True, rotations=False, num_steps=12000),  # 6 alphabets x 20 classes x 2 images
    "rotations": dict(batches120=False, rotations=True, num_steps=15000),  # train characters turned 90/180/270
    "rotations_batches120": dict(batches120=True, rotations=True, num_steps=9000),
}
SMOKE_MEMBERS = ("batches120", "rotations")


def member(name: str, smoke: bool = False):
  """The CPU hour's recipe (its smoke run when `smoke`, which keeps its steps and batch grouping) with member
  `name`'s changes and no time limit."""
  changes = MEMBERS[name]
  config = omniglot_cpu_hour.get_config("smoke" if smoke else None)
  if changes["batches120"]:
    config.sampling.m_per_class = 2  # 240 images: 120 classes, 20 from each of 6 alphabets
    if not smoke:
      config.sampling.classes_per_group = 20
  if changes["rotations"]:
    config.data.train_class_rotations = (90, 180, 270)
  if not smoke:
    config.train.num_steps = changes["num_steps"]
    config.train.time_limit_minutes = 0.0
  return config


def get_config(arg: str | None = None):
  """`arg`: None (the ensemble), a name of MEMBERS (that network alone) or `smoke`."""
  return ensemble.ensemble_config(arg, member, tuple(MEMBERS), SMOKE_MEMBERS)
