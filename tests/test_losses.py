"""Loss values worked out by hand on tiny batches; masks, gradients, layouts and the registry."""

import functools
import inspect
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import losses
from siamese_jax.errors import UserError


def line(*xs: float) -> jnp.ndarray:
  """1-D points as an m-per-class batch [B, 1, 1]."""
  return jnp.asarray(xs, jnp.float32)[:, None, None]


def column(*labels: int) -> jnp.ndarray:
  return jnp.asarray(labels, jnp.int32)[:, None]


def run(name: str, embeddings, labels, *head, **options):
  """Every loss is called jitted, as in the train step; `head` is the pair head, for the losses that take it."""
  loss_fn = losses.get_loss(name)
  loss, metrics = jax.jit(lambda e, l: loss_fn(e, l, *head, **options))(embeddings, labels)
  return float(loss), {key: float(value) for key, value in metrics.items()}


# ------------------------------------------------------------------------------------------------
# koch_bce


def first_coordinate_logit(e1, e2):
  del e2
  return e1[:, 0]


def test_koch_bce_by_hand():
  # Logits z = ln3, 0 for two same pairs; -ln3, ln3 for two different pairs.
  # sigmoid: 0.75, 0.5 | 0.25, 0.75. BCE: ln(4/3), ln2 | ln(4/3), ln4.
  # loss = (2 ln(4/3) + ln2 + ln4) / 4 = (7 ln2 - 2 ln3) / 4.
  # accuracy at logit 0: pair 1 right, pair 2 (z=0 -> "different") wrong, pair 3 right, pair 4 wrong = 0.5.
  ln3 = math.log(3.0)
  logits = jnp.asarray([ln3, 0.0, -ln3, ln3], jnp.float32)
  embeddings = jnp.stack([logits[:, None], jnp.zeros((4, 1))], axis=1)  # [4, 2, 1]
  labels = jnp.asarray([[5, 5], [7, 7], [1, 2], [3, 9]], jnp.int32)
  loss, metrics = run("koch_bce", embeddings, labels, first_coordinate_logit)
  assert loss == pytest.approx((7 * math.log(2) - 2 * ln3) / 4, rel=1e-6)
  assert metrics["accuracy"] == pytest.approx(0.5)
  assert metrics["mean_prob_same"] == pytest.approx((0.75 + 0.5) / 2, rel=1e-6)
  assert metrics["mean_prob_different"] == pytest.approx((0.25 + 0.75) / 2, rel=1e-6)


def test_koch_bce_needs_pairs():
  with pytest.raises(UserError, match="k=2"):
    losses.koch_bce(jnp.zeros((2, 3, 3)), jnp.zeros((2, 3), jnp.int32), first_coordinate_logit)


# ------------------------------------------------------------------------------------------------
# contrastive


def contrastive_batch():
  # Pair distances: 5 (same), 0.5 (different), 2 (different), 0 (same, identical points).
  first = jnp.zeros((4, 2))
  second = jnp.asarray([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0], [0.0, 0.0]])
  labels = jnp.asarray([[1, 1], [1, 2], [3, 4], [6, 6]], jnp.int32)
  return jnp.stack([first, second], axis=1), labels


def test_contrastive_by_hand():
  embeddings, labels = contrastive_batch()
  # margin 1: 1/2*25 + 1/2*(1-0.5)^2 + 0 (2 > margin) + 0 = 12.625, over 4 pairs = 3.15625.
  loss, metrics = run("contrastive", embeddings, labels)
  assert loss == pytest.approx(3.15625, rel=1e-6)
  assert metrics["mean_positive_distance"] == pytest.approx((5 + 0) / 2, rel=1e-6)
  assert metrics["mean_negative_distance"] == pytest.approx((0.5 + 2) / 2, rel=1e-6)
  # margin 3: 12.5 + 1/2*2.5^2 + 1/2*1^2 + 0 = 16.125, over 4 = 4.03125.
  loss, _ = run("contrastive", embeddings, labels, margin=3.0)
  assert loss == pytest.approx(4.03125, rel=1e-6)


def test_contrastive_gradient_is_finite_at_zero_distance():
  # A different pair of identical points sits at the sqrt's singular point; 1/2*max(0, 1-d)^2 = 0.5.
  embeddings = jnp.ones((2, 2, 3))
  labels = jnp.asarray([[0, 1], [2, 2]], jnp.int32)
  value, grads = jax.value_and_grad(lambda e: losses.contrastive(e, labels)[0])(embeddings)
  assert float(value) == pytest.approx(0.25)  # (0.5 + 0) / 2
  assert bool(jnp.all(jnp.isfinite(grads)))
  # With d = 0 no direction is preferred: the (sub)gradient chosen is 0, and the same pair's 1/2*d^2 is flat.
  np.testing.assert_array_equal(np.asarray(grads), 0.0)


# ------------------------------------------------------------------------------------------------
# triplet: the four mining modes on one hand-worked batch.
#
# Points on a line x = [0, 2, 3, 6], labels [0, 0, 1, 1], squared Euclidean distances:
#   d(0,2)=4  d(0,3)=9  d(0,6)=36  d(2,3)=1  d(2,6)=16  d(3,6)=9
# Per anchor, the positive distance and the negative distances:
#   x=0: pos 4;  neg 9, 36      x=2: pos 4;  neg 1, 16
#   x=3: pos 9;  neg 9, 1       x=6: pos 9;  neg 36, 16

LINE = line(0, 2, 3, 6)
LINE_LABELS = column(0, 0, 1, 1)


def test_batch_all_by_hand():
  # margin 1, hinges 1 + d_ap - d_an for the 8 valid triplets: x=0: 0, 0; x=2: 4, 0; x=3: 1, 9; x=6: 0, 0.
  # 3 active, sum 14 -> loss 14/3; active 3/8; mean d_ap = (4*4 + 4*9)/8 = 6.5; mean d_an = 124/8 = 15.5.
  loss, metrics = run("triplet", LINE, LINE_LABELS, margin=1.0, mining="batch_all")
  assert loss == pytest.approx(14 / 3, rel=1e-6)
  assert metrics == pytest.approx({"active_fraction": 3 / 8, "mean_positive_distance": 6.5,
                                   "mean_negative_distance": 15.5})
  # margin 10: x=0: 5, 0; x=2: 13, 0; x=3: 10, 18; x=6: 0, 3 -> 5 active, sum 49 -> 9.8.
  loss, metrics = run("triplet", LINE, LINE_LABELS, margin=10.0, mining="batch_all")
  assert loss == pytest.approx(9.8, rel=1e-6)
  assert metrics["active_fraction"] == pytest.approx(5 / 8)


def test_batch_hard_by_hand():
  # margin 1, per anchor (hardest pos, hardest neg) -> hinge: x=0 (4, 9) 0; x=2 (4, 1) 4; x=3 (9, 1) 9;
  # x=6 (9, 16) 0. Loss 13/4; active 2/4; mean pos (4+4+9+9)/4 = 6.5; mean neg (9+1+1+16)/4 = 6.75.
  loss, metrics = run("triplet", LINE, LINE_LABELS, margin=1.0, mining="batch_hard")
  assert loss == pytest.approx(3.25, rel=1e-6)
  assert metrics == pytest.approx({"active_fraction": 0.5, "mean_positive_distance": 6.5,
                                   "mean_negative_distance": 6.75})
  # margin 10: 5 + 13 + 18 + 3 = 39 -> 9.75.
  loss, metrics = run("triplet", LINE, LINE_LABELS, margin=10.0, mining="batch_hard")
  assert loss == pytest.approx(9.75, rel=1e-6)
  assert metrics["active_fraction"] == pytest.approx(1.0)


def test_semi_hard_by_hand():
  # Per (anchor, positive): the closest negative strictly farther than d_ap, else the largest negative.
  #   x=0: d_ap 4, negatives 9, 36 -> 9        x=2: d_ap 4, negatives 1, 16 -> 16 (1 is hard, skipped)
  #   x=3: d_ap 9, negatives 9, 1 -> none strictly farther (9 ties) -> largest, 9
  #   x=6: d_ap 9, negatives 36, 16 -> 16
  # margin 1: hinges 0, 0, 1, 0 -> loss 1/4; active 1/4; mean d_an (9+16+9+16)/4 = 12.5.
  loss, metrics = run("triplet", LINE, LINE_LABELS, margin=1.0, mining="semi_hard")
  assert loss == pytest.approx(0.25, rel=1e-6)
  assert metrics == pytest.approx({"active_fraction": 0.25, "mean_positive_distance": 6.5,
                                   "mean_negative_distance": 12.5})
  # margin 10: 10+4-9=5, 10+4-16 -> 0, 10+9-9=10, 10+9-16=3 -> 18/4. (batch_hard would take d_an=1 at x=2.)
  loss, metrics = run("triplet", LINE, LINE_LABELS, margin=10.0, mining="semi_hard")
  assert loss == pytest.approx(4.5, rel=1e-6)
  assert metrics["active_fraction"] == pytest.approx(0.75)


def test_semi_hard_tie_is_not_farther():
  # x = [0, 3, -3, 4], labels [0, 0, 1, 1], margin 10. A negative at exactly d_ap is not "farther":
  #   x=0:  d_ap 9,  negatives 9 (x=-3), 16 (x=4) -> 16 (not the tie 9) -> 10 + 9 - 16 = 3
  #   x=3:  d_ap 9,  negatives 36, 1 -> 36 -> 0
  #   x=-3: d_ap 49, negatives 9, 36 -> none farther -> largest 36 -> 23
  #   x=4:  d_ap 49, negatives 16, 1 -> none farther -> largest 16 (not the hardest, 1) -> 43
  # Loss 69/4; active 3/4; mean d_an (16 + 36 + 36 + 16)/4 = 26.
  loss, metrics = run("triplet", line(0, 3, -3, 4), column(0, 0, 1, 1), margin=10.0, mining="semi_hard")
  assert loss == pytest.approx(17.25, rel=1e-6)
  assert metrics == pytest.approx({"active_fraction": 0.75, "mean_positive_distance": 29.0,
                                   "mean_negative_distance": 26.0})


def test_explicit_triplets_by_hand():
  # Rows (anchor, positive, negative) on the line, margin 1:
  #   (2, 0, 3): d_ap 4, d_an 1 -> 4;   (0, 2, 6): d_ap 4, d_an 36 -> 0;
  #   (0, 100, 0): labels (0, 1, 1) are not a triplet: its hinge would be 10001, but it is masked out.
  embeddings = jnp.asarray([[2, 0, 3], [0, 2, 6], [0, 100, 0]], jnp.float32)[:, :, None]
  labels = jnp.asarray([[0, 0, 1], [0, 0, 1], [0, 1, 1]], jnp.int32)
  loss, metrics = run("triplet", embeddings, labels, margin=1.0, mining="none")
  assert loss == pytest.approx(2.0, rel=1e-6)
  assert metrics == pytest.approx({"active_fraction": 0.5, "mean_positive_distance": 4.0,
                                   "mean_negative_distance": 18.5})


def test_cosine_distance_by_hand():
  # 1 - cos: a=(1,0), p=(0,5): 1; n=(-2,0): 2 -> hinge 0.2+1-2 = 0 (norms must not matter).
  # a=(1,0), p=(0,3): 1; n=(3,3): 1 - 1/sqrt2 -> hinge 0.2 + 1 - (1 - 1/sqrt2) = 0.2 + 1/sqrt2.
  embeddings = jnp.asarray([[[1, 0], [0, 5], [-2, 0]], [[1, 0], [0, 3], [3, 3]]], jnp.float32)
  labels = jnp.asarray([[0, 0, 1], [0, 0, 1]], jnp.int32)
  loss, metrics = run("triplet", embeddings, labels, distance="cosine", mining="none")
  assert loss == pytest.approx((0.2 + 1 / math.sqrt(2)) / 2, rel=1e-5)
  assert metrics["mean_positive_distance"] == pytest.approx(1.0, abs=1e-6)
  assert metrics["mean_negative_distance"] == pytest.approx((2 + 1 - 1 / math.sqrt(2)) / 2, rel=1e-5)
  # The first triplet's points mined in-batch (batch_hard, labels 0 0 1, pairwise cosine through the Gram):
  # anchor (1,0): pos 1, neg 2 -> 0; anchor (0,5): pos 1, neg cos 0 -> 1 -> 0.2; anchor (-2,0): no positive.
  # Loss (0 + 0.2)/2 = 0.1; mean d_an (2 + 1)/2 = 1.5.
  loss, metrics = run("triplet", embeddings[:1].reshape(3, 1, 2), labels[:1].reshape(3, 1),
                      distance="cosine", mining="batch_hard")
  assert loss == pytest.approx(0.1, rel=1e-5)
  assert metrics["mean_negative_distance"] == pytest.approx(1.5, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Masks and gradients.


IN_BATCH = ("batch_all", "batch_hard", "semi_hard")


@pytest.mark.parametrize("mining", IN_BATCH)
def test_singleton_class_anchor_is_masked(mining):
  # x = [0, 1, 5], labels [0, 0, 1]. x=5 has no positive, so it is never an anchor; but it is the
  # negative of both others: d_ap = 1, d_an = 25 (x=0) and 16 (x=1). margin 30: hinges 6 and 15.
  # Every mode has exactly these two triplets -> loss 10.5, active 1, mean pos 1, mean neg 20.5.
  loss, metrics = run("triplet", line(0, 1, 5), column(0, 0, 1), margin=30.0, mining=mining)
  assert loss == pytest.approx(10.5, rel=1e-6)
  assert metrics == pytest.approx({"active_fraction": 1.0, "mean_positive_distance": 1.0,
                                   "mean_negative_distance": 20.5})


@pytest.mark.parametrize("mining", IN_BATCH)
def test_batch_without_triplets_gives_zero_not_nan(mining):
  for labels in (column(3, 3, 3), column(0, 1, 2)):  # no negatives; no positives
    loss, metrics = run("triplet", line(0, 1, 5), labels, mining=mining)
    assert loss == 0.0
    assert metrics == {"active_fraction": 0.0, "mean_positive_distance": 0.0,
                       "mean_negative_distance": 0.0}


@pytest.mark.parametrize("mining,distance", itertools.product(IN_BATCH, losses.DISTANCES))
def test_triplet_gradient_finite_with_duplicates_and_zeros(mining, distance):
  # Duplicate points (distance 0), an all-zero embedding (cosine's normalisation), a singleton class.
  embeddings = jnp.asarray([[0, 0], [0, 0], [1, 1], [1, 1], [2, 0]], jnp.float32)[:, None, :]
  labels = column(0, 0, 1, 1, 2)
  grads = jax.grad(lambda e: losses.triplet(e, labels, margin=0.5, distance=distance, mining=mining)[0])(
      embeddings)
  assert bool(jnp.all(jnp.isfinite(grads)))


def test_triplet_gradient_by_hand():
  # batch_hard, x = [0, 2, 3, 6], margin 1: the active anchors are x=2 with the term
  # 1 + (x2 - x0)^2 - (x2 - x3)^2 and x=3 with 1 + (x3 - x6)^2 - (x3 - x2)^2, each weighted 1/4.
  #   first term:  d/dx0 = -2(2-0) = -4;  d/dx2 = 2(2-0) - 2(2-3) = 6;  d/dx3 = 2(2-3) = -2
  #   second term: d/dx2 = 2(3-2) = 2;    d/dx3 = 2(3-6) - 2(3-2) = -8;  d/dx6 = -2(3-6) = 6
  # Sums / 4: x0 -1, x2 (6+2)/4 = 2, x3 (-2-8)/4 = -2.5, x6 6/4 = 1.5.
  grads = jax.grad(lambda e: losses.triplet(e, LINE_LABELS, margin=1.0, mining="batch_hard")[0])(LINE)
  np.testing.assert_allclose(np.asarray(grads).ravel(), [-1.0, 2.0, -2.5, 1.5], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Layouts: in-batch mining flattens [B, k, D], so the grouping of rows must not matter.


@pytest.mark.parametrize("mining", IN_BATCH)
def test_in_batch_mining_is_layout_invariant(mining):
  rng = np.random.default_rng(0)
  embeddings = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(4, 3)), jnp.int32)
  as_triplets = run("triplet", embeddings, labels, mining=mining, margin=1.0)
  as_m_per_class = run("triplet", embeddings.reshape(12, 1, 5), labels.reshape(12, 1), mining=mining,
                       margin=1.0)
  as_pairs = run("triplet", embeddings.reshape(6, 2, 5), labels.reshape(6, 2), mining=mining, margin=1.0)
  assert as_triplets[0] == pytest.approx(as_m_per_class[0], rel=1e-6)
  assert as_triplets[0] == pytest.approx(as_pairs[0], rel=1e-6)
  assert as_triplets[1] == pytest.approx(as_m_per_class[1], rel=1e-6)


def test_explicit_triplets_equal_their_per_triplet_formula_and_need_k3():
  # The same triplets, one at a time, give hinges whose mean is the batch loss (row order irrelevant).
  rng = np.random.default_rng(1)
  embeddings = jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
  labels = jnp.tile(jnp.asarray([[0, 0, 1]], jnp.int32), (6, 1))
  batch_loss, _ = run("triplet", embeddings, labels, mining="none", margin=1.0)
  singles = [run("triplet", embeddings[i:i + 1], labels[:1], mining="none", margin=1.0)[0] for i in range(6)]
  assert batch_loss == pytest.approx(np.mean(singles), rel=1e-6)
  reversed_loss, _ = run("triplet", embeddings[::-1], labels, mining="none", margin=1.0)
  assert reversed_loss == pytest.approx(batch_loss, rel=1e-6)
  with pytest.raises(UserError, match="k=3"):
    losses.triplet(embeddings.reshape(18, 1, 4), labels.reshape(18, 1), mining="none")


# ------------------------------------------------------------------------------------------------
# Brute-force references (loops over triplets) on random batches with uneven classes.


def reference_triplet(points: np.ndarray, labels: np.ndarray, margin: float, mining: str,
                      distance: str = "squared_euclidean"):
  n = len(labels)
  d = ((points[:, None] - points[None]) ** 2).sum(-1)
  d = np.sqrt(d) if distance == "euclidean" else d
  hinges = []
  for a in range(n):
    positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
    negatives = [q for q in range(n) if labels[q] != labels[a]]
    if not positives or not negatives:
      continue
    if mining == "batch_all":
      hinges += [max(0.0, margin + d[a, p] - d[a, q]) for p in positives for q in negatives]
    elif mining == "batch_hard":
      hinges.append(max(0.0, margin + max(d[a, positives]) - min(d[a, negatives])))
    else:  # semi_hard, TF-Addons' definition
      for p in positives:
        farther = [d[a, q] for q in negatives if d[a, q] > d[a, p]]
        chosen = min(farther) if farther else max(d[a, negatives])
        hinges.append(max(0.0, margin + d[a, p] - chosen))
  hinges = np.asarray(hinges)
  if mining == "batch_all":
    return hinges.sum() / max((hinges > 0).sum(), 1)
  return hinges.mean()


@pytest.mark.parametrize("mining,distance", itertools.product(IN_BATCH, ("squared_euclidean", "euclidean")))
def test_mining_matches_brute_force(mining, distance):
  rng = np.random.default_rng(2)
  points = rng.normal(size=(11, 3)).astype(np.float32)
  labels = np.asarray([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4], np.int32)
  margin = 1.5 if distance == "squared_euclidean" else 0.5  # the same order as the distances' spread
  loss, _ = run("triplet", jnp.asarray(points)[:, None], jnp.asarray(labels)[:, None], margin=margin,
                mining=mining, distance=distance)
  reference = reference_triplet(points.astype(np.float64), labels, margin, mining, distance)
  assert reference > 0.1  # the batch has active triplets, so the comparison tests the hinges
  assert loss == pytest.approx(reference, rel=1e-5)


def test_euclidean_by_hand():
  # a=(0,0), p=(3,4): 5; n=(0,2): 2 -> hinge 0.2 + 5 - 2 = 3.2 (squared would give 0.2 + 25 - 4 = 21.2).
  embeddings = jnp.asarray([[[0, 0], [3, 4], [0, 2]]], jnp.float32)
  labels = jnp.asarray([[0, 0, 1]], jnp.int32)
  loss, metrics = run("triplet", embeddings, labels, distance="euclidean", mining="none")
  assert loss == pytest.approx(3.2, rel=1e-6)
  assert metrics["mean_positive_distance"] == pytest.approx(5.0, rel=1e-6)


def test_gradient_near_a_collapse_vanishes_for_the_squared_distance_only():
  """Every embedding within 1e-3 of one point (what batch-hard with the squared distance fell into on
  Omniglot): the squared distance's gradient is ~2 * 1e-3 per row, so it cannot pull the points apart;
  the plain distance's is a unit vector per active triplet, whatever the scale."""
  rng = np.random.default_rng(0)
  center = rng.normal(size=(1, 8))
  points = jnp.asarray(center + 1e-3 * rng.normal(size=(12, 8)), jnp.float32)[:, None]
  labels = jnp.asarray(np.repeat(np.arange(4), 3), jnp.int32)[:, None]

  def gradient_norm(distance):
    loss_fn = functools.partial(losses.triplet, distance=distance, mining="batch_hard")
    grad = jax.jit(jax.grad(lambda e: loss_fn(e, labels)[0]))(points)
    return float(jnp.linalg.norm(grad))

  assert gradient_norm("squared_euclidean") < 0.01
  assert gradient_norm("euclidean") > 0.3


# ------------------------------------------------------------------------------------------------
# prototypical


def test_prototypical_by_hand():
  # x = [0, 1, 2, 3, 1.5], labels [0, 0, 1, 1, 2]. Class 2 is a singleton: not a query, still a prototype.
  # Leave-one-out own prototypes: x=0 -> 1, x=1 -> 0, x=2 -> 3, x=3 -> 2 (squared distance 1 each).
  # Other prototypes: class 0 mean 0.5, class 1 mean 2.5, class 2 at 1.5. Squared distances:
  #   x=0: own 1, c1 6.25, c2 2.25  -> CE log(1 + e^-5.25 + e^-1.25), right
  #   x=1: own 1, c1 2.25, c2 0.25  -> CE log(1 + e^-1.25 + e^0.75), wrong (c2 closest)
  #   x=2: own 1, c0 2.25, c2 0.25  -> same as x=1, wrong;   x=3: mirror of x=0, right.
  loss, metrics = run("prototypical", line(0, 1, 2, 3, 1.5), column(0, 0, 1, 1, 2))
  expected = (math.log(1 + math.exp(-5.25) + math.exp(-1.25)) + math.log(1 + math.exp(-1.25) + math.exp(0.75))) / 2
  assert loss == pytest.approx(expected, rel=1e-6)
  assert metrics["accuracy"] == pytest.approx(0.5)


def test_prototypical_leave_one_out_with_three_examples():
  # Class 7 = {0, 1, 2}, class 9 = {3, 5} (labels are global ids, not 0..C-1). Means: 1 and 4.
  # Squared distances to the own leave-one-out prototype and to the other class's mean:
  #   x=0: own mean(1,2)=1.5 -> 2.25; c9 16    -> log(1 + e^-13.75)
  #   x=1: own mean(0,2)=1 -> 0;     c9 9      -> log(1 + e^-9)
  #   x=2: own mean(0,1)=0.5 -> 2.25; c9 4     -> log(1 + e^-1.75)
  #   x=3: own 5 -> 4;               c7 mean 1 -> 4  -> log 2 (a tie: argmax takes the first, class 7, wrong)
  #   x=5: own 3 -> 4;               c7 16     -> log(1 + e^-12)
  loss, metrics = run("prototypical", line(0, 1, 2, 3, 5), column(7, 7, 7, 9, 9))
  expected = np.mean([math.log1p(math.exp(-13.75)), math.log1p(math.exp(-9)), math.log1p(math.exp(-1.75)),
                      math.log(2), math.log1p(math.exp(-12))])
  assert loss == pytest.approx(expected, rel=1e-6)
  assert metrics["accuracy"] == pytest.approx(4 / 5)


def reference_prototypical(points: np.ndarray, labels: np.ndarray) -> float:
  losses_ = []
  classes = sorted(set(labels.tolist()))
  for i, (x, y) in enumerate(zip(points, labels)):
    own = [j for j in range(len(labels)) if labels[j] == y and j != i]
    if not own:
      continue
    logits = []
    for c in classes:
      members = own if c == y else [j for j in range(len(labels)) if labels[j] == c]
      logits.append(-((x - points[members].mean(0)) ** 2).sum())
    logits = np.asarray(logits)
    losses_.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[classes.index(y)])
  return float(np.mean(losses_))


def test_prototypical_matches_brute_force_and_layouts():
  rng = np.random.default_rng(3)
  points = rng.normal(size=(12, 4)).astype(np.float32)
  labels = np.asarray([5, 5, 5, 5, 2, 2, 8, 8, 8, 1, 3, 3], np.int32)
  loss, _ = run("prototypical", jnp.asarray(points)[:, None], jnp.asarray(labels)[:, None])
  assert loss == pytest.approx(reference_prototypical(points.astype(np.float64), labels), rel=1e-5)
  as_pairs, _ = run("prototypical", jnp.asarray(points).reshape(6, 2, 4), jnp.asarray(labels).reshape(6, 2))
  assert as_pairs == pytest.approx(loss, rel=1e-6)


def test_prototypical_masks_singletons_and_gradient_is_finite():
  # Only singletons: nothing to learn -> 0, not NaN; gradients finite with duplicates.
  loss, metrics = run("prototypical", line(0, 1, 2), column(0, 1, 2))
  assert (loss, metrics["accuracy"]) == (0.0, 0.0)
  embeddings = jnp.asarray([[0, 0], [0, 0], [1, 1], [3, 0]], jnp.float32)[:, None]
  grads = jax.grad(lambda e: losses.prototypical(e, column(0, 0, 1, 2))[0])(embeddings)
  assert bool(jnp.all(jnp.isfinite(grads)))


# ------------------------------------------------------------------------------------------------
# Registry, options, batch kinds.


def test_registry_and_unknown_name():
  assert set(losses.LOSSES) == {"koch_bce", "contrastive", "triplet", "prototypical", "multi_similarity", "circle",
                                "lifted_structure", "supcon", "proxy_anchor", "arcface", "cosface"}
  assert losses.get_loss("triplet") is losses.triplet
  with pytest.raises(UserError, match="arcface, circle, contrastive, cosface, koch_bce, lifted_structure"):
    losses.get_loss("tripplet")


def test_only_the_pair_head_losses_take_the_head():
  """The registry says which losses score pairs with the model's head; the others have no such input."""
  assert [name for name in sorted(losses.LOSSES) if losses.needs_pair_head(name)] == ["koch_bce"]
  assert list(inspect.signature(losses.koch_bce).parameters)[:3] == ["embeddings", "labels", "pair_logits_fn"]
  for name in sorted(set(losses.LOSSES) - {"koch_bce"}):
    inputs = [p.name for p in inspect.signature(losses.get_loss(name)).parameters.values()
              if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    proxies = ["proxies"] if name in losses.PROXY_LOSSES else []
    assert inputs == ["embeddings", "labels"] + proxies, name
  with pytest.raises(UserError, match="loss name 'nope' is not known"):
    losses.needs_pair_head("nope")


def test_option_defaults_and_validation():
  assert losses.loss_option_defaults("triplet") == {"margin": 0.2, "distance": "squared_euclidean",
                                                     "mining": "batch_hard"}
  assert losses.loss_option_defaults("contrastive") == {"margin": 1.0}
  assert losses.loss_option_defaults("koch_bce") == {}
  losses.validate_loss_options("triplet", {"margin": 0.5, "mining": "semi_hard", "distance": "cosine"})
  with pytest.raises(UserError, match=r"'triplet' has no option 'margn'; valid options: distance, margin, mining"):
    losses.validate_loss_options("triplet", {"margn": 0.5})
  with pytest.raises(UserError, match="takes no options"):
    losses.validate_loss_options("prototypical", {"margin": 1.0})
  with pytest.raises(UserError, match="none, batch_all, batch_hard, semi_hard"):
    losses.validate_loss_options("triplet", {"mining": "hard"})
  with pytest.raises(UserError, match="squared_euclidean, cosine"):
    losses.validate_loss_options("triplet", {"distance": "l2"})
  with pytest.raises(UserError, match="margin"):
    losses.validate_loss_options("contrastive", {"margin": -1.0})
  with pytest.raises(UserError, match="loss name"):
    losses.validate_loss_options("nope", {})


def test_batch_kind():
  assert losses.batch_kind("koch_bce") == "pairs"
  assert losses.batch_kind("contrastive", {"margin": 2.0}) == "pairs"
  assert losses.batch_kind("triplet", {"mining": "none"}) == "triplets"
  assert losses.batch_kind("triplet") == "m_per_class"  # default mining is batch_hard
  assert losses.batch_kind("triplet", {"mining": "semi_hard"}) == "m_per_class"
  assert losses.batch_kind("prototypical") == "m_per_class"
  assert losses.BATCH_K == {"pairs": 2, "triplets": 3, "m_per_class": 1}
  with pytest.raises(UserError):
    losses.batch_kind("triplet", {"minning": "none"})


def test_check_batch_kind():
  losses.check_batch_kind("koch_bce", {}, "pairs")
  losses.check_batch_kind("triplet", {"mining": "none"}, "triplets")
  for kind in ("m_per_class", "pairs", "triplets"):  # in-batch losses flatten any layout
    losses.check_batch_kind("triplet", {"mining": "batch_all"}, kind)
    losses.check_batch_kind("prototypical", {}, kind)
  with pytest.raises(UserError, match="sampling.kind='m_per_class' cannot feed loss 'contrastive'.*'pairs'"):
    losses.check_batch_kind("contrastive", {}, "m_per_class")
  with pytest.raises(UserError, match="use sampling.kind='triplets'"):
    losses.check_batch_kind("triplet", {"mining": "none"}, "pairs")
  with pytest.raises(UserError, match="no option"):
    losses.check_batch_kind("triplet", {"mine": "none"}, "triplets")
