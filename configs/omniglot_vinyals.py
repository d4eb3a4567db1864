r"""Omniglot on Vinyals et al.'s split: 1,028 + 172 characters x 4 rotations to train and validate on, 423 x 4
to test, 28x28, unstructured episodes (the protocol of matching and prototypical networks).

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_vinyals.py --workdir=runs/vinyals
Expected [results/render.py]: 48 min of training on 2 CPU cores; figures in docs/results.md.
The hour's shifts (+-3 px in training and at test time) without its alphabet batches: the test is not within one
alphabet. Lake's runs are not scored: this split trains on characters of the alphabets they are drawn from.
Three such networks as one model: configs/omniglot_vinyals_ensemble.py. `:smoke` runs in seconds.
"""

from siamese_jax.configs import omniglot


def get_config(arg: str | None = None):
  config = omniglot.get_config("smoke" if arg == "smoke" else None)
  config.parallel.num_devices = 1  # its figures ran on one CPU device: pinned so that they reproduce
  config.data.omniglot_split = "vinyals"  # train.txt / val.txt / test.txt under splits/vinyals/
  config.augment.translate_px = 3.0
  config.eval.tta_shift_px = 3
  config.eval.validation_within_group = False
  config.eval.lake_runs = False
  if arg == "smoke":
    return config
  if arg:
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  config.train.num_steps = 12000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
