"""The projector mode: embeddings, their labels and a sprite of the images for TensorBoard's projector.

  python launch.py --mode=projector --workdir=runs/omniglot          # -> runs/omniglot/eval/projector/
  tensorboard --logdir runs/omniglot/eval/projector                  # the PROJECTOR tab (PCA, t-SNE, UMAP)

The folder holds what TensorBoard's projector reads from a logdir, without TensorFlow or torch:

  projector_config.pbtxt   names the three files below (paths relative to it)
  tensors.tsv              one embedding per line, D tab-separated floats (%.9g: float32 exactly)
  metadata.tsv             a header line, then each point's class, group (where the data have groups) and file
  sprite.png               the points' thumbnails in a grid, row by row, as the files look (Omniglot's ink
                           dark again), scaled down where needed so the sprite stays within 8192 x 8192 px

At most `max_points` points (a seeded subsample): the projector's browser page slows down beyond a few
thousand, and the sprite must fit its size limit.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from siamese_jax.data import pipeline, sources
from siamese_jax.errors import UserError
from siamese_jax.modes.export import EXPORT_SPLITS
from siamese_jax.trained import load_trained_model, resolve_invert
from siamese_jax.workdir import EVAL_DIRNAME, PROJECTOR_DIRNAME

DEFAULT_MAX_POINTS = 2000
SPRITE_MAX_PX = 8192  # the largest sprite TensorBoard's projector loads, per side
CONFIG_FILENAME = "projector_config.pbtxt"
TENSORS_FILENAME = "tensors.tsv"
METADATA_FILENAME = "metadata.tsv"
SPRITE_FILENAME = "sprite.png"


def sprite_image(thumbnails: np.ndarray, *, max_px: int = SPRITE_MAX_PX) -> tuple[Image.Image, tuple[int, int]]:
  """(the sprite, one thumbnail's (width, height)) for uint8 images [N, H, W, C], C = 1 or 3.

  A square grid of ceil(sqrt(N)) columns, filled row by row; empty cells are white. Thumbnails keep their
  proportions and are scaled down (LANCZOS) when the grid would exceed `max_px` on a side.
  """
  count, height, width, channels = thumbnails.shape
  columns = max(1, math.ceil(math.sqrt(count)))
  scale = min(1.0, max_px / (columns * width), max_px / (columns * height))
  cell = (max(1, int(width * scale)), max(1, int(height * scale)))
  mode = "L" if channels == 1 else "RGB"
  sprite = Image.new(mode, (columns * cell[0], columns * cell[1]), 255 if mode == "L" else (255, 255, 255))
  for i, image in enumerate(thumbnails):
    thumbnail = Image.fromarray(image[..., 0] if channels == 1 else image)
    if thumbnail.size != cell:
      thumbnail = thumbnail.resize(cell, Image.Resampling.LANCZOS)
    sprite.paste(thumbnail, ((i % columns) * cell[0], (i // columns) * cell[1]))
  return sprite, cell


def _tsv_field(value: str) -> str:
  return " ".join(str(value).split()) or "-"  # no tabs or line breaks inside a field; never empty


def write_projector(output: str | os.PathLike, embeddings: np.ndarray, metadata: dict[str, Sequence[str]],
                    thumbnails: np.ndarray, *, tensor_name: str) -> dict:
  """Writes the projector's four files into `output` (see the module docstring); returns what it wrote.

  `metadata`: {column name: one value per point}; `thumbnails`: uint8 [N, H, W, C] as they should look.
  """
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  embeddings = np.asarray(embeddings, np.float32)
  np.savetxt(output / TENSORS_FILENAME, embeddings, fmt="%.9g", delimiter="\t")
  columns = list(metadata)
  rows = ["\t".join(columns)] + ["\t".join(_tsv_field(metadata[c][i]) for c in columns) for i in range(len(embeddings))]
  (output / METADATA_FILENAME).write_text("\n".join(rows) + "\n", encoding="utf-8")
  sprite, cell = sprite_image(thumbnails)
  sprite.save(output / SPRITE_FILENAME)
  (output / CONFIG_FILENAME).write_text(
      "embeddings {\n"
      f"  tensor_name: {json.dumps(tensor_name)}\n"
      f'  tensor_path: "{TENSORS_FILENAME}"\n'
      f'  metadata_path: "{METADATA_FILENAME}"\n'
      "  sprite {\n"
      f'    image_path: "{SPRITE_FILENAME}"\n'
      f"    single_image_dim: {cell[0]}\n"
      f"    single_image_dim: {cell[1]}\n"
      "  }\n"
      "}\n")
  return {"written": str(output), "points": len(embeddings), "dim": int(embeddings.shape[1]),
          "sprite": f"{sprite.size[0]}x{sprite.size[1]} px, thumbnails {cell[0]}x{cell[1]}",
          "view": f"tensorboard --logdir {output}"}


def projector_workdir(workdir: str | os.PathLike, *, split: str = "test", images: str | os.PathLike | None = None,
                      output: str | os.PathLike | None = None, max_points: int = DEFAULT_MAX_POINTS,
                      seed: int | None = None, checkpoint: str = "best", config=None, invert: str | bool = "auto",
                      batch_size: int | None = None, progress: bool = True) -> dict:
  """Writes the projector files for a split of the run's data (or an image folder, `images`).

  At most `max_points` images, drawn with `seed` (default: the run's seed) when there are more. Default
  output: `<workdir>/eval/projector/`.
  """
  if max_points < 1:
    raise UserError(f"max_points={max_points}: expected a positive number of points.")
  model = load_trained_model(workdir, checkpoint=checkpoint, config=config)
  if images is not None:
    folder = pathlib.Path(images).expanduser()
    inverted = resolve_invert(invert, model)
    source = sources.image_folder_source(folder, model.image_shape, in_memory=False, invert=inverted,
                                         resize=model.resize)
    name = folder.name or "folder"
  else:
    if split not in EXPORT_SPLITS:
      raise UserError(f"split='{split}' is not one of {EXPORT_SPLITS}.")
    source = getattr(pipeline.load_splits(model.config.data, seed=model.config.seed), split)
    if source is None:
      raise UserError(f"this run has no {split} split (data.validation / data.validation_fraction hold no "
                      "classes out); use train or test.")
    inverted, name = model.invert, split
  if len(source) == 0:
    raise UserError(f"the {name} images are empty: nothing to project.")
  seed = model.config.seed if seed is None else seed
  records = np.arange(len(source))
  if len(source) > max_points:
    records = np.sort(np.random.default_rng(seed).choice(len(source), max_points, replace=False))
  chosen = pipeline.gather_images(source, records)
  embeddings = model.embed(chosen, batch_size=batch_size, progress=progress)
  labels = np.asarray(source.labels)[records]
  metadata = {"class": [source.class_names[label] for label in labels]}
  if len(source.group_names) > 1:
    metadata["group"] = [source.group_names[source.class_groups[label]] for label in labels]
  metadata["file"] = [source.file_ids[i] for i in records]
  output = pathlib.Path(output) if output else pathlib.Path(workdir) / EVAL_DIRNAME / PROJECTOR_DIRNAME
  written = write_projector(output, embeddings, metadata, 255 - chosen if inverted else chosen,
                            tensor_name=f"{name} embeddings, step {model.step}")
  return {**written, "of": len(source), "classes": len(set(labels.tolist())), "step": model.step}
