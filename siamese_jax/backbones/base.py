"""What every pretrained backbone shares: its preprocessing, its stages, and loading weights by name.

A backbone maps float32 RGB images [N, H, W, 3] in [0, 1] to a feature map [N, h, w, C] (`features`),
applying inside the network the preprocessing its weights were trained with, so that training, evaluation
and an exported model all see raw [0, 1] pixels. `models.Pretrained` puts the embedding head on top.

Stages. `STAGES` names the backbone's top-level attributes in forward order ("stem", "stage1", ...).
Fine-tuning freezes a prefix of them (`freeze`): their BatchNorms stay in inference mode, and the
optimizer (`stage_labels`) leaves their parameters alone (or starts them late, see optim.py).

Weights. Each backbone describes, for its weights layout, how every tensor of a weights file fills one
of its variables: `weight_names()` gives {convention: {file tensor name: (variable path, permutation)}},
one entry per naming convention it accepts (torchvision, timm, the EfficientNet-PyTorch port, Keras
applications). The permutation takes the file's axis order to Flax's (`TORCH_CONV`, ...), None keeps it.
`load_weights` picks the convention that names the most tensors of the file, checks every name and shape
(one error line, `weights.match_weights`) and only then writes the arrays: a misfit changes nothing.

Layouts. "torch" covers PyTorch state dicts and safetensors (torchvision / timm names); "timm" where timm's
network differs from the torch one (EfficientNet-Lite0); "keras" the Keras applications .h5 files. They
differ in more than names (Keras' ResNet50 has conv biases and strides in
its first 1x1 convolution; its VGG16 and ResNet50 expect "caffe" preprocessing), so the layout is part of
the architecture: `model.weights_layout` in the config.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siamese_jax import layers, weights
from siamese_jax.errors import UserError

LAYOUTS = ("torch", "timm", "keras")

# Preprocessing modes: what a network's weights expect of [0, 1] RGB pixels.
#   imagenet   (x - mean) / std with ImageNet's RGB statistics (torchvision, timm);
#   caffe      BGR, 0..255, ImageNet's BGR mean subtracted, no scaling (Keras VGG16 / ResNet50);
#   inception  2x - 1, i.e. [-1, 1] (TensorFlow's EfficientNet-Lite, Inception).
PREPROCESSING = ("imagenet", "caffe", "inception")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# Axis permutations from a file's layout to Flax's (`array.transpose(perm)`).
TORCH_CONV = (2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]; depthwise [C, 1, kh, kw] -> [kh, kw, 1, C]
TORCH_LINEAR = (1, 0)  # [out, in] -> [in, out]
KERAS_DEPTHWISE = (0, 1, 3, 2)  # [kh, kw, C, 1] -> [kh, kw, 1, C]

# Tensors a PyTorch BatchNorm saves that no Flax variable holds.
_TORCH_IGNORED_SUFFIXES = (".num_batches_tracked",)

Path = tuple[Any, ...]
WeightName = tuple[Path, "tuple[int, ...] | None"]


def preprocess(x: jax.Array, mode: str) -> jax.Array:
  """[0, 1] RGB -> what the weights were trained on (see PREPROCESSING)."""
  if mode == "imagenet":
    return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
  if mode == "caffe":
    return x[..., ::-1] * 255.0 - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)
  if mode == "inception":
    return x * 2.0 - 1.0
  raise UserError(f"model.preprocessing={mode!r}: expected one of {PREPROCESSING}")


# ----------------------------------------------------------------------------------------------------
# Name-map builders: {file tensor name: (variable path, permutation)}


def torch_conv(prefix: str, path: Path, bias: bool = False) -> dict[str, WeightName]:
  names = {f"{prefix}.weight": (path + ("kernel",), TORCH_CONV)}
  if bias:
    names[f"{prefix}.bias"] = (path + ("bias",), None)
  return names


def torch_linear(prefix: str, path: Path) -> dict[str, WeightName]:
  return {f"{prefix}.weight": (path + ("kernel",), TORCH_LINEAR), f"{prefix}.bias": (path + ("bias",), None)}


def torch_batch_norm(prefix: str, path: Path) -> dict[str, WeightName]:
  return {f"{prefix}.weight": (path + ("scale",), None), f"{prefix}.bias": (path + ("bias",), None),
          f"{prefix}.running_mean": (path + ("mean",), None), f"{prefix}.running_var": (path + ("var",), None)}


def keras_conv(layer: str, path: Path, bias: bool = True, depthwise: bool = False) -> dict[str, WeightName]:
  kernel = "depthwise_kernel" if depthwise else "kernel"
  names = {f"{layer}/{kernel}": (path + ("kernel",), KERAS_DEPTHWISE if depthwise else None)}
  if bias:
    names[f"{layer}/bias"] = (path + ("bias",), None)
  return names


def keras_dense(layer: str, path: Path) -> dict[str, WeightName]:
  return {f"{layer}/kernel": (path + ("kernel",), None), f"{layer}/bias": (path + ("bias",), None)}


def keras_batch_norm(layer: str, path: Path) -> dict[str, WeightName]:
  return {f"{layer}/gamma": (path + ("scale",), None), f"{layer}/beta": (path + ("bias",), None),
          f"{layer}/moving_mean": (path + ("mean",), None), f"{layer}/moving_variance": (path + ("var",), None)}


# ----------------------------------------------------------------------------------------------------
# The contract


class Backbone(nnx.Module):
  """Base of the pretrained-style feature extractors (see the module docstring).

  Subclasses set `STAGES`, `num_features`, `preprocessing` and `layout`, build `classifier` (an
  nnx.Linear to the ImageNet classes, or None), and implement `features` and `weight_names`.
  """

  STAGES: tuple[str, ...] = ()
  # Name prefixes of the ImageNet classifier's tensors in each convention: dropped from a file when the
  # backbone was built without a classifier (an embedding model never has one).
  CLASSIFIER_PREFIXES: tuple[str, ...] = ()

  num_features: int
  preprocessing: str
  layout: str
  classifier: nnx.Linear | None

  def features(self, x: jax.Array) -> jax.Array:
    """float32 RGB [N, H, W, 3] in [0, 1] -> feature map [N, h, w, num_features] (eval or train mode)."""
    raise NotImplementedError

  def weight_names(self) -> dict[str, dict[str, WeightName]]:
    """{convention: {file tensor name: (variable path, permutation)}} for `self.layout`."""
    raise NotImplementedError

  def logits(self, x: jax.Array) -> jax.Array:
    """ImageNet logits [N, classes]: global average pool of the features, then the classifier."""
    if self.classifier is None:
      raise UserError(f"{type(self).__name__} was built without an ImageNet classifier (num_classes=0)")
    return self.classifier(jnp.mean(self.features(x), axis=(1, 2)))


def check_layout(layout: str, preprocessing: str) -> None:
  if layout not in LAYOUTS:
    raise UserError(f"model.weights_layout={layout!r}: expected one of {LAYOUTS}")
  if preprocessing not in PREPROCESSING:
    raise UserError(f"model.preprocessing={preprocessing!r}: expected one of {PREPROCESSING}")


def stage_index(backbone: Backbone, stage: str) -> int:
  """Position of `stage` in STAGES; "all" names the last one. A UserError lists the valid names."""
  names = backbone.STAGES
  if stage == "all":
    return len(names) - 1
  if stage not in names:
    raise UserError(f"model.freeze_until={stage!r}: {type(backbone).__name__} has stages {list(names)} "
                    "(or 'all', or '' for none)")
  return names.index(stage)


def freeze(backbone: Backbone, until: str) -> None:
  """Keeps the BatchNorms of `until` and every stage before it in inference mode ("" freezes nothing)."""
  if not until:
    return
  for stage in backbone.STAGES[:stage_index(backbone, until) + 1]:
    for _, module in nnx.iter_graph(getattr(backbone, stage)):
      if isinstance(module, layers.BatchNorm):
        module.frozen = True


def frozen_stages(backbone: Backbone, until: str) -> tuple[str, ...]:
  """The stage names that `freeze(backbone, until)` freezes."""
  return () if not until else backbone.STAGES[:stage_index(backbone, until) + 1]


def _variables(module: nnx.Module) -> dict[Path, nnx.Variable]:
  return {tuple(path): node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)}


def _expected_shape(shape: tuple[int, ...], permutation: tuple[int, ...] | None) -> tuple[int, ...]:
  """The shape a file tensor must have to become a variable of `shape` after `permutation`."""
  if permutation is None:
    return tuple(shape)
  if len(permutation) != len(shape):
    return tuple(shape) + (-1,)  # cannot fit: the rank differs
  file_shape = [0] * len(shape)
  for flax_axis, file_axis in enumerate(permutation):
    file_shape[file_axis] = shape[flax_axis]
  return tuple(file_shape)


def load_weights(backbone: Backbone, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Writes the file's `tensors` into `backbone`'s variables; any misfit is one UserError, nothing written."""
  tensors = {name: array for name, array in tensors.items() if not name.endswith(_TORCH_IGNORED_SUFFIXES)}
  if backbone.layout != "keras" and tensors and all("/" in name for name in tensors):
    raise UserError(f"{source} holds Keras tensor names ({next(iter(tensors))!r}); set "
                    "model.weights_layout='keras' (and model.preprocessing='caffe' for Keras VGG16/ResNet50)")
  if backbone.layout == "keras" and tensors and not any("/" in name for name in tensors):
    raise UserError(f"{source} holds PyTorch-style tensor names ({next(iter(tensors))!r}), not Keras ones; "
                    "set model.weights_layout='torch' (or 'timm')")
  conventions = backbone.weight_names()
  convention = max(conventions, key=lambda c: sum(name in tensors for name in conventions[c]))
  names = conventions[convention]
  if backbone.classifier is None:
    tensors = {name: array for name, array in tensors.items()
               if not name.startswith(backbone.CLASSIFIER_PREFIXES)}
    names = {name: target for name, target in names.items() if not name.startswith(backbone.CLASSIFIER_PREFIXES)}
  variables = _variables(backbone)
  unmapped = sorted(set(variables) - {path for path, _ in names.values()})
  if unmapped:  # a backbone's own bug, not the user's: every variable must have a name
    raise AssertionError(f"{type(backbone).__name__}: no file name for variables {unmapped[:3]}")
  expected = {name: _expected_shape(variables[path].shape, perm) for name, (path, perm) in names.items()}
  weights.match_weights(expected, tensors, source=f"{source} ({convention} names)")
  for name, (path, perm) in names.items():
    array = np.asarray(tensors[name], dtype=np.float32)
    variables[path].value = jnp.asarray(array if perm is None else array.transpose(perm))


def load_file(backbone: Backbone, path: str) -> None:
  """`load_weights` from a weights file (any format weights.read_weights knows)."""
  load_weights(backbone, weights.read_weights(path), source=f"model.pretrained={path}")
