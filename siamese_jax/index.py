"""A gallery index: labelled embeddings to search for the k nearest, to classify queries against (with
open-set rejection), to add to and remove from, and to save and load as plain files.

  index = GalleryIndex.from_folder(model, "gallery/")      # one sub-folder per class, embedded once
  found = index.search(model.embed(query_images), k=5)     # ids, labels, distances [Q, 5], nearest first
  decided = index.classify(model.embed(query_images))      # a class or "unknown" at the gallery threshold
  index.save("runs/omniglot/eval/index")
  index = GalleryIndex.load("runs/omniglot/eval/index")    # embeddings memory-mapped, not read in

Exact search streams the gallery through the device in chunks: each chunk of GALLERY_CHUNK rows meets
each chunk of QUERY_CHUNK queries in one jitted product, and a running top-k is merged with
`jax.lax.top_k`. At most two gallery chunks are on the device at a time, so the memory beside the
embeddings is a few tens of MB however large the gallery (benchmarks/README.md measures 1,000,000 x 128).
The distances returned are recomputed exactly (in float64) for the k found, and the k re-sorted by them.

The approximate backend (`backend="usearch"`, the optional `ann` extra) searches an HNSW graph built
from the same embeddings (squared L2), rebuilt whenever it is missing or stale; its recall@10 against
exact search is measured in benchmarks/README.md. Distances are Euclidean in both.

Labels are class names: strings, or integers that index `class_names` (without it, their decimal
strings). Ids are strings, unique in the index: "0".."N-1" unless given (file paths for a folder).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from siamese_jax import trained
from siamese_jax.errors import UserError
from siamese_jax.metrics.retrieval import GALLERY_METHODS, class_representatives
from siamese_jax.metrics.verification import similarity_threshold
from siamese_jax.workdir import write_json

FORMAT = "siamese_jax.gallery_index"
FORMAT_VERSION = 1
INDEX_FILENAME = "index.json"  # written last: a folder without it is not a (complete) index
EMBEDDINGS_FILENAME = "embeddings.npy"  # float32 [N, D]
LABELS_FILENAME = "labels.npy"  # int32 [N], each item's class: an index into classes.npy
CLASSES_FILENAME = "classes.npy"  # unicode [C], the class names
IDS_FILENAME = "ids.npy"  # unicode [N], each item's id
USEARCH_FILENAME = "ann.usearch"  # usearch's own file for the approximate backend, rebuilt if missing

BACKENDS = ("exact", "usearch")
UNKNOWN = "unknown"  # the label of a query rejected at the threshold
USEARCH_EXPANSION = 64  # the approximate search's default beam: usearch's own default expansion_search
QUERY_CHUNK = 512  # queries per device product
GALLERY_CHUNK = 8192  # gallery rows per device product: [512, 8192] float32 blocks of 16 MB
QUERIES_PER_PASS = 32768  # queries whose running top-k stays on the device during one pass over the gallery
ROWS_PER_HOST_STEP = 65536  # rows per step of host-side work (finite checks, usearch adds)
HOST_BLOCK_VALUES = 2**20  # values per block of the exact distances' float64 differences


@dataclasses.dataclass
class SearchResult:
  """The k nearest gallery items of each query, nearest first."""

  ids: np.ndarray  # str [Q, k]; "" where the approximate backend found fewer than k
  labels: np.ndarray  # str [Q, k], the items' classes ("" likewise)
  distances: np.ndarray  # float32 [Q, k], Euclidean (inf likewise)
  indices: np.ndarray  # int64 [Q, k], the items' rows in the index (-1 likewise)
  note: str | None = None  # e.g. k larger than the index, lowered to its size


@dataclasses.dataclass
class Classification:
  """Each query's class by `method`, and whether it is accepted at the threshold."""

  labels: np.ndarray  # str [Q], the predicted class, or UNKNOWN where rejected
  predicted: np.ndarray  # str [Q], the nearest class, accepted or not
  distances: np.ndarray  # float32 [Q], distance to it: its nearest item, centroid or medoid
  accepted: np.ndarray  # bool [Q], distance <= threshold (all True when no threshold applies)
  ids: np.ndarray | None  # str [Q], the nearest item ("nearest") or the class's medoid; None for "centroid"
  threshold: float | None  # the distance threshold applied; None: nothing rejected
  method: str


def gallery_distance_threshold(record: dict | None) -> float | None:
  """The distance up to which a query is accepted against a gallery, from a threshold record (a model's
  `threshold`, `<workdir>/eval/threshold.json`): its calibrated gallery threshold, else its pair threshold.
  None without a record, or for a pair-head record (an index compares embeddings by distance only)."""
  if not record or record.get("scoring") != "distance":
    return None
  return -similarity_threshold(record, "gallery")


class GalleryIndex:
  """Labelled embeddings [N, D], searched by Euclidean distance. Build with `from_embeddings`,
  `from_images` or `from_folder`; `load` a saved one."""

  def __init__(self, embeddings: np.ndarray, label_codes: np.ndarray, class_names: Sequence[str],
               ids: np.ndarray, *, threshold: float | None = None, backend: str = "exact",
               metadata: dict | None = None, model: dict | None = None, next_id: int | None = None):
    """Arrays already checked (the constructors below check them); not copied."""
    self._embeddings = embeddings
    self._codes = label_codes
    self._classes = np.asarray(class_names, dtype=str) if len(class_names) else np.zeros(0, "<U1")
    self._ids = ids
    self.threshold = _checked_threshold(threshold)
    self.backend = _checked_backend(backend)
    self.metadata = dict(metadata or {})
    self.model = dict(model) if model else None  # the model that embedded the items: config_hash, step, ...
    self._next_id = len(ids) if next_id is None else int(next_id)  # the next default id
    self._representatives: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    self._ann = None  # the usearch graph, built on demand
    self._ann_file: pathlib.Path | None = None  # a saved graph to read on demand

  # ------------------------------------------------------------------------------------------------
  # Construction

  @classmethod
  def from_embeddings(cls, embeddings, labels, *, ids: Sequence[str] | None = None,
                      class_names: Sequence[str] | None = None, threshold: float | None = None,
                      metadata: dict | None = None, backend: str = "exact",
                      model: dict | None = None) -> GalleryIndex:
    """An index of embeddings [N, D] with a label per row (class names, or integers indexing
    `class_names`). A float32 array is used as given (not copied): leave it unchanged afterwards.
    `threshold`: the distance up to which `classify` accepts a query (None: it rejects nothing)."""
    embeddings = _checked_embeddings(embeddings, None, "embeddings")
    codes, classes = _encode_labels(labels, class_names, [], len(embeddings))
    ids = _default_ids(0, len(embeddings)) if ids is None else _checked_ids(ids, len(embeddings), None)
    return cls(embeddings, codes, classes, ids, threshold=threshold, backend=backend, metadata=metadata,
               model=model)

  @classmethod
  def from_images(cls, model, images, labels, *, ids: Sequence[str] | None = None,
                  class_names: Sequence[str] | None = None, threshold: float | None = None,
                  metadata: dict | None = None, backend: str = "exact", invert: str | bool = "auto",
                  batch_size: int | None = None) -> GalleryIndex:
    """An index of images (anything `model.embed` takes) embedded by `model`. `threshold` defaults to the
    model's calibrated gallery threshold (`gallery_distance_threshold(model.threshold)`)."""
    embeddings = model.embed(images, invert=invert, batch_size=batch_size)
    return cls.from_embeddings(embeddings, labels, ids=ids, class_names=class_names,
                               threshold=_model_threshold(model, threshold), metadata=metadata, backend=backend,
                               model=model_record(model))

  @classmethod
  def from_folder(cls, model, folder: str | os.PathLike, *, threshold: float | None = None,
                  metadata: dict | None = None, backend: str = "exact", invert: str | bool = "auto",
                  batch_size: int | None = None) -> GalleryIndex:
    """An index of a folder with one sub-folder of images per class (or group/class), read as the model's
    training data were (`invert="auto"`) and embedded once; ids are the files' paths inside the folder."""
    source = trained.load_gallery(folder, model.image_shape, invert=trained.resolve_invert(invert, model),
                                  resize=model.resize)
    embeddings = model.embed(source, batch_size=batch_size)
    return cls.from_embeddings(embeddings, np.asarray(source.labels), ids=list(source.file_ids),
                               class_names=list(source.class_names), threshold=_model_threshold(model, threshold),
                               metadata=metadata, backend=backend, model=model_record(model))

  # ------------------------------------------------------------------------------------------------
  # What it holds

  def __len__(self) -> int:
    return len(self._ids)

  def __repr__(self) -> str:
    return (f"GalleryIndex({len(self)} items, {len(self._classes)} classes, dim {self.dim}, "
            f"backend {self.backend!r}, threshold {self.threshold})")

  @property
  def dim(self) -> int:
    return int(self._embeddings.shape[1])

  @property
  def embeddings(self) -> np.ndarray:
    """float32 [N, D] (memory-mapped after `load`)."""
    return self._embeddings

  @property
  def ids(self) -> np.ndarray:
    return self._ids

  @property
  def labels(self) -> np.ndarray:
    """str [N], each item's class."""
    return self._classes[self._codes]

  @property
  def class_names(self) -> list[str]:
    return self._classes.tolist()

  def check_model(self, model) -> None:
    """Refuses a model other than the one that embedded the items (another config or checkpoint): its
    embeddings would not be comparable with the index's."""
    if self.model is None:
      return
    theirs = model_record(model)
    if (theirs["config_hash"], theirs["step"]) != (self.model.get("config_hash"), self.model.get("step")):
      raise UserError(f"the index was built with the model of config {self.model.get('config_hash')} at step "
                      f"{self.model.get('step')}; this one is config {theirs['config_hash']} at step "
                      f"{theirs['step']}: rebuild the index with this model (--mode=index), or load the "
                      "same checkpoint (--checkpoint).")

  # ------------------------------------------------------------------------------------------------
  # Changes

  def add(self, embeddings, labels, ids: Sequence[str] | None = None) -> None:
    """Appends items; their ids (default: numbers after the last default id) must be new."""
    embeddings = _checked_embeddings(embeddings, self.dim, "add: embeddings")
    codes, classes = _encode_labels(labels, None, self.class_names, len(embeddings))
    if ids is None:
      ids = _default_ids(self._next_id, len(embeddings))
      self._next_id += len(embeddings)
    ids = _checked_ids(ids, len(embeddings), self._ids)
    start = len(self)
    self._embeddings = np.concatenate([self._embeddings, embeddings])
    self._codes = np.concatenate([self._codes, codes])
    self._classes = np.asarray(classes, dtype=str)
    self._ids = np.concatenate([self._ids, ids])
    self._representatives.clear()
    if self._ann is not None:  # the graph grows in place; a saved one not yet read is stale
      _usearch_add(self._ann, embeddings, start)
    self._ann_file = None

  def remove(self, ids: Sequence[str]) -> None:
    """Removes the items with these ids (each must be in the index); classes left empty go too."""
    wanted = np.unique(np.asarray(list(ids) if not isinstance(ids, str) else [ids], dtype=str))
    found = np.isin(self._ids, wanted)
    if found.sum() != len(wanted):
      missing = np.setdiff1d(wanted, self._ids[found])
      raise UserError(f"remove: id {str(missing[0])!r} is not in the index ({len(missing)} of the {len(wanted)} ids "
                      f"given are not; the index has {len(self)} items).")
    keep = ~found
    codes = self._codes[keep]
    used, codes = np.unique(codes, return_inverse=True)
    self._embeddings = np.ascontiguousarray(self._embeddings[keep])
    self._codes = codes.astype(np.int32)
    self._classes = self._classes[used]
    self._ids = self._ids[keep]
    self._representatives.clear()
    self._ann, self._ann_file = None, None  # rows moved: the graph is rebuilt on the next approximate search

  # ------------------------------------------------------------------------------------------------
  # Search and classification

  def search(self, queries, k: int = 10, *, backend: str | None = None,
             expansion: int = USEARCH_EXPANSION) -> SearchResult:
    """The k nearest items of each query embedding [Q, D] (or one [D]), by Euclidean distance.

    `backend`: "exact" or "usearch" (approximate); default the index's. `expansion`: the approximate
    search's beam (usearch's expansion_search): larger is slower and finds more of the true k nearest
    (benchmarks/README.md measures both). A k above the index's size is lowered to it, with a note.
    """
    backend = _checked_backend(backend or self.backend)
    queries = self._checked_queries(queries)
    k = _checked_k(k)
    note = None
    if k > len(self):
      note = f"k={k} is more than the index's {len(self)} items: returning all {len(self)}"
      k = len(self)
    if backend == "exact":
      indices = exact_search(self._embeddings, queries, k)
    else:
      indices = self._usearch_search(queries, k, _checked_k(expansion, "expansion"))
    indices, distances = exact_distances(self._embeddings, queries, indices)
    found = indices >= 0
    rows = np.where(found, indices, 0)
    ids = np.where(found, self._ids[rows], "")
    labels = np.where(found, self._classes[self._codes[rows]], "")
    return SearchResult(ids=ids, labels=labels, distances=distances, indices=indices, note=note)

  def classify(self, queries, *, method: str = "nearest", reject: bool = True,
               threshold: float | None = None, backend: str | None = None) -> Classification:
    """Each query's class: that of its nearest item, nearest class centroid or nearest class medoid
    (`metrics.retrieval.class_representatives`). With `reject`, a query farther than the threshold
    (`threshold`, else the index's) from it is UNKNOWN: open-set recognition. Without any threshold
    nothing is rejected (`Classification.threshold` is None)."""
    if method not in GALLERY_METHODS:
      raise UserError(f"classify: method={method!r} is not one of {GALLERY_METHODS}.")
    queries = self._checked_queries(queries)
    if method == "nearest":
      found = self.search(queries, 1, backend=backend)
      predicted, distances, ids = found.labels[:, 0], found.distances[:, 0], found.ids[:, 0]
    else:
      representatives, medoid_rows = self.representatives(method)
      indices, distances = exact_distances(representatives, queries, exact_search(representatives, queries, 1))
      classes = indices[:, 0]
      predicted, distances = self._classes[classes], distances[:, 0]
      ids = None if medoid_rows is None else self._ids[medoid_rows[classes]]
    threshold = _checked_threshold(threshold if threshold is not None else self.threshold) if reject else None
    accepted = np.ones(len(queries), bool) if threshold is None else distances <= threshold
    labels = np.where(accepted, predicted, UNKNOWN)
    return Classification(labels=labels, predicted=predicted, distances=distances, accepted=accepted, ids=ids,
                          threshold=threshold, method=method)

  def representatives(self, method: str) -> tuple[np.ndarray, np.ndarray | None]:
    """([C, D] each class's centroid or medoid, [C] the medoid rows or None), computed once per change."""
    if method not in self._representatives:
      self._require_items()
      self._representatives[method] = class_representatives(self._embeddings, self._codes, len(self._classes),
                                                            method)
    return self._representatives[method]

  def build_ann(self) -> None:
    """Builds (or reads) the approximate backend's graph now rather than at the first search."""
    self._require_items()
    if self._ann is None:
      self._ann = _read_usearch(self._ann_file, len(self), self.dim) if self._ann_file else None
    if self._ann is None:
      self._ann = _usearch_index(self.dim)
      _usearch_add(self._ann, self._embeddings, 0)

  def _usearch_search(self, queries: np.ndarray, k: int, expansion: int) -> np.ndarray:
    self.build_ann()
    if len(queries) == 0:
      return np.zeros((0, k), np.int64)
    self._ann.expansion_search = expansion
    matches = self._ann.search(queries, k)
    if not hasattr(matches, "counts"):  # one query: usearch answers with the matches found, fewer than k maybe
      found = np.asarray(matches.keys, np.int64)[:k]
      return np.concatenate([found, np.full(k - len(found), -1, np.int64)])[None]
    keys = np.asarray(matches.keys, np.int64).reshape(len(queries), k)
    counts = np.asarray(matches.counts).reshape(len(queries))
    return np.where(np.arange(k)[None, :] < counts[:, None], keys, -1)

  def _checked_queries(self, queries) -> np.ndarray:
    self._require_items()
    queries = np.asarray(queries)
    if queries.ndim == 1:
      queries = queries[None]
    return _checked_embeddings(queries, self.dim, "queries")

  def _require_items(self) -> None:
    if len(self) == 0:
      raise UserError("the index is empty: add items first.")

  # ------------------------------------------------------------------------------------------------
  # Files

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the index into the folder `path` as plain files (.npy arrays and index.json; no pickles),
    each through a temporary file and a rename, index.json last. With the approximate backend, its
    graph too (`build_ann` first to save one that was never searched)."""
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
      raise UserError(f"index {path}: a file is in the way; an index is saved as a folder.")
    if path.is_dir() and any(path.iterdir()) and not (path / INDEX_FILENAME).is_file():
      raise UserError(f"index {path}: a folder with other files in it and no {INDEX_FILENAME}; save the index to "
                      "a new or empty folder.")
    path.mkdir(parents=True, exist_ok=True)
    for name, array in ((EMBEDDINGS_FILENAME, self._embeddings), (LABELS_FILENAME, self._codes),
                        (CLASSES_FILENAME, self._classes), (IDS_FILENAME, self._ids)):
      temporary = path / f"{name}.tmp"
      with temporary.open("wb") as file:
        np.save(file, np.asarray(array), allow_pickle=False)
      temporary.replace(path / name)
    ann_path = path / USEARCH_FILENAME
    if self._ann is not None:
      temporary = path / f"{USEARCH_FILENAME}.tmp"
      self._ann.save(str(temporary))
      temporary.replace(ann_path)
    elif self._ann_file is not None:  # loaded, never read, still current: kept (copied when saved elsewhere)
      if self._ann_file.resolve() != ann_path.resolve():
        ann_path.write_bytes(self._ann_file.read_bytes())
    elif ann_path.exists():
      ann_path.unlink()  # the graph of an older state of the index
    saved_ann = self._ann is not None or self._ann_file is not None
    write_json(path / INDEX_FILENAME, {
        "format": FORMAT, "version": FORMAT_VERSION, "size": len(self), "dim": self.dim, "metric": "euclidean",
        "dtype": "float32", "classes": len(self._classes), "threshold": self.threshold, "backend": self.backend,
        "next_id": self._next_id, "usearch": {"file": USEARCH_FILENAME, "size": len(self)} if saved_ann else None,
        "model": self.model, "metadata": self.metadata})
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> GalleryIndex:
    """An index `save` wrote. Its arrays are memory-mapped (read as they are used, not into memory);
    a damaged, foreign or inconsistent folder raises UserError."""
    path = pathlib.Path(path).expanduser()
    record_path = path / INDEX_FILENAME
    if not record_path.is_file():
      raise UserError(f"index {path}: not a gallery index (no {INDEX_FILENAME}); build one with --mode=index or "
                      "GalleryIndex.save.")
    try:
      record = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
      raise UserError(f"{record_path}: not readable JSON ({type(error).__name__}: {error}).") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
      raise UserError(f"{record_path}: not a siamese_jax gallery index (format {FORMAT!r} expected).")
    if record.get("version") != FORMAT_VERSION:
      raise UserError(f"{record_path}: index format version {record.get('version')}; this siamese_jax reads "
                      f"version {FORMAT_VERSION}. Rebuild the index.")
    try:
      size, dim = int(record["size"]), int(record["dim"])
      threshold, backend = record["threshold"], record["backend"]
    except (KeyError, TypeError, ValueError) as error:
      raise UserError(f"{record_path}: a damaged index record ({type(error).__name__}: {error}).") from error
    embeddings = _load_array(path / EMBEDDINGS_FILENAME, "f", (size, dim))
    codes = _load_array(path / LABELS_FILENAME, "i", (size,))
    classes = _load_array(path / CLASSES_FILENAME, "U", None, mmap=False)
    ids = _load_array(path / IDS_FILENAME, "U", (size,))
    if embeddings.dtype != np.float32 or codes.dtype != np.int32:
      raise UserError(f"index {path}: arrays of {embeddings.dtype} and {codes.dtype}; expected float32 embeddings "
                      "and int32 labels.")
    if size and (codes.min() < 0 or codes.max() >= len(classes)):
      raise UserError(f"{path / LABELS_FILENAME}: labels outside the {len(classes)} classes of "
                      f"{path / CLASSES_FILENAME}.")
    try:
      index = cls(embeddings, codes, classes.tolist(), ids, threshold=threshold, backend=backend,
                  metadata=record.get("metadata"), model=record.get("model"), next_id=record.get("next_id"))
    except (TypeError, ValueError, UserError) as error:
      raise UserError(f"{record_path}: a damaged index record ({type(error).__name__}: {error}).") from error
    ann = record.get("usearch")
    if isinstance(ann, dict) and ann.get("size") == size and (path / USEARCH_FILENAME).is_file():
      index._ann_file = path / USEARCH_FILENAME
    return index


# --------------------------------------------------------------------------------------------------
# Exact top-k on the device


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int, *, query_chunk: int = QUERY_CHUNK,
                 gallery_chunk: int = GALLERY_CHUNK) -> np.ndarray:
  """int64 [Q, k]: the rows of the k gallery vectors nearest to each query (Euclidean), nearest first
  (ties: the lower row first). k <= len(gallery).

  For each pass of up to QUERIES_PER_PASS queries, the gallery goes through the device chunk by chunk
  (the last padded): one product of a [query_chunk, D+1] block with a [gallery_chunk, D+1] block ranks
  the chunk (`_gallery_block`), and `jax.lax.top_k` merges its best k into the running k. Chunk sizes
  are powers of two, so a few compiled shapes serve every size.
  """
  num, _ = gallery.shape
  if not 1 <= k <= num:
    raise ValueError(f"k={k} must be in 1..{num}")
  query_chunk = min(query_chunk, _power_of_two_at_least(max(len(queries), 8)))
  gallery_chunk = max(min(gallery_chunk, _power_of_two_at_least(max(num, 8))), _power_of_two_at_least(k))
  results = []
  for pass_start in range(0, len(queries), QUERIES_PER_PASS):
    chunk_queries = queries[pass_start:pass_start + QUERIES_PER_PASS]
    blocks = [_query_block(jnp.asarray(_padded(chunk_queries[s:s + query_chunk], query_chunk)))
              for s in range(0, len(chunk_queries), query_chunk)]
    state = [(jnp.full((query_chunk, k), -jnp.inf, jnp.float32), jnp.zeros((query_chunk, k), jnp.int32))
             for _ in blocks]
    for start in range(0, num, gallery_chunk):
      rows = np.asarray(gallery[start:start + gallery_chunk], np.float32)
      block = _gallery_block(jnp.asarray(_padded(rows, gallery_chunk)), len(rows))
      previous = state
      state = [_merge_block(scores, indices, queries_block, block, np.int32(start), k=k)
               for (scores, indices), queries_block in zip(state, blocks)]
      jax.block_until_ready(previous)  # one chunk ahead of the device at most: memory stays bounded
    found = np.concatenate([np.asarray(indices) for _, indices in state])[:len(chunk_queries)]
    results.append(found.astype(np.int64))
  return np.concatenate(results) if results else np.zeros((0, k), np.int64)


@jax.jit
def _query_block(queries):
  """[q, D+1]: each query and a 1."""
  return jnp.concatenate([queries, jnp.ones((queries.shape[0], 1), queries.dtype)], axis=1)


@jax.jit
def _gallery_block(rows, valid):
  """[G, D+1]: each row and minus half its squared norm (-inf for the padding past `valid`), so that one
  product with a query block scores q.g - |g|^2 / 2 = (|q|^2 - |q - g|^2) / 2: highest for the nearest."""
  half_norms = -0.5 * jnp.sum(rows * rows, axis=1)
  half_norms = jnp.where(jnp.arange(rows.shape[0]) < valid, half_norms, -jnp.inf)
  return jnp.concatenate([rows, half_norms[:, None]], axis=1)


@functools.partial(jax.jit, static_argnames="k")
def _merge_block(best_scores, best_indices, queries, gallery, offset, *, k):
  """The running top-k of a query block merged with the best k of one gallery block."""
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)  # full fp32 (no TF32)
  block_scores, block_indices = jax.lax.top_k(scores, k)
  scores = jnp.concatenate([best_scores, block_scores], axis=1)
  indices = jnp.concatenate([best_indices, block_indices + offset], axis=1)
  best_scores, positions = jax.lax.top_k(scores, k)  # ties: the earlier position, i.e. the lower row
  return best_scores, jnp.take_along_axis(indices, positions, axis=1)


def exact_distances(gallery: np.ndarray, queries: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(indices, float32 distances) [Q, k]: each query's Euclidean distance to the rows found, computed
  in float64 from the differences (exact where the norm expansion of the search is not), and each row
  re-sorted by it (stable: ties keep their order); a -1 (nothing found) gets inf and goes last."""
  distances = np.full(indices.shape, np.inf, np.float32)
  step = max(1, HOST_BLOCK_VALUES // max(indices.shape[1] * gallery.shape[1], 1))  # float64 blocks of 8 MB
  for start in range(0, len(indices), step):
    rows = indices[start:start + step]
    found = rows >= 0
    vectors = np.asarray(gallery[np.where(found, rows, 0).ravel()], np.float64).reshape(*rows.shape, -1)
    differences = vectors - np.asarray(queries[start:start + step], np.float64)[:, None, :]
    distances[start:start + step] = np.where(found, np.sqrt(np.sum(differences**2, axis=2)), np.inf)
  order = np.argsort(distances, axis=1, kind="stable")
  return np.take_along_axis(indices, order, axis=1), np.take_along_axis(distances, order, axis=1)


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
  if len(rows) == size:
    return rows
  return np.concatenate([rows, np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)])


def _power_of_two_at_least(value: int) -> int:
  return 1 << max(0, int(value) - 1).bit_length()


# --------------------------------------------------------------------------------------------------
# The approximate backend (usearch, optional)


def _usearch_index(dim: int):
  try:
    from usearch.index import Index
  except ImportError as error:
    raise UserError("backend='usearch' needs the usearch package: pip install 'siamese-jax[ann]'.") from error
  return Index(ndim=dim, metric="l2sq", dtype="f32")  # usearch's defaults: connectivity 16, expansion_add 128


def _usearch_add(ann, embeddings: np.ndarray, first_row: int) -> None:
  for start in range(0, len(embeddings), ROWS_PER_HOST_STEP):
    rows = np.ascontiguousarray(embeddings[start:start + ROWS_PER_HOST_STEP], np.float32)
    ann.add(np.arange(first_row + start, first_row + start + len(rows), dtype=np.uint64), rows)


def _read_usearch(path: pathlib.Path, size: int, dim: int):
  """The saved graph, or None (rebuilt) when it is unreadable or of another size."""
  ann = _usearch_index(dim)
  try:
    ann.load(str(path))
  except Exception as error:  # noqa: BLE001 -- usearch raises plain RuntimeErrors; the graph is rebuilt
    logging.warning("%s: unreadable (%s); rebuilding the approximate index from the embeddings", path, error)
    return None
  if len(ann) != size or ann.ndim != dim:
    logging.warning("%s: a graph of %d items of dimension %d, not %d x %d; rebuilding it", path, len(ann), ann.ndim,
                    size, dim)
    return None
  return ann


# --------------------------------------------------------------------------------------------------
# Checks


def model_record(model) -> dict:
  """What an index keeps of the model that embedded its items, to refuse another one later."""
  return {"config_hash": model.config_hash, "step": int(model.step), "image_shape": list(model.image_shape),
          "invert": bool(model.invert), "resize": str(model.resize)}


def _model_threshold(model, threshold: float | None) -> float | None:
  if threshold is not None:
    return threshold
  record = getattr(model, "threshold", None)
  distance = gallery_distance_threshold(record)
  if record and distance is None:
    logging.warning("the model's threshold is a pair-head probability; an index compares embeddings by distance "
                    "and rejects nothing: calibrate with --scoring=distance, or pass threshold=")
  return distance


def _checked_embeddings(array, dim: int | None, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 2 or (dim is not None and array.shape[1] != dim) or array.shape[1] == 0:
    expected = f"[N, {dim}]" if dim is not None else "[N, D]"
    raise UserError(f"{name}: shape {array.shape}; expected {expected} embeddings.")
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise UserError(f"{name}: dtype {array.dtype}; expected float embeddings.")
  array = np.ascontiguousarray(array, np.float32)
  for start in range(0, len(array), ROWS_PER_HOST_STEP):
    if not np.isfinite(array[start:start + ROWS_PER_HOST_STEP]).all():
      raise UserError(f"{name}: values that are not finite (NaN or inf).")
  return array


def _encode_labels(labels, class_names: Sequence[str] | None, known: list[str],
                   num: int) -> tuple[np.ndarray, list[str]]:
  """(int32 [N] codes into the class list, the class list: `known` plus the new classes)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != num:
    raise UserError(f"labels: shape {labels.shape}; expected one label per embedding ({num}).")
  if labels.dtype.kind in "iu":
    unique, inverse = np.unique(labels, return_inverse=True)
    if class_names is not None:
      if len(unique) and (unique[0] < 0 or unique[-1] >= len(class_names)):
        raise UserError(f"labels: integers in [{unique[0]}, {unique[-1]}] index class_names of "
                        f"{len(class_names)} names.")
      names = [str(class_names[u]) for u in unique]
    else:
      names = [str(u) for u in unique]
  elif labels.dtype.kind in "US":
    if class_names is not None:
      raise UserError("class_names: given with labels that are names already; leave it out, or pass integer labels.")
    unique, inverse = np.unique(labels.astype(str), return_inverse=True)
    names = unique.tolist()
  else:
    raise UserError(f"labels: dtype {labels.dtype}; expected class names (str) or integers.")
  classes = list(known)
  position = {name: i for i, name in enumerate(classes)}
  for name in names:
    if name not in position:
      position[name] = len(classes)
      classes.append(name)
  codes = np.asarray([position[name] for name in names], np.int32)[inverse.reshape(-1)]
  return codes.astype(np.int32), classes


def _default_ids(first: int, count: int) -> np.ndarray:
  return np.arange(first, first + count).astype(f"<U{len(str(max(first + count - 1, 0)))}")


def _checked_ids(ids, num: int, existing: np.ndarray | None) -> np.ndarray:
  ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
  if ids.ndim != 1 or len(ids) != num:
    raise UserError(f"ids: {len(ids) if ids.ndim == 1 else ids.shape} given; expected one per embedding ({num}).")
  if ids.dtype.kind not in "USiu":
    raise UserError(f"ids: dtype {ids.dtype}; expected strings.")
  ids = ids.astype(str)
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise UserError(f"ids: {str(unique[np.argmax(counts > 1)])!r} is given {counts.max()} times; ids must be unique.")
  if existing is not None and len(existing):
    taken = np.isin(ids, existing)
    if taken.any():
      raise UserError(f"add: id {str(ids[np.argmax(taken)])!r} is already in the index; ids must be unique "
                      "(remove it first to replace it).")
  return ids


def _checked_k(k, name: str = "k") -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"{name}={k!r}: expected a positive integer.")
  return int(k)


def _checked_threshold(threshold) -> float | None:
  if threshold is None:
    return None
  try:
    value = float(threshold)
  except (TypeError, ValueError) as error:
    raise UserError(f"threshold={threshold!r}: expected a distance (a number >= 0).") from error
  if not np.isfinite(value) or value < 0:
    raise UserError(f"threshold={threshold!r}: expected a distance (a number >= 0).")
  return value


def _checked_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise UserError(f"backend={backend!r} is not one of {BACKENDS}.")
  return backend


ARRAY_KINDS = {"f": "floats", "i": "integers", "U": "strings"}


def _load_array(path: pathlib.Path, kind: str, shape: tuple | None, *, mmap: bool = True) -> np.ndarray:
  try:
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (OSError, ValueError, EOFError) as error:
    reason = "missing" if not path.exists() else f"not a readable .npy array ({type(error).__name__}: {error})"
    raise UserError(f"{path}: {reason}; the index is damaged: rebuild it.") from error
  if array.dtype.kind != kind or (shape is not None and array.shape != shape) or (shape is None and array.ndim != 1):
    expected = f"shape {shape} (index.json's size and dim)" if shape is not None else "one dimension"
    raise UserError(f"{path}: {array.dtype} of shape {array.shape}; expected {ARRAY_KINDS[kind]} of {expected}.")
  return array
