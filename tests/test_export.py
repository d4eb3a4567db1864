"""Embedding export: the .npz holds the eval's own embeddings and every field, streams batch by batch, and
loads back; bad files are explained."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from siamese_jax.data import pipeline
from siamese_jax.errors import UserError
from siamese_jax.metrics.embedding import embedding_batches
from siamese_jax.modes import export
from siamese_jax.trained import load_image_file, load_trained_model
from siamese_jax.workdir import config_hash, read_config
from trained_workdir import TEST_CLASSES, copy_of, trained_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  return trained_workdir(tmp_path_factory)


def test_export_holds_the_embeddings_the_eval_computes(workdir, tmp_path):
  output = tmp_path / "test.npz"
  summary = export.export_workdir(workdir, split="test", output=output, batch_size=128, progress=False)
  assert summary == {"path": str(output), "records": TEST_CLASSES * 20, "dim": 64, "split": "test",
                     "step": summary["step"], "classes": TEST_CLASSES}
  exported = export.load_embeddings(output)
  # The eval embeds the test split with the same function, batch size and order: equal to the bit.
  model = load_trained_model(workdir)
  test = pipeline.load_splits(model.config.data, seed=model.config.seed).test
  np.testing.assert_array_equal(exported.embeddings, model.embed(test, batch_size=128))
  assert exported.embeddings.dtype == np.float32 and exported.embeddings.shape == (400, 64)
  np.testing.assert_array_equal(exported.labels, test.labels)
  assert exported.labels.dtype == np.int32
  assert exported.class_names == test.class_names and exported.group_names == test.group_names
  np.testing.assert_array_equal(exported.class_groups, test.class_groups)
  assert exported.file_ids == test.file_ids
  np.testing.assert_array_equal(exported.drawers, test.drawers)
  assert exported.split == "test" and exported.step == model.step == summary["step"]
  assert exported.config_hash == model.config_hash == config_hash(read_config(workdir))
  assert exported.model == "conv4" and exported.checkpoint == str(model.checkpoint_dir)
  # Plain numpy can read it, without pickles.
  with np.load(output, allow_pickle=False) as raw:
    assert str(raw["split"]) == "test" and raw["class_names"].dtype.kind == "U"


def test_export_of_an_image_folder_reads_it_lazily(workdir, tmp_path):
  workdir = copy_of(workdir, tmp_path / "run")
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    (tmp_path / "images" / name).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
  summary = export.export_workdir(workdir, images=tmp_path / "images", batch_size=4, progress=False)
  assert summary["path"] == str(workdir / "eval" / "embeddings_images.npz")
  exported = export.load_embeddings(summary["path"])
  assert exported.split == "folder" and exported.class_names == ["cat", "dog"]
  assert exported.file_ids == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
  model = load_trained_model(workdir)
  images = np.stack([load_image_file(tmp_path / "images" / f, model.image_shape, invert=False)[0]
                     for f in exported.file_ids])
  np.testing.assert_array_equal(exported.embeddings, model.embed(images, batch_size=4))


def test_embeddings_are_streamed_one_batch_at_a_time(tmp_path):
  produced = []

  def batches():
    for start in range(0, 10, 3):
      batch = np.arange(start, min(start + 3, 10), dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
      produced.append(len(batch))
      yield batch

  records, dim = export.write_embeddings(tmp_path / "x.npz", batches(), num_records=10,
                                         metadata={"labels": np.zeros(10, np.int32)})
  assert (records, dim) == (10, 2) and produced == [3, 3, 3, 1]
  with np.load(tmp_path / "x.npz") as data:
    np.testing.assert_array_equal(data["embeddings"], np.repeat(np.arange(10, dtype=np.float32)[:, None], 2, 1))
  # A count that does not match leaves no file behind (nor its temporary).
  with pytest.raises(RuntimeError, match="wrote 10 embeddings, expected 11"):
    export.write_embeddings(tmp_path / "y.npz", batches(), num_records=11, metadata={})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]


def test_export_errors(workdir, tmp_path):
  with pytest.raises(UserError, match="split='val' is not one of"):
    export.export_workdir(workdir, split="val")
  with pytest.raises(UserError, match=r"missing.npz: not found; write it with `python launch.py --mode=export"):
    export.load_embeddings(tmp_path / "missing.npz")
  np.savez(tmp_path / "other.npz", embeddings=np.zeros((2, 2)))
  with pytest.raises(UserError, match=r"not a siamese_jax embedding export \(missing \['labels'"):
    export.load_embeddings(tmp_path / "other.npz")
  (tmp_path / "broken.npz").write_bytes(b"not a zip")
  with pytest.raises(UserError, match="cannot read it as an .npz export"):
    export.load_embeddings(tmp_path / "broken.npz")
  with pytest.raises(UserError, match="no images to embed"):
    list(embedding_batches(lambda v, x: x, None, np.zeros((0, 2, 2, 1), np.uint8)))
