"""The one-shot part of a report, shared by the training run's final report and `--mode=eval`: test
episodes, Lake's 20 runs and Vinyals et al.'s test split, all scored by one scorer.

Not a pure metric: it takes a run's splits and `embed_fn` and reads their images (`data.pipeline`), so it
sits above metrics/, beside trained.py.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from siamese_jax.data import pipeline
from siamese_jax.metrics import embedding
from siamese_jax.metrics.episodes import one_shot_report, vinyals_report
from siamese_jax.metrics.lake import lake_runs_accuracy
from siamese_jax.metrics.scoring import DISTANCE, Scorer


def one_shot_results(embed_fn: Callable, variables, splits, test_embeddings: np.ndarray | None, run_config, *,
                     ways: Sequence[int], shots: Sequence[int], queries: int, num_episodes: int, seed: int,
                     batch_size: int, scorer: Scorer = DISTANCE, progress: bool = False,
                     lap: Callable[[str], None] = lambda name: None) -> dict:
  """{"episodes", "lake_runs", "vinyals"} for the run's `splits` (`pipeline.Splits`).

  N-way K-shot episodes on the test classes (`test_embeddings`; none when it is None), Lake's 20 runs
  (when `run_config.eval.lake_runs`; else a "skipped" record saying why) and Vinyals et al.'s test split
  (Omniglot with its split files). `lap(name)` is called after each part, for timings.
  """
  results: dict[str, Any] = {}
  test = splits.test
  if test_embeddings is not None:
    results["episodes"] = one_shot_report(
        test_embeddings, test.labels, test.class_groups, ways=ways, shots=shots, queries=queries,
        num_episodes=num_episodes, seed=seed, scorer=scorer)
    lap("episodes")
  if run_config.eval.lake_runs and splits.lake_runs:
    results["lake_runs"] = lake_runs_accuracy(embed_fn, variables, splits.lake_runs, batch_size=batch_size,
                                              scorer=scorer)
  elif run_config.data.get("omniglot_split") == "vinyals":
    results["lake_runs"] = {"skipped": "not scored for the Vinyals split: it trains on characters of the "
                                       "evaluation alphabets that Lake's runs are drawn from"}
  else:
    results["lake_runs"] = {"skipped": "Lake's runs are Omniglot's (all_runs.zip in the data folder) and "
                                       "eval.lake_runs must be true"}
  lap("lake_runs")
  if splits.vinyals_test is not None:
    vinyals = splits.vinyals_test
    vinyals_embeddings = test_embeddings if vinyals is test else embedding.embed_images(
        embed_fn, variables, pipeline.all_images(vinyals), batch_size, progress)
    results["vinyals"] = vinyals_report(vinyals_embeddings, vinyals, ways=ways, shots=shots, queries=queries,
                                        num_episodes=num_episodes, seed=seed, scorer=scorer)
    lap("vinyals")
  return results
