"""Orbax checkpoints holding everything needed for an exact resume.

One Orbax step = one directory `<workdir>/checkpoints/<step>` with three items saved together:
  state  the train state (step, params, batch statistics, optimizer state)
  data   the Grain iterator state after the last batch consumed by that step
  loop   the loop's own bookkeeping (best validation accuracy, early-stopping patience)
Saves are asynchronous (training continues while the files are written) and atomic: Orbax writes into
a temporary directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoints untouched and the partial one is never taken for a finished one.

Kept: the last `max_to_keep` steps plus the best one by validation accuracy.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from siamese_jax.errors import UserError

BEST_METRIC = "validation_accuracy"


class Checkpointer:
  """Saves and restores (train state, iterator state, loop state) under `directory`."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, asynchronous: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    keep = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, enable_async_checkpointing=asynchronous,
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
    metrics = None if validation_accuracy is None else {BEST_METRIC: float(validation_accuracy)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop_state)), metrics=metrics, force=force)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """The newest readable checkpoint as (step, state, data_state, loop_state), or None if none exists.

    Restore order: the train state first (its shapes and shardings come from `abstract_state`, a freshly
    initialised state), then the iterator and loop states, which are plain JSON. A checkpoint that fails
    to read is reported and the previous one tried; if none can be read that is an error, never a
    silent fresh start that would overwrite the run.
    """
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            loop=ocp.args.JsonRestore()))
        if failures:
          logging.warning("Resuming from step %d; newer checkpoints were unreadable: %s", step, failures)
        return step, restored["state"], restored["data"], restored["loop"]
      except Exception as error:  # noqa: BLE001 - any read failure means "try the previous one"
        message = f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: {error})"
        logging.warning(message)
        failures.append(message)
    raise UserError("no checkpoint in the workdir can be read, so training would start over and overwrite "
                    "them. Move the workdir aside or delete the broken checkpoints:\n  " + "\n  ".join(failures))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`, the target an Orbax restore fills in."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
