"""Orbax checkpoints holding everything needed for an exact resume.

One Orbax step = one directory `<workdir>/checkpoints/<step>` with three items saved together:
  state  the train state (step, params, batch statistics, optimizer state)
  data   the Grain iterator state after the last batch consumed by that step
  loop   the loop's own bookkeeping (best validation accuracy, early-stopping patience)
Saves are asynchronous (training continues while the files are written) and atomic: Orbax writes into
a temporary directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoints untouched and the partial one is never taken for a finished one.

Kept: the last `max_to_keep` steps plus the best one by validation accuracy (also across restarts:
the accuracy is stored in the step's directory).

Every rule about checkpoints on disk lives here: which steps are complete (`complete_steps`), which one
is best (`select_checkpoint`, by `BEST_METRIC`), restoring for a resume (`Checkpointer.restore_latest`)
and restoring a model's variables alone for evaluation (`restore_variables`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from siamese_jax.errors import UserError
from siamese_jax.workdir import CHECKPOINTS_DIRNAME

BEST_METRIC = "validation_accuracy"  # saved with a step's metrics; "best" checkpoints are chosen by it
CHECKPOINT_CHOICES = ("best", "latest")

# Room asked for besides the arrays when checking for free space: Orbax's metadata, the JSON items.
_METADATA_BYTES = 1 << 20

# Appended to an unreadable step's directory name when a resume falls back past it; Orbax only takes
# all-digit names for steps, so the renamed directory is kept for inspection but never read again.
UNREADABLE_SUFFIX = ".unreadable"


def _best_metric(metrics: dict) -> float:
  return metrics[BEST_METRIC]


class _DropMissingMetricsWarning(logging.Filter):
  """Orbax warns on every save without metrics once `best_fn` is set; most of our saves have none
  (validation runs less often than checkpoints, or never), so the warning says nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Requested `tracked_metric`")


class _DropDiskErrorTracebacks(logging.Filter):
  """Orbax's writer threads log each failed write of a full or read-only disk with a full traceback; the
  same error then reaches the training loop, which reports it once, in one line (`disk_errors`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.exc_info and record.exc_info[1] is not None:
      return disk_problem(record.exc_info[1]) is None
    return _DISK_MESSAGES.search(record.getMessage()) is None


logging.getLogger("absl").addFilter(_DropMissingMetricsWarning())
for _logger in ("absl", "asyncio"):  # asyncio: "exception was never retrieved" for the same failed writes
  logging.getLogger(_logger).addFilter(_DropDiskErrorTracebacks())


def _without_closed_loop_callbacks(unraisablehook):
  """`sys.unraisablehook`, quiet for one message: when a save fails, Orbax closes the event loop of its
  writer thread while TensorStore's other writes of that save are still running; each one that finishes
  then hands its result to the closed loop (`call_soon_threadsafe`, called from TensorStore's C++ thread),
  and TensorStore reports the RuntimeError as unraisable, a bare traceback on stderr. The failure itself
  reaches the training loop, which reports it once (`disk_errors`); everything else goes to
  `unraisablehook` unchanged."""

  def hook(unraisable):
    traceback = unraisable.exc_traceback
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed" and \
        traceback is not None and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return  # raised straight into C++ by the closed loop, not by Python code
    unraisablehook(unraisable)

  hook.siamese_jax_quiet_closed_loop = True
  return hook


if not getattr(sys.unraisablehook, "siamese_jax_quiet_closed_loop", False):
  sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)


class Checkpointer:
  """Saves and restores (train state, iterator state, loop state) under `directory`."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, asynchronous: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    keep = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, enable_async_checkpointing=asynchronous,
        # best_fn makes Orbax write each step's metrics to disk and read them back when reopened;
        # without it BestN only sees the metrics of steps saved by this process, so a resumed run
        # deletes the best checkpoint of the run before it.
        best_fn=_best_metric, best_mode="max",
        cleanup_tmp_directories=True)  # leftovers of a save killed midway
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data", "loop"))
    except (OSError, PermissionError) as error:
      raise UserError(f"cannot use checkpoint directory {self.directory}: {error}") from error

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, loop_state: dict,
           validation_accuracy: float | None = None, force: bool = False) -> None:
    """Starts writing step `step` (asynchronously unless the Checkpointer was made synchronous).

    A disk without room for it raises OSError(ENOSPC) here, before anything is written: Orbax would
    otherwise fail in its writer threads, leave a partial temporary directory, and log a traceback per
    file before the error reaches the loop. (A disk that fills up during the write still fails there.)
    """
    self._check_free_space(step, state)
    metrics = None if validation_accuracy is None else {BEST_METRIC: float(validation_accuracy)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop_state)), metrics=metrics, force=force)

  def _check_free_space(self, step: int, state: Any) -> None:
    needed = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)) + _METADATA_BYTES
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:
      return  # the save itself will report what is wrong with the directory
    enough = free >= needed
    if jax.process_count() > 1:  # process 0's view decides, so that no process saves alone
      enough = bool(multihost_utils.broadcast_one_to_all(np.array(enough)))
    if not enough:
      raise OSError(errno.ENOSPC, f"No space left on device for checkpoint step {step} (about "
                    f"{needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free)", str(self.directory))

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """The newest readable checkpoint as (step, state, data_state, loop_state), or None if none exists.

    Restore order: the train state first (its shapes and shardings come from `abstract_state`, a freshly
    initialised state), then the iterator and loop states, which are plain JSON. A checkpoint that fails
    to read is reported and the previous one tried (the unreadable ones are then renamed
    `<step>.unreadable`); if none can be read that is an error, never a silent fresh start that would
    overwrite the run.
    """
    steps = self.all_steps()
    if not steps:
      return None
    differences = self.state_differences(steps[-1], abstract_state)
    if differences:
      raise StateMismatch(differences)
    failures, unreadable_steps = [], []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            loop=ocp.args.JsonRestore()))
      except Exception as error:  # noqa: BLE001 - any read failure means "try the previous one"
        message = f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: {error})"
        logging.warning(message)
        failures.append(message)
        unreadable_steps.append(step)
        continue
      if failures:
        logging.warning("Resuming from step %d; newer checkpoints were unreadable: %s", step, failures)
        self._set_aside(unreadable_steps, resumed_step=step)
      return step, restored["state"], restored["data"], restored["loop"]
    raise UserError("no checkpoint in the workdir can be read, so training would start over and overwrite "
                    "them. Move the workdir aside or delete the broken checkpoints:\n  " + "\n  ".join(failures))

  def state_differences(self, step: int, abstract_state: Any) -> list[str]:
    """How the train state stored at `step` differs in names or shapes from `abstract_state`, from the
    checkpoint's metadata alone (`shape_differences`). Empty when they agree, or when the metadata cannot
    be read (a truncated checkpoint is then reported by the restore itself).

    Checked before reading any array: a restore into another shape fails inside Orbax's reader threads,
    which then print a traceback per array.
    """
    try:
      stored = stored_shapes(self.directory / str(step) / "state", with_dtype=False)
    except Exception:  # noqa: BLE001 - unreadable metadata: left to the restore to report
      return []
    return shape_differences(stored, tree_shapes(abstract_state, with_dtype=False))

  def _set_aside(self, steps: list[int], resumed_step: int) -> None:
    """Renames unreadable step directories to `<step>.unreadable` (kept, never deleted).

    Left in place, the broken step would stay the newest: Orbax skips saving any step not above
    it, so the resumed run would reach that step without checkpointing it, and every later resume
    would fall back again and lose the work since.
    """
    if jax.process_index() == 0:
      for step in steps:
        target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
        copy = 1
        while target.exists():  # an earlier resume set aside a step of the same number
          target = self.directory / f"{step}{UNREADABLE_SUFFIX}-{copy}"
          copy += 1
        (self.directory / str(step)).rename(target)
        logging.warning("Moved unreadable checkpoint %s to %s", self.directory / str(step), target)
    # Every process re-lists the steps only after the renames are done.
    ocp.multihost.sync_global_processes(f"siamese_jax_checkpoint_set_aside_{resumed_step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def tree_shapes(tree: Any, *, with_dtype: bool = True) -> dict[str, str]:
  """{"params.convs.0.kernel.value": "(3, 3, 1, 64) float32"} (or just the shape) for each leaf of a
  pytree of arrays, abstract arrays or Orbax array metadata; names as Orbax stores them."""
  return {".".join(key): str(tuple(int(d) for d in leaf.shape)) + (f" {np.dtype(leaf.dtype)}" if with_dtype else "")
          for key, leaf in ocp.tree.to_flat_dict(tree).items()}


def stored_shapes(item_dir: str | pathlib.Path, *, with_dtype: bool = True) -> dict[str, str]:
  """`tree_shapes` of a saved pytree item (`<step>/state`), read from its metadata: no array is read.
  Raises whatever Orbax raises for missing or damaged metadata."""
  return tree_shapes(ocp.PyTreeCheckpointHandler().metadata(pathlib.Path(item_dir).absolute()),
                     with_dtype=with_dtype)


def shape_differences(stored: dict[str, str], expected: dict[str, str]) -> list[str]:
  """One line per leaf where a checkpoint and a config's state differ, weights first:
  `params.x.kernel.value: checkpoint (3, 3, 1, 64) float32, model from config (3, 3, 1, 32) float32`."""
  return [f"{name}: checkpoint {stored.get(name, 'missing')}, model from config {expected.get(name, 'absent')}"
          for name in sorted(stored.keys() | expected.keys(), key=lambda n: (not n.startswith("params."), n))
          if stored.get(name) != expected.get(name)]


class StateMismatch(UserError):
  """The newest checkpoint holds a train state of another structure or shape than the one asked for
  (another model, optimizer or loss): a config mismatch, not a broken checkpoint."""

  def __init__(self, differences: list[str], shown: int = 4):
    self.differences = differences
    more = f"; and {len(differences) - shown} more" if len(differences) > shown else ""
    super().__init__(f"the checkpoints hold a train state of another shape than this config's: "
                     f"{'; '.join(differences[:shown])}{more}")


def complete_steps(directory: str | pathlib.Path, *, with_state: bool = False) -> list[int]:
  """Steps whose checkpoint finished writing, read from the disk: the all-digit directory names.

  A save still in flight, or one that failed, is in a temporary directory whose name is not all digits,
  and a step a resume set aside is `<step>.unreadable`. `with_state`: only steps holding a `state` item,
  the one a trained model is restored from. A missing or unreadable directory holds no steps.
  """
  directory = pathlib.Path(directory)
  try:
    entries = list(directory.iterdir())
  except OSError:
    return []
  return sorted(int(path.name) for path in entries if path.name.isascii() and path.name.isdigit()
                and (not with_state or (path / "state").is_dir()))


def saved_validation_accuracy(step_dir: str | pathlib.Path) -> float | None:
  """The validation accuracy saved with a step (`<step>/metrics/metrics`), None when it has none."""
  try:
    value = json.loads((pathlib.Path(step_dir) / "metrics" / "metrics").read_text()).get(BEST_METRIC)
  except (OSError, ValueError, AttributeError):
    return None
  return float(value) if isinstance(value, (int, float)) else None


def select_checkpoint(workdir: str | pathlib.Path | None, checkpoint: str | os.PathLike = "best"
                      ) -> tuple[pathlib.Path, int, str]:
  """(step directory, step, why it was chosen) for `checkpoint`.

  "best": the step with the highest validation accuracy (the later one on ties); the latest when no
  step has one. "latest": the highest step. A number: that step. Anything else: a path to a step
  directory (`.../checkpoints/<step>`), e.g. from another workdir.
  """
  text = str(checkpoint)
  if text in CHECKPOINT_CHOICES or text.isdigit():
    if workdir is None:
      raise UserError(f"checkpoint={text!r} picks a step of a workdir; give the workdir too.")
    directory = pathlib.Path(workdir) / CHECKPOINTS_DIRNAME
    steps = complete_steps(directory, with_state=True)
    if not steps:
      raise UserError(f"{directory}: no checkpoint there. Train first (python launch.py --config=... "
                      f"--workdir={workdir}) or pass --checkpoint=<path to a checkpoints/<step> directory>.")
    if text == "latest":
      return directory / str(steps[-1]), steps[-1], "latest"
    if text.isdigit():
      if int(text) not in steps:
        raise UserError(f"checkpoint step {int(text)} is not in {directory}; it holds steps {steps}.")
      return directory / text, int(text), f"step {int(text)}"
    scored = [(accuracy, step) for step in steps
              if (accuracy := saved_validation_accuracy(directory / str(step))) is not None]
    if not scored:
      return directory / str(steps[-1]), steps[-1], "latest (no checkpoint has a validation accuracy)"
    accuracy, step = max(scored)
    return directory / str(step), step, f"best validation accuracy {accuracy:.4f}"
  path = pathlib.Path(text).expanduser()
  if path.name == "state" and path.is_dir():
    path = path.parent
  if not path.is_dir():
    raise UserError(f"checkpoint={text!r}: not 'best', 'latest', a step number, or an existing "
                    "checkpoint directory (<workdir>/checkpoints/<step>).")
  if not (path / "state").is_dir():
    steps = complete_steps(path, with_state=True)
    hint = f"; it holds steps {steps}: pass {path / str(steps[-1])}" if steps else ""
    raise UserError(f"checkpoint {path}: has no 'state' item, so it is not a checkpoint step directory "
                    f"(<workdir>/checkpoints/<step>){hint}.")
  step = int(path.name) if path.name.isascii() and path.name.isdigit() else -1
  return path, step, "given path"


def restore_variables(step_dir: pathlib.Path, params: Any, model_state: Any) -> tuple[Any, Any]:
  """Reads (params, model_state) from the checkpoint's `state` item into the given structures; the
  optimizer state is never read.

  The checkpoint's names and shapes are checked against the model's first: a mismatch lists the first
  differences (a checkpoint of another model or size), instead of a deep Orbax error.
  """
  state_dir = (pathlib.Path(step_dir) / "state").absolute()
  target = {"params": params, "model_state": model_state}
  abstract = abstract_like(target)
  try:
    stored = {name: shape for name, shape in stored_shapes(state_dir).items() if name.split(".")[0] in target}
  except Exception as error:  # noqa: BLE001 -- any unreadable metadata is the same user problem
    raise UserError(f"checkpoint {step_dir}: cannot read it ({type(error).__name__}: {error}). The "
                    "checkpoint is incomplete or damaged; pick another with --checkpoint.") from error
  differences = shape_differences(stored, tree_shapes(abstract))
  if differences:
    shown = "\n  ".join(differences[:6]) + (f"\n  ... and {len(differences) - 6} more" if len(differences) > 6 else "")
    raise UserError(f"checkpoint {step_dir} does not match the model the config builds "
                    f"({len(differences)} arrays differ):\n  {shown}\nUse the config the checkpoint was "
                    "trained with (the workdir's config.json: leave out --config) or a checkpoint of this model.")
  try:
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except Exception as error:  # noqa: BLE001
    raise UserError(f"checkpoint {step_dir}: cannot read its arrays ({type(error).__name__}: {error}); "
                    "pick another with --checkpoint.") from error
  return restored["params"], restored["model_state"]


# What the OS says when the disk is full or refuses writes. Orbax writes arrays through TensorStore (C++),
# whose errors arrive as ValueError/RuntimeError carrying the OS message, not as OSError: matched by text.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
_DISK_MESSAGES = re.compile("|".join(re.escape(message) for message in sorted(
    {"No space left on device", "Disk quota exceeded", "File too large", "Permission denied",
     "Read-only file system", "Operation not permitted"})))


def disk_problem(error: BaseException) -> str | None:
  """The OS's description of a full or unwritable disk behind `error` (its causes included), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
      where = f" ({error.filename})" if error.filename else ""
      return f"{error.strerror or error}{where}"
    match = _DISK_MESSAGES.search(str(error))
    if match and not isinstance(error, UserError):
      # TensorStore's message names the file after a long prefix; the end of its first line says most.
      first_line = str(error).strip().splitlines()[0]
      detail = first_line if len(first_line) <= 300 else "..." + first_line[-300:]
      return f"{match.group(0)} ({detail})"
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def disk_errors(workdir: str | pathlib.Path) -> Iterator[None]:
  """Turns a full or unwritable disk under `workdir` into a UserError that says what is still safe.

  Saves are atomic (a temporary directory renamed when complete) and old steps are deleted only after a
  newer one is complete, so a failed write never damages the checkpoints already there.
  """
  try:
    yield
  except UserError:
    raise
  except Exception as error:
    problem = disk_problem(error)
    if problem is None:
      raise
    workdir = pathlib.Path(workdir)
    steps = complete_steps(workdir / CHECKPOINTS_DIRNAME)
    kept = (f"The checkpoints already there are intact (newest: step {steps[-1]}); free some space or fix "
            "the permissions, then run the same command again to resume from it."
            if steps else "No checkpoint was written yet.")
    raise UserError(f"cannot write to the workdir {workdir.absolute()}: {problem}. {kept}") from error


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`, the target an Orbax restore fills in."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
