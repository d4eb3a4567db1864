r"""Omniglot, the best single network in an hour of CPU: the fast default with alphabet batches, +-3 px shifts
in training and at test time, 15,000 steps, and a semi-hard triplet loss on 128-d L2-normalised embeddings.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_hour.py --workdir=runs/hour
Expected [results/render.py]: 60 min of training on 2 CPU cores (step 13,388 of 15,000); figures in docs/results.md.
`train.time_limit_minutes` stops (and checkpoints) a slower machine at 60 minutes, before the schedule ends;
resume with `--config.train.time_limit_minutes=0` to finish it. `:smoke` runs in seconds.
"""

from siamese_jax.configs import omniglot


def cpu_hour_recipe(arg: str | None = None):
  """The fast default plus what validation chose for an hour of CPU (docs/ablations.md), with its
  prototype loss: configs/ablations/omniglot_cpu_hour.py. `arg`: None or `smoke`."""
  config = omniglot.get_config("smoke" if arg == "smoke" else None)
  config.parallel.num_devices = 1  # its figures ran on one CPU device: pinned so that they reproduce
  config.sampling.classes_per_group = 16  # the in-batch negatives of Lake's within-alphabet test
  config.augment.translate_px = 3.0
  config.eval.tta_shift_px = 3
  if arg == "smoke":
    config.sampling.classes_per_group = 5
    return config
  config.train.num_steps = 15000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.time_limit_minutes = 60.0  # the hour's budget: stop (and checkpoint) there on a slower machine
  return config


def with_triplet_loss(config):
  """FaceNet's semi-hard triplet loss on 128-d L2-normalised embeddings, in place of the prototype loss.

  Semi-hard, not batch-hard: from initialisation, batch-hard mining collapses every embedding onto one point
  on these batches (Schroff et al. 2015 warn of the hardest negatives early in training).
  """
  config.loss.name = "triplet"
  config.loss.margin = 0.2  # in squared Euclidean units of L2-normalised embeddings (range 0..4)
  config.loss.distance = "squared_euclidean"  # euclidean | squared_euclidean | cosine
  config.loss.mining = "semi_hard"  # none (needs sampling.kind=triplets) | batch_all | batch_hard | semi_hard
  config.model.embedding_dim = 128
  config.model.l2_normalize = True
  return config


def get_config(arg: str | None = None):
  """`arg`: None or `smoke`."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  return with_triplet_loss(cpu_hour_recipe(arg or None))
