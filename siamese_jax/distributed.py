"""Joining a multi-process run (several hosts, or one process per GPU) through `jax.distributed`.

Call `initialize(...)` once, before any JAX computation. Where the three values come from, first match wins:
  1. the arguments (launch.py's --coordinator_address / --num_processes / --process_id flags);
  2. the environment: JAX_COORDINATOR_ADDRESS (JAX's own variable), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. JAX's cluster detection (SLURM under srun, Cloud TPU pods, Kubernetes with the `kubernetes`
     package, Open MPI), when none of them is given;
  4. otherwise this is a plain single-process run and nothing happens.

Every process then sees all devices of all processes (`jax.devices()`) and its own
(`jax.local_devices()`); parallel.py builds its mesh over all of them, the data pipeline feeds each process
its own rows, and only process 0 writes logs (the checkpoint is written by all, through Orbax).

A process that dies (OOM, kill -9, a lost host) must not leave the others blocked forever in a collective:
JAX's coordination service declares a process dead when its heartbeats stop for `heartbeat_timeout_seconds`,
and then terminates the survivors with an error that says so. The default here (60 s) is shorter than JAX's
(100 s), long enough for a slow step or a garbage-collection pause, and longer than gloo's 30 s wait for a
peer when a collective first connects, so that the survivor's own collective can fail first and
`peer_failure` turn that into one line (a heartbeat abort is a C++ stack trace).

That one line is for the death of any process but process 0. The coordination service runs inside
process 0, and when it goes, JAX's C++ client in every other process aborts at once (SIGABRT, its own
"another task died" message and a stack trace) before any Python code can see an error; jaxlib offers no
setting that changes this (docs/scaling.md says exactly why). The checkpoints are as safe either way.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

import jax
import orbax.checkpoint as ocp

from siamese_jax.errors import UserError

COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
HEARTBEAT_TIMEOUT_ENV = "JAX_HEARTBEAT_TIMEOUT_SECONDS"

DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60
DEFAULT_INITIALIZATION_TIMEOUT_SECONDS = 300  # all processes must have started within this time


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_seconds: int | None = None,
               initialization_timeout_seconds: int = DEFAULT_INITIALIZATION_TIMEOUT_SECONDS) -> bool:
  """Joins the multi-process run described by the arguments, the environment or the cluster.

  Returns True when this process is now one of several (or of a detected cluster), False for a plain
  single-process run. Mistakes (a process id out of range, a coordinator that never answers) raise
  UserError naming the flag or variable. Calling it again is harmless.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ADDRESS_ENV) or None
  num_processes = _integer("num_processes", num_processes, NUM_PROCESSES_ENV)
  process_id = _integer("process_id", process_id, PROCESS_ID_ENV)
  heartbeat_timeout_seconds = _integer("heartbeat_timeout_seconds", heartbeat_timeout_seconds,
                                       HEARTBEAT_TIMEOUT_ENV) or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
  explicit = any(value is not None for value in (coordinator_address, num_processes, process_id))
  missing = [name for name, value in (("coordinator_address", coordinator_address),
                                      ("num_processes", num_processes), ("process_id", process_id))
             if value is None]
  if explicit:
    _check_explicit(coordinator_address, num_processes, process_id)
    if num_processes == 1:
      return False
    if missing and not _cluster_detected():
      raise _missing_error(missing)
  elif not _cluster_detected():
    return False
  if coordinator_address is not None and process_id not in (None, 0):
    _wait_for_coordinator(coordinator_address, process_id, initialization_timeout_seconds)
  # Collectives between processes on CPU (tests on one machine, CPU clusters) go through gloo over TCP;
  # GPUs and TPUs use their own (NCCL, ICI). Harmless when the CPU is not used for computation.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout_seconds,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError as error:  # the cluster supplied less than JAX needs
    raise _missing_error(missing, error) from error
  except RuntimeError as error:
    if "must be called before" not in str(error):
      raise _join_error(error, coordinator_address, process_id, initialization_timeout_seconds) from error
    raise UserError("distributed.initialize() must run before anything uses JAX devices (launch.py calls it "
                    "first); in a notebook, restart the kernel and call it in the first cell.") from error
  except Exception as error:  # noqa: BLE001 - the runtime reports an unreachable coordinator as a bare XLA error
    raise _join_error(error, coordinator_address, process_id, initialization_timeout_seconds) from error
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _missing_error(missing: list[str], error: Exception | None = None) -> UserError:
  return UserError(f"a multi-process run needs coordinator_address, num_processes and process_id on every "
                   f"process (flags, or {COORDINATOR_ADDRESS_ENV} / {NUM_PROCESSES_ENV} / {PROCESS_ID_ENV}), "
                   f"unless a cluster (SLURM, TPU pod) supplies them; missing: {', '.join(missing) or 'none'}"
                   + (f" ({error})." if error else "."))


def _join_error(error, coordinator_address, process_id, timeout_seconds) -> UserError:
  where = coordinator_address or "the address found by JAX's cluster detection"
  return UserError(f"process {process_id if process_id is not None else '?'} could not join the run "
                   f"coordinated at {where} within {timeout_seconds} s: {error}. Check that process 0 is "
                   "running, that the address is reachable from this host, and that every process got the "
                   "same num_processes.")


def _wait_for_coordinator(address: str, process_id: int, timeout_seconds: float) -> None:
  """Waits until process 0's coordination service accepts connections, or raises UserError.

  JAX would also wait, but then end the process with a fatal log that blames "another task" dying.
  """
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise UserError(f"process {process_id} found no coordinator at {address} within {timeout_seconds:g} s "
                        f"({error.strerror or error}). Start process 0 with the same coordinator_address (it "
                        "listens there), and check that this host can reach that address and port.") from None
      time.sleep(0.5)


def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection recognises this environment (SLURM under srun, TPU pod, MPI...).

  Asked through JAX's cluster registry (not public API) so that a plain run never calls
  `jax.distributed.initialize()`, which would refuse to run once JAX is in use (a notebook) even though
  there is nothing to join. If that registry ever moves, JAX is simply asked to try.
  """
  try:
    from jax._src import clusters
    environments = [env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
  except (ImportError, AttributeError):
    return True
  return any(env.is_env_present() for env in environments)


def _integer(name: str, value, env_name: str) -> int | None:
  if value is None:
    value = os.environ.get(env_name) or None
    name = env_name
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{name}={value!r} is not an integer.") from None


def _check_explicit(coordinator_address, num_processes, process_id) -> None:
  """Checks what was given before anything starts; JAX's cluster detection may fill in the rest."""
  if num_processes is not None and num_processes < 1:
    raise UserError(f"num_processes={num_processes} must be at least 1.")
  if num_processes == 1:
    if process_id not in (None, 0):
      raise UserError(f"process_id={process_id} with num_processes=1: the only process has id 0.")
    return
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise UserError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
  if coordinator_address is not None and not coordinator_address.rpartition(":")[2].isdigit():
    raise UserError(f"coordinator_address={coordinator_address!r} must be host:port, e.g. 10.0.0.1:1234 "
                    "(the host of process 0 and a free port on it).")


class PeerFailure(RuntimeError):
  """Another process of the run died or became unreachable, so this one cannot go on.

  The JAX runtime cannot recover from a lost process: end this one too (`exit_after_peer_failure`), then
  start all processes again; they resume from the last complete checkpoint.
  """


# Words in the runtime's errors when a collective or a coordination-service call lost another process
# (gloo's TCP pairs, the coordination service's barriers and heartbeats).
_PEER_FAILURE_MARKERS = ("Gloo", "gloo", "Connection reset", "Connection closed", "Connection refused",
                         "heartbeat", "Barrier", "barrier", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                         "coordination service", "CoordinationService")


def peer_failure(error: BaseException) -> PeerFailure | None:
  """A PeerFailure explaining `error` if it is a lost connection to another process, else None.

  Only in multi-process runs: a single process has no peers, and its errors stay as they are.
  """
  if jax.process_count() == 1 or isinstance(error, PeerFailure):
    return None
  cause, seen = error, set()
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    text = f"{type(cause).__name__}: {cause}"
    if any(marker in text for marker in _PEER_FAILURE_MARKERS):
      first_line = text.strip().splitlines()[0][:500]
      return PeerFailure(
          f"process {jax.process_index()} of {jax.process_count()} lost contact with another process of "
          f"this run, which probably died (see its log): {first_line}. Start all processes again; they "
          "resume from the last complete checkpoint.")
    cause = cause.__cause__ or cause.__context__
  return None


def exit_after_peer_failure(error: BaseException, exit_code: int = 3) -> None:
  """Prints `error` and ends this process at once.

  A normal exit would run JAX's shutdown, whose barrier waits for the dead process until the heartbeat
  timeout and then aborts with a stack trace that buries the message.
  """
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(exit_code)


def wait_for_all(name: str, timeout_seconds: float = DEFAULT_INITIALIZATION_TIMEOUT_SECONDS) -> None:
  """Blocks until every process has reached `name`: a barrier of the coordination service, no collective.

  XLA's gloo gives the processes 30 s to meet when it sets up a group for a first collective; loading and
  decoding data can take each host longer than that apart. Waiting here after such uneven work keeps the
  first collectives (Orbax's own barriers, the first step) close together.
  """
  if jax.process_count() == 1:
    return
  ocp.multihost.get_barrier_sync_fn()(key=f"siamese_jax_{name}", timeout_ms=int(timeout_seconds * 1000))


def is_main_process() -> bool:
  """Process 0 prints, writes logs and results; every process trains and writes its part of checkpoints."""
  return jax.process_index() == 0
