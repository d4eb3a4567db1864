"""The one place that chains source -> sampling -> batch -> (worker processes) -> device.

A Grain `MapDataset` over step numbers maps each step to its batch (`BatchBuilder`), so the iterator's
state is a position that Orbax saves with the model, and worker processes (Grain multiprocessing)
build batches ahead while the device trains.
"""

from __future__ import annotations

import collections
import functools
import dataclasses
import os
from typing import Any, Callable, Iterator

import grain
import numpy as np

from siamese_jax.data import omniglot, sampling, sources
from siamese_jax.errors import UserError


@dataclasses.dataclass
class BatchBuilder:
  """Step -> this process's rows of global batch `step`, as the batch contract.

  Picklable (plain numpy and the source), so Grain can run it in worker processes.
  """

  source: Any  # an ImageSource (data/sources.py)
  sampler: sampling.Sampler
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.sampler.batch_size % self.process_count:
      raise UserError(f"sampling.batch_size={self.sampler.batch_size} is not divisible by the number of "
                      f"processes ({self.process_count}).")

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    records, labels = self.sampler(step)
    rows = len(records) // self.process_count
    own = slice(self.process_index * rows, (self.process_index + 1) * rows)
    records, labels = records[own], labels[own]
    return {"images": gather_images(self.source, records), "labels": labels}


def gather_images(source, records: np.ndarray) -> np.ndarray:
  """uint8 images [*records.shape, H, W, C]: one fancy index when decoded in memory, else decoded now."""
  if getattr(source, "images", None) is not None:
    return source.images[records]
  flat = np.stack([source[int(i)] for i in records.reshape(-1)])
  return flat.reshape(records.shape + flat.shape[1:])


def train_dataset(source, sampler: sampling.Sampler, *, num_steps: int, num_workers: int = 0,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training stream: batch `s` for s in [0, num_steps), built in `num_workers` processes."""
  builder = BatchBuilder(source, sampler, process_index, process_count)
  dataset = grain.MapDataset.range(num_steps).map(builder).to_iter_dataset()
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def prefetch_to_device(iterator, put: Callable[[dict], Any], size: int = 2) -> Iterator[tuple[Any, dict]]:
  """Yields (device batch, iterator state after it), keeping `size` batches in flight to the device.

  The Grain iterator runs ahead of training by `size` batches; the state yielded with each batch is the
  one to checkpoint after that batch's step, so a resume continues with exactly the next batch.
  """
  queue = collections.deque()

  def enqueue():
    batch = next(iterator)
    queue.append((put(batch), iterator.get_state()))

  try:
    for _ in range(size):
      enqueue()
  except StopIteration:
    pass
  while queue:
    yield queue.popleft()
    try:
      enqueue()
    except StopIteration:
      pass


SOURCES = ("omniglot", "folder", "tfds", "synthetic")
# data.split: "class" holds out whole classes for validation and test (open-set: one-shot on unseen
# classes); "image" holds out part of every class's images (closed-set: the same classes everywhere).
SPLITS = ("class", "image")


@dataclasses.dataclass
class Splits:
  """Train classes, validation classes (model selection), test classes (the final report)."""

  train: Any
  validation: Any  # None when no classes are held out for validation
  test: Any
  lake_runs: list = dataclasses.field(default_factory=list)  # Omniglot only: Lake's 20 official runs
  vinyals_test: Any = None  # Omniglot only: Vinyals et al.'s 1,692 rotated test classes (None if no split files)


def split_seed(data_config, seed: int) -> int:
  """The seed that draws the held-out classes and validation episodes: `data.split_seed`, or the run's.

  Setting it lets a seed sweep vary initialisation and batches only, judged on the same validation.
  """
  chosen = data_config.get("split_seed", -1)  # absent from configs written before it
  return seed if chosen < 0 else int(chosen)


def image_shape(data_config) -> tuple[int, int, int]:
  """(height, width, channels) from `data.image_size` (a side, or a (height, width) pair) and `data.channels`."""
  size = data_config.image_size
  if isinstance(size, (list, tuple)) and len(size) == 2:
    height, width = size
  else:
    height = width = size
  if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in (height, width)):
    raise UserError(f"data.image_size={size!r}: expected a positive side length (e.g. 64) or a (height, width) "
                    "pair of them (e.g. (96, 64))")
  return sources.check_image_shape((int(height), int(width), data_config.channels),
                                   "(data.image_size, data.channels)")


def _check_data_fields(data_config) -> None:
  """Field combinations that cannot work, refused before anything is read."""
  source = data_config.source
  # `.get`: split, resize and test_path are absent from configs written before they existed.
  split, test_path = data_config.get("split", "class"), data_config.get("test_path", "")
  sources.check_resize(data_config.get("resize", "stretch"), "data.resize")
  if split not in SPLITS:
    raise UserError(f"data.split={split!r}: expected 'class' (held-out classes, open-set) or 'image' (part of "
                    "every class's images held out, closed-set)")
  if split == "image" and source not in ("folder", "synthetic"):
    given = {"omniglot": "its test classes are the evaluation alphabets",
             "tfds": "its test classes come from data.tfds_test_split"}.get(source, "it has no per-image split")
    raise UserError(f"data.split='image' with data.source={source!r}: {given}; per-image splits need "
                    "data.source='folder' (or 'synthetic'), else set data.split='class'")
  if test_path and source != "folder":
    raise UserError(f"data.test_path={test_path!r} with data.source={source!r}: a separate test folder needs "
                    "data.source='folder'; set data.test_path=''")


def load_splits(data_config, seed: int) -> Splits:
  """The splits of `_source_splits`, with `data.train_class_rotations` applied to the train classes.

  Each rotation turns every train class into one more class (`ImageSource.with_rotated_classes`);
  validation and test classes stay as they are. `seed` is the run's seed (`split_seed` may override it).
  """
  seed = split_seed(data_config, seed)
  rotations = tuple(data_config.get("train_class_rotations", ()))  # absent from configs written before it
  if rotations and data_config.source == "omniglot" and data_config.get("omniglot_split") == "vinyals":
    raise UserError(f"data.train_class_rotations={rotations} with data.omniglot_split='vinyals': that "
                    "split's classes are rotated already; set data.train_class_rotations=().")
  splits = _source_splits(data_config, seed)
  try:
    splits.train = splits.train.with_rotated_classes(rotations)
  except UserError as error:
    raise UserError(f"data.train_class_rotations: {error}") from None
  return splits


def _source_splits(data_config, seed: int) -> Splits:
  """Builds the splits named by `data_config.source`; test classes are never trained on.

  omniglot, data.omniglot_split="lake": train/validation from the 30 background alphabets (held-out
  alphabets or drawers), test = the 20 evaluation alphabets, plus Lake's runs when all_runs.zip is
  present. omniglot_split="vinyals": Vinyals et al.'s rotated character splits (train + val, or trainval
  with validation="none"; test), and no Lake's runs: their characters come from alphabets that split
  partly trains on. Both also carry the Vinyals test classes when splits/vinyals/ is present (all 423
  characters are from evaluation alphabets, so unseen by a background-trained model).
  folder / synthetic: classes (data.split="class") or each class's images ("image") are split by a
  seeded draw; with data.test_path, the test split is that folder and only validation is drawn.
  tfds: validation classes are drawn from the train split.
  """
  _check_data_fields(data_config)
  shape = image_shape(data_config)
  common = dict(image_shape=shape, in_memory=data_config.in_memory, cache_dir=data_config.cache_dir or None,
                resize=data_config.get("resize", "stretch"))
  if data_config.source == "omniglot":
    data_dir = omniglot.resolve_data_dir(data_config.data_dir or None)
    load = functools.partial(omniglot.omniglot_source, data_dir=data_dir, download=data_config.download,
                             **common)
    background, evaluation = load("background"), load("evaluation")
    split = data_config.get("omniglot_split", "lake")  # absent from configs written before it existed
    has_vinyals = (data_dir / "splits" / "vinyals").is_dir()
    characters = omniglot.vinyals_characters(background, evaluation) if (
        has_vinyals or split == "vinyals") else None
    vinyals = functools.partial(omniglot.vinyals_source, characters=characters, data_dir=data_dir)
    if split == "vinyals":
      if data_config.validation not in ("alphabets", "none"):
        raise UserError(f"data.validation='{data_config.validation}' with data.omniglot_split='vinyals': "
                        "expected 'alphabets' (the split's own val.txt alphabets) or 'none' (train on "
                        "trainval.txt).")
      held_out = data_config.validation == "alphabets"
      test = vinyals("test")
      return Splits(vinyals("train" if held_out else "trainval"), vinyals("val") if held_out else None,
                    test, [], test)
    if split != "lake":
      raise UserError(f"data.omniglot_split='{split}' is not one of ('lake', 'vinyals').")
    train, validation = omniglot.split_background(
        background, validation=data_config.validation,
        num_validation_alphabets=data_config.num_validation_alphabets,
        validation_drawers=tuple(data_config.validation_drawers), seed=seed)
    lake_zip = data_dir / "all_runs.zip"
    lake_runs = omniglot.load_lake_runs(lake_zip, shape, resize=common["resize"]) if lake_zip.exists() else []
    return Splits(train, validation, evaluation, lake_runs, vinyals("test") if has_vinyals else None)
  if data_config.source == "folder":
    if not data_config.path:
      raise UserError("data.path must name the image folder when data.source='folder'.")
    load = functools.partial(sources.image_folder_source, layout=data_config.layout, **common)
    test_path = data_config.get("test_path", "")
    if test_path and os.path.realpath(test_path) == os.path.realpath(data_config.path):
      raise UserError(f"data.test_path={test_path!r} is data.path: the test folder must hold other images "
                      "(or set data.test_path='' to split data.path)")
    everything = load(data_config.path)
    if test_path:
      return _split_validation(everything, load(test_path), data_config, seed)
    return _split_test_and_validation(everything, data_config, seed, root=data_config.path)
  if data_config.source == "tfds":
    load = functools.partial(sources.tfds_source, data_config.tfds_name, data_dir=data_config.data_dir or None,
                             group_key=data_config.tfds_group_key or None, **common)
    train, validation = _hold_out_validation(load(data_config.tfds_train_split),
                                             data_config.validation_fraction, seed)
    return Splits(train, validation, load(data_config.tfds_test_split))
  if data_config.source == "synthetic":  # learnable fake data: tests, benchmarks, trying a config offline
    everything = sources.synthetic_source(num_classes=data_config.synthetic_classes, per_class=20,
                                          image_shape=shape, num_groups=4, seed=seed)
    return _split_test_and_validation(everything, data_config, seed)
  raise UserError(f"data.source='{data_config.source}' is not one of {SOURCES}.")


def _split_test_and_validation(everything, data_config, seed: int, root: str | None = None) -> Splits:
  """Seeded splits for data with no given split: test classes first, then validation classes; or, with
  data.split="image", test and validation images of every class in one draw (`root` names class folders)."""
  test_fraction, validation_fraction = data_config.test_fraction, data_config.validation_fraction
  # Checked here so the message names the config fields; split_classes only knows "held_out".
  if not 0 < test_fraction < 1 or not 0 <= validation_fraction < 1 or \
      test_fraction + validation_fraction >= 1:
    raise UserError(f"data.test_fraction={test_fraction} and data.validation_fraction="
                    f"{validation_fraction}: expected 0 < test_fraction < 1, 0 <= validation_fraction "
                    "and test_fraction + validation_fraction < 1 (some classes must be left to train on).")
  if data_config.get("split", "class") == "image":
    fractions = (test_fraction, validation_fraction) if validation_fraction > 0 else (test_fraction,)
    context = (f"data.split='image' with data.test_fraction={test_fraction}, "
               f"data.validation_fraction={validation_fraction}")
    train, test, *validation = sources.split_images(everything, fractions, seed=seed, root=root, context=context)
    return Splits(train, validation[0] if validation else None, test)
  rest, test = sources.split_classes(everything, test_fraction, seed=seed)
  validation_share = validation_fraction / (1 - test_fraction)
  return Splits(*_hold_out_validation(rest, validation_share, seed + 1), test)


def _split_validation(everything, test, data_config, seed: int) -> Splits:
  """data.test_path given: `everything` (data.path) gives train and validation, `test` is the test split.

  data.test_fraction plays no part. Validation is validation_fraction of the classes (data.split=
  "class") or of every class's images ("image").
  """
  validation_fraction = data_config.validation_fraction
  if not 0 <= validation_fraction < 1:
    raise UserError(f"data.validation_fraction={validation_fraction}: expected 0 <= validation_fraction < 1 "
                    "(some of data.path must be left to train on)")
  if data_config.get("split", "class") == "class":
    return Splits(*_hold_out_validation(everything, validation_fraction, seed), test)
  if validation_fraction == 0:
    return Splits(everything, None, test)
  context = f"data.split='image' with data.validation_fraction={validation_fraction}"
  train, validation = sources.split_images(everything, (validation_fraction,), seed=seed, root=data_config.path,
                                           context=context)
  return Splits(train, validation, test)


def _hold_out_validation(source, fraction: float, seed: int):
  """(train, validation) classes; fraction 0 means no validation split (validation is None)."""
  if fraction <= 0:
    return source, None
  return sources.split_classes(source, fraction, seed=seed)


def all_images(source) -> np.ndarray:
  """Every record's image, uint8 [N,H,W,C] (evaluation embeds each image once)."""
  if getattr(source, "images", None) is not None:
    return source.images
  return gather_images(source, np.arange(len(source)))
