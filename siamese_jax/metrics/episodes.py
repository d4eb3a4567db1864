"""N-way K-shot episodes on embeddings: drawing them from a seed, scoring them, and the reports built on
them (test episodes within and across groups, Vinyals et al.'s test split, the validation accuracy that
training selects checkpoints by)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from siamese_jax.errors import UserError
from siamese_jax.metrics.scoring import DISTANCE, Scorer


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


def episode_accuracies(embeddings: np.ndarray, episodes: Episodes, scorer: Scorer = DISTANCE) -> np.ndarray:
  """Accuracy of each episode [E]: the share of its queries `episode_predictions` gets right."""
  predicted = episode_predictions(embeddings, episodes, scorer)
  truth = np.arange(predicted.shape[1])[None, :, None]
  return np.mean(predicted == truth, axis=(1, 2))


def episode_predictions(embeddings: np.ndarray, episodes: Episodes, scorer: Scorer = DISTANCE) -> np.ndarray:
  """The class (0..N-1) predicted for each query, [E, N, Q]; the right answer for query [e, n, q] is n.

  The class the scorer finds most alike (`Scorer.episode_similarities`; the first on ties). By distance
  a query is assigned to the nearest class prototype (mean of its shots; with one shot, the nearest
  neighbour); by the Koch head, to the class whose shots it matches with the highest mean probability.
  """
  return np.argmax(scorer.episode_similarities(embeddings, episodes.support, episodes.query), axis=-1)


def mean_and_ci95(values: np.ndarray) -> tuple[float, float]:
  """Mean and the half-width of its normal-approximation 95 % confidence interval."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), float("nan")
  return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def one_shot_report(embeddings: np.ndarray, labels: np.ndarray, class_groups: np.ndarray, *,
                    ways: Sequence[int], shots: Sequence[int], queries: int, num_episodes: int,
                    seed: int, modes: Sequence[str] = ("within", "unstructured"),
                    scorer: Scorer = DISTANCE) -> dict:
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
        mean, ci95 = mean_and_ci95(episode_accuracies(embeddings, episodes, scorer))
        report.setdefault(mode, {})[key] = {"mean": mean, "ci95": ci95, "episodes": num_episodes}
  return report


def vinyals_report(embeddings: np.ndarray, source, *, ways: Sequence[int], shots: Sequence[int], queries: int,
                   num_episodes: int, seed: int, scorer: Scorer = DISTANCE) -> dict:
  """Vinyals et al.'s protocol on its test classes: N-way K-shot episodes drawn across all 1,692 rotated
  classes (unstructured), {"<N>way<K>shot": {"mean", "ci95", "episodes"}}."""
  return one_shot_report(embeddings, source.labels, source.class_groups, ways=ways, shots=shots,
                         queries=queries, num_episodes=num_episodes, seed=seed, modes=("unstructured",),
                         scorer=scorer)["unstructured"]


def validation_accuracy(embeddings: np.ndarray, source, eval_config, seed: int,
                        scorer: Scorer = DISTANCE) -> float:
  """Mean N-way 1-shot accuracy over fixed episodes of the validation classes `source` (their
  `embeddings`): what training selects checkpoints by. N = eval.validation_ways (at most the classes
  available), eval.validation_episodes episodes seeded by `seed`, within one group unless
  eval.validation_within_group is false. Scored by `scorer`, as the test episodes are."""
  within = eval_config.get("validation_within_group", True)  # true where a stored config.json lacks the field
  largest = int(np.bincount(source.class_groups).max()) if within else source.num_classes
  episodes = sample_episodes(source.labels, source.class_groups, ways=min(eval_config.validation_ways, largest),
                             shots=1, queries=eval_config.queries_per_class,
                             num_episodes=eval_config.validation_episodes, seed=seed, within_group=within)
  return float(episode_accuracies(embeddings, episodes, scorer).mean())


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
