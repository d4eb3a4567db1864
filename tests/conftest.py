"""Test session setup: 4 fake CPU devices, the fast XLA CPU path, and where real Omniglot lives."""

import os
import pathlib
import signal
import subprocess
import time

# Must happen before JAX initialises its backend (first JAX op), so it lives at import time here.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_omniglot_dir() -> pathlib.Path | None:
  """OMNIGLOT_DIR if set, else ../shared/data/omniglot beside the checkout (CI layout)."""
  candidates = [os.environ.get("OMNIGLOT_DIR"), REPO.parent / "shared" / "data" / "omniglot"]
  for candidate in candidates:
    if candidate and (pathlib.Path(candidate) / "images_background.zip").exists():
      return pathlib.Path(candidate)
  return None


@pytest.fixture(scope="session")
def omniglot_dir() -> pathlib.Path:
  path = find_omniglot_dir()
  if path is None:
    if os.environ.get("CI"):
      pytest.fail("Omniglot not found: set OMNIGLOT_DIR or put it at ../shared/data/omniglot")
    pytest.skip("Omniglot not found (set OMNIGLOT_DIR)")
  return path


def checkpoint_arrays(state_dir: pathlib.Path) -> dict:
  """A checkpoint's `state` item as numpy arrays, whatever devices saved it: a run launched in a subprocess
  splits the CPU into its own device count (parallel.py), which Orbax's default restore would need here too."""
  import numpy as np
  import orbax.checkpoint as ocp

  state_dir = pathlib.Path(state_dir).absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def kill_at_checkpoint(command: list[str], checkpoint: pathlib.Path, env: dict, timeout: float = 300) -> None:
  """Starts `command` (a training run) and kills it with SIGKILL as soon as `checkpoint` is complete:
  Orbax renames its temporary directory to the step number only when the save has finished."""
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout
  while not checkpoint.exists():
    assert process.poll() is None, "training ended before the checkpoint"
    assert time.monotonic() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL


def write_keras_h5(path, tensors: dict, weightless: tuple[str, ...] = ()):
  """A Keras weights .h5 as Keras writes it: one group per layer (`weightless` layers first, empty), each
  weight under "<layer>/<name>:0" and listed in the group's attributes; `tensors` is {"<layer>/<name>": array}."""
  import h5py
  import numpy as np
  by_layer: dict[str, dict] = {layer: {} for layer in weightless}
  for name, array in tensors.items():
    layer, weight = name.split("/")
    by_layer.setdefault(layer, {})[weight] = array
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([layer.encode() for layer in by_layer])
    for layer, weights in by_layer.items():
      group = f.create_group(layer)
      group.attrs["weight_names"] = np.array([f"{layer}/{w}:0".encode() for w in weights])
      for w, array in weights.items():
        group.create_dataset(f"{layer}/{w}:0", data=array)
  return path
