"""Image normalisation and Koch et al. (2015) affine distortions, as jnp code for the jitted step.

Images travel from the loader as uint8 and are only turned into floats on the device, so the
host ships a quarter of the bytes. Everything here is pure `jnp`, vectorised over the batch (one
batched gather, no Python loop over examples), and traceable under `jit`, `vmap` and `shard_map`.

Geometry conventions (needed to read the tests):
  * coordinates are (x, y) = (column, row) of pixel centres; the image centre is ((W-1)/2, (H-1)/2),
    so a 90 degree rotation maps pixel centres onto pixel centres exactly;
  * the forward map is out = A (in - centre) + centre + t with A = R(theta) @ Shear(rho) @ Scale(s),
    R(theta) = [[cos, -sin], [sin, cos]], Shear = [[1, rho_x], [rho_y, 1]], Scale = diag(s_x, s_y);
    rows grow downwards, so a positive theta turns the picture clockwise on screen;
  * each output pixel is read from the input at A^-1 (out - centre - t) + centre with bilinear
    interpolation; samples outside the image read 0, which is background (Omniglot ink = 255).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from siamese_jax.errors import UserError

# The names `random_affine` accepts, which are also the fields of `default_config()` besides `enabled`.
AFFINE_FIELDS = ("probability", "rotation_deg", "shear", "scale_min", "scale_max", "translate_px")


def default_config() -> ml_collections.ConfigDict:
  """Koch et al. (2015) distortion ranges; `config.augment` in the configs."""
  config = ml_collections.ConfigDict()
  config.enabled = True  # False: images are only converted to float (to_float), no distortion
  config.probability = 0.5  # chance that each of the 7 components (theta, rho_x/y, s_x/y, t_x/y) is applied
  config.rotation_deg = 10.0  # theta ~ U[-rotation_deg, rotation_deg] degrees
  config.shear = 0.3  # rho_x, rho_y ~ U[-shear, shear] (independently)
  config.scale_min = 0.8  # s_x, s_y ~ U[scale_min, scale_max] (independently)
  config.scale_max = 1.2  # upper end of the scale range
  config.translate_px = 2.0  # t_x, t_y ~ U[-translate_px, translate_px] pixels (continuous)
  return config


def to_float(images: jax.Array) -> jax.Array:
  """The one normalisation used by training, evaluation and export: uint8 [0, 255] -> float32 [0, 1].

  Floating inputs are taken to be in [0, 1] already (the output of this function, or of
  `random_affine`) and are only cast, so calling it twice is harmless. Booleans map to 0/1.
  """
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    # XLA rewrites x / 255 as x * (1 / 255) anyway; spelling it out keeps numpy references honest
    # (this can differ from numpy's x / 255 by one ulp).
    return images.astype(jnp.float32) * (1.0 / 255.0)
  if images.dtype == jnp.bool_ or jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(jnp.float32)
  raise UserError(
    f"images: expected dtype uint8 (0..255) or a float dtype in [0, 1], got {images.dtype}; "
    "the data pipeline should deliver uint8"
  )


def shifted_views(images: jax.Array, shift_px: int) -> jax.Array:
  """[N, H, W, C] -> [5, N, H, W, C]: the images and their copies moved by `shift_px` whole pixels
  right, left, down and up, background (0) filling the uncovered border (test-time augmentation)."""
  s = int(shift_px)
  if s < 0 or s >= min(images.shape[1], images.shape[2]):
    raise UserError(f"eval.tta_shift_px={shift_px}: expected 0 <= shift < image side {images.shape[1]}")
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  height, width = images.shape[1], images.shape[2]
  # Window (dy, dx) of the padded image: content moved by (s - dy, s - dx).
  return jnp.stack([padded[:, dy:dy + height, dx:dx + width]
                    for dy, dx in ((s, s), (s, 0), (s, 2 * s), (0, s), (2 * s, s))])


def _check_ranges(
  probability: Any, rotation_deg: Any, shear: Any, scale_min: Any, scale_max: Any, translate_px: Any
) -> None:
  """Rejects impossible ranges early; traced values (already inside jit) cannot be checked."""

  def concrete(value: Any) -> bool:
    return isinstance(value, numbers.Real)

  if concrete(probability) and not 0.0 <= probability <= 1.0:
    raise UserError(f"augment.probability: expected a value in [0, 1], got {probability}")
  for name, value in (("rotation_deg", rotation_deg), ("shear", shear), ("translate_px", translate_px)):
    if concrete(value) and value < 0:
      raise UserError(f"augment.{name}: expected a half-range >= 0, got {value}")
  if concrete(shear) and shear >= 1.0:
    # |rho_x * rho_y| < 1 keeps the shear matrix invertible.
    raise UserError(f"augment.shear: expected a value in [0, 1), got {shear}")
  if concrete(scale_min) and scale_min <= 0:
    raise UserError(f"augment.scale_min: expected a value > 0, got {scale_min}")
  if concrete(scale_min) and concrete(scale_max) and scale_max < scale_min:
    raise UserError(f"augment.scale_max ({scale_max}) must be >= augment.scale_min ({scale_min})")


def sample_affine_params(
  key: jax.Array,
  num_images: int,
  *,
  probability: float = 0.5,
  rotation_deg: float = 10.0,
  shear: float = 0.3,
  scale_min: float = 0.8,
  scale_max: float = 1.2,
  translate_px: float = 2.0,
) -> dict[str, jax.Array]:
  """Draws one distortion per image: a dict of float32 [num_images] arrays for `apply_affine`.

  Each of the 7 scalar components is kept with probability `probability`, independently, and is
  otherwise the identity value (0 for angles/shears/shifts, 1 for scales), exactly as in Koch et al.
  """
  _check_ranges(probability, rotation_deg, shear, scale_min, scale_max, translate_px)
  value_key, keep_key = jax.random.split(key)
  shape = (7, num_images)
  uniform = jax.random.uniform(value_key, shape, jnp.float32)  # [0, 1)
  keep = jax.random.bernoulli(keep_key, probability, shape)

  def symmetric(u: jax.Array, half_range: float) -> jax.Array:
    return (2.0 * u - 1.0) * half_range

  drawn = {
    "rotation_deg": symmetric(uniform[0], rotation_deg),
    "shear_x": symmetric(uniform[1], shear),
    "shear_y": symmetric(uniform[2], shear),
    "scale_x": scale_min + uniform[3] * (scale_max - scale_min),
    "scale_y": scale_min + uniform[4] * (scale_max - scale_min),
    "translate_x": symmetric(uniform[5], translate_px),
    "translate_y": symmetric(uniform[6], translate_px),
  }
  identity = {"scale_x": 1.0, "scale_y": 1.0}
  return {
    name: jnp.where(keep[row], value, identity.get(name, 0.0)).astype(jnp.float32)
    for row, (name, value) in enumerate(drawn.items())
  }


def _bilinear_zero_padded(image: jax.Array, ys: jax.Array, xs: jax.Array) -> jax.Array:
  """Samples image [H, W, C] at real coordinates ys, xs [H', W']; outside the image reads 0."""
  height, width = image.shape[0], image.shape[1]
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  wy = (ys - y0)[..., None]
  wx = (xs - x0)[..., None]
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)

  def tap(yi: jax.Array, xi: jax.Array) -> jax.Array:
    inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
    # Clipped indices keep the gather in bounds; the mask then zeroes what was really outside.
    values = image[jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1)]
    return jnp.where(inside[..., None], values, 0.0)

  return (
    tap(y0, x0) * (1 - wy) * (1 - wx)
    + tap(y0, x0 + 1) * (1 - wy) * wx
    + tap(y0 + 1, x0) * wy * (1 - wx)
    + tap(y0 + 1, x0 + 1) * wy * wx
  )


def apply_affine(
  images: jax.Array,
  *,
  rotation_deg: jax.Array | float = 0.0,
  shear_x: jax.Array | float = 0.0,
  shear_y: jax.Array | float = 0.0,
  scale_x: jax.Array | float = 1.0,
  scale_y: jax.Array | float = 1.0,
  translate_x: jax.Array | float = 0.0,
  translate_y: jax.Array | float = 0.0,
) -> jax.Array:
  """Warps images [N, H, W, C] (uint8 or float in [0, 1]) by given per-image parameters.

  Every parameter is a scalar or an [N] array (the output of `sample_affine_params`). Returns
  float32 [N, H, W, C] in [0, 1]. See the module docstring for the geometry.
  """
  images = to_float(images)
  if images.ndim != 4:
    raise UserError(f"images: expected shape [N, H, W, C], got {images.shape}")
  num_images, height, width, _ = images.shape

  def per_image(value: jax.Array | float) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (num_images,))

  theta = jnp.deg2rad(per_image(rotation_deg))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rho_x, rho_y = per_image(shear_x), per_image(shear_y)
  s_x, s_y = per_image(scale_x), per_image(scale_y)
  # A = R @ Shear @ Scale, written out per entry so it stays elementwise over the batch.
  a00 = (cos - sin * rho_y) * s_x
  a01 = (cos * rho_x - sin) * s_y
  a10 = (sin + cos * rho_y) * s_x
  a11 = (sin * rho_x + cos) * s_y
  determinant = a00 * a11 - a01 * a10
  # Inverse of a 2x2 matrix; the identity stays exactly the identity, so integer shifts are exact.
  i00, i01 = a11 / determinant, -a01 / determinant
  i10, i11 = -a10 / determinant, a00 / determinant

  centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :]

  def source_coordinates(i00, i01, i10, i11, t_x, t_y):
    dx = cols - centre_x - t_x  # [1, W]
    dy = rows - centre_y - t_y  # [H, 1]
    return i10 * dx + i11 * dy + centre_y, i00 * dx + i01 * dy + centre_x  # ys, xs: [H, W]

  ys, xs = jax.vmap(source_coordinates)(i00, i01, i10, i11, per_image(translate_x), per_image(translate_y))
  warped = jax.vmap(_bilinear_zero_padded)(images, ys, xs)
  # Weights are convex, so this only removes float rounding at 0 and 1.
  return jnp.clip(warped, 0.0, 1.0)


def random_affine(
  key: jax.Array,
  images: jax.Array,
  *,
  probability: float = 0.5,
  rotation_deg: float = 10.0,
  shear: float = 0.3,
  scale_min: float = 0.8,
  scale_max: float = 1.2,
  translate_px: float = 2.0,
) -> jax.Array:
  """Koch et al. (2015) distortions: an independent random affine map per image.

  images: [N, H, W, C] uint8 or float in [0, 1]. Returns float32 [N, H, W, C] in [0, 1].
  With probability 0 the result is exactly `to_float(images)`.
  """
  images = to_float(images)
  ranges = dict(
    rotation_deg=rotation_deg, shear=shear, scale_min=scale_min, scale_max=scale_max, translate_px=translate_px
  )
  _check_ranges(probability, **ranges)
  if isinstance(probability, numbers.Real) and probability == 0:
    # Every component would be the identity; skip the gather (the result is the same).
    return images
  params = sample_affine_params(key, images.shape[0], probability=probability, **ranges)
  return apply_affine(images, **params)


def _options_from(config: Mapping[str, Any] | ml_collections.ConfigDict | None, overrides: dict) -> dict:
  """Merges the config and keyword overrides over the defaults, rejecting unknown fields."""
  options = default_config().to_dict()
  given = dict(config.items()) if config is not None else {}
  given.update(overrides)
  unknown = sorted(set(given) - set(options))
  if unknown:
    raise UserError(f"augment: unknown field(s) {unknown}; valid fields are {sorted(options)}")
  options.update(given)
  return options


def augment_batch(
  key: jax.Array,
  images: jax.Array,
  config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
  **overrides: Any,
) -> jax.Array:
  """Distorts every image of a batch [B, k, H, W, C] independently (each branch of a pair too).

  `config` is `default_config()`-shaped (e.g. `config.augment`); keyword arguments override it.
  When `enabled` is False this is just `to_float`. Returns float32 [B, k, H, W, C] in [0, 1].
  """
  options = _options_from(config, overrides)
  images = to_float(images)
  if images.ndim != 5:
    raise UserError(f"images: expected a batch of shape [B, k, H, W, C], got {images.shape}")
  if not options["enabled"]:
    return images
  flat = images.reshape((-1,) + images.shape[2:])
  distorted = random_affine(key, flat, **{name: options[name] for name in AFFINE_FIELDS})
  return distorted.reshape(images.shape)


__all__ = [
  "AFFINE_FIELDS",
  "apply_affine",
  "augment_batch",
  "default_config",
  "random_affine",
  "sample_affine_params",
  "to_float",
]
