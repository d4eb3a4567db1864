"""PNG plots of a trained run: embedding map, ROC curve, training curves, example episodes.

  python launch.py --mode=plots --workdir=runs/omniglot          # -> runs/omniglot/eval/plots/*.png

Matplotlib's object API (`Figure`, no pyplot), so nothing depends on a display or global state. The
2-D map is t-SNE from scikit-learn (`sklearn.manifold.TSNE`, PCA initialisation, seeded).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import numpy as np

from siamese_jax.data import pipeline
from siamese_jax.errors import UserError, optional_import
from siamese_jax.metrics.episodes import Episodes, episode_predictions, sample_episodes
from siamese_jax.metrics.retrieval import class_representatives
from siamese_jax.metrics.verification import (equal_error_rate, rates_at_threshold, roc_auc, roc_curve, sample_pairs,
                                              similarity_threshold)
from siamese_jax.trained import load_threshold, load_trained_model
from siamese_jax.workdir import EVAL_DIRNAME, PLOTS_DIRNAME
from siamese_jax.writers import read_metrics



def _figure(width: float, height: float):
  figure = optional_import("matplotlib.figure", "plots", "--mode=plots")
  return figure.Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(figure, path: str | os.PathLike) -> str:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format="png")
  return str(path)


def _thumbnail(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, C] as something imshow draws ([H, W] for grayscale, drawn with a `cmap`)."""
  return image[..., 0] if image.shape[-1] == 1 else image


def grayscale_colormap(ink_is_bright: bool) -> str:
  """Omniglot-style data keep ink = 255: "gray_r" draws it dark on white, as on paper."""
  return "gray_r" if ink_is_bright else "gray"


def tsne_2d(embeddings: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """float32 [N, 2] t-SNE of the embeddings (perplexity capped for small N, as t-SNE requires)."""
  manifold = optional_import("sklearn.manifold", "plots", "--mode=plots' t-SNE")
  embeddings = np.asarray(embeddings, np.float32)
  if len(embeddings) < 3:
    raise UserError(f"t-SNE needs at least 3 points; got {len(embeddings)}.")
  perplexity = min(perplexity, (len(embeddings) - 1) / 3)
  return manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(embeddings).astype(np.float32)


def plot_embedding_map(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path, *,
                       representatives: np.ndarray | None = None, images: np.ndarray | None = None,
                       title: str = "t-SNE of test embeddings", cmap: str = "gray_r") -> str:
  """Scatter of 2-D points coloured by class; each class's representative (medoid) is a black-edged
  star, labelled with the class name and, given `images`, drawn as a thumbnail next to it."""
  colormaps = optional_import("matplotlib", "plots", "--mode=plots").colormaps
  offsetbox = optional_import("matplotlib.offsetbox", "plots", "--mode=plots")
  labels = np.asarray(labels)
  classes = np.unique(labels)
  colours = colormaps["tab20"] if len(classes) <= 20 else colormaps["hsv"]
  figure = _figure(9, 8)
  axes = figure.add_subplot()
  for i, c in enumerate(classes):
    colour = colours(i % 20 if len(classes) <= 20 else i / len(classes))
    members = labels == c
    axes.scatter(points[members, 0], points[members, 1], s=14, color=colour, alpha=0.75, linewidths=0)
    if representatives is not None:
      r = representatives[c]
      axes.scatter(points[r, 0], points[r, 1], s=220, marker="*", color=colour, edgecolors="black",
                   linewidths=1.2, zorder=3)
      if images is not None:
        thumbnail = offsetbox.OffsetImage(_thumbnail(images[r]), zoom=0.9, cmap=cmap)
        axes.add_artist(offsetbox.AnnotationBbox(thumbnail, points[r], xybox=(18, 18), boxcoords="offset points",
                                       frameon=True, pad=0.1, bboxprops={"edgecolor": colour, "linewidth": 2}))
      axes.annotate(class_names[c], points[r], xytext=(-4, -12), textcoords="offset points", fontsize=6,
                    ha="right")
  axes.set_title(f"{title}\n{len(classes)} classes, {len(labels)} images; star = class medoid")
  axes.set_xticks([])
  axes.set_yticks([])
  return _save(figure, path)


def plot_roc(far: np.ndarray, tar: np.ndarray, path, *, auc: float, eer: float,
             operating_point: tuple[float, float] | None = None, title: str = "ROC on test pairs") -> str:
  """ROC curve (true accept rate against false accept rate), the EER point and the calibrated threshold."""
  figure = _figure(6, 5.5)
  axes = figure.add_subplot()
  axes.plot(far, tar, color="tab:blue", linewidth=2, label=f"ROC (AUC {auc:.4f})")
  axes.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
  axes.plot([0, 1], [1, 0], color="gray", linestyle="--", linewidth=0.8)
  if operating_point is not None:
    axes.scatter([operating_point[0]], [operating_point[1]], marker="s", s=70, color="tab:green", zorder=3,
                 label=f"calibrated threshold: FAR {100 * operating_point[0]:.2f} %, "
                       f"TAR {100 * operating_point[1]:.2f} %")
  axes.scatter([eer], [1 - eer], s=120, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4,
               label=f"equal error rate {100 * eer:.2f} %")
  axes.set_xlabel("false accept rate")
  axes.set_ylabel("true accept rate")
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1.01)
  axes.set_title(title)
  axes.legend(loc="lower right", fontsize=8)
  axes.grid(alpha=0.3)
  return _save(figure, path)


def plot_training_curves(metrics: list[dict], path, *, title: str = "training") -> str:
  """Loss, accuracy (train and validation) and learning rate against step, from metrics.jsonl rows."""
  if not metrics:
    raise UserError("no training metrics to plot (metrics.jsonl is empty or missing).")

  def series(name):
    rows = [(m["step"], m[name]) for m in metrics if name in m]
    return np.array(rows, np.float64).reshape(-1, 2)

  figure = _figure(12, 4)
  panels = figure.subplots(1, 3)
  loss = series("train/loss")
  panels[0].plot(loss[:, 0], loss[:, 1], color="tab:blue")
  panels[0].set_title("train loss")
  panels[0].set_yscale("log" if len(loss) and loss[:, 1].min() > 0 else "linear")
  for name, colour, label in (("train/accuracy", "tab:blue", "train (batch)"),
                              ("validation/accuracy", "tab:orange", "validation (one-shot)")):
    values = series(name)
    if len(values):
      panels[1].plot(values[:, 0], values[:, 1], color=colour, marker="o" if len(values) < 30 else None,
                     label=label)
  panels[1].set_title("accuracy")
  panels[1].set_ylim(0, 1)
  panels[1].legend(fontsize=8)
  rate = series("train/learning_rate")
  panels[2].plot(rate[:, 0], rate[:, 1], color="tab:green")
  panels[2].set_title("learning rate")
  for panel in panels:
    panel.set_xlabel("step")
    panel.grid(alpha=0.3)
  figure.suptitle(title)
  return _save(figure, path)


def plot_episodes(images: np.ndarray, episodes: Episodes, predictions: np.ndarray, path, *,
                  rows: Sequence[tuple[int, int, int]] | None = None, class_names: Sequence[str] | None = None,
                  labels: np.ndarray | None = None, title: str = "one-shot episodes", cmap: str = "gray_r") -> str:
  """One row per (episode e, class n, query q) in `rows` (default: every query, up to 12): the query,
  then the episode's N support images (first shot); the predicted one is framed green when right and
  red when wrong, and the right one, when missed, blue.

  `predictions[e, n, q]`: the class (0..N-1) predicted for query q of class n in episode e.
  """
  support, query = np.asarray(episodes.support), np.asarray(episodes.query)
  num_episodes, ways, _ = support.shape
  if rows is None:
    rows = [(e, n, q) for e in range(num_episodes) for n in range(ways) for q in range(query.shape[2])][:12]
  figure = _figure(1.3 * (ways + 1.5), 1.45 * len(rows) + 0.7)
  grid = figure.subplots(len(rows), ways + 1, squeeze=False)
  for row, (e, n, q) in enumerate(rows):
    predicted = int(predictions[e, n, q])
    axes = grid[row, 0]
    axes.imshow(_thumbnail(images[query[e, n, q]]), cmap=cmap)
    group = ""
    if class_names is not None and labels is not None:
      group = "\n" + class_names[labels[query[e, n, q]]].rsplit("/", 1)[0][:18]
    axes.set_ylabel(f"episode {e + 1}{group}", fontsize=7)
    axes.set_title("query", fontsize=8)
    for c in range(ways):
      axes = grid[row, c + 1]
      axes.imshow(_thumbnail(images[support[e, c, 0]]), cmap=cmap)
      colour = None
      if c == predicted:
        colour = "tab:green" if predicted == n else "tab:red"
      elif c == n:
        colour = "tab:blue"
      if colour:
        for spine in axes.spines.values():
          spine.set_edgecolor(colour)
          spine.set_linewidth(4)
      if class_names is not None and labels is not None:
        axes.set_title(class_names[labels[support[e, c, 0]]].rsplit("/", 1)[-1], fontsize=6)
  for axes in grid.ravel():
    axes.set_xticks([])
    axes.set_yticks([])
  right = sum(int(predictions[e, n, q]) == n for e, n, q in rows)
  figure.suptitle(f"{title}: {right} of {len(rows)} shown right\nframe: green = predicted and right, "
                  "red = predicted and wrong, blue = the right class when missed", fontsize=9)
  return _save(figure, path)


def plot_workdir(workdir: str | os.PathLike, *, checkpoint: str = "best", config=None,
                 output: str | os.PathLike | None = None, num_classes: int = 20, ways: int = 5,
                 num_episodes: int = 8, num_pairs: int = 10000, seed: int | None = None,
                 batch_size: int | None = None, progress: bool = True) -> dict:
  """Writes tsne.png, roc.png, training_curves.png and episodes.png for a trained workdir.

  Test classes are used throughout: t-SNE of `num_classes` seeded classes (all their images), the ROC
  of seeded test pairs (with the threshold from `<workdir>/eval/threshold.json` when calibrated), the
  metrics log, and `num_episodes` seeded `ways`-way one-shot episodes with the model's predictions.
  """
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  seed = model.config.seed if seed is None else seed
  output_dir = pathlib.Path(output) if output else pathlib.Path(workdir) / EVAL_DIRNAME / PLOTS_DIRNAME
  test = pipeline.load_splits(model.config.data, seed=model.config.seed).test
  test_images = pipeline.all_images(test)
  embeddings = model.embed(test_images, batch_size=batch_size, progress=progress)
  scorer = model.scorer
  scoring = scorer.name
  written: dict[str, Any] = {"step": model.step}
  cmap = grayscale_colormap(model.invert or model.config.data.source == "synthetic")

  rng = np.random.default_rng(seed)
  chosen = np.sort(rng.permutation(test.num_classes)[:min(num_classes, test.num_classes)])
  records = np.flatnonzero(np.isin(test.labels, chosen))
  local = np.searchsorted(chosen, test.labels[records])
  _, medoids = class_representatives(embeddings[records], local, len(chosen), "medoid")
  points = tsne_2d(embeddings[records], seed=seed)
  written["tsne"] = plot_embedding_map(points, local, [test.class_names[c] for c in chosen],
                                       output_dir / "tsne.png", representatives=medoids,
                                       images=test_images[records],
                                       title=f"t-SNE of test embeddings (step {model.step})", cmap=cmap)

  pairs = sample_pairs(test.labels, num_pairs=num_pairs, seed=seed + 1)
  similarities = scorer.indexed_pair_similarities(embeddings, pairs.first, pairs.second)
  far, tar, _ = roc_curve(similarities, pairs.same)
  eer, _ = equal_error_rate(similarities, pairs.same)
  record = load_threshold(workdir, model)
  point = None
  if record is not None and record.get("scoring") == scoring:
    rates = rates_at_threshold(similarities, pairs.same, similarity_threshold(record))
    point = (rates["false_accept_rate"], 1 - rates["false_reject_rate"])
  written["roc"] = plot_roc(far, tar, output_dir / "roc.png", auc=roc_auc(similarities, pairs.same),
                            eer=eer, operating_point=point,
                            title=f"ROC on {len(pairs.same)} test pairs ({scoring}, step {model.step})")

  metrics = read_metrics(workdir)
  if metrics:
    written["training_curves"] = plot_training_curves(metrics, output_dir / "training_curves.png",
                                                      title=f"training curves: {pathlib.Path(workdir).name}")
  else:
    written["training_curves"] = None

  within = bool(np.bincount(test.class_groups).max() >= ways)
  episodes = sample_episodes(test.labels, test.class_groups, ways=ways, shots=1, queries=1,
                                      num_episodes=num_episodes, seed=seed, within_group=within)
  predictions = episode_predictions(embeddings, episodes, scorer)
  shown = [(e, int(rng.integers(ways)), 0) for e in range(num_episodes)]  # one query of each episode
  written["episodes"] = plot_episodes(
      test_images, episodes, predictions, output_dir / "episodes.png", rows=shown, class_names=test.class_names,
      labels=test.labels, cmap=cmap, title=f"{ways}-way one-shot episodes ({'within' if within else 'across'} groups, "
                                f"{scoring}, step {model.step})")
  return written
