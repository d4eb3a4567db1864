"""Tests of siamese_jax.evaluate: episodes, prototype accuracy on hand-made embeddings, Lake runs."""

import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import evaluate
from siamese_jax.data.omniglot import LakeRun
from siamese_jax.errors import UserError


def grouped_labels(classes_per_group=(2, 3, 4), per_class=4):
  """Records in class order, per_class each; class c in group class_groups[c]."""
  class_groups = np.repeat(np.arange(len(classes_per_group)), classes_per_group)
  labels = np.repeat(np.arange(len(class_groups)), per_class)
  # Shuffled record order, so an episode sampler that assumes one block per class gives wrong labels.
  order = np.random.default_rng(0).permutation(len(labels))
  return labels[order], class_groups


def check_episode_structure(episodes, labels, ways, shots, queries, num_episodes):
  assert episodes.support.shape == (num_episodes, ways, shots)
  assert episodes.query.shape == (num_episodes, ways, queries)
  for support, query in zip(episodes.support, episodes.query):
    # Row n of support and query: records of one class, the same class for both, N distinct classes.
    classes = labels[support[:, 0]]
    assert np.all(labels[support] == classes[:, None])
    assert np.all(labels[query] == classes[:, None])
    assert len(set(classes)) == ways
    records = np.concatenate([support.ravel(), query.ravel()])
    assert len(set(records)) == len(records)  # support and query disjoint, nothing drawn twice


def test_within_group_episodes_stay_in_one_group():
  labels, class_groups = grouped_labels()
  episodes = evaluate.sample_episodes(labels, class_groups, ways=3, shots=2, queries=2,
                                      num_episodes=60, seed=0, within_group=True)
  check_episode_structure(episodes, labels, 3, 2, 2, 60)
  groups = class_groups[labels[episodes.support[:, :, 0]]]  # [E, N]
  assert np.all(groups == groups[:, :1])
  # Group 0 has only 2 classes, so 3-way episodes come from groups 1 and 2 (both, over 60 episodes).
  assert set(groups[:, 0]) == {1, 2}


def test_unstructured_episodes_mix_groups():
  labels, class_groups = grouped_labels()
  episodes = evaluate.sample_episodes(labels, class_groups, ways=5, shots=1, queries=3,
                                      num_episodes=30, seed=0, within_group=False)
  check_episode_structure(episodes, labels, 5, 1, 3, 30)
  groups = class_groups[labels[episodes.support[:, :, 0]]]
  # 5 classes cannot fit in one group of at most 4 classes.
  assert np.all([len(set(row)) > 1 for row in groups])


@pytest.mark.parametrize("within_group", [True, False])
def test_episodes_are_deterministic_in_the_seed(within_group):
  labels, class_groups = grouped_labels()
  draw = lambda seed: evaluate.sample_episodes(labels, class_groups, ways=3, shots=1, queries=1,
                                               num_episodes=10, seed=seed, within_group=within_group)
  first, again, other = draw(7), draw(7), draw(8)
  np.testing.assert_array_equal(first.support, again.support)
  np.testing.assert_array_equal(first.query, again.query)
  assert not np.array_equal(first.support, other.support)


def test_episode_errors():
  labels, class_groups = grouped_labels()
  with pytest.raises(UserError, match="10-way episodes need 10 classes; only 9"):
    evaluate.sample_episodes(labels, class_groups, ways=10, shots=1, queries=1, num_episodes=1,
                             seed=0, within_group=False)
  with pytest.raises(UserError, match="5-way within-group episodes need a group with 5 classes; "
                                      "the largest has 4"):
    evaluate.sample_episodes(labels, class_groups, ways=5, shots=1, queries=1, num_episodes=1,
                             seed=0, within_group=True)
  with pytest.raises(UserError, match="need 5 images per class; class 0 has 4"):
    evaluate.sample_episodes(labels, class_groups, ways=2, shots=3, queries=2, num_episodes=1,
                             seed=0, within_group=False)
  with pytest.raises(UserError, match="shots >= 1"):
    evaluate.sample_episodes(labels, class_groups, ways=2, shots=0, queries=1, num_episodes=1,
                             seed=0, within_group=False)


def episodes(support, query):
  return evaluate.Episodes(support=np.asarray(support), query=np.asarray(query))


def test_one_shot_accuracy_on_1d_embeddings():
  # Record:     0    1    2    3
  # Embedding:  0   10    6    9
  # Episode 0: class 0 = shot 0, query 2; class 1 = shot 1, query 3. Query 2 (at 6) is 6 from shot 0
  # and 4 from shot 1: wrong. Query 3 (at 9) is nearer 10: right. Accuracy 1/2.
  # Episode 1: the same records with the classes' order swapped: still 1/2 (the truth is the row).
  # Episode 2: class 0 = shot 0 with query 3 (9: nearer 10 = class 1, wrong); class 1 = shot 1 with
  # query 2 (6: nearer 10, right). Accuracy 1/2. Episode 3: class 0 = shot 2 (6) with query 0 (0),
  # class 1 = shot 3 (9) with query 1 (10): both right.
  embeddings = np.array([[0.0], [10.0], [6.0], [9.0]])
  accuracies = evaluate.episode_accuracies(
      embeddings, episodes(support=[[[0], [1]], [[1], [0]], [[0], [1]], [[2], [3]]],
                           query=[[[2], [3]], [[3], [2]], [[3], [2]], [[0], [1]]]))
  np.testing.assert_array_equal(accuracies, [0.5, 0.5, 0.5, 1.0])


def test_prototype_beats_nearest_neighbour_disagreement():
  # Class 0 shots at 0 and 10 (prototype 5); class 1 shots at 7 and 8.5 (prototype 7.75).
  # Query 4 (class 0) sits at 9.5: nearest single shot is 10 (class 0, distance 0.5 vs 1.0), but the
  # nearest prototype is class 1's (1.75 vs 4.5), so the prototype rule gets it wrong.
  # Query 5 (class 1) at 7.5: prototype 1 (0.25 vs 2.5), right. Accuracy exactly 1/2 (1-NN: 1).
  embeddings = np.array([[0.0], [10.0], [7.0], [8.5], [9.5], [7.5]])
  accuracy = evaluate.episode_accuracies(
      embeddings, episodes(support=[[[0, 1], [2, 3]]], query=[[[4], [5]]]))
  np.testing.assert_array_equal(accuracy, [0.5])


def test_cosine_and_euclidean_disagree_as_worked_out():
  # Class 0 shot at (1, 0), class 1 shot at (10, 10). Query of class 0 at (5, 0.1): nearer (1, 0) in
  # both metrics. Query of class 1 at (3, 3): squared distances 13 to (1, 0) and 98 to (10, 10), so
  # euclidean says class 0 (wrong); its direction is exactly (10, 10)'s, so cosine says class 1.
  embeddings = np.array([[1.0, 0.0], [10.0, 10.0], [5.0, 0.1], [3.0, 3.0]])
  episode = episodes(support=[[[0], [1]]], query=[[[2], [3]]])
  np.testing.assert_array_equal(evaluate.episode_accuracies(embeddings, episode, "euclidean"), [0.5])
  np.testing.assert_array_equal(evaluate.episode_accuracies(embeddings, episode, "cosine"), [1.0])
  with pytest.raises(UserError, match="metric='manhattan'"):
    evaluate.episode_accuracies(embeddings, episode, "manhattan")


def test_mean_and_ci95_by_hand():
  # Mean 0.75; squared deviations 1/16 + 1/16 + 0 + 0 = 1/8; sample variance (1/8) / 3 = 1/24;
  # half-width 1.96 * sqrt(1/24) / sqrt(4) = 1.96 / sqrt(96) = 0.2000416...
  mean, ci95 = evaluate.mean_and_ci95(np.array([0.5, 1.0, 0.75, 0.75]))
  assert mean == 0.75
  assert ci95 == pytest.approx(1.96 / np.sqrt(96), rel=1e-12)
  mean, ci95 = evaluate.mean_and_ci95(np.array([0.25]))
  assert mean == 0.25 and np.isnan(ci95)


def pixel_embed(variables, images):
  """Embedding = (scale * pixel sum, pixel max): depends on variables and on every image."""
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
  return jnp.stack([variables["scale"] * flat.sum(axis=1), flat.max(axis=1)], axis=1)


def test_embed_images_in_uneven_batches_equals_one_call():
  images = np.arange(7 * 2 * 2, dtype=np.uint8).reshape(7, 2, 2, 1)
  variables = {"scale": jnp.float32(0.5)}
  uneven = evaluate.embed_images(pixel_embed, variables, images, batch_size=3)  # 3 + 3 + 1 (padded)
  whole = evaluate.embed_images(pixel_embed, variables, images, batch_size=100)
  assert uneven.shape == (7, 2) and uneven.dtype == np.float32
  np.testing.assert_array_equal(uneven, whole)
  # Image i holds 4i, 4i+1, 4i+2, 4i+3: sum 16i + 6, max 4i + 3.
  i = np.arange(7)
  np.testing.assert_array_equal(uneven, np.stack([0.5 * (16 * i + 6), 4 * i + 3], axis=1))
  with pytest.raises(UserError, match="no images"):
    evaluate.embed_images(pixel_embed, variables, images[:0])


def one_pixel(values):
  return np.asarray(values, np.uint8).reshape(-1, 1, 1, 1)


def test_lake_runs_accuracy_by_hand_in_one_embedding_call(monkeypatch):
  value_embed = lambda variables, images: images.reshape(images.shape[0], 1).astype(jnp.float32)
  runs = [
      # Test items 48, 2, 99 are nearest 50, 0, 100 = training items 1, 0, 2: all right.
      LakeRun("run01", one_pixel([0, 50, 100]), one_pixel([48, 2, 99]), np.array([1, 0, 2])),
      # 30 -> 50 (item 1, answer 0: wrong), 70 -> 50 (item 1: right), 10 -> 0 (item 0, answer 2:
      # wrong): 1/3.
      LakeRun("run02", one_pixel([0, 50, 100]), one_pixel([30, 70, 10]), np.array([0, 1, 2])),
  ]
  calls = []
  real_embed_images = evaluate.embed_images
  monkeypatch.setattr(evaluate, "embed_images",
                      lambda *args, **kwargs: calls.append(len(args[2])) or real_embed_images(*args, **kwargs))
  result = evaluate.lake_runs_accuracy(value_embed, {}, runs)
  assert calls == [12]  # every run's 3 + 3 images in one call
  assert result["per_run"] == pytest.approx([1.0, 1 / 3])
  assert result["accuracy"] == pytest.approx(2 / 3)


def test_one_shot_report_runs_what_it_can_and_records_the_rest():
  labels, class_groups = grouped_labels()
  # 1-D embedding = class number: every episode is solved exactly.
  embeddings = labels[:, None].astype(np.float32)
  report = evaluate.one_shot_report(embeddings, labels, class_groups, ways=(2, 5), shots=(1,),
                                    queries=1, num_episodes=4, seed=0)
  assert report["within"]["2way1shot"] == {"mean": 1.0, "ci95": 0.0, "episodes": 4}
  assert "need a group with 5 classes" in report["within"]["5way1shot"]["skipped"]
  assert report["unstructured"]["5way1shot"]["mean"] == 1.0
