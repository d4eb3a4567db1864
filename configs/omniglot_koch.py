r"""Koch et al. 2015 on Omniglot: 105x105 pairs, weighted-L1 + BCE, SGD with momentum, 1 % lr decay per epoch.

The paper's setting, meant for a GPU/TPU (speed on a CPU: benchmarks/README.md).
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_koch.py --workdir=runs/koch
Expected [results/render.py]: not measured; measured configs: docs/results.md.
`:smoke` runs a few steps at 105x105 on a CPU.
"""

from siamese_jax.configs import omniglot
from siamese_jax import models


def get_config(arg: str | None = None):
  config = omniglot.get_config("smoke" if arg == "smoke" else None)
  config.data.image_size = 105
  config.data.validation = "alphabets"  # Koch et al. held out 10 alphabets and drawers; we hold out alphabets
  config.data.num_validation_alphabets = 5
  config.sampling.kind = "pairs"
  config.sampling.batch_size = 128
  # On CPU its large convolutions keep both cores busy on one device: 2 devices measured 1.04x one device and 8
  # (the default split) 0.90x, in turns on the 2-core AMD EPYC (docs/ablations.md, "Every core").
  config.parallel.num_devices = 2
  config.sampling.same_group_negative_probability = 0.5  # pairs balanced within alphabets, like the paper
  config.augment.translate_px = 2.0
  config.model = models.default_config("koch")  # 4096-d sigmoid features, weighted-L1 head
  config.loss.name = "koch_bce"
  config.optim.name = "sgd"
  config.optim.learning_rate = 0.01
  config.optim.momentum = 0.5  # the paper raises momentum per layer to 0.9; one value here
  config.optim.schedule = "exponential"
  config.optim.decay_per_epoch = 0.99  # 1 % per epoch
  config.optim.weight_decay = 2e-4  # L2 regularisation
  config.optim.warmup_steps = 0
  config.train.num_steps = 60000
  config.train.steps_per_epoch = 1000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.early_stopping_patience = 20  # validations (the paper: 20 epochs)
  config.eval.batch_size = 256
  if arg == "smoke":
    config.sampling.batch_size = 8
    config.train.num_steps = 4
    config.train.eval_every = 4
    config.train.checkpoint_every = 2
    config.train.log_every = 2
    config.eval.batch_size = 128
  elif arg:
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  return config

