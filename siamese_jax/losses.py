"""Pair, triplet and episode losses for metric learning, with in-batch mining.

Every loss has the signature of Contract 4 (docs/architecture.md):

  loss(embeddings [B, k, D], labels [B, k], **options) -> (scalar, metrics)

except the losses in PAIR_HEAD_LOSSES, which score pairs with the model's own head and take it as a
third input: `loss(embeddings, labels, pair_logits_fn, **options)`. Inputs are positional and options
keyword-only, so a loss's options (and their defaults) are read from its signature.

Every loss runs inside the jitted train step on the *global* batch, so it is pure `jnp`: no Python loops
over examples, no data-dependent shapes. Anchors without a positive or a negative, classes with a single
example and similar holes are handled with masks, so a bad batch gives a zero loss, never a NaN.

Which batch layout a loss wants (Contract 2) is answered by `batch_kind(name, options)`: the pipeline
asks it, so the sampler and the loss cannot disagree. Mining losses flatten `[B, k, D]` to `[B*k, D]`,
so they also work (and give the same number) on pair or triplet batches.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from siamese_jax.errors import UserError

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]
PairLogitsFn = Callable[[jax.Array, jax.Array], jax.Array]

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
MINING = ("none", "batch_all", "batch_hard", "semi_hard")

# Rows per batch element `k` for each batch kind of Contract 2.
BATCH_K = {"pairs": 2, "triplets": 3, "m_per_class": 1}

# Gram-matrix distances subtract large, nearly equal numbers; TPU/GPU default matmul precision (bf16 or
# TF32 passes) would turn that into distance noise of the size of the margin.
_PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# Small helpers.


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` where `mask`; 0 when the mask is empty (an empty batch must not give NaN)."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with a finite gradient at 0: plain sqrt'(0) is inf, and inf * 0 = NaN in the backward pass."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _l2_normalize(x: jax.Array) -> jax.Array:
  # The floor keeps an all-zero embedding (e.g. a dead ReLU at init) finite instead of NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _row_distance(a: jax.Array, b: jax.Array, distance: str) -> jax.Array:
  """Distance between matching rows of a and b [N, D] -> [N]; computed directly, no Gram cancellation."""
  if distance == "euclidean":
    return _safe_sqrt(jnp.sum(jnp.square(a - b), axis=-1))
  if distance == "squared_euclidean":
    return jnp.sum(jnp.square(a - b), axis=-1)
  return 1.0 - jnp.sum(_l2_normalize(a) * _l2_normalize(b), axis=-1)


def _pairwise_distances(embeddings: jax.Array, distance: str) -> jax.Array:
  """All pairwise distances [N, D] -> [N, N] through one matmul (N^2 D, not the N^2 D memory of diffs)."""
  eye = jnp.eye(embeddings.shape[0], dtype=bool)
  if distance == "euclidean":  # sqrt after the diagonal is zeroed: its rounding residue has no gradient
    return _safe_sqrt(_pairwise_distances(embeddings, "squared_euclidean"))
  if distance == "squared_euclidean":
    squared_norms = jnp.sum(jnp.square(embeddings), axis=-1)
    gram = jnp.matmul(embeddings, embeddings.T, precision=_PRECISION)
    distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    # Rounding can make the expansion slightly negative; a distance is never below 0.
    distances = jnp.maximum(distances, 0.0)
  else:
    normalized = _l2_normalize(embeddings)
    distances = 1.0 - jnp.matmul(normalized, normalized.T, precision=_PRECISION)
    distances = jnp.clip(distances, 0.0, 2.0)
  # The diagonal is exactly 0 by definition, whatever the rounding above did.
  return jnp.where(eye, 0.0, distances)


def _check_layout(name: str, embeddings: jax.Array, labels: jax.Array, k: int | None = None) -> None:
  """Shapes are static under jit, so a wrong batch layout fails at trace time with a clear message."""
  if embeddings.ndim != 3 or labels.shape != embeddings.shape[:2]:
    raise UserError(
        f"loss {name!r}: expected embeddings [B, k, D] and labels [B, k], got embeddings "
        f"{tuple(embeddings.shape)} and labels {tuple(labels.shape)}")
  if k is not None and embeddings.shape[1] != k:
    kind = {v: n for n, v in BATCH_K.items()}[k]
    raise UserError(
        f"loss {name!r}: needs {kind} batches with k={k} rows per element, got k={embeddings.shape[1]}; "
        f"build the data pipeline with batch_kind(name, options) from siamese_jax.losses")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise UserError(f"loss option {field}={value!r} is not valid; choose one of {', '.join(choices)}")


def _pair_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positive [N, N]: same label and a different example, negative [N, N]: different label)."""
  same = labels[:, None] == labels[None, :]
  eye = jnp.eye(labels.shape[0], dtype=bool)
  return same & ~eye, ~same


# ----------------------------------------------------------------------------------------------------
# Pair losses (k = 2).


def koch_bce(embeddings: jax.Array, labels: jax.Array, pair_logits_fn: PairLogitsFn) -> tuple[jax.Array, Metrics]:
  """Koch et al. 2015: sigmoid cross-entropy on the model's weighted-L1 pair logit.

  The head (sigma(sum_j alpha_j |e1_j - e2_j|)) belongs to the model, so the train step passes it as
  `pair_logits_fn` (this loss is in PAIR_HEAD_LOSSES; `training.setup` refuses a model without the head);
  the loss only knows that a positive logit means "same class".
  """
  _check_layout("koch_bce", embeddings, labels, k=2)
  embeddings = embeddings.astype(jnp.float32)
  same = labels[:, 0] == labels[:, 1]
  logits = pair_logits_fn(embeddings[:, 0], embeddings[:, 1]).astype(jnp.float32)
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, same.astype(jnp.float32)))
  probability = jax.nn.sigmoid(logits)
  metrics = {
      "accuracy": jnp.mean(((logits > 0) == same).astype(jnp.float32)),
      "mean_prob_same": _masked_mean(probability, same),
      "mean_prob_different": _masked_mean(probability, ~same),
  }
  return loss, metrics


def contrastive(embeddings: jax.Array, labels: jax.Array, *, margin: float = 1.0) -> tuple[jax.Array, Metrics]:
  """Hadsell, Chopra & LeCun 2006 (eq. 4), with their factor 1/2, averaged over pairs:

    same pair:       1/2 * d^2
    different pair:  1/2 * max(0, margin - d)^2,       d = Euclidean distance (not squared).
  """
  _check_layout("contrastive", embeddings, labels, k=2)
  embeddings = embeddings.astype(jnp.float32)
  same = labels[:, 0] == labels[:, 1]
  squared = _row_distance(embeddings[:, 0], embeddings[:, 1], "squared_euclidean")
  # Identical pairs (d = 0) are common early in training; the safe sqrt keeps their gradient finite.
  distance = _safe_sqrt(squared)
  per_pair = jnp.where(same, 0.5 * squared, 0.5 * jnp.square(jax.nn.relu(margin - distance)))
  metrics = {
      "mean_positive_distance": _masked_mean(distance, same),
      "mean_negative_distance": _masked_mean(distance, ~same),
  }
  return jnp.mean(per_pair), metrics


# ----------------------------------------------------------------------------------------------------
# Triplet loss and its mining modes.


def _triplet_result(loss: jax.Array, hinge: jax.Array, valid: jax.Array, positive_distance: jax.Array,
                    negative_distance: jax.Array) -> tuple[jax.Array, Metrics]:
  """The metrics every mining mode reports, over the triplets that mode considers."""
  metrics = {
      "active_fraction": _masked_mean((hinge > 0).astype(jnp.float32), valid),
      "mean_positive_distance": _masked_mean(positive_distance, valid),
      "mean_negative_distance": _masked_mean(negative_distance, valid),
  }
  return loss, metrics


def _triplet_explicit(embeddings, labels, margin, distance):
  """Mining "none": row b is (anchor, positive, negative). Label-inconsistent rows are masked out."""
  anchor, positive, negative = embeddings[:, 0], embeddings[:, 1], embeddings[:, 2]
  valid = (labels[:, 0] == labels[:, 1]) & (labels[:, 0] != labels[:, 2])
  positive_distance = _row_distance(anchor, positive, distance)
  negative_distance = _row_distance(anchor, negative, distance)
  hinge = jax.nn.relu(margin + positive_distance - negative_distance)
  return _triplet_result(_masked_mean(hinge, valid), hinge, valid, positive_distance, negative_distance)


def _triplet_batch_all(distances, positive_mask, negative_mask, margin):
  """Every valid (a, p, n) triplet; the loss is the mean over the *active* ones (hinge > 0).

  Averaging over active triplets only keeps the gradient from vanishing as easy triplets pile up
  (Hermans et al. 2017, "batch all"). Memory is O(N^3) for N = B*k rows: 16.7 M floats at N = 256.
  """
  valid = positive_mask[:, :, None] & negative_mask[:, None, :]
  positive_distance = jnp.broadcast_to(distances[:, :, None], valid.shape)
  negative_distance = jnp.broadcast_to(distances[:, None, :], valid.shape)
  hinge = jnp.where(valid, jax.nn.relu(margin + positive_distance - negative_distance), 0.0)
  num_active = jnp.sum((hinge > 0).astype(jnp.float32))
  loss = jnp.sum(hinge) / jnp.maximum(num_active, 1.0)
  return _triplet_result(loss, hinge, valid, positive_distance, negative_distance)


def _triplet_batch_hard(distances, positive_mask, negative_mask, margin):
  """Hermans, Beyer & Leibe 2017: per anchor, its farthest positive and its closest negative."""
  has_positive = jnp.any(positive_mask, axis=1)
  has_negative = jnp.any(negative_mask, axis=1)
  valid = has_positive & has_negative
  hardest_positive = jnp.max(jnp.where(positive_mask, distances, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(negative_mask, distances, jnp.inf), axis=1)
  # Replace the +-inf of anchors without a positive or negative before any arithmetic touches them.
  hardest_positive = jnp.where(valid, hardest_positive, 0.0)
  hardest_negative = jnp.where(valid, hardest_negative, 0.0)
  hinge = jax.nn.relu(margin + hardest_positive - hardest_negative)
  return _triplet_result(_masked_mean(hinge, valid), hinge, valid, hardest_positive, hardest_negative)


def _triplet_semi_hard(distances, positive_mask, negative_mask, margin):
  """Schroff et al. 2015 (FaceNet) semi-hard mining, as defined by tf.contrib / TF-Addons
  `triplet_semihard_loss` (their code, which differs from their docstring):

  for every (anchor, positive) pair with a != p and the same label, the negative is the *closest
  negative farther than the positive* (d_an > d_ap, strictly). If it lies within the margin it is
  semi-hard and the hinge is positive; if beyond, the hinge is 0. When no negative is farther than the
  positive (all are "hard"), the *largest* negative distance is used instead, the gentlest of the hard
  ones. The loss is the mean hinge over (anchor, positive) pairs; unlike TF-Addons, pairs whose anchor
  has no negative at all are masked out rather than given an arbitrary value.

  A sort + binary search per anchor finds the negative in O(N^2 log N) time and O(N^2) memory, instead
  of the O(N^3) mask TF-Addons builds.
  """
  num_rows = distances.shape[0]
  sorted_negatives = jnp.sort(jnp.where(negative_mask, distances, jnp.inf), axis=1)
  num_negatives = jnp.sum(negative_mask, axis=1)
  # first[a, p] = how many negatives of a lie at distance <= d_ap = index of the first one beyond it.
  first = jax.vmap(lambda row, queries: jnp.searchsorted(row, queries, side="right"))(
      sorted_negatives, distances)
  has_farther = first < num_negatives[:, None]
  farther = jnp.take_along_axis(sorted_negatives, jnp.minimum(first, num_rows - 1), axis=1)
  largest = jnp.take_along_axis(sorted_negatives, jnp.maximum(num_negatives - 1, 0)[:, None], axis=1)
  valid = positive_mask & (num_negatives > 0)[:, None]
  negative_distance = jnp.where(valid, jnp.where(has_farther, farther, largest), 0.0)
  hinge = jnp.where(valid, jax.nn.relu(margin + distances - negative_distance), 0.0)
  return _triplet_result(_masked_mean(hinge, valid), hinge, valid, distances, negative_distance)


def triplet(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2, distance: str = "squared_euclidean",
            mining: str = "batch_hard") -> tuple[jax.Array, Metrics]:
  """Triplet loss max(0, margin + d(a, p) - d(a, n)) with the chosen mining.

  distance: "euclidean" (Hermans et al. 2017), "squared_euclidean" (FaceNet) or "cosine" (1 - cosine
    similarity). The squared distance's gradient, 2 (a - p), vanishes as embeddings draw together; the
    plain distance's is a unit vector at any scale. That alone does not stop batch-hard mining from
    collapsing every embedding onto one point on Omniglot from initialisation; semi-hard mining does
    (configs/ablations/omniglot_triplet.py).
  mining:
    "none"        explicit triplet batches (k = 3: anchor, positive, negative); mean over triplets.
    "batch_all"   all valid in-batch triplets; mean over the active ones (hinge > 0).
    "batch_hard"  per anchor, hardest positive and hardest negative (Hermans et al. 2017); mean over anchors.
    "semi_hard"   per (anchor, positive), FaceNet's semi-hard negative (see `_triplet_semi_hard`).
  The in-batch modes flatten [B, k, D] to [B*k, D], so any layout works; they are meant for
  m-per-class batches (k = 1). A valid triplet has a != p with the same label and n of another label.

  Metrics, over the triplets the mode considers (given, all valid, one per anchor, one per pair):
    active_fraction          fraction with a positive hinge (how much of the batch still teaches)
    mean_positive_distance   mean d(a, p)
    mean_negative_distance   mean d(a, n)
  """
  _check_choice("distance", distance, DISTANCES)
  _check_choice("mining", mining, MINING)
  _check_layout("triplet", embeddings, labels, k=3 if mining == "none" else None)
  embeddings = embeddings.astype(jnp.float32)
  if mining == "none":
    return _triplet_explicit(embeddings, labels, margin, distance)
  flat_embeddings = embeddings.reshape(-1, embeddings.shape[-1])
  flat_labels = labels.reshape(-1)
  distances = _pairwise_distances(flat_embeddings, distance)
  positive_mask, negative_mask = _pair_masks(flat_labels)
  mine = {"batch_all": _triplet_batch_all, "batch_hard": _triplet_batch_hard,
          "semi_hard": _triplet_semi_hard}[mining]
  return mine(distances, positive_mask, negative_mask, margin)


# ----------------------------------------------------------------------------------------------------
# Episode loss (m-per-class batches).


def prototypical(embeddings: jax.Array, labels: jax.Array) -> tuple[jax.Array, Metrics]:
  """Snell et al. 2017 prototypical loss, as an in-batch episode with leave-one-out prototypes.

  Each row is a query; the prototype of each class in the batch is the mean of its embeddings, except
  for the query's own class, whose prototype leaves the query out (otherwise the query would partly be
  its own prototype and the task would be too easy). Logits are negative squared Euclidean distances to
  the prototypes; the loss is the mean cross-entropy. A row that is the only example of its class has
  no prototype of its own class to match, so it is masked out of the loss and accuracy; for the other
  rows it still is its class's prototype (a distractor).

  For a class of n examples with mean P, the leave-one-out prototype of member e is (nP - e)/(n - 1), so
  e - prototype = n/(n - 1) (e - P): one matmul against the class means gives every distance.
  """
  _check_layout("prototypical", embeddings, labels)
  embeddings = embeddings.astype(jnp.float32).reshape(-1, embeddings.shape[-1])
  labels = labels.reshape(-1)
  num_rows = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  same_float = same.astype(jnp.float32)
  class_size = jnp.sum(same_float, axis=1)  # [N]: size of row j's class
  # Row j stands for its class's mean; only the first row of each class is kept as a candidate, so each
  # class gets one logit (labels are global class ids, so there is no dense class axis to index).
  class_mean = jnp.matmul(same_float, embeddings, precision=_PRECISION) / class_size[:, None]
  earlier = jnp.tril(jnp.ones((num_rows, num_rows), dtype=bool), k=-1)  # earlier[j, i]: i < j
  representative = ~jnp.any(same & earlier, axis=1)
  squared_norms = jnp.sum(jnp.square(embeddings), axis=-1)
  mean_norms = jnp.sum(jnp.square(class_mean), axis=-1)
  to_mean = squared_norms[:, None] + mean_norms[None, :] - 2.0 * jnp.matmul(
      embeddings, class_mean.T, precision=_PRECISION)
  to_mean = jnp.maximum(to_mean, 0.0)
  own_size = jnp.maximum(class_size - 1.0, 1.0)[None, :]
  leave_one_out_scale = jnp.where(same, jnp.square(class_size[None, :] / own_size), 1.0)
  candidate = representative[None, :] & jnp.where(same, class_size[None, :] > 1, True)
  valid = class_size > 1  # rows with at least one other example of their class
  logits = jnp.where(candidate, -to_mean * leave_one_out_scale, -jnp.inf)
  # A masked-out row may have no finite logit at all; give it zeros so log_softmax stays finite.
  logits = jnp.where(valid[:, None], logits, 0.0)
  log_probabilities = jax.nn.log_softmax(logits, axis=1)
  target = same & representative[None, :]
  cross_entropy = -jnp.sum(jnp.where(target, log_probabilities, 0.0), axis=1)
  predicted_label = labels[jnp.argmax(logits, axis=1)]
  metrics = {"accuracy": _masked_mean((predicted_label == labels).astype(jnp.float32), valid)}
  return _masked_mean(cross_entropy, valid), metrics


# ----------------------------------------------------------------------------------------------------
# Pair-weighting losses on cosine similarities (m-per-class batches).


def _flat_cosine(name: str, embeddings: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, k, D], [B, k] -> (cosine similarities [N, N], positive mask, negative mask) over the N = B*k rows."""
  _check_layout(name, embeddings, labels)
  flat = _l2_normalize(embeddings.astype(jnp.float32).reshape(-1, embeddings.shape[-1]))
  similarity = jnp.matmul(flat, flat.T, precision=_PRECISION)
  positive_mask, negative_mask = _pair_masks(labels.reshape(-1))
  return similarity, positive_mask, negative_mask


def _masked_logsumexp(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """log(sum(exp(values)) over mask) along `axis`; -inf where the mask is empty, with finite gradients."""
  masked = jnp.where(mask, values, -jnp.inf)
  peak = jnp.max(masked, axis=axis, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), jax.lax.stop_gradient(peak), 0.0)
  # Masked before exp: an unmasked entry far above the peak would overflow to inf, and inf * 0 is the NaN
  # of the backward pass.
  total = jnp.sum(jnp.exp(jnp.where(mask, values - peak, -jnp.inf)), axis=axis)
  any_in = jnp.any(mask, axis=axis)
  return jnp.where(any_in, jnp.log(jnp.where(any_in, total, 1.0)) + jnp.squeeze(peak, axis), -jnp.inf)


def _log1p_sum_exp(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """log(1 + sum(exp(values)) over mask): softplus of the masked logsumexp (0 where the mask is empty)."""
  return jax.nn.softplus(_masked_logsumexp(values, mask, axis))


def multi_similarity(embeddings: jax.Array, labels: jax.Array, *, alpha: float = 2.0, beta: float = 50.0,
                     base: float = 0.5, epsilon: float = 0.1, mining: bool = True) -> tuple[jax.Array, Metrics]:
  """Wang et al. 2019, multi-similarity loss with its pair miner, on cosine similarities S:

    per anchor i:  1/alpha log(1 + sum_p exp(-alpha (S_ip - base))) + 1/beta log(1 + sum_n exp(beta (S_in - base)))

  mining=True keeps a negative n iff S_in > min_p S_ip - epsilon (harder than the easiest positive) and a
  positive p iff S_ip < max_n S_in + epsilon (harder than the hardest negative); an anchor without negatives
  keeps no positive and one without positives no negative. The loss is the mean over anchors with a
  positive in the batch (0 when there is none); a single-class batch trains only without mining.

  alpha, beta: how sharply the positive / negative terms weight their hardest pairs (the paper's 2 and 50);
  base: the similarity that splits positives from negatives (lambda, 0.5 for CUB/Cars in the paper).
  Metrics: mined_positive_fraction and mined_negative_fraction of the valid pairs that the miner kept.
  """
  similarity, positive_mask, negative_mask = _flat_cosine("multi_similarity", embeddings, labels)
  if mining:
    hardest_negative = jnp.max(jnp.where(negative_mask, similarity, -jnp.inf), axis=1, keepdims=True)
    easiest_positive = jnp.min(jnp.where(positive_mask, similarity, jnp.inf), axis=1, keepdims=True)
    kept_positive = positive_mask & (similarity < hardest_negative + epsilon)
    kept_negative = negative_mask & (similarity > easiest_positive - epsilon)
  else:
    kept_positive, kept_negative = positive_mask, negative_mask
  positive_term = _log1p_sum_exp(-alpha * (similarity - base), kept_positive) / alpha
  negative_term = _log1p_sum_exp(beta * (similarity - base), kept_negative) / beta
  has_positive = jnp.any(positive_mask, axis=1)
  metrics = {
      "mined_positive_fraction": jnp.sum(kept_positive) / jnp.maximum(jnp.sum(positive_mask), 1),
      "mined_negative_fraction": jnp.sum(kept_negative) / jnp.maximum(jnp.sum(negative_mask), 1),
  }
  return _masked_mean(positive_term + negative_term, has_positive), metrics


def circle(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.25,
           gamma: float = 256.0) -> tuple[jax.Array, Metrics]:
  """Sun et al. 2020, circle loss with class-level labels, on cosine similarities s:

    per anchor:  softplus(logsumexp_n(gamma a_n (s_n - m)) + logsumexp_p(-gamma a_p (s_p - (1 - m))))
    a_p = max(0, 1 + m - s_p),  a_n = max(0, s_n + m)   (weights, held constant in the gradient)

  Each similarity is pushed by how far it is from its optimum (1 + m for positives, -m for negatives), so
  pairs near their optimum stop pulling. margin: relaxation m (0.25 in the paper); gamma: scale (256).
  The loss is the mean over anchors with a positive and a negative (0 when there is none).
  Metrics: active_fraction, the anchors whose hardest positive is not above their hardest negative by m.
  """
  similarity, positive_mask, negative_mask = _flat_cosine("circle", embeddings, labels)
  alpha_positive = jax.lax.stop_gradient(jax.nn.relu(1.0 + margin - similarity))
  alpha_negative = jax.lax.stop_gradient(jax.nn.relu(similarity + margin))
  negative_logits = gamma * alpha_negative * (similarity - margin)
  positive_logits = -gamma * alpha_positive * (similarity - (1.0 - margin))
  valid = jnp.any(positive_mask, axis=1) & jnp.any(negative_mask, axis=1)
  combined = (_masked_logsumexp(negative_logits, negative_mask) + _masked_logsumexp(positive_logits, positive_mask))
  per_anchor = jax.nn.softplus(jnp.where(valid, combined, 0.0))
  hardest_positive = jnp.min(jnp.where(positive_mask, similarity, jnp.inf), axis=1)
  hardest_negative = jnp.max(jnp.where(negative_mask, similarity, -jnp.inf), axis=1)
  metrics = {"active_fraction": _masked_mean((hardest_positive - hardest_negative < margin).astype(jnp.float32),
                                             valid)}
  return _masked_mean(per_anchor, valid), metrics


def lifted_structure(embeddings: jax.Array, labels: jax.Array, *, margin: float = 1.0) -> tuple[jax.Array, Metrics]:
  """Oh Song et al. 2016, lifted structured loss (their eq. 4), on Euclidean distances D:

    J_ij = log(sum_{k neg of i} exp(margin - D_ik) + sum_{l neg of j} exp(margin - D_jl)) + D_ij
    loss = 1 / (2 |P|) sum over positive pairs {i, j} of max(0, J_ij)^2

  Every positive pair is set against every negative of either end (the "lifted" batch), softly by the
  log-sum-exp. Pairs with no negative at either end are left out; 0 when no pair is left.
  Metrics: active_fraction of the positive pairs with J > 0.
  """
  _check_layout("lifted_structure", embeddings, labels)
  flat = embeddings.astype(jnp.float32).reshape(-1, embeddings.shape[-1])
  distances = _pairwise_distances(flat, "euclidean")
  positive_mask, negative_mask = _pair_masks(labels.reshape(-1))
  has_negative = jnp.any(negative_mask, axis=1)
  # [N]: log sum over i's negatives; a row without any gets a finite stand-in, as logaddexp's gradient at
  # (-inf, -inf) is NaN (its pairs are masked out below unless the other end has negatives).
  per_row = jnp.where(has_negative, _masked_logsumexp(margin - distances, negative_mask), -1e30)
  both = jnp.logaddexp(per_row[:, None], per_row[None, :])
  valid = positive_mask & (has_negative[:, None] | has_negative[None, :])
  j = jnp.where(valid, both + distances, 0.0)
  # Ordered pairs count each unordered pair twice, so 1/(2|P|) over unordered pairs is half their mean.
  loss = 0.5 * _masked_mean(jnp.square(jax.nn.relu(j)), valid)
  return loss, {"active_fraction": _masked_mean((j > 0).astype(jnp.float32), valid)}


def supcon(embeddings: jax.Array, labels: jax.Array, *, temperature: float = 0.1,
           supervised: bool = True) -> tuple[jax.Array, Metrics]:
  """Khosla et al. 2020, supervised contrastive loss (their L_out), or NT-Xent (SimCLR) with supervised=False:

    per anchor i:  -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t))

  on L2-normalised z. P(i): the other rows of i's class (supervised), or the other rows of i's batch
  element (supervised=False: the k rows of element b are k augmented views of one image, which is what
  `augment.views=2` makes; labels are then not used). Mean over anchors with a positive (0 when none).
  temperature: t (0.1 in Khosla et al.; SimCLR used 0.5 at large batches).
  Metrics: positive_rank1, the fraction of anchors whose most similar other row is a positive.
  """
  _check_layout("supcon", embeddings, labels)
  batch, k = labels.shape
  groups = labels if supervised else jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, k))
  similarity, positive_mask, _ = _flat_cosine("supcon", embeddings, groups)
  logits = similarity / temperature
  others = ~jnp.eye(logits.shape[0], dtype=bool)
  log_probability = logits - _masked_logsumexp(logits, others)[:, None]
  num_positives = jnp.sum(positive_mask, axis=1)
  per_anchor = -jnp.sum(jnp.where(positive_mask, log_probability, 0.0), axis=1) / jnp.maximum(num_positives, 1)
  valid = num_positives > 0
  nearest = jnp.argmax(jnp.where(others, similarity, -jnp.inf), axis=1)
  rank1 = jnp.take_along_axis(positive_mask, nearest[:, None], axis=1)[:, 0]
  return _masked_mean(per_anchor, valid), {"positive_rank1": _masked_mean(rank1.astype(jnp.float32), valid)}


# ----------------------------------------------------------------------------------------------------
# Proxy losses: one learned vector per training class (the loss's own parameters, not the model's).


def _class_cosines(name: str, embeddings: jax.Array, labels: jax.Array,
                   proxies: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cosine of every row to every class proxy [N, C], the rows' labels [N])."""
  _check_layout(name, embeddings, labels)
  if proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[-1]:
    raise UserError(f"loss {name!r}: proxies must be [num_classes, {embeddings.shape[-1]}], "
                    f"got {tuple(proxies.shape)}")
  flat = _l2_normalize(embeddings.astype(jnp.float32).reshape(-1, embeddings.shape[-1]))
  cosines = jnp.matmul(flat, _l2_normalize(proxies.astype(jnp.float32)).T, precision=_PRECISION)
  return cosines, labels.reshape(-1)


def proxy_anchor(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *, margin: float = 0.1,
                 alpha: float = 32.0) -> tuple[jax.Array, Metrics]:
  """Kim et al. 2020, proxy-anchor loss, on cosines s(x, p) between embeddings and class proxies:

    1/|P+| sum_{p in P+} log(1 + sum_{x of class p} exp(-alpha (s(x, p) - margin)))
      + 1/|P| sum_{p in P} log(1 + sum_{x not of class p} exp(alpha (s(x, p) + margin)))

  P: every class's proxy; P+: those of the classes in the batch. Each proxy is an anchor that pulls its
  class's examples and pushes the others, weighted by how hard each is. The proxies train with the model
  (optim.proxy_lr_multiplier: Kim et al. give them 100x the learning rate). margin: delta (0.1);
  alpha: scale (32). Metrics: proxies_in_batch (|P+|), accuracy (nearest proxy is the row's class).
  """
  cosines, flat_labels = _class_cosines("proxy_anchor", embeddings, labels, proxies)
  num_classes = proxies.shape[0]
  member = flat_labels[:, None] == jnp.arange(num_classes)[None, :]  # [N, C]
  in_batch = jnp.any(member, axis=0)
  positive = _log1p_sum_exp(-alpha * (cosines - margin), member, axis=0)  # [C]
  negative = _log1p_sum_exp(alpha * (cosines + margin), ~member, axis=0)  # [C]
  loss = _masked_mean(positive, in_batch) + jnp.mean(negative)
  metrics = {"proxies_in_batch": jnp.sum(in_batch).astype(jnp.float32),
             "accuracy": jnp.mean((jnp.argmax(cosines, axis=1) == flat_labels).astype(jnp.float32))}
  return loss, metrics


def _margin_softmax(name: str, embeddings, labels, proxies, scale: float, target_logit) -> tuple[jax.Array, Metrics]:
  """Softmax cross-entropy over scale * cosines to the class proxies, the target's cosine replaced by
  target_logit(cosine); the cosine classifier shared by ArcFace and CosFace."""
  cosines, flat_labels = _class_cosines(name, embeddings, labels, proxies)
  target = jax.nn.one_hot(flat_labels, proxies.shape[0], dtype=bool)
  logits = scale * jnp.where(target, target_logit(cosines), cosines)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, flat_labels))
  return loss, {"accuracy": jnp.mean((jnp.argmax(cosines, axis=1) == flat_labels).astype(jnp.float32))}


def arcface(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *, scale: float = 64.0,
            margin: float = 0.5) -> tuple[jax.Array, Metrics]:
  """Deng et al. 2019, ArcFace (additive angular margin): softmax cross-entropy over scale * cos(theta_j),
  with the target class's angle widened to theta_y + margin. Past theta_y = pi - margin, where cos(theta +
  margin) would turn back up, the target logit is cos(theta_y) - margin sin(pi - margin) (insightface's
  fallback). The class proxies are the classifier's weights (optim.proxy_lr_multiplier sets their learning
  rate). scale: s (64 in the paper); margin: m in radians (0.5). Metrics: accuracy of the nearest proxy.
  """
  sin_m, cos_m = jnp.sin(margin), jnp.cos(margin)
  threshold, fallback = jnp.cos(jnp.pi - margin), jnp.sin(jnp.pi - margin) * margin

  def target_logit(cosine):
    # sin(theta) through the safe sqrt: its gradient is finite at cos = +-1 (identical vectors).
    sine = _safe_sqrt(jnp.clip(1.0 - jnp.square(cosine), 0.0, 1.0))
    return jnp.where(cosine > threshold, cosine * cos_m - sine * sin_m, cosine - fallback)

  return _margin_softmax("arcface", embeddings, labels, proxies, scale, target_logit)


def cosface(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *, scale: float = 64.0,
            margin: float = 0.35) -> tuple[jax.Array, Metrics]:
  """Wang et al. 2018, CosFace (large margin cosine loss): softmax cross-entropy over scale * cos(theta_j),
  with margin subtracted from the target class's cosine. scale: s (64); margin: m (0.35).
  Metrics: accuracy of the nearest proxy."""
  return _margin_softmax("cosface", embeddings, labels, proxies, scale, lambda cosine: cosine - margin)


def init_loss_params(name: str, options: Mapping[str, Any] | None = None, *, num_classes: int,
                     embedding_dim: int, key: jax.Array) -> jax.Array | None:
  """The loss's own parameters at initialisation: class proxies [num_classes, embedding_dim] for the losses
  in PROXY_LOSSES (normal with std sqrt(2 / num_classes), He initialisation over the classes as Kim et al.
  initialise theirs; only their direction matters), None for every other loss."""
  validate_loss_options(name, dict(options or {}))
  if name not in PROXY_LOSSES:
    return None
  if num_classes < 2:
    raise UserError(f"loss {name!r} learns one proxy per training class and needs at least 2 classes, "
                    f"got {num_classes}")
  return jax.random.normal(key, (num_classes, embedding_dim), jnp.float32) * jnp.sqrt(2.0 / num_classes)


# ----------------------------------------------------------------------------------------------------
# Registry.

LOSSES: dict[str, LossFn] = {
    "koch_bce": koch_bce,
    "contrastive": contrastive,
    "triplet": triplet,
    "prototypical": prototypical,
    "multi_similarity": multi_similarity,
    "circle": circle,
    "lifted_structure": lifted_structure,
    "supcon": supcon,
    "proxy_anchor": proxy_anchor,
    "arcface": arcface,
    "cosface": cosface,
}

# Losses that score pairs with the model's pair head (`model.pair_logits`): the train step passes the
# head to these as their third input, and only to these; a model with a head trains only with them.
PAIR_HEAD_LOSSES = frozenset({"koch_bce"})

# Losses with parameters of their own, one proxy per training class (`init_loss_params`): the train step
# passes them as the third input, trains them beside the model and checkpoints them; embed_fn never sees them.
PROXY_LOSSES = frozenset({"proxy_anchor", "arcface", "cosface"})


def get_loss(name: str) -> LossFn:
  """The loss called `name`; a UserError lists the valid names."""
  if name not in LOSSES:
    raise UserError(f"loss name {name!r} is not known; choose one of {', '.join(sorted(LOSSES))}")
  return LOSSES[name]


def needs_pair_head(name: str) -> bool:
  """Whether loss `name` takes the model's pair head (PAIR_HEAD_LOSSES); a UserError for unknown names."""
  get_loss(name)
  return name in PAIR_HEAD_LOSSES


def loss_option_defaults(name: str) -> dict[str, Any]:
  """The options a loss takes and their defaults, read from its signature (the one source of truth): its
  keyword-only parameters (the inputs, pair head included, are positional)."""
  parameters = inspect.signature(get_loss(name)).parameters.values()
  return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def validate_loss_options(name: str, options: Mapping[str, Any]) -> None:
  """Fail at config time, not deep in a trace: unknown option keys and bad choices raise UserError."""
  allowed = loss_option_defaults(name)
  for key in options:
    if key not in allowed:
      valid = ", ".join(sorted(allowed)) or "none (this loss takes no options)"
      raise UserError(f"loss {name!r} has no option {key!r}; valid options: {valid}")
  if "distance" in options:
    _check_choice("distance", options["distance"], DISTANCES)
  if "mining" in options and isinstance(allowed["mining"], str):
    _check_choice("mining", options["mining"], MINING)
  for key, value in options.items():
    default = allowed[key]
    if isinstance(default, bool) and not isinstance(value, bool):
      raise UserError(f"loss {name!r}: option {key}={value!r} must be True or False")
    if isinstance(default, float):
      is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
      positive, non_negative = key in _POSITIVE_OPTIONS, key in _NON_NEGATIVE_OPTIONS
      if not is_number or (positive and value <= 0) or (non_negative and value < 0):
        expected = " > 0" if positive else " >= 0" if non_negative else ""
        raise UserError(f"loss {name!r}: option {key}={value!r} must be a number{expected}")


# Options whose value divides or scales logits must be positive; margins and mining slack cannot be negative.
_POSITIVE_OPTIONS = frozenset({"alpha", "beta", "gamma", "temperature", "scale"})
_NON_NEGATIVE_OPTIONS = frozenset({"margin", "epsilon"})


def batch_kind(name: str, options: Mapping[str, Any] | None = None) -> str:
  """The batch layout (a key of BATCH_K) the data pipeline must build for this loss and options.

  Pair losses want pairs (k = 2); triplet with mining "none" wants explicit triplets (k = 3); in-batch
  mining and the prototypical loss want m-per-class batches (k = 1), where every class in the batch
  has several examples so that positives exist.
  """
  options = dict(options or {})
  validate_loss_options(name, options)
  if name in ("koch_bce", "contrastive"):
    return "pairs"
  if name == "triplet":
    mining = options.get("mining", loss_option_defaults(name)["mining"])
    return "triplets" if mining == "none" else "m_per_class"
  return "m_per_class"


def accepted_batch_kinds(name: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
  """Every batch kind the loss can train on; the first is `batch_kind`, the one it is meant for.

  Pair losses and explicit triplets read fixed rows, so only their own layout works. In-batch mining
  and the prototypical loss flatten the batch, so any layout works (pair and triplet batches just
  carry fewer positives per class than m-per-class ones).
  """
  preferred = batch_kind(name, options)
  if preferred == "m_per_class":
    return ("m_per_class", "pairs", "triplets")
  return (preferred,)


def check_batch_kind(name: str, options: Mapping[str, Any] | None, kind: str) -> None:
  """UserError when the sampler's batch kind (sampling.kind) cannot feed this loss."""
  accepted = accepted_batch_kinds(name, options)
  if kind not in accepted:
    with_options = f" with options {dict(options)}" if options else ""
    raise UserError(f"sampling.kind={kind!r} cannot feed loss {name!r}{with_options}; "
                    f"use sampling.kind={accepted[0]!r}" + (f" (or one of {', '.join(accepted[1:])})"
                                                            if len(accepted) > 1 else ""))
