"""ResNet-18, -34 and -50 (He et al. 2016) in the two forms whose ImageNet weights people have.

Shape. A stem (7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool) brings the image to 1/4
size; four stages `layer1..layer4` of residual blocks follow, the first block of layers 2-4 halving the size
again, so the features are 1/32 of the input (7x7 at 224). ResNet-18/34 use basic blocks (two 3x3
convolutions, 512 features); ResNet-50 bottlenecks (1x1 down, 3x3, 1x1 up to 4x, 2048 features). A block
whose size or width changes projects its shortcut with a 1x1 convolution and a BatchNorm.

Layouts. The two sources of weights differ in the network itself, not only in names:
  torch   torchvision's ResNet ("v1.5"): a bottleneck strides in its 3x3 convolution, convolutions have no
          bias, BatchNorm epsilon 1e-5. timm's resnet18/34/50 have the same structure and tensor names
          (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/.1, fc), hence one convention.
  keras   Keras applications' ResNet50 ("v1", ResNet-50 only): the first bottleneck of layers 2-4 strides
          in its first 1x1 convolution, every convolution has a bias, BatchNorm epsilon 1.001e-5. Names
          conv1_conv, conv1_bn, conv{2..5}_block{j}_{1,2,3}_conv/_bn, shortcut conv{s}_block1_0_conv/_0_bn,
          classifier predictions. Keras pads the stem with ZeroPadding2D (3 before the 7x7 convolution,
          1 before the max-pool) and convolves VALID: the same numbers as torch's padded convolution, and
          zero-padding the pool after a ReLU equals torch's -inf padding since every input is >= 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from siamese_jax import layers
from siamese_jax.backbones import base
from siamese_jax.errors import UserError

DEPTHS = (18, 34, 50)
# Residual blocks in each of layer1..layer4 (ResNet-50 has ResNet-34's counts, in bottlenecks).
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
EPSILON = {"torch": 1e-5, "keras": 1.001e-5}


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
  pad = (kernel - 1) // 2  # symmetric, as torch's padding=k//2 and Keras' "same" at stride 1
  return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  use_bias=bias, rngs=rngs)


def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, padding 1 with -inf (torch's MaxPool2d(3, 2, 1)): H -> floor((H - 1) / 2) + 1.

  The maximum of nine strided slices rather than reduce_window: same values, and a gradient XLA:CPU
  computes much faster than reduce_window's select-and-scatter (see layers.max_pool_2).
  """
  _, height, width, _ = x.shape
  out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      window = x[:, i:i + 2 * out_height - 1:2, j:j + 2 * out_width - 1:2]
      out = window if out is None else jnp.maximum(out, window)
  return out


class Stem(nnx.Module):
  """7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool: 1/4 size, 64 channels."""

  def __init__(self, bias: bool, epsilon: float, momentum: float, rngs: nnx.Rngs):
    self.conv = _conv(3, STAGE_WIDTHS[0], 7, 2, bias, rngs)
    self.norm = layers.batch_norm(STAGE_WIDTHS[0], momentum, rngs, epsilon)

  def __call__(self, x: jax.Array) -> jax.Array:
    return max_pool_3x3_stride_2(jax.nn.relu(self.norm(self.conv(x))))


class Shortcut(nnx.Module):
  """1x1 convolution (strided) and BatchNorm: the projection of a block that changes size or width."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool, epsilon: float,
               momentum: float, rngs: nnx.Rngs):
    self.conv = _conv(in_channels, out_channels, 1, stride, bias, rngs)
    self.norm = layers.batch_norm(out_channels, momentum, rngs, epsilon)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """3x3 (strided), BatchNorm, ReLU, 3x3, BatchNorm, plus the shortcut, ReLU (ResNet-18/34)."""

  def __init__(self, in_channels: int, width: int, stride: int, epsilon: float, momentum: float, rngs: nnx.Rngs):
    self.conv1 = _conv(in_channels, width, 3, stride, False, rngs)
    self.norm1 = layers.batch_norm(width, momentum, rngs, epsilon)
    self.conv2 = _conv(width, width, 3, 1, False, rngs)
    self.norm2 = layers.batch_norm(width, momentum, rngs, epsilon)
    projected = stride != 1 or in_channels != width
    self.shortcut = Shortcut(in_channels, width, stride, False, epsilon, momentum, rngs) if projected else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
  """1x1, 3x3, 1x1 to 4x the width, each with BatchNorm (ReLU between), plus the shortcut, ReLU (ResNet-50).

  `stride_first` puts the stride in the first 1x1 convolution (Keras, v1) instead of the 3x3 (torchvision,
  v1.5); `bias` gives every convolution a bias (Keras).
  """

  def __init__(self, in_channels: int, width: int, stride: int, *, stride_first: bool, bias: bool,
               epsilon: float, momentum: float, rngs: nnx.Rngs):
    out_channels = width * BOTTLENECK_EXPANSION
    self.conv1 = _conv(in_channels, width, 1, stride if stride_first else 1, bias, rngs)
    self.norm1 = layers.batch_norm(width, momentum, rngs, epsilon)
    self.conv2 = _conv(width, width, 3, 1 if stride_first else stride, bias, rngs)
    self.norm2 = layers.batch_norm(width, momentum, rngs, epsilon)
    self.conv3 = _conv(width, out_channels, 1, 1, bias, rngs)
    self.norm3 = layers.batch_norm(out_channels, momentum, rngs, epsilon)
    projected = stride != 1 or in_channels != out_channels
    self.shortcut = Shortcut(in_channels, out_channels, stride, bias, epsilon, momentum, rngs) if projected else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = jax.nn.relu(self.norm2(self.conv2(y)))
    y = self.norm3(self.conv3(y))
    return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(base.Backbone):
  """stem, layer1..layer4 of residual blocks: features at 1/32 size, 512 (18/34) or 2048 (50) channels."""

  STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
  CLASSIFIER_PREFIXES = ("fc.", "predictions/")

  def __init__(self, depth: int, *, num_classes: int = 0, layout: str = "torch", preprocessing: str = "imagenet",
               momentum: float = 0.9, rngs: nnx.Rngs):
    base.check_layout(layout, preprocessing)
    if depth not in DEPTHS:
      raise UserError(f"ResNet depth {depth!r}: expected one of {DEPTHS}")
    if layout == "keras" and depth != 50:
      raise UserError(f"model.name='resnet{depth}' with model.weights_layout='keras': Keras applications ship "
                      "ResNet50 only; use model.weights_layout='torch' (torchvision / timm weights)")
    self.depth, self.layout, self.preprocessing = depth, layout, preprocessing
    self.bottleneck = depth == 50
    keras = layout == "keras"
    epsilon = EPSILON[layout]
    self.stem = Stem(bias=keras, epsilon=epsilon, momentum=momentum, rngs=rngs)
    in_channels = STAGE_WIDTHS[0]
    for index, (blocks, width) in enumerate(zip(STAGE_BLOCKS[depth], STAGE_WIDTHS)):
      stage = []
      for block in range(blocks):
        stride = 2 if index > 0 and block == 0 else 1
        if self.bottleneck:
          stage.append(Bottleneck(in_channels, width, stride, stride_first=keras, bias=keras, epsilon=epsilon,
                                  momentum=momentum, rngs=rngs))
          in_channels = width * BOTTLENECK_EXPANSION
        else:
          stage.append(BasicBlock(in_channels, width, stride, epsilon, momentum, rngs))
          in_channels = width
      setattr(self, f"layer{index + 1}", nnx.List(stage))
    self.num_features = in_channels
    self.classifier = nnx.Linear(in_channels, num_classes, rngs=rngs) if num_classes else None

  def features(self, x: jax.Array) -> jax.Array:
    x = self.stem(base.preprocess(x, self.preprocessing))
    for name in self.STAGES[1:]:
      for block in getattr(self, name):
        x = block(x)
    return x

  def weight_names(self) -> dict[str, dict[str, base.WeightName]]:
    if self.layout == "keras":
      return {"Keras applications": self._keras_names()}
    return {"torchvision/timm": self._torch_names()}

  def _torch_names(self) -> dict[str, base.WeightName]:
    names = {**base.torch_conv("conv1", ("stem", "conv")), **base.torch_batch_norm("bn1", ("stem", "norm"))}
    convs = 3 if self.bottleneck else 2
    for stage in self.STAGES[1:]:
      for j, block in enumerate(getattr(self, stage)):
        prefix, path = f"{stage}.{j}", (stage, j)
        for k in range(1, convs + 1):
          names.update({**base.torch_conv(f"{prefix}.conv{k}", path + (f"conv{k}",)),
                        **base.torch_batch_norm(f"{prefix}.bn{k}", path + (f"norm{k}",))})
        if block.shortcut is not None:
          names.update({**base.torch_conv(f"{prefix}.downsample.0", path + ("shortcut", "conv")),
                        **base.torch_batch_norm(f"{prefix}.downsample.1", path + ("shortcut", "norm"))})
    if self.classifier is not None:
      names.update(base.torch_linear("fc", ("classifier",)))
    return names

  def _keras_names(self) -> dict[str, base.WeightName]:
    names = {**base.keras_conv("conv1_conv", ("stem", "conv")), **base.keras_batch_norm("conv1_bn", ("stem", "norm"))}
    for s, stage in enumerate(self.STAGES[1:]):
      for j, block in enumerate(getattr(self, stage)):
        prefix, path = f"conv{s + 2}_block{j + 1}", (stage, j)
        for k in range(1, 4):
          names.update({**base.keras_conv(f"{prefix}_{k}_conv", path + (f"conv{k}",)),
                        **base.keras_batch_norm(f"{prefix}_{k}_bn", path + (f"norm{k}",))})
        if block.shortcut is not None:
          names.update({**base.keras_conv(f"{prefix}_0_conv", path + ("shortcut", "conv")),
                        **base.keras_batch_norm(f"{prefix}_0_bn", path + ("shortcut", "norm"))})
    if self.classifier is not None:
      names.update(base.keras_dense("predictions", ("classifier",)))
    return names
