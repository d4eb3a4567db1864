"""The one way to score a pair of embedded images: a Scorer.

Every metric works in "similarity" units, higher meaning more alike. A distance scorer's similarity is
minus a distance between the two embeddings (`distance_scorer`: Euclidean, or cosine); a pair-head
scorer's is the Koch head's probability that the two images show the same class (`pair_head_scorer`).
A trained model carries one scorer (`trained.TrainedModel.scorer`); the metrics take it as an argument
and never ask which kind it is. Thresholds are kept in similarity units and shown to people as a
distance or a probability (`similarity_for_people`).

Each scorer answers in the shapes the metrics need:
  pair_similarities(first, second)          [P]     pairs of embeddings
  indexed_pair_similarities(table, i, j)    [P]     pairs of rows of one table, gathered chunk by chunk
  similarity_matrix(queries, references)    [Q, R]  every query against every reference
  episode_similarities(table, support, query)  [E, N, Q, N]  each episode query against each class
  cost_matrix(queries, references)          [Q, R]  lower = more alike, for nearest-item decisions
Pair work runs in fixed-size chunks: one compilation, and bounded memory even for 4096-d Koch features
and millions of pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from siamese_jax.errors import UserError

SCORINGS = ("auto", "distance", "pair_head")
METRICS = ("euclidean", "cosine")

# Floats held at once by chunked pair work ([pairs, D] gathers): 2^24 float32 = 64 MiB per operand.
_PAIR_CHUNK_FLOATS = 2**24
_NORM_EPSILON = 1e-12


def _pair_chunk_size(dim: int, total: int) -> int:
  return max(1, min(total, _PAIR_CHUNK_FLOATS // max(dim, 1)))


def _chunked_pairs(score: Callable, embeddings, first, second) -> np.ndarray:
  """float64 [P] `score(embeddings[first[p]], embeddings[second[p]])`, in chunks of one shape (the last
  padded)."""
  first = np.asarray(first, np.int64).reshape(-1)
  second = np.asarray(second, np.int64).reshape(-1)
  total = len(first)
  if total == 0:
    return np.zeros(0)
  embeddings = jnp.asarray(embeddings, jnp.float32)
  chunk = _pair_chunk_size(embeddings.shape[1], total)
  scores = []
  for start in range(0, total, chunk):
    a, b = first[start:start + chunk], second[start:start + chunk]
    valid = len(a)
    if valid < chunk:
      a, b = np.pad(a, (0, chunk - valid)), np.pad(b, (0, chunk - valid))
    scores.append(np.asarray(score(embeddings[a], embeddings[b]))[:valid])
  return np.concatenate(scores).astype(np.float64)


class Scorer:
  """How alike embedded images are (see the module docstring); `name` is "distance" or "pair_head"."""

  name: str

  def _pair_score(self, first: jax.Array, second: jax.Array) -> jax.Array:
    """[P] similarity of rows `first[p]`, `second[p]` ([P, D] each)."""
    raise NotImplementedError

  def pair_similarities(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """float64 [P] similarity of the pairs (first[p], second[p]) of embeddings [P, D]."""
    count = len(first)
    both = np.concatenate([np.asarray(first, np.float32), np.asarray(second, np.float32)])
    return self.indexed_pair_similarities(both, np.arange(count), count + np.arange(count))

  def indexed_pair_similarities(self, embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """float64 [P] similarity of the pairs (embeddings[first[p]], embeddings[second[p]])."""
    return _chunked_pairs(self._pair_score, embeddings, first, second)

  def similarity_matrix(self, queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """float64 [Q, R] similarity of every query embedding to every reference embedding."""
    queries = np.asarray(queries, np.float32)
    references = np.asarray(references, np.float32)
    num_queries, num_references = len(queries), len(references)
    both = np.concatenate([queries, references])
    first = np.repeat(np.arange(num_queries), num_references)
    second = num_queries + np.tile(np.arange(num_references), num_queries)
    return self.indexed_pair_similarities(both, first, second).reshape(num_queries, num_references)

  def episode_similarities(self, embeddings: np.ndarray, support: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[E, N, Q, N] how alike query [e, n, q] is to each of the N classes of episode e (support [E, N, K]
    and query [E, N, Q] are record indices into `embeddings`). Only the order along the last axis is
    meaningful: `episodes.episode_predictions` takes its argmax."""
    raise NotImplementedError

  def cost_matrix(self, queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """[Q, R] cost of matching each query to each reference, lower = more alike (Lake's harness)."""
    return -self.similarity_matrix(queries, references)


@dataclasses.dataclass(frozen=True)
class DistanceScorer(Scorer):
  """Minus the Euclidean distance of two embeddings, or minus their cosine distance (1 - cosine)."""

  metric: str = "euclidean"
  name: str = dataclasses.field(default="distance", init=False)

  def _pair_score(self, first, second):
    return _minus_distance(first, second) if self.metric == "euclidean" else _minus_cosine_distance(first, second)

  def similarity_matrix(self, queries, references):
    queries = np.asarray(queries, np.float32)
    references = np.asarray(references, np.float32)
    num_queries, num_references = len(queries), len(references)
    out = np.empty((num_queries, num_references))
    # In query chunks, from |q - r|^2 = |q|^2 + |r|^2 - 2 q.r: never a [Q, R, D] difference tensor.
    chunk = _pair_chunk_size(max(num_references, 1), num_queries)
    if self.metric == "cosine":
      references = _normalised(references.astype(np.float64))
      for start in range(0, num_queries, chunk):
        out[start:start + chunk] = _normalised(queries[start:start + chunk].astype(np.float64)) @ references.T - 1
      return out
    ref_norms = np.sum(references.astype(np.float64) ** 2, axis=1)
    for start in range(0, num_queries, chunk):
      q = queries[start:start + chunk].astype(np.float64)
      squared = np.sum(q**2, axis=1)[:, None] + ref_norms[None, :] - 2 * q @ references.T.astype(np.float64)
      out[start:start + chunk] = -np.sqrt(np.maximum(squared, 0.0))
    return out

  def episode_similarities(self, embeddings, support, query):
    """A query against each class's prototype (the mean of its shots; with one shot the shot itself):
    minus the squared distance (up to a constant per query), or the cosine of their angle."""
    return np.asarray(_prototype_similarities(jnp.asarray(embeddings), jnp.asarray(support), jnp.asarray(query),
                                              self.metric))

  def cost_matrix(self, queries, references):
    """Squared Euclidean distances, from the differences themselves (cosine: minus the similarity)."""
    if self.metric != "euclidean":
      return super().cost_matrix(queries, references)
    queries, references = np.asarray(queries), np.asarray(references)
    return ((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class PairHeadScorer(Scorer):
  """The pair head's probability that two images show the same class, in (0, 1)."""

  probability: Callable[[jax.Array, jax.Array], jax.Array]  # (e1 [P, D], e2 [P, D]) -> [P]
  name: str = dataclasses.field(default="pair_head", init=False)

  def _pair_score(self, first, second):
    return self.probability(first, second)

  def episode_similarities(self, embeddings, support, query):
    """The mean probability of a query against its episode's shots of each class (for one shot: against
    each support image, as in Koch et al.)."""
    support, query = np.asarray(support), np.asarray(query)
    num_episodes, ways, shots = support.shape
    queries = query.shape[2]
    flat_query = query.reshape(num_episodes, ways * queries)  # row n * Q + j is query j of class n
    flat_support = support.reshape(num_episodes, ways * shots)
    first = np.broadcast_to(flat_query[:, :, None], (num_episodes, ways * queries, ways * shots))
    second = np.broadcast_to(flat_support[:, None, :], first.shape)
    probabilities = self.indexed_pair_similarities(embeddings, first, second)
    class_scores = probabilities.reshape(num_episodes, ways * queries, ways, shots).mean(axis=-1)
    return class_scores.reshape(num_episodes, ways, queries, ways)


def distance_scorer(metric: str = "euclidean") -> DistanceScorer:
  """Scores by embedding distance: "euclidean" (the default everywhere) or "cosine"."""
  if metric not in METRICS:
    raise UserError(f"metric='{metric}' is not one of {METRICS}.")
  return DistanceScorer(metric)


def pair_head_scorer(pair_probability_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> PairHeadScorer:
  """Scores by a pair head: `pair_probability_fn(e1 [P, D], e2 [P, D]) -> [P]` in (0, 1), its variables
  bound (`models.make_pair_score_fn`)."""
  return PairHeadScorer(pair_probability_fn)


DISTANCE = distance_scorer()  # the default scorer of every metric


def resolve_scoring(scoring: str, has_pair_head: bool) -> str:
  """"auto" -> "pair_head" for models with a pair head, else "distance"; checks the name."""
  if scoring not in SCORINGS:
    raise UserError(f"scoring='{scoring}' is not one of {SCORINGS}.")
  if scoring == "auto":
    return "pair_head" if has_pair_head else "distance"
  if scoring == "pair_head" and not has_pair_head:
    raise UserError("scoring='pair_head' needs a model with a pair head (model.name='koch'); this model "
                    "has none: use scoring='distance' (or 'auto').")
  return scoring


def similarity_for_people(similarities: np.ndarray | float, scoring: str) -> np.ndarray | float:
  """Distances (for scoring="distance") or probabilities (the pair head), from similarities."""
  return -similarities if scoring == "distance" else similarities


def _normalised(vectors: np.ndarray) -> np.ndarray:
  return vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + _NORM_EPSILON)


@jax.jit
def _minus_distance(first, second):
  return -jnp.sqrt(jnp.sum((first - second) ** 2, axis=-1))


@jax.jit
def _minus_cosine_distance(first, second):
  first = first / (jnp.linalg.norm(first, axis=-1, keepdims=True) + _NORM_EPSILON)
  second = second / (jnp.linalg.norm(second, axis=-1, keepdims=True) + _NORM_EPSILON)
  return jnp.sum(first * second, axis=-1) - 1


@jax.jit(static_argnames="metric")
def _prototype_similarities(embeddings, support, query, metric):
  prototypes = embeddings[support].mean(axis=2)  # [E, N, D]
  queries = embeddings[query]  # [E, N, Q, D]
  if metric == "cosine":
    prototypes = prototypes / (jnp.linalg.norm(prototypes, axis=-1, keepdims=True) + _NORM_EPSILON)
    queries = queries / (jnp.linalg.norm(queries, axis=-1, keepdims=True) + _NORM_EPSILON)
    return jnp.einsum("enqd,ecd->enqc", queries, prototypes)
  # -|q - p|^2 = 2 q.p - |p|^2 - |q|^2; the last term is the same for every class, so it is dropped.
  # This never builds the [E, N, Q, N, D] difference tensor (gigabytes for 4096-d Koch features).
  return 2 * jnp.einsum("enqd,ecd->enqc", queries, prototypes) - jnp.sum(prototypes**2, -1)[:, None, None, :]
