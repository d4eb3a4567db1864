"""Plots: every PNG of the plots mode is written and shows what it should (colours checked in the pixels)."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from siamese_jax.errors import UserError
from siamese_jax.metrics.episodes import Episodes
from siamese_jax.metrics.verification import roc_curve
from siamese_jax.modes import plots
from trained_workdir import copy_of, trained_workdir

# Matplotlib's tab10 colours, as the plots use them for right / wrong / missed frames.
GREEN, RED, BLUE = (44, 160, 44), (214, 39, 40), (31, 119, 180)


def pixels_of(path, colour, tolerance=12) -> int:
  image = np.asarray(Image.open(path).convert("RGB")).astype(int)
  return int(np.sum(np.all(np.abs(image - np.array(colour)) <= tolerance, axis=-1)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  return trained_workdir(tmp_path_factory)


def test_plots_mode_writes_every_png(workdir, tmp_path):
  workdir = copy_of(workdir, tmp_path / "run")
  written = plots.plot_workdir(workdir, num_classes=5, num_episodes=2, num_pairs=200, progress=False)
  assert set(written) == {"step", "tsne", "roc", "training_curves", "episodes"}
  for name in ("tsne", "roc", "training_curves", "episodes"):
    path = pathlib.Path(written[name])
    assert path.parent == workdir / "eval" / "plots" and path.name == f"{name}.png"
    with Image.open(path) as image:
      assert image.format == "PNG" and image.width > 300 and image.height > 200
      assert np.asarray(image.convert("L")).std() > 5  # not a blank page
  assert pixels_of(written["roc"], BLUE) > 200  # the ROC curve is drawn


def test_episode_grid_frames_right_wrong_and_missed(tmp_path):
  # 2 episodes of 3 ways; shown: episode 0's class 1 (predicted 1: right, green) and episode 1's class 2
  # (predicted 0: wrong, red frame on 0 and blue frame on the right class, 2).
  images = np.zeros((12, 8, 8, 1), np.uint8)
  images[:, 2:6, 3] = 255
  episodes = Episodes(support=np.arange(6).reshape(2, 3, 1), query=np.arange(6, 12).reshape(2, 3, 1))
  predictions = np.array([[[0], [1], [2]], [[0], [1], [0]]])
  right = plots.plot_episodes(images, episodes, predictions, tmp_path / "right.png", rows=[(0, 1, 0)])
  assert pixels_of(right, GREEN) > 50 and pixels_of(right, RED) == 0 and pixels_of(right, BLUE) == 0
  wrong = plots.plot_episodes(images, episodes, predictions, tmp_path / "wrong.png", rows=[(1, 2, 0)])
  assert pixels_of(wrong, RED) > 50 and pixels_of(wrong, BLUE) > 50 and pixels_of(wrong, GREEN) == 0


def test_roc_embedding_map_and_curves_from_small_inputs(tmp_path):
  far, tar, _ = roc_curve(np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.1]), np.array([1, 1, 1, 0, 0, 0], bool))
  plots.plot_roc(far, tar, tmp_path / "roc.png", auc=7 / 9, eer=1 / 3, operating_point=(1 / 3, 1.0))
  assert pixels_of(tmp_path / "roc.png", GREEN) > 20  # the calibrated threshold's marker
  points = np.array([[0, 0], [1, 0], [10, 10], [11, 10], [10, 11]], np.float32)
  plots.plot_embedding_map(points, np.array([0, 0, 1, 1, 1]), ["a", "b"], tmp_path / "map.png",
                           representatives=np.array([0, 4]))
  assert (tmp_path / "map.png").stat().st_size > 1000
  metrics = [{"step": 10, "train/loss": 2.0, "train/accuracy": 0.3, "train/learning_rate": 1e-3},
             {"step": 20, "train/loss": 1.0, "train/accuracy": 0.6, "train/learning_rate": 5e-4,
              "validation/accuracy": 0.5}]
  plots.plot_training_curves(metrics, tmp_path / "curves.png")
  assert pixels_of(tmp_path / "curves.png", (255, 127, 14)) > 10  # validation accuracy, tab:orange
  with pytest.raises(UserError, match="no training metrics to plot"):
    plots.plot_training_curves([], tmp_path / "none.png")
  with pytest.raises(UserError, match="t-SNE needs at least 3 points"):
    plots.tsne_2d(np.zeros((2, 4)))
