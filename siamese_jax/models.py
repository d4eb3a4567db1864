"""Embedding networks (Flax NNX) and the `embed_fn` that evaluation and export see.

Every model maps float32 images [N, H, W, C] in [0, 1] to `(embeddings [N, D], aux)`; `aux` holds
cheap extras for metrics (`embedding_norm` [N]: the length before any L2 normalisation, which shows
collapse or blow-up early). The registry is a plain dict chosen by `config.model.name`.

BatchNorm and modes: see `layers` (models are created in eval mode; the train step calls
`model.train()` on its merged copy). `embed_fn` always runs in eval mode.

Dropout (`model.dropout`, before the embedding's dense layer, where Keras scripts put it) takes its
randomness as an argument, `model(images, dropout_keys=keys)` with one key per image, never from a stateful
`nnx.Rngs`: the train step derives each image's key from (seed, step, global example index), so a row's
mask does not depend on the device it lands on or on how often the run was resumed. Without keys (eval,
`embed_fn`, export) there is no dropout.

The functional pattern the train step uses (and the tests check):

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # inside jit / shard_map:
  model = nnx.merge(graphdef, params, rest, copy=True); model.train()
  embeddings, aux = model(images, dropout_keys=keys)   # keys: one per image, or None (no dropout)
  new_rest = nnx.state(model, nnx.Not(nnx.Param))   # updated BatchStat
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from siamese_jax import augment, layers
from siamese_jax.backbones import base, efficientnet, resnet, vgg
from siamese_jax.errors import UserError


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def _finish(embeddings: jax.Array, l2_normalize: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  aux = {"embedding_norm": jnp.linalg.norm(embeddings, axis=-1)}
  if l2_normalize:
    embeddings = layers.l2_normalize(embeddings)
  return embeddings, aux


class PairHead(nnx.Module):
  """Koch et al.'s pair head, shared by every model that has one (`head` is None where it has not).

  One dense unit on |e1 - e2| (a learned weighted L1 distance), returned as a logit: positive means
  "same class" (the `koch_bce` loss applies the sigmoid).
  """

  def pair_logits(self, embeddings1: jax.Array, embeddings2: jax.Array) -> jax.Array:
    """[B, D], [B, D] -> [B] logits that the two images show the same class."""
    return self.head(jnp.abs(embeddings1 - embeddings2))[..., 0]


def _pair_head(config: ml_collections.ConfigDict, embedding_dim: int, rngs: nnx.Rngs) -> nnx.Linear | None:
  return nnx.Linear(embedding_dim, 1, rngs=rngs) if config.pair_head else None


def _dropout_rate(config: ml_collections.ConfigDict, has_dense_layer: bool) -> float:
  """model.dropout, checked: a rate in [0, 1), and only where a dense layer follows it."""
  rate = config.dropout
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise UserError(f"model.dropout: expected a rate in [0, 1), got {rate!r}")
  if rate and not has_dense_layer:
    raise UserError(f"model.dropout={rate} drops features before the embedding's dense layer, which "
                    f"model.name='{config.name}' has only with model.embedding_dim > 0")
  return float(rate)


def _dropout(x: jax.Array, rate: float, keys: jax.Array | None) -> jax.Array:
  """Inverted dropout of features [N, F] (kept ones times 1 / (1 - rate)), row i's mask drawn from keys[i];
  the identity without keys or at rate 0, so eval and a rate of 0 compute exactly what they did without it."""
  if keys is None or not rate:
    return x
  keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(keys)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _require_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise UserError(f"model.{name}: expected an integer >= {minimum}, got {value!r}")
  return value


# ----------------------------------------------------------------------------------------------------
# koch: Koch, Zemel & Salakhutdinov (2015), "Siamese Neural Networks for One-shot Image Recognition"


class KochNet(PairHead):
  """The Koch et al. convolutional twin: VALID convs with ReLU, max-pools, a sigmoid dense layer.

  Always with the paper's pair head (`PairHead.pair_logits`).
  """

  # (output channels, kernel size, max-pool after) of each conv layer, from the paper's Figure 4.
  CONVS = ((64, 10, True), (128, 7, True), (128, 4, True), (256, 4, False))

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "koch"  # Koch et al. 2015 twin network (105x105 in the paper)
    config.embedding_dim = 4096  # units of the sigmoid dense layer, the embedding
    config.l2_normalize = False  # scale embeddings to unit length (the paper does not)
    config.dropout = 0.0  # dropout rate on the flattened conv features, before the dense layer; 0 = none
    return config

  @classmethod
  def conv_output_size(cls, height: int, width: int) -> tuple[int, int]:
    """Spatial size after the conv stack; <= 0 means the image is too small."""
    for _, kernel, pool in cls.CONVS:
      height, width = height - kernel + 1, width - kernel + 1
      if pool:
        height, width = height // 2, width // 2
    return height, width

  def __init__(self, config: ml_collections.ConfigDict, *, image_shape: tuple[int, int, int], rngs: nnx.Rngs):
    height, width, channels = image_shape
    out_height, out_width = self.conv_output_size(height, width)
    if out_height < 1 or out_width < 1:
      smallest = next(s for s in range(1, 1000) if min(self.conv_output_size(s, s)) >= 1)
      raise UserError(
        f"model.name='koch' needs images of at least {smallest}x{smallest} (VALID convolutions), "
        f"got {height}x{width}; raise data.image_size or choose model.name='conv4'"
      )
    self.l2_normalize = bool(config.l2_normalize)
    self.dropout_rate = _dropout_rate(config, has_dense_layer=True)
    convs = []
    in_channels = channels
    for out_channels, kernel, _ in self.CONVS:
      convs.append(nnx.Conv(in_channels, out_channels, (kernel, kernel), padding="VALID", rngs=rngs))
      in_channels = out_channels
    self.convs = nnx.List(convs)
    self.dense = nnx.Linear(out_height * out_width * in_channels, config.embedding_dim, rngs=rngs)
    self.head = nnx.Linear(config.embedding_dim, 1, rngs=rngs)  # the paper's: always there

  def __call__(self, images: jax.Array,
               dropout_keys: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = augment.to_float(images)
    for conv, (_, _, pool) in zip(self.convs, self.CONVS):
      x = nnx.relu(conv(x))
      if pool:
        x = layers.max_pool_2(x)
    x = _dropout(x.reshape((x.shape[0], -1)), self.dropout_rate, dropout_keys)
    return _finish(nnx.sigmoid(self.dense(x)), self.l2_normalize)


# ----------------------------------------------------------------------------------------------------
# conv4: the Prototypical Networks backbone (Snell et al. 2017; Vinyals et al. 2016)


class Conv4(PairHead):
  """4 x [conv 3x3 SAME, BatchNorm, ReLU, max-pool 2], flattened (64 features at 28x28)."""

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "conv4"  # ProtoNet 4-block conv embedding
    config.width = 64  # channels of each conv block
    config.embedding_dim = 0  # 0 = the flattened conv features are the embedding; > 0 adds a linear layer
    config.l2_normalize = False  # scale embeddings to unit length
    config.batch_norm_momentum = 0.9  # running-statistics decay (PyTorch's momentum 0.1, as in ProtoNet)
    config.pair_head = False  # add Koch et al.'s weighted-L1 pair head (needed by loss koch_bce)
    config.dropout = 0.0  # dropout rate on the flattened features before the linear layer (embedding_dim > 0)
    return config

  def __init__(self, config: ml_collections.ConfigDict, *, image_shape: tuple[int, int, int], rngs: nnx.Rngs):
    height, width, channels = image_shape
    num_blocks = 4
    if min(height, width) < 2**num_blocks:
      raise UserError(
        f"model.name='conv4' needs images of at least {2**num_blocks}x{2**num_blocks} (four 2x2 max-pools), "
        f"got {height}x{width}"
      )
    block_width = _require_int("width", config.width, 1)
    self.l2_normalize = bool(config.l2_normalize)
    self.dropout_rate = _dropout_rate(config, has_dense_layer=config.embedding_dim > 0)
    convs, norms = [], []
    in_channels = channels
    for _ in range(num_blocks):
      convs.append(nnx.Conv(in_channels, block_width, (3, 3), padding="SAME", rngs=rngs))
      norms.append(layers.batch_norm(block_width, config.batch_norm_momentum, rngs))
      in_channels = block_width
      height, width = height // 2, width // 2
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.features = height * width * block_width
    self.projection = (
      nnx.Linear(self.features, config.embedding_dim, rngs=rngs) if config.embedding_dim > 0 else None
    )
    self.head = _pair_head(config, config.embedding_dim or self.features, rngs)

  def __call__(self, images: jax.Array,
               dropout_keys: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = augment.to_float(images)
    for conv, norm in zip(self.convs, self.norms):
      x = layers.max_pool_2(nnx.relu(norm(conv(x))))
    x = x.reshape((x.shape[0], -1))
    if self.projection is not None:
      x = self.projection(_dropout(x, self.dropout_rate, dropout_keys))
    return _finish(x, self.l2_normalize)


# ----------------------------------------------------------------------------------------------------
# resnet: a small ResNet-style embedding (He et al. 2016, basic blocks)


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN where the shape changes), then ReLU."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, momentum: float, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, padding="SAME", use_bias=False,
                          rngs=rngs)
    self.norm1 = layers.batch_norm(out_channels, momentum, rngs)
    self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.norm2 = layers.batch_norm(out_channels, momentum, rngs)
    if stride != 1 or in_channels != out_channels:
      self.shortcut_conv = nnx.Conv(in_channels, out_channels, (1, 1), strides=stride, use_bias=False,
                                    rngs=rngs)
      self.shortcut_norm = layers.batch_norm(out_channels, momentum, rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = nnx.relu(self.norm1(self.conv1(x)))
    residual = self.norm2(self.conv2(residual))
    shortcut = x if self.shortcut_conv is None else self.shortcut_norm(self.shortcut_conv(x))
    return nnx.relu(residual + shortcut)


class ResNet(PairHead):
  """Stem conv, len(widths) stages of basic blocks (stride 2 between stages), global average pool, linear."""

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "resnet"  # small ResNet-style embedding with basic residual blocks
    config.widths = (64, 128, 256)  # channels of each stage; stages after the first start with stride 2
    config.blocks_per_stage = 2  # basic residual blocks in every stage
    config.embedding_dim = 128  # size of the final linear layer, the embedding
    config.l2_normalize = True  # scale embeddings to unit length (usual for triplet/contrastive losses)
    config.batch_norm_momentum = 0.9  # running-statistics decay
    config.pair_head = False  # add Koch et al.'s weighted-L1 pair head (needed by loss koch_bce)
    config.dropout = 0.0  # dropout rate on the pooled features, before the final linear layer; 0 = none
    return config

  def __init__(self, config: ml_collections.ConfigDict, *, image_shape: tuple[int, int, int], rngs: nnx.Rngs):
    widths = tuple(config.widths)
    if not widths:
      raise UserError("model.widths: expected at least one stage width, got ()")
    for stage_width in widths:
      _require_int("widths", stage_width, 1)
    blocks_per_stage = _require_int("blocks_per_stage", config.blocks_per_stage, 1)
    embedding_dim = _require_int("embedding_dim", config.embedding_dim, 1)
    momentum = config.batch_norm_momentum
    self.l2_normalize = bool(config.l2_normalize)
    self.dropout_rate = _dropout_rate(config, has_dense_layer=True)
    # A 3x3 stride-1 stem: inputs here are small (28..105 px), so no early 7x7/stride-4 downsampling.
    self.stem_conv = nnx.Conv(image_shape[2], widths[0], (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.stem_norm = layers.batch_norm(widths[0], momentum, rngs)
    blocks = []
    in_channels = widths[0]
    for stage, stage_width in enumerate(widths):
      for block in range(blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(BasicBlock(in_channels, stage_width, stride, momentum, rngs))
        in_channels = stage_width
    self.blocks = nnx.List(blocks)
    self.projection = nnx.Linear(in_channels, embedding_dim, rngs=rngs)
    self.head = _pair_head(config, embedding_dim, rngs)

  def __call__(self, images: jax.Array,
               dropout_keys: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = augment.to_float(images)
    x = nnx.relu(self.stem_norm(self.stem_conv(x)))
    for block in self.blocks:
      x = block(x)
    x = _dropout(jnp.mean(x, axis=(1, 2)), self.dropout_rate, dropout_keys)
    return _finish(self.projection(x), self.l2_normalize)


# ----------------------------------------------------------------------------------------------------
# pretrained: an ImageNet backbone (backbones/) under an embedding head


# model.name -> the backbone's constructor (keyword arguments: num_classes, layout, preprocessing, momentum,
# rngs) and the preprocessing its usual weights expect in each layout (model.preprocessing="auto").
BACKBONES: dict[str, tuple[Callable[..., base.Backbone], dict[str, str]]] = {
  "resnet18": (functools.partial(resnet.ResNet, 18), {"torch": "imagenet"}),
  "resnet34": (functools.partial(resnet.ResNet, 34), {"torch": "imagenet"}),
  "resnet50": (functools.partial(resnet.ResNet, 50), {"torch": "imagenet", "keras": "caffe"}),
  "vgg16": (vgg.VGG16, {"torch": "imagenet", "keras": "caffe"}),
  "efficientnet_lite0": (efficientnet.EfficientNetLite0, {"torch": "inception", "timm": "imagenet"}),
}


class Pretrained(PairHead):
  """A backbone (ResNet-18/34/50, VGG16, EfficientNet-Lite0), global pooling, optional projection to D.

  Grayscale input (1 channel) is repeated to RGB inside the network. The backbone's preprocessing runs
  inside too (`backbones.base.preprocess`), so callers pass [0, 1] pixels like every other model.
  Weights come from `model.pretrained` (see `load_pretrained`); `freeze_until` keeps the BatchNorms of the
  named stage and those before it in inference mode, and `parameter_labels` tells the optimizer which
  parameters are frozen, pretrained or new.
  """

  @staticmethod
  def default_config(name: str = "efficientnet_lite0") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = name  # resnet18 | resnet34 | resnet50 | vgg16 | efficientnet_lite0
    config.pretrained = ""  # weights file: safetensors, PyTorch .pth/.pt or Keras .h5; "" = random init
    config.weights_layout = "torch"  # torch (torchvision, timm, PyTorch ports) | timm (efficientnet_lite0) | keras
    config.preprocessing = "auto"  # auto (what the layout's weights expect) | imagenet | caffe | inception
    config.freeze_until = ""  # "" = train all; a stage name (e.g. layer3, stage5) or "all": frozen up to it
    config.pooling = "avg"  # avg | max: global pooling of the last feature map
    config.embedding_dim = 128  # linear projection of the pooled features; 0 = the pooled features
    config.l2_normalize = True  # scale embeddings to unit length
    config.batch_norm_momentum = 0.9  # running-statistics decay of the backbone's trainable BatchNorms
    config.pair_head = False  # add Koch et al.'s weighted-L1 pair head (needed by loss koch_bce)
    config.dropout = 0.0  # dropout rate on the pooled features, before the projection (embedding_dim > 0)
    return config

  def __init__(self, config: ml_collections.ConfigDict, *, image_shape: tuple[int, int, int], rngs: nnx.Rngs):
    height, width, channels = image_shape
    factory, usual = BACKBONES[config.name]
    layout = config.weights_layout
    if layout not in usual:
      raise UserError(f"model.weights_layout={layout!r}: model.name={config.name!r} takes {sorted(usual)}")
    preprocessing = usual[layout] if config.preprocessing == "auto" else config.preprocessing
    if config.pooling not in ("avg", "max"):
      raise UserError(f"model.pooling={config.pooling!r}: expected 'avg' or 'max'")
    embedding_dim = _require_int("embedding_dim", config.embedding_dim, 0)
    self.dropout_rate = _dropout_rate(config, has_dense_layer=embedding_dim > 0)
    self.backbone = factory(num_classes=0, layout=layout, preprocessing=preprocessing,
                            momentum=config.batch_norm_momentum, rngs=rngs)
    base.freeze(self.backbone, config.freeze_until)
    self.frozen_stages = base.frozen_stages(self.backbone, config.freeze_until)
    out = jax.eval_shape(self.backbone.features, jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
    if min(out.shape[1:3]) < 1:
      raise UserError(f"model.name={config.name!r}: images of {height}x{width} are too small for its "
                      "downsampling; raise data.image_size")
    self.gray = channels == 1
    self.pooling = config.pooling
    self.l2_normalize = bool(config.l2_normalize)
    features = self.backbone.num_features
    self.projection = nnx.Linear(features, embedding_dim, rngs=rngs) if embedding_dim else None
    self.head = _pair_head(config, embedding_dim or features, rngs)

  def __call__(self, images: jax.Array,
               dropout_keys: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = augment.to_float(images)
    if self.gray:
      x = jnp.repeat(x, 3, axis=-1)
    x = self.backbone.features(x)
    x = jnp.mean(x, axis=(1, 2)) if self.pooling == "avg" else jnp.max(x, axis=(1, 2))
    if self.projection is not None:
      x = self.projection(_dropout(x, self.dropout_rate, dropout_keys))
    return _finish(x, self.l2_normalize)


def load_pretrained(model: nnx.Module, model_config: Mapping[str, Any] | ml_collections.ConfigDict) -> bool:
  """Fills `model`'s backbone from `model.pretrained` when the config names a file; True if it did."""
  path = dict(model_config.items()).get("pretrained", "")
  if not path:
    return False
  base.load_file(model.backbone, path)
  return True


def parameter_labels(model: nnx.Module) -> nnx.State | None:
  """For a Pretrained model: each parameter's part, "frozen" (a frozen stage), "backbone" (other
  pretrained parameters) or "head" (new layers), in the layout of `nnx.split(model, nnx.Param, ...)[1]`;
  None for the other models (one part)."""
  if not isinstance(model, Pretrained):
    return None

  def label(key_path, _) -> str:
    path = [getattr(key, "key", None) for key in key_path[:2]]
    if path[0] != "backbone":
      return "head"
    return "frozen" if path[1] in model.frozen_stages else "backbone"

  return jax.tree_util.tree_map_with_path(label, nnx.split(model, nnx.Param, ...)[1])


# ----------------------------------------------------------------------------------------------------
# Registry, creation, and the functions evaluation sees


MODELS: dict[str, type[nnx.Module]] = {"koch": KochNet, "conv4": Conv4, "resnet": ResNet,
                                       **{name: Pretrained for name in BACKBONES}}


def default_config(name: str) -> ml_collections.ConfigDict:
  """The full config of model `name`, every field with its default."""
  if name not in MODELS:
    raise UserError(f"model.name='{name}' is not a known model; choose one of {sorted(MODELS)}")
  return MODELS[name].default_config(name) if MODELS[name] is Pretrained else MODELS[name].default_config()


def _resolved_config(model_config: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Defaults of the named model, overridden by the given fields; unknown fields are errors."""
  given = dict(model_config.items())
  if "name" not in given:
    raise UserError(f"model.name is missing; choose one of {sorted(MODELS)}")
  config = default_config(given["name"])
  unknown = sorted(set(given) - set(config.keys()))
  if unknown:
    close = {field: difflib.get_close_matches(field, list(config.keys()), n=1) for field in unknown}
    hints = "".join(f" (model.{field}: did you mean model.{match[0]}?)" for field, match in close.items() if match)
    raise UserError(
      f"model: unknown field(s) {unknown} for model.name='{given['name']}'; valid fields are {sorted(config.keys())}"
      f"{hints}. Each model has its own fields: after changing model.name, remove the old model's fields"
    )
  config.update(given)
  return config


def create(
  model_config: Mapping[str, Any] | ml_collections.ConfigDict,
  *,
  image_shape: tuple[int, int, int],
  rngs: nnx.Rngs,
) -> nnx.Module:
  """Builds the model named by `model_config.name`, in eval mode (see the module docstring).

  Fields missing from `model_config` take the model's defaults (`default_config(name)`).
  """
  config = _resolved_config(model_config)
  image_shape = tuple(image_shape)
  if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
    raise UserError(f"image_shape: expected (height, width, channels) of positive ints, got {image_shape}")
  minimum_dim = 0 if config.name == "conv4" or config.name in BACKBONES else 1
  _require_int("embedding_dim", config.embedding_dim, minimum_dim)
  return MODELS[config.name](config, image_shape=image_shape, rngs=rngs)


def make_pair_probability_fn(pair_logits_fn: Callable) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """`(variables, e1 [P, D], e2 [P, D]) -> [P]`, jitted: the pair head's probability that two embedded
  images show the same class. Build it once and pass new variables to it: it compiles once per shape."""
  return jax.jit(lambda variables, first, second: jax.nn.sigmoid(pair_logits_fn(variables, first, second)))


def make_pair_score_fn(pair_logits_fn: Callable, variables: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`pair_score_fn(e1 [P, D], e2 [P, D]) -> [P]`: `make_pair_probability_fn`'s function with `variables`
  bound."""
  return functools.partial(make_pair_probability_fn(pair_logits_fn), variables)


def has_pair_head(model: nnx.Module) -> bool:
  """True for models with a learned pair head (Koch's weighted L1), used by the `koch_bce` loss."""
  return isinstance(model, PairHead) and model.head is not None


def parameter_count(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param); batch statistics are not counted."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _merge_eval(graphdef: nnx.GraphDef, variables: Any) -> nnx.Module:
  # copy=True gives the traced function its own Variables (without it, merging BatchNorm's state inside
  # a traced function raises a trace-context error); eval() then freezes batch statistics, so nothing
  # needs to be written back.
  states = tuple(variables) if isinstance(variables, (tuple, list)) else (variables,)
  model = nnx.merge(graphdef, *states, copy=True)
  model.eval()
  return model


def make_embed_fn(graphdef: nnx.GraphDef, tta_shift_px: int = 0) -> Callable[[Any, jax.Array], jax.Array]:
  """`embed_fn(variables, images_uint8 [N, H, W, C]) -> float32 [N, D]`, pure and jit-able.

  `variables` is the model's full nnx.State (`nnx.split(model)[1]`), or the tuple of states that
  `nnx.split(model, nnx.Param, ...)` returned, e.g. `(state.params, state.model_state)`.
  Runs in eval mode: batch statistics are read, never updated, and no mesh axis is needed.
  `tta_shift_px` > 0 (config `eval.tta_shift_px`) averages each image's embedding with those of its
  copies shifted by that many pixels in the four directions (`augment.shifted_views`): every user of
  the embedding (validation, reports, export, compare) then sees the same averaged embedding.
  """

  def embed_fn(variables: Any, images: jax.Array) -> jax.Array:
    model = _merge_eval(graphdef, variables)
    images = augment.to_float(images)
    if not tta_shift_px:
      embeddings, _ = model(images)
      return embeddings.astype(jnp.float32)
    views = augment.shifted_views(images, tta_shift_px)
    embeddings, _ = model(views.reshape(-1, *images.shape[1:]))  # eval mode: rows are independent
    return embeddings.astype(jnp.float32).reshape(views.shape[0], images.shape[0], -1).mean(axis=0)

  return embed_fn


def make_pair_logits_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """`pair_logits_fn(variables, e1 [B, D], e2 [B, D]) -> [B]` for models with a pair head."""

  def pair_logits_fn(variables: Any, embeddings1: jax.Array, embeddings2: jax.Array) -> jax.Array:
    model = _merge_eval(graphdef, variables)
    if not has_pair_head(model):
      raise UserError(f"model {type(model).__name__} has no pair head; pair logits need model.name='koch' "
                      "or model.pair_head=True")
    return model.pair_logits(embeddings1, embeddings2)

  return pair_logits_fn


__all__ = [
  "BACKBONES",
  "MODELS",
  "Pretrained",
  "BasicBlock",
  "Conv4",
  "KochNet",
  "PairHead",
  "ResNet",
  "create",
  "default_config",
  "has_pair_head",
  "load_pretrained",
  "make_embed_fn",
  "make_pair_logits_fn",
  "parameter_count",
  "parameter_labels",
]
