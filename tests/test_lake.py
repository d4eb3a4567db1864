"""The Lake-runs harness, proved on Lake's own baseline: the modified Hausdorff distance scores 38.8 % error.

Lake et al.'s demo (omniglot/python/one-shot-classification/demo_classification.py) loads each image of
a run with its ink as True, takes the coordinates of the inked pixels centred on their mean, compares a
test item with every training image by the modified Hausdorff distance of Dubuisson & Jain (1994) —
the larger of the two directed mean nearest-point distances — gives each test item the training image
of least distance, and reports the mean error over the 20 runs: 38.8 %. The same scoring code
(`metrics.lake.lake_runs_from_costs`) scores the models' embeddings.
"""

import pytest

from siamese_jax.metrics import lake
from siamese_jax.data import omniglot


@pytest.fixture(scope="module")
def lake_runs(omniglot_dir):
  # The originals, 105 x 105: the baseline measures ink positions, so nothing may be resized.
  return omniglot.load_lake_runs(omniglot_dir / "all_runs.zip", (105, 105, 1))


def test_modified_hausdorff_baseline_gives_lakes_published_error(lake_runs):
  assert [run.name for run in lake_runs] == [f"run{r:02d}" for r in range(1, 21)]
  result = lake.lake_runs_mhd_baseline(lake_runs)
  assert len(result["per_run"]) == 20
  errors = round(sum((1 - accuracy) * len(run.test) for accuracy, run in zip(result["per_run"], lake_runs)))
  assert errors == 155  # of 400 test items
  assert result["error_percent"] == pytest.approx(38.75)
  assert f"{result['error_percent']:.1f}" == "38.8"  # Lake et al.'s published number
  assert result["accuracy"] == pytest.approx(0.6125)

