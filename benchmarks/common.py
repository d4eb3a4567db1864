"""Timing, machine identity and XLA cost/memory figures shared by the benchmark cases.

Every measurement follows one pattern: run the work `warmup` times (compilation, caches, worker
start-up), then time `repeats` repetitions of it, each ending in `block_until_ready`, and report the
median with the spread (min, max and (max - min) / median). Nothing here asserts on a time: benchmarks
are not tests.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Timing:
  """Seconds per unit of work (one step, one batch, one call) over the timed repetitions."""

  seconds: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  def as_dict(self, prefix: str = "seconds") -> dict[str, Any]:
    median = self.median
    return {f"{prefix}_median": median, f"{prefix}_min": min(self.seconds),
            f"{prefix}_max": max(self.seconds),
            "spread": (max(self.seconds) - min(self.seconds)) / median if median > 0 else 0.0,
            "repeats": len(self.seconds)}


def time_repeated(work: Callable[[], Any], *, warmup: int, repeats: int, units_per_call: int = 1) -> Timing:
  """Calls `work()` `warmup` times untimed, then `repeats` times timed; blocks on what it returns.

  `units_per_call`: how many units (steps, batches) one call performs; the timing is per unit, so a
  repetition of several steps amortises Python dispatch the way a training loop does.
  """
  for _ in range(warmup):
    jax.block_until_ready(work())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(work())
    seconds.append((time.perf_counter() - start) / units_per_call)
  return Timing(seconds)


# ----------------------------------------------------------------------------------------------------
# The machine


def cpu_count() -> int:
  """Cores this process may run on (the affinity mask), which is what XLA:CPU's thread pool gets."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_name() -> str:
  """`cpu-2core` on a CPU host; `gpu-<device kind>-x<count>` / `tpu-...` on accelerators."""
  backend = jax.default_backend()
  if backend == "cpu":
    return f"cpu-{cpu_count()}core"
  devices = jax.devices()
  return f"{backend}-{_slug(devices[0].device_kind)}-x{len(devices)}"


def machine_info() -> dict[str, Any]:
  devices = jax.devices()
  return {
      "machine": machine_name(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "cpu_count": cpu_count(),
      "cpu_model": _cpu_model(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "matmul_precision": str(jax.config.jax_default_matmul_precision),
  }


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as file:
      for line in file:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def matmul_peak(size: int, *, warmup: int, repeats: int) -> dict[str, Any]:
  """fp32 [size, size] @ [size, size] through XLA: the machine's practical matmul peak (GFLOP/s).

  The median over repetitions is the figure every `pct_of_peak` divides by; the best is kept too.
  """
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  timing = time_repeated(lambda: dot(a, b), warmup=warmup, repeats=repeats)
  flops = 2.0 * size**3
  return {"size": size, "dtype": "float32", "flops": flops,
          "gflops_median": flops / timing.median / 1e9,
          "gflops_best": flops / min(timing.seconds) / 1e9, **timing.as_dict()}


# ----------------------------------------------------------------------------------------------------
# What XLA says about a compiled program


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call from XLA's cost analysis (per device for an SPMD program), or None if absent."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def compiled_memory(compiled) -> dict[str, Any]:
  """Buffer sizes XLA assigned to the program; `xla_peak_bytes` = arguments + outputs + temporaries
  - aliased (donated) bytes, an upper bound on what one call holds live on the device."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:
    return {}
  if analysis is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  memory = {name: int(getattr(analysis, name, 0) or 0) for name in fields}
  memory["xla_peak_bytes"] = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                              + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"])
  return memory


def device_peak_bytes() -> int | None:
  """The allocator's high-water mark on device 0 (GPU/TPU); None on CPU, which has no such counter."""
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", 0)) or None


def process_max_rss_mb() -> float:
  """Peak resident memory of this process so far (MB): host RAM, which is device memory on CPU."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
  """Resident memory of this process now (MB), from /proc (Linux); 0 where it cannot be read."""
  return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
  """Peak resident memory of this process's own address space (MB, /proc's VmHWM; 0 where unreadable).

  Unlike `process_max_rss_mb` (getrusage), which a child started by subprocess inherits from its parent
  across exec (the kernel keeps the larger of the two), this is the child's alone.
  """
  return _proc_status_mb("VmHWM")


def _proc_status_mb(field: str) -> float:
  try:
    with open("/proc/self/status") as file:
      for line in file:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0  # kB
  except (OSError, ValueError, IndexError):
    pass
  return 0.0
