"""Tests of siamese_jax.data.sampling: determinism, pair/triplet/m-per-class structure, hard negatives."""

import numpy as np
import pytest

from siamese_jax.data import sampling, sources
from siamese_jax.errors import UserError


def index_of(source: sources.ImageSource) -> sampling.ClassIndex:
  return sampling.ClassIndex.from_labels(source.labels, source.class_groups, source.class_names)


def shuffled_source(class_sizes, class_groups, seed=0) -> sources.ImageSource:
  """Records of each class scattered in a random order (not one block per class), so that a sampler
  mixing up "position in the class" with "record index" gives wrong labels."""
  labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
  labels = np.random.default_rng(seed).permutation(labels)
  # Pixel value = record index: a gathered image tells which record it came from.
  images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  num_groups = max(class_groups) + 1
  return sources.ImageSource.from_arrays(
      images, labels, class_names=[f"g{g}/c{c}" for c, g in enumerate(class_groups)],
      class_groups=np.asarray(class_groups), group_names=[f"g{g}" for g in range(num_groups)])


@pytest.fixture(scope="module")
def source():
  # 8 classes: group 0 = classes {0, 1}, group 1 = classes {2..7}; 5, 3, 4, ... images per class.
  return shuffled_source([5, 3, 4, 6, 2, 5, 3, 4], [0, 0, 1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("kind", ["pairs", "triplets", "m_per_class"])
def test_same_seed_and_step_give_the_same_batch(source, kind):
  make = lambda seed: sampling.Sampler(index_of(source), kind, 8, seed=seed, m_per_class=2)
  records, labels = make(3)(17)
  again_records, again_labels = make(3)(17)  # a fresh sampler: nothing carried between calls
  np.testing.assert_array_equal(records, again_records)
  np.testing.assert_array_equal(labels, again_labels)
  assert not np.array_equal(records, make(3)(18)[0])
  assert not np.array_equal(records, make(4)(17)[0])


def test_pairs_are_interleaved_half_positive_with_distinct_records(source):
  sampler = sampling.Sampler(index_of(source), "pairs", 10, seed=0)
  assert sampler.k == 2
  for step in range(20):
    records, labels = sampler(step)
    assert records.shape == labels.shape == (10, 2) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, source.labels[records])
    same = labels[:, 0] == labels[:, 1]
    np.testing.assert_array_equal(same, [True, False] * 5)
    assert np.all(records[same, 0] != records[same, 1])


def test_triplets_anchor_positive_same_class_distinct_negative_other_class(source):
  sampler = sampling.Sampler(index_of(source), "triplets", 16, seed=1)
  assert sampler.k == 3
  for step in range(20):
    records, labels = sampler(step)
    assert records.shape == (16, 3)
    np.testing.assert_array_equal(labels, source.labels[records])
    assert np.all(labels[:, 0] == labels[:, 1])
    assert np.all(records[:, 0] != records[:, 1])
    assert np.all(labels[:, 2] != labels[:, 0])


def test_m_per_class_gives_b_over_m_classes_with_m_distinct_records(source):
  sampler = sampling.Sampler(index_of(source), "m_per_class", 12, seed=2, m_per_class=2)
  assert sampler.k == 1
  for step in range(20):
    records, labels = sampler(step)
    assert records.shape == labels.shape == (12, 1)
    np.testing.assert_array_equal(labels, source.labels[records])
    blocks = labels[:, 0].reshape(6, 2)
    assert np.all(blocks == blocks[:, :1])  # m consecutive rows per class
    assert len(set(blocks[:, 0])) == 6
    for block in records[:, 0].reshape(6, 2):
      assert len(set(block)) == 2


def test_m_per_class_uses_every_image_of_a_class_with_exactly_m():
  # Class sizes equal to m: all members must be drawn, none twice (padding slots never picked).
  source = shuffled_source([2, 2, 2, 5], [0, 0, 0, 0])
  sampler = sampling.Sampler(index_of(source), "m_per_class", 4, seed=0, m_per_class=2)
  for step in range(10):
    records, labels = sampler(step)
    for block, block_labels in zip(records[:, 0].reshape(2, 2), labels[:, 0].reshape(2, 2)):
      members = np.flatnonzero(source.labels == block_labels[0])
      assert set(block) <= set(members) and len(set(block)) == 2
      if len(members) == 2:
        assert set(block) == set(members)


def batch_classes(sampler, step):
  labels = sampler(step)[1][:, 0]
  classes = labels[:: sampler.m_per_class]
  np.testing.assert_array_equal(labels, np.repeat(classes, sampler.m_per_class))
  return classes


def test_classes_per_group_fills_batches_group_by_group(source):
  # 4 classes a batch, at most 2 per group: group 0 has exactly 2 ({0, 1}), group 1 gives 2 of its 6, so
  # whatever the group order, every batch is {0, 1} plus two distinct classes of group 1.
  sampler = sampling.Sampler(index_of(source), "m_per_class", 8, seed=3, m_per_class=2, classes_per_group=2)
  seen = set()
  for step in range(40):
    classes = batch_classes(sampler, step)
    assert len(set(classes)) == 4 and {0, 1} <= set(classes)
    assert np.all(source.class_groups[[c for c in classes if c > 1]] == 1)
    seen |= set(classes)
    np.testing.assert_array_equal(sampler(step)[0], sampler(step)[0])
  assert seen == set(range(8))  # group 1's classes are drawn at random, not always the same two


def test_classes_per_group_takes_the_first_group_whole_up_to_the_cap(source):
  # At most 3 per group, 4 classes: group 0 first gives (2 from group 0, 2 from group 1); group 1 first
  # gives (3 from group 1, 1 from group 0). Both orders occur; no other split can.
  sampler = sampling.Sampler(index_of(source), "m_per_class", 8, seed=4, m_per_class=2, classes_per_group=3)
  splits = set()
  for step in range(40):
    groups = source.class_groups[batch_classes(sampler, step)]
    splits.add((int(np.sum(groups == 0)), int(np.sum(groups == 1))))
  assert splits == {(2, 2), (1, 3)}


def test_classes_per_group_too_small_for_the_batch_is_a_user_error(source):
  with pytest.raises(UserError, match="classes_per_group=1 gives at most 2 classes"):
    sampling.Sampler(index_of(source), "m_per_class", 8, seed=0, m_per_class=2, classes_per_group=1)


def same_group_fraction(source, probability, steps=100, batch_size=64):
  sampler = sampling.Sampler(index_of(source), "triplets", batch_size, seed=5,
                             same_group_negative_probability=probability)
  labels = np.concatenate([sampler(step)[1] for step in range(steps)])
  assert np.all(labels[:, 2] != labels[:, 0])
  groups = source.class_groups[labels]
  return np.mean(groups[:, 2] == groups[:, 0]), labels


def test_same_group_probability_one_keeps_negatives_in_the_anchor_group(source):
  fraction, labels = same_group_fraction(source, 1.0, steps=20)
  assert fraction == 1.0
  # Both groups served as anchors and both supplied negatives (not a degenerate draw).
  assert set(source.class_groups[labels[:, 0]]) == {0, 1}


def test_same_group_probability_one_falls_back_for_a_single_class_group():
  # Class 3 is alone in group 1: its negatives must come from group 0 (the only other classes).
  source = shuffled_source([3, 3, 3, 3], [0, 0, 0, 1])
  fraction, labels = same_group_fraction(source, 1.0, steps=20)
  alone = labels[:, 0] == 3
  assert alone.any() and np.all(labels[alone, 2] != 3)
  assert np.all(source.class_groups[labels[~alone, 2]] == 0)


@pytest.mark.parametrize("probability, expected", [
    # Uniform anchor class (8 classes), uniform negative among the 7 others. Anchor in group 0 (2 of 8
    # classes): 1 of 7 others shares its group; in group 1 (6 of 8): 5 of 7. (2/8)(1/7) + (6/8)(5/7)
    # = 32/56 = 4/7.
    (0.0, 4 / 7),
    # Half the time forced into the group, otherwise as above: 1/2 + (1/2)(4/7) = 11/14.
    (0.5, 11 / 14),
])
def test_same_group_fraction_matches_hand_computed_proportion(source, probability, expected):
  fraction, labels = same_group_fraction(source, probability)
  # 6400 triplets: standard error sqrt(p(1-p)/n) <= 0.0063, so 0.03 is more than 4.5 standard errors.
  assert abs(fraction - expected) < 0.03
  assert len(labels) == 6400


def test_pairs_need_two_images_in_every_class():
  source = shuffled_source([3, 1, 3], [0, 0, 0])
  with pytest.raises(UserError, match="'g0/c1' has 1 image"):
    sampling.Sampler(index_of(source), "pairs", 4, seed=0)
  with pytest.raises(UserError, match="'g0/c1' has 1 image"):
    sampling.Sampler(index_of(source), "triplets", 4, seed=0)


def test_m_per_class_needs_m_images_in_every_class():
  source = shuffled_source([4, 4, 3, 4], [0, 0, 0, 0])
  with pytest.raises(UserError, match="'g0/c2' has 3 image"):
    sampling.Sampler(index_of(source), "m_per_class", 8, seed=0, m_per_class=4)


def test_batch_size_must_be_a_multiple_of_m():
  source = shuffled_source([4, 4, 4, 4], [0, 0, 0, 0])
  with pytest.raises(UserError, match="batch_size=10 must be a multiple of sampling.m_per_class=4"):
    sampling.Sampler(index_of(source), "m_per_class", 10, seed=0, m_per_class=4)


def test_too_few_classes():
  source = shuffled_source([4, 4, 4], [0, 0, 0])
  with pytest.raises(UserError, match="at least 4 classes; the dataset has 3"):
    sampling.Sampler(index_of(source), "m_per_class", 8, seed=0, m_per_class=2)
  one_class = shuffled_source([5], [0])
  with pytest.raises(UserError, match="at least 2 classes; the dataset has 1"):
    sampling.Sampler(index_of(one_class), "pairs", 4, seed=0)


@pytest.mark.parametrize("bad", [
    dict(kind="quadruplets"), dict(batch_size=0), dict(same_group_negative_probability=1.5),
    dict(same_group_negative_probability=-0.1)])
def test_bad_settings_are_user_errors(source, bad):
  settings = dict(kind="pairs", batch_size=4, seed=0) | bad
  with pytest.raises(UserError):
    sampling.Sampler(index_of(source), **settings)
