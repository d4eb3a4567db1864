"""VGG16 (Simonyan & Zisserman 2015), configuration D: its 13 convolutions as a feature extractor.

Five blocks of 3x3 convolutions (padding 1, with bias, ReLU after each) end in a 2x2 stride-2 max-pool:
2 x 64, 2 x 128, 3 x 256, 3 x 512, 3 x 512 channels. The features are block5's pooled map, 512 channels
at 1/32 size (7x7 at 224). There is no BatchNorm, so freezing a stage only stops the optimizer.

The ImageNet classifier (three dense layers on the flattened 7x7x512 map, 120 M of the 138 M parameters)
is not built: an embedding model pools the features instead, and its fixed 7x7 input would tie the
backbone to 224x224 images. Its tensors (torchvision's classifier.0/3/6, Keras' fc1, fc2, predictions)
are dropped from a full weights file, so both the full and the "notop" files load.

Weights: torchvision's vgg16 names the convolutions by their index in `features` (features.0, .2, .5, ...;
ReLUs and pools take the other indices); Keras applications' VGG16 names them block{b}_conv{c}. Keras'
weights expect "caffe" preprocessing (BGR, 0..255, mean subtracted), torchvision's "imagenet".
"""

from __future__ import annotations

import jax
from flax import nnx

from siamese_jax import layers
from siamese_jax.backbones import base
from siamese_jax.errors import UserError

# Output channels of each block's convolutions.
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(base.Backbone):
  """block1..block5: 3x3 convolutions with ReLU, each block ending in a 2x2 max-pool; 512 features."""

  STAGES = tuple(f"block{b + 1}" for b in range(len(BLOCKS)))
  CLASSIFIER_PREFIXES = ("classifier.", "fc1/", "fc2/", "predictions/")

  def __init__(self, *, num_classes: int = 0, layout: str = "torch", preprocessing: str = "imagenet",
               momentum: float = 0.9, rngs: nnx.Rngs):
    del momentum  # no BatchNorm; accepted so that every backbone is built with the same arguments
    base.check_layout(layout, preprocessing)
    if num_classes:
      raise UserError(f"VGG16 with num_classes={num_classes}: VGG16's ImageNet classifier is not built; "
                      "use num_classes=0")
    self.layout, self.preprocessing = layout, preprocessing
    in_channels = 3
    for b, widths in enumerate(BLOCKS):
      convs = []
      for width in widths:
        convs.append(nnx.Conv(in_channels, width, (3, 3), strides=1, padding=((1, 1), (1, 1)), rngs=rngs))
        in_channels = width
      setattr(self, self.STAGES[b], nnx.List(convs))
    self.num_features = in_channels
    self.classifier = None

  def features(self, x: jax.Array) -> jax.Array:
    x = base.preprocess(x, self.preprocessing)
    for name in self.STAGES:
      for conv in getattr(self, name):
        x = jax.nn.relu(conv(x))
      x = layers.max_pool_2(x)  # floors odd sizes, as torch's MaxPool2d(2, 2) and Keras' VALID pool
    return x

  def logits(self, x: jax.Array) -> jax.Array:
    raise UserError("VGG16's ImageNet classifier is not built (it needs the flattened 7x7 map of 224x224 "
                    "images); use the features")

  def weight_names(self) -> dict[str, dict[str, base.WeightName]]:
    names = {}
    if self.layout == "keras":
      for b, widths in enumerate(BLOCKS):
        for c in range(len(widths)):
          names.update(base.keras_conv(f"block{b + 1}_conv{c + 1}", (self.STAGES[b], c)))
      return {"Keras applications": names}
    index = 0  # torchvision's index in `features`: a ReLU follows each conv, a max-pool each block
    for b, widths in enumerate(BLOCKS):
      for c in range(len(widths)):
        names.update(base.torch_conv(f"features.{index}", (self.STAGES[b], c), bias=True))
        index += 2
      index += 1
    return {"torchvision": names}
