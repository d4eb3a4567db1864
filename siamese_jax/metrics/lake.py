"""Lake et al.'s 20 official one-shot runs of Omniglot, scored exactly as their demo scores them, and
their modified-Hausdorff baseline through the same scoring."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.spatial import cKDTree  # scipy comes with jax and scikit-learn

from siamese_jax.metrics import embedding
from siamese_jax.metrics.episodes import mean_and_ci95
from siamese_jax.metrics.scoring import DISTANCE, Scorer


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
                       scorer: Scorer = DISTANCE) -> dict:
  """Lake et al.'s 20-way one-shot benchmark: each test item goes to its nearest training image.

  `runs`: items with `training` [20,H,W,C], `test` [20,H,W,C] uint8 and `answers` [20] (the index of
  the right training image of each test item). Returns overall accuracy (0-1) and the 20 per-run ones.
  All runs' images are embedded in one `embed_images` call: one compilation and a few large batches
  instead of 20 small ones. The cost of a match is `scorer.cost_matrix` (the squared distance, or minus
  the pair head's probability).
  """
  runs = list(runs)
  if not runs:
    return {"accuracy": float("nan"), "per_run": []}
  parts = [part for run in runs for part in (run.training, run.test)]
  embeddings = embedding.embed_images(embed_fn, variables, np.concatenate(parts), batch_size=batch_size)
  ends = np.cumsum([len(part) for part in parts])
  pieces = np.split(embeddings, ends[:-1])
  costs = [scorer.cost_matrix(test, training) for training, test in zip(pieces[0::2], pieces[1::2])]
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

  Each direction's nearest-point distances come from a k-d tree: exact, without the full [n, m]
  distance matrix of Omniglot's ~900 ink pixels per image.
  """
  if len(points_a) == 0 or len(points_b) == 0:
    return float("inf")  # a blank image matches nothing
  a_to_b = cKDTree(points_b).query(points_a)[0].mean()
  b_to_a = cKDTree(points_a).query(points_b)[0].mean()
  return float(max(a_to_b, b_to_a))


def lake_runs_mhd_baseline(runs: Sequence) -> dict:
  """Lake's modified-Hausdorff baseline through the same scoring as the models.

  Its published accuracy is in docs/results.md (rendered from results/literature.json).

  Images must be the originals (105 x 105, ink = 255): resizing moves ink pixels and changes the score.
  Each image's k-d tree is built once and queried by all 20 images it is compared with.
  """
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
