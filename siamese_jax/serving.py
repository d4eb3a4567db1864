"""A served model: the embedding function in one file, run with only jax and numpy (no model code).

  served = load_artifact("runs/omniglot/eval/model.zip")     # written by --mode=export_model
  embeddings = served.embed(images)    # uint8 [N, H, W, C] of exactly served.image_shape -> float32 [N, D]
  same = np.linalg.norm(embeddings[0] - embeddings[1]) <= served.threshold

This module imports only the standard library, numpy, jax (whose `jax.export` needs the `flatbuffers`
package) and `siamese_jax.errors`, so a server needs none of Flax, Orbax or the project's model code.

The file format (format "siamese_jax.served_model", version 1) is a zip archive of two members:

  spec.json         what the function takes and gives, as JSON (below); the first member, so
                    `unzip -p model.zip spec.json` shows it
  embed.jax_export  `jax.export.Exported.serialize()` of `embed(images)`: StableHLO with the trained weights as
                    constants, for the platforms in spec["platforms"] ("cpu", "cuda"); the batch dimension is
                    symbolic, so any batch size runs. Read it back with `jax.export.deserialize`.

spec.json holds:

  format, format_version   "siamese_jax.served_model", 1 (a reader refuses any other)
  function                 the member with the exported function ("embed.jax_export")
  sha256                   {member: hex digest} of the exported function, checked on loading
  platforms                the platforms it was lowered for; it runs on those only
  jax_version              the jax that exported it; calling_convention_version, of jax.export
  input                    {"shape": [null, H, W, C], "dtype": "uint8", "layout": "NHWC", "channels": C,
                           "range": [0, 255]}: raw pixels; the function normalises them itself
  output                   {"shape": [null, D], "dtype": "float32", "embedding_dim": D}
  distance                 "euclidean": two images are alike when their embeddings are close
  preprocessing            what the caller does to an image FILE before the function:
                           {"invert": bool (255 - x after decoding, Omniglot's dark ink -> bright), "resize":
                           "stretch" | "center_crop" | "letterbox" to H x W (LANCZOS), "color": "L" or "RGB"}
  normalisation            what the function does inside (informational): the uint8 -> [0, 1] scaling, the
                           backbone's preprocessing, test-time augmentation, L2 normalisation
  model, step, config_hash the trained model it came from; an ensemble also lists its "members"
  threshold                the calibrated threshold record or null: "threshold" (same if the euclidean
                           distance <= it), "gallery_threshold" (a query is of a gallery's class if its
                           distance to it <= it), and how they were calibrated
  threshold_note           why `threshold` is null, when it is
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import zipfile
import zlib
from typing import Any

import jax
import numpy as np
from jax import export

from siamese_jax.errors import UserError

FORMAT = "siamese_jax.served_model"
FORMAT_VERSION = 1
SPEC_MEMBER = "spec.json"
FUNCTION_MEMBER = "embed.jax_export"
DEFAULT_BATCH_SIZE = 128


def write_artifact(path: str | os.PathLike, exported: export.Exported, spec: dict) -> pathlib.Path:
  """Writes `exported` (the embedding function) and `spec` as one artifact, via a temporary file and a rename.

  Adds the format fields (format, version, function member, its sha256, platforms, jax versions) to `spec`.
  """
  path = pathlib.Path(path)
  serialized = bytes(exported.serialize())
  spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "function": FUNCTION_MEMBER,
          "sha256": {FUNCTION_MEMBER: hashlib.sha256(serialized).hexdigest()},
          "platforms": list(exported.platforms), "jax_version": jax.__version__,
          "calling_convention_version": exported.calling_convention_version, **spec}
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  try:
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
      archive.writestr(SPEC_MEMBER, json.dumps(spec, indent=2, default=_json_default) + "\n")
      archive.writestr(FUNCTION_MEMBER, serialized)
    temporary.replace(path)
  finally:
    temporary.unlink(missing_ok=True)
  return path


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclasses.dataclass
class ServedModel:
  """A loaded artifact: `embed` runs the exported function; `spec` is its spec.json (module docstring)."""

  path: pathlib.Path
  spec: dict
  exported: export.Exported

  def __post_init__(self):
    self._call = jax.jit(self.exported.call)  # compiled once per batch size (see `embed`)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.spec["input"]["shape"][1:])

  @property
  def embedding_dim(self) -> int:
    return int(self.spec["output"]["embedding_dim"])

  @property
  def invert(self) -> bool:
    """Whether image files are inverted (255 - x) after decoding, before `embed` (Omniglot's are)."""
    return bool(self.spec["preprocessing"]["invert"])

  @property
  def threshold(self) -> float | None:
    """Same/different: the same class if the euclidean distance of two embeddings is <= this."""
    record = self.spec.get("threshold")
    return None if record is None else float(record["threshold"])

  @property
  def gallery_threshold(self) -> float | None:
    """Open set: a query belongs to a gallery class if its distance to it is <= this (else unknown)."""
    record = self.spec.get("threshold")
    return None if record is None or "gallery_threshold" not in record else float(record["gallery_threshold"])

  def embed(self, images: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """float32 [N, D] embeddings of uint8 images [N, H, W, C] of exactly `image_shape`, any N.

    Batches of `batch_size`; a last, smaller batch is padded to the next power of two (rows are
    independent), so a server compiles the function for a few batch sizes only.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise UserError(f"{self.path}: takes uint8 images [N, {', '.join(map(str, self.image_shape))}]; got "
                      f"{images.dtype} {list(images.shape)}. Decode, resize and (where spec['preprocessing'] "
                      "says invert) invert image files first.")
    if batch_size < 1:
      raise UserError(f"batch_size={batch_size}: expected a positive number of images per call.")
    embeddings = np.empty((len(images), self.embedding_dim), np.float32)
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      count = len(batch)
      size = min(batch_size, 1 << (count - 1).bit_length())
      if size > count:
        batch = np.concatenate([batch, np.zeros((size - count, *self.image_shape), np.uint8)])
      embeddings[start:start + count] = np.asarray(self._call(batch))[:count]
    return embeddings


def load_artifact(path: str | os.PathLike) -> ServedModel:
  """Reads an artifact written by `write_artifact` (`--mode=export_model`) and checks it can run here.

  A missing, truncated or corrupt file, a zip that is not an artifact, another format version, or
  platforms without this process's backend raise `UserError` naming the file.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"{path}: not found; write a served model with `python launch.py --mode=export_model "
                    "--workdir=...`.")
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if SPEC_MEMBER not in names:
        raise UserError(f"{path}: not a siamese_jax served model (no {SPEC_MEMBER} in the zip).")
      spec = json.loads(archive.read(SPEC_MEMBER))
      _check_spec(path, spec)
      if spec["function"] not in names:
        raise UserError(f"{path}: its {spec['function']} is missing; export the model again.")
      serialized = archive.read(spec["function"])
  except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError) as error:
    raise UserError(f"{path}: not a readable served model ({type(error).__name__}: {error}); the file is "
                    "truncated, damaged or not an artifact of --mode=export_model.") from error
  if hashlib.sha256(serialized).hexdigest() != spec.get("sha256", {}).get(spec["function"]):
    raise UserError(f"{path}: {spec['function']} does not match its checksum in {SPEC_MEMBER}; the file is "
                    "damaged: export the model again.")
  try:
    exported = export.deserialize(bytearray(serialized))
  except Exception as error:  # noqa: BLE001 -- whatever the flatbuffer parser raises, the file is at fault
    raise UserError(f"{path}: cannot deserialize its exported function ({type(error).__name__}: {error}); "
                    f"exported with jax {spec.get('jax_version')}, this is jax {jax.__version__}.") from error
  platform = export.default_export_platform()
  if platform not in exported.platforms:
    raise UserError(f"{path}: exported for {', '.join(exported.platforms)}, but this process runs on {platform}; "
                    f"export it with --platforms={','.join((*exported.platforms, platform))}, or run on "
                    f"{exported.platforms[0]} (JAX_PLATFORMS={exported.platforms[0]}).")
  return ServedModel(path=path, spec=spec, exported=exported)


def _check_spec(path: pathlib.Path, spec: Any) -> None:
  if not isinstance(spec, dict) or spec.get("format") != FORMAT:
    found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
    raise UserError(f"{path}: not a siamese_jax served model ({SPEC_MEMBER} format {found!r}, expected {FORMAT!r}).")
  if spec.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path}: served model format version {spec.get('format_version')!r}; this siamese_jax reads "
                    f"version {FORMAT_VERSION}: export the model again with this version.")
  missing = [key for key in ("function", "input", "output", "preprocessing") if key not in spec]
  if missing:
    raise UserError(f"{path}: {SPEC_MEMBER} lacks {missing}; export the model again.")
