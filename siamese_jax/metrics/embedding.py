"""Embedding images through `embed_fn(variables, images uint8 [N, H, W, C]) -> float32 [N, D]`, the one
contract between a model and everything that evaluates it: every image is embedded once, and the
metrics work on the embeddings."""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

from siamese_jax.errors import UserError


def _image_batch(images, start: int, stop: int) -> np.ndarray:
  """Records [start, stop) as uint8 [n, H, W, C]: a slice of an array or in-memory source, else decoded now."""
  if isinstance(images, np.ndarray):
    return images[start:stop]
  cached = getattr(images, "images", None)
  if cached is not None:
    return cached[start:stop]
  return np.stack([np.asarray(images[i]) for i in range(start, min(stop, len(images)))])


def embedding_batches(embed_fn: Callable, variables, images, batch_size: int = 1024,
                      progress: bool = False, description: str = "embed") -> Iterator[np.ndarray]:
  """float32 [n, D] embeddings of consecutive batches of `images`, in order.

  `images`: uint8 [N, H, W, C], or an ImageSource (a lazy one is decoded batch by batch, so memory
  stays bounded by one batch of images). Every call has the same compiled shape (the last batch is
  padded), and the next batch is dispatched before the previous one is copied to the host.
  """
  num = len(images)
  if num == 0:
    raise UserError("no images to embed")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise UserError(f"batch_size={batch_size!r}: expected a positive integer")
  batch_size = min(int(batch_size), num)
  jitted = jax.jit(embed_fn)
  starts = range(0, num, batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=description, unit="batch", leave=False)
  pending = None
  for start in starts:
    chunk = _image_batch(images, start, start + batch_size)
    valid = len(chunk)
    if valid < batch_size:  # pad the last batch so every call has the compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)])
    output = jitted(variables, chunk)
    if pending is not None:
      yield np.asarray(pending[0])[:pending[1]].astype(np.float32)
    pending = (output, valid)
  yield np.asarray(pending[0])[:pending[1]].astype(np.float32)


def embed_images(embed_fn: Callable, variables, images, batch_size: int = 1024,
                 progress: bool = False) -> np.ndarray:
  """float32 [N, D] embeddings of uint8 images [N,H,W,C] (or an ImageSource), in fixed-size batches."""
  return np.concatenate(list(embedding_batches(embed_fn, variables, images, batch_size, progress)))
