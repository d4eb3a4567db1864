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
# Registry.

LOSSES: dict[str, LossFn] = {
    "koch_bce": koch_bce,
    "contrastive": contrastive,
    "triplet": triplet,
    "prototypical": prototypical,
}

# Losses that score pairs with the model's pair head (`model.pair_logits`): the train step passes the
# head to these as their third input, and only to these; a model with a head trains only with them.
PAIR_HEAD_LOSSES = frozenset({"koch_bce"})


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
  if "mining" in options:
    _check_choice("mining", options["mining"], MINING)
  if "margin" in options:
    margin = options["margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
      raise UserError(f"loss {name!r}: option margin={margin!r} must be a number >= 0")


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
