"""Random-access image sources (Contract 1 in docs/architecture.md).

An `ImageSource` is what Grain reads from (`__len__`, `__getitem__`) and what samplers and evaluators
inspect (labels, classes, groups, drawers). It comes in two storage modes:

* in memory: every image is decoded once into one read-only uint8 array (`source.images`), optionally
  cached on disk, so training never decodes a PNG twice;
* lazy: `source.images is None` and each access decodes one file through a picklable loader, for data
  sets too large for memory. Loaders hold only paths; zip files are reopened lazily in every process,
  so a source survives pickling into Grain worker processes.

Builders here: `image_folder_source` (one folder per class, optionally grouped), `tfds_source`
(a prepared TFDS data set through `tfds.data_source`), `synthetic_source` (fake data for tests), and
`ImageSource.from_arrays`. Omniglot's original files live in `omniglot.py` and reuse these pieces.
Splits: `split_classes` holds out whole classes (open-set), `split_images` part of every class's
images (closed-set).

Every image is resized to one (H, W) when decoded, by one of `RESIZE_MODES`: stretched to the frame
(drawings and icons fill it), scaled to cover it and centre-cropped (photos keep their proportions
and lose the edges), or scaled to fit inside it and padded (nothing is lost).
"""

from __future__ import annotations

import hashlib
import io
import operator
import os
import pathlib
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
import tqdm

from siamese_jax.errors import UserError, optional_import

ImageShape = tuple[int, int, int]

# Extensions counted as images in folders and zips (lower case, compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Bumped whenever decoding changes (filter, conversions), so stale on-disk caches are not reused.
_DECODE_VERSION = 1

# How an image reaches the target (H, W) when its proportions differ: "stretch" scales each side to
# fit (distorts), "center_crop" scales the short side to fit and crops the centre (torchvision's
# Resize + CenterCrop), "letterbox" scales the long side to fit and pads the rest.
RESIZE_MODES = ("stretch", "center_crop", "letterbox")

# Letterbox bars are mid-grey: it is about the mean of natural photos, so the bars add the weakest
# edges and, after the usual mean subtraction, read as about zero (no signal), like a network's own
# zero padding. Black bars would be strong edges next to light pictures. Inverted drawings
# (ink = 255 on background = 0) are padded with paper instead, so the bars are background.
LETTERBOX_GREY = 128

# Formats that may carry an EXIF orientation (phone photos); PNGs skip the lookup, which has a cost.
_EXIF_FORMATS = frozenset({"JPEG", "MPO", "TIFF", "WEBP"})


# --------------------------------------------------------------------------------------------------
# Decoding


def check_image_shape(image_shape: Sequence[int], field: str = "image_shape") -> ImageShape:
  """Returns `image_shape` as a (H, W, C) tuple of ints or raises UserError naming `field`."""
  try:
    shape = tuple(operator.index(dim) for dim in image_shape)
  except TypeError:
    shape = ()
  if len(shape) != 3 or shape[0] < 1 or shape[1] < 1 or shape[2] not in (1, 3):
    raise UserError(
        f"{field}={tuple(image_shape) if isinstance(image_shape, Sequence) else image_shape!r}: "
        "expected (height, width, channels) with positive height/width and channels 1 (grayscale) "
        "or 3 (RGB)")
  return shape  # type: ignore[return-value]


def check_resize(resize: str, field: str = "resize") -> str:
  """Returns `resize` or raises UserError naming `field` when it is not one of RESIZE_MODES."""
  if resize not in RESIZE_MODES:
    raise UserError(f"{field}={resize!r}: expected one of {RESIZE_MODES}")
  return resize


def _resize(image: Image.Image, height: int, width: int, resize: str, fill: int) -> Image.Image:
  """`image` brought to (height, width) by the mode `resize` (see RESIZE_MODES), LANCZOS filtered."""
  in_width, in_height = image.size
  if resize == "stretch":
    return image.resize((width, height), Image.Resampling.LANCZOS)
  if resize == "center_crop":
    # Resample the centred box of the target's proportions straight to the target size: one
    # resampling, with a fractional box, instead of a rounded resize followed by a rounded crop.
    if in_width * height > in_height * width:  # wider than the target: crop the sides
      box_width = in_height * width / height
      box = ((in_width - box_width) / 2, 0.0, (in_width + box_width) / 2, float(in_height))
    else:  # taller (or the same proportions): crop top and bottom
      box_height = in_width * height / width
      box = (0.0, (in_height - box_height) / 2, float(in_width), (in_height + box_height) / 2)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)
  factor = min(width / in_width, height / in_height)
  inner = (max(1, min(width, int(in_width * factor + 0.5))), max(1, min(height, int(in_height * factor + 0.5))))
  if inner != image.size:
    image = image.resize(inner, Image.Resampling.LANCZOS)
  canvas = Image.new(image.mode, (width, height), fill if image.mode == "L" else (fill,) * 3)
  canvas.paste(image, ((width - inner[0]) // 2, (height - inner[1]) // 2))
  return canvas


def convert_image(image: Image.Image, image_shape: ImageShape, *, invert: bool = False,
                  resize: str = "stretch") -> np.ndarray:
  """A decoded PIL image as uint8 [H, W, C]: colour converted, resized, optionally inverted.

  `resize` (RESIZE_MODES) says how other proportions reach (H, W); "stretch" scales each side
  without cropping (characters and icons fill their frame). Letterbox bars are LETTERBOX_GREY, or
  paper (background after inversion) with `invert`. LANCZOS is an antialiasing filter when
  shrinking, so thin strokes turn grey instead of vanishing; its slight overshoot is clipped at
  0/255, which is where ink and background sit anyway.
  """
  height, width, channels = image_shape
  if image.format in _EXIF_FORMATS:
    image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
    # convert("L") would clip 16-bit values at 255; scale them down instead.
    image = Image.fromarray((np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    # Transparent pixels carry arbitrary colours (often black); treat transparency as white paper.
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  image = image.convert("L" if channels == 1 else "RGB")
  if image.size != (width, height):
    image = _resize(image, height, width, check_resize(resize), 255 if invert else LETTERBOX_GREY)
  array = np.asarray(image, dtype=np.uint8)
  if channels == 1:
    array = array[:, :, None]
  if invert:
    array = 255 - array
  return array


def decode_image(data: bytes, image_shape: Sequence[int], *, invert: bool = False,
                 name: str = "<image bytes>", resize: str = "stretch") -> np.ndarray:
  """Decodes any PIL-readable image to uint8 [H, W, C] (grayscale for C=1, RGB for C=3).

  `resize` is one of RESIZE_MODES (how other proportions reach H x W; see `convert_image`).

  `invert=True` maps dark ink on white paper to ink = 255 on background = 0 (the Omniglot convention,
  so that zero padding is background). An unreadable file raises UserError naming `name`.
  """
  image_shape = check_image_shape(image_shape)
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError).
    # PIL's text for unknown bytes names only an in-memory buffer ("<_io.BytesIO object at 0x...>").
    detail = ("not an image format PIL recognises" if isinstance(error, UnidentifiedImageError)
              else f"{type(error).__name__}: {error}")
    raise UserError(
        f"{name}: cannot decode this image ({detail}); expected a readable "
        f"image file ({', '.join(IMAGE_EXTENSIONS)}). Replace or delete the file.") from error
  return convert_image(image, image_shape, invert=invert, resize=resize)


# --------------------------------------------------------------------------------------------------
# Readers: picklable access to raw file bytes


class Reader(Protocol):
  """Raw bytes of the records of a source, by position; must be picklable (no open handles)."""

  def __len__(self) -> int: ...
  def read(self, index: int) -> bytes: ...
  def name(self, index: int) -> str: ...
  def identity(self) -> list[Any]: ...


class FolderReader:
  """Reads files below `root` by their relative paths."""

  def __init__(self, root: str | os.PathLike, relative_paths: Sequence[str]):
    self.root = str(root)
    self.relative_paths = list(relative_paths)

  def __len__(self) -> int:
    return len(self.relative_paths)

  def name(self, index: int) -> str:
    return os.path.join(self.root, self.relative_paths[index])

  def read(self, index: int) -> bytes:
    path = self.name(index)
    try:
      with open(path, "rb") as file:
        return file.read()
    except OSError as error:
      raise UserError(f"{path}: cannot read this image file ({error})") from error

  def identity(self) -> list[Any]:
    """(path, size, mtime) of every file: the cache key changes when any file changes."""
    items: list[Any] = [os.path.abspath(self.root)]
    for relative_path in self.relative_paths:
      stat = os.stat(os.path.join(self.root, relative_path))
      items.append((relative_path, stat.st_size, stat.st_mtime_ns))
    return items


class ZipReader:
  """Reads members of one zip file, reopening it lazily in each process (and after pickling).

  An open ZipFile must not travel to another process: after a fork both would share one file
  offset, and it cannot be pickled for spawned Grain workers. So the handle is dropped from the
  pickled state and reopened when the process id changes.
  """

  def __init__(self, zip_path: str | os.PathLike, members: Sequence[str]):
    self.zip_path = str(zip_path)
    self.members = list(members)
    self._zipfile: zipfile.ZipFile | None = None
    self._pid = -1
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {"zip_path": self.zip_path, "members": self.members}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["zip_path"], state["members"])

  def __len__(self) -> int:
    return len(self.members)

  def name(self, index: int) -> str:
    return f"{self.zip_path}:{self.members[index]}"

  def _open(self) -> zipfile.ZipFile:
    pid = os.getpid()
    if self._zipfile is None or self._pid != pid:
      with self._lock:
        if self._zipfile is None or self._pid != pid:
          self._zipfile = open_zip(self.zip_path)
          self._pid = pid
    return self._zipfile

  def read(self, index: int) -> bytes:
    member = self.members[index]
    try:
      return self._open().read(member)
    except (zipfile.BadZipFile, OSError, KeyError, EOFError) as error:
      raise UserError(f"{self.name(index)}: cannot read this zip member ({error})") from error

  def identity(self) -> list[Any]:
    stat = os.stat(self.zip_path)
    return [os.path.abspath(self.zip_path), stat.st_size, stat.st_mtime_ns, self.members]


def open_zip(zip_path: str | os.PathLike) -> zipfile.ZipFile:
  """Opens a zip file or raises UserError naming it."""
  try:
    return zipfile.ZipFile(zip_path)
  except (zipfile.BadZipFile, OSError) as error:
    raise UserError(f"{zip_path}: cannot open this zip file ({error}); expected a valid .zip "
                    "(delete it to download or copy it again)") from error


class ImageDecoder:
  """Picklable `index -> uint8 [H, W, C]` loader of a lazy source: reader + decode_image."""

  def __init__(self, reader: Reader, image_shape: ImageShape, invert: bool, resize: str = "stretch"):
    self.reader = reader
    self.image_shape = image_shape
    self.invert = invert
    self.resize = check_resize(resize)

  def __call__(self, index: int) -> np.ndarray:
    # Looked up in the module at call time, so tests can observe or replace decoding.
    return decode_image(self.reader.read(index), self.image_shape, invert=self.invert,
                        name=self.reader.name(index), resize=self.resize)


# --------------------------------------------------------------------------------------------------
# ImageSource


def _as_index_array(indices: Any, size: int, what: str) -> np.ndarray:
  """int64 [n] from an int sequence or a boolean mask of length `size`; range-checked."""
  array = np.asarray(indices)
  if array.dtype == bool:
    if array.shape != (size,):
      raise ValueError(f"{what}: boolean mask of shape {array.shape}, expected ({size},)")
    return np.flatnonzero(array)
  if array.size == 0:
    return np.zeros((0,), np.int64)
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{what}: expected a 1-D sequence of integer indices, got {array.dtype} "
                     f"{array.shape}")
  array = array.astype(np.int64)
  if array.min() < 0 or array.max() >= size:
    raise IndexError(f"{what}: indices must lie in [0, {size}), got [{array.min()}, {array.max()}]")
  return array


class ImageSource:
  """Labelled images with class and group (alphabet) structure; see Contract 1.

  Attributes:
    labels: int32 [N], class of each record, 0..num_classes-1.
    class_names: one name per class, e.g. "Greek/character03".
    class_groups: int32 [C], group of each class (e.g. its alphabet).
    group_names: one name per group; a single "" when the data have no groups.
    file_ids: stable id of each record (its path inside the zip or folder).
    drawers: int32 [N], Omniglot drawer 1..20, -1 where unknown.
    image_shape: (H, W, C) of every image.
    images: uint8 [N, H, W, C] (read-only) when decoded in memory, else None.
  """

  def __init__(self, *, labels: Any, class_names: Sequence[str], class_groups: Any,
               group_names: Sequence[str], file_ids: Sequence[str], drawers: Any,
               image_shape: Sequence[int], images: np.ndarray | None = None,
               loader: Callable[[int], np.ndarray] | None = None, loader_rows: Any = None):
    """Builds a source from per-record arrays and either `images` or a picklable `loader`.

    `loader(row)` returns the uint8 [H, W, C] image of its own record `row`; `loader_rows[i]` says
    which loader row record i is (views made by `subset` share one loader).
    """
    self.image_shape: ImageShape = check_image_shape(image_shape)
    self.labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    self.class_names = list(class_names)
    self.class_groups = np.asarray(class_groups, dtype=np.int32).reshape(-1)
    self.group_names = list(group_names)
    self.file_ids = list(file_ids)
    self.drawers = np.asarray(drawers, dtype=np.int32).reshape(-1)
    num_records = len(self.labels)
    if len(self.file_ids) != num_records or len(self.drawers) != num_records:
      raise ValueError(f"ImageSource: {num_records} labels but {len(self.file_ids)} file_ids and "
                       f"{len(self.drawers)} drawers")
    if len(self.class_groups) != len(self.class_names):
      raise ValueError(f"ImageSource: {len(self.class_names)} class_names but "
                       f"{len(self.class_groups)} class_groups")
    if num_records and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f"ImageSource: labels must lie in [0, {len(self.class_names)})")
    if len(self.class_groups) and (self.class_groups.min() < 0
                                   or self.class_groups.max() >= len(self.group_names)):
      raise ValueError(f"ImageSource: class_groups must lie in [0, {len(self.group_names)})")
    if (images is None) == (loader is None):
      raise ValueError("ImageSource: give exactly one of `images` (in memory) or `loader` (lazy)")
    if images is not None:
      images = np.asarray(images)
      if images.dtype != np.uint8 or images.shape != (num_records, *self.image_shape):
        raise ValueError(f"ImageSource: images must be uint8 {(num_records, *self.image_shape)}, "
                         f"got {images.dtype} {images.shape}")
      # Records are handed out as views of this array: a read-only view keeps a caller from
      # silently editing the data set in place (the caller's own array stays writeable).
      images = images.view()
      images.flags.writeable = False
    self.images = images
    self._loader = loader
    if loader is not None:
      rows = np.arange(num_records) if loader_rows is None else np.asarray(loader_rows, np.int64)
      if rows.shape != (num_records,):
        raise ValueError(f"ImageSource: loader_rows must have shape ({num_records},)")
      self._loader_rows = rows
    else:
      self._loader_rows = None

  @classmethod
  def from_arrays(cls, images: np.ndarray, labels: Any, *, class_names: Sequence[str] | None = None,
                  class_groups: Any = None, group_names: Sequence[str] | None = None,
                  file_ids: Sequence[str] | None = None, drawers: Any = None) -> ImageSource:
    """An in-memory source from uint8 [N, H, W, C] images and int labels (fakes, tests, notebooks).

    Missing names default to the class index as a string, one group "", ids "0", "1", ... and
    unknown drawers.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int32)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if class_names is None:
      class_names = [str(i) for i in range(num_classes)]
    if class_groups is None:
      class_groups = np.zeros(len(class_names), np.int32)
      group_names = [""] if group_names is None else group_names
    if group_names is None:
      group_names = [str(i) for i in range(int(np.max(class_groups, initial=-1)) + 1)]
    if file_ids is None:
      file_ids = [str(i) for i in range(len(labels))]
    if drawers is None:
      drawers = np.full(len(labels), -1, np.int32)
    return cls(labels=labels, class_names=class_names, class_groups=class_groups,
               group_names=group_names, file_ids=file_ids, drawers=drawers,
               image_shape=images.shape[1:], images=images)

  # Grain's random-access protocol.

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> np.ndarray:
    index = operator.index(index)
    size = len(self.labels)
    if not -size <= index < size:
      raise IndexError(f"record {index} out of range for a source of {size} records")
    if self.images is not None:
      return self.images[index]
    return self._loader(int(self._loader_rows[index]))  # type: ignore[misc,index]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_groups(self) -> int:
    return len(self.group_names)

  @property
  def in_memory(self) -> bool:
    return self.images is not None

  def __repr__(self) -> str:
    mode = "in memory" if self.in_memory else "lazy"
    return (f"ImageSource({len(self)} records, {self.num_classes} classes, {self.num_groups} groups, "
            f"image_shape={self.image_shape}, {mode})")

  # Views.

  def subset(self, record_indices: Any) -> ImageSource:
    """The records at `record_indices` (ints, in that order, or a boolean mask).

    Only classes with at least one kept record remain; classes and groups are renumbered densely in
    their original order and keep their names. In-memory images are copied, lazy ones share the loader.
    """
    indices = _as_index_array(record_indices, len(self), "subset(record_indices)")
    kept_classes = np.unique(self.labels[indices])
    return self._view(indices, kept_classes)

  def select_classes(self, class_indices: Any) -> ImageSource:
    """All records of the classes `class_indices`, in record order, renumbered densely.

    New class i is the i-th smallest selected old class index (the order of `class_indices` and any
    repeats do not matter), so the result is the same however the classes were listed.
    """
    classes = np.unique(_as_index_array(class_indices, self.num_classes, "select_classes"))
    indices = np.flatnonzero(np.isin(self.labels, classes))
    return self._view(indices, classes)

  def with_rotated_classes(self, degrees: Sequence[int]) -> ImageSource:
    """These classes plus, for each angle in `degrees` (90, 180, 270), every class turned by it.

    A turned class is a new class ("Greek/character03/rot090") in a new group ("Greek/rot090"): a
    turned alphabet is another alphabet, so within-group batches stay one script in one orientation.
    Turns are counter-clockwise, as in Vinyals et al.'s split; file ids get "#rotDDD", as there. The
    images are decoded into memory (a lazy source is read once here).
    """
    degrees = list(degrees)
    if any(d not in (90, 180, 270) for d in degrees) or len(set(degrees)) != len(degrees):
      raise UserError(f"class rotations {tuple(degrees)}: expected distinct angles among 90, 180, 270")
    if not degrees:
      return self
    if self.image_shape[0] != self.image_shape[1] and any(d != 180 for d in degrees):
      raise UserError(f"class rotations {tuple(degrees)}: quarter turns need square images, these are "
                      f"{self.image_shape[0]}x{self.image_shape[1]}")
    images = self.images if self.images is not None else np.stack([self[i] for i in range(len(self))])
    turns = [0] + [d // 90 for d in degrees]  # copy k: its classes and groups offset by k times the count
    tags = [""] + [f"rot{d:03d}" for d in degrees]
    tagged = lambda names, mark: [name + (mark + tag if tag else "") for tag in tags for name in names]
    return ImageSource(
        labels=np.concatenate([self.labels + k * self.num_classes for k in range(len(turns))]),
        class_names=tagged(self.class_names, "/"),
        class_groups=np.concatenate([self.class_groups + k * self.num_groups for k in range(len(turns))]),
        group_names=tagged(self.group_names, "/"),
        file_ids=tagged(self.file_ids, "#"),
        drawers=np.tile(self.drawers, len(turns)),
        image_shape=self.image_shape,
        images=np.concatenate([np.rot90(images, k=k, axes=(1, 2)) for k in turns]))

  def _view(self, indices: np.ndarray, kept_classes: np.ndarray) -> ImageSource:
    class_map = np.full(self.num_classes, -1, np.int32)
    class_map[kept_classes] = np.arange(len(kept_classes), dtype=np.int32)
    kept_groups = np.unique(self.class_groups[kept_classes])
    group_map = np.full(self.num_groups, -1, np.int32)
    group_map[kept_groups] = np.arange(len(kept_groups), dtype=np.int32)
    return ImageSource(
        labels=class_map[self.labels[indices]],
        class_names=[self.class_names[c] for c in kept_classes],
        class_groups=group_map[self.class_groups[kept_classes]],
        group_names=[self.group_names[g] for g in kept_groups],
        file_ids=[self.file_ids[i] for i in indices],
        drawers=self.drawers[indices],
        image_shape=self.image_shape,
        images=None if self.images is None else self.images[indices],
        loader=self._loader,
        loader_rows=None if self._loader_rows is None else self._loader_rows[indices])


# --------------------------------------------------------------------------------------------------
# Building sources from files: decode all (with an optional disk cache) or stay lazy


def decode_all(loader: Callable[[int], np.ndarray], count: int, image_shape: ImageShape,
               description: str) -> np.ndarray:
  """Calls `loader(i)` for every record into one uint8 [N, H, W, C] array, with a progress bar.

  Runs in one thread on purpose: PIL's decode and zip reads mostly hold the GIL, so a thread pool only
  adds overhead.
  """
  images = np.empty((count, *image_shape), np.uint8)
  for index in tqdm.tqdm(range(count), desc=f"Decoding {description}", unit="img",
                         mininterval=1.0, leave=False):
    images[index] = loader(index)
  return images


def cache_file(cache_dir: str | os.PathLike, description: str, key: list[Any]) -> pathlib.Path:
  """Where the cache for `key` lives: a readable stem plus a digest of everything that matters."""
  digest = hashlib.sha256(repr([_DECODE_VERSION, *key]).encode()).hexdigest()[:20]
  stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in description)[:60]
  return pathlib.Path(cache_dir) / f"{stem}-{digest}.npz"


def read_cache(path: pathlib.Path) -> dict[str, np.ndarray] | None:
  """The arrays stored at `path`, or None when absent or damaged (then it is simply rebuilt)."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as cached:
      return {name: cached[name] for name in cached.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    return None


def write_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes to a temporary name and renames it into place: a killed or concurrent run never leaves
  half a file under the final name (os.replace is atomic on one file system)."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp",
                                     delete=False) as file:
      temporary = file.name
      np.savez(file, **arrays)
    os.replace(temporary, path)
    temporary = None
  except OSError as error:
    raise UserError(f"cache_dir={os.fspath(path.parent)!r}: cannot write the decoded-image cache "
                    f"({error}); use a writable folder or cache_dir=None") from error
  finally:
    if temporary is not None and os.path.exists(temporary):
      os.remove(temporary)


def cached_decode_all(loader: Callable[[int], np.ndarray], file_ids: Sequence[str],
                      image_shape: ImageShape, *, description: str,
                      cache_dir: str | os.PathLike | None,
                      identity: Callable[[], list[Any]] | None,
                      options: dict[str, Any] | None = None) -> np.ndarray:
  """`decode_all`, reusing an on-disk copy when `cache_dir` is set.

  The key covers the files' identity (path, size, mtime), the image shape, the decode `options`
  (e.g. invert) and a decoder version: a changed file or setting is a cache miss, never a stale hit.
  """
  if cache_dir is None or identity is None:
    return decode_all(loader, len(file_ids), image_shape, description)
  path = cache_file(cache_dir, description,
                    [description, list(image_shape), sorted((options or {}).items()), identity()])
  # Stored beside the pixels and checked on load: the record order must match, not just the files.
  ids_digest = hashlib.sha256("\n".join(file_ids).encode()).hexdigest()
  cached = read_cache(path)
  if (cached is not None and "images" in cached and "file_ids_sha256" in cached
      and cached["images"].shape == (len(file_ids), *image_shape)
      and str(cached["file_ids_sha256"]) == ids_digest):
    return cached["images"]
  images = decode_all(loader, len(file_ids), image_shape, description)
  write_cache(path, {"images": images, "file_ids_sha256": np.asarray(ids_digest)})
  return images


def source_from_reader(reader: Reader, *, file_ids: Sequence[str], class_keys: Sequence[str],
                       group_keys: Sequence[str] | None, drawers: Any = None,
                       image_shape: Sequence[int], invert: bool = False, in_memory: bool = True,
                       cache_dir: str | os.PathLike | None = None,
                       description: str = "images", resize: str = "stretch") -> ImageSource:
  """An ImageSource over the files of `reader`, record i having class `class_keys[i]`.

  Classes are numbered in sorted (group, class) order and groups in sorted order, so the numbering
  does not depend on the order files were listed. `group_keys=None` means one group "".
  """
  image_shape = check_image_shape(image_shape)
  if group_keys is None:
    group_keys = [""] * len(class_keys)
  pairs = sorted(set(zip(group_keys, class_keys)))
  class_names = [name for _, name in pairs]
  if len(set(class_names)) != len(class_names):
    raise UserError(f"{description}: a class name appears in more than one group")
  class_index = {name: i for i, name in enumerate(class_names)}
  group_names = sorted(set(group_keys))
  group_index = {name: i for i, name in enumerate(group_names)}
  labels = np.array([class_index[name] for name in class_keys], np.int32)
  class_groups = np.array([group_index[group] for group, _ in pairs], np.int32)
  if drawers is None:
    drawers = np.full(len(labels), -1, np.int32)
  loader = ImageDecoder(reader, image_shape, invert, resize)
  common = dict(labels=labels, class_names=class_names, class_groups=class_groups,
                group_names=group_names, file_ids=file_ids, drawers=drawers,
                image_shape=image_shape)
  if not in_memory:
    return ImageSource(**common, loader=loader)
  # "stretch" stays out of the key, so caches written before there was a choice remain valid.
  options = {"invert": invert} if resize == "stretch" else {"invert": invert, "resize": resize}
  images = cached_decode_all(loader, file_ids, image_shape, description=description,
                             cache_dir=cache_dir, identity=reader.identity, options=options)
  return ImageSource(**common, images=images)


# --------------------------------------------------------------------------------------------------
# Image folders


def is_image_name(name: str) -> bool:
  """True for visible files with an image extension (hidden files such as ._x.png are skipped)."""
  base = os.path.basename(name)
  return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _visible_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.name)


def _image_files(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in path.iterdir() if p.is_file() and is_image_name(p.name)),
                key=lambda p: p.name)


def detect_folder_layout(root: pathlib.Path) -> Literal["flat", "grouped"]:
  """"flat" when the sub-folders of `root` hold images, "grouped" when they hold class folders."""
  with_images, with_dirs = [], []
  for directory in _visible_dirs(root):
    if _image_files(directory):
      with_images.append(directory.name)
    elif _visible_dirs(directory):
      with_dirs.append(directory.name)
  if with_images and with_dirs:
    raise UserError(
        f"{root}: cannot detect the layout: {with_images[0]!r} holds images (flat: root/class/image) "
        f"but {with_dirs[0]!r} holds folders (grouped: root/group/class/image); pass layout="
        "'flat' or 'grouped'")
  return "grouped" if with_dirs else "flat"


def count_grayscale(images: np.ndarray, chunk: int = 1024) -> int:
  """How many RGB images uint8 [N, H, W, 3] are grey: all three channels equal at every pixel
  (grayscale files converted to RGB, and colour files holding only greys). Chunked, so the
  comparison never needs a copy of the whole array."""
  count = 0
  for start in range(0, len(images), chunk):
    block = images[start:start + chunk]
    grey = (block[..., 0] == block[..., 1]) & (block[..., 1] == block[..., 2])
    count += int(grey.reshape(len(block), -1).all(axis=1).sum())
  return count


def image_folder_source(root: str | os.PathLike, image_shape: Sequence[int], *,
                        layout: Literal["flat", "grouped", "auto"] = "auto",
                        in_memory: bool = True, cache_dir: str | os.PathLike | None = None,
                        invert: bool = False, resize: str = "stretch") -> ImageSource:
  """Images in class folders: `root/<class>/<image>` ("flat") or `root/<group>/<class>/<image>`.

  "grouped" keeps the group (e.g. an alphabet) so splits can hold out whole groups; class names are
  then "group/class". "auto" picks by looking one level down. Only files with an image extension
  count (others, and hidden files, are ignored); everything is sorted by name, so the numbering is
  the same on every machine. `invert=True` turns dark-on-light drawings into ink = 255. `resize`:
  one of RESIZE_MODES. An RGB folder decoded in memory prints one note with the number of grey
  images in it (`count_grayscale`): a colour model then sees them without colour.
  """
  root_path = pathlib.Path(root)
  if not root_path.is_dir():
    raise UserError(f"image folder {root_path}: not found (or not a folder); expected "
                    "root/<class>/<image> or root/<group>/<class>/<image>")
  if layout not in ("flat", "grouped", "auto"):
    raise UserError(f"layout={layout!r}: expected 'flat', 'grouped' or 'auto'")
  if layout == "auto":
    layout = detect_folder_layout(root_path)
  if layout == "flat":
    class_dirs = [("", d) for d in _visible_dirs(root_path)]
  else:
    class_dirs = []
    for group_dir in _visible_dirs(root_path):
      classes = _visible_dirs(group_dir)
      if not classes:
        raise UserError(f"group folder {group_dir}: holds no class folders; expected "
                        f"{group_dir}/<class>/<image> (layout='grouped')")
      class_dirs.extend((group_dir.name, d) for d in classes)
  if not class_dirs:
    raise UserError(f"image folder {root_path}: no class folders found; expected "
                    f"{'root/<class>/<image>' if layout == 'flat' else 'root/<group>/<class>/<image>'}"
                    " (images directly in root are not used: they have no class)")
  relative_paths, class_keys, group_keys = [], [], []
  for group, class_dir in class_dirs:
    files = _image_files(class_dir)
    if not files:
      raise UserError(f"class folder {class_dir}: holds no images (extensions "
                      f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    class_name = f"{group}/{class_dir.name}" if layout == "grouped" else class_dir.name
    for file in files:
      relative_paths.append(file.relative_to(root_path).as_posix())
      class_keys.append(class_name)
      group_keys.append(group)
  source = source_from_reader(
      FolderReader(root_path, relative_paths), file_ids=relative_paths, class_keys=class_keys,
      group_keys=group_keys if layout == "grouped" else None, image_shape=image_shape,
      invert=invert, in_memory=in_memory, cache_dir=cache_dir, description=root_path.name,
      resize=resize)
  if source.images is not None and source.image_shape[2] == 3:
    grey = count_grayscale(source.images)
    if grey:
      print(f"note: {grey} grayscale images in {root_path} were converted to RGB", flush=True)
  return source


# --------------------------------------------------------------------------------------------------
# TFDS


def _tfds_prepare_hint(name: str, data_dir: str | None) -> str:
  dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
  return (f"prepare it once in array_record format (preparation needs TensorFlow: "
          f"pip install tensorflow), e.g. `tfds build {name}{dir_flag} --file_format=array_record` "
          f"or `python -c \"import tensorflow_datasets as tfds; tfds.builder({name!r}{dir_arg}, "
          f"file_format='array_record').download_and_prepare()\"`")


def _open_tfds(name: str, split: str, data_dir: str | None) -> Any:
  """tfds.data_source(..., download=False) with TFDS's errors turned into actionable UserErrors."""
  tfds = optional_import("tensorflow_datasets", "tfds", "data.source='tfds'")  # only TFDS users pay for it

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise UserError(f"TFDS dataset {name!r}: no such dataset in tensorflow-datasets") from error
  except Exception as error:  # TFDS raises NotImplementedError/AssertionError/... when unprepared.
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:
      prepared = False
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    if not prepared:
      raise UserError(f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where}; "
                      f"{_tfds_prepare_hint(name, data_dir)}") from error
    raise UserError(f"TFDS dataset {name!r} split {split!r} in {where} cannot be read for random "
                    f"access ({type(error).__name__}: {error}). A data set prepared as tfrecord "
                    f"must be rebuilt as array_record: {_tfds_prepare_hint(name, data_dir)}") from error


class TfdsImageLoader:
  """Picklable `index -> uint8 [H, W, C]` over a TFDS data source, reopened lazily per process."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
               image_shape: ImageShape, invert: bool, data_source: Any = None, resize: str = "stretch"):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.image_shape, self.invert = image_key, image_shape, invert
    self.resize = check_resize(resize)
    self._data_source = data_source
    self._pid = os.getpid() if data_source is not None else -1

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_data_source"], state["_pid"] = None, -1
    return state

  def record(self, index: int) -> dict[str, Any]:
    if self._data_source is None or self._pid != os.getpid():
      self._data_source = _open_tfds(self.name, self.split, self.data_dir)
      self._pid = os.getpid()
    return self._data_source[index]

  def convert(self, image: Any, index: int) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
      array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
      raise UserError(f"TFDS {self.name} {self.split}[{index}] {self.image_key!r}: expected an image "
                      f"[H, W, 1|3|4], got shape {array.shape}")
    if array.dtype != np.uint8:
      raise UserError(f"TFDS {self.name} {self.split}[{index}] {self.image_key!r}: expected uint8 "
                      f"pixels, got {array.dtype}")
    # uint8 [H, W] reads as "L", [H, W, 3] as "RGB", [H, W, 4] as "RGBA".
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return convert_image(image, self.image_shape, invert=self.invert, resize=self.resize)

  def __call__(self, index: int) -> np.ndarray:
    return self.convert(self.record(index)[self.image_key], index)


def _tfds_identity(builder: Any) -> list[Any] | None:
  """(path, size, mtime) of the prepared files, or None where they are not a local folder (GCS,
  mocks): then nothing is cached, rather than risking a stale hit."""
  root = os.fspath(builder.data_dir)
  if not os.path.isdir(root):
    return None
  items: list[Any] = [os.path.abspath(root)]
  for folder, _, files in sorted(os.walk(root)):
    for file in sorted(files):
      stat = os.stat(os.path.join(folder, file))
      items.append((os.path.relpath(os.path.join(folder, file), root), stat.st_size,
                    stat.st_mtime_ns))
  return items


def tfds_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                image_shape: Sequence[int], image_key: str = "image", label_key: str = "label",
                group_key: str | None = None, in_memory: bool = True,
                cache_dir: str | os.PathLike | None = None,
                invert: bool | None = None, resize: str = "stretch") -> ImageSource:
  """A prepared TFDS data set (array_record format) through `tfds.data_source`; never downloads.

  Labels are renumbered densely over the classes present in `split` (TFDS Omniglot's "train" split
  holds global labels 0..963, "test" 964..1622); class names come from the label feature's names.
  `group_key` (e.g. "alphabet" for Omniglot) gives groups; every class must lie in one group.
  `invert=None` inverts for "omniglot" (white paper, black ink in TFDS) so that ink = 255 as in
  Contract 1, and leaves other data sets alone. The split is read once to collect labels (and, in
  memory, images in the same pass); with `cache_dir`, an in-memory source stores images and labels
  keyed by the prepared files' identity, and a later run reads no record at all. `resize`: one of
  RESIZE_MODES.
  """
  tfds = optional_import("tensorflow_datasets", "tfds", "data.source='tfds'")

  image_shape = check_image_shape(image_shape)
  data_dir_str = None if data_dir is None else os.fspath(data_dir)
  base_name = name.split(":")[0].split("/")[0]
  if invert is None:
    invert = base_name == "omniglot"
  data_source = _open_tfds(name, split, data_dir_str)
  builder = tfds.builder(name, data_dir=data_dir_str)
  features = builder.info.features
  for key in (image_key, label_key, group_key):
    if key is not None and key not in features:
      raise UserError(f"TFDS dataset {name!r}: no feature {key!r}; it has {sorted(features.keys())}")

  def feature_names(key: str) -> Callable[[int], str]:
    names = getattr(features[key], "names", None)
    return (lambda value: names[value]) if names else str

  loader = TfdsImageLoader(name, split, data_dir_str, image_key, image_shape, invert,
                           data_source=data_source, resize=resize)
  count = len(data_source)
  cache_path, cached = None, None
  identity = _tfds_identity(builder) if in_memory and cache_dir is not None else None
  if identity is not None:
    # As for folders, "stretch" stays out of the key so that earlier caches remain valid.
    cache_path = cache_file(cache_dir, f"tfds_{base_name}_{split}", [
        name, split, image_key, label_key, group_key, list(image_shape), invert, identity]
        + ([] if resize == "stretch" else [resize]))
    cached = read_cache(cache_path)
  if (cached is not None and {"images", "raw_labels", "raw_groups"} <= cached.keys()
      and cached["images"].shape == (count, *image_shape)):
    images, raw_labels, raw_groups = cached["images"], cached["raw_labels"], cached["raw_groups"]
  else:
    raw_labels = np.empty(count, np.int64)
    raw_groups = np.zeros(count, np.int64)
    images = np.empty((count, *image_shape), np.uint8) if in_memory else None
    for index in tqdm.tqdm(range(count), desc=f"Reading TFDS {name}/{split}", unit="img",
                           mininterval=1.0, leave=False):
      record = data_source[index]
      raw_labels[index] = int(record[label_key])
      if group_key is not None:
        raw_groups[index] = int(record[group_key])
      if images is not None:
        images[index] = loader.convert(record[image_key], index)
    if cache_path is not None:
      write_cache(cache_path, {"images": images, "raw_labels": raw_labels,
                               "raw_groups": raw_groups})

  label_name, group_name = feature_names(label_key), (
      feature_names(group_key) if group_key else None)
  class_of_label: dict[int, str] = {}
  group_of_label: dict[int, int] = {}
  for label, group in zip(raw_labels.tolist(), raw_groups.tolist()):
    if group_of_label.setdefault(label, group) != group:
      raise UserError(f"TFDS dataset {name!r} split {split!r}: class {label_name(label)!r} "
                      f"({label_key}={label}) appears in several groups of {group_key!r} "
                      f"({group_of_label[label]} and {group}); use group_key=None")
    class_of_label.setdefault(label, label_name(label))
  unique_labels = sorted(group_of_label)
  unique_groups = sorted(set(group_of_label.values()))
  label_index = {label: i for i, label in enumerate(unique_labels)}
  group_index = {group: i for i, group in enumerate(unique_groups)}
  common = dict(
      labels=np.array([label_index[label] for label in raw_labels.tolist()], np.int32),
      class_names=[class_of_label[label] for label in unique_labels],
      class_groups=np.array([group_index[group_of_label[label]] for label in unique_labels],
                            np.int32),
      group_names=[group_name(g) for g in unique_groups] if group_name else [""],
      file_ids=[f"{name}/{split}[{i}]" for i in range(count)],
      drawers=np.full(count, -1, np.int32), image_shape=image_shape)
  if images is not None:
    return ImageSource(**common, images=images)
  return ImageSource(**common, loader=loader)


# --------------------------------------------------------------------------------------------------
# Synthetic data and class splits


def synthetic_source(num_classes: int = 8, per_class: int = 4, image_shape: Sequence[int] = (28, 28, 1),
                     *, num_groups: int = 2, seed: int = 0) -> ImageSource:
  """Fake in-memory data for tests and smoke runs: learnable, deterministic, no files.

  Each class is a random binary prototype; each record flips a few of its pixels, so same-class
  images are closer than different-class ones (a model can actually learn something).
  """
  image_shape = check_image_shape(image_shape)
  rng = np.random.default_rng(seed)
  prototypes = rng.random((num_classes, *image_shape)) < 0.25
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  flips = rng.random((len(labels), *image_shape)) < 0.05
  images = (np.logical_xor(prototypes[labels], flips) * 255).astype(np.uint8)
  num_groups = max(1, min(num_groups, num_classes))
  class_groups = np.arange(num_classes, dtype=np.int32) % num_groups
  return ImageSource.from_arrays(
      images, labels, class_names=[f"group{g}/class{c:03d}" for c, g in enumerate(class_groups)],
      class_groups=class_groups, group_names=[f"group{g}" for g in range(num_groups)],
      drawers=np.tile(np.arange(1, per_class + 1, dtype=np.int32), num_classes))


def split_classes(source: ImageSource, held_out: float | int, *,
                  seed: int = 0) -> tuple[ImageSource, ImageSource]:
  """Splits by class: (kept, held_out) with no class in both; `held_out` is a fraction or a count.

  Used to evaluate on classes never trained on (the one-shot setting) for data with no given split.
  A float in (0, 1) is a fraction of the classes (rounded, at least one); an int is a class count.
  The held-out classes are a seeded permutation of the class indices: same seed, same split.
  """
  num_classes = source.num_classes
  if isinstance(held_out, bool) or not isinstance(held_out, (int, float, np.integer, np.floating)):
    raise UserError(f"held_out={held_out!r}: expected a fraction in (0, 1) or a class count")
  if isinstance(held_out, (float, np.floating)):
    if not 0.0 < held_out < 1.0:
      raise UserError(f"held_out={held_out}: a fraction must lie strictly between 0 and 1")
    count = max(1, int(round(held_out * num_classes)))
  else:
    count = int(held_out)
  if not 1 <= count < num_classes:
    raise UserError(f"held_out={held_out}: must leave at least one class on each side; the source "
                    f"has {num_classes} classes")
  order = np.random.default_rng(seed).permutation(num_classes)
  held = np.sort(order[:count])
  kept = np.sort(order[count:])
  return source.select_classes(kept), source.select_classes(held)


def split_images(source: ImageSource, fractions: Sequence[float], *, seed: int = 0, min_per_split: int = 2,
                 root: str | os.PathLike | None = None, context: str = "split_images") -> list[ImageSource]:
  """Splits every class's images: [rest, part_1, ..., part_k], each holding every class (closed-set).

  Part j gets round(fractions[j] * n) of a class's n images, at least `min_per_split`; the rest keeps
  the remainder, which must also be at least `min_per_split` (two images a class: a positive pair to
  train on, or a support and a query image for an episode). Which images go where is a seeded draw
  per class: same seed, same split. A class with too few images raises one UserError naming its
  folder under `root` (or the class) and the count needed; `context` says what asked for the split.
  """
  fractions = [float(f) for f in fractions]
  if not fractions or any(not 0.0 < f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
    raise UserError(f"{context}: fractions {fractions}: expected each in (0, 1) and a sum below 1")
  counts = np.bincount(source.labels, minlength=source.num_classes)

  def parts(n: np.ndarray) -> np.ndarray:
    """[len(n), k] images each class gives to each held-out part."""
    wanted = np.floor(np.multiply.outer(n, fractions) + 0.5).astype(np.int64)
    return np.maximum(wanted, min_per_split)

  held = parts(counts)
  short = np.flatnonzero(counts - held.sum(axis=1) < min_per_split)
  if len(short):
    # The smallest class size that leaves enough in every part (the rest's share grows with n).
    needed = next(n for n in range(1, 1 << 20) if n - parts(np.array([n]))[0].sum() >= min_per_split)
    first = int(short[0])
    name = source.class_names[first]
    where = f"class folder {os.path.join(os.fspath(root), name)}" if root is not None else f"class {name!r}"
    more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
    raise UserError(f"{where}: {counts[first]} images{more}; {context} needs at least {needed} per class "
                    f"({min_per_split} in each of the {len(fractions) + 1} splits)")
  # Rank of each record within its class in a seeded random order, without a loop over records.
  order = np.lexsort((np.random.default_rng(seed).random(len(source)), source.labels))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.empty(len(source), np.int64)
  rank[order] = np.arange(len(source)) - starts[source.labels[order]]
  # Ranks below the first boundary go to part 1, then part 2, ...; past the last one, to the rest.
  boundaries = np.cumsum(held, axis=1)[source.labels]  # [N, k]
  part = (rank[:, None] >= boundaries).sum(axis=1) + 1
  part[part == len(fractions) + 1] = 0
  return [source.subset(np.flatnonzero(part == j)) for j in range(len(fractions) + 1)]
