"""Model shapes, parameter counts worked out by hand, eval/train modes, and the functional train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from siamese_jax import augment, models
from siamese_jax.errors import UserError

# Small but complete variants, so the tests exercise every layer without the CPU time of the defaults.
TINY = {
  "koch": ({"name": "koch", "embedding_dim": 8}, (65, 65, 1)),  # 65 px: the smallest the VALID convs accept
  "conv4": ({"name": "conv4", "width": 8}, (28, 28, 1)),
  "resnet": ({"name": "resnet", "widths": (4, 8), "blocks_per_stage": 1, "embedding_dim": 6}, (28, 28, 1)),
}


def make(config, image_shape, seed: int = 0) -> nnx.Module:
  return models.create(config, image_shape=image_shape, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def _tiny_split(name: str, l2_normalize: bool = False):
  config, image_shape = TINY[name]
  return nnx.split(make(dict(config, l2_normalize=l2_normalize), image_shape))


def tiny(name: str, l2_normalize: bool = False) -> tuple[nnx.Module, tuple[int, int, int]]:
  """A fresh (unshared, eval-mode) tiny model; initialised once per session, since init dominates test time."""
  return nnx.merge(*_tiny_split(name, l2_normalize), copy=True), TINY[name][1]


@nnx.jit
def forward(model, images):
  # One compiled call instead of op-by-op dispatch, which is slow on CPU.
  return model(images)


def random_images(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def abstract_count(config, image_shape) -> int:
  """Parameter count without allocating (Koch's dense layer alone is 37.7M floats)."""
  abstract = nnx.eval_shape(lambda: make(config, image_shape))
  return models.parameter_count(abstract)


# ----------------------------------------------------------------------------------------------------
# Shapes and parameter counts


@pytest.mark.parametrize(
  "config, image_shape, expected_dim",
  [
    ({"name": "conv4"}, (28, 28, 1), 64),  # 28 -> 14 -> 7 -> 3 -> 1: 1 x 1 x 64
    ({"name": "conv4", "width": 8, "embedding_dim": 5}, (28, 28, 1), 5),
    ({"name": "conv4", "width": 8}, (105, 105, 1), 8 * 6 * 6),  # 105 -> 52 -> 26 -> 13 -> 6
    (TINY["resnet"][0], (28, 28, 1), 6),
    (TINY["resnet"][0], (105, 105, 1), 6),  # 105 -> 53 after the one stride-2 stage, then averaged
    (TINY["koch"][0], (105, 105, 1), 8),
  ],
)
def test_output_shapes(config, image_shape, expected_dim):
  model = make(config, image_shape)
  embeddings, aux = forward(model, augment.to_float(random_images((3,) + image_shape)))
  assert embeddings.shape == (3, expected_dim) and embeddings.dtype == jnp.float32
  assert aux["embedding_norm"].shape == (3,)


def test_koch_default_is_the_paper_network_at_105():
  embeddings, _ = nnx.eval_shape(
    lambda: make(models.default_config("koch"), (105, 105, 1))(jnp.zeros((2, 105, 105, 1)))
  )
  assert embeddings.shape == (2, 4096)
  # Conv k x k, c_in -> c_out: k*k*c_in*c_out weights + c_out biases. Spatial: 105 -conv10-> 96 -pool-> 48
  # -conv7-> 42 -pool-> 21 -conv4-> 18 -pool-> 9 -conv4-> 6, so the dense layer sees 6*6*256 = 9216 inputs.
  convs = (10 * 10 * 1 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + (4 * 4 * 128 * 128 + 128) + (4 * 4 * 128 * 256 + 256)
  dense = 9216 * 4096 + 4096
  head = 4096 + 1  # one unit on |e1 - e2|
  assert convs + dense + head == 38_951_745  # the figure quoted for Koch et al.'s network
  assert abstract_count(models.default_config("koch"), (105, 105, 1)) == 38_951_745


def test_conv4_parameter_count_at_28x28x1():
  # Block i: conv 3x3 c_in -> 64 (9*c_in*64 weights + 64 biases) and BatchNorm (64 scales + 64 offsets);
  # c_in = 1 for the first block, 64 after. The flattened 1x1x64 output is the embedding: no more weights.
  first = 9 * 1 * 64 + 64 + 2 * 64  # 768
  later = 9 * 64 * 64 + 64 + 2 * 64  # 37,056
  assert first + 3 * later == 111_936
  model = make({"name": "conv4"}, (28, 28, 1))
  assert models.parameter_count(model) == 111_936
  # Running mean and variance per BatchNorm channel are state, not parameters: 4 blocks * 2 * 64.
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == 512


def test_koch_rejects_images_below_its_minimum_size():
  with pytest.raises(UserError, match="at least 65x65"):
    make({"name": "koch"}, (28, 28, 1))


@pytest.mark.parametrize("name", sorted(TINY))
def test_l2_normalize_gives_unit_norms(name):
  model, image_shape = tiny(name, l2_normalize=True)
  embeddings, aux = forward(model, augment.to_float(random_images((4,) + image_shape)))
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(aux["embedding_norm"], 1.0)  # aux keeps the length before normalisation


# ----------------------------------------------------------------------------------------------------
# Config errors


def test_unknown_model_name_lists_the_valid_ones():
  with pytest.raises(UserError, match=r"model.name='vgg'.*\['conv4', 'efficientnet_lite0', 'koch', 'resnet', 'resnet18'"):
    make({"name": "vgg"}, (28, 28, 1))
  with pytest.raises(UserError, match="model.name is missing"):
    make({"width": 3}, (28, 28, 1))


def test_unknown_field_lists_the_valid_ones():
  with pytest.raises(UserError,
                     match=r"\['depth'\].*valid fields are \['batch_norm_momentum', 'dropout', 'embedding_dim'"):
    make({"name": "conv4", "depth": 4}, (28, 28, 1))
  with pytest.raises(UserError, match="model.embedding_dim"):
    make({"name": "resnet", "embedding_dim": 0}, (28, 28, 1))


def test_default_configs_carry_the_documented_fields():
  assert set(models.default_config("koch")) == {"name", "embedding_dim", "l2_normalize", "dropout"}
  assert set(models.default_config("conv4")) == {"name", "width", "embedding_dim", "l2_normalize",
                                                 "batch_norm_momentum", "pair_head", "dropout"}
  assert set(models.default_config("resnet")) == {"name", "widths", "blocks_per_stage", "embedding_dim",
                                                  "l2_normalize", "batch_norm_momentum", "pair_head", "dropout"}


# ----------------------------------------------------------------------------------------------------
# BatchNorm modes


def test_models_are_created_in_eval_mode_and_need_the_data_axis_to_train():
  model, image_shape = tiny("conv4")
  images = augment.to_float(random_images((4,) + image_shape))
  before = nnx.state(model, nnx.BatchStat)
  model(images)  # eval mode: no axis bound, no error, statistics untouched
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)
  model.train()
  with pytest.raises(NameError, match="unbound axis name: data"):
    model(images)


def test_train_mode_under_vmap_with_the_data_axis():
  model, image_shape = tiny("resnet")
  graphdef, state = nnx.split(model)

  def forward(state, images):
    model = nnx.merge(graphdef, state, copy=True)
    model.train()
    embeddings, _ = model(images)
    return embeddings, nnx.state(model, nnx.BatchStat)

  images = augment.to_float(random_images((2, 3) + image_shape))  # 2 "devices" of 3 images
  embeddings, stats = jax.vmap(forward, in_axes=(None, 0), axis_name="data")(state, images)
  assert embeddings.shape == (2, 3, 6)
  # Statistics were averaged over the axis, so both "devices" hold the same running averages.
  for leaf in jax.tree.leaves(stats):
    np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6)


def data_mesh(num_devices: int) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def sgd_step(graphdef, params, rest, images, learning_rate: float = 0.1):
  """The train step's functional pattern, per device: merge a copy, train mode, grad, read BatchStat."""

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.train()
    embeddings, _ = model(images)
    # Any differentiable function of the embeddings will do; this one pulls them towards 0.5.
    loss = jnp.mean((embeddings - 0.5) ** 2)
    if models.has_pair_head(model):  # Koch's head only gets a gradient through pair logits
      loss += jnp.mean(model.pair_logits(embeddings[0::2], embeddings[1::2]) ** 2)
    return loss, nnx.state(model, nnx.Not(nnx.Param))

  (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # check_vma=False (as in parallel.py): per-device gradients, averaged here like the real step.
  grads = jax.lax.pmean(grads, "data")
  new_params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
  return new_params, new_rest, jax.lax.pmean(loss, "data")


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_sgd_step_through_merge_under_shard_map(name):
  model, image_shape = tiny(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step = jax.jit(jax.shard_map(
    functools.partial(sgd_step, graphdef), mesh=data_mesh(4), in_specs=(P(), P(), P("data")),
    out_specs=(P(), P(), P()), check_vma=False,
  ))
  images = augment.to_float(random_images((8,) + image_shape))
  new_params, new_rest, loss = step(params, rest, images)
  assert np.isfinite(loss)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new_params))
  assert all(changed), "every parameter should receive a gradient"
  stats_before = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  stats_after = jax.tree.leaves(new_rest.filter(nnx.BatchStat))
  assert len(stats_after) == len(stats_before)
  assert (len(stats_after) == 0) == (name == "koch")  # Koch's network has no BatchNorm
  for before, after in zip(stats_before, stats_after):
    assert np.all(np.isfinite(after)) and np.any(before != after)
  # The updated state merges back into a working model.
  embeddings = models.make_embed_fn(graphdef)((new_params, new_rest), random_images((2,) + image_shape))
  assert np.all(np.isfinite(embeddings))


def test_batch_statistics_on_4_devices_equal_one_device_on_the_whole_batch():
  # axis_name="data" makes BatchNorm average over devices: 4 shards of 2 images must update the running
  # statistics exactly as 1 device with all 8 images would (equal shard sizes, so the means agree).
  model, image_shape = tiny("conv4")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = augment.to_float(random_images((8,) + image_shape))
  results = []
  for num_devices in (4, 1):
    step = jax.jit(jax.shard_map(
      functools.partial(sgd_step, graphdef), mesh=data_mesh(num_devices), in_specs=(P(), P(), P("data")),
      out_specs=(P(), P(), P()), check_vma=False,
    ))
    results.append(step(params, rest, images))
  (params4, rest4, loss4), (params1, rest1, loss1) = results
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), rest4, rest1)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-6), params4, params1)


# ----------------------------------------------------------------------------------------------------
# embed_fn and pair_logits_fn


@pytest.mark.parametrize("name", sorted(TINY))
def test_embed_fn_is_jittable_deterministic_and_matches_eval_mode(name):
  model, image_shape = tiny(name)
  graphdef, state = nnx.split(model)
  embed_fn = jax.jit(models.make_embed_fn(graphdef))
  images = random_images((5,) + image_shape)
  first = embed_fn(state, images)
  np.testing.assert_array_equal(first, embed_fn(state, images))
  assert first.shape[0] == 5 and first.dtype == jnp.float32
  expected, _ = forward(model, augment.to_float(images))  # the model object is in eval mode
  np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
  # The (params, rest) split of the train state works the same.
  split_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  np.testing.assert_allclose(jax.jit(models.make_embed_fn(split_graphdef))((params, rest), images), first,
                             rtol=1e-6)


def test_embed_fn_ignores_batch_composition():
  # Eval mode: one image's embedding does not depend on the others in the batch (no batch statistics).
  model, image_shape = tiny("conv4")
  graphdef, state = nnx.split(model)
  embed_fn = jax.jit(models.make_embed_fn(graphdef))
  images = random_images((6,) + image_shape)
  np.testing.assert_allclose(embed_fn(state, images)[:2], embed_fn(state, images[:2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_pair_logits_are_a_weighted_l1_distance(name):
  # koch always has the head; conv4 and resnet get it with model.pair_head=True.
  config, _ = TINY[name]
  model = make(config if name == "koch" else dict(config, pair_head=True), TINY[name][1])
  assert models.has_pair_head(model)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  embeddings, _ = forward(model, augment.to_float(random_images((6,) + TINY[name][1])))
  dim = embeddings.shape[-1]  # the head reads the model's own embedding
  e1, e2 = rng.random((3, dim), np.float32), rng.random((3, dim), np.float32)
  logits = jax.jit(models.make_pair_logits_fn(graphdef))(state, e1, e2)
  weights = np.asarray(model.head.kernel[...])[:, 0]
  bias = float(model.head.bias[...][0])
  np.testing.assert_allclose(logits, np.abs(e1 - e2) @ weights + bias, rtol=1e-5)
  assert logits.shape == (3,)


def test_pair_logits_fn_needs_a_pair_head():
  model, image_shape = tiny("conv4")
  assert not models.has_pair_head(model)
  graphdef, state = nnx.split(model)
  with pytest.raises(UserError, match="no pair head.*koch.*pair_head=True"):
    models.make_pair_logits_fn(graphdef)(state, np.zeros((1, 64)), np.zeros((1, 64)))


def shifted_by_hand(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Content moved down dy and right dx (negative: up / left), zeros filling in."""
  out = np.zeros_like(images)
  height, width = images.shape[1:3]
  out[:, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
      images[:, max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
  return out


def test_shifted_views_move_one_ink_pixel_by_whole_pixels():
  image = np.zeros((1, 7, 7, 1), np.float32)
  image[0, 3, 2, 0] = 1.0
  views = np.asarray(augment.shifted_views(jnp.asarray(image), 2))
  assert views.shape == (5, 1, 7, 7, 1)
  where = [tuple(np.argwhere(view[0, ..., 0])[0]) for view in views]
  # Itself, right, left (the ink at x=2 reaches x=0), down, up.
  assert where == [(3, 2), (3, 4), (3, 0), (5, 2), (1, 2)]
  assert np.all(views.sum(axis=(1, 2, 3, 4)) == 1.0)
  with pytest.raises(UserError, match="tta_shift_px=7"):
    augment.shifted_views(jnp.asarray(image), 7)


def test_embed_fn_with_tta_averages_the_five_shifted_embeddings():
  model, image_shape = tiny("conv4")
  graphdef, state = nnx.split(model)
  plain = jax.jit(models.make_embed_fn(graphdef))
  images = random_images((3,) + image_shape)
  expected = np.mean([plain(state, shifted_by_hand(images, dy, dx))
                      for dy, dx in ((0, 0), (0, 2), (0, -2), (2, 0), (-2, 0))], axis=0)
  averaged = jax.jit(models.make_embed_fn(graphdef, tta_shift_px=2))(state, images)
  np.testing.assert_allclose(averaged, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(averaged, plain(state, images), atol=1e-3)  # the views do change the embedding


# ----------------------------------------------------------------------------------------------------
# Dropout (model.dropout): explicit keys, one per image


def row_keys(count: int, seed: int = 0) -> jax.Array:
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(count))


def test_dropout_zeroes_and_rescales_features_row_by_row():
  features = jnp.ones((64, 50), jnp.float32)
  dropped = np.asarray(models._dropout(features, 0.25, row_keys(64)))
  # Inverted dropout: a kept feature is 1 / (1 - 0.25), a dropped one 0; about a quarter are dropped
  # (3,200 Bernoulli(0.25) draws: standard deviation 0.0077, so 0.2-0.3 is over 6 of them).
  assert set(np.unique(dropped).tolist()) == {0.0, np.float32(1 / 0.75)}
  assert 0.2 < np.mean(dropped == 0) < 0.3
  # Row i's mask comes from keys[i] alone: the rows of any batch that holds it, in any order, match.
  order = np.random.default_rng(0).permutation(64)[:16]
  alone = np.asarray(models._dropout(features[order], 0.25, row_keys(64)[order]))
  np.testing.assert_array_equal(alone, dropped[order])
  # No keys (eval) or rate 0: the input itself.
  assert models._dropout(features, 0.25, None) is features
  assert models._dropout(features, 0.0, row_keys(64)) is features


def test_dropout_acts_on_the_dense_layer_input_only_with_keys():
  # conv4 (the cheapest to compile); koch and resnet apply the same `_dropout` to their dense layer's input.
  config, image_shape = TINY["conv4"]
  config = dict(config, embedding_dim=6)
  plain = make(config, image_shape)
  dropping = make(dict(config, dropout=0.5), image_shape)
  # The rate adds no parameters and draws nothing at creation: the same seed gives the same weights.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(dropping, nnx.Param), nnx.state(plain, nnx.Param))
  images = random_images((3,) + image_shape)
  call = nnx.jit(lambda model, images, keys: model(images, dropout_keys=keys)[0])
  without = np.asarray(forward(plain, images)[0])
  # Without keys (embed_fn: evaluation, export) the dropout model is the plain one, bit for bit; and the
  # plain model (rate 0) ignores keys.
  graphdef, state = nnx.split(dropping)
  np.testing.assert_array_equal(np.asarray(models.make_embed_fn(graphdef)(state, images)), without)
  np.testing.assert_array_equal(np.asarray(call(plain, images, row_keys(3))), without)
  # With keys, every image's embedding changes, each by its own key: the rows in another order, with their
  # keys, give the same rows (up to the convolution's batch-dependent rounding).
  dropped = np.asarray(call(dropping, images, row_keys(3)))
  assert all(np.abs(d - w).max() > 1e-3 for d, w in zip(dropped, without))
  np.testing.assert_allclose(np.asarray(call(dropping, images[::-1], row_keys(3)[::-1])), dropped[::-1],
                             rtol=1e-5, atol=1e-6)


def test_dropout_config_mistakes_are_user_errors():
  with pytest.raises(UserError, match=r"model.dropout: expected a rate in \[0, 1\), got 1.0"):
    make({"name": "resnet", "widths": (4,), "blocks_per_stage": 1, "dropout": 1.0}, (28, 28, 1))
  with pytest.raises(UserError, match="model.dropout=0.3 .* model.name='conv4' has only with model.embedding_dim > 0"):
    make({"name": "conv4", "width": 8, "dropout": 0.3}, (28, 28, 1))
