"""Retrieval over one embedded split (precision@1, recall@k, MAP@R) and the similarity of queries to the
classes of a gallery (nearest image, centroid or medoid)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from siamese_jax.errors import UserError
from siamese_jax.metrics.scoring import DISTANCE, Scorer

GALLERY_METHODS = ("nearest", "centroid", "medoid")


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict:
  """Leave-one-out retrieval over one embedded split, by Euclidean distance.

  Every record queries all the others. precision@1: the nearest other record shares its class.
  recall@k: at least one of the k nearest does (the metric-learning "Recall@k"). MAP@R (Musgrave et al.
  2020): with R = the number of other records of the query's class, the mean over queries of
  (1/R) * sum_{i<=R} precision@i * [i-th nearest is relevant]. Queries whose class has no other record
  are left out of every metric (they have nothing to retrieve).
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels)
  num = len(labels)
  if num < 2:
    raise UserError(f"retrieval needs at least 2 records; got {num}.")
  ks = sorted({int(k) for k in ks})
  if not ks or ks[0] < 1:
    raise UserError(f"retrieval ks={ks}: expected positive integers.")
  relevant_counts = np.bincount(labels)[labels] - 1  # R of each query
  depth = int(min(num - 1, max(ks[-1], relevant_counts.max())))
  # [chunk, N] distances at a time: at most 2^26 floats (256 MiB) however large the split.
  chunk = max(1, min(chunk_size, num, 2**26 // num))
  table = jnp.asarray(embeddings)
  squared_norms = jnp.sum(table**2, axis=1)
  precision_at_1, recall_hits, average_precisions = [], {k: [] for k in ks}, []
  for start in range(0, num, chunk):
    queries = np.arange(start, min(start + chunk, num))
    padded = np.pad(queries, (0, chunk - len(queries)))
    neighbours = np.asarray(_nearest_others(table, squared_norms, jnp.asarray(padded), depth))[:len(queries)]
    hits = labels[neighbours] == labels[queries][:, None]  # [q, depth]
    counts = relevant_counts[queries]
    keep = counts > 0
    hits, counts = hits[keep], counts[keep]
    precision_at_1.append(hits[:, 0])
    for k in ks:
      recall_hits[k].append(hits[:, :k].any(axis=1))
    ranks = np.arange(1, depth + 1)
    within_r = ranks[None, :] <= counts[:, None]
    precision_at_i = np.cumsum(hits, axis=1) / ranks[None, :]
    average_precisions.append(np.sum(precision_at_i * hits * within_r, axis=1) / counts)
  evaluated = int(sum(len(p) for p in precision_at_1))
  if evaluated == 0:
    raise UserError("retrieval needs a class with at least 2 records; every class has one.")
  return {"precision_at_1": float(np.concatenate(precision_at_1).mean()),
          "recall_at_k": {str(k): float(np.concatenate(recall_hits[k]).mean()) for k in ks},
          "map_at_r": float(np.concatenate(average_precisions).mean()),
          "queries": evaluated}


@jax.jit(static_argnames="depth")
def _nearest_others(table, squared_norms, queries, depth):
  """Indices [q, depth] of the nearest records to each query, the query itself excluded."""
  squared = squared_norms[queries][:, None] + squared_norms[None, :] - 2 * table[queries] @ table.T
  squared = squared.at[jnp.arange(len(queries)), queries].set(jnp.inf)
  return jax.lax.top_k(-squared, depth)[1]


def class_representatives(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                          kind: str) -> tuple[np.ndarray, np.ndarray | None]:
  """([C, D] one embedding per class, [C] record index of each medoid or None).

  "centroid": the mean embedding. "medoid": the real record with the least summed Euclidean distance to
  the others of its class (a representative image one can show).
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise UserError(f"class {int(np.argmin(counts))} has no images; every class needs at least one.")
  if kind == "centroid":
    sums = np.zeros((num_classes, embeddings.shape[1]), np.float64)
    np.add.at(sums, labels, embeddings)
    return (sums / counts[:, None]).astype(np.float32), None
  if kind != "medoid":
    raise UserError(f"representative kind '{kind}' is not one of ('centroid', 'medoid').")
  medoids = np.empty(num_classes, np.int64)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    distances = -DISTANCE.similarity_matrix(embeddings[members], embeddings[members])
    medoids[c] = members[int(np.argmin(distances.sum(axis=1)))]
  return embeddings[medoids], medoids


def gallery_class_similarities(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray,
                               gallery_labels: np.ndarray, num_classes: int, method: str = "nearest",
                               scorer: Scorer = DISTANCE) -> np.ndarray:
  """[Q, C] similarity of each query to each gallery class.

  "nearest": to the class's most similar gallery image; "centroid": to its mean embedding;
  "medoid": to its medoid image. Representatives are chosen by Euclidean distance whatever `scorer`
  compares the queries with them.
  """
  if method not in GALLERY_METHODS:
    raise UserError(f"gallery method '{method}' is not one of {GALLERY_METHODS}.")
  gallery_labels = np.asarray(gallery_labels)
  if method == "nearest":
    counts = np.bincount(gallery_labels, minlength=num_classes)
    if (counts == 0).any():
      raise UserError(f"class {int(np.argmin(counts))} has no gallery images; every class needs at least one.")
    order = np.argsort(gallery_labels, kind="stable")
    similarities = scorer.similarity_matrix(query_embeddings, np.asarray(gallery_embeddings)[order])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.maximum.reduceat(similarities, starts, axis=1)
  representatives, _ = class_representatives(gallery_embeddings, gallery_labels, num_classes, method)
  return scorer.similarity_matrix(query_embeddings, representatives)
