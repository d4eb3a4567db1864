r"""Omniglot, the best single network: the hour's triplet recipe with 120-way batches (6 alphabets x 20 classes
x 2 images), every train character also turned by 90/180/270 degrees as classes of its own, 12,000 steps.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best_single.py --workdir=runs/single
  python launch.py --mode=eval --workdir=runs/single --seed=0   # the run's seed is 3; docs/results.md uses 0
Expected [results/render.py]: 60 min of training on 2 CPU cores; figures in docs/results.md.
No time limit: a slower machine still finishes the schedule. `:smoke` runs in seconds.
"""

from siamese_jax.configs import omniglot_hour


def recipe(*, seed: int, num_steps: int, rotations: bool, smoke: bool = False):
  """configs/omniglot_hour.py with 120-way batches and no time limit; also the members of
  configs/omniglot_best_ensemble.py. `rotations`: train characters turned 90/180/270 degrees are extra classes.
  A seed other than 0 keeps seed 0's validation classes and episodes (data.split_seed=0), so runs compare.
  `smoke`: the hour's smoke run with 2-image classes (a few steps, for tests)."""
  config = omniglot_hour.get_config("smoke" if smoke else None)
  config.sampling.m_per_class = 2  # 240 images: 120 classes, 20 from each of 6 alphabets
  if not smoke:
    config.sampling.classes_per_group = 20
    config.train.time_limit_minutes = 0.0
    config.train.num_steps = num_steps
  if seed != 0:
    config.seed = seed
    config.data.split_seed = 0  # seed 0's validation classes and episodes
  if rotations:
    config.data.train_class_rotations = (90, 180, 270)
  return config


def get_config(arg: str | None = None):
  """`arg`: None or `smoke`."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  return recipe(seed=3, num_steps=12000, rotations=True, smoke=arg == "smoke")
