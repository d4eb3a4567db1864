"""Data parallelism over a 1-D device mesh with axis "data": `shard_map` (default) or `pmap`.

Both strategies run the same per-device function, written with collectives over `AXIS`:
parameters are replicated, the batch is split along its first axis, and the step itself all-gathers
embeddings (so in-batch losses see the global batch) and sums gradients. One device is simply a mesh
of size one, so there is a single code path for 1, N devices and N processes.

`shard_map` keeps the state as ordinary replicated `jax.Array`s; `pmap` keeps it stacked with a
leading device axis. `DataParallel` hides that difference: `put_state`/`get_state` convert between
the canonical (unstacked) train state and the strategy's layout, `put_batch` assembles the global
batch from this process's rows.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from siamese_jax.errors import UserError

AXIS = "data"
STRATEGIES = ("shard_map", "pmap")
# On CPU one XLA device leaves cores idle in the conv4 step: XLA:CPU runs the programs of several devices side
# by side, and the same global batch trains faster split over 2-8 of them (benchmarks/run.py's `scaling`
# table). So a training run on CPU with `parallel.num_devices=0` splits the CPU into up to this many devices.
DEFAULT_CPU_DEVICES = 8


def default_cpu_devices(global_batch_size: int) -> int:
  """The largest divisor of the global batch up to DEFAULT_CPU_DEVICES: the default never makes a batch
  indivisible."""
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    return 1  # the sampler reports the bad batch size
  return max(n for n in range(1, DEFAULT_CPU_DEVICES + 1) if global_batch_size % n == 0)


def request_cpu_devices(count: int) -> bool:
  """Asks JAX to start its CPU backend with `count` devices; True where that took effect.

  Only possible before JAX starts its backends (the first computation or `jax.devices()`), and left alone
  where the user chose a count (`jax_num_cpu_devices`, $JAX_NUM_CPU_DEVICES or XLA's
  --xla_force_host_platform_device_count) or joined a multi-process run (each process keeps its devices).
  Harmless on GPU/TPU hosts: only the CPU backend's devices change.
  """
  from jax._src import xla_bridge  # noqa: PLC0415 - JAX offers no public "have the backends started?"

  if (not isinstance(count, int) or count < 1 or xla_bridge.backends_are_initialized()
      or jax.distributed.is_initialized()
      or jax.config.jax_num_cpu_devices >= 0
      or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
    return False
  jax.config.update("jax_num_cpu_devices", count)
  return True


class DataParallel:
  """Wraps a per-device step for one strategy; holds the mesh and the layouts."""

  def __init__(self, strategy: str = "shard_map", num_devices: int | None = None):
    if strategy not in STRATEGIES:
      raise UserError(f"parallel.strategy='{strategy}' is not one of {STRATEGIES}.")
    if num_devices is not None and (isinstance(num_devices, bool) or not isinstance(num_devices, int)
                                    or num_devices < 0):
      raise UserError(f"parallel.num_devices={num_devices!r}: expected 0 (every device; on CPU, the default "
                      "split) or a positive number of devices.")
    devices = jax.devices()
    if num_devices:
      if num_devices > len(devices):
        raise UserError(f"parallel.num_devices={num_devices} but only {len(devices)} devices exist.")
      devices = devices[:num_devices]
    self.strategy = strategy
    self.devices = devices
    # Auto axis types: shard_map inside jit then accepts inputs laid out by device_put (with the explicit
    # axis types that jax.make_mesh defaults to, it wants inputs already sharded its way).
    self.mesh = jax.sharding.Mesh(np.array(devices), (AXIS,),
                                  axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def check_batch_size(self, global_batch_size: int, what: str = "sampling.batch_size") -> None:
    if global_batch_size % self.num_devices:
      raise UserError(f"{what}={global_batch_size} is not divisible by the number of devices "
                      f"({self.num_devices}); choose a multiple of {self.num_devices}.")

  def wrap_step(self, per_device_step: Callable, donate: bool = True) -> Callable:
    """(state, batch) -> (state, metrics), compiled for this strategy, with the state donated."""
    donate_argnums = (0,) if donate else ()
    if self.strategy == "pmap":
      return jax.pmap(per_device_step, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums)
    # check_vma=False gives pmap's semantics: gradients of replicated parameters stay per-device, and the
    # step sums them itself (with vma checking on, JAX would already sum them and the psum would double).
    mapped = jax.shard_map(per_device_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)

  def put_state(self, state: Any) -> Any:
    """The canonical train state (identical in every process) -> the strategy's layout on the mesh.

    Each process places its own copy on its own devices; nothing crosses processes. (`device_put` onto
    the global mesh would try to send a restored, device-committed array to other hosts' devices.)
    """
    if self.strategy == "pmap":
      # pmap wants one copy per device along a leading axis; each process provides its local copies.
      num_local = len(self.local_devices)
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              self.batch_sharding, np.broadcast_to(np.asarray(x), (num_local,) + np.shape(x))), state)
    return jax.tree.map(self._replicate, state)

  def _replicate(self, x) -> jax.Array:
    copies = [jax.device_put(x, device) for device in self.local_devices]
    return jax.make_array_from_single_device_arrays(np.shape(x), self.replicated, copies)

  def get_state(self, state: Any) -> Any:
    """The canonical train state (no device axis, replicated over the mesh), e.g. to checkpoint.

    With pmap the stacked state is global: in a multi-process run `x[0]` would be a computation over
    devices of other processes. Each process instead re-labels its own copies (one per local device) as
    the shards of a replicated array, which needs no communication and copies nothing between devices.
    """
    if self.strategy == "pmap":
      return jax.tree.map(self._unstack, state)
    return state

  def _unstack(self, stacked: jax.Array) -> jax.Array:
    shape = stacked.shape[1:]
    copies = [shard.data.reshape(shape) for shard in stacked.addressable_shards]
    return jax.make_array_from_single_device_arrays(shape, self.replicated, copies)

  def local_copy(self, tree: Any) -> Any:
    """One copy of a replicated (canonical) pytree on this process's first device.

    Evaluation and export embed with it: every process holds the whole model, so each can embed on its
    own without a program spanning all processes; only process 0 reports the result.
    """
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> the global batch laid out for the step."""
    if self.strategy == "pmap":
      num_local = len(self.local_devices)
      local_batch = jax.tree.map(lambda x: x.reshape((num_local, -1) + x.shape[1:]), local_batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local_batch)

  def unreplicate_metrics(self, metrics: Any) -> Any:
    """Metrics are identical on every device: this process's first copy, without the pmap device axis.

    Taken from a local device so that fetching them never waits on another process.
    """
    if self.strategy == "pmap":
      return jax.tree.map(lambda x: x.addressable_data(0)[0], metrics)
    return jax.tree.map(lambda x: x.addressable_data(0), metrics)
