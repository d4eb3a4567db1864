"""Checks of the affine distortions against geometry worked out by hand (numpy, not jnp)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siamese_jax import augment
from siamese_jax.errors import UserError


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def shift_with_zero_fill(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """np.roll, then blank what wrapped around: the reference for an integer translation."""
  shifted = np.roll(image, (dy, dx), axis=(0, 1))
  if dy > 0:
    shifted[:dy] = 0
  elif dy < 0:
    shifted[dy:] = 0
  if dx > 0:
    shifted[:, :dx] = 0
  elif dx < 0:
    shifted[:, dx:] = 0
  return shifted


def test_to_float_maps_uint8_to_unit_interval_and_is_idempotent():
  images = np.array([0, 51, 255], np.uint8)
  as_float = augment.to_float(images)
  assert as_float.dtype == jnp.float32
  np.testing.assert_allclose(as_float, [0.0, 0.2, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(augment.to_float(as_float), as_float)
  with pytest.raises(UserError, match="uint8"):
    augment.to_float(np.zeros(3, np.int32))


def test_probability_zero_is_exactly_to_float():
  images = random_uint8((5, 12, 10, 1))
  out = augment.random_affine(jax.random.key(0), images, probability=0.0)
  np.testing.assert_array_equal(out, augment.to_float(images))


def test_identity_parameters_reproduce_the_input_exactly():
  # Probability 1 with degenerate ranges goes through the full gather path with identity maps.
  images = random_uint8((3, 9, 11, 2))
  out = augment.random_affine(
    jax.random.key(1), images, probability=1.0, rotation_deg=0.0, shear=0.0, scale_min=1.0, scale_max=1.0,
    translate_px=0.0,
  )
  np.testing.assert_array_equal(out, augment.to_float(images))


@pytest.mark.parametrize("dx, dy", [(3, -2), (-1, 4), (0, 0)])
def test_integer_translation_shifts_exactly(dx, dy):
  images = random_uint8((2, 13, 10, 1))
  out = augment.apply_affine(images, translate_x=float(dx), translate_y=float(dy))
  for image, result in zip(np.asarray(augment.to_float(images)), np.asarray(out)):
    expected = shift_with_zero_fill(image, dy, dx)
    np.testing.assert_array_equal(result, expected)


def test_rotation_by_90_degrees_is_a_clockwise_quarter_turn():
  # Rows grow downwards, so R(+90) sends "right of centre" to "below centre": np.rot90(k=-1).
  # Pixel centres map onto pixel centres, so only cos(90 deg) ~ 4e-8 float error remains.
  images = random_uint8((2, 8, 8, 3))
  out = np.asarray(augment.apply_affine(images, rotation_deg=90.0))
  for image, result in zip(images, out):
    np.testing.assert_allclose(result, np.rot90(image, k=-1).astype(np.float32) / 255.0, atol=1e-5)


def test_general_affine_moves_a_blob_where_the_forward_map_says():
  # A smooth blob's centre of mass follows out = R @ Shear @ Scale @ (p - c) + c + t, computed here in numpy.
  size, sigma = 41, 1.5
  centre = (size - 1) / 2
  blob_x, blob_y = centre + 6.0, centre - 4.0
  rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
  blob = np.exp(-((cols - blob_x) ** 2 + (rows - blob_y) ** 2) / (2 * sigma**2))[None, :, :, None]
  params = dict(rotation_deg=25.0, shear_x=0.2, shear_y=-0.1, scale_x=1.1, scale_y=0.9, translate_x=1.5,
                translate_y=-0.5)
  out = np.asarray(augment.apply_affine(blob.astype(np.float32), **params))[0, :, :, 0]

  theta = np.deg2rad(params["rotation_deg"])
  rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  shear = np.array([[1.0, params["shear_x"]], [params["shear_y"], 1.0]])
  scale = np.diag([params["scale_x"], params["scale_y"]])
  expected = rotation @ shear @ scale @ np.array([blob_x - centre, blob_y - centre]) + centre
  expected += [params["translate_x"], params["translate_y"]]
  centroid = np.array([(out * cols).sum(), (out * rows).sum()]) / out.sum()
  np.testing.assert_allclose(centroid, expected, atol=0.05)


def test_same_key_same_output_different_key_different_output():
  images = random_uint8((4, 16, 16, 1))
  first = augment.random_affine(jax.random.key(7), images, probability=1.0)
  again = augment.random_affine(jax.random.key(7), images, probability=1.0)
  other = augment.random_affine(jax.random.key(8), images, probability=1.0)
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)


def test_output_is_float32_in_unit_interval_and_jittable():
  images = np.full((6, 20, 20, 1), 255, np.uint8)  # all ink: interpolation must not overshoot 1
  jitted = jax.jit(lambda key, x: augment.random_affine(key, x, probability=1.0, scale_min=0.5, scale_max=1.5))
  out = np.asarray(jitted(jax.random.key(3), images))
  assert out.dtype == np.float32 and out.shape == images.shape
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert out.min() == 0.0  # shrinking or shifting pulls in zero (background) from outside


def test_sampled_parameters_respect_ranges_and_probability():
  params = augment.sample_affine_params(jax.random.key(0), 4000, probability=0.5)
  assert np.abs(params["rotation_deg"]).max() <= 10.0
  assert np.abs(params["shear_x"]).max() <= 0.3
  assert 0.8 <= params["scale_y"].min() and params["scale_y"].max() <= 1.2
  assert np.abs(params["translate_x"]).max() <= 2.0
  kept = np.mean(np.asarray(params["rotation_deg"]) != 0.0)
  assert 0.45 < kept < 0.55  # 4000 Bernoulli(0.5) draws: standard deviation 0.008


def test_augment_batch_distorts_each_branch_independently():
  pair = random_uint8((1, 1, 16, 16, 1))
  batch = np.repeat(pair, 2, axis=1)  # the same image in both branches
  config = augment.default_config()
  config.probability = 1.0
  out = np.asarray(jax.jit(lambda key, x: augment.augment_batch(key, x, config))(jax.random.key(0), batch))
  assert out.shape == batch.shape and out.dtype == np.float32
  assert not np.allclose(out[0, 0], out[0, 1])


def test_augment_batch_disabled_is_to_float_and_rejects_unknown_fields():
  batch = random_uint8((2, 3, 8, 8, 1))
  out = augment.augment_batch(jax.random.key(0), batch, enabled=False)
  np.testing.assert_array_equal(out, augment.to_float(batch))
  with pytest.raises(UserError, match="rotation_degrees.*valid fields.*rotation_deg"):
    augment.augment_batch(jax.random.key(0), batch, ml_collections.ConfigDict({"rotation_degrees": 5.0}))
  with pytest.raises(UserError, match="probability"):
    augment.augment_batch(jax.random.key(0), batch, probability=1.5)
