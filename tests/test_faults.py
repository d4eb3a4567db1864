"""Faults that must never lose work: kill -9 at any moment, non-finite numbers, a full or read-only disk.

Real processes where the fault is a process's death or the kernel's refusal to write (the worker is
tests/test_multiprocess.py, run as one process on one CPU device); in this process where the fault can be
injected into the step (a NaN loss at a chosen step).
"""

import json
import pathlib
import random
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import checkpoint, training
from siamese_jax.writers import read_metrics
from test_multiprocess import (OVERRIDES, REPO, largest_difference, make_config, read_state, worker_command,
                               worker_environment)

NUM_STEPS = 16
# Adam with warm-up and a cosine schedule: a resume must restore the optimizer's moments and count too.
KILL_OVERRIDES = {"train.num_steps": NUM_STEPS, "train.checkpoint_every": 4, "train.log_every": 2,
                  "train.eval_every": 8, "parallel.num_devices": 1, "optim.name": "adam",
                  "optim.learning_rate": 1e-3, "optim.schedule": "cosine", "optim.warmup_steps": 2}


def worker(workdir, *flags: str, overrides: dict = KILL_OVERRIDES) -> list[str]:
  sets = [f"--set={key}={value}" for key, value in overrides.items() if key != "parallel.num_devices"]
  return worker_command(workdir, "--devices=1", *sets, *flags)


def run_worker(workdir, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(worker(workdir, *flags), cwd=REPO, env=worker_environment(), capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference run, in a worker like the interrupted ones: XLA:CPU's arithmetic on one device differs
  in the last bits between a process that has one CPU device and one that has four (this one)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  done = run_worker(workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def read_final(workdir):
  return read_state(workdir, KILL_OVERRIDES)


def assert_same_run(workdir, reference):
  got, expected = read_final(workdir), read_final(reference)
  assert int(got.step) == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, got.params, expected.params)
  jax.tree.map(np.testing.assert_array_equal, got.model_state, expected.model_state)
  jax.tree.map(np.testing.assert_array_equal, got.opt_state, expected.opt_state)
  results, expected_results = (json.loads((w / "results.json").read_text()) for w in (workdir, reference))
  assert results["episodes"] == expected_results["episodes"]
  assert results["best_validation_accuracy"] == expected_results["best_validation_accuracy"]


# --------------------------------------------------------------------------------------------------
# kill -9


def metrics_lines(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_repeated_kill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
  """Killed five times (twice while a checkpoint is being written), then left to finish."""
  rng = random.Random(20240605)
  kills = 0

  # 1. While step 4's checkpoint is being written (the save is asynchronous: the call has returned and a
  #    background thread is writing when the process kills itself).
  done = run_worker(tmp_path, "--die_while_saving_step=4")
  assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
  kills += 1
  # What it left: a half-written temporary directory, never taken for a checkpoint (in the rare case
  # that the writer thread finished first, a complete step 4).
  left = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
  assert left in (["4.orbax-checkpoint-tmp"], ["4"]), left

  # 2-4. At random moments: once some time after the start (startup, restore, compilation or training),
  #      twice at a random moment after training has visibly progressed (steps, saves, validation).
  for attempt in range(3):
    before = metrics_lines(tmp_path)
    process = subprocess.Popen(worker(tmp_path), cwd=REPO, env=worker_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if attempt == 0:
      time.sleep(rng.uniform(1.0, 6.0))
    else:
      deadline = time.monotonic() + 120
      while metrics_lines(tmp_path) <= before and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    kills += process.returncode == -signal.SIGKILL

  # 5. While step 12's checkpoint is being written.
  done = run_worker(tmp_path, "--die_while_saving_step=12")
  kills += done.returncode == -signal.SIGKILL
  assert kills >= 4, "the run finished before it could be killed often enough"

  done = run_worker(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_run(tmp_path, uninterrupted)


# --------------------------------------------------------------------------------------------------
# Non-finite loss or gradient


def poison_step(monkeypatch, bad_step: int) -> None:
  """Makes the loss (and so every gradient) NaN in the update that produces step `bad_step`."""
  original = training.train_step

  def poisoned(state, batch, *, loss_fn, **kwargs):
    def loss_with_nan(*inputs, **options):
      loss, metrics = loss_fn(*inputs, **options)
      return loss * jnp.where(state.step + 1 == bad_step, jnp.nan, 1.0), metrics
    return original(state, batch, loss_fn=loss_with_nan, **kwargs)

  monkeypatch.setattr(training, "train_step", poisoned)


def nonfinite_config(**overrides):
  settings = {"train.num_steps": 8, "train.log_every": 4, "train.checkpoint_every": 3, "train.eval_every": 0,
              "train.max_checkpoints": 10}
  return make_config({**OVERRIDES, **settings, **overrides})


@pytest.mark.parametrize("bad_step", [5, 6], ids=["between_saves", "at_a_save"])
def test_nonfinite_loss_stops_with_its_step_and_is_never_saved(tmp_path, monkeypatch, bad_step):
  poison_step(monkeypatch, bad_step)
  fetches = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda tree: fetches.append(1) or device_get(tree))
  # No per-step host sync: any implicit device-to-host copy in the loop would raise here, and the
  # explicit fetches happen only at log and checkpoint steps (3, 4, then 6, where the NaN is seen).
  with jax.transfer_guard_device_to_host("disallow"):
    with pytest.raises(FloatingPointError, match=f"non-finite loss or gradient at step {bad_step} "):
      training.train_and_evaluate(nonfinite_config(), tmp_path)
  assert len(fetches) == 3
  assert checkpoint.complete_steps(tmp_path / "checkpoints") == [3]
  saved = read_state(tmp_path, {"train.max_checkpoints": 10})
  assert int(saved.step) == 3
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved))


def test_skip_nonfinite_updates_leaves_the_state_unchanged(tmp_path, monkeypatch, caplog):
  poison_step(monkeypatch, 5)
  config = nonfinite_config(**{"train.skip_nonfinite_updates": True, "train.checkpoint_every": 1})
  results = training.train_and_evaluate(config, tmp_path)
  assert results["step"] == 8
  assert "Skipped 1 update(s) with a non-finite loss or gradient, at step(s) 5" in caplog.text
  states = {step: read_state(tmp_path, {"train.max_checkpoints": 10}, step=step) for step in (4, 5, 6)}
  for part in ("params", "model_state", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(states[5], part), getattr(states[4], part))
  assert largest_difference(states[6].params, states[5].params) > 1e-4  # training went on
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(states[6]))
  logged = read_metrics(tmp_path)
  assert [line["train/skipped_updates"] for line in logged if "train/skipped_updates" in line] == \
      [0, 0, 0, 0, 1, 0, 0, 0]


# --------------------------------------------------------------------------------------------------
# Full and read-only disks, on a real (tiny) tmpfs in a private mount namespace


def can_mount_tmpfs() -> bool:
  if shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          "mount -t tmpfs -o size=1m tmpfs /mnt || mount -t tmpfs -o size=1m tmpfs /tmp"],
                         capture_output=True, timeout=30)
  return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and user namespaces to mount a tmpfs")
def test_full_and_read_only_disk_keep_the_last_checkpoint(tmp_path, uninterrupted):
  """The workdir lives on a 16 MB tmpfs in a private mount namespace. Made read-only, then limited in file
  size, then filled up: each run stops with one clear error line, and the checkpoint already there stays
  intact; once there is room again, the run resumes and ends exactly like an undisturbed one."""
  mount, copies = tmp_path / "disk", tmp_path / "copies"
  mount.mkdir()
  copies.mkdir()
  workdir = mount / "run"
  command = " ".join(f"'{part}'" for part in worker(workdir))

  def run(name: str, flags: str = "", limit: str = "") -> str:
    # The output goes through `cat`, outside the subshell whose file size limit it would exceed.
    return f"({limit} exec {command} {flags}) 2>&1 | cat > {copies}/{name}.log; echo ${{PIPESTATUS[0]}} > {copies}/{name}.rc"

  script = "\n".join([
      "set -u",
      f"mount -t tmpfs -o size=16m tmpfs {mount}",
      run("preempted", "--signal_at_step=5"),
      f"mount -o remount,ro {mount}",
      run("read_only"),
      f"mount -o remount,rw {mount}",
      # RLIMIT_FSIZE: the kernel refuses to grow any file past 8 KiB, also under TensorStore's C++ writes.
      run("file_too_large", limit="ulimit -f 8;"),
      f"cp -a {workdir} {copies}/file_too_large",
      f"dd if=/dev/zero of={mount}/filler bs=64k 2> /dev/null; dd if=/dev/zero of={mount}/filler2 bs=512 2> /dev/null",
      run("full"),
      f"cp -a {workdir} {copies}/full",
      f"rm {mount}/filler {mount}/filler2",
      run("room_again"),
      f"cp -a {workdir} {copies}/room_again",
  ])
  subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script], cwd=REPO,
                 env=worker_environment(), timeout=600, check=True)

  def outcome(name: str) -> tuple[int, str, str]:
    log = (copies / f"{name}.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    return int((copies / f"{name}.rc").read_text()), log, errors[-1] if errors else ""

  intact = "The checkpoints already there are intact (newest: step 6)"
  # 1. SIGTERM after step 5, seen after step 6: the checkpoint to protect.
  returncode, log, _ = outcome("preempted")
  assert returncode == 0 and "Stopped by SIGTERM at step 6" in log, log[-3000:]

  # 2. Read-only: fails at its first write (config.json), naming the workdir and the OS's reason.
  returncode, log, error = outcome("read_only")
  assert returncode == 2, log[-3000:]
  assert error.startswith(f"error: cannot write to the workdir {workdir}: Read-only file system") and \
      intact in error, log[-3000:]
  assert "Traceback" not in log, log[-3000:]

  # 3. Files limited to 8 KiB: step 8's checkpoint fails inside Orbax's TensorStore writes.
  returncode, log, error = outcome("file_too_large")
  assert returncode == 2, log[-3000:]
  assert "Resuming from the checkpoint at step 6" in log
  assert "File too large" in error and intact in error, log[-3000:]
  # TensorStore's writes still in flight when the save failed report nothing (checkpoint.py's hook).
  assert "Traceback" not in log, log[-3000:]
  assert any(path.name.startswith("8.orbax-checkpoint-tmp")
             for path in (copies / "file_too_large" / "checkpoints").iterdir())
  assert checkpoint.complete_steps(copies / "file_too_large" / "checkpoints")[-1] == 6

  # 4. Full: the check before step 8's save finds no room; nothing of step 8 is written.
  returncode, log, error = outcome("full")
  assert returncode == 2, log[-3000:]
  assert "No space left on device for checkpoint step 8" in error and intact in error, log[-3000:]
  assert "Traceback" not in log
  assert checkpoint.complete_steps(copies / "full" / "checkpoints")[-1] == 6
  assert not any(path.name.startswith("8") for path in (copies / "full" / "checkpoints").iterdir())
  assert int(read_state(copies / "full", KILL_OVERRIDES).step) == 6

  # 5. Room again: resumes from step 6 and ends exactly like the run that was never disturbed.
  returncode, log, _ = outcome("room_again")
  assert returncode == 0, log[-3000:]
  assert "Resuming from the checkpoint at step 6" in log
  assert_same_run(copies / "room_again", uninterrupted)
