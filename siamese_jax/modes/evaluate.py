"""The eval and calibrate modes on a trained workdir.

`evaluate_workdir` restores the model, rebuilds the run's splits, embeds every test image once and
reports everything (episodes, Lake's runs, verification, retrieval, open set) in
`<workdir>/eval/results.json`; `calibrate_workdir` writes the same/different thresholds alone to
`<workdir>/eval/threshold.json`, where the compare, gallery and openset modes find them.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Sequence

from siamese_jax.data import pipeline
from siamese_jax.errors import UserError
from siamese_jax.metrics.episodes import check_episode_settings
from siamese_jax.one_shot import one_shot_results
from siamese_jax.metrics.open_set import open_set_report, open_set_split
from siamese_jax.metrics.retrieval import gallery_class_similarities, retrieval_metrics
from siamese_jax.metrics.scoring import similarity_for_people
from siamese_jax.metrics.verification import sample_pairs, similarity_threshold, verification_report
from siamese_jax.trained import calibrate, load_trained_model
from siamese_jax.workdir import EVAL_DIRNAME, RESULTS_FILENAME, THRESHOLD_FILENAME, threshold_path, write_json


def calibrate_workdir(workdir: str | pathlib.Path, *, checkpoint: str = "best", config=None,
                      scoring: str = "auto", method: str = "max_accuracy", target_far: float = 0.001,
                      num_pairs: int = 10000, batch_size: int | None = None, progress: bool = True) -> dict:
  """Calibrates the threshold of a trained workdir and writes `<workdir>/eval/threshold.json`."""
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  splits = pipeline.load_splits(model.config.data, seed=model.config.seed)
  record = calibrate(model, splits, scoring=scoring, method=method, target_far=target_far,
                     num_pairs=num_pairs, batch_size=batch_size, progress=progress)
  path = threshold_path(workdir)
  write_json(path, record)
  return {**record, "written": str(path)}


def evaluate_workdir(workdir: str | pathlib.Path, *, checkpoint: str = "best", config=None,
                     ways: Sequence[int] | None = None, shots: Sequence[int] | None = None,
                     queries_per_class: int | None = None, num_episodes: int = 1000,
                     seed: int | None = None, scoring: str = "auto", threshold_method: str = "max_accuracy",
                     target_far: float = 0.001, num_pairs: int = 10000,
                     retrieval_ks: Sequence[int] = (1, 5, 10), batch_size: int | None = None,
                     progress: bool = True) -> dict:
  """Everything on a trained workdir's test classes; writes `<workdir>/eval/results.json`.

  Restores the checkpoint (`checkpoint`: best | latest | step | path; see trained.load_trained_model),
  rebuilds the run's splits (the same seeded class splits as training), embeds each test image once and
  reports: N-way K-shot episodes within and across groups (mean and 95 % CI; `ways` and `shots` default to
  the run's eval.test_ways and eval.test_shots, as its training report), Lake's 20 runs
  (Omniglot), verification on test pairs at a threshold calibrated on validation pairs (also written to
  `<workdir>/eval/threshold.json` for the compare/gallery/openset modes; calibrated with the run's seed
  whatever `seed` is), retrieval, and open set (half the test classes known, one gallery image each).
  `scoring="auto"` uses the model's own scorer (the Koch head's probability where the model has one,
  else distances); retrieval always uses distances.
  """
  timings: dict[str, float] = {}
  started = clock = time.perf_counter()

  def lap(name: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    timings[name] = now - clock
    clock = now

  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  run_config = model.config
  seed = run_config.seed if seed is None else seed
  queries = run_config.eval.queries_per_class if queries_per_class is None else queries_per_class
  batch_size = batch_size or run_config.eval.batch_size
  scorer = model.scorer_for(scoring)
  ways = tuple(int(n) for n in (run_config.eval.test_ways if ways is None else ways))
  shots = tuple(int(k) for k in (run_config.eval.test_shots if shots is None else shots))
  splits = pipeline.load_splits(run_config.data, seed=run_config.seed)  # the training run's splits
  test = splits.test
  check_episode_settings(test.labels, test.class_groups, ways=ways, shots=shots, queries=queries)
  lap("load")

  results: dict[str, Any] = {
      "step": model.step, "checkpoint": model.describe(), "scoring": scorer.name,
      "test_split": {"images": len(test), "classes": test.num_classes, "groups": test.num_groups},
      "seed": seed}
  embeddings = model.embed(test, batch_size=batch_size, progress=progress)
  lap("embed_test")
  results.update(one_shot_results(model.embed_fn, model.variables, splits, embeddings, run_config, ways=ways,
                                  shots=shots, queries=queries, num_episodes=num_episodes, seed=seed,
                                  batch_size=batch_size, scorer=scorer, progress=progress, lap=lap))

  # The thresholds are the model's, not this report's: calibrated with the run's seed, so an eval with
  # another --seed scores other test episodes against the same threshold.json.
  record = calibrate(model, splits, scoring=scoring, method=threshold_method, target_far=target_far,
                     num_pairs=num_pairs, batch_size=batch_size, progress=progress)
  threshold = similarity_threshold(record)
  lap("calibrate")
  pairs = sample_pairs(test.labels, num_pairs=num_pairs, seed=seed + 1)
  similarities = scorer.indexed_pair_similarities(embeddings, pairs.first, pairs.second)
  verification = verification_report(similarities, pairs.same, threshold)
  verification["eer_threshold"] = similarity_for_people(verification.pop("eer_similarity_threshold"), scorer.name)
  results["verification"] = {"threshold": record, "test": verification}
  lap("verification")
  results["retrieval"] = retrieval_metrics(embeddings, test.labels, ks=retrieval_ks)
  lap("retrieval")
  try:
    gallery, gallery_labels, query_records, query_labels = open_set_split(test.labels, seed=seed)
    similarities = gallery_class_similarities(
        embeddings[query_records], embeddings[gallery], gallery_labels, int(gallery_labels.max()) + 1,
        "nearest", scorer)
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
