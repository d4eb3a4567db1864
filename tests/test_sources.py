"""Tests of siamese_jax.data.sources: decoding, ImageSource views, image folders, cache, TFDS."""

import concurrent.futures
import io
import multiprocessing
import operator
import os
import pathlib
import pickle
import zipfile

import numpy as np
from PIL import Image
import pytest

from siamese_jax.data import sources
from siamese_jax.errors import UserError


def png_bytes(array: np.ndarray, format: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=format)
  return buffer.getvalue()


def solid(value: int, size: int = 12) -> Image.Image:
  return Image.fromarray(np.full((size, size), value, np.uint8))


def make_flat_folder(root: pathlib.Path) -> pathlib.Path:
  """3 classes; each image is a solid grey whose value encodes (class, item): easy to check."""
  for class_index, class_name in enumerate(["cat", "ant", "bee"]):
    folder = root / class_name
    folder.mkdir(parents=True)
    for item, extension in enumerate(["png", "jpg", "bmp"][: 2 + (class_name == "bee")]):
      solid(40 * class_index + 10 * item + 10).save(folder / f"img{item}.{extension}")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"garbage: hidden files are skipped")
  (root / "README.md").write_text("files in root are ignored")
  return root


def make_grouped_folder(root: pathlib.Path) -> pathlib.Path:
  for group, classes in {"Latin": ["a", "b"], "Greek": ["alpha"]}.items():
    for class_name in classes:
      (root / group / class_name).mkdir(parents=True)
      for item in range(2):
        solid(100 + item).save(root / group / class_name / f"{item}.png")
  return root


# ------------------------------------------------------------------------------------------------
# decode_image


def test_decode_image_grayscale_resize_and_invert():
  array = np.zeros((40, 60), np.uint8)
  array[:, 30:] = 200  # left half black, right half light grey
  data = png_bytes(array)
  image = sources.decode_image(data, (10, 20, 1))
  assert image.shape == (10, 20, 1) and image.dtype == np.uint8
  assert image[5, 2, 0] == 0 and image[5, 17, 0] == 200
  inverted = sources.decode_image(data, (10, 20, 1), invert=True)
  np.testing.assert_array_equal(inverted, 255 - image)


def test_decode_image_rgb_from_gray_and_gray_from_rgb():
  rgb = np.zeros((8, 8, 3), np.uint8)
  rgb[..., 0] = 255  # pure red
  gray = sources.decode_image(png_bytes(rgb), (8, 8, 1))
  assert gray[0, 0, 0] == 76  # ITU-R 601 luma of red: 0.299 * 255
  as_rgb = sources.decode_image(png_bytes(np.full((8, 8), 90, np.uint8)), (4, 4, 3))
  assert as_rgb.shape == (4, 4, 3) and (as_rgb == 90).all()


def test_decode_image_one_bit_png_and_transparency_and_16_bit():
  one_bit = np.ones((10, 10), bool)
  one_bit[2:4, :] = False  # black stroke on white
  image = sources.decode_image(png_bytes(one_bit), (10, 10, 1), invert=True)
  assert image[3, 5, 0] == 255 and image[7, 5, 0] == 0  # ink = 255 after inverting
  rgba = np.zeros((6, 6, 4), np.uint8)  # fully transparent black: reads as white paper
  assert (sources.decode_image(png_bytes(rgba), (6, 6, 1)) == 255).all()
  sixteen = Image.fromarray(np.full((5, 5), 65535, np.uint16))
  buffer = io.BytesIO()
  sixteen.save(buffer, format="PNG")
  assert (sources.decode_image(buffer.getvalue(), (5, 5, 1)) == 255).all()


def test_decode_image_corrupt_names_the_file():
  with pytest.raises(UserError, match="broken.png"):
    sources.decode_image(b"not a png at all", (4, 4, 1), name="folder/broken.png")


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 2), (0, 5, 1), "28x28"])
def test_bad_image_shape(shape):
  with pytest.raises(UserError, match="image_shape"):
    sources.check_image_shape(shape)


# ------------------------------------------------------------------------------------------------
# ImageSource and views


def small_source() -> sources.ImageSource:
  """6 classes in 3 groups, 2 records each; pixel value = record index."""
  labels = np.repeat(np.arange(6), 2)
  images = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  return sources.ImageSource.from_arrays(
      images, labels, class_names=[f"g{c // 2}/c{c}" for c in range(6)],
      class_groups=np.arange(6) // 2, group_names=["g0", "g1", "g2"],
      drawers=np.tile([1, 2], 6))


def test_from_arrays_defaults_and_read_only():
  images = np.zeros((3, 4, 4, 1), np.uint8)
  source = sources.ImageSource.from_arrays(images, [0, 1, 1])
  assert source.class_names == ["0", "1"] and source.group_names == [""]
  assert source.class_groups.tolist() == [0, 0] and source.drawers.tolist() == [-1, -1, -1]
  assert len(source) == 3 and source[2].shape == (4, 4, 1) and source[-1].shape == (4, 4, 1)
  with pytest.raises(ValueError):
    source[0][0, 0, 0] = 1  # the data set cannot be edited through a record...
  images[0, 0, 0, 0] = 7  # ...while the caller's own array stays writeable
  with pytest.raises(IndexError):
    source[3]


def test_subset_renumbers_classes_and_groups_densely():
  source = small_source()
  view = source.subset([11, 4, 5, 10])  # classes 5, 2, 2, 5 -> groups 2, 1
  assert view.labels.tolist() == [1, 0, 0, 1]
  assert view.class_names == ["g1/c2", "g2/c5"]
  assert view.class_groups.tolist() == [0, 1] and view.group_names == ["g1", "g2"]
  assert view.file_ids == ["11", "4", "5", "10"] and view.drawers.tolist() == [2, 1, 2, 1]
  assert [int(view[i][0, 0, 0]) for i in range(4)] == [11, 4, 5, 10]
  mask = np.zeros(12, bool)
  mask[[0, 1]] = True
  assert source.subset(mask).class_names == ["g0/c0"]
  with pytest.raises(IndexError):
    source.subset([12])


def test_select_classes_order_does_not_matter():
  source = small_source()
  view = source.select_classes([4, 1, 4])
  assert view.class_names == ["g0/c1", "g2/c4"]
  assert view.labels.tolist() == [0, 0, 1, 1]
  assert view.group_names == ["g0", "g2"] and view.class_groups.tolist() == [0, 1]
  assert [int(view[i][0, 0, 0]) for i in range(4)] == [2, 3, 8, 9]
  # A view of a view keeps names and stays dense.
  inner = view.select_classes([1])
  assert inner.class_names == ["g2/c4"] and inner.labels.tolist() == [0, 0]


def test_rotated_classes_are_new_classes_in_new_groups():
  images = np.zeros((4, 3, 3, 1), np.uint8)
  images[:, 0, 2] = 255  # ink in the top-right corner of every image
  source = sources.ImageSource.from_arrays(
      images, [0, 0, 1, 1], class_names=["A/c0", "B/c1"], class_groups=[0, 1], group_names=["A", "B"],
      drawers=[1, 2, 1, 2])
  turned = source.with_rotated_classes((90, 270))
  assert turned.class_names == ["A/c0", "B/c1", "A/c0/rot090", "B/c1/rot090", "A/c0/rot270", "B/c1/rot270"]
  assert turned.group_names == ["A", "B", "A/rot090", "B/rot090", "A/rot270", "B/rot270"]
  assert turned.class_groups.tolist() == [0, 1, 2, 3, 4, 5]
  assert turned.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
  assert turned.file_ids[4:6] == ["0#rot090", "1#rot090"] and turned.drawers.tolist() == [1, 2] * 6
  # Counter-clockwise: a quarter turn takes the top-right corner to the top-left, three to the bottom-right.
  corner = [tuple(np.argwhere(turned.images[i, :, :, 0])[0]) for i in (0, 4, 8)]
  assert corner == [(0, 2), (0, 0), (2, 2)]
  assert source.with_rotated_classes(()) is source


def test_rotated_classes_of_a_lazy_source_and_bad_angles():
  source = small_source()
  lazy = sources.ImageSource(labels=source.labels, class_names=source.class_names,
                             class_groups=source.class_groups, group_names=source.group_names,
                             file_ids=source.file_ids, drawers=source.drawers, image_shape=(2, 2, 1),
                             loader=lambda row: source.images[row])
  turned = lazy.with_rotated_classes((180,))
  assert turned.in_memory and turned.num_classes == 12 and turned.num_groups == 6
  np.testing.assert_array_equal(turned.images[12:], source.images[:, ::-1, ::-1])
  for bad in ((45,), (90, 90), (0,), (360,)):
    with pytest.raises(UserError, match="expected distinct angles among 90, 180, 270"):
      source.with_rotated_classes(bad)
  wide = sources.ImageSource.from_arrays(np.zeros((2, 2, 3, 1), np.uint8), [0, 1])
  with pytest.raises(UserError, match="quarter turns need square images, these are 2x3"):
    wide.with_rotated_classes((90,))
  assert wide.with_rotated_classes((180,)).num_classes == 4


def test_split_classes_fraction_count_and_determinism():
  source = small_source()
  kept, held = sources.split_classes(source, 0.5, seed=3)
  assert held.num_classes == 3 and kept.num_classes == 3
  assert not set(kept.class_names) & set(held.class_names)
  assert len(kept) + len(held) == len(source)
  kept_again, held_again = sources.split_classes(source, 3, seed=3)
  assert held_again.class_names == held.class_names and kept_again.file_ids == kept.file_ids
  assert sources.split_classes(source, 1, seed=0)[1].num_classes == 1
  for bad in (0, 6, 1.0, 0.0, True, "half"):
    with pytest.raises(UserError, match="held_out"):
      sources.split_classes(source, bad)


def test_synthetic_source_is_learnable_and_deterministic():
  source = sources.synthetic_source(num_classes=4, per_class=3, image_shape=(8, 8, 1), seed=1)
  again = sources.synthetic_source(num_classes=4, per_class=3, image_shape=(8, 8, 1), seed=1)
  np.testing.assert_array_equal(source.images, again.images)
  assert source.num_classes == 4 and source.num_groups == 2 and len(source) == 12
  flat = source.images.reshape(12, -1).astype(float)
  distances = ((flat[:, None] - flat[None]) ** 2).sum(-1)
  same = source.labels[:, None] == source.labels[None]
  off_diagonal = ~np.eye(12, dtype=bool)
  assert distances[same & off_diagonal].max() < distances[~same].min()


# ------------------------------------------------------------------------------------------------
# Image folders


def test_flat_folder_in_memory(tmp_path):
  root = make_flat_folder(tmp_path / "pets")
  source = sources.image_folder_source(root, (6, 6, 1))
  assert source.class_names == ["ant", "bee", "cat"]  # sorted, not listing order
  assert source.group_names == [""] and source.class_groups.tolist() == [0, 0, 0]
  assert source.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
  assert source.file_ids == ["ant/img0.png", "ant/img1.jpg", "bee/img0.png", "bee/img1.jpg",
                             "bee/img2.bmp", "cat/img0.png", "cat/img1.jpg"]
  assert source.drawers.tolist() == [-1] * 7
  assert source.images.shape == (7, 6, 6, 1)
  # ant is class_index 1 in make_flat_folder: values 50, 60 (the jpg within JPEG error).
  assert source[0][3, 3, 0] == 50 and abs(int(source[1][3, 3, 0]) - 60) <= 2


def test_flat_folder_lazy_matches_in_memory_and_pickles(tmp_path):
  root = make_flat_folder(tmp_path / "pets")
  in_memory = sources.image_folder_source(root, (5, 7, 3))
  lazy = sources.image_folder_source(root, (5, 7, 3), in_memory=False)
  assert lazy.images is None and lazy.file_ids == in_memory.file_ids
  restored = pickle.loads(pickle.dumps(lazy.subset([6, 2])))
  np.testing.assert_array_equal(restored[0], in_memory[6])
  np.testing.assert_array_equal(restored[1], in_memory[2])


def test_grouped_folder_and_auto_layout(tmp_path):
  root = make_grouped_folder(tmp_path / "scripts")
  for layout in ("grouped", "auto"):
    source = sources.image_folder_source(root, (4, 4, 1), layout=layout)
    assert source.group_names == ["Greek", "Latin"]
    assert source.class_names == ["Greek/alpha", "Latin/a", "Latin/b"]
    assert source.class_groups.tolist() == [0, 1, 1]
    assert source.file_ids[0] == "Greek/alpha/0.png"


def test_folder_errors(tmp_path):
  with pytest.raises(UserError, match="missing_root"):
    sources.image_folder_source(tmp_path / "missing_root", (4, 4, 1))
  (tmp_path / "empty").mkdir()
  solid(1).save(tmp_path / "empty" / "loose.png")
  with pytest.raises(UserError, match="no class folders"):
    sources.image_folder_source(tmp_path / "empty", (4, 4, 1))
  root = make_flat_folder(tmp_path / "pets")
  (root / "dog").mkdir()
  (root / "dog" / "readme.txt").write_text("only a text file: the class is empty")
  with pytest.raises(UserError, match="dog"):
    sources.image_folder_source(root, (4, 4, 1))
  mixed = make_grouped_folder(tmp_path / "mixed")
  (mixed / "plain").mkdir()
  solid(1).save(mixed / "plain" / "x.png")
  with pytest.raises(UserError, match="layout"):
    sources.image_folder_source(mixed, (4, 4, 1))
  with pytest.raises(UserError, match="layout"):
    sources.image_folder_source(mixed, (4, 4, 1), layout="nested")


def test_corrupt_image_in_folder_names_the_file(tmp_path):
  root = make_flat_folder(tmp_path / "pets")
  (root / "cat" / "img9.png").write_bytes(b"\x89PNG truncated")
  with pytest.raises(UserError, match="img9.png"):
    sources.image_folder_source(root, (4, 4, 1))
  lazy = sources.image_folder_source(root, (4, 4, 1), in_memory=False)
  with pytest.raises(UserError, match="img9.png"):
    lazy[lazy.file_ids.index("cat/img9.png")]


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
  root = make_flat_folder(tmp_path / "pets")
  cache = tmp_path / "cache"
  first = sources.image_folder_source(root, (6, 6, 1), cache_dir=cache)
  assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))

  def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache should have been used")

  with monkeypatch.context() as patch:
    patch.setattr(sources, "decode_image", no_decoding)
    second = sources.image_folder_source(root, (6, 6, 1), cache_dir=cache)
  np.testing.assert_array_equal(first.images, second.images)
  # Another shape or a changed file is another key: decoded again, never a stale hit.
  sources.image_folder_source(root, (5, 5, 1), cache_dir=cache)
  solid(222).save(root / "ant" / "img0.png")
  os.utime(root / "ant" / "img0.png", ns=(1, 1))
  changed = sources.image_folder_source(root, (6, 6, 1), cache_dir=cache)
  assert changed[0][0, 0, 0] == 222
  inverted = sources.image_folder_source(root, (6, 6, 1), cache_dir=cache, invert=True)
  np.testing.assert_array_equal(inverted.images, 255 - changed.images)
  assert len(list(cache.glob("*.npz"))) == 4


def test_zip_reader_reopens_after_pickling(tmp_path):
  path = tmp_path / "a.zip"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("x/1.png", png_bytes(np.full((3, 3), 9, np.uint8)))
  reader = sources.ZipReader(path, ["x/1.png"])
  assert sources.decode_image(reader.read(0), (3, 3, 1))[0, 0, 0] == 9  # opens the zip here
  restored = pickle.loads(pickle.dumps(reader))
  assert restored.read(0) == reader.read(0)
  assert "x/1.png" in restored.name(0)


def test_lazy_source_reads_in_a_spawned_process(tmp_path):
  """Grain workers are spawned: a lazy source must unpickle and read in a fresh interpreter."""
  root = make_flat_folder(tmp_path / "pets")
  lazy = sources.image_folder_source(root, (6, 6, 1), in_memory=False)
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    image = pool.submit(operator.getitem, lazy, 4).result(timeout=120)
  np.testing.assert_array_equal(image, lazy[4])


# ------------------------------------------------------------------------------------------------
# TFDS
#
# TFDS's mock_data with MockPolicy.USE_CODE builds the data set's metadata from the builder's code
# (features, label count) instead of prepared files, patches GCS lookups to fail fast, and needs no
# network and no TensorFlow as long as images are not re-encoded. That makes it work offline.
# `as_data_source_fn` replaces what tfds.data_source returns with examples whose labels and groups
# we choose, so the renumbering can be checked by hand.

tfds = pytest.importorskip("tensorflow_datasets")


def fake_omniglot_examples():
  """5 records: TFDS Omniglot global labels 970, 964, 970, 1000, 964 in alphabets 3, 7, 3, 7, 7."""
  examples = []
  for label, alphabet in [(970, 3), (964, 7), (970, 3), (1000, 7), (964, 7)]:
    image = np.full((105, 105, 3), 255, np.uint8)  # white paper
    image[40:60, 40:60] = 0  # black ink
    examples.append({"image": image, "label": np.int64(label), "alphabet": np.int64(alphabet),
                     "alphabet_char_id": np.int64(1)})
  return examples


@pytest.mark.parametrize("in_memory", [True, False])
def test_tfds_source_with_controlled_mock(in_memory):
  def as_data_source(builder, split, decoders=None, **kwargs):
    assert split == "test"
    return fake_omniglot_examples()

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    source = sources.tfds_source("omniglot", "test", image_shape=(21, 21, 1), group_key="alphabet",
                                 in_memory=in_memory)
    assert source.labels.tolist() == [1, 0, 1, 2, 0]
    # USE_CODE metadata has no label names file, so ClassLabel names are the numbers themselves.
    assert source.class_names == ["964", "970", "1000"]
    assert source.group_names == ["3", "7"] and source.class_groups.tolist() == [1, 0, 1]
    image = source[0]
    assert image.shape == (21, 21, 1)
    assert image[10, 10, 0] == 255 and image[0, 0, 0] == 0  # Omniglot is inverted: ink = 255
    assert (in_memory and source.images is not None) or (not in_memory and source.images is None)


def test_tfds_source_with_random_mock_data_source():
  """Through TFDS's own mocked ArrayRecordDataSource (the path tfds.data_source really takes)."""
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.tfds_source("omniglot", "train", image_shape=(8, 8, 3), in_memory=False)
    assert len(source) == 6 and source.group_names == [""]
    assert source[5].shape == (8, 8, 3) and source[5].dtype == np.uint8
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[5], source[5])
    with pytest.raises(UserError, match="no feature 'font'"):
      sources.tfds_source("omniglot", "train", image_shape=(8, 8, 1), label_key="font")


def test_tfds_cache_skips_reading_records(tmp_path, monkeypatch):
  # Mocked data sets have no local files to fingerprint; pretend they do so the cache switches on.
  monkeypatch.setattr(sources, "_tfds_identity", lambda builder: ["fake prepared files"])
  reads = []

  def as_data_source(builder, split, decoders=None, **kwargs):
    class Recorded(list):
      def __getitem__(self, index):
        reads.append(index)
        return list.__getitem__(self, index)
    return Recorded(fake_omniglot_examples())

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    first = sources.tfds_source("omniglot", "test", image_shape=(9, 9, 1), group_key="alphabet",
                                cache_dir=tmp_path)
    assert len(reads) == 5
    second = sources.tfds_source("omniglot", "test", image_shape=(9, 9, 1), group_key="alphabet",
                                 cache_dir=tmp_path)
    assert len(reads) == 5  # nothing read the second time
  np.testing.assert_array_equal(first.images, second.images)
  assert first.labels.tolist() == second.labels.tolist()
  assert second.class_names == first.class_names and second.group_names == first.group_names


def test_tfds_class_in_two_groups_is_an_error():
  def as_data_source(builder, split, decoders=None, **kwargs):
    examples = fake_omniglot_examples()
    examples[2]["alphabet"] = np.int64(9)  # class 970 now in alphabets 3 and 9
    return examples

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    with pytest.raises(UserError, match="several groups"):
      sources.tfds_source("omniglot", "train", image_shape=(8, 8, 1), group_key="alphabet")


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(UserError, match="not prepared") as error:
    sources.tfds_source("omniglot", "train", data_dir=tmp_path, image_shape=(28, 28, 1))
  assert "tfds build omniglot" in str(error.value) and str(tmp_path) in str(error.value)
  with pytest.raises(UserError, match="no such dataset"):
    sources.tfds_source("no_such_dataset_xyz", "train", data_dir=tmp_path, image_shape=(8, 8, 1))
