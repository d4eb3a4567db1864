"""The one place that chains source -> sampling -> batch -> (worker processes) -> device.

A Grain `MapDataset` over step numbers maps each step to its batch (`BatchBuilder`), so the iterator's
state is a position that Orbax saves with the model, and worker processes (Grain multiprocessing)
build batches ahead while the device trains.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator

import grain
import numpy as np

from siamese_jax.data import sampling
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
