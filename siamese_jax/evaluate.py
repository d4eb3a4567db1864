"""Evaluation through `embed_fn` only (plus the Koch head's pair score, for models that have one).

Every image is embedded once; everything after that is array work over the embeddings: N-way K-shot
episodes, Lake's 20 official runs, verification (ROC-AUC, equal error rate, a calibrated threshold),
retrieval (precision@1, recall@k, MAP@R), open set and gallery classification. Episodes, pairs and
open-set splits are deterministic from a seed. `evaluate_workdir` runs all of it on a trained workdir
and writes `<workdir>/eval/results.json` and `<workdir>/eval/threshold.json`.

Similarities. Pair scoring is written once in "similarity" units, higher meaning more alike: minus the
Euclidean distance of two embeddings, or, for a model with a pair head, the head's probability that the
two images show the same class (`pair_score_fn(e1 [P, D], e2 [P, D]) -> [P]` in (0, 1)). A threshold is
kept in the same units inside this module and shown to people as a distance or a probability
(`threshold_record`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from siamese_jax.errors import UserError

PairScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

SCORINGS = ("auto", "distance", "pair_head")
THRESHOLD_METHODS = ("max_accuracy", "far")
GALLERY_METHODS = ("nearest", "centroid", "medoid")

# Floats held at once by chunked pair work ([pairs, D] gathers): 2^24 float32 = 64 MiB per operand.
_PAIR_CHUNK_FLOATS = 2**24


# --------------------------------------------------------------------------------------------------
# Embedding


def _image_batch(images, start: int, stop: int) -> np.ndarray:
  """Records [start, stop) as uint8 [n, H, W, C]: a slice of an array or in-memory source, else decoded now."""
  if isinstance(images, np.ndarray):
    return images[start:stop]
  cached = getattr(images, "images", None)
  if cached is not None:
    return cached[start:stop]
  return np.stack([np.asarray(images[i]) for i in range(start, min(stop, len(images)))])


def embedding_batches(embed_fn: Callable, variables, images, batch_size: int = 1024,
                      progress: bool = False, description: str = "embed") -> Iterator[np.ndarray]:
  """float32 [n, D] embeddings of consecutive batches of `images`, in order.

  `images`: uint8 [N, H, W, C], or an ImageSource (a lazy one is decoded batch by batch, so memory
  stays bounded by one batch of images). Every call has the same compiled shape (the last batch is
  padded), and the next batch is dispatched before the previous one is copied to the host.
  """
  num = len(images)
  if num == 0:
    raise UserError("no images to embed")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise UserError(f"batch_size={batch_size!r}: expected a positive integer")
  batch_size = min(int(batch_size), num)
  jitted = jax.jit(embed_fn)
  starts = range(0, num, batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=description, unit="batch", leave=False)
  pending = None
  for start in starts:
    chunk = _image_batch(images, start, start + batch_size)
    valid = len(chunk)
    if valid < batch_size:  # pad the last batch so every call has the compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)])
    output = jitted(variables, chunk)
    if pending is not None:
      yield np.asarray(pending[0])[:pending[1]].astype(np.float32)
    pending = (output, valid)
  yield np.asarray(pending[0])[:pending[1]].astype(np.float32)


def embed_images(embed_fn: Callable, variables, images, batch_size: int = 1024,
                 progress: bool = False) -> np.ndarray:
  """float32 [N, D] embeddings of uint8 images [N,H,W,C] (or an ImageSource), in fixed-size batches."""
  return np.concatenate(list(embedding_batches(embed_fn, variables, images, batch_size, progress)))


# --------------------------------------------------------------------------------------------------
# Pair similarities


def _pair_chunk_size(dim: int, total: int) -> int:
  return max(1, min(total, _PAIR_CHUNK_FLOATS // max(dim, 1)))


def score_index_pairs(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray,
                      pair_score_fn: PairScoreFn | None = None) -> np.ndarray:
  """float64 [P] similarity of the pairs (embeddings[first[p]], embeddings[second[p]]).

  Minus the Euclidean distance, or `pair_score_fn`'s probability. Worked through in fixed-size chunks
  (one compilation, bounded memory even for 4096-d Koch features and millions of pairs).
  """
  first = np.asarray(first, np.int64).reshape(-1)
  second = np.asarray(second, np.int64).reshape(-1)
  total = len(first)
  if total == 0:
    return np.zeros(0)
  embeddings = jnp.asarray(embeddings, jnp.float32)
  chunk = _pair_chunk_size(embeddings.shape[1], total)
  score = pair_score_fn if pair_score_fn is not None else _minus_distance
  scores = []
  for start in range(0, total, chunk):
    a, b = first[start:start + chunk], second[start:start + chunk]
    valid = len(a)
    if valid < chunk:
      a, b = np.pad(a, (0, chunk - valid)), np.pad(b, (0, chunk - valid))
    scores.append(np.asarray(score(embeddings[a], embeddings[b]))[:valid])
  return np.concatenate(scores).astype(np.float64)


@jax.jit
def _minus_distance(first, second):
  return -jnp.sqrt(jnp.sum((first - second) ** 2, axis=-1))


def similarity_matrix(queries: np.ndarray, references: np.ndarray,
                      pair_score_fn: PairScoreFn | None = None) -> np.ndarray:
  """float64 [Q, R] similarity of every query embedding to every reference embedding."""
  queries = np.asarray(queries, np.float32)
  references = np.asarray(references, np.float32)
  num_queries, num_references = len(queries), len(references)
  if pair_score_fn is None:
    # |q - r|^2 = |q|^2 + |r|^2 - 2 q.r, in query chunks: never a [Q, R, D] difference tensor.
    chunk = _pair_chunk_size(max(num_references, 1), num_queries)
    out = np.empty((num_queries, num_references))
    ref_norms = np.sum(references.astype(np.float64) ** 2, axis=1)
    for start in range(0, num_queries, chunk):
      q = queries[start:start + chunk].astype(np.float64)
      squared = np.sum(q**2, axis=1)[:, None] + ref_norms[None, :] - 2 * q @ references.T.astype(np.float64)
      out[start:start + chunk] = -np.sqrt(np.maximum(squared, 0.0))
    return out
  both = np.concatenate([queries, references])
  first = np.repeat(np.arange(num_queries), num_references)
  second = num_queries + np.tile(np.arange(num_references), num_queries)
  return score_index_pairs(both, first, second, pair_score_fn).reshape(num_queries, num_references)


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


# --------------------------------------------------------------------------------------------------
# N-way K-shot episodes

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


def episode_accuracies(embeddings: np.ndarray, episodes: Episodes, metric: str = "euclidean",
                       pair_score_fn: PairScoreFn | None = None) -> np.ndarray:
  """Accuracy of each episode [E]: the share of its queries `episode_predictions` gets right."""
  predicted = episode_predictions(embeddings, episodes, metric, pair_score_fn)
  truth = np.arange(predicted.shape[1])[None, :, None]
  return np.mean(predicted == truth, axis=(1, 2))


def episode_predictions(embeddings: np.ndarray, episodes: Episodes, metric: str = "euclidean",
                        pair_score_fn: PairScoreFn | None = None) -> np.ndarray:
  """The class (0..N-1) predicted for each query, [E, N, Q]; the right answer for query [e, n, q] is n.

  By distance: a query is assigned to the nearest class prototype (mean of its shots); with one shot
  the prototype is the support image itself (nearest neighbour). `metric` is "euclidean" (squared
  distance) or "cosine" (angle, embeddings and prototypes normalised). With `pair_score_fn` (the Koch
  head's probability) a query goes to the class whose shots it matches with the highest mean
  probability (for one shot: the most probable support image, as in Koch et al.).
  """
  if metric not in METRICS:
    raise UserError(f"metric='{metric}' is not one of {METRICS}.")
  if pair_score_fn is not None:
    return _pair_episode_predictions(embeddings, episodes, pair_score_fn)
  return np.asarray(_episode_predictions(jnp.asarray(embeddings), jnp.asarray(episodes.support),
                                         jnp.asarray(episodes.query), metric))


@jax.jit(static_argnames="metric")
def _episode_predictions(embeddings, support, query, metric):
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
  return jnp.argmax(scores, axis=-1)  # [E, N, Q]


def _pair_episode_predictions(embeddings, episodes: Episodes, pair_score_fn: PairScoreFn) -> np.ndarray:
  support, query = np.asarray(episodes.support), np.asarray(episodes.query)
  num_episodes, ways, shots = support.shape
  queries = query.shape[2]
  flat_query = query.reshape(num_episodes, ways * queries)  # row n * Q + j is query j of class n
  flat_support = support.reshape(num_episodes, ways * shots)
  first = np.broadcast_to(flat_query[:, :, None], (num_episodes, ways * queries, ways * shots))
  second = np.broadcast_to(flat_support[:, None, :], first.shape)
  probabilities = score_index_pairs(embeddings, first, second, pair_score_fn)
  class_scores = probabilities.reshape(num_episodes, ways * queries, ways, shots).mean(axis=-1)
  return class_scores.argmax(axis=-1).reshape(num_episodes, ways, queries)


def mean_and_ci95(values: np.ndarray) -> tuple[float, float]:
  """Mean and the half-width of its normal-approximation 95 % confidence interval."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), float("nan")
  return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def one_shot_report(embeddings: np.ndarray, labels: np.ndarray, class_groups: np.ndarray, *,
                    ways: Sequence[int], shots: Sequence[int], queries: int, num_episodes: int,
                    seed: int, modes: Sequence[str] = ("within", "unstructured"),
                    metric: str = "euclidean", pair_score_fn: PairScoreFn | None = None) -> dict:
  """{mode: {"<N>way<K>shot": {"mean", "ci95", "episodes"}}} over the given settings.

  Settings the data cannot support (N larger than the classes of any group, say) are skipped with
  the reason recorded, so one small split does not stop the whole report.
  """
  report: dict = {}
  for mode in modes:
    if mode not in ("within", "unstructured"):
      raise UserError(f"episode mode '{mode}' is not one of ('within', 'unstructured').")
    for n in ways:
      for k in shots:
        key = f"{n}way{k}shot"
        try:
          episodes = sample_episodes(labels, class_groups, ways=n, shots=k, queries=queries,
                                     num_episodes=num_episodes, seed=seed, within_group=mode == "within")
        except UserError as error:
          report.setdefault(mode, {})[key] = {"skipped": str(error)}
          continue
        mean, ci95 = mean_and_ci95(episode_accuracies(embeddings, episodes, metric, pair_score_fn))
        report.setdefault(mode, {})[key] = {"mean": mean, "ci95": ci95, "episodes": num_episodes}
  return report


def vinyals_report(embeddings: np.ndarray, source, *, ways: Sequence[int], shots: Sequence[int], queries: int,
                   num_episodes: int, seed: int, pair_score_fn: PairScoreFn | None = None) -> dict:
  """Vinyals et al.'s protocol on its test classes: N-way K-shot episodes drawn across all 1,692 rotated
  classes (unstructured), {"<N>way<K>shot": {"mean", "ci95", "episodes"}}."""
  return one_shot_report(embeddings, source.labels, source.class_groups, ways=ways, shots=shots,
                         queries=queries, num_episodes=num_episodes, seed=seed, modes=("unstructured",),
                         pair_score_fn=pair_score_fn)["unstructured"]


def validation_accuracy(embeddings: np.ndarray, source, eval_config, seed: int,
                        pair_score_fn: PairScoreFn | None = None) -> float:
  """Mean N-way 1-shot accuracy over fixed episodes of the validation classes `source` (their
  `embeddings`): what training selects checkpoints by. N = eval.validation_ways (at most the classes
  available), eval.validation_episodes episodes seeded by `seed`, within one group unless
  eval.validation_within_group is false. Scored by `pair_score_fn` when given (as `episode_predictions`)."""
  within = eval_config.get("validation_within_group", True)  # absent from configs written before it existed
  largest = int(np.bincount(source.class_groups).max()) if within else source.num_classes
  episodes = sample_episodes(source.labels, source.class_groups, ways=min(eval_config.validation_ways, largest),
                             shots=1, queries=eval_config.queries_per_class,
                             num_episodes=eval_config.validation_episodes, seed=seed, within_group=within)
  return float(episode_accuracies(embeddings, episodes, pair_score_fn=pair_score_fn).mean())


def check_episode_settings(labels: np.ndarray, class_groups: np.ndarray, *, ways: Sequence[int],
                           shots: Sequence[int], queries: int, split: str = "test") -> None:
  """Raises UserError when a requested N or K cannot be met by any mode on this split.

  `one_shot_report` skips a setting one mode cannot run (20-way within an alphabet of 14 characters
  is fine to skip when unstructured 20-way still runs); asking for more classes or images than the
  split holds at all is a mistake the user should hear about first.
  """
  labels = np.asarray(labels)
  num_classes = len(class_groups)
  per_class = np.bincount(labels, minlength=num_classes)
  for n in ways:
    if n < 2 or n > num_classes:
      raise UserError(f"ways={n}: {split} split has {num_classes} classes; N must lie in [2, {num_classes}].")
  for k in shots:
    if k < 1 or k + queries > per_class.min():
      fewest = int(np.argmin(per_class))
      raise UserError(f"shots={k}: {k}-shot episodes with {queries} queries per class need {k + queries} "
                      f"images per class, but class {fewest} of the {split} split has {per_class[fewest]}; "
                      f"K can be at most {per_class.min() - queries}.")


# --------------------------------------------------------------------------------------------------
# Lake et al.'s 20 official runs


def lake_runs_from_costs(runs: Sequence, costs: Sequence[np.ndarray]) -> dict:
  """Scores Lake's runs from one cost matrix per run, exactly as Lake et al.'s demo does.

  `costs[r][i, c]`: cost of matching test item i to training image c (lower = more alike).
  Lake's `classification_run` (demo_classification.py, ftype='cost') gives each test item the training
  image of least cost (np.argmin: the first one on ties), counts the items whose image is their class's
  (`class_labels.txt`), and reports the error of each run; the benchmark's number is the mean over the
  20 runs. Returns accuracy (0-1), error_percent (100 - 100 * accuracy, Lake's unit), per_run and ci95
  (half-width of the normal 95 % interval of the mean over runs: how far a rerun's score may move).
  """
  per_run = []
  for run, cost in zip(runs, costs, strict=True):
    cost = np.asarray(cost)
    if cost.shape != (len(run.test), len(run.training)):
      raise ValueError(f"{run.name}: cost matrix {cost.shape}, expected {(len(run.test), len(run.training))}")
    per_run.append(float(np.mean(np.argmin(cost, axis=1) == np.asarray(run.answers))))
  if not per_run:
    return {"accuracy": float("nan"), "error_percent": float("nan"), "ci95": float("nan"), "per_run": [],
            "runs": []}
  accuracy, ci95 = mean_and_ci95(per_run)
  return {"accuracy": accuracy, "error_percent": 100.0 * (1.0 - accuracy), "ci95": ci95, "per_run": per_run,
          "runs": [run.name for run in runs]}


def lake_runs_accuracy(embed_fn: Callable, variables, runs, batch_size: int = 1024,
                       pair_score_fn: PairScoreFn | None = None) -> dict:
  """Lake et al.'s 20-way one-shot benchmark: each test item goes to its nearest training image.

  `runs`: items with `training` [20,H,W,C], `test` [20,H,W,C] uint8 and `answers` [20] (the index of
  the right training image of each test item). Returns overall accuracy (0-1) and the 20 per-run ones.
  All runs' images are embedded in one `embed_images` call: one compilation and a few large batches
  instead of 20 small ones. With `pair_score_fn` the cost is minus the head's probability.
  """
  runs = list(runs)
  if not runs:
    return {"accuracy": float("nan"), "per_run": []}
  parts = [part for run in runs for part in (run.training, run.test)]
  embeddings = embed_images(embed_fn, variables, np.concatenate(parts), batch_size=batch_size)
  ends = np.cumsum([len(part) for part in parts])
  pieces = np.split(embeddings, ends[:-1])
  costs = []
  for training, test in zip(pieces[0::2], pieces[1::2]):
    if pair_score_fn is None:
      costs.append(((test[:, None, :] - training[None, :, :]) ** 2).sum(-1))
    else:
      costs.append(-similarity_matrix(test, training, pair_score_fn))
  return lake_runs_from_costs(runs, costs)


def ink_coordinates(image: np.ndarray) -> np.ndarray:
  """float64 [n, 2] (row, column) of the inked pixels of one image, centred on their mean.

  Lake's `LoadImgAsPoints`: the image as booleans with ink True, its nonzero coordinates, minus their
  mean. Here images follow the package convention ink = 255 (`load_lake_runs`), so ink is > 127.
  """
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., 0]
  rows, columns = np.nonzero(image > 127)
  points = np.stack([rows, columns], axis=1).astype(np.float64)
  return points - points.mean(axis=0) if len(points) else points


def modified_hausdorff_distance(points_a: np.ndarray, points_b: np.ndarray) -> float:
  """Dubuisson & Jain (1994): max(mean_a min_b |a - b|, mean_b min_a |a - b|), as Lake's demo has it.

  Each direction's nearest-point distances come from a k-d tree (exact, and ~50x faster than the
  full [n, m] distance matrix for Omniglot's ~900 ink pixels per image).
  """
  if len(points_a) == 0 or len(points_b) == 0:
    return float("inf")  # a blank image matches nothing
  from scipy.spatial import cKDTree  # scipy comes with jax and scikit-learn
  a_to_b = cKDTree(points_b).query(points_a)[0].mean()
  b_to_a = cKDTree(points_a).query(points_b)[0].mean()
  return float(max(a_to_b, b_to_a))


def lake_runs_mhd_baseline(runs: Sequence) -> dict:
  """Lake's modified-Hausdorff baseline through the same scoring as the models: 38.8 % error published.

  Images must be the originals (105 x 105, ink = 255): resizing moves ink pixels and changes the score.
  Each image's k-d tree is built once and queried by all 20 images it is compared with.
  """
  from scipy.spatial import cKDTree
  costs = []
  for run in runs:
    training = [ink_coordinates(image) for image in run.training]
    test = [ink_coordinates(image) for image in run.test]
    training_trees = [cKDTree(points) if len(points) else None for points in training]
    test_trees = [cKDTree(points) if len(points) else None for points in test]
    cost = np.full((len(test), len(training)), np.inf)
    for i, (item, item_tree) in enumerate(zip(test, test_trees)):
      for c, (image, image_tree) in enumerate(zip(training, training_trees)):
        if item_tree is not None and image_tree is not None:
          cost[i, c] = max(image_tree.query(item)[0].mean(), item_tree.query(image)[0].mean())
    costs.append(cost)
  return lake_runs_from_costs(runs, costs)


# --------------------------------------------------------------------------------------------------
# Verification: same or different?


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Record index pairs (first[p], second[p]); same[p] says whether they share a class."""

  first: np.ndarray
  second: np.ndarray
  same: np.ndarray


def sample_pairs(labels: np.ndarray, *, num_pairs: int, seed: int) -> Pairs:
  """num_pairs // 2 same-class pairs and the rest different-class pairs, deterministic from `seed`.

  Same: a record of a class with >= 2 records and another record of its class. Different: a record,
  then one of any other class, uniformly (never resampled, so this is vectorised and exact).
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max(initial=-1)) + 1
  if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 2:
    raise UserError(f"num_pairs={num_pairs!r}: expected an integer >= 2")
  per_class = np.bincount(labels, minlength=num_classes)
  if np.count_nonzero(per_class) < 2:
    raise UserError(f"verification pairs need at least 2 classes; the split has {np.count_nonzero(per_class)}.")
  if per_class.max() < 2:
    raise UserError("verification pairs need a class with at least 2 images; every class has one.")
  rng = np.random.default_rng(seed)
  order = np.argsort(labels, kind="stable")  # records grouped by class
  position = np.empty(len(labels), np.int64)
  position[order] = np.arange(len(labels))
  starts = np.concatenate([[0], np.cumsum(per_class)])[:-1]
  num_same = num_pairs // 2
  num_different = num_pairs - num_same
  eligible = np.flatnonzero(per_class[labels] >= 2)
  first_same = rng.choice(eligible, size=num_same)
  classes = labels[first_same]
  offset = (position[first_same] - starts[classes] + 1 + rng.integers(0, per_class[classes] - 1)) % per_class[classes]
  second_same = order[starts[classes] + offset]
  first_different = rng.integers(0, len(labels), size=num_different)
  classes = labels[first_different]
  # A uniform position among the records of the other classes, stepping over this class's block.
  other = rng.integers(0, len(labels) - per_class[classes])
  other = np.where(other >= starts[classes], other + per_class[classes], other)
  second_different = order[other]
  return Pairs(first=np.concatenate([first_same, first_different]),
               second=np.concatenate([second_same, second_different]),
               same=np.concatenate([np.ones(num_same, bool), np.zeros(num_different, bool)]))


def _split_scores(similarities, same) -> tuple[np.ndarray, np.ndarray]:
  similarities = np.asarray(similarities, np.float64)
  same = np.asarray(same, bool)
  if similarities.shape != same.shape or similarities.ndim != 1:
    raise ValueError(f"similarities {similarities.shape} and same {same.shape} must be equal 1-D shapes")
  positives, negatives = similarities[same], similarities[~same]
  if len(positives) == 0 or len(negatives) == 0:
    raise UserError(f"verification needs both same and different pairs; got {len(positives)} same and "
                    f"{len(negatives)} different.")
  return positives, negatives


def _roc_counts(similarities, same) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
  """(false accepts, true accepts, thresholds, positives, negatives) with thresholds decreasing from +inf."""
  positives, negatives = _split_scores(similarities, same)
  values = np.unique(np.concatenate([positives, negatives]))[::-1]
  # Accepted at t = values[i]: every score >= t, i.e. all but those strictly below.
  true_accepts = len(positives) - np.searchsorted(np.sort(positives), values, side="left")
  false_accepts = len(negatives) - np.searchsorted(np.sort(negatives), values, side="left")
  return (np.concatenate([[0], false_accepts]), np.concatenate([[0], true_accepts]),
          np.concatenate([[np.inf], values]), len(positives), len(negatives))


def roc_curve(similarities: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false accept rates, true accept rates, thresholds), thresholds decreasing from +inf.

  At threshold t a pair is accepted as "same" when its similarity >= t; one point per distinct
  similarity, plus (0, 0) at +inf, ending at (1, 1).
  """
  false_accepts, true_accepts, thresholds, num_positives, num_negatives = _roc_counts(similarities, same)
  return false_accepts / num_negatives, true_accepts / num_positives, thresholds


def roc_auc(similarities: np.ndarray, same: np.ndarray) -> float:
  """Area under the ROC curve = P(a same pair scores above a different pair), ties counted half."""
  far, tar, _ = roc_curve(similarities, same)
  return float(np.sum((far[1:] - far[:-1]) * (tar[1:] + tar[:-1]) / 2))


def equal_error_rate(similarities: np.ndarray, same: np.ndarray) -> tuple[float, float]:
  """(EER, threshold): where the false accept rate equals the false reject rate on the ROC curve.

  Between two ROC points the rates are interpolated linearly; the threshold returned is the first one
  (from the strict end) at which false accepts reach false rejects. The crossing is found in integer
  counts, so equal rates are found equal (1/3 - (1 - 2/3) is not 0 in floating point).
  """
  false_accepts, true_accepts, thresholds, num_positives, num_negatives = _roc_counts(similarities, same)
  false_rejects = num_positives - true_accepts
  # far - frr, times positives * negatives: rises from -P*N at (0, 0) to +P*N at (1, 1).
  gap = false_accepts * num_positives - false_rejects * num_negatives
  far = false_accepts / num_negatives
  i = int(np.argmax(gap >= 0))
  if gap[i] == 0 or i == 0:
    return float(far[i]), float(thresholds[i])
  fraction = -gap[i - 1] / (gap[i] - gap[i - 1])
  return float(far[i - 1] + fraction * (far[i] - far[i - 1])), float(thresholds[i])


def _midpoint_thresholds(values: np.ndarray) -> np.ndarray:
  """Candidate thresholds for sorted unique scores: below all, midway between neighbours, above all."""
  return np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])


def calibrate_threshold(similarities: np.ndarray, same: np.ndarray, method: str = "max_accuracy",
                        target_far: float = 0.001) -> float:
  """A similarity threshold (same iff similarity >= threshold) chosen on calibration pairs.

  "max_accuracy": the threshold of highest accuracy on these pairs, placed midway between two
  neighbouring scores (the smallest such threshold on ties). "far": the smallest threshold whose false
  accept rate is at most `target_far`, midway between the last rejected different pair and the next score.
  """
  if method not in THRESHOLD_METHODS:
    raise UserError(f"threshold method '{method}' is not one of {THRESHOLD_METHODS}.")
  positives, negatives = _split_scores(similarities, same)
  values = np.unique(np.concatenate([positives, negatives]))
  if method == "max_accuracy":
    candidates = _midpoint_thresholds(values)
    correct = (len(positives) - np.searchsorted(np.sort(positives), candidates, side="left")
               + np.searchsorted(np.sort(negatives), candidates, side="left"))
    return float(candidates[int(np.argmax(correct))])
  if not 0.0 <= target_far < 1.0:
    raise UserError(f"target_far={target_far}: expected a false accept rate in [0, 1).")
  allowed = int(np.floor(target_far * len(negatives) + 1e-9))  # different pairs that may be accepted
  highest_rejected = np.sort(negatives)[::-1][allowed]
  above = values[values > highest_rejected]
  return float((highest_rejected + above[0]) / 2 if len(above) else highest_rejected + 1.0)


def rates_at_threshold(similarities: np.ndarray, same: np.ndarray, threshold: float) -> dict:
  """Accuracy, false accept rate and false reject rate when "same" means similarity >= threshold."""
  positives, negatives = _split_scores(similarities, same)
  false_rejects = np.count_nonzero(positives < threshold)
  false_accepts = np.count_nonzero(negatives >= threshold)
  total = len(positives) + len(negatives)
  return {"accuracy": 1.0 - (false_rejects + false_accepts) / total,
          "false_accept_rate": false_accepts / len(negatives),
          "false_reject_rate": false_rejects / len(positives)}


def verification_report(similarities: np.ndarray, same: np.ndarray, threshold: float | None = None) -> dict:
  """ROC-AUC, EER (and its similarity threshold) and, given a threshold, the rates at it."""
  eer, eer_threshold = equal_error_rate(similarities, same)
  report = {"roc_auc": roc_auc(similarities, same), "eer": eer, "eer_similarity_threshold": eer_threshold,
            "pairs": int(len(same)), "same_pairs": int(np.count_nonzero(same))}
  if threshold is not None:
    report.update({f"{name}_at_threshold": value
                   for name, value in rates_at_threshold(similarities, same, threshold).items()})
  return report


def threshold_record(similarity_threshold: float, scoring: str, **details) -> dict:
  """The threshold as saved in `<workdir>/eval/threshold.json`: in distance or probability units."""
  if scoring == "distance":
    record = {"scoring": "distance", "threshold": -similarity_threshold,
              "same_if": "euclidean distance between the embeddings <= threshold"}
  else:
    record = {"scoring": "pair_head", "threshold": similarity_threshold,
              "same_if": "pair head probability >= threshold"}
  return {**record, **details}


def similarity_threshold(record: dict, use: str = "pair") -> float:
  """The similarity threshold of a `threshold_record`: for one pair (`use="pair"`), or for a query against
  a gallery of classes (`use="gallery"`: its `gallery_threshold` where calibrated, else the pair one)."""
  value = float(record.get("gallery_threshold", record["threshold"]) if use == "gallery" else record["threshold"])
  return -value if record["scoring"] == "distance" else value


def similarity_for_people(similarities: np.ndarray | float, scoring: str) -> np.ndarray | float:
  """Distances (for scoring="distance") or probabilities (the pair head), from similarities."""
  return -similarities if scoring == "distance" else similarities


# --------------------------------------------------------------------------------------------------
# Retrieval


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


# --------------------------------------------------------------------------------------------------
# Gallery classification and open set


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
    distances = -similarity_matrix(embeddings[members], embeddings[members])
    medoids[c] = members[int(np.argmin(distances.sum(axis=1)))]
  return embeddings[medoids], medoids


def gallery_class_similarities(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray,
                               gallery_labels: np.ndarray, num_classes: int, method: str = "nearest",
                               pair_score_fn: PairScoreFn | None = None) -> np.ndarray:
  """[Q, C] similarity of each query to each gallery class.

  "nearest": to the class's most similar gallery image; "centroid": to its mean embedding;
  "medoid": to its medoid image.
  """
  if method not in GALLERY_METHODS:
    raise UserError(f"gallery method '{method}' is not one of {GALLERY_METHODS}.")
  gallery_labels = np.asarray(gallery_labels)
  if method == "nearest":
    counts = np.bincount(gallery_labels, minlength=num_classes)
    if (counts == 0).any():
      raise UserError(f"class {int(np.argmin(counts))} has no gallery images; every class needs at least one.")
    order = np.argsort(gallery_labels, kind="stable")
    similarities = similarity_matrix(query_embeddings, np.asarray(gallery_embeddings)[order], pair_score_fn)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.maximum.reduceat(similarities, starts, axis=1)
  representatives, _ = class_representatives(gallery_embeddings, gallery_labels, num_classes, method)
  return similarity_matrix(query_embeddings, representatives, pair_score_fn)


def open_set_report(class_similarities: np.ndarray, query_labels: np.ndarray, threshold: float) -> dict:
  """Open-set recognition at a similarity threshold.

  `query_labels[q]`: the query's gallery class, or -1 for a class the gallery does not know. A query
  is accepted when its best class similarity >= threshold, and then labelled with that class.
  known_accuracy: known queries accepted with the right class; closed_set_accuracy: right class
  ignoring the threshold; known_rejection_rate: known queries rejected; unknown_rejection_rate:
  unknown queries rejected (the goal: 1).
  """
  class_similarities = np.asarray(class_similarities)
  query_labels = np.asarray(query_labels)
  predicted = class_similarities.argmax(axis=1)
  accepted = class_similarities.max(axis=1) >= threshold
  known = query_labels >= 0
  report: dict[str, Any] = {"known_queries": int(known.sum()), "unknown_queries": int((~known).sum())}
  if known.any():
    right = predicted[known] == query_labels[known]
    report.update(known_accuracy=float(np.mean(right & accepted[known])),
                  closed_set_accuracy=float(np.mean(right)),
                  known_rejection_rate=float(np.mean(~accepted[known])))
  if (~known).any():
    report["unknown_rejection_rate"] = float(np.mean(~accepted[~known]))
  return report


def calibrate_open_set_threshold(class_similarities: np.ndarray, query_labels: np.ndarray) -> float:
  """The similarity threshold of highest balanced open-set accuracy on calibration queries.

  Balanced: the mean of `open_set_report`'s known_accuracy and unknown_rejection_rate, so the share of
  unknown queries does not tilt it. Placed midway between two neighbouring best-class similarities
  (the smallest such threshold on ties). A query's best similarity over a gallery of many classes is
  higher than a single pair's, so this threshold, not the pair one, is the one to reject unknowns with.
  """
  class_similarities = np.asarray(class_similarities)
  query_labels = np.asarray(query_labels)
  known = query_labels >= 0
  if not known.any() or known.all():
    raise UserError("open-set calibration needs both known and unknown queries.")
  best = class_similarities.max(axis=1)
  right = known & (class_similarities.argmax(axis=1) == query_labels)
  values = np.unique(best)
  candidates = _midpoint_thresholds(values)
  right_scores, unknown_scores = np.sort(best[right]), np.sort(best[~known])
  known_accuracy = (len(right_scores) - np.searchsorted(right_scores, candidates, side="left")) / known.sum()
  unknown_rejection = np.searchsorted(unknown_scores, candidates, side="left") / len(unknown_scores)
  return float(candidates[int(np.argmax(known_accuracy + unknown_rejection))])


def open_set_split(labels: np.ndarray, *, known_fraction: float = 0.5, gallery_shots: int = 1,
                   seed: int | np.random.SeedSequence = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(gallery records, their class [0..known), query records, their class or -1), deterministic.

  A seeded `known_fraction` of the classes is known: `gallery_shots` random records of each go to the
  gallery and the rest are queries; every record of the other classes is an unknown query.
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max(initial=-1)) + 1
  if not 0 < known_fraction < 1:
    raise UserError(f"known_fraction={known_fraction}: expected a fraction in (0, 1).")
  num_known = int(round(known_fraction * num_classes))
  if num_known < 1 or num_known >= num_classes:
    raise UserError(f"open set needs known and unknown classes; {num_classes} classes with "
                    f"known_fraction={known_fraction} gives {num_known} known.")
  rng = np.random.default_rng(seed)
  known_classes = np.sort(rng.permutation(num_classes)[:num_known])
  class_map = np.full(num_classes, -1)
  class_map[known_classes] = np.arange(num_known)
  per_class = np.bincount(labels, minlength=num_classes)
  if per_class[known_classes].min() <= gallery_shots:
    raise UserError(f"open set with gallery_shots={gallery_shots} needs {gallery_shots + 1} images in every "
                    f"known class; one has {per_class[known_classes].min()}.")
  keys = rng.random(len(labels))
  order = np.lexsort((keys, labels))  # records by class, random inside each class
  rank = np.empty(len(labels), np.int64)
  starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
  rank[order] = np.arange(len(labels)) - starts[labels[order]]
  in_gallery = (class_map[labels] >= 0) & (rank < gallery_shots)
  gallery = np.flatnonzero(in_gallery)
  queries = np.flatnonzero(~in_gallery)
  return gallery, class_map[labels[gallery]], queries, class_map[labels[queries]]


# --------------------------------------------------------------------------------------------------
# A trained workdir, end to end


EVAL_DIRNAME = "eval"
RESULTS_FILENAME = "results.json"
THRESHOLD_FILENAME = "threshold.json"


def write_json(path: pathlib.Path, payload: dict) -> None:
  """Writes `payload` as indented JSON (numpy scalars as numbers), via a temporary file and a rename."""
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
  temporary.replace(path)


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _calibration_split(splits) -> tuple[Any, str]:
  if splits.validation is not None and len(splits.validation):
    return splits.validation, "validation"
  return splits.train, "train"  # no held-out classes: the best that is left (noted in the record)


def calibrate(model, splits, *, scoring: str = "auto", method: str = "max_accuracy",
              target_far: float = 0.001, num_pairs: int = 10000, seed: int | None = None,
              batch_size: int | None = None, progress: bool = False) -> dict:
  """Calibrates the same/different threshold of `model` (an inference.TrainedModel) on validation pairs.

  Returns the threshold record (`threshold_record`) with the calibration rates; `seed` defaults to
  the run's seed. Validation classes are never trained on, like the classes the threshold will meet.
  """
  scoring = resolve_scoring(scoring, model.has_pair_head)
  pair_score_fn = model.pair_score_fn if scoring == "pair_head" else None
  seed = model.config.seed if seed is None else seed
  source, split_name = _calibration_split(splits)
  embeddings = model.embed(source, batch_size=batch_size, progress=progress)
  pairs = sample_pairs(source.labels, num_pairs=num_pairs, seed=seed)
  similarities = score_index_pairs(embeddings, pairs.first, pairs.second, pair_score_fn)
  threshold = calibrate_threshold(similarities, pairs.same, method, target_far)
  rates = rates_at_threshold(similarities, pairs.same, threshold)
  return threshold_record(
      threshold, scoring, method=method, target_far=target_far if method == "far" else None,
      calibrated_on=split_name, pairs=int(len(pairs.same)), seed=seed,
      **{f"calibration_{name}": value for name, value in rates.items()},
      **_open_set_calibration(embeddings, source.labels, scoring, pair_score_fn, seed),
      step=model.step, checkpoint=str(model.checkpoint_dir), config_hash=model.config_hash)


OPEN_SET_CALIBRATION_SPLITS = 8


def calibrate_gallery_threshold(embeddings: np.ndarray, labels: np.ndarray, *, seed: int,
                                splits: int = OPEN_SET_CALIBRATION_SPLITS,
                                pair_score_fn: PairScoreFn | None = None) -> tuple[float, dict, int]:
  """(similarity threshold, its open-set report, known classes per split) for queries against a gallery.

  `evaluate_workdir`'s open-set protocol (`open_set_split`: half the classes known, one gallery image
  each, nearest image) drawn `splits` times from `seed`, every split's queries pooled into one
  `calibrate_open_set_threshold`: one split's threshold hangs on which classes happened to be known
  and which image each got. Pooling 8 cuts its spread over seeds by about a third (T9's 149 validation
  classes: standard deviation 0.014 -> 0.009 in distance over 12 seeds; tests/test_evaluate.py).
  """
  similarities, query_labels = [], []
  for split_seed in np.random.SeedSequence(seed).spawn(splits):
    gallery, gallery_labels, queries, labels_of_queries = open_set_split(labels, seed=split_seed)
    num_known = int(gallery_labels.max()) + 1  # the same in every split: round(known_fraction * classes)
    similarities.append(gallery_class_similarities(embeddings[queries], embeddings[gallery], gallery_labels,
                                                   num_known, "nearest", pair_score_fn))
    query_labels.append(labels_of_queries)
  similarities, query_labels = np.concatenate(similarities), np.concatenate(query_labels)
  threshold = calibrate_open_set_threshold(similarities, query_labels)
  return threshold, open_set_report(similarities, query_labels, threshold), num_known


def _open_set_calibration(embeddings, labels, scoring: str, pair_score_fn, seed: int) -> dict:
  """The gallery threshold's fields of the threshold record (`calibrate_gallery_threshold`)."""
  try:
    threshold, report, num_known = calibrate_gallery_threshold(embeddings, labels, seed=seed,
                                                               pair_score_fn=pair_score_fn)
  except UserError as error:
    return {"gallery_threshold_skipped": str(error)}
  return {"gallery_threshold": similarity_for_people(threshold, scoring),
          "gallery_threshold_classes": num_known, "gallery_calibration_splits": OPEN_SET_CALIBRATION_SPLITS,
          **{f"gallery_calibration_{name}": report[name] for name in ("known_accuracy", "unknown_rejection_rate")}}


def calibrate_workdir(workdir: str | pathlib.Path, *, checkpoint: str = "best", config=None,
                      scoring: str = "auto", method: str = "max_accuracy", target_far: float = 0.001,
                      num_pairs: int = 10000, batch_size: int | None = None, progress: bool = True) -> dict:
  """Calibrates the threshold of a trained workdir and writes `<workdir>/eval/threshold.json`."""
  from siamese_jax import inference
  from siamese_jax.data import pipeline
  model = inference.load_trained_model(workdir, checkpoint=checkpoint, config=config)
  splits = pipeline.load_splits(model.config.data, seed=model.config.seed)
  record = calibrate(model, splits, scoring=scoring, method=method, target_far=target_far,
                     num_pairs=num_pairs, batch_size=batch_size, progress=progress)
  path = pathlib.Path(workdir) / EVAL_DIRNAME / THRESHOLD_FILENAME
  write_json(path, record)
  return {**record, "written": str(path)}


def one_shot_results(embed_fn: Callable, variables, splits, test_embeddings: np.ndarray | None, run_config, *,
                     ways: Sequence[int], shots: Sequence[int], queries: int, num_episodes: int, seed: int,
                     batch_size: int, pair_score_fn: PairScoreFn | None = None, progress: bool = False,
                     lap: Callable[[str], None] = lambda name: None) -> dict:
  """The one-shot part of a report, shared by the training run's final report and `--mode=eval`.

  N-way K-shot episodes on the test classes (`test_embeddings`; none when it is None), Lake's 20 runs
  (when `run_config.eval.lake_runs`; else a "skipped" record saying why) and Vinyals et al.'s test split
  (Omniglot with its split files). `lap(name)` is called after each part, for timings.
  """
  from siamese_jax.data import pipeline
  results: dict[str, Any] = {}
  test = splits.test
  if test_embeddings is not None:
    results["episodes"] = one_shot_report(
        test_embeddings, test.labels, test.class_groups, ways=ways, shots=shots, queries=queries,
        num_episodes=num_episodes, seed=seed, pair_score_fn=pair_score_fn)
    lap("episodes")
  if run_config.eval.lake_runs and splits.lake_runs:
    results["lake_runs"] = lake_runs_accuracy(embed_fn, variables, splits.lake_runs, batch_size=batch_size,
                                              pair_score_fn=pair_score_fn)
  elif run_config.data.get("omniglot_split") == "vinyals":
    results["lake_runs"] = {"skipped": "not scored for the Vinyals split: it trains on characters of the "
                                       "evaluation alphabets that Lake's runs are drawn from"}
  else:
    results["lake_runs"] = {"skipped": "Lake's runs are Omniglot's (all_runs.zip in the data folder) and "
                                       "eval.lake_runs must be true"}
  lap("lake_runs")
  if splits.vinyals_test is not None:
    vinyals = splits.vinyals_test
    vinyals_embeddings = test_embeddings if vinyals is test else embed_images(
        embed_fn, variables, pipeline.all_images(vinyals), batch_size, progress)
    results["vinyals"] = vinyals_report(vinyals_embeddings, vinyals, ways=ways, shots=shots, queries=queries,
                                        num_episodes=num_episodes, seed=seed, pair_score_fn=pair_score_fn)
    lap("vinyals")
  return results


def evaluate_workdir(workdir: str | pathlib.Path, *, checkpoint: str = "best", config=None,
                     ways: Sequence[int] = (5, 20), shots: Sequence[int] = (1, 5),
                     queries_per_class: int | None = None, num_episodes: int = 1000,
                     seed: int | None = None, scoring: str = "auto", threshold_method: str = "max_accuracy",
                     target_far: float = 0.001, num_pairs: int = 10000,
                     retrieval_ks: Sequence[int] = (1, 5, 10), batch_size: int | None = None,
                     progress: bool = True) -> dict:
  """Everything on a trained workdir's test classes; writes `<workdir>/eval/results.json`.

  Restores the checkpoint (`checkpoint`: best | latest | step | path; see inference.load_trained_model),
  rebuilds the run's splits (the same seeded class splits as training), embeds each test image once and
  reports: N-way K-shot episodes within and across groups (mean and 95 % CI), Lake's 20 runs
  (Omniglot), verification on test pairs at a threshold calibrated on validation pairs (also written to
  `<workdir>/eval/threshold.json` for the compare/gallery/openset modes; calibrated with the run's seed
  whatever `seed` is), retrieval, and open set (half the test classes known, one gallery image each).
  `scoring="auto"` uses the Koch head's probability where the model has one, else distances; retrieval
  always uses distances.
  """
  from siamese_jax import inference
  from siamese_jax.data import pipeline
  timings: dict[str, float] = {}
  started = clock = time.perf_counter()

  def lap(name: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    timings[name] = now - clock
    clock = now

  model = inference.load_trained_model(workdir, checkpoint=checkpoint, config=config)
  run_config = model.config
  seed = run_config.seed if seed is None else seed
  queries = run_config.eval.queries_per_class if queries_per_class is None else queries_per_class
  batch_size = batch_size or run_config.eval.batch_size
  scoring = resolve_scoring(scoring, model.has_pair_head)
  pair_score_fn = model.pair_score_fn if scoring == "pair_head" else None
  ways, shots = tuple(int(n) for n in ways), tuple(int(k) for k in shots)
  splits = pipeline.load_splits(run_config.data, seed=run_config.seed)  # the training run's splits
  test = splits.test
  check_episode_settings(test.labels, test.class_groups, ways=ways, shots=shots, queries=queries)
  lap("load")

  results: dict[str, Any] = {
      "step": model.step, "checkpoint": model.describe(), "scoring": scoring,
      "test_split": {"images": len(test), "classes": test.num_classes, "groups": test.num_groups},
      "seed": seed}
  embeddings = model.embed(test, batch_size=batch_size, progress=progress)
  lap("embed_test")
  results.update(one_shot_results(model.embed_fn, model.variables, splits, embeddings, run_config, ways=ways,
                                  shots=shots, queries=queries, num_episodes=num_episodes, seed=seed,
                                  batch_size=batch_size, pair_score_fn=pair_score_fn, progress=progress,
                                  lap=lap))

  # The thresholds are the model's, not this report's: calibrated with the run's seed, so an eval with
  # another --seed scores other test episodes against the same threshold.json.
  record = calibrate(model, splits, scoring=scoring, method=threshold_method, target_far=target_far,
                     num_pairs=num_pairs, batch_size=batch_size, progress=progress)
  threshold = similarity_threshold(record)
  lap("calibrate")
  pairs = sample_pairs(test.labels, num_pairs=num_pairs, seed=seed + 1)
  similarities = score_index_pairs(embeddings, pairs.first, pairs.second, pair_score_fn)
  verification = verification_report(similarities, pairs.same, threshold)
  verification["eer_threshold"] = similarity_for_people(verification.pop("eer_similarity_threshold"), scoring)
  results["verification"] = {"threshold": record, "test": verification}
  lap("verification")
  results["retrieval"] = retrieval_metrics(embeddings, test.labels, ks=retrieval_ks)
  lap("retrieval")
  try:
    gallery, gallery_labels, query_records, query_labels = open_set_split(test.labels, seed=seed)
    similarities = gallery_class_similarities(
        embeddings[query_records], embeddings[gallery], gallery_labels, int(gallery_labels.max()) + 1,
        "nearest", pair_score_fn)
    results["open_set"] = {"protocol": "half the test classes known, 1 gallery image each, nearest image, "
                                       "gallery threshold calibrated the same way on the validation classes",
                           **open_set_report(similarities, query_labels, similarity_threshold(record, "gallery"))}
  except UserError as error:
    results["open_set"] = {"skipped": str(error)}
  lap("open_set")
  timings["total"] = time.perf_counter() - started
  results["seconds"] = timings

  eval_dir = pathlib.Path(workdir) / EVAL_DIRNAME
  write_json(eval_dir / THRESHOLD_FILENAME, record)
  write_json(eval_dir / RESULTS_FILENAME, results)
  results["written"] = str(eval_dir / RESULTS_FILENAME)
  return results
