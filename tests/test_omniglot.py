"""Tests of siamese_jax.data.omniglot on tiny fake releases, and on the real data when it is there."""

import io
import pathlib
import shutil
import socket
import zipfile

import numpy as np
from PIL import Image
import pytest

from siamese_jax.data import omniglot, sources
from siamese_jax.errors import UserError

# Fake background set: alphabet -> number of characters; every character drawn by drawers 1..4.
FAKE_ALPHABETS = {"Greek": 2, "Latin": 3, "Tifinagh": 1}
FAKE_DRAWERS = 4


def stroke_png(row: int) -> bytes:
  """A 1-bit 20x20 PNG like Omniglot's: white (True) paper, a black (False) stroke at `row`."""
  paper = np.ones((20, 20), bool)
  paper[row: row + 2, 3:17] = False
  buffer = io.BytesIO()
  Image.fromarray(paper).save(buffer, format="PNG")
  return buffer.getvalue()


def fake_members(subset: str = "background") -> dict[str, bytes]:
  members, character_id = {}, 1
  for alphabet, num_characters in FAKE_ALPHABETS.items():
    for character in range(1, num_characters + 1):
      for drawer in range(1, FAKE_DRAWERS + 1):
        name = f"images_{subset}/{alphabet}/character{character:02d}/{character_id:04d}_{drawer:02d}.png"
        members[name] = stroke_png(row=drawer)
      character_id += 1
  return members


def write_zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return path


def write_folder(root: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
  for name, data in members.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return root


def closed_port_url() -> str:
  """A localhost URL nobody listens on: the connection is refused at once, never the network."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  return f"http://127.0.0.1:{port}/omniglot/python"


@pytest.fixture
def no_omniglot_env(monkeypatch, tmp_path):
  """No OMNIGLOT_DIR and a HOME without a cache, so nothing real is found by accident."""
  monkeypatch.delenv("OMNIGLOT_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))


# ------------------------------------------------------------------------------------------------
# Fake release


def test_fake_zip_source(tmp_path):
  write_zip(tmp_path / "images_background.zip", fake_members())
  source = omniglot.omniglot_source(data_dir=tmp_path, image_shape=(10, 10, 1), download=False)
  assert len(source) == 6 * FAKE_DRAWERS and source.num_classes == 6
  assert source.group_names == ["Greek", "Latin", "Tifinagh"]
  assert source.class_names[:3] == ["Greek/character01", "Greek/character02", "Latin/character01"]
  assert source.class_groups.tolist() == [0, 0, 1, 1, 1, 2]
  assert source.file_ids[0] == "images_background/Greek/character01/0001_01.png"
  assert source.drawers.tolist() == list(range(1, FAKE_DRAWERS + 1)) * 6
  # ink = 255 on background 0: drawer d's stroke covers rows d, d+1 of 20 -> rows d/2 of 10.
  image = source[0]  # drawer 1: stroke at rows 1-2 of 20
  assert image[0, 5, 0] > 100 and image[7, 5, 0] == 0
  assert (source.images > 127).mean() < 0.2  # ink is the minority


def test_folder_and_zip_give_the_same_source(tmp_path):
  members = fake_members("evaluation")
  write_zip(tmp_path / "zipped" / "images_evaluation.zip", members)
  write_folder(tmp_path / "extracted", members)
  from_zip = omniglot.omniglot_source("evaluation", data_dir=tmp_path / "zipped",
                                      image_shape=(10, 10, 1), download=False)
  from_folder = omniglot.omniglot_source("evaluation", data_dir=tmp_path / "extracted",
                                         image_shape=(10, 10, 1), download=False)
  assert from_zip.file_ids == from_folder.file_ids
  assert from_zip.class_names == from_folder.class_names
  np.testing.assert_array_equal(from_zip.images, from_folder.images)
  lazy = omniglot.omniglot_source("evaluation", data_dir=tmp_path / "zipped",
                                  image_shape=(10, 10, 1), in_memory=False, download=False)
  np.testing.assert_array_equal(lazy[7], from_zip[7])


def test_omniglot_dir_from_environment(tmp_path, monkeypatch):
  write_zip(tmp_path / "env" / "images_background.zip", fake_members())
  monkeypatch.setenv("OMNIGLOT_DIR", str(tmp_path / "env"))
  source = omniglot.omniglot_source(image_shape=(8, 8, 1), in_memory=False, download=False)
  assert source.num_classes == 6
  # An explicit data_dir beats $OMNIGLOT_DIR, which beats the default ~/.cache folder.
  assert omniglot.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
  assert omniglot.resolve_data_dir() == tmp_path / "env"
  monkeypatch.delenv("OMNIGLOT_DIR")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert omniglot.resolve_data_dir() == tmp_path / "home" / ".cache" / "siamese_jax" / "omniglot"


def test_cache_dir_round_trip(tmp_path, monkeypatch):
  write_zip(tmp_path / "images_background.zip", fake_members())
  first = omniglot.omniglot_source(data_dir=tmp_path, image_shape=(8, 8, 1), download=False,
                                   cache_dir=tmp_path / "cache")
  monkeypatch.setattr(sources, "decode_image", lambda *a, **k: pytest.fail("cache not used"))
  second = omniglot.omniglot_source(data_dir=tmp_path, image_shape=(8, 8, 1), download=False,
                                    cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(first.images, second.images)


def test_corrupt_png_names_the_file(tmp_path):
  members = fake_members()
  bad = "images_background/Latin/character02/0004_03.png"
  members[bad] = b"\x89PNG\r\n\x1a\n truncated"
  write_zip(tmp_path / "images_background.zip", members)
  with pytest.raises(UserError, match="0004_03.png"):
    omniglot.omniglot_source(data_dir=tmp_path, image_shape=(8, 8, 1), download=False)


def test_unexpected_layout_is_an_error(tmp_path):
  write_zip(tmp_path / "images_background.zip", {"images_background/Greek/0001_01.png": stroke_png(1)})
  with pytest.raises(UserError, match="characterNN"):
    omniglot.omniglot_source(data_dir=tmp_path, download=False)
  with pytest.raises(UserError, match="subset"):
    omniglot.omniglot_source("training", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Missing files and downloads (never the network)


def test_missing_dir_without_download_names_path_and_env(tmp_path, no_omniglot_env):
  with pytest.raises(UserError) as error:
    omniglot.omniglot_source(data_dir=tmp_path / "nowhere", download=False)
  message = str(error.value)
  assert str(tmp_path / "nowhere" / "images_background.zip") in message and "OMNIGLOT_DIR" in message
  # With no data_dir and no OMNIGLOT_DIR, the default ~/.cache folder is named.
  with pytest.raises(UserError, match=r"\.cache/siamese_jax/omniglot.*OMNIGLOT_DIR is not set"):
    omniglot.omniglot_source("evaluation", download=False)
  with pytest.raises(UserError, match="all_runs.zip"):
    omniglot.load_lake_runs(data_dir=tmp_path / "nowhere", download=False)


def test_failed_download_says_what_failed(tmp_path, no_omniglot_env):
  base_url = closed_port_url()
  with pytest.raises(UserError) as error:
    omniglot.omniglot_source(data_dir=tmp_path / "data", base_url=base_url)
  message = str(error.value)
  assert f"{base_url}/images_background.zip" in message
  assert "OMNIGLOT_DIR" in message and str(tmp_path / "data" / "images_background.zip") in message
  assert not any((tmp_path / "data").iterdir())  # no partial file left behind


def test_md5_mismatch_is_rejected(tmp_path):
  mirror = write_zip(tmp_path / "mirror" / "images_evaluation.zip", fake_members("evaluation"))
  base_url = mirror.parent.as_uri()
  with pytest.raises(UserError, match="md5"):
    omniglot.download_omniglot_file("images_evaluation.zip", tmp_path / "data", base_url=base_url)
  assert not any((tmp_path / "data").iterdir())


def test_download_of_the_real_all_runs_zip_from_a_file_mirror(tmp_path, omniglot_dir):
  """all_runs.zip in the shared data is the unchanged official file: its md5 must match."""
  mirror = tmp_path / "mirror" / "one-shot-classification"
  mirror.mkdir(parents=True)
  shutil.copy(omniglot_dir / "all_runs.zip", mirror / "all_runs.zip")
  runs = omniglot.load_lake_runs(data_dir=tmp_path / "data", image_shape=(8, 8, 1),
                                 base_url=(tmp_path / "mirror").as_uri())
  assert (tmp_path / "data" / "all_runs.zip").is_file() and len(runs) == 20


# ------------------------------------------------------------------------------------------------
# Splits


def test_split_by_alphabets_is_deterministic_and_disjoint(tmp_path):
  write_zip(tmp_path / "images_background.zip", fake_members())
  source = omniglot.omniglot_source(data_dir=tmp_path, image_shape=(8, 8, 1), download=False)
  train, validation = omniglot.split_background(source, validation="alphabets",
                                                num_validation_alphabets=1, seed=4)
  again, _ = omniglot.split_background(source, validation="alphabets",
                                       num_validation_alphabets=1, seed=4)
  assert train.file_ids == again.file_ids
  assert len(validation.group_names) == 1 and len(train.group_names) == 2
  assert not set(train.group_names) & set(validation.group_names)
  assert len(train) + len(validation) == len(source)
  assert train.labels.max() == train.num_classes - 1  # renumbered densely
  for bad in (0, 3, 1.5):
    with pytest.raises(UserError, match="num_validation_alphabets"):
      omniglot.split_background(source, num_validation_alphabets=bad)


def test_split_by_drawers_keeps_classes(tmp_path):
  write_zip(tmp_path / "images_background.zip", fake_members())
  source = omniglot.omniglot_source(data_dir=tmp_path, image_shape=(8, 8, 1), in_memory=False,
                                    download=False)
  train, validation = omniglot.split_background(source, validation="drawers",
                                                validation_drawers=[3, 4])
  assert train.class_names == validation.class_names == source.class_names
  assert set(train.drawers.tolist()) == {1, 2} and set(validation.drawers.tolist()) == {3, 4}
  assert omniglot.split_background(source, validation="none") == (source, None)
  with pytest.raises(UserError, match="every drawer"):
    omniglot.split_background(source, validation="drawers", validation_drawers=[1, 2, 3, 4])
  with pytest.raises(UserError, match="validation_drawers"):
    omniglot.split_background(source, validation="drawers", validation_drawers=[13])
  with pytest.raises(UserError, match="validation="):
    omniglot.split_background(source, validation="characters")


# ------------------------------------------------------------------------------------------------
# Lake's runs


def write_fake_runs(path: pathlib.Path) -> pathlib.Path:
  """2 runs of 3-way one-shot: test item i belongs to training class (i + 1) % 3."""
  members = {}
  for run in ("run01", "run02"):
    lines = []
    for index in range(3):
      members[f"{run}/training/class{index + 1:02d}.png"] = stroke_png(row=3 * index)
      members[f"{run}/test/item{index + 1:02d}.png"] = stroke_png(row=3 * ((index + 1) % 3))
      lines.append(f"{run}/test/item{index + 1:02d}.png {run}/training/class{(index + 1) % 3 + 1:02d}.png")
    members[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
  return write_zip(path, members)


def test_fake_lake_runs(tmp_path):
  runs = omniglot.load_lake_runs(write_fake_runs(tmp_path / "all_runs.zip"), (20, 20, 1))
  assert [run.name for run in runs] == ["run01", "run02"]
  run = runs[0]
  assert run.training.shape == run.test.shape == (3, 20, 20, 1)
  assert run.answers.tolist() == [1, 2, 0]
  for item, answer in enumerate(run.answers):  # each test item matches its answer pixel for pixel
    np.testing.assert_array_equal(run.test[item], run.training[answer])
  assert run.training[0][0, 5, 0] == 255 and run.training[0][10, 5, 0] == 0  # ink = 255


def test_bad_lake_labels(tmp_path):
  path = write_fake_runs(tmp_path / "all_runs.zip")
  with zipfile.ZipFile(path, "a") as archive:
    archive.writestr("run03/class_labels.txt", "run03/test/item01.png\n")
  with pytest.raises(UserError, match="run03/class_labels.txt"):
    omniglot.load_lake_runs(path, (8, 8, 1))


# ------------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data/omniglot or OMNIGLOT_DIR is absent). Lazy sources keep
# these fast: listing a zip is instant, and only the images a test looks at are decoded.


@pytest.fixture(scope="module")
def real_background(omniglot_dir):
  return omniglot.omniglot_source("background", data_dir=omniglot_dir, image_shape=(28, 28, 1),
                                  in_memory=False, download=False)


def test_real_background_structure(real_background):
  source = real_background
  assert len(source) == 19280 and source.num_classes == 964 and source.num_groups == 30
  assert np.bincount(source.labels).tolist() == [20] * 964
  for label in (0, 500, 963):
    assert sorted(source.drawers[source.labels == label].tolist()) == list(range(1, 21))
  index = source.file_ids.index("images_background/Greek/character01/0394_01.png")
  assert source.class_names[source.labels[index]] == "Greek/character01"
  assert source.group_names[source.class_groups[source.labels[index]]] == "Greek"
  assert source.drawers[index] == 1


def test_real_background_ink_is_the_minority(real_background):
  sample = np.stack([real_background[i] for i in range(0, len(real_background), 97)])
  assert sample.shape == (199, 28, 28, 1) and sample.dtype == np.uint8
  ink_fraction = (sample > 127).mean()
  assert 0.01 < ink_fraction < 0.25
  assert (sample[:, 0, :, :] == 0).mean() > 0.95  # the border is background, so it is 0


def test_real_evaluation_structure(omniglot_dir):
  source = omniglot.omniglot_source("evaluation", data_dir=omniglot_dir, image_shape=(28, 28, 1),
                                    in_memory=False, download=False)
  assert len(source) == 13180 and source.num_classes == 659 and source.num_groups == 20
  assert set(source.group_names).isdisjoint(omniglot.omniglot_source(
      "background", data_dir=omniglot_dir, in_memory=False, download=False).group_names)


def test_real_lake_runs(omniglot_dir):
  runs = omniglot.load_lake_runs(omniglot_dir / "all_runs.zip", (28, 28, 1))
  assert len(runs) == 20 and runs[0].name == "run01" and runs[-1].name == "run20"
  for run in runs:
    assert run.training.shape == run.test.shape == (20, 28, 28, 1)
    assert sorted(run.answers.tolist()) == list(range(20))
  assert (runs[0].training > 127).mean() < 0.25  # ink = 255 convention here too
  # class_labels.txt of run01 starts "run01/test/item01.png run01/training/class08.png".
  assert runs[0].answers[0] == 7


@pytest.mark.slow
def test_real_background_in_memory_with_cache(omniglot_dir, tmp_path_factory, real_background):
  """Full decode (a few seconds) and a cache hit; run with `pytest -m slow`."""
  cache = tmp_path_factory.mktemp("omniglot_cache")
  source = omniglot.omniglot_source("background", data_dir=omniglot_dir, image_shape=(28, 28, 1),
                                    cache_dir=cache, download=False)
  assert source.images.shape == (19280, 28, 28, 1)
  again = omniglot.omniglot_source("background", data_dir=omniglot_dir, image_shape=(28, 28, 1),
                                   cache_dir=cache, download=False)
  np.testing.assert_array_equal(source.images, again.images)
  for index in (0, 12345, 19279):
    np.testing.assert_array_equal(source[index], real_background[index])


# ---------------------------------------------------------------------------------------------------
# Vinyals et al.'s rotated split, on the real files.

@pytest.fixture(scope="module")
def real_characters(omniglot_dir):
  load = lambda subset: omniglot.omniglot_source(subset, data_dir=omniglot_dir, image_shape=(28, 28, 1),
                                                 download=False)
  return omniglot.vinyals_characters(load("background"), load("evaluation"))


@pytest.mark.parametrize("split, classes", [("train", 4112), ("val", 688), ("trainval", 4800), ("test", 1692)])
def test_vinyals_split_sizes(real_characters, omniglot_dir, split, classes):
  # Published sizes: 1,200 training characters (1,028 train + 172 val) and 423 test characters, x 4 turns.
  source = omniglot.vinyals_source(split, real_characters, data_dir=omniglot_dir)
  assert source.num_classes == classes
  assert len(source) == 20 * classes and np.all(np.bincount(source.labels) == 20)
  assert source.images.shape == (20 * classes, 28, 28, 1)


def test_vinyals_test_characters_are_unseen_by_both_trainings(real_characters, omniglot_dir):
  characters = lambda s: {name.rsplit("/", 1)[0] for name in s.class_names}
  test = omniglot.vinyals_source("test", real_characters, data_dir=omniglot_dir)
  trainval = omniglot.vinyals_source("trainval", real_characters, data_dir=omniglot_dir)
  assert len(characters(test)) == 423 and not characters(test) & characters(trainval)
  background = set(real_characters.class_names[:964])  # the background set comes first
  assert not characters(test) & background  # so a background-trained model never saw them either


def test_vinyals_rotations_are_quarter_turns_of_the_same_drawings(real_characters, omniglot_dir):
  test = omniglot.vinyals_source("test", real_characters, data_dir=omniglot_dir)
  first = test.class_names[0].rsplit("/", 1)[0]
  by_turn = {}
  for degrees in (0, 90, 180, 270):
    records = np.flatnonzero(test.labels == test.class_names.index(f"{first}/rot{degrees:03d}"))
    assert [test.file_ids[r].rsplit("#", 1)[1] for r in records] == [f"rot{degrees:03d}"] * 20
    by_turn[degrees] = test.images[records]
    # Same group (alphabet) for every turn.
    assert test.group_names[test.class_groups[test.labels[records[0]]]] == first.split("/")[0]
  for degrees in (90, 180, 270):
    np.testing.assert_array_equal(by_turn[degrees], np.rot90(by_turn[0], k=degrees // 90, axes=(1, 2)))
  assert not np.array_equal(by_turn[90], by_turn[0])  # a drawing is not its own quarter turn


def test_vinyals_bad_line_and_missing_file_are_user_errors(real_characters, tmp_path):
  folder = tmp_path / "splits" / "vinyals"
  folder.mkdir(parents=True)
  (folder / "train.txt").write_text("Greek/character01/rot000\nGreek/character01/rot045\n")
  with pytest.raises(UserError, match=r"train.txt:2: 'Greek/character01/rot045' is not"):
    omniglot.vinyals_source("train", real_characters, data_dir=tmp_path)
  with pytest.raises(UserError, match=r"splits/vinyals/val.txt not found"):
    omniglot.vinyals_source("val", real_characters, data_dir=tmp_path)
