r"""Ablation: the fast default (configs/omniglot.py) with configs/omniglot_hour.py's semi-hard triplet loss.

  python launch.py --config=configs/ablations/omniglot_triplet.py --workdir=runs/triplet
Expected [results/render.py]: 16.2 min of training on 2 CPU cores; figures in docs/results.md.
`:cpu_hour` is the same loss on the hour's recipe: configs/omniglot_hour.py itself. `:smoke` runs in seconds.
"""

from siamese_jax.configs import omniglot, omniglot_hour


def get_config(arg: str | None = None):
  """`arg`: None (the fast default's recipe), `cpu_hour` (configs/omniglot_hour.py) or `smoke`."""
  if arg not in (None, "", "cpu_hour", "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: cpu_hour, smoke)")
  if arg == "cpu_hour":
    return omniglot_hour.get_config()
  config = omniglot_hour.with_triplet_loss(omniglot.get_config(arg or None))
  config.parallel.num_devices = 1  # its figures ran on one CPU device: pinned so that they reproduce
  return config
