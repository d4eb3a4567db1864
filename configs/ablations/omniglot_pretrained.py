r"""Ablation: ImageNet-pretrained EfficientNet-Lite0 against the fast default, in its training minutes.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/ablations/omniglot_pretrained.py:frozen --workdir=runs/lite0_frozen
Expected [results/render.py]: :finetune 11.9 min, :frozen 18.3 min of training on 2 CPU cores; figures in docs/results.md.
Same data, loss and training minutes as configs/omniglot.py; `:frozen` trains only a projection on the frozen
backbone, `:finetune` then all weights too (backbone at a tenth of the lr). `:smoke` runs in seconds.
"""

from siamese_jax.configs import folder_pretrained, omniglot
from siamese_jax import models


def get_config(arg: str | None = None):
  """`arg`: `frozen` (the default), `finetune` or `smoke`."""
  arg = arg or "frozen"
  if arg not in ("frozen", "finetune", "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: frozen, finetune, smoke)")
  config = omniglot.get_config("smoke" if arg == "smoke" else None)
  config.parallel.num_devices = 1  # its figures ran on one CPU device: pinned so that they reproduce
  config.model = models.default_config("efficientnet_lite0")
  config.model.pretrained = folder_pretrained.lite0_weights()
  config.model.embedding_dim = 128
  config.model.l2_normalize = False  # the prototype loss's logits are squared distances: no unit sphere
  # Both freeze the whole backbone, so its BatchNorms keep ImageNet's statistics (inference mode);
  # `finetune` then trains its weights too, after 50 steps of the projection alone.
  config.model.freeze_until = "all"
  config.optim.backbone_learning_rate = config.optim.learning_rate / 10
  config.optim.unfreeze_after_steps = 50 if arg == "finetune" else 0
  config.sampling.batch_size = 120  # 24 classes x 5: more steps in the same minutes than the default's 240
  config.eval.batch_size = 512
  config.train.time_limit_minutes = 19.4  # the main job's training minutes (one device) when this ran
  config.train.num_steps = {"frozen": 2000, "finetune": 290, "smoke": 12}[arg]  # about what fits in it
  config.train.eval_every = {"frozen": 200, "finetune": 50, "smoke": 6}[arg]
  config.train.checkpoint_every = config.train.eval_every
  if arg == "smoke":
    config.sampling.batch_size = 40
    config.train.time_limit_minutes = 0.0
  return config
