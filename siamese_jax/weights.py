"""Pretrained weights from a file, as a flat {tensor name: numpy array}, without the framework that wrote it.

`model.pretrained=PATH` must work with no network and without torch or TensorFlow installed, so each
format is read here from its bytes:

  safetensors      what the Hugging Face hub serves for timm models (the `safetensors` package, numpy API);
  PyTorch .pth/.pt state dicts, both the zip format (torch >= 1.6) and the legacy pickle sequence, read by a
                   restricted unpickler that knows only tensors, storages and OrderedDict: a weights file
                   cannot run code, and any other object in it is refused;
  Keras .h5        the applications weights files (VGG16, ResNet50) the Keras tools downloaded (`h5py`).

The format is told by the file's first bytes, not its suffix (`.pt`, `.bin` and `.pth` are used for all
three kinds). `read_weights` returns the arrays in the file's order; `match_weights` checks them against what
a backbone expects and names what does not fit in one line. Converting names and layouts to a backbone's
parameters is the backbone's business, not this module's.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from siamese_jax.errors import UserError

FORMATS = "safetensors, a PyTorch .pth/.pt state dict (zip or legacy format) or a Keras applications .h5"

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# torch.save's legacy format starts with this number pickled (protocol 2: PROTO 2, LONG1 of 10 bytes).
_LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> element type. Storages numpy cannot hold (complex halves, quantized) are
# refused by name.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


def read_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """{tensor name: array} from a safetensors, PyTorch or Keras .h5 weights file.

  Any file that cannot be read as the format its first bytes announce, or that announces none of them,
  stops with one UserError naming the file and the formats expected: a half-downloaded file must not
  surface as a traceback from deep inside a parser.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"weights file {path} does not exist (expected {FORMATS})")
  with open(path, "rb") as f:
    head = f.read(1024)
  reader = _reader_for(head)
  if reader is None:
    raise UserError(f"weights file {path} is not in a known format (expected {FORMATS})")
  name, read = reader
  try:
    weights = read(path)
  except UserError:
    raise
  except Exception as e:  # any parser failure means the same to the user: this file is damaged
    raise UserError(f"weights file {path} looks like {name} but cannot be read ({type(e).__name__}: {e}); "
                    f"expected an intact file: {FORMATS}") from e
  if not weights:
    raise UserError(f"weights file {path} ({name}) holds no tensors")
  return weights


def match_weights(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, np.ndarray],
                  source: str = "the weights file") -> None:
  """Stops with one line when `found` does not fit `expected` {name: shape}.

  The line gives the count and the first name of each kind of misfit (missing, unexpected, mis-shaped), which
  is what tells a wrong architecture (everything unexpected) from a wrong variant (a few shapes off).
  """
  missing = [name for name in expected if name not in found]
  unexpected = [name for name in found if name not in expected]
  misshaped = [name for name in expected if name in found and tuple(np.shape(found[name])) != tuple(expected[name])]
  if not (missing or unexpected or misshaped):
    return
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing (first: {missing[0]!r})")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
  if misshaped:
    name = misshaped[0]
    parts.append(f"{len(misshaped)} mis-shaped (first: {name!r} is {tuple(np.shape(found[name]))}, "
                 f"expected {tuple(expected[name])})")
  raise UserError(f"{source} does not fit the backbone: {', '.join(parts)}")


def _reader_for(head: bytes) -> tuple[str, Callable[[pathlib.Path], dict[str, np.ndarray]]] | None:
  """(format name, reader) for a file starting with `head`, or None."""
  if head.startswith(_ZIP_MAGIC):
    return "a PyTorch zip state dict", _read_torch_zip
  if head.startswith(_LEGACY_MAGIC):
    return "a PyTorch legacy state dict", _read_torch_legacy
  if head.startswith(_HDF5_MAGIC) or head[512:520] == _HDF5_MAGIC:  # HDF5 may follow a 512-byte user block
    return "a Keras .h5", _read_keras_h5
  if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
    header_length = struct.unpack("<Q", head[:8])[0]
    if 2 <= header_length <= 100_000_000:
      return "safetensors", _read_safetensors
  return None


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors through the package's numpy API (lazy import: only needed for this format)."""
  from safetensors.numpy import load_file
  return dict(load_file(str(path)))


def _read_keras_h5(path: pathlib.Path) -> dict[str, np.ndarray]:
  """{"<layer>/<weight>": array} from a Keras weights file (`save_weights`, or a whole `model.save`).

  Keras stores weight names as "<layer>/<weight>:0"; the key drops the ":0" and does not repeat the layer
  ("block1_conv1/kernel"), so it reads the same whether or not the file named weights with their layer.
  """
  import h5py  # lazy: only needed for this format
  weights = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise UserError(f"weights file {path} is HDF5 but not Keras weights (no layer_names attribute); "
                      f"expected {FORMATS}")
    for layer in _h5_names(root.attrs["layer_names"]):
      group = root[layer]
      for weight in _h5_names(group.attrs.get("weight_names", [])):
        short = weight.removeprefix(f"{layer}/").removesuffix(":0")
        weights[f"{layer}/{short}"] = np.asarray(group[weight])
  return weights


def _h5_names(values: Any) -> list[str]:
  """An HDF5 attribute of names (bytes or str) as a list of str."""
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]


class _StorageType:
  """Stands for a torch `<Dtype>Storage` class in the pickle: only its element type matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A torch storage: `numel` elements of `dtype`, its bytes read once the pickle is loaded (the legacy
  format puts them after the object pickle). A legacy view storage points at its root with an offset."""

  def __init__(self, dtype: np.dtype, numel: int, root: _Storage | None = None, offset: int = 0):
    self.dtype, self.numel, self.root, self.offset = dtype, numel, root, offset
    self.data: np.ndarray | None = None

  def array(self) -> np.ndarray:
    """The storage's elements as a flat array."""
    if self.root is not None:
      return self.root.array()[self.offset:self.offset + self.numel]
    if self.data is None:
      raise ValueError("a storage's data is missing from the file")
    return self.data


class _Tensor:
  """A tensor as `torch._utils._rebuild_tensor_v2` describes it, built into an array once the storages
  hold their data."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def array(self) -> np.ndarray:
    """An owned, contiguous copy of the strided view, after checking it stays inside its storage."""
    flat = self.storage.array()
    if len(self.size) != len(self.stride) or self.offset < 0 or any(s < 0 for s in self.size + self.stride):
      raise ValueError(f"tensor of size {self.size} with stride {self.stride} is not valid")
    if 0 not in self.size:
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if last >= flat.size:
        raise ValueError(f"tensor of size {self.size} at offset {self.offset} runs past its storage of "
                         f"{flat.size} elements")
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                           strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
    return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *unused: Any) -> _Tensor:
  """torch._utils._rebuild_tensor(_v2): requires_grad, backward hooks and metadata do not matter here."""
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: _Tensor, *unused: Any) -> _Tensor:
  """torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict with stand-ins for torch's classes, refusing every other global (so a
  weights file cannot run code). `load_storage(persistent id)` turns a storage reference into a `_Storage`."""

  def __init__(self, file: io.BufferedIOBase, path: pathlib.Path, load_storage: Callable[[tuple], _Storage]):
    super().__init__(file)
    self.path, self.load_storage = path, load_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UserError(f"weights file {self.path} holds a {module}.{name} object, which is not part of a state dict of "
                    f"tensors this reader knows (storages: {', '.join(_STORAGE_DTYPES)})")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise ValueError(f"unknown persistent id {pid!r}")
    return self.load_storage(pid)


def _read_torch_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
  """torch >= 1.6: a zip with `<root>/data.pkl` (storage ids ('storage', type, key, location, numel)) and each
  storage's raw bytes in `<root>/data/<key>`, in the byte order `<root>/byteorder` gives (little if absent)."""
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
    if not pickles:
      raise UserError(f"weights file {path} is a zip but not a PyTorch state dict (no <root>/data.pkl); "
                      f"expected {FORMATS}")
    root = pickles[0].rpartition("/")[0]
    names = set(archive.namelist())
    byteorder = archive.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in names else "little"
    big_endian = byteorder == "big"
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      _, storage_type, key, _location, numel = pid[:5]
      if key not in storages:
        storage = _Storage(storage_type.dtype, int(numel))
        data = archive.read(f"{root}/data/{key}")
        if big_endian and storage.dtype.itemsize > 1:
          storage.data = np.frombuffer(data, dtype=storage.dtype.newbyteorder(">")).astype(storage.dtype)
        else:
          storage.data = np.frombuffer(data, dtype=storage.dtype)
        storages[key] = storage
      return storages[key]

    obj = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), path, load_storage).load()
  return _state_dict(obj, path)


def _read_torch_legacy(path: pathlib.Path) -> dict[str, np.ndarray]:
  """torch < 1.6: pickles one after another: the magic number, the protocol version (1001), a sys info dict,
  the object (storage ids ('storage', type, root key, location, numel, view metadata)), the list of storage
  keys, then per key an int64 little-endian element count and the raw bytes."""
  with open(path, "rb") as f:
    header = _TorchUnpickler(f, path, _no_storage)
    if header.load() != _LEGACY_MAGIC_NUMBER:
      raise ValueError("the magic number is wrong")
    if (version := header.load()) != _LEGACY_PROTOCOL_VERSION:
      raise UserError(f"weights file {path} is a PyTorch legacy file of protocol {version}, not "
                      f"{_LEGACY_PROTOCOL_VERSION}; save it again with a newer torch")
    sys_info = header.load()
    if not sys_info.get("little_endian", True):
      raise UserError(f"weights file {path} was written on a big-endian machine; this reader takes "
                      f"little-endian files")
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      _, storage_type, key, _location, numel, view = pid
      if key not in storages:
        storages[key] = _Storage(storage_type.dtype, int(numel))
      if view is None:
        return storages[key]
      _view_key, offset, view_size = view
      return _Storage(storage_type.dtype, int(view_size), root=storages[key], offset=int(offset))

    obj = _TorchUnpickler(f, path, load_storage).load()
    keys = _TorchUnpickler(f, path, _no_storage).load()
    for key in keys:
      storage = storages[key]
      count = struct.unpack("<q", f.read(8))[0]
      nbytes = count * storage.dtype.itemsize
      data = f.read(nbytes)
      if count < storage.numel or len(data) != nbytes:
        raise ValueError(f"storage {key} is cut short")
      storage.data = np.frombuffer(data, dtype=storage.dtype)
  return _state_dict(obj, path)


def _no_storage(pid: tuple) -> _Storage:
  raise ValueError(f"a storage reference {pid!r} outside the object pickle")


def _state_dict(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of an unpickled state dict, unwrapped from {"state_dict": ...} and without the "module."
  prefix `nn.DataParallel` adds to every name; entries that are not tensors (an epoch, a config) are left."""
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise UserError(f"weights file {path} holds a {type(obj).__name__}, not a state dict {{name: tensor}}")
  tensors = {str(name): value for name, value in obj.items() if isinstance(value, _Tensor)}
  if tensors and all(name.startswith("module.") for name in tensors):
    tensors = {name.removeprefix("module."): value for name, value in tensors.items()}
  return {name: value.array() for name, value in tensors.items()}
