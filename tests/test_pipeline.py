"""Tests of siamese_jax.data.pipeline: process sharding, exact resume, prefetch states, splits, the batch."""

import json

import numpy as np
from PIL import Image
import pytest

from siamese_jax.configs import omniglot as omniglot_config
from siamese_jax.data import pipeline, sampling, sources
from siamese_jax.errors import UserError


def make_sampler(source, kind="pairs", batch_size=8, seed=0, m_per_class=2):
  index = sampling.ClassIndex.from_labels(source.labels, source.class_groups, source.class_names)
  return sampling.Sampler(index, kind, batch_size, seed=seed, m_per_class=m_per_class)


class RecordImages:
  """A picklable lazy loader whose image i is filled with the value i (tells which record was read)."""

  def __call__(self, index: int) -> np.ndarray:
    return np.full((3, 3, 1), index, np.uint8)


def lazy_source(num_classes=6, per_class=3) -> sources.ImageSource:
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  return sources.ImageSource(
      labels=labels, class_names=[f"c{c}" for c in range(num_classes)],
      class_groups=np.zeros(num_classes, np.int32), group_names=[""],
      file_ids=[str(i) for i in range(len(labels))], drawers=np.full(len(labels), -1, np.int32),
      image_shape=(3, 3, 1), loader=RecordImages())


@pytest.fixture(scope="module")
def source():
  return sources.synthetic_source(num_classes=6, per_class=4, image_shape=(5, 5, 1))


@pytest.mark.parametrize("kind, k", [("pairs", 2), ("triplets", 3), ("m_per_class", 1)])
def test_batch_contract_dtypes_shapes_and_pixels(source, kind, k):
  sampler = make_sampler(source, kind, batch_size=8)
  batch = pipeline.BatchBuilder(source, sampler)(3)
  assert set(batch) == {"images", "labels"}
  assert batch["images"].dtype == np.uint8 and batch["images"].shape == (8, k, 5, 5, 1)
  assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (8, k)
  records, labels = sampler(3)
  np.testing.assert_array_equal(batch["images"], source.images[records])
  np.testing.assert_array_equal(batch["labels"], labels)


def test_lazy_source_gathers_the_same_records():
  source = lazy_source()
  records = np.array([[0, 5], [17, 2], [9, 9]])
  images = pipeline.gather_images(source, records)
  assert images.shape == (3, 2, 3, 3, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[:, :, 1, 1, 0], records)
  np.testing.assert_array_equal(pipeline.all_images(source)[:, 0, 0, 0], np.arange(18))


@pytest.mark.parametrize("kind", ["pairs", "m_per_class"])
def test_process_rows_concatenate_to_the_global_batch(source, kind):
  sampler = make_sampler(source, kind, batch_size=8)
  whole = pipeline.BatchBuilder(source, sampler)(5)
  parts = [pipeline.BatchBuilder(source, sampler, process_index=i, process_count=2)(5) for i in range(2)]
  assert parts[0]["images"].shape[0] == 4
  for key in ("images", "labels"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  # The two halves differ: each process got its own rows, not a copy of the first half.
  assert not np.array_equal(parts[0]["images"], parts[1]["images"])


def test_batch_not_divisible_by_processes_is_a_user_error(source):
  with pytest.raises(UserError, match="not divisible by the number of processes"):
    pipeline.BatchBuilder(source, make_sampler(source, batch_size=6), process_count=4)


def assert_same_batch(a, b):
  for key in ("images", "labels"):
    np.testing.assert_array_equal(a[key], b[key])


def check_resume(source, num_workers, resume_after=3, num_steps=7):
  sampler = make_sampler(source, batch_size=4)
  make = lambda: iter(pipeline.train_dataset(source, sampler, num_steps=num_steps,
                                             num_workers=num_workers))
  iterator = make()
  for _ in range(resume_after):
    next(iterator)
  # Through JSON, as the checkpoint stores it (checkpoint.py saves it with Orbax's JsonSave).
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(num_steps - resume_after)]
  resumed = make()
  resumed.set_state(state)
  got = list(resumed)  # also checks the stream ends after num_steps batches
  assert len(got) == len(expected)
  for step, (a, b) in enumerate(zip(got, expected), start=resume_after):
    assert_same_batch(a, b)
    assert_same_batch(a, pipeline.BatchBuilder(source, sampler)(step))  # batch n is BatchBuilder(n)


def test_iterator_state_resumes_with_the_next_batch(source):
  check_resume(source, num_workers=0)


def test_iterator_state_resumes_with_worker_processes():
  # Grain spawns its workers (a fresh interpreter each), and they refuse to start until absl flags are
  # parsed. A lazy source also checks that the loader survives pickling.
  from absl import flags
  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  try:
    check_resume(lazy_source(), num_workers=1)
  finally:
    if not was_parsed:  # leave the global flag state as other tests found it
      flags.FLAGS.unparse_flags()


def test_prefetch_yields_the_state_that_resumes_at_the_next_batch(source):
  sampler = make_sampler(source, batch_size=4)
  make = lambda: iter(pipeline.train_dataset(source, sampler, num_steps=6))
  put_calls = []
  put = lambda batch: put_calls.append(1) or {"on_device": batch}
  yielded = list(pipeline.prefetch_to_device(make(), put, size=2))
  assert len(yielded) == len(put_calls) == 6
  for step, (device_batch, state) in enumerate(yielded):
    assert_same_batch(device_batch["on_device"], pipeline.BatchBuilder(source, sampler)(step))
    resumed = make()
    resumed.set_state(state)
    following = next(resumed, None)
    if step + 1 < 6:
      assert_same_batch(following, pipeline.BatchBuilder(source, sampler)(step + 1))
    else:
      assert following is None  # the state after the last batch is the end of the stream


def test_prefetch_state_is_not_the_run_ahead_iterator_state(source):
  sampler = make_sampler(source, batch_size=4)
  iterator = iter(pipeline.train_dataset(source, sampler, num_steps=6))
  batches = pipeline.prefetch_to_device(iterator, lambda batch: batch, size=3)
  _, state = next(batches)
  # Batches 0, 1, 2 were drawn to fill the queue, so the live iterator is 3 batches in; the state
  # handed out with batch 0 must still say "1 batch consumed", or a resume would skip batches 1 and 2.
  assert iterator.get_state() == make_state_after(3, source, sampler)
  assert state == make_state_after(1, source, sampler)


def make_state_after(num_batches, source, sampler):
  iterator = iter(pipeline.train_dataset(source, sampler, num_steps=6))
  for _ in range(num_batches):
    next(iterator)
  return iterator.get_state()


def small_config(**data):
  config = omniglot_config.get_config("smoke")
  config.data.image_size = 8
  for key, value in data.items():
    config.data[key] = value
  return config


def class_names(split):
  return set() if split is None else set(split.class_names)


def check_disjoint(splits, total_classes, sizes):
  names = [class_names(splits.train), class_names(splits.validation), class_names(splits.test)]
  assert [len(n) for n in names] == list(sizes)
  assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
  assert len(names[0] | names[1] | names[2]) == total_classes


def test_synthetic_splits_are_disjoint_and_seeded():
  config = small_config(source="synthetic", synthetic_classes=20, test_fraction=0.2,
                        validation_fraction=0.2)
  splits = pipeline.load_splits(config.data, seed=0)
  # 20 classes: test round(0.2 * 20) = 4; validation 0.2 / (1 - 0.2) = 0.25 of the 16 left = 4.
  check_disjoint(splits, 20, (12, 4, 4))
  assert splits.train.images.shape == (12 * 20, 8, 8, 1) and splits.train.images.dtype == np.uint8
  again = pipeline.load_splits(config.data, seed=0)
  for split in ("train", "validation", "test"):
    assert getattr(again, split).class_names == getattr(splits, split).class_names
  other = pipeline.load_splits(config.data, seed=1)
  assert other.test.class_names != splits.test.class_names



def test_split_seed_fixes_the_held_out_classes_across_run_seeds():
  config = small_config(source="synthetic", synthetic_classes=20, test_fraction=0.2,
                        validation_fraction=0.2)
  by_run_seed = [pipeline.load_splits(config.data, seed=seed) for seed in (0, 1)]
  assert by_run_seed[0].validation.class_names != by_run_seed[1].validation.class_names
  config.data.split_seed = 0  # a second run seed, judged on the first one's classes
  assert pipeline.split_seed(config.data, 1) == 0
  fixed = pipeline.load_splits(config.data, seed=1)
  for split in ("train", "validation", "test"):
    assert getattr(fixed, split).class_names == getattr(by_run_seed[0], split).class_names
  config.data.split_seed = -1  # the default: the run's seed draws them
  assert pipeline.split_seed(config.data, 1) == 1

def test_no_validation_when_fraction_is_zero():
  config = small_config(source="synthetic", synthetic_classes=10, validation_fraction=0.0)
  splits = pipeline.load_splits(config.data, seed=0)
  assert splits.validation is None
  check_disjoint(splits, 10, (8, 0, 2))


def make_folder(root, num_classes=10, per_class=2):
  for c in range(num_classes):
    folder = root / f"class{c:02d}"
    folder.mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(np.full((12, 12), 20 * c + i, np.uint8)).save(folder / f"{i}.png")
  return root


def test_folder_splits_are_disjoint_and_seeded(tmp_path):
  root = make_folder(tmp_path / "images")
  config = small_config(source="folder", path=str(root), test_fraction=0.2, validation_fraction=0.2)
  splits = pipeline.load_splits(config.data, seed=3)
  # 10 classes: 2 test, then 0.25 of the 8 left = 2 validation, 6 train.
  check_disjoint(splits, 10, (6, 2, 2))
  assert splits.train.image_shape == (8, 8, 1)
  # Pixels follow their class through the split (a solid 20c + i image stays 20c + i when resized).
  for split in (splits.train, splits.validation, splits.test):
    for image, label, file_id in zip(split.images, split.labels, split.file_ids):
      class_number = int(file_id.split("/")[0][len("class"):])
      assert split.class_names[label] == f"class{class_number:02d}"
      assert image[4, 4, 0] == 20 * class_number + int(file_id.split("/")[1][0])
  again = pipeline.load_splits(config.data, seed=3)
  assert again.test.class_names == splits.test.class_names
  assert again.validation.class_names == splits.validation.class_names


def test_folder_without_path_and_unknown_source_are_user_errors():
  with pytest.raises(UserError, match="data.path"):
    pipeline.load_splits(small_config(source="folder", path="").data, seed=0)
  with pytest.raises(UserError, match="data.source='nope'"):
    pipeline.load_splits(small_config(source="nope").data, seed=0)


@pytest.mark.parametrize("test_fraction, validation_fraction", [(0.0, 0.1), (1.0, 0.0), (0.5, 0.5), (0.2, -0.1)])
def test_bad_split_fractions_name_the_fields(test_fraction, validation_fraction):
  config = small_config(source="synthetic", synthetic_classes=10, test_fraction=test_fraction,
                        validation_fraction=validation_fraction)
  with pytest.raises(UserError, match="data.test_fraction=.* and data.validation_fraction="):
    pipeline.load_splits(config.data, seed=0)


@pytest.fixture(scope="module")
def omniglot_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("decoded")  # decoded once, then read back by each load below


def real_omniglot_config(omniglot_dir, cache, **data):
  config = small_config(source="omniglot", data_dir=str(omniglot_dir), image_size=28, download=False,
                        cache_dir=str(cache))
  config.data.update(data)
  return config


def test_omniglot_lake_splits_also_carry_the_vinyals_test_classes(omniglot_dir, omniglot_cache):
  splits = pipeline.load_splits(real_omniglot_config(omniglot_dir, omniglot_cache).data, seed=0)
  # 30 background alphabets (964 characters): 5 held out; test = the 20 evaluation alphabets.
  assert splits.train.num_groups + splits.validation.num_groups == 30
  assert splits.train.num_classes + splits.validation.num_classes == 964
  assert splits.test.num_classes == 659 and len(splits.lake_runs) == 20
  assert splits.vinyals_test.num_classes == 1692
  test_characters = {name.rsplit("/", 1)[0] for name in splits.vinyals_test.class_names}
  assert test_characters <= set(splits.test.class_names)  # evaluation characters, unseen in training


@pytest.mark.parametrize("validation, sizes", [("alphabets", (4112, 688, 1692)), ("none", (4800, 0, 1692))])
def test_omniglot_vinyals_splits(omniglot_dir, omniglot_cache, validation, sizes):
  config = real_omniglot_config(omniglot_dir, omniglot_cache, omniglot_split="vinyals", validation=validation)
  splits = pipeline.load_splits(config.data, seed=0)
  check_disjoint(splits, sum(sizes), sizes)
  assert splits.lake_runs == [] and splits.vinyals_test is splits.test


@pytest.mark.parametrize("data, message", [
    (dict(omniglot_split="vinyals", validation="drawers"), "expected 'alphabets' .* or 'none'"),
    (dict(omniglot_split="koch"), "data.omniglot_split='koch' is not one of"),
])
def test_omniglot_split_mistakes_are_user_errors(omniglot_dir, omniglot_cache, data, message):
  with pytest.raises(UserError, match=message):
    pipeline.load_splits(real_omniglot_config(omniglot_dir, omniglot_cache, **data).data, seed=0)


def test_train_class_rotations_turn_only_the_train_classes(omniglot_dir, omniglot_cache):
  plain = pipeline.load_splits(real_omniglot_config(omniglot_dir, omniglot_cache).data, seed=0)
  config = real_omniglot_config(omniglot_dir, omniglot_cache, train_class_rotations=(90, 180, 270))
  splits = pipeline.load_splits(config.data, seed=0)
  # Each train character in 4 orientations, each orientation of an alphabet an alphabet of its own.
  assert splits.train.num_classes == 4 * plain.train.num_classes
  assert splits.train.num_groups == 4 * plain.train.num_groups
  assert splits.train.class_names[:plain.train.num_classes] == plain.train.class_names
  np.testing.assert_array_equal(splits.train.images[len(plain.train):2 * len(plain.train)],
                                np.rot90(plain.train.images, axes=(1, 2)))
  for name in ("validation", "test", "vinyals_test"):  # what is held out stays as it is
    assert getattr(splits, name).file_ids == getattr(plain, name).file_ids
  assert len(splits.lake_runs) == 20


@pytest.mark.parametrize("data, message", [
    (dict(train_class_rotations=(90, 45)), r"data.train_class_rotations: .*\(90, 45\): expected distinct"),
    (dict(omniglot_split="vinyals", train_class_rotations=(180,)), "that split's classes are rotated already"),
])
def test_train_class_rotation_mistakes_are_user_errors(omniglot_dir, omniglot_cache, data, message):
  with pytest.raises(UserError, match=message):
    pipeline.load_splits(real_omniglot_config(omniglot_dir, omniglot_cache, **data).data, seed=0)
