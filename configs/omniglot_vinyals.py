r"""Omniglot on Vinyals et al.'s split: 1,028 + 172 characters x 4 rotations to train and validate on,
423 x 4 to test, 28x28, unstructured episodes (the protocol of matching and prototypical networks).

Command:
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_vinyals.py --workdir=runs/vinyals
Expected: see the README's results table (measured there, with training time and hardware).
Validation is 20-way 1-shot across the val.txt classes (unstructured, like the test); Lake's runs are
not scored, because this split trains on characters of the evaluation alphabets they are drawn from.
"""

from configs import omniglot


def get_config(arg: str | None = None):
  config = omniglot.get_config("smoke" if arg == "smoke" else None)
  config.data.omniglot_split = "vinyals"  # train.txt / val.txt / test.txt under splits/vinyals/
  config.eval.validation_within_group = False
  config.eval.lake_runs = False
  if arg not in (None, "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  return config
