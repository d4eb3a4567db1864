"""Image normalisation and the on-device augmentations of the jitted step, as jnp code.

Images travel from the loader as uint8 and are only turned into floats on the device, so the
host ships a quarter of the bytes. Everything here is pure `jnp`, vectorised over the batch (one
batched gather, no Python loop over examples), and traceable under `jit`, `vmap` and `shard_map`.
Two kinds, chosen by `config.augment.kind`:

* "affine": Koch et al. (2015) distortions for drawings (rotation, shear, scale, shift), zero fill; as
  options, Keras ImageDataGenerator's horizontal flip and fill_mode="nearest";
* "photo": what photographs get in torchvision-style training: a random resized crop, a horizontal
  flip and colour jitter (`photo_augment_image`, built on dm_pix).

Affine geometry conventions (needed to read the tests):
  * coordinates are (x, y) = (column, row) of pixel centres; the image centre is ((W-1)/2, (H-1)/2),
    so a 90 degree rotation maps pixel centres onto pixel centres exactly;
  * the forward map is out = A (in - centre) + centre + t with A = R(theta) @ Shear(rho) @ Scale(s),
    R(theta) = [[cos, -sin], [sin, cos]], Shear = [[1, rho_x], [rho_y, 1]], Scale = diag(s_x, s_y);
    rows grow downwards, so a positive theta turns the picture clockwise on screen;
  * each output pixel is read from the input at A^-1 (out - centre - t) + centre with bilinear
    interpolation; samples outside the image read 0, which is background (Omniglot ink = 255), or with
    fill="nearest" the nearest edge pixel (Keras's fill_mode="nearest"; scipy's mode="nearest");
  * flip_probability mirrors the warped image left-right (x -> W-1-x), after the warp as Keras does.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

from siamese_jax.errors import UserError

KINDS = ("affine", "photo")
# The names `random_affine` accepts: the fields of `default_config()` that kind="affine" reads.
AFFINE_FIELDS = ("probability", "rotation_deg", "shear", "scale_min", "scale_max", "translate_px", "flip_probability",
                 "fill")
FILLS = ("zero", "nearest")
# The names `random_photo` accepts: the fields of `default_config()` that kind="photo" reads.
PHOTO_FIELDS = ("crop_scale_min", "crop_scale_max", "crop_ratio_min", "crop_ratio_max", "flip", "brightness",
                "contrast", "saturation", "hue")

# A crop narrower than this is resized up from too few pixels to hold any structure along that side.
MIN_CROP_SIDE_PX = 2.0


def default_config() -> ml_collections.ConfigDict:
  """Augmentation settings, `config.augment` in the configs: Koch et al. (2015) affine ranges (the
  default kind) and the photo ranges (torchvision's RandomResizedCrop, flip and ColorJitter)."""
  config = ml_collections.ConfigDict()
  config.enabled = True  # False: images are only converted to float (to_float), no distortion
  config.views = 1  # distorted copies of each image per step, side by side in the batch (supcon: 2)
  config.kind = "affine"  # affine: Koch et al. distortions (drawings) | photo: crop, flip, colour jitter
  # kind="affine":
  config.probability = 0.5  # chance that each of the 7 components (theta, rho_x/y, s_x/y, t_x/y) is applied
  config.rotation_deg = 10.0  # theta ~ U[-rotation_deg, rotation_deg] degrees
  config.shear = 0.3  # rho_x, rho_y ~ U[-shear, shear] (independently)
  config.scale_min = 0.8  # s_x, s_y ~ U[scale_min, scale_max] (independently)
  config.scale_max = 1.2  # upper end of the scale range
  config.translate_px = 2.0  # t_x, t_y ~ U[-translate_px, translate_px] pixels (continuous)
  config.flip_probability = 0.0  # mirror left-right with this probability (Keras horizontal_flip: 0.5); 0 = never
  # Where the warp reads outside the image: "zero" = background (0; Omniglot's background, ink being 1), or
  # "nearest" = the nearest edge pixel (Keras ImageDataGenerator's default fill_mode, for backgrounds that are not 0)
  config.fill = "zero"
  # kind="photo" (applied in this order, to every image; the crop is resized back to the image size):
  config.crop_scale_min = 0.35  # crop area ~ U[crop_scale_min, crop_scale_max] of the image area
  config.crop_scale_max = 1.0  # upper end (<= 1); crop_scale_min = 1 means no crop at all
  config.crop_ratio_min = 3 / 4  # crop width/height ~ log-uniform in [crop_ratio_min, crop_ratio_max]
  config.crop_ratio_max = 4 / 3  # upper end of the crop aspect ratio
  config.flip = True  # mirror left-right with probability 1/2
  config.brightness = 0.2  # pixels times a factor ~ U[1 - brightness, 1 + brightness]; 0 = off
  config.contrast = 0.2  # distance from each channel's mean times ~ U[1 - contrast, 1 + contrast]; 0 = off
  config.saturation = 0.2  # HSV saturation times ~ U[1 - saturation, 1 + saturation]; RGB only; 0 = off
  config.hue = 0.02  # hue shifted by ~ U[-hue, hue] turns of the colour wheel (<= 0.5); RGB only; 0 = off
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
  probability: Any, rotation_deg: Any, shear: Any, scale_min: Any, scale_max: Any, translate_px: Any,
  flip_probability: Any = 0.0, fill: Any = "zero",
) -> None:
  """Rejects impossible ranges early; traced values (already inside jit) cannot be checked."""

  def concrete(value: Any) -> bool:
    return isinstance(value, numbers.Real)

  for name, value in (("probability", probability), ("flip_probability", flip_probability)):
    if concrete(value) and not 0.0 <= value <= 1.0:
      raise UserError(f"augment.{name}: expected a value in [0, 1], got {value}")
  if fill not in FILLS:
    raise UserError(f"augment.fill={fill!r}: expected one of {FILLS}")
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


def _bilinear(image: jax.Array, ys: jax.Array, xs: jax.Array, fill: str = "zero") -> jax.Array:
  """Samples image [H, W, C] at real coordinates ys, xs [H', W']; outside the image reads 0 (fill="zero") or
  the nearest edge pixel (fill="nearest": every tap clamped into the image)."""
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
    return values if fill == "nearest" else jnp.where(inside[..., None], values, 0.0)

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
  fill: str = "zero",
) -> jax.Array:
  """Warps images [N, H, W, C] (uint8 or float in [0, 1]) by given per-image parameters.

  Every parameter is a scalar or an [N] array (the output of `sample_affine_params`). Returns
  float32 [N, H, W, C] in [0, 1]. See the module docstring for the geometry; `fill` is "zero" or "nearest".
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
  warped = jax.vmap(lambda image, y, x: _bilinear(image, y, x, fill))(images, ys, xs)
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
  flip_probability: float = 0.0,
  fill: str = "zero",
) -> jax.Array:
  """Koch et al. (2015) distortions: an independent random affine map per image, then a left-right mirror
  with probability `flip_probability`; `fill` says what the warp reads outside the image ("zero", "nearest").

  images: [N, H, W, C] uint8 or float in [0, 1]. Returns float32 [N, H, W, C] in [0, 1].
  With probability 0 and flip_probability 0 the result is exactly `to_float(images)`. The flips are drawn
  from fold_in(key, 2), a key that the warp's draws (split(key) = fold_in(key, 0 and 1)) never use, so
  flip_probability 0 leaves every distortion of before unchanged, bit for bit.
  """
  images = to_float(images)
  ranges = dict(
    rotation_deg=rotation_deg, shear=shear, scale_min=scale_min, scale_max=scale_max, translate_px=translate_px
  )
  _check_ranges(probability, **ranges, flip_probability=flip_probability, fill=fill)
  # Probability 0: every component would be the identity; skip the gather (the result is the same).
  if not (isinstance(probability, numbers.Real) and probability == 0):
    params = sample_affine_params(key, images.shape[0], probability=probability, **ranges)
    images = apply_affine(images, **params, fill=fill)
  if isinstance(flip_probability, numbers.Real) and flip_probability == 0:
    return images
  mirrored = jax.random.bernoulli(jax.random.fold_in(key, 2), flip_probability, (images.shape[0],))
  return jnp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)


# --------------------------------------------------------------------------------------------------
# Photo augmentation: random resized crop, horizontal flip, colour jitter


def _check_photo_ranges(
  crop_scale_min: Any, crop_scale_max: Any, crop_ratio_min: Any, crop_ratio_max: Any, flip: Any,
  brightness: Any, contrast: Any, saturation: Any, hue: Any,
) -> None:
  """Rejects impossible photo ranges early; traced values (already inside jit) cannot be checked."""

  def concrete(value: Any) -> bool:
    return isinstance(value, numbers.Real)

  if concrete(crop_scale_min) and not 0.0 < crop_scale_min <= 1.0:
    raise UserError(f"augment.crop_scale_min: expected a fraction of the image area in (0, 1], got {crop_scale_min}")
  if concrete(crop_scale_max) and concrete(crop_scale_min) and not crop_scale_min <= crop_scale_max <= 1.0:
    raise UserError(f"augment.crop_scale_max: expected a value in [crop_scale_min={crop_scale_min}, 1], "
                    f"got {crop_scale_max}")
  if concrete(crop_ratio_min) and crop_ratio_min <= 0:
    raise UserError(f"augment.crop_ratio_min: expected a width/height ratio > 0, got {crop_ratio_min}")
  if concrete(crop_ratio_min) and concrete(crop_ratio_max) and crop_ratio_max < crop_ratio_min:
    raise UserError(f"augment.crop_ratio_max ({crop_ratio_max}) must be >= augment.crop_ratio_min "
                    f"({crop_ratio_min})")
  if not isinstance(flip, (bool, jax.Array)):
    raise UserError(f"augment.flip: expected True or False, got {flip!r}")
  # A factor range 1 +- x must stay >= 0 (a negative factor would invert the image, not jitter it).
  for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
    if concrete(value) and not 0.0 <= value <= 1.0:
      raise UserError(f"augment.{name}: expected a half-range in [0, 1] (factor 1 +- {name}), got {value}")
  if concrete(hue) and not 0.0 <= hue <= 0.5:
    raise UserError(f"augment.hue: expected a half-range in [0, 0.5] turns of the colour wheel, got {hue}")


def _crop_ratio_bounds(height: int, width: int, scale_min: Any) -> tuple[Any, Any]:
  """The crop aspect ratios (width/height) at which `scale_min` of the image still fits inside it."""
  return scale_min * width / height, width / (height * scale_min)


def check_crop_fits(height: int, width: int, *, crop_scale_min: Any, crop_ratio_min: Any, crop_ratio_max: Any,
                    **_: Any) -> None:
  """Raises UserError when the smallest crop the ranges allow is under MIN_CROP_SIDE_PX on a side.

  Such a crop is an image too small for the crop settings: resizing one or two pixels back up to
  the image size leaves nothing to learn from along that side.
  """
  if not all(isinstance(v, numbers.Real) for v in (crop_scale_min, crop_ratio_min, crop_ratio_max)):
    return
  low, high = _crop_ratio_bounds(height, width, crop_scale_min)
  area = crop_scale_min * height * width
  narrowest = (area * min(max(crop_ratio_min, low), high)) ** 0.5  # width at the smallest ratio
  flattest = (area / min(max(crop_ratio_max, low), high)) ** 0.5  # height at the largest ratio
  if min(narrowest, flattest) < MIN_CROP_SIDE_PX:
    raise UserError(
      f"images of {height}x{width} px are too small for augment.crop_scale_min={crop_scale_min} with "
      f"crop ratios [{crop_ratio_min:.3g}, {crop_ratio_max:.3g}]: crops could be {narrowest:.1f} px wide or "
      f"{flattest:.1f} px high; expected at least {MIN_CROP_SIDE_PX:g} px a side (raise data.image_size or "
      "augment.crop_scale_min)")


def sample_crop_boxes(
  key: jax.Array,
  num_images: int,
  height: int,
  width: int,
  *,
  crop_scale_min: float = 0.35,
  crop_scale_max: float = 1.0,
  crop_ratio_min: float = 3 / 4,
  crop_ratio_max: float = 4 / 3,
) -> dict[str, jax.Array]:
  """One crop box per image, in pixels: float32 [num_images] arrays top, left, height, width.

  The aspect ratio r = width/height is drawn log-uniformly from [crop_ratio_min, crop_ratio_max], as in
  torchvision's RandomResizedCrop, then clamped to the ratios at which crop_scale_min of the image fits;
  the area fraction is then uniform between crop_scale_min and the largest area that fits at that ratio
  (at most crop_scale_max). So every crop lies inside the image and covers [crop_scale_min,
  crop_scale_max] of it without torchvision's rejection loop (a loop cannot be vectorised). Boxes are
  continuous: the bilinear resize reads fractional pixels, so no rounding biases the scale.
  """
  _check_photo_ranges(crop_scale_min, crop_scale_max, crop_ratio_min, crop_ratio_max, True, 0.0, 0.0, 0.0, 0.0)
  ratio_key, scale_key, position_key = jax.random.split(key, 3)
  log_ratio = jax.random.uniform(ratio_key, (num_images,), jnp.float32, jnp.log(crop_ratio_min),
                                 jnp.log(crop_ratio_max))
  low, high = _crop_ratio_bounds(height, width, crop_scale_min)
  ratio = jnp.minimum(jnp.maximum(jnp.exp(log_ratio), low), high)
  # Largest area fraction whose crop at this ratio fits: width sqrt(s H W r) <= W and height <= H.
  fits = jnp.minimum(width / (height * ratio), height * ratio / width)
  top_scale = jnp.maximum(jnp.minimum(crop_scale_max, fits), crop_scale_min)
  scale = crop_scale_min + jax.random.uniform(scale_key, (num_images,), jnp.float32) * (top_scale - crop_scale_min)
  area = scale * (height * width)
  # The clamps only remove float rounding past the image's sides.
  crop_width = jnp.minimum(jnp.sqrt(area * ratio), float(width))
  crop_height = jnp.minimum(jnp.sqrt(area / ratio), float(height))
  position = jax.random.uniform(position_key, (2, num_images), jnp.float32)
  return {
    "top": position[0] * (height - crop_height),
    "left": position[1] * (width - crop_width),
    "height": crop_height,
    "width": crop_width,
  }


def crop_and_resize(image: jax.Array, top: jax.Array, left: jax.Array, height: jax.Array,
                    width: jax.Array) -> jax.Array:
  """The box (top, left, height, width) of image [H, W, C], bilinearly resized to [H, W, C].

  Output pixel i samples the input at top + (i + 1/2) * height / H - 1/2 (pixel centres, as
  torchvision and PIL resize), so the whole-image box is exactly the identity; reads past a side
  repeat the edge pixel (they stay within half a pixel of it).
  """
  image_height, image_width = image.shape[0], image.shape[1]
  step_y, step_x = height / image_height, width / image_width
  matrix = jnp.stack([step_y, step_x, jnp.ones_like(step_y)])  # diagonal: (row, column, channel)
  offset = jnp.stack([top + 0.5 * step_y - 0.5, left + 0.5 * step_x - 0.5, jnp.zeros_like(top)])
  return pix.affine_transform(image, matrix, offset=offset, order=1, mode="nearest")


def photo_augment_image(
  key: jax.Array,
  image: jax.Array,
  *,
  crop_scale_min: float = 0.35,
  crop_scale_max: float = 1.0,
  crop_ratio_min: float = 3 / 4,
  crop_ratio_max: float = 4 / 3,
  flip: bool = True,
  brightness: float = 0.2,
  contrast: float = 0.2,
  saturation: float = 0.2,
  hue: float = 0.02,
) -> jax.Array:
  """One photo [H, W, C] (uint8 or float in [0, 1]) -> float32 [H, W, C] in [0, 1].

  In this fixed order: random resized crop (`sample_crop_boxes`, back to H x W), left-right flip with
  probability 1/2, then brightness, contrast, saturation, hue. The order is fixed rather than
  torchvision's random one because under vmap a per-image order would compute every order and select
  one. Ranges follow torchvision's ColorJitter; contrast (around each channel's mean), saturation (in
  HSV) and hue are dm_pix's, i.e. TensorFlow's, definitions. Each step clips to [0, 1], as torchvision
  does. Saturation and hue are skipped for grayscale (C = 1): a grey image has no saturation and
  no hue, so on RGB they would leave it unchanged too. Every draw is made whatever the settings, so
  one key gives the same crop with C = 1 or 3 and whichever colour steps are off.
  """
  image = to_float(image)
  if image.ndim != 3:
    raise UserError(f"images: expected one image of shape [H, W, C], got {image.shape}")
  height, width, channels = image.shape
  crop = dict(crop_scale_min=crop_scale_min, crop_scale_max=crop_scale_max, crop_ratio_min=crop_ratio_min,
              crop_ratio_max=crop_ratio_max)
  _check_photo_ranges(**crop, flip=flip, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
  check_crop_fits(height, width, **crop)
  crop_key, flip_key, colour_key = jax.random.split(key, 3)
  box = jax.tree.map(lambda value: value[0], sample_crop_boxes(crop_key, 1, height, width, **crop))
  # Concrete full-image crops skip the resampling (exactly the identity anyway).
  if not (isinstance(crop_scale_min, numbers.Real) and crop_scale_min >= 1.0):
    image = crop_and_resize(image, **box)
  if flip is not False:
    mirrored = jax.random.bernoulli(flip_key, 0.5) & jnp.asarray(flip)
    image = jnp.where(mirrored, pix.flip_left_right(image), image)

  def symmetric(u: jax.Array, half_range: float) -> jax.Array:
    return (2.0 * u - 1.0) * half_range

  u = jax.random.uniform(colour_key, (4,), jnp.float32)

  def off(value: Any) -> bool:
    return isinstance(value, numbers.Real) and value == 0

  if not off(brightness):
    # torchvision's brightness: a factor on every pixel (black stays black), not dm_pix's added delta.
    image = jnp.clip(image * (1.0 + symmetric(u[0], brightness)), 0.0, 1.0)
  if not off(contrast):
    image = jnp.clip(pix.adjust_contrast(image, 1.0 + symmetric(u[1], contrast)), 0.0, 1.0)
  if channels == 3 and not off(saturation):
    image = jnp.clip(pix.adjust_saturation(image, 1.0 + symmetric(u[2], saturation)), 0.0, 1.0)
  if channels == 3 and not off(hue):
    image = jnp.clip(pix.adjust_hue(image, symmetric(u[3], hue)), 0.0, 1.0)
  return image.astype(jnp.float32)


def random_photo(key: jax.Array, images: jax.Array, **options: Any) -> jax.Array:
  """`photo_augment_image` on every image of [N, H, W, C], image i with key `jax.random.split(key, N)[i]`.

  One vmapped program for the batch (no Python loop). Returns float32 [N, H, W, C] in [0, 1].
  """
  images = to_float(images)
  if images.ndim != 4:
    raise UserError(f"images: expected shape [N, H, W, C], got {images.shape}")
  unknown = sorted(set(options) - set(PHOTO_FIELDS))
  if unknown:
    raise UserError(f"augment: unknown photo field(s) {unknown}; valid fields are {sorted(PHOTO_FIELDS)}")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, image: photo_augment_image(k, image, **options))(keys, images)


# --------------------------------------------------------------------------------------------------
# Dispatch on the config


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
  return distortion(options)(key, flat).reshape(images.shape)


def distortion(config: Mapping[str, Any] | ml_collections.ConfigDict) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(key, images [N, H, W, C]) -> float32 [N, H, W, C]` for `config.augment`'s kind, with its fields.

  A config without `kind` (written before photo augmentation existed) means "affine"; each kind
  reads only its own fields, so old configs need none of the photo ones.
  """
  kind = config.get("kind", "affine")
  if kind == "affine":
    # Configs written before flip_probability and fill existed lack them: their defaults are the old behaviour.
    defaults = default_config()
    options = {name: config.get(name, defaults[name]) for name in AFFINE_FIELDS}
    return lambda key, images: random_affine(key, images, **options)
  if kind == "photo":
    options = {name: config[name] for name in PHOTO_FIELDS}
    _check_photo_ranges(**options)
    return lambda key, images: random_photo(key, images, **options)
  raise UserError(f"augment.kind={kind!r}: expected one of {KINDS}")


__all__ = [
  "AFFINE_FIELDS",
  "FILLS",
  "KINDS",
  "PHOTO_FIELDS",
  "apply_affine",
  "augment_batch",
  "check_crop_fits",
  "crop_and_resize",
  "default_config",
  "distortion",
  "photo_augment_image",
  "random_affine",
  "random_photo",
  "sample_affine_params",
  "sample_crop_boxes",
  "to_float",
]
