"""The projector mode: TensorBoard's projector files hold the model's embeddings of the chosen images, their
labels and a sprite of their thumbnails within the projector's size limit."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from siamese_jax.data import pipeline
from siamese_jax.errors import UserError
from siamese_jax.modes import projector
from siamese_jax.trained import load_trained_model
from trained_workdir import TEST_CLASSES, copy_of, trained_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  return trained_workdir(tmp_path_factory)


def test_projector_files_hold_the_embeddings_labels_and_sprite(workdir, tmp_path):
  output = tmp_path / "projector"
  result = projector.projector_workdir(workdir, split="test", output=output, max_points=50, progress=False)
  # 50 of the 400 test images (20 classes x 20), drawn with the run's seed; a grid of ceil(sqrt(50)) = 8
  # columns of 28x28 thumbnails.
  assert (result["points"], result["of"], result["dim"]) == (50, TEST_CLASSES * 20, 64)
  assert result["sprite"] == "224x224 px, thumbnails 28x28" and result["view"] == f"tensorboard --logdir {output}"
  assert (output / "projector_config.pbtxt").read_text() == (
      'embeddings {\n  tensor_name: "test embeddings, step %d"\n  tensor_path: "tensors.tsv"\n'
      '  metadata_path: "metadata.tsv"\n  sprite {\n    image_path: "sprite.png"\n    single_image_dim: 28\n'
      '    single_image_dim: 28\n  }\n}\n' % result["step"])
  lines = (output / "metadata.tsv").read_text().splitlines()
  assert lines[0] == "class\tgroup\tfile" and len(lines) == 51
  rows = [line.split("\t") for line in lines[1:]]
  # The rows are the test images their file ids name, and the tensors are their embeddings, to the bit
  # (%.9g round-trips float32).
  model = load_trained_model(workdir)
  test = pipeline.load_splits(model.config.data, seed=model.config.seed).test
  records = [test.file_ids.index(file) for _, _, file in rows]
  assert records == sorted(records) and len(set(records)) == 50
  assert [row[0] for row in rows] == [test.class_names[test.labels[r]] for r in records]
  assert [row[1] for row in rows] == [test.group_names[test.class_groups[test.labels[r]]] for r in records]
  tensors = np.loadtxt(output / "tensors.tsv", delimiter="\t", dtype=np.float32)
  images = pipeline.all_images(test)[records]
  np.testing.assert_array_equal(tensors, model.embed(images))
  with Image.open(output / "sprite.png") as sprite:
    assert sprite.size == (224, 224) and sprite.mode == "L"
    pixels = np.asarray(sprite)
  np.testing.assert_array_equal(pixels[28:56, 0:28], images[8, ..., 0])  # row 1, column 0: the 9th point
  assert (pixels[6 * 28:, 2 * 28:] == 255).all()  # after the 50th cell: white


def test_a_folder_of_drawings_is_read_inverted_and_shown_as_its_files_look(workdir, tmp_path):
  rng = np.random.default_rng(1)
  files = {}
  for name in ("a", "b"):
    (tmp_path / "drawings" / name).mkdir(parents=True)
    for i in range(3):
      files[f"{name}/{i}.png"] = rng.integers(0, 256, (28, 28), dtype=np.uint8)
      Image.fromarray(files[f"{name}/{i}.png"]).save(tmp_path / "drawings" / f"{name}/{i}.png")
  workdir = copy_of(workdir, tmp_path / "run")  # the default output goes into the workdir
  result = projector.projector_workdir(workdir, images=tmp_path / "drawings", invert="yes", progress=False)
  output = workdir / "eval" / "projector"
  assert result["written"] == str(output) and (result["points"], result["classes"]) == (6, 2)
  lines = (output / "metadata.tsv").read_text().splitlines()
  assert lines == ["class\tfile"] + [f"{f.split('/')[0]}\t{f}" for f in files]  # no groups: no group column
  drawn = np.stack(list(files.values()))[..., None]
  tensors = np.loadtxt(output / "tensors.tsv", delimiter="\t", dtype=np.float32)
  np.testing.assert_array_equal(tensors, load_trained_model(workdir).embed(255 - drawn))  # the model sees ink bright
  with Image.open(output / "sprite.png") as sprite:
    pixels = np.asarray(sprite)
  np.testing.assert_array_equal(pixels[28:56, 28:56], drawn[4, ..., 0])  # the sprite shows the file itself


def test_sprites_fit_the_projectors_limit_and_keep_proportions():
  images = np.random.default_rng(0).integers(0, 256, (10, 40, 20, 3), dtype=np.uint8)
  sprite, cell = projector.sprite_image(images)
  assert sprite.size == (4 * 20, 4 * 40) and cell == (20, 40) and sprite.mode == "RGB"
  # 4 columns of 40-px-tall thumbnails exceed a 100 px limit: each shrinks to 25 px tall, 12 wide.
  sprite, cell = projector.sprite_image(images, max_px=100)
  assert cell == (12, 25) and sprite.size == (48, 100)


def test_projector_errors(workdir, tmp_path):
  with pytest.raises(UserError, match="max_points=0: expected a positive number"):
    projector.projector_workdir(workdir, max_points=0)
  with pytest.raises(UserError, match="split='val' is not one of"):
    projector.projector_workdir(workdir, split="val")
