r"""Ablation: configs/omniglot_hour.py's recipe with the fast default's prototype loss in place of the triplet loss.

  python launch.py --config=configs/ablations/omniglot_cpu_hour.py --workdir=runs/cpu_hour
Expected [results/render.py]: 60 min of training on 2 CPU cores (step 14,351 of 15,000); figures in docs/results.md.
Alphabet batches (16 classes from each of 3 alphabets), +-3 px shifts in training and at test time, 15,000 steps,
stopped (and checkpointed) at 60 minutes of training. `:smoke` runs in seconds.
"""

from siamese_jax.configs import omniglot_hour


def get_config(arg: str | None = None):
  """`arg`: None or `smoke`."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  return omniglot_hour.cpu_hour_recipe(arg or None)
