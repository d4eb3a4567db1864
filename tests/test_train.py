"""End to end on real Omniglot through launch.py: train, SIGKILL, resume, evaluate.

The resumed run must end with exactly the parameters of a run that was never interrupted: batches,
augmentation and initialisation are pure functions of (seed, step), and a checkpoint holds the train
state, the Grain iterator position and the loop's bookkeeping.
"""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import checkpoint_arrays, kill_at_checkpoint
from siamese_jax import training
from siamese_jax.errors import UserError
from siamese_jax.training import LoopState, collapse_warning
from test_multiprocess import make_config
from siamese_jax.writers import MetricWriter, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 60


def launch_command(workdir, cache_dir, *extra):
  return [sys.executable, str(REPO / "launch.py"), "--config=configs/omniglot.py:smoke", f"--workdir={workdir}",
          f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=10",
          "--config.train.eval_every=30", "--config.train.log_every=10", f"--config.data.cache_dir={cache_dir}",
          *extra]


def environment(omniglot_dir):
  env = dict(os.environ, OMNIGLOT_DIR=str(omniglot_dir))
  env.pop("XLA_FLAGS", None)  # launch.py sets the CPU flag itself; one device, like a user's run
  return env


def final_params(workdir: pathlib.Path, step: int):
  return checkpoint_arrays(workdir / "checkpoints" / str(step) / "state")["params"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("decoded")


@pytest.fixture(scope="module")
def straight(omniglot_dir, tmp_path_factory, cache_dir):
  """A run that was never interrupted: the reference for every interrupted one."""
  workdir = tmp_path_factory.mktemp("straight")
  done = subprocess.run(launch_command(workdir, cache_dir), cwd=REPO, env=environment(omniglot_dir),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_sigkill_then_resume_equals_uninterrupted(omniglot_dir, tmp_path, cache_dir, straight):
  env = environment(omniglot_dir)
  interrupted = tmp_path / "interrupted"

  kill_at_checkpoint(launch_command(interrupted, cache_dir), interrupted / "checkpoints" / "10", env)
  assert not (interrupted / "results.json").exists(), "the run finished before it was killed"

  resumed = subprocess.run(launch_command(interrupted, cache_dir), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in resumed.stdout
  resumed_from = int(resumed.stdout.split("Resuming from the checkpoint at step ")[1].split()[0])
  assert 10 <= resumed_from < NUM_STEPS

  expected, actual = final_params(straight, NUM_STEPS), final_params(interrupted, NUM_STEPS)
  assert len(jax.tree.leaves(expected)) > 0  # the comparison below is over real arrays, not an empty tree
  jax.tree.map(np.testing.assert_array_equal, actual, expected)

  # Both runs evaluated the same final model on the evaluation alphabets and Lake's runs.
  for workdir in (straight, interrupted):
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == NUM_STEPS
    assert len(results["lake_runs"]["per_run"]) == 20
    assert 0.0 <= results["episodes"]["within"]["5way1shot"]["mean"] <= 1.0
  straight_results = json.loads((straight / "results.json").read_text())
  interrupted_results = json.loads((interrupted / "results.json").read_text())
  assert straight_results["lake_runs"] == interrupted_results["lake_runs"]
  # Sixty steps are enough to learn something: 5-way one-shot chance is 20 %.
  assert straight_results["episodes"]["unstructured"]["5way1shot"]["mean"] > 0.4


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(omniglot_dir, tmp_path, cache_dir, straight):
  """Preemption: SIGTERM finishes the step, saves, exits 0; the next start resumes and ends identical."""
  env = environment(omniglot_dir)
  process = subprocess.Popen(launch_command(tmp_path, cache_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  deadline = time.monotonic() + 300
  while not (tmp_path / "metrics.jsonl").exists():  # the first metrics line: training is under way
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  stdout, _ = process.communicate(timeout=300)
  assert process.returncode == 0
  assert "Stopped by SIGTERM at step" in stdout
  stopped_at = int(stdout.split("Stopped by SIGTERM at step ")[1].split(";")[0])
  assert stopped_at < NUM_STEPS, "the signal came after training ended"
  assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
  assert not (tmp_path / "results.json").exists()

  resumed = subprocess.run(launch_command(tmp_path, cache_dir), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {stopped_at}" in resumed.stdout
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path, NUM_STEPS), final_params(straight, NUM_STEPS))


@pytest.mark.slow
def test_finished_workdir_is_not_retrained(omniglot_dir, tmp_path, cache_dir):
  """Running a finished run's command again re-evaluates the final checkpoint, it does not train; a
  changed config resumes its checkpoints with a warning that names each changed field, or, if they
  cannot hold its state, stops with "config mismatch" and leaves the workdir as it was."""
  env = environment(omniglot_dir)
  first = subprocess.run(launch_command(tmp_path, cache_dir, "--config.train.num_steps=10"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  again = subprocess.run(launch_command(tmp_path, cache_dir, "--config.train.num_steps=10"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from the checkpoint at step 10" in again.stdout
  assert "written by another config" not in again.stderr  # the same config: nothing to warn about
  assert json.loads((tmp_path / "results.json").read_text())["step"] == 10
  # A changed config resumes the same checkpoints (training longer is legitimate), and says what changed.
  longer = subprocess.run(launch_command(tmp_path, cache_dir, "--config.train.num_steps=12"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "Resuming from the checkpoint at step 10" in longer.stdout
  assert "written by another config" in longer.stderr and "train.num_steps: 10 -> 12" in longer.stderr
  assert json.loads((tmp_path / "results.json").read_text())["step"] == 12
  # A config whose state the checkpoints cannot fill (another width) is refused by name, and the
  # workdir's record of the config that wrote them is kept.
  narrower = subprocess.run(launch_command(tmp_path, cache_dir, "--config.train.num_steps=12",
                                           "--config.model.width=32"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
  assert narrower.returncode == 2, narrower.stderr[-3000:]
  assert "error: config mismatch" in narrower.stderr and "model.width: 64 -> 32" in narrower.stderr
  assert "Traceback" not in narrower.stderr
  assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 64
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [10, 12]


def test_collapse_warning_flags_the_measured_collapse_and_not_a_learning_run():
  """The thresholds against the distance logs of runs recorded in docs/ablations.md (margin 0.2): a
  batch-hard run whose distances collapse far below the margin and a slower collapse (both distances
  falling) warn; a semi-hard run that learns (distances growing past the margin) does not, nor does a
  margin-free loss."""

  def log(positive, negative):
    return {"loss": 0.2, "mean_positive_distance": positive, "mean_negative_distance": negative}

  warning = collapse_warning(log(0.0013, 0.0007), log(0.0011, 0.0005), 0.2)
  assert warning is not None and "collapsing" in warning and "semi_hard" in warning and "0.0005" in warning
  assert collapse_warning(log(0.021, 0.018), log(0.019, 0.015), 0.2) is not None
  assert collapse_warning(log(0.3914, 0.4006), log(0.6012, 0.6539), 0.2) is None  # learning
  # Small but growing (a run that starts inside its margin and separates) is not a collapse, nor is a
  # negative distance above a tenth of the margin, nor the first log (nothing to compare with).
  assert collapse_warning(log(0.010, 0.012), log(0.011, 0.015), 0.2) is None
  assert collapse_warning(log(0.019, 0.030), log(0.019, 0.025), 0.2) is None
  assert collapse_warning(None, log(0.0011, 0.0005), 0.2) is None
  # Losses without a margin (prototype, Koch BCE) or without distance metrics are never flagged.
  assert collapse_warning(log(0.0013, 0.0007), log(0.0011, 0.0005), None) is None
  assert collapse_warning({"loss": 1.0}, {"loss": 0.9}, 0.2) is None


@pytest.mark.slow
def test_batch_hard_collapse_is_warned_about_in_the_training_log(omniglot_dir, tmp_path, cache_dir):
  """On real Omniglot, batch-hard mining from initialisation collapses the smoke triplet run (as it does
  the full config, docs/ablations.md): by step 120 both mean distances are near 0.01 against a
  margin of 0.2. The trainer says so once, naming the fix, and still finishes the run."""
  command = [sys.executable, str(REPO / "launch.py"), "--config=configs/ablations/omniglot_triplet.py:smoke",
             f"--workdir={tmp_path}", "--config.loss.mining=batch_hard", "--config.train.num_steps=120",
             f"--config.data.cache_dir={cache_dir}"]
  done = subprocess.run(command, cwd=REPO, env=environment(omniglot_dir), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr.count("the embeddings are collapsing onto one point") == 1, done.stderr[-3000:]
  assert "loss.mining=semi_hard" in done.stderr
  last = [m for m in read_metrics(tmp_path) if "train/mean_negative_distance" in m][-1]
  assert last["step"] == 120 and last["train/mean_negative_distance"] < 0.02  # a tenth of the margin


def test_loop_state_saves_the_early_stopping_record_and_stops_after_patience():
  """What a checkpoint's `loop` item holds (its keys are the checkpoint format), and early stopping."""
  loop = LoopState(step=7)
  assert loop.checkpointed() == {"best_validation_accuracy": -1.0, "evaluations_without_improvement": 0,
                                 "early_stopped": False}
  for accuracy, without_improvement in ((0.5, 0), (0.7, 0), (0.7, 1)):  # equal is no improvement
    loop.record_validation(accuracy, patience=2)
    assert (loop.best_validation_accuracy, loop.evaluations_without_improvement) == (accuracy, without_improvement)
    assert not loop.early_stopped
  loop.record_validation(0.6, patience=2)
  assert loop.checkpointed() == {"best_validation_accuracy": 0.7, "evaluations_without_improvement": 2,
                                 "early_stopped": True}
  # A resume restores the record; the rest (step, pending metrics, clocks) belongs to each launch.
  resumed = LoopState.from_checkpoint(loop.checkpointed())
  assert resumed.checkpointed() == loop.checkpointed() and resumed.step == 0 and resumed.pending_metrics == []
  never = LoopState()
  for _ in range(5):
    never.record_validation(0.1, patience=0)
  assert not never.early_stopped and never.evaluations_without_improvement == 4


# --------------------------------------------------------------------------------------------------
# metrics.jsonl after a kill during an append


def write_killed_log(workdir: pathlib.Path) -> None:
  """Two complete records, then the first bytes of a third, as a kill during `MetricWriter.write` leaves."""
  complete = [{"step": 2, "train/loss": 1.5}, {"step": 4, "validation/accuracy": 0.25}]
  third = json.dumps({"step": 4, "train/loss": 1.25})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in complete) + third[:17])


def test_read_metrics_skips_a_truncated_last_line_with_a_warning(tmp_path, caplog):
  write_killed_log(tmp_path)
  with caplog.at_level(logging.WARNING):
    records = read_metrics(tmp_path)
  assert records == [{"step": 2, "train/loss": 1.5}, {"step": 4, "validation/accuracy": 0.25}]
  assert "skipped line 3, which is not complete JSON" in caplog.text and '{"step": 4, "trai' in caplog.text


def test_resumed_writer_never_glues_a_record_onto_a_truncated_line(tmp_path, caplog):
  """The resumed run's writer cuts the fragment off (its step is logged again), then appends whole lines."""
  write_killed_log(tmp_path)
  with caplog.at_level(logging.WARNING):
    writer = MetricWriter(tmp_path)
  assert "dropped an incomplete last line" in caplog.text
  writer.write(4, {"loss": 1.25}, prefix="train")
  writer.close()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    records = read_metrics(tmp_path)
  assert records == [{"step": 2, "train/loss": 1.5}, {"step": 4, "validation/accuracy": 0.25},
                     {"step": 4, "train/loss": 1.25}]
  assert caplog.text == ""
  # A complete log is left as it is.
  before = (tmp_path / "metrics.jsonl").read_bytes()
  MetricWriter(tmp_path).close()
  assert (tmp_path / "metrics.jsonl").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# The Keras training options resume exactly


def test_keras_options_resume_exactly(tmp_path, monkeypatch):
  """RMSprop with inverse-time decay and reduce-on-plateau, dropout, flips and nearest fill, on the smoke
  config (synthetic data, for CI's time: the options act on the step, not on the data): a run stopped by a
  preemption at step 9 and resumed from its checkpoint, as after a kill, ends with the uninterrupted run's
  parameters, batch statistics and optimizer state (the plateau's record included), bit for bit. Both
  runs in this process, so on the same XLA:CPU arithmetic."""
  config = make_config({
      "data.source": "synthetic", "eval.lake_runs": False, "parallel.num_devices": 1,
      "train.num_steps": 16, "train.eval_every": 2, "train.checkpoint_every": 4, "train.log_every": 4,
      "model.width": 16, "model.embedding_dim": 32, "model.dropout": 0.3,
      "augment.flip_probability": 0.5, "augment.fill": "nearest",
      "optim.name": "rmsprop", "optim.learning_rate": 3e-3, "optim.schedule": "inverse_time",
      "optim.decay_rate": 1.0, "optim.decay_steps": 8, "optim.plateau_patience": 1, "optim.plateau_factor": 0.5})
  straight = training.train_and_evaluate(config, tmp_path / "straight")

  agree_to_stop = training.agree_to_stop
  monkeypatch.setattr(training, "agree_to_stop",
                      lambda step, every, *requests: (step == 9, *agree_to_stop(step, every, *requests)[1:]))
  assert training.train_and_evaluate(config, tmp_path / "resumed") == {"step": 9, "preempted": True}
  monkeypatch.setattr(training, "agree_to_stop", agree_to_stop)
  resumed = training.train_and_evaluate(config, tmp_path / "resumed")

  states = [ocp.StandardCheckpointer().restore((tmp_path / run / "checkpoints" / "16" / "state").absolute())
            for run in ("straight", "resumed")]
  assert len(jax.tree.leaves(states[0])) > 10
  jax.tree.map(np.testing.assert_array_equal, states[1], states[0])
  assert resumed["episodes"] == straight["episodes"]
  assert resumed["best_validation_accuracy"] == straight["best_validation_accuracy"]
  # The plateau acted (so its state had something to carry across the restart): 8 validations with
  # patience 1 reduced the scale at least once.
  logged = {run: [line["validation/lr_scale"] for line in read_metrics(tmp_path / run) if "validation/lr_scale" in line]
            for run in ("straight", "resumed")}
  assert len(logged["straight"]) == 8 and logged["straight"][-1] < 1.0
  assert logged["resumed"] == logged["straight"]


def test_plateau_without_validation_is_a_user_error():
  config = make_config({"optim.plateau_patience": 2, "train.eval_every": 0})
  with_validation = types.SimpleNamespace(validation=object())
  with pytest.raises(UserError, match=r"optim.plateau_patience=2 .*never validates .*train.eval_every > 0"):
    training.check_plateau(config, with_validation)
  config.train.eval_every = 5
  training.check_plateau(config, with_validation)  # validates: fine
  with pytest.raises(UserError, match="never validates"):
    training.check_plateau(config, types.SimpleNamespace(validation=None))
  config.optim.plateau_patience = 0
  training.check_plateau(config, types.SimpleNamespace(validation=None))  # off: nothing to watch
