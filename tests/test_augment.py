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


# --------------------------------------------------------------------------------------------------
# Keras ImageDataGenerator's horizontal flip and fill_mode="nearest"


def test_flip_probability_one_mirrors_and_zero_changes_nothing():
  images = random_uint8((5, 9, 11, 1))
  # Without a warp (probability 0), a sure flip is the mirror image: column x from column W-1-x.
  flipped = np.asarray(augment.random_affine(jax.random.key(0), images, probability=0.0, flip_probability=1.0))
  np.testing.assert_array_equal(flipped, augment.to_float(images)[:, :, ::-1])
  # With a warp, the same key draws the same warp, and the flip mirrors its result (after it, as Keras).
  warped = augment.random_affine(jax.random.key(1), images, probability=1.0)
  both = augment.random_affine(jax.random.key(1), images, probability=1.0, flip_probability=1.0)
  np.testing.assert_array_equal(np.asarray(both), np.asarray(warped)[:, :, ::-1])
  # Probability 0.5 mirrors some images of a batch and leaves the others exactly as the warp left them.
  many = random_uint8((64, 6, 7, 1))
  half = np.asarray(augment.random_affine(jax.random.key(2), many, probability=0.0, flip_probability=0.5))
  mirrored = [np.array_equal(h, m[:, ::-1]) for h, m in zip(half, np.asarray(augment.to_float(many)))]
  kept = [np.array_equal(h, m) for h, m in zip(half, np.asarray(augment.to_float(many)))]
  assert all(a != b for a, b in zip(mirrored, kept))  # every image is one or the other
  assert 16 <= sum(mirrored) <= 48  # 64 draws of Bernoulli(0.5): 4 standard deviations either side


def test_default_flip_and_fill_are_the_distortions_of_before():
  # The defaults (flip 0, zero fill) draw and warp exactly as the warp alone: the same parameters from the
  # same key and the zero-filled gather, bit for bit; a config saved before the fields existed reads the same.
  images = random_uint8((6, 12, 12, 1))
  key = jax.random.key(5)
  params = augment.sample_affine_params(key, 6, probability=0.5)
  expected = np.asarray(augment.apply_affine(images, **params))
  np.testing.assert_array_equal(np.asarray(augment.random_affine(key, images)), expected)
  config = augment.default_config()
  old = ml_collections.ConfigDict({name: value for name, value in config.items()
                                   if name not in ("flip_probability", "fill")})
  np.testing.assert_array_equal(np.asarray(augment.distortion(old)(key, images)), expected)
  np.testing.assert_array_equal(np.asarray(augment.distortion(config)(key, images)), expected)


def test_nearest_fill_repeats_the_edge_pixel():
  images = random_uint8((2, 8, 10, 1))
  base = np.asarray(augment.to_float(images))
  # An integer shift right by 3: columns 0..2 read columns -3..-1, outside the image, which "nearest" reads as
  # column 0 (its edge pixel, row by row) and "zero" as 0; the rest is the shifted image either way.
  nearest = np.asarray(augment.apply_affine(images, translate_x=3.0, fill="nearest"))
  zero = np.asarray(augment.apply_affine(images, translate_x=3.0))
  np.testing.assert_array_equal(nearest[:, :, :3], np.repeat(base[:, :, :1], 3, axis=2))
  np.testing.assert_array_equal(zero[:, :, :3], 0.0)
  np.testing.assert_array_equal(nearest[:, :, 3:], base[:, :, :-3])
  np.testing.assert_array_equal(zero[:, :, 3:], base[:, :, :-3])
  # Up by 2 and left by 1.5 (a fractional shift): the bottom rows read past the last row, so they repeat the
  # last row's values, interpolated along x like every other row; the right-most column repeats column W-1.
  moved = np.asarray(augment.apply_affine(images, translate_y=-2.0, translate_x=-1.5, fill="nearest"))
  last_row = np.asarray(augment.apply_affine(base[:, -1:], translate_x=-1.5, fill="nearest"))
  np.testing.assert_allclose(moved[:, -2:], np.repeat(last_row, 2, axis=1), atol=1e-6)
  np.testing.assert_allclose(moved[:, :, -1], np.concatenate([base[:, 2:, -1], np.repeat(base[:, -1:, -1], 2, axis=1)],
                                                             axis=1), atol=1e-6)
  # Inside the image both fills agree: a warp that reads nothing outside is unchanged.
  np.testing.assert_array_equal(np.asarray(augment.apply_affine(images, fill="nearest")), base)


def test_nearest_fill_equals_scipy_nearest_mode_under_a_general_warp():
  # Keras's ImageDataGenerator warps with scipy.ndimage.affine_transform(order=1, mode="nearest"): the same
  # map, written as scipy's (row, column) matrix, gives the same pixels up to float32 rounding.
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  image = random_uint8((1, 15, 13, 1), seed=3)
  params = dict(rotation_deg=20.0, shear_x=0.1, scale_x=0.8, scale_y=1.1, translate_x=1.0, translate_y=-2.0)
  ours = np.asarray(augment.apply_affine(image, fill="nearest", **params))[0, :, :, 0]
  theta = np.deg2rad(params["rotation_deg"])
  forward = (np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
             @ np.array([[1.0, params["shear_x"]], [0.0, 1.0]]) @ np.diag([params["scale_x"], params["scale_y"]]))
  inverse_xy = np.linalg.inv(forward)
  swap = np.array([[0, 1], [1, 0]])
  inverse_rc = swap @ inverse_xy @ swap  # (x, y) -> (row, column)
  centre = np.array([(15 - 1) / 2, (13 - 1) / 2])
  shift = np.array([params["translate_y"], params["translate_x"]])
  offset = centre - inverse_rc @ (centre + shift)  # input = inverse (out - centre - t) + centre
  reference = scipy_ndimage.affine_transform(image[0, :, :, 0].astype(np.float64) / 255.0, inverse_rc,
                                             offset=offset, order=1, mode="nearest")
  np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_bad_flip_and_fill_values_are_user_errors():
  images = random_uint8((1, 1, 8, 8, 1))
  with pytest.raises(UserError, match=r"augment.flip_probability: expected a value in \[0, 1\], got 1.5"):
    augment.augment_batch(jax.random.key(0), images, flip_probability=1.5)
  with pytest.raises(UserError, match="augment.fill='reflect': expected one of"):
    augment.augment_batch(jax.random.key(0), images, fill="reflect")
