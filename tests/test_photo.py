"""Photos: on-device crop/flip/colour augmentation, resize modes, non-square images, per-image splits.

Augmentation checks measure what reached the output (a ramp's slope gives the crop's size, a mirror
compares with numpy); decoding checks compare with the pixels a 40x20 image of four colour bands must
give in each resize mode; split checks count files.
"""

from __future__ import annotations

import functools
import io
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from jax.sharding import PartitionSpec as P

import dm_pix as pix
from siamese_jax.configs import omniglot as omniglot_config
from siamese_jax import augment, training
from siamese_jax.data import pipeline, sources
from siamese_jax.errors import UserError

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
NO_CROP = dict(crop_scale_min=1.0, crop_scale_max=1.0)


def photo_config(**fields) -> ml_collections.ConfigDict:
  config = augment.default_config()
  config.kind = "photo"
  config.update(fields)
  return config


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Photo augmentation


@pytest.mark.parametrize("shape", [(6, 24, 40, 3), (6, 32, 32, 1)])
def test_photo_output_is_float32_in_unit_interval_with_the_input_shape(shape):
  images = random_uint8(shape)
  out = np.asarray(jax.jit(lambda key, x: augment.random_photo(key, x, brightness=1.0, contrast=1.0))(
      jax.random.key(0), images))
  assert out.dtype == np.float32 and out.shape == shape
  # Brightness and contrast factors up to 2 push pixels past 1 (contrast also below 0): every step clips.
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert out.max() == 1.0


def test_same_key_same_output_other_key_different_output():
  images = random_uint8((4, 16, 16, 3))
  photo = jax.jit(augment.random_photo)
  first = photo(jax.random.key(7), images)
  np.testing.assert_array_equal(first, photo(jax.random.key(7), images))
  assert not np.allclose(first, photo(jax.random.key(8), images))


def test_flip_mirrors_exactly_about_half_of_the_images():
  images = random_uint8((64, 8, 12, 3))
  out = np.asarray(jax.jit(functools.partial(augment.random_photo, **NO_CROP, **NO_JITTER))(jax.random.key(1), images))
  as_float = images.astype(np.float32) / 255.0
  same = np.array([np.allclose(o, i, atol=1e-6) for o, i in zip(out, as_float)])
  mirrored = np.array([np.allclose(o, np.fliplr(i), atol=1e-6) for o, i in zip(out, as_float)])
  assert np.all(same ^ mirrored)  # every image is itself or its mirror (random images are not symmetric)
  # 64 fair coins: standard deviation 4 flips; [16, 48] is 4 standard deviations either side.
  assert 16 <= mirrored.sum() <= 48
  unflipped = np.asarray(jax.jit(functools.partial(augment.random_photo, flip=False, **NO_CROP, **NO_JITTER))(
      jax.random.key(1), images))
  np.testing.assert_allclose(unflipped, as_float, atol=1e-6)


def test_whole_image_box_is_the_identity():
  image = augment.to_float(random_uint8((9, 13, 3)))
  out = augment.crop_and_resize(image, jnp.float32(0), jnp.float32(0), jnp.float32(9), jnp.float32(13))
  np.testing.assert_allclose(out, image, atol=1e-6)


def ramps(height: int, width: int) -> np.ndarray:
  """Channel 0 = column / (W - 1), channel 1 = row / (H - 1): bilinear reads of a ramp are exact."""
  rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
  return np.stack([cols / (width - 1), rows / (height - 1), np.zeros_like(rows)], axis=-1)


def measured_crops(images: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(area fraction, width/height) of each crop, from the slope of the ramps between two inner pixels.

  Output pixel j reads column left + (j + 1/2) w / W - 1/2, so the ramp rises by (w / W) / (W - 1)
  per output pixel; pixels 8 and W - 9 lie inside every crop of at least half the side.
  """
  height, width = images.shape[1:3]
  a, b = 8, width - 9
  crop_w = (out[:, :, b, 0] - out[:, :, a, 0]).mean(axis=1) * (width - 1) / (b - a) * width
  a, b = 8, height - 9
  crop_h = (out[:, b, :, 1] - out[:, a, :, 1]).mean(axis=1) * (height - 1) / (b - a) * height
  return crop_w * crop_h / (height * width), crop_w / crop_h


def test_crop_covers_the_configured_scale_and_ratio_ranges():
  images = np.repeat(ramps(32, 32)[None], 1000, axis=0)
  out = np.asarray(jax.jit(lambda key, x: augment.random_photo(key, x, flip=False, **NO_JITTER))(
      jax.random.key(2), images))
  area, ratio = measured_crops(images, out)
  assert area.min() >= 0.35 - 1e-3 and area.max() <= 1.0 + 1e-3
  assert ratio.min() >= 0.75 - 1e-3 and ratio.max() <= 4 / 3 + 1e-3
  # Both ends are reached: area < 0.4 has chance >= 0.05 / 0.65 per crop; area > 0.93 about 1 %
  # (ratio within 7 % of 1, then the top of the range); ratio < 0.78 or > 1.28 about 7 % each.
  assert area.min() < 0.40 and area.max() > 0.93
  assert ratio.min() < 0.78 and ratio.max() > 1.28


def test_crops_of_a_non_square_image_stay_inside_it():
  # 24x48 (ratio 2): ratios above 4/3 cannot be asked for, so the largest crops are under the whole image.
  images = np.repeat(ramps(24, 48)[None], 400, axis=0)
  out = np.asarray(jax.jit(functools.partial(augment.random_photo, flip=False, **NO_JITTER))(jax.random.key(3), images))
  area, ratio = measured_crops(images, out)
  assert area.min() >= 0.35 - 1e-3 and area.max() <= 1.0 + 1e-3
  assert ratio.min() >= 0.75 - 1e-3 and ratio.max() <= 4 / 3 + 1e-3
  # Every read stayed within half a pixel of the image: the ramps never leave [0, 1] ...
  assert out.min() >= 0.0 and out.max() <= 1.0
  # ... and the crop's ends (first and last output column) lie inside the image's columns.
  left = out[:, :, 0, 0].mean(axis=1) * 47
  right = out[:, :, -1, 0].mean(axis=1) * 47
  assert left.min() >= 0.0 and right.max() <= 47.0 and np.all(right > left)


def test_jit_vmap_batch_equals_one_call_per_image():
  images = random_uint8((5, 20, 28, 3))
  key = jax.random.key(4)
  batch = np.asarray(jax.jit(augment.random_photo)(key, images))
  keys = jax.random.split(key, len(images))
  one = jax.jit(augment.photo_augment_image)
  for i, image in enumerate(images):
    # Fused and unfused float32 HSV round trips differ by a few ulps; 1e-5 is 1/400 of one uint8 level.
    np.testing.assert_allclose(batch[i], one(keys[i], image), atol=1e-5)


def test_grayscale_gets_the_crop_flip_brightness_and_contrast_of_its_rgb_copy():
  # Saturation and hue are skipped at C = 1; on a grey RGB image they change nothing, so the two agree.
  grey = random_uint8((8, 16, 16, 1))
  photo = jax.jit(augment.random_photo)
  gray_out = np.asarray(photo(jax.random.key(5), grey))
  rgb_out = np.asarray(photo(jax.random.key(5), np.repeat(grey, 3, axis=-1)))
  assert gray_out.shape == (8, 16, 16, 1)
  np.testing.assert_allclose(rgb_out, np.repeat(gray_out, 3, axis=-1), atol=1e-5)


def test_colour_jitter_stays_in_its_ranges():
  keys = jax.random.split(jax.random.key(6), 500)
  grey = jnp.full((500, 4, 4, 3), 0.5)
  bright = np.asarray(jax.jit(jax.vmap(functools.partial(augment.photo_augment_image, **NO_CROP, **dict(
      NO_JITTER, brightness=0.2))))(keys, grey))[:, 0, 0, 0]
  assert bright.min() >= 0.4 - 1e-6 and bright.max() <= 0.6 + 1e-6  # 0.5 times [0.8, 1.2]
  assert bright.min() < 0.41 and bright.max() > 0.59
  colour = jnp.broadcast_to(jnp.array([0.8, 0.4, 0.4]), (500, 4, 4, 3))  # hue 0, saturation 0.5
  hsv = lambda options: np.asarray(pix.rgb_to_hsv(jax.jit(jax.vmap(functools.partial(
      augment.photo_augment_image, **NO_CROP, **dict(NO_JITTER, **options))))(keys, colour)))[:, 0, 0]
  hue = hsv({"hue": 0.02})[:, 0]
  turn = np.minimum(hue, 1.0 - hue)  # distance from red on the colour wheel
  assert turn.max() <= 0.02 + 1e-5 and turn.max() > 0.019
  saturation = hsv({"saturation": 0.2})[:, 1]
  assert saturation.min() >= 0.4 - 1e-5 and saturation.max() <= 0.6 + 1e-5


@pytest.mark.parametrize("fields, message", [
    (dict(crop_scale_min=0.01), r"images of 16x16 px are too small for augment.crop_scale_min=0.01 .*"
                                r"crops could be 1\.4 px wide or 1\.4 px high; expected at least 2 px"),
    (dict(crop_scale_min=0.0), "augment.crop_scale_min: expected a fraction"),
    (dict(crop_scale_min=0.5, crop_scale_max=0.4), r"augment.crop_scale_max: expected a value in \[crop_scale_min"),
    (dict(crop_ratio_min=2.0, crop_ratio_max=1.0), r"augment.crop_ratio_max \(1.0\) must be >="),
    (dict(hue=0.6), r"augment.hue: expected a half-range in \[0, 0.5\]"),
    (dict(brightness=1.5), r"augment.brightness: expected a half-range in \[0, 1\]"),
    (dict(flip="yes"), "augment.flip: expected True or False"),
    (dict(kind="colour"), r"augment.kind='colour': expected one of \('affine', 'photo'\)"),
])
def test_photo_mistakes_are_one_line_user_errors(fields, message):
  with pytest.raises(UserError, match=message) as error:
    augment.augment_batch(jax.random.key(0), random_uint8((1, 2, 16, 16, 3)), photo_config(), **fields)
  assert "\n" not in str(error.value)


def test_augment_examples_photo_is_the_same_on_one_and_four_devices():
  # Keys are fold_in(step key, global example id): four shards of two examples give the batch of one device.
  images = random_uint8((8, 2, 16, 16, 3))
  config = photo_config()
  step_key = jax.random.key(9)
  whole = np.asarray(jax.jit(lambda x: training.augment_examples(step_key, jnp.arange(8), x, config))(images))

  def per_device(images):
    ids = jax.lax.axis_index("data") * 2 + jnp.arange(2)
    return training.augment_examples(step_key, ids, images, config)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                  check_vma=False))(images)
  np.testing.assert_allclose(np.asarray(sharded), whole, atol=1e-6)
  assert not np.allclose(whole[:, 0], whole[:, 1])  # each branch of a pair has its own draw


def test_a_saved_config_without_kind_is_affine():
  # Workdirs written before photo augmentation have only `enabled` and the affine fields.
  old = ml_collections.ConfigDict({name: value for name, value in augment.default_config().items()
                                   if name == "enabled" or name in augment.AFFINE_FIELDS})
  images = random_uint8((4, 2, 12, 12, 1))
  run = lambda config: np.asarray(jax.jit(lambda x: training.augment_examples(jax.random.key(3), jnp.arange(4), x,
                                                                           config))(images))
  expected = run(augment.default_config())
  np.testing.assert_array_equal(run(old), expected)
  assert not np.allclose(run(photo_config()), expected)


# --------------------------------------------------------------------------------------------------
# Decoding: resize modes and non-square images

BANDS = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [200, 200, 200]], np.uint8)  # red green blue white


def band_image() -> np.ndarray:
  """20 rows x 40 columns: four vertical bands of 10 columns (red, green, blue, white)."""
  return np.broadcast_to(np.repeat(BANDS, 10, axis=0)[None], (20, 40, 3)).copy()


def png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def lanczos(array: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.LANCZOS))


def bands_of(columns: list[int]) -> np.ndarray:
  """An image of 20 rows whose column j has the colour of band columns[j]."""
  return np.broadcast_to(BANDS[columns][None], (20, len(columns), 3))


@pytest.mark.parametrize("mode, shape, expected", [
    # Same height, half the width: stretch squeezes each band to 5 columns (PIL's LANCZOS, as before).
    ("stretch", (20, 20), lambda: lanczos(band_image(), 20, 20)),
    # center_crop keeps the 20x20 middle: columns 10..29, green then blue, untouched pixels.
    ("center_crop", (20, 20), lambda: bands_of([1] * 10 + [2] * 10)),
    # A 20x10 target: the middle 10 columns (15..24), half green, half blue.
    ("center_crop", (20, 10), lambda: bands_of([1] * 5 + [2] * 5)),
    # The same proportions (10x20 is 1:2 like 20x40): the three modes agree.
    ("center_crop", (10, 20), lambda: lanczos(band_image(), 10, 20)),
    ("letterbox", (10, 20), lambda: lanczos(band_image(), 10, 20)),
    # letterbox 20x20: the image halved to 10 rows x 20 columns, rows 5..14, mid-grey bars above and below.
    ("letterbox", (20, 20), lambda: np.concatenate([np.full((5, 20, 3), 128, np.uint8), lanczos(band_image(), 10, 20),
                                                    np.full((5, 20, 3), 128, np.uint8)])),
    # letterbox 40x40: no scaling at all (40 columns fit), 10 grey rows above and below.
    ("letterbox", (40, 40), lambda: np.concatenate([np.full((10, 40, 3), 128, np.uint8), band_image(),
                                                    np.full((10, 40, 3), 128, np.uint8)])),
])
def test_resize_modes_on_a_banded_40x20_image(mode, shape, expected):
  out = sources.decode_image(png(band_image()), (*shape, 3), resize=mode)
  assert out.shape == (*shape, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected())


def test_letterbox_of_an_inverted_drawing_pads_with_background():
  drawing = np.full((10, 30), 255, np.uint8)  # white paper ...
  drawing[:, 12:18] = 0  # ... with a black stroke: ink after inversion
  out = sources.decode_image(png(drawing), (30, 30, 1), invert=True, resize="letterbox")[:, :, 0]
  assert np.all(out[:10] == 0) and np.all(out[20:] == 0)  # bars are background, not grey
  assert np.all(out[10:20, 12:18] == 255) and np.all(out[10:20, :12] == 0)


def test_resize_is_part_of_the_cache_key(tmp_path):
  (tmp_path / "photos" / "a").mkdir(parents=True)
  Image.fromarray(band_image()).save(tmp_path / "photos" / "a" / "0.png")
  cache = tmp_path / "cache"
  decoded = {mode: sources.image_folder_source(tmp_path / "photos", (20, 20, 3), cache_dir=cache, resize=mode).images
             for mode in sources.RESIZE_MODES}
  assert len(list(cache.glob("*.npz"))) == 3
  for mode in sources.RESIZE_MODES:  # read back from the cache: each mode gets its own pixels
    again = sources.image_folder_source(tmp_path / "photos", (20, 20, 3), cache_dir=cache, resize=mode).images
    np.testing.assert_array_equal(again, decoded[mode])
  assert not np.array_equal(decoded["stretch"], decoded["center_crop"])
  with pytest.raises(UserError, match=r"resize='crop': expected one of \('stretch', 'center_crop', 'letterbox'\)"):
    sources.decode_image(png(band_image()), (20, 20, 3), resize="crop")


@pytest.mark.parametrize("size, expected", [(28, (28, 28, 3)), ((96, 64), (96, 64, 3)), ([20, 40], (20, 40, 3))])
def test_image_size_is_a_side_or_a_height_width_pair(size, expected):
  config = omniglot_config.get_config()
  config.data.image_size = size
  config.data.channels = 3
  assert pipeline.image_shape(config.data) == expected


@pytest.mark.parametrize("size", [0, (64,), (64, 0), (64, 48, 3), "64", 1.5, True])
def test_bad_image_size_names_the_field(size):
  data = ml_collections.ConfigDict({"image_size": size, "channels": 1})
  with pytest.raises(UserError, match=r"data.image_size=.*: expected a positive side length"):
    pipeline.image_shape(data)


# --------------------------------------------------------------------------------------------------
# Folders: per-image splits, a separate test folder, the grayscale note


def make_photo_folder(root: pathlib.Path, classes: int = 4, per_class: int = 10, grey: int = 0) -> pathlib.Path:
  """RGB photos 12x18 whose red value encodes (class, item); the first `grey` files are grayscale PNGs."""
  count = 0
  for c in range(classes):
    folder = root / f"class{c}"
    folder.mkdir(parents=True)
    for i in range(per_class):
      value = 20 * c + i
      if count < grey:
        Image.fromarray(np.full((12, 18), value, np.uint8)).save(folder / f"{i:02d}.png")
      else:
        Image.fromarray(np.full((12, 18, 3), (value, 7, 9), np.uint8)).save(folder / f"{i:02d}.png")
      count += 1
  return root


def folder_config(path, **data) -> ml_collections.ConfigDict:
  config = omniglot_config.get_config("smoke")
  config.data.update(dict(source="folder", path=str(path), image_size=(6, 9), channels=3), **data)
  return config


def split_ids(splits) -> dict[str, set[str]]:
  return {name: set(getattr(splits, name).file_ids) for name in ("train", "validation", "test")}


def test_image_split_keeps_every_class_in_every_split_and_no_image_in_two(tmp_path):
  root = make_photo_folder(tmp_path / "photos", classes=4, per_class=10)
  config = folder_config(root, split="image", test_fraction=0.2, validation_fraction=0.2)
  splits = pipeline.load_splits(config.data, seed=0)
  ids = split_ids(splits)
  assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
  assert not (ids["validation"] & ids["test"])
  assert len(ids["train"] | ids["validation"] | ids["test"]) == 40
  classes = [f"class{c}" for c in range(4)]
  # Each class of 10: round(0.2 * 10) = 2 test, 2 validation, 6 train.
  for name, per_class in (("train", 6), ("validation", 2), ("test", 2)):
    split = getattr(splits, name)
    assert split.class_names == classes
    assert np.bincount(split.labels).tolist() == [per_class] * 4
    assert split.images.shape == (4 * per_class, 6, 9, 3)  # the (height, width) pair reached decoding
  again = pipeline.load_splits(config.data, seed=0)
  assert split_ids(again) == ids
  assert split_ids(pipeline.load_splits(config.data, seed=1)) != ids


def test_image_split_with_too_few_images_names_the_class_folder_and_the_count(tmp_path):
  root = make_photo_folder(tmp_path / "photos", classes=3, per_class=6)
  for extra in ("03.png", "04.png", "05.png"):
    (root / "class1" / extra).unlink()
  config = folder_config(root, split="image", test_fraction=0.2, validation_fraction=0.1)
  with pytest.raises(UserError) as error:
    pipeline.load_splits(config.data, seed=0)
  # 2 images at least in each of train, validation and test: 6 per class; class1 has 3.
  assert str(error.value) == (
      f"class folder {root / 'class1'}: 3 images; data.split='image' with data.test_fraction=0.2, "
      "data.validation_fraction=0.1 needs at least 6 per class (2 in each of the 3 splits)")


def test_test_path_gives_the_test_split(tmp_path):
  train_root = make_photo_folder(tmp_path / "train", classes=6, per_class=4)
  test_root = make_photo_folder(tmp_path / "test", classes=3, per_class=5)
  for path in test_root.iterdir():
    path.rename(test_root / path.name.replace("class", "new"))
  config = folder_config(train_root, test_path=str(test_root), validation_fraction=0.34)
  splits = pipeline.load_splits(config.data, seed=0)
  assert splits.test.class_names == ["new0", "new1", "new2"] and len(splits.test) == 15
  # data.test_fraction plays no part: all 6 classes of data.path are train (4) or validation (round(2.04) = 2).
  assert (splits.train.num_classes, splits.validation.num_classes) == (4, 2)
  assert not set(splits.train.class_names) & set(splits.validation.class_names)
  # split="image": validation is part of every class of data.path; the test folder stays whole.
  config.data.split = "image"
  config.data.validation_fraction = 0.25
  splits = pipeline.load_splits(config.data, seed=0)
  assert splits.train.num_classes == splits.validation.num_classes == 6
  assert np.bincount(splits.validation.labels).tolist() == [2] * 6  # max(2, round(0.25 * 4))
  assert not set(splits.train.file_ids) & set(splits.validation.file_ids)
  assert len(splits.test) == 15


@pytest.mark.parametrize("data, message", [
    (dict(source="omniglot", split="image"), r"data.split='image' with data.source='omniglot': its test classes are "
                                             "the evaluation alphabets"),
    (dict(source="tfds", split="image"), r"data.split='image' with data.source='tfds'"),
    (dict(source="synthetic", test_path="/somewhere"), r"data.test_path='/somewhere' with data.source='synthetic'"),
    (dict(source="synthetic", split="pictures"), r"data.split='pictures': expected 'class'"),
    (dict(source="synthetic", resize="fit"), r"data.resize='fit': expected one of"),
])
def test_nonsense_data_combinations_name_the_fields(data, message):
  config = omniglot_config.get_config("smoke")
  config.data.update(data)
  with pytest.raises(UserError, match=message):
    pipeline.load_splits(config.data, seed=0)


def test_test_path_equal_to_path_is_refused(tmp_path):
  root = make_photo_folder(tmp_path / "photos", classes=2, per_class=2)
  with pytest.raises(UserError, match="data.test_path=.* is data.path"):
    pipeline.load_splits(folder_config(root, test_path=str(root) + "/").data, seed=0)


def test_image_split_of_synthetic_data_and_old_configs_without_the_new_fields():
  config = omniglot_config.get_config("smoke")
  config.data.update(dict(source="synthetic", synthetic_classes=5, image_size=8, split="image"))
  splits = pipeline.load_splits(config.data, seed=0)
  # 20 images a class: 4 test, 2 validation, 14 train, every class in each.
  assert [np.bincount(s.labels).tolist() for s in (splits.train, splits.validation, splits.test)] == [
      [14] * 5, [2] * 5, [4] * 5]
  old = ml_collections.ConfigDict({k: v for k, v in config.data.items() if k not in ("split", "resize", "test_path")})
  old.image_size = 8
  splits = pipeline.load_splits(old, seed=0)  # today's class split
  assert splits.test.num_classes + splits.validation.num_classes + splits.train.num_classes == 5


def test_grayscale_files_in_an_rgb_folder_get_one_note(tmp_path, capsys):
  root = make_photo_folder(tmp_path / "photos", classes=2, per_class=3, grey=2)
  source = sources.image_folder_source(root, (6, 6, 3))
  notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
  assert notes == [f"note: 2 grayscale images in {root} were converted to RGB"]
  assert np.all(source.images[0] == source.images[0][..., :1])  # the grey file, now three equal channels
  sources.image_folder_source(root, (6, 6, 1))  # a grayscale data set: nothing to note
  sources.image_folder_source(make_photo_folder(tmp_path / "colour", classes=2, per_class=2), (6, 6, 3))
  assert "note:" not in capsys.readouterr().out
