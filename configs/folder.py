r"""Any image-folder dataset (one sub-folder per class, or group/class), classes split by a seeded draw.

  python launch.py --config=configs/folder.py --config.data.path=/path/to/images --workdir=runs/folder
Expected [results/render.py]: depends on your data; measured configs: docs/results.md.
Defaults suit small colour photos (64x64 RGB centre crops, photo augmentation, small ResNet, triplet loss).
`:smoke` runs in seconds on a tiny folder (the tests make one).
"""

from siamese_jax.configs import omniglot
from siamese_jax import models


def get_config(arg: str | None = None):
  config = omniglot.get_config(arg)
  config.data.source = "folder"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.resize = "center_crop"  # photos keep their proportions; the edges go
  config.augment.kind = "photo"  # random resized crop, flip, colour jitter instead of Koch's affine maps
  config.eval.lake_runs = False
  config.model = models.default_config("resnet")
  config.model.widths = (32, 64, 128)
  config.model.blocks_per_stage = 1
  config.loss.name = "triplet"
  config.loss.margin = 0.2
  config.loss.distance = "squared_euclidean"
  config.loss.mining = "semi_hard"
  config.eval.validation_ways = 5
  config.eval.test_ways = (5,)
  if arg == "smoke":
    config.data.image_size = 32
    config.model.widths = (8, 16)
    config.sampling.batch_size = 16
    config.eval.validation_ways = 3
    config.eval.test_ways = (3,)
  return config
