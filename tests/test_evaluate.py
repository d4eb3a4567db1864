"""Tests of siamese_jax.metrics: episodes, scorers, verification, retrieval, open set and Lake runs, on
hand-made embeddings with answers worked out by hand."""

import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siamese_jax.metrics import embedding, episodes, lake, open_set, retrieval, scoring, verification
from siamese_jax.data.omniglot import LakeRun
from siamese_jax.errors import UserError


def grouped_labels(classes_per_group=(2, 3, 4), per_class=4):
  """Records in class order, per_class each; class c in group class_groups[c]."""
  class_groups = np.repeat(np.arange(len(classes_per_group)), classes_per_group)
  labels = np.repeat(np.arange(len(class_groups)), per_class)
  # Shuffled record order, so an episode sampler that assumes one block per class gives wrong labels.
  order = np.random.default_rng(0).permutation(len(labels))
  return labels[order], class_groups


def check_episode_structure(drawn, labels, ways, shots, queries, num_episodes):
  assert drawn.support.shape == (num_episodes, ways, shots)
  assert drawn.query.shape == (num_episodes, ways, queries)
  for support, query in zip(drawn.support, drawn.query):
    # Row n of support and query: records of one class, the same class for both, N distinct classes.
    classes = labels[support[:, 0]]
    assert np.all(labels[support] == classes[:, None])
    assert np.all(labels[query] == classes[:, None])
    assert len(set(classes)) == ways
    records = np.concatenate([support.ravel(), query.ravel()])
    assert len(set(records)) == len(records)  # support and query disjoint, nothing drawn twice


def test_within_group_episodes_stay_in_one_group():
  labels, class_groups = grouped_labels()
  drawn = episodes.sample_episodes(labels, class_groups, ways=3, shots=2, queries=2,
                                   num_episodes=60, seed=0, within_group=True)
  check_episode_structure(drawn, labels, 3, 2, 2, 60)
  groups = class_groups[labels[drawn.support[:, :, 0]]]  # [E, N]
  assert np.all(groups == groups[:, :1])
  # Group 0 has only 2 classes, so 3-way episodes come from groups 1 and 2 (both, over 60 episodes).
  assert set(groups[:, 0]) == {1, 2}


def test_unstructured_episodes_mix_groups():
  labels, class_groups = grouped_labels()
  drawn = episodes.sample_episodes(labels, class_groups, ways=5, shots=1, queries=3,
                                   num_episodes=30, seed=0, within_group=False)
  check_episode_structure(drawn, labels, 5, 1, 3, 30)
  groups = class_groups[labels[drawn.support[:, :, 0]]]
  # 5 classes cannot fit in one group of at most 4 classes.
  assert np.all([len(set(row)) > 1 for row in groups])


@pytest.mark.parametrize("within_group", [True, False])
def test_episodes_are_deterministic_in_the_seed(within_group):
  labels, class_groups = grouped_labels()
  draw = lambda seed: episodes.sample_episodes(labels, class_groups, ways=3, shots=1, queries=1,
                                               num_episodes=10, seed=seed, within_group=within_group)
  first, again, other = draw(7), draw(7), draw(8)
  np.testing.assert_array_equal(first.support, again.support)
  np.testing.assert_array_equal(first.query, again.query)
  assert not np.array_equal(first.support, other.support)


def test_episode_errors():
  labels, class_groups = grouped_labels()
  with pytest.raises(UserError, match="10-way episodes need 10 classes; only 9"):
    episodes.sample_episodes(labels, class_groups, ways=10, shots=1, queries=1, num_episodes=1,
                             seed=0, within_group=False)
  with pytest.raises(UserError, match="5-way within-group episodes need a group with 5 classes; "
                                      "the largest has 4"):
    episodes.sample_episodes(labels, class_groups, ways=5, shots=1, queries=1, num_episodes=1,
                             seed=0, within_group=True)
  with pytest.raises(UserError, match="need 5 images per class; class 0 has 4"):
    episodes.sample_episodes(labels, class_groups, ways=2, shots=3, queries=2, num_episodes=1,
                             seed=0, within_group=False)
  with pytest.raises(UserError, match="shots >= 1"):
    episodes.sample_episodes(labels, class_groups, ways=2, shots=0, queries=1, num_episodes=1,
                             seed=0, within_group=False)


def hand_made(support, query):
  return episodes.Episodes(support=np.asarray(support), query=np.asarray(query))


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
  accuracies = episodes.episode_accuracies(
      embeddings, hand_made(support=[[[0], [1]], [[1], [0]], [[0], [1]], [[2], [3]]],
                            query=[[[2], [3]], [[3], [2]], [[3], [2]], [[0], [1]]]))
  np.testing.assert_array_equal(accuracies, [0.5, 0.5, 0.5, 1.0])


def test_prototype_beats_nearest_neighbour_disagreement():
  # Class 0 shots at 0 and 10 (prototype 5); class 1 shots at 7 and 8.5 (prototype 7.75).
  # Query 4 (class 0) sits at 9.5: nearest single shot is 10 (class 0, distance 0.5 vs 1.0), but the
  # nearest prototype is class 1's (1.75 vs 4.5), so the prototype rule gets it wrong.
  # Query 5 (class 1) at 7.5: prototype 1 (0.25 vs 2.5), right. Accuracy exactly 1/2 (1-NN: 1).
  embeddings = np.array([[0.0], [10.0], [7.0], [8.5], [9.5], [7.5]])
  accuracy = episodes.episode_accuracies(
      embeddings, hand_made(support=[[[0, 1], [2, 3]]], query=[[[4], [5]]]))
  np.testing.assert_array_equal(accuracy, [0.5])


def test_cosine_and_euclidean_disagree_as_worked_out():
  # Class 0 shot at (1, 0), class 1 shot at (10, 10). Query of class 0 at (5, 0.1): nearer (1, 0) in
  # both metrics. Query of class 1 at (3, 3): squared distances 13 to (1, 0) and 98 to (10, 10), so
  # euclidean says class 0 (wrong); its direction is exactly (10, 10)'s, so cosine says class 1.
  embeddings = np.array([[1.0, 0.0], [10.0, 10.0], [5.0, 0.1], [3.0, 3.0]])
  episode = hand_made(support=[[[0], [1]]], query=[[[2], [3]]])
  euclidean, cosine = scoring.distance_scorer("euclidean"), scoring.distance_scorer("cosine")
  np.testing.assert_array_equal(episodes.episode_accuracies(embeddings, episode, euclidean), [0.5])
  np.testing.assert_array_equal(episodes.episode_accuracies(embeddings, episode, cosine), [1.0])
  with pytest.raises(UserError, match="metric='manhattan'"):
    scoring.distance_scorer("manhattan")


def test_mean_and_ci95_by_hand():
  # Mean 0.75; squared deviations 1/16 + 1/16 + 0 + 0 = 1/8; sample variance (1/8) / 3 = 1/24;
  # half-width 1.96 * sqrt(1/24) / sqrt(4) = 1.96 / sqrt(96) = 0.2000416...
  mean, ci95 = episodes.mean_and_ci95(np.array([0.5, 1.0, 0.75, 0.75]))
  assert mean == 0.75
  assert ci95 == pytest.approx(1.96 / np.sqrt(96), rel=1e-12)
  mean, ci95 = episodes.mean_and_ci95(np.array([0.25]))
  assert mean == 0.25 and np.isnan(ci95)


def pixel_embed(variables, images):
  """Embedding = (scale * pixel sum, pixel max): depends on variables and on every image."""
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
  return jnp.stack([variables["scale"] * flat.sum(axis=1), flat.max(axis=1)], axis=1)


def test_embed_images_in_uneven_batches_equals_one_call():
  images = np.arange(7 * 2 * 2, dtype=np.uint8).reshape(7, 2, 2, 1)
  variables = {"scale": jnp.float32(0.5)}
  uneven = embedding.embed_images(pixel_embed, variables, images, batch_size=3)  # 3 + 3 + 1 (padded)
  whole = embedding.embed_images(pixel_embed, variables, images, batch_size=100)
  assert uneven.shape == (7, 2) and uneven.dtype == np.float32
  np.testing.assert_array_equal(uneven, whole)
  # Image i holds 4i, 4i+1, 4i+2, 4i+3: sum 16i + 6, max 4i + 3.
  i = np.arange(7)
  np.testing.assert_array_equal(uneven, np.stack([0.5 * (16 * i + 6), 4 * i + 3], axis=1))
  with pytest.raises(UserError, match="no images"):
    embedding.embed_images(pixel_embed, variables, images[:0])


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
  real_embed_images = embedding.embed_images
  monkeypatch.setattr(embedding, "embed_images",
                      lambda *args, **kwargs: calls.append(len(args[2])) or real_embed_images(*args, **kwargs))
  result = lake.lake_runs_accuracy(value_embed, {}, runs)
  assert calls == [12]  # every run's 3 + 3 images in one call
  assert result["per_run"] == pytest.approx([1.0, 1 / 3])
  # Two runs, 1 and 1/3: sample std sqrt(2) / 3, so the half-width is 1.96 (sqrt(2) / 3) / sqrt(2).
  assert result["ci95"] == pytest.approx(1.96 / 3)
  assert result["accuracy"] == pytest.approx(2 / 3)


def test_one_shot_report_runs_what_it_can_and_records_the_rest():
  labels, class_groups = grouped_labels()
  # 1-D embedding = class number: every episode is solved exactly.
  embeddings = labels[:, None].astype(np.float32)
  report = episodes.one_shot_report(embeddings, labels, class_groups, ways=(2, 5), shots=(1,),
                                    queries=1, num_episodes=4, seed=0)
  assert report["within"]["2way1shot"] == {"mean": 1.0, "ci95": 0.0, "episodes": 4}
  assert "need a group with 5 classes" in report["within"]["5way1shot"]["skipped"]
  assert report["unstructured"]["5way1shot"]["mean"] == 1.0


# ------------------------------------------------------------------------------------------------
# Pair scoring, verification, retrieval, gallery and open set: values worked out by hand.


def product_probability(first, second):
  """A fake pair head: sigmoid of the product of 1-D embeddings (it prefers large same-sign values)."""
  return jnp.asarray(1 / (1 + jnp.exp(-(first[:, 0] * second[:, 0]))))


def test_pair_head_episodes_use_the_probability_not_the_distance():
  # Shots: class 0 at 1.0, class 1 at 3.0. Query of class 0 at 0.9: nearest shot 1.0 (right), but
  # products 0.9 vs 2.7, so the head says class 1 (wrong). Query of class 1 at -2: nearest 1.0 (wrong,
  # 3 vs 5), products -2 vs -6: the head says class 0 (wrong). Distance: 1/2; head: 0.
  embeddings = np.array([[1.0], [3.0], [0.9], [-2.0]], np.float32)
  episode = hand_made(support=[[[0], [1]]], query=[[[2], [3]]])
  head = scoring.pair_head_scorer(product_probability)
  np.testing.assert_array_equal(episodes.episode_accuracies(embeddings, episode), [0.5])
  np.testing.assert_array_equal(episodes.episode_accuracies(embeddings, episode, head), [0.0])
  np.testing.assert_array_equal(episodes.episode_predictions(embeddings, episode, head), [[[1], [0]]])


def test_validation_is_scored_by_the_pair_head_when_given():
  # Two classes, far apart: the distance is always right. A head that prefers distant images (the
  # sigmoid of |a - b|) always picks the other class, so validation by that head is 0, not 1.
  source = types.SimpleNamespace(labels=np.array([0, 0, 1, 1]), class_groups=np.array([0, 0]))
  embeddings = np.array([[0.0], [0.1], [5.0], [5.1]], np.float32)
  eval_config = ml_collections.ConfigDict(dict(validation_ways=2, validation_episodes=10, queries_per_class=1))
  farther = lambda first, second: jnp.asarray(1 / (1 + jnp.exp(-jnp.abs(first[:, 0] - second[:, 0]))))
  assert episodes.validation_accuracy(embeddings, source, eval_config, seed=0) == 1.0
  assert episodes.validation_accuracy(embeddings, source, eval_config, seed=0,
                                      scorer=scoring.pair_head_scorer(farther)) == 0.0


def test_pair_scores_in_small_chunks_equal_one_chunk(monkeypatch):
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(9, 4)).astype(np.float32)
  first, second = rng.integers(0, 9, 23), rng.integers(0, 9, 23)
  whole = scoring.DISTANCE.indexed_pair_similarities(embeddings, first, second)
  np.testing.assert_allclose(whole, -np.linalg.norm(embeddings[first] - embeddings[second], axis=1), rtol=1e-6)
  monkeypatch.setattr(scoring, "_PAIR_CHUNK_FLOATS", 4 * 5)  # 5 pairs per chunk: 5 chunks, the last padded
  np.testing.assert_allclose(scoring.DISTANCE.indexed_pair_similarities(embeddings, first, second), whole, rtol=1e-6)
  matrix = scoring.DISTANCE.similarity_matrix(embeddings[:3], embeddings[3:])
  np.testing.assert_allclose(matrix, -np.linalg.norm(embeddings[:3, None] - embeddings[None, 3:], axis=2), rtol=1e-5)


def test_every_scorer_answers_the_same_question_in_every_shape():
  # Cosine by hand: (1, 0) against (0, 2) is 90 degrees apart (cosine 0, similarity -1), against (3, 0)
  # the same direction (similarity 0), against (-1, 0) opposite (similarity -2).
  cosine = scoring.distance_scorer("cosine")
  query, references = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]])
  np.testing.assert_allclose(cosine.similarity_matrix(query, references), [[-1.0, 0.0, -2.0]], atol=1e-6)
  np.testing.assert_allclose(cosine.pair_similarities(np.repeat(query, 3, axis=0), references), [-1.0, 0.0, -2.0],
                             atol=1e-6)
  # Euclidean: (0, 0) to (3, 4) is 5 apart; Lake's costs are squared distances.
  assert scoring.DISTANCE.name == "distance" and scoring.DISTANCE.metric == "euclidean"
  np.testing.assert_allclose(scoring.DISTANCE.pair_similarities(np.zeros((1, 2)), np.array([[3.0, 4.0]])), [-5.0])
  np.testing.assert_allclose(scoring.DISTANCE.cost_matrix(np.zeros((1, 2), np.float32), np.array([[3.0, 4.0]])),
                             [[25.0]])
  # Every shape of one scorer gives the same numbers: the matrix is the pairs of every query and reference.
  rng = np.random.default_rng(0)
  queries, references = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
  for scorer in (scoring.DISTANCE, cosine, scoring.pair_head_scorer(product_probability)):
    matrix = scorer.similarity_matrix(queries, references)
    pairs = scorer.pair_similarities(np.repeat(queries, 5, axis=0), np.tile(references, (3, 1)))
    np.testing.assert_allclose(matrix, pairs.reshape(3, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer.cost_matrix(queries, references).argmin(axis=1), matrix.argmax(axis=1))
  head = scoring.pair_head_scorer(product_probability)
  assert head.name == "pair_head"
  np.testing.assert_allclose(head.pair_similarities(np.array([[2.0]]), np.array([[0.5]])), [1 / (1 + np.exp(-1.0))],
                             rtol=1e-6)


def test_sample_pairs_are_balanced_right_and_deterministic():
  labels, _ = grouped_labels()
  pairs = verification.sample_pairs(labels, num_pairs=401, seed=3)
  assert pairs.same.sum() == 200 and (~pairs.same).sum() == 201
  np.testing.assert_array_equal(labels[pairs.first] == labels[pairs.second], pairs.same)
  assert np.all(pairs.first[pairs.same] != pairs.second[pairs.same])  # never an image with itself
  again = verification.sample_pairs(labels, num_pairs=401, seed=3)
  np.testing.assert_array_equal(pairs.first, again.first)
  np.testing.assert_array_equal(pairs.second, again.second)
  # Every class of 9 shows up among the different pairs' second images (uniform over other classes).
  assert len(set(labels[pairs.second[~pairs.same]])) == 9
  with pytest.raises(UserError, match="at least 2 classes"):
    verification.sample_pairs(np.zeros(5, int), num_pairs=10, seed=0)
  with pytest.raises(UserError, match="a class with at least 2 images"):
    verification.sample_pairs(np.arange(5), num_pairs=10, seed=0)


# Same pairs score 0.9, 0.6, 0.4; different pairs 0.7, 0.3, 0.1 (similarity: higher = more alike).
SIMILARITIES = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.1])
SAME = np.array([True, True, True, False, False, False])


def test_roc_auc_and_equal_error_rate_by_hand():
  # AUC = P(same > different): 0.9 beats all 3, 0.6 and 0.4 beat 0.3 and 0.1: 7 of 9 pairs.
  assert verification.roc_auc(SIMILARITIES, SAME) == pytest.approx(7 / 9)
  far, tar, thresholds = verification.roc_curve(SIMILARITIES, SAME)
  np.testing.assert_allclose(far, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
  np.testing.assert_allclose(tar, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
  np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.7, 0.6, 0.4, 0.3, 0.1])
  # At threshold 0.6: false accepts {0.7} = 1/3, false rejects {0.4} = 1/3: equal.
  eer, threshold = verification.equal_error_rate(SIMILARITIES, SAME)
  assert eer == pytest.approx(1 / 3) and threshold == 0.6
  # Perfect separation: no error at threshold 0.8 (both rates 0).
  assert verification.equal_error_rate(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0], bool))[0] == 0.0
  assert verification.roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5  # a tie counts half


def test_equal_error_rate_interpolates_between_roc_points():
  # Same 0.8, 0.6; different 0.7, 0.2, 0.1, 0.05. (far, frr) by threshold: inf (0, 1); 0.8 (0, 1/2);
  # 0.7 (1/4, 1/2); 0.6 (1/4, 0). Between 0.7 and 0.6 the gap far - frr goes -1/4 -> +1/4: crossing
  # halfway, where far = 1/4 (it does not move on that segment): EER = 1/4, first threshold 0.6.
  similarities = np.array([0.8, 0.6, 0.7, 0.2, 0.1, 0.05])
  same = np.array([True, True, False, False, False, False])
  eer, threshold = verification.equal_error_rate(similarities, same)
  assert eer == pytest.approx(0.25) and threshold == 0.6


def test_calibrated_thresholds_by_hand():
  # Max accuracy: between 0.3 and 0.4 (0.35) accepts 0.9, 0.6, 0.4 and 0.7: 5 of 6 right; no
  # threshold does better.
  threshold = verification.calibrate_threshold(SIMILARITIES, SAME, "max_accuracy")
  assert threshold == pytest.approx(0.35)
  assert verification.rates_at_threshold(SIMILARITIES, SAME, threshold) == pytest.approx(
      {"accuracy": 5 / 6, "false_accept_rate": 1 / 3, "false_reject_rate": 0.0})
  # Target false accept rate 0.34 of 3 different pairs: one may be accepted (0.7); the highest rejected
  # is 0.3, the next score above it 0.4: threshold 0.35. Target 0.2: none accepted, threshold midway
  # between 0.7 and 0.9 = 0.8.
  assert verification.calibrate_threshold(SIMILARITIES, SAME, "far", target_far=0.34) == pytest.approx(0.35)
  assert verification.calibrate_threshold(SIMILARITIES, SAME, "far", target_far=0.2) == pytest.approx(0.8)
  report = verification.verification_report(SIMILARITIES, SAME, 0.8)
  assert report["accuracy_at_threshold"] == pytest.approx(4 / 6)
  assert report["false_reject_rate_at_threshold"] == pytest.approx(2 / 3)
  with pytest.raises(UserError, match="threshold method 'eer'"):
    verification.calibrate_threshold(SIMILARITIES, SAME, "eer")
  with pytest.raises(UserError, match="both same and different pairs"):
    verification.roc_auc(SIMILARITIES[:3], SAME[:3])
  # Distances for people: a similarity threshold of -2.5 is "distance <= 2.5", and back.
  record = verification.threshold_record(-2.5, "distance")
  assert record["threshold"] == 2.5 and verification.similarity_threshold(record) == -2.5
  assert verification.similarity_threshold(verification.threshold_record(0.7, "pair_head")) == 0.7


def test_retrieval_metrics_by_hand():
  # Record:  0    1    2    3    4    5
  # Value:   0    1   2.5  4.2   3   10
  # Class:   A    A    B    A    B    C   (C has no other record: left out)
  # Neighbours (nearest first) and R (other records of the class):
  #   0: 1(A) 2(B) 4(B) 3(A)  R=2, top 2 = [A, B]: AP = (1/2)(1/1) = 1/2, P@1 hit
  #   1: 0(A) 2(B) 4(B) 3(A)  R=2: AP 1/2, P@1 hit
  #   2: 4(B) 1(A) 3(A) 0(A)  R=1: AP 1, hit
  #   3: 4(B) 2(B) 1(A) 0(A)  R=2, top 2 = [B, B]: AP 0, miss; recall@3 hit (1 is third)
  #   4: 2(B) 3(A) 1(A) 0(A)  R=1: AP 1, hit
  # P@1 = 4/5; MAP@R = (1/2 + 1/2 + 1 + 0 + 1) / 5 = 3/5; recall@2 = 4/5; recall@3 = 1.
  embeddings = np.array([[0.0], [1.0], [2.5], [4.2], [3.0], [10.0]])
  labels = np.array([0, 0, 1, 0, 1, 2])
  for chunk_size in (1024, 2):  # one chunk, and three chunks
    metrics = retrieval.retrieval_metrics(embeddings, labels, ks=(1, 2, 3), chunk_size=chunk_size)
    assert metrics["precision_at_1"] == pytest.approx(4 / 5)
    assert metrics["map_at_r"] == pytest.approx(3 / 5)
    assert metrics["recall_at_k"] == pytest.approx({"1": 4 / 5, "2": 4 / 5, "3": 1.0})
    assert metrics["queries"] == 5


def test_gallery_nearest_centroid_and_medoid_by_hand():
  # Gallery (1-D): class 0 at 0 and 2; class 1 at 5, 6 and 10. Query at 3.4.
  # nearest: class 0's 2 is 1.4 away, class 1's 5 is 1.6 away -> class 0.
  # centroid: class 0 at 1 (2.4 away), class 1 at 7 (3.6 away) -> class 0.
  # medoid: class 0's two images tie (summed distance 2 each): the first, 0 (3.4 away); class 1: summed
  # distances 5 -> 1 + 5 = 6, 6 -> 1 + 4 = 5, 10 -> 5 + 4 = 9, so 6 (2.6 away) -> class 1.
  gallery = np.array([[0.0], [2.0], [5.0], [6.0], [10.0]])
  labels = np.array([0, 0, 1, 1, 1])
  query = np.array([[3.4]])
  expected = {"nearest": [-1.4, -1.6], "centroid": [-2.4, -3.6], "medoid": [-3.4, -2.6]}
  for method, similarities in expected.items():
    np.testing.assert_allclose(retrieval.gallery_class_similarities(query, gallery, labels, 2, method),
                               [similarities], rtol=1e-6)
  _, medoids = retrieval.class_representatives(gallery, labels, 2, "medoid")
  np.testing.assert_array_equal(medoids, [0, 3])
  with pytest.raises(UserError, match="class 1 has no gallery images"):
    retrieval.gallery_class_similarities(query, gallery[:2], labels[:2], 2, "nearest")
  with pytest.raises(UserError, match="class 1 has no images"):
    retrieval.class_representatives(gallery[:2], labels[:2], 2, "centroid")


def test_open_set_report_by_hand():
  # Threshold: similarity -2.5 (distance 2.5). Query 0 (class 0): best class 0 at -1, accepted, right.
  # Query 1 (class 0): best class 1 at -2, accepted, wrong. Query 2 (unknown): best -5, rejected.
  # Query 3 (unknown): best -0.5, accepted (a miss).
  similarities = np.array([[-1.0, -3.0], [-4.0, -2.0], [-5.0, -6.0], [-0.5, -0.7]])
  report = open_set.open_set_report(similarities, np.array([0, 0, -1, -1]), threshold=-2.5)
  assert report == {"known_queries": 2, "unknown_queries": 2, "known_accuracy": 0.5,
                    "closed_set_accuracy": 0.5, "known_rejection_rate": 0.0, "unknown_rejection_rate": 0.5}



def test_open_set_threshold_by_hand():
  # Best similarities: known and right -1 (q0) and -3 (q2); known but wrong -2 (q1: never right);
  # unknown -5, -0.5, -3.5. Candidates lie midway between neighbours. At -3.25: both right ones
  # accepted (2/3 of the known) and -5, -3.5 rejected (2/3 of the unknown): balanced 2/3, the only
  # maximum (-4.25: 2/3 and 1/3; -2.5: 1/3 and 2/3; above -0.5: 0 and 1).
  similarities = np.array([[-1.0, -4.0], [-6.0, -2.0], [-7.0, -3.0], [-5.0, -8.0], [-0.5, -0.9], [-9.0, -3.5]])
  labels = np.array([0, 0, 1, -1, -1, -1])
  threshold = open_set.calibrate_open_set_threshold(similarities, labels)
  assert threshold == pytest.approx(-3.25)
  report = open_set.open_set_report(similarities, labels, threshold)
  assert report["known_accuracy"] == pytest.approx(2 / 3) and report["unknown_rejection_rate"] == pytest.approx(2 / 3)
  with pytest.raises(UserError, match="both known and unknown queries"):
    open_set.calibrate_open_set_threshold(similarities[:3], labels[:3])


def test_gallery_threshold_pooled_over_open_set_splits_moves_less_with_the_seed():
  # 60 classes as noisy clusters (about 88 % of known queries right at the threshold): one open-set split
  # (30 known classes, one gallery image each) gives a threshold that hangs on which classes and images
  # it drew. Pooling 8 splits' queries averages that draw out: the spread over 12 seeds shrinks, if by less
  # than the 1/sqrt(8) of a plain mean (the threshold is not one). One split each: no gain.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(60), 20)
  embeddings = rng.normal(size=(60, 16))[labels] + 0.5 * rng.normal(size=(len(labels), 16))
  def spread(splits):
    return np.std([open_set.calibrate_gallery_threshold(embeddings, labels, seed=seed, splits=splits)[0]
                   for seed in range(12)])
  assert spread(8) < 0.75 * spread(1)
  threshold, report, known = open_set.calibrate_gallery_threshold(embeddings, labels, seed=0)
  assert known == 30 and report["known_queries"] == 8 * (30 * 19) and report["unknown_queries"] == 8 * (30 * 20)
  assert 0.8 < report["known_accuracy"] < 0.95 and threshold < 0  # a similarity: minus a distance


def test_gallery_threshold_is_read_for_galleries_and_the_pair_one_for_pairs():
  record = {"scoring": "distance", "threshold": 4.0, "gallery_threshold": 2.5}
  assert verification.similarity_threshold(record) == -4.0
  assert verification.similarity_threshold(record, "gallery") == -2.5
  del record["gallery_threshold"]  # a record without one (a threshold given by hand)
  assert verification.similarity_threshold(record, "gallery") == -4.0

def test_open_set_split_is_disjoint_and_deterministic():
  labels, _ = grouped_labels()  # 9 classes of 4
  gallery, gallery_labels, queries, query_labels = open_set.open_set_split(labels, gallery_shots=1, seed=0)
  assert len(gallery) == 4 and len(set(gallery) | set(queries)) == len(labels)  # round(4.5) = 4 known
  assert sorted(gallery_labels) == [0, 1, 2, 3]
  assert np.sum(query_labels >= 0) == 4 * 3 and np.sum(query_labels < 0) == 5 * 4
  known_old = np.unique(labels[gallery])
  np.testing.assert_array_equal(known_old[query_labels[query_labels >= 0]], labels[queries[query_labels >= 0]])
  again = open_set.open_set_split(labels, gallery_shots=1, seed=0)
  np.testing.assert_array_equal(gallery, again[0])
  with pytest.raises(UserError, match="needs 5 images in every known class"):
    open_set.open_set_split(labels, gallery_shots=4, seed=0)


def test_episode_settings_larger_than_the_split_are_explained():
  labels, class_groups = grouped_labels()  # 9 classes of 4 images
  with pytest.raises(UserError, match=r"ways=20: test split has 9 classes; N must lie in \[2, 9\]"):
    episodes.check_episode_settings(labels, class_groups, ways=(5, 20), shots=(1,), queries=1)
  with pytest.raises(UserError, match="shots=5: 5-shot episodes with 1 queries per class need 6 images per "
                                      "class, but class 0 of the test split has 4; K can be at most 3"):
    episodes.check_episode_settings(labels, class_groups, ways=(5,), shots=(1, 5), queries=1)
  episodes.check_episode_settings(labels, class_groups, ways=(5, 9), shots=(1, 3), queries=1)


def test_lake_scoring_takes_the_first_of_tied_costs():
  # Lake's np.argmin: item 0 ties between training images 0 and 1 and gets 0 (its answer is 1: wrong);
  # item 1 goes to 1 (right). One run at 1/2: accuracy 0.5, error 50 %.
  run = LakeRun("run01", one_pixel([0, 0]), one_pixel([0, 0]), np.array([1, 1]))
  result = lake.lake_runs_from_costs([run], [np.array([[1.0, 1.0], [2.0, 0.0]])])
  assert result["per_run"] == [0.5] and result["error_percent"] == 50.0


def test_modified_hausdorff_distance_by_hand():
  # A = {(0, 0)}, B = {(0, 0), (0, 3)}: A -> B mean nearest distance 0; B -> A: (0 + 3) / 2 = 1.5.
  assert lake.modified_hausdorff_distance(np.array([[0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 3.0]])) == 1.5
  image = np.zeros((4, 5, 1), np.uint8)
  image[1, 1] = image[1, 3] = 255  # ink at (1, 1) and (1, 3); mean (1, 2)
  np.testing.assert_array_equal(lake.ink_coordinates(image), [[0.0, -1.0], [0.0, 1.0]])
  assert lake.modified_hausdorff_distance(lake.ink_coordinates(image[:0]), np.zeros((1, 2))) == np.inf
