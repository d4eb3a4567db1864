"""Evaluation through `embed_fn` only: embed every image once, then score episodes as array work.

Episodes are deterministic from a seed. All episodes of one setting are scored in a single batched
computation (gathers and distances over [episodes, ...] arrays), never one model call per episode.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from siamese_jax.errors import UserError


def embed_images(embed_fn: Callable, variables, images: np.ndarray, batch_size: int = 1024,
                 progress: bool = False) -> np.ndarray:
  """float32 [N, D] embeddings of uint8 images [N,H,W,C], in fixed-size batches (one compilation)."""
  num = len(images)
  if num == 0:
    raise UserError("no images to embed")
  batch_size = min(batch_size, num)
  jitted = jax.jit(embed_fn)
  chunks = []
  starts = range(0, num, batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc="embed", unit="batch", leave=False)
  for start in starts:
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:  # pad the last batch so every call has the compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)])
    chunks.append((jitted(variables, chunk), valid))
  return np.concatenate([np.asarray(out)[:valid] for out, valid in chunks]).astype(np.float32)


METRICS = ("euclidean", "cosine")


@dataclasses.dataclass(frozen=True)
class Episodes:
  """Record indices of E episodes: support [E, N, K] and query [E, N, Q]; class n of an episode is n."""

  support: np.ndarray
  query: np.ndarray


def sample_episodes(labels: np.ndarray, class_groups: np.ndarray, *, ways: int, shots: int, queries: int,
                    num_episodes: int, seed: int, within_group: bool) -> Episodes:
  """N-way K-shot episodes with Q queries per class, drawn without replacement inside an episode.

  within_group: all N classes from one group (alphabet) — Lake's harder protocol; only groups with at
  least N classes qualify. Otherwise classes come from anywhere.
  """
  labels = np.asarray(labels)
  class_groups = np.asarray(class_groups)
  num_classes = len(class_groups)
  if ways < 1 or shots < 1 or queries < 1 or num_episodes < 1:
    raise UserError(f"episodes need ways >= 1, shots >= 1, queries >= 1 and num_episodes >= 1; got "
                    f"ways={ways}, shots={shots}, queries={queries}, num_episodes={num_episodes}.")
  per_class = np.bincount(labels, minlength=num_classes)
  if shots + queries > per_class.min():
    fewest = int(np.argmin(per_class))
    raise UserError(f"{shots}-shot episodes with {queries} queries need {shots + queries} images per class; "
                    f"class {fewest} has {per_class[fewest]}.")
  rng = np.random.default_rng(seed)
  if within_group:
    group_sizes = np.bincount(class_groups)
    eligible = np.flatnonzero(group_sizes >= ways)
    if eligible.size == 0:
      raise UserError(f"{ways}-way within-group episodes need a group with {ways} classes; the largest "
                      f"has {group_sizes.max(initial=0)}.")
    # Every eligible group is equally likely however many classes it has, so a few large alphabets
    # do not dominate the score (each of Lake's runs, likewise, is one alphabet).
    episode_groups = rng.choice(eligible, size=num_episodes)
    class_keys = rng.random((num_episodes, num_classes))
    class_keys[class_groups[None, :] != episode_groups[:, None]] = np.inf
  else:
    if ways > num_classes:
      raise UserError(f"{ways}-way episodes need {ways} classes; only {num_classes} are available.")
    class_keys = rng.random((num_episodes, num_classes))
  classes = np.argsort(class_keys, axis=1)[:, :ways]  # [E, N] distinct classes
  # For each chosen class, a random order of its members; the first K are support, the next Q queries.
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(per_class)])
  max_members = per_class.max()
  keys = rng.random((num_episodes, ways, max_members))
  keys[np.arange(max_members)[None, None, :] >= per_class[classes][..., None]] = np.inf
  picks = np.argsort(keys, axis=2)[..., : shots + queries]
  records = order[starts[classes][..., None] + picks]
  return Episodes(support=records[..., :shots], query=records[..., shots:])


def episode_accuracies(embeddings: np.ndarray, episodes: Episodes, metric: str = "euclidean") -> np.ndarray:
  """Accuracy of each episode: a query is assigned to the nearest class prototype (mean of its shots).

  With one shot the prototype is the support image itself (nearest neighbour). `metric` is
  "euclidean" (squared distance) or "cosine" (angle, embeddings and prototypes normalised).
  """
  if metric not in METRICS:
    raise UserError(f"metric='{metric}' is not one of {METRICS}.")
  return np.asarray(_episode_accuracies(jnp.asarray(embeddings), jnp.asarray(episodes.support),
                                        jnp.asarray(episodes.query), metric))


@jax.jit(static_argnames="metric")
def _episode_accuracies(embeddings, support, query, metric):
  prototypes = embeddings[support].mean(axis=2)  # [E, N, D]
  queries = embeddings[query]  # [E, N, Q, D]
  if metric == "cosine":
    prototypes = prototypes / (jnp.linalg.norm(prototypes, axis=-1, keepdims=True) + 1e-12)
    queries = queries / (jnp.linalg.norm(queries, axis=-1, keepdims=True) + 1e-12)
    scores = jnp.einsum("enqd,ecd->enqc", queries, prototypes)
  else:
    # -|q - p|^2 = 2 q.p - |p|^2 - |q|^2; the last term is the same for every class, so it is dropped.
    # This never builds the [E, N, Q, N, D] difference tensor (gigabytes for 4096-d Koch features).
    scores = 2 * jnp.einsum("enqd,ecd->enqc", queries, prototypes) - jnp.sum(prototypes**2, -1)[:, None, None, :]
  predicted = jnp.argmax(scores, axis=-1)  # [E, N, Q]
  truth = jnp.arange(support.shape[1])[None, :, None]
  return jnp.mean(predicted == truth, axis=(1, 2))


def mean_and_ci95(values: np.ndarray) -> tuple[float, float]:
  """Mean and the half-width of its normal-approximation 95 % confidence interval."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), float("nan")
  return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def one_shot_report(embeddings: np.ndarray, labels: np.ndarray, class_groups: np.ndarray, *,
                    ways: tuple[int, ...], shots: tuple[int, ...], queries: int, num_episodes: int,
                    seed: int, modes: tuple[str, ...] = ("within", "unstructured")) -> dict:
  """{mode: {"<N>way<K>shot": {"mean", "ci95", "episodes"}}} over the given settings.

  Settings the data cannot support (N larger than the classes of any group, say) are skipped with
  the reason recorded, so one small split does not stop the whole report.
  """
  report: dict = {}
  for mode in modes:
    for n in ways:
      for k in shots:
        key = f"{n}way{k}shot"
        try:
          episodes = sample_episodes(labels, class_groups, ways=n, shots=k, queries=queries,
                                     num_episodes=num_episodes, seed=seed, within_group=mode == "within")
        except UserError as error:
          report.setdefault(mode, {})[key] = {"skipped": str(error)}
          continue
        mean, ci95 = mean_and_ci95(episode_accuracies(embeddings, episodes))
        report.setdefault(mode, {})[key] = {"mean": mean, "ci95": ci95, "episodes": num_episodes}
  return report


def lake_runs_accuracy(embed_fn: Callable, variables, runs, batch_size: int = 1024) -> dict:
  """Lake et al.'s 20-way one-shot benchmark: each test item goes to its nearest training image.

  `runs`: items with `training` [20,H,W,C], `test` [20,H,W,C] uint8 and `answers` [20] (the index of
  the right training image of each test item). Returns overall accuracy (0-1) and the 20 per-run ones.
  All runs' images are embedded in one `embed_images` call: one compilation and a few large batches
  instead of 20 small ones.
  """
  runs = list(runs)
  if not runs:
    return {"accuracy": float("nan"), "per_run": []}
  parts = [part for run in runs for part in (run.training, run.test)]
  embeddings = embed_images(embed_fn, variables, np.concatenate(parts), batch_size=batch_size)
  ends = np.cumsum([len(part) for part in parts])
  pieces = np.split(embeddings, ends[:-1])
  per_run = []
  for run, training, test in zip(runs, pieces[0::2], pieces[1::2]):
    distances = ((test[:, None, :] - training[None, :, :]) ** 2).sum(-1)
    per_run.append(float(np.mean(distances.argmin(axis=1) == np.asarray(run.answers))))
  return {"accuracy": float(np.mean(per_run)), "per_run": per_run}
