"""Two real processes on 127.0.0.1 (gloo collectives, 2 CPU devices each) train as one 4-device run.

Checked: the same parameters as one process with the same global batch; a preempted two-process run
resumes from its checkpoint and ends exactly where an uninterrupted one does; only process 0 writes logs;
and when one process dies the other exits with a clear error within a bounded time instead of hanging.

This file is also the worker those tests start (`python tests/test_multiprocess.py --process_id=...`):
`distributed.initialize(...)`, then `training.train_and_evaluate(config, workdir)` on the synthetic smoke
config, with hooks that make a process signal or kill itself at a given step. tests/test_faults.py
starts it too, as a single process.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8

# Two processes sum gradients and BatchNorm statistics with gloo, in another order than one process's
# all-reduce: the results differ in the last float32 bit. The smoke model at full width turns such bits
# into visible differences within a few steps (max-pool ties on synthetic images flip; Adam turns noise
# in near-zero gradients into full steps; one device vs four differ the same way), so the comparison runs
# a narrow model with plain SGD, where they stay near 1e-7 while the weights move by 1e-2.
OVERRIDES = {
    "data.source": "synthetic", "eval.lake_runs": False, "model.width": 8, "train.num_steps": NUM_STEPS,
    "train.log_every": 2, "train.checkpoint_every": 4, "train.eval_every": 4,
    "optim.name": "sgd", "optim.learning_rate": 0.01, "optim.momentum": 0.0, "optim.schedule": "constant",
    "optim.warmup_steps": 0,
}


def make_config(overrides: dict):
  from siamese_jax.configs import omniglot
  config = omniglot.get_config("smoke")
  for key, value in overrides.items():
    *path, field = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[field] = value
  return config


# --------------------------------------------------------------------------------------------------
# The worker process


def worker_main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--devices", type=int, default=2, help="CPU devices of this process")
  parser.add_argument("--set", action="append", default=[], help="config override key=value")
  parser.add_argument("--signal_at_step", type=int, default=0,
                      help="SIGTERM to itself after this step (the loop sees it after the next one)")
  parser.add_argument("--die_at_step", type=int, default=0, help="SIGKILL to itself after this step")
  parser.add_argument("--die_while_saving_step", type=int, default=0,
                      help="SIGKILL to itself while this step's checkpoint is being written")
  args = parser.parse_args(argv)

  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  sys.path.insert(0, str(REPO))
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  from siamese_jax import checkpoint, distributed, training
  from siamese_jax.errors import UserError

  if args.num_processes > 1:
    distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                           heartbeat_timeout_seconds=distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS)
  overrides = dict(OVERRIDES)
  for item in args.set:
    key, value = item.split("=", 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  config = make_config(overrides)

  agree_to_stop = training.agree_to_stop

  def agree_to_stop_with_faults(step, every, *requests):  # called once per step, after the step
    if step == args.signal_at_step:
      os.kill(os.getpid(), signal.SIGTERM)
    if step == args.die_at_step:
      print(f"process {args.process_id}: SIGKILL at step {step}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return agree_to_stop(step, every, *requests)

  training.agree_to_stop = agree_to_stop_with_faults
  save = checkpoint.Checkpointer.save

  def save_then_die(self, step, *args_, **kwargs):
    save(self, step, *args_, **kwargs)  # asynchronous: the files are being written now
    if step == args.die_while_saving_step:
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.Checkpointer.save = save_then_die
  try:
    results = training.train_and_evaluate(config, args.workdir)
  except distributed.PeerFailure as error:
    distributed.exit_after_peer_failure(error)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
  print("RESULTS " + json.dumps({"step": results["step"], "preempted": results.get("preempted", False)}),
        flush=True)


if __name__ == "__main__":
  worker_main(sys.argv[1:])
  sys.exit(0)


# --------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_faults.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def worker_command(workdir, *extra: str) -> list[str]:
  return [sys.executable, str(pathlib.Path(__file__).resolve()), f"--workdir={workdir}", *extra]


def worker_environment() -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # the worker sets the fast CPU path itself, like launch.py
  return env


def start_processes(workdir, num_processes: int = 2, *, extra=(), per_process=None) -> list[subprocess.Popen]:
  """Starts the run's processes; `per_process[i]` adds flags to process i only."""
  port = free_port()
  processes = []
  for process_id in range(num_processes):
    flags = [f"--process_id={process_id}", f"--num_processes={num_processes}", f"--port={port}", *extra,
             *((per_process or {}).get(process_id, ()))]
    processes.append(subprocess.Popen(worker_command(workdir, *flags), cwd=REPO, env=worker_environment(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return processes


def finish(processes, timeout: float = 150) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each process; kills them all if they outlive `timeout`."""
  deadline = time.monotonic() + timeout
  outputs = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      stdout, stderr = process.communicate()
      pytest.fail(f"process hung past {timeout} s; stderr tail:\n{stderr[-3000:]}")
    outputs.append((process.returncode, stdout, stderr))
  return outputs


def read_state(workdir, overrides: dict | None = None, step: int | None = None):
  """The train state of the newest (or given) checkpoint, restored the way a resume restores it."""
  from siamese_jax import checkpoint, training
  config = make_config(dict(OVERRIDES, **(overrides or {})))
  checkpointer = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", asynchronous=False)
  try:
    abstract = checkpoint.abstract_like(training.setup(config).state)
    if step is None:
      restored = checkpointer.restore_latest(abstract)
      assert restored is not None, f"no checkpoint in {workdir}"
      return jax.device_get(restored[1])
    import orbax.checkpoint as ocp
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return jax.device_get(restored["state"])
  finally:
    checkpointer.close()


def largest_difference(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()), a, b)))


# --------------------------------------------------------------------------------------------------
# Tests

from siamese_jax import distributed  # noqa: E402
from siamese_jax.errors import UserError  # noqa: E402
from siamese_jax.writers import read_metrics  # noqa: E402

# How long the coordination service waits for a silent process in these tests: the product's default.
# When a worker dies, process 0's next collective fails and says so in one line; where that collective
# first sets up its gloo connections it can wait up to gloo's 30 s for the dead peer before it fails. The
# heartbeat timeout must clearly outlast that, or JAX's heartbeat abort (a C++ stack trace) can come first.
HEARTBEAT_SECONDS = distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS


@pytest.fixture
def no_distributed_environment(monkeypatch):
  for name in (distributed.COORDINATOR_ADDRESS_ENV, distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV,
               distributed.HEARTBEAT_TIMEOUT_ENV):
    monkeypatch.delenv(name, raising=False)


def test_initialize_without_a_cluster_is_one_process(no_distributed_environment):
  # JAX is already in use in this process, as in a notebook: with nothing to join that is no error.
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  assert jax.process_count() == 1


@pytest.mark.parametrize("arguments, environment, message", [
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, {},
     r"process_id=2 must be in \[0, num_processes=2\)"),
    ({"coordinator_address": "10.0.0.1", "num_processes": 2, "process_id": 0}, {}, "must be host:port"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, {}, "missing: process_id"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"num_processes": 1, "process_id": 1}, {}, "the only process has id 0"),
], ids=["process_id", "address", "missing", "environment", "one_process"])
def test_initialize_names_what_is_wrong(no_distributed_environment, monkeypatch, arguments, environment,
                                        message):
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(UserError, match=message):
    distributed.initialize(**arguments)


def test_initialize_without_a_coordinator_fails_in_bounded_time(no_distributed_environment):
  started = time.monotonic()
  with pytest.raises(UserError, match="process 1 found no coordinator at 127.0.0.1:.* within 1 s"):
    distributed.initialize(f"127.0.0.1:{free_port()}", 2, 1, initialization_timeout_seconds=1)
  assert time.monotonic() - started < 10



@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: one process, 4 devices (conftest), the same global batch; trained in this process."""
  from siamese_jax import training
  workdir = tmp_path_factory.mktemp("one_process")
  training.train_and_evaluate(make_config(OVERRIDES), workdir)
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two_processes")
  outputs = finish(start_processes(workdir))
  for returncode, _, stderr in outputs:
    assert returncode == 0, stderr[-3000:]
  return workdir, outputs


def test_two_processes_train_like_one(one_process, two_processes):
  workdir, outputs = two_processes
  expected, actual = read_state(one_process), read_state(workdir)
  assert int(actual.step) == NUM_STEPS
  initial = read_state(one_process, step=4)
  # The parameters moved far more than the tolerance, and both runs moved them the same way.
  assert largest_difference(expected.params, initial.params) > 5e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), actual.params,
               expected.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), actual.model_state,
               expected.model_state)

  # Only process 0 writes logs and results, and each step is logged once.
  logged_steps = [record["step"] for record in read_metrics(workdir) if "train/loss" in record]
  assert logged_steps == [2, 4, 6, 8]
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == NUM_STEPS
  # Each process keeps its 2 devices (no default CPU split in a multi-process run): one 4-device mesh.
  assert results["devices"] == {"count": 4, "kind": "cpu", "strategy": "shard_map", "processes": 2}
  (_, stdout0, stderr0), (_, stdout1, stderr1) = outputs
  assert "train:" in stderr0 and "train:" not in stderr1  # the progress bar


@pytest.mark.slow  # shard_map's two-process runs stay in CI; pmap's on demand, for the suite's 15 minutes
def test_two_processes_with_pmap(one_process, tmp_path):
  """pmap keeps a stacked state; checkpoints and evaluation must use each process's own copies."""
  outputs = finish(start_processes(tmp_path, extra=["--set=parallel.strategy=pmap"]))
  for returncode, _, stderr in outputs:
    assert returncode == 0, stderr[-3000:]
  actual, expected = read_state(tmp_path), read_state(one_process)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), actual.params,
               expected.params)
  assert json.loads((tmp_path / "results.json").read_text())["step"] == NUM_STEPS


def test_two_processes_resume_after_preemption(tmp_path, two_processes):
  """SIGTERM reaches process 1 only, during step 4: both agree to stop at step 4, save, and exit 0."""
  outputs = finish(start_processes(tmp_path, per_process={1: ["--signal_at_step=3"]}))
  for returncode, _, stderr in outputs:
    assert returncode == 0, stderr[-3000:]
  stdout0 = outputs[0][1]
  assert "Stopped by a signal to another process at step 4" in stdout0, stdout0[-2000:]
  assert '"preempted": true' in stdout0 and '"preempted": true' in outputs[1][1]
  assert (tmp_path / "checkpoints" / "4").is_dir() and not (tmp_path / "results.json").exists()

  outputs = finish(start_processes(tmp_path))
  for returncode, _, stderr in outputs:
    assert returncode == 0, stderr[-3000:]
  assert "Resuming from the checkpoint at step 4" in outputs[0][1]
  assert "Resuming" not in outputs[1][1]  # only process 0 prints
  # Exactly the parameters of the run that was never stopped: same processes, same arithmetic.
  uninterrupted, resumed = read_state(two_processes[0]), read_state(tmp_path)
  assert int(resumed.step) == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed.params, uninterrupted.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, uninterrupted.opt_state)


# The coordinator's death in CI; the worker's on demand: for the suite's 15 minutes, and because under load
# JAX's coordination service may abort the coordinator (heartbeat timeout) before its collective reports
# the lost peer, which this test cannot tell from a hang.
@pytest.mark.parametrize("dead", [pytest.param(1, marks=pytest.mark.slow), 0], ids=["worker_dies", "coordinator_dies"])
def test_survivor_exits_when_a_process_dies(tmp_path, dead):
  """kill -9 of one process in mid-training: the other must not wait forever in a collective."""
  survivor = 1 - dead
  processes = start_processes(tmp_path, per_process={dead: ["--die_at_step=3"]})
  processes[dead].wait(timeout=150)
  assert processes[dead].returncode == -signal.SIGKILL
  died = time.monotonic()
  returncode, _, stderr = finish([processes[survivor]], timeout=HEARTBEAT_SECONDS + 50)[0]
  waited = time.monotonic() - died
  assert returncode != 0
  assert waited < HEARTBEAT_SECONDS + 30, f"took {waited:.0f} s to notice"
  if dead == 1:
    # Process 0 finds out in its next collective and says so in one line.
    assert returncode == 3 and "lost contact with another process of this run" in stderr, stderr[-3000:]
  else:
    # Process 1 loses the coordination service, which lives in process 0: JAX's C++ client aborts it at once,
    # before Python sees any error (docs/scaling.md says why nothing can change that), or, should one of its
    # collectives fail first, it says so in the one line.
    assert (returncode == -signal.SIGABRT and "another task died" in stderr) or \
        (returncode == 3 and "lost contact with another process of this run" in stderr), stderr[-3000:]
