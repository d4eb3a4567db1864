"""Metric writers: JSON lines (for scripts and plots), TensorBoard (for people), and the progress bar.

Only the main process writes; other processes get writers that do nothing, so the loop never asks.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys

from tqdm.auto import tqdm

from siamese_jax.workdir import METRICS_FILENAME, TENSORBOARD_DIRNAME


class MetricWriter:
  """Appends `{"step": s, "<prefix>/<name>": value, ...}` lines to `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / METRICS_FILENAME
    self._tensorboard = None
    if enabled:
      drop_incomplete_last_line(self.path)
      from tensorboardX import SummaryWriter  # imported lazily: only the main process needs it
      self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / TENSORBOARD_DIRNAME))

  def write(self, step: int, scalars: dict[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    named = {f"{prefix}/{name}": float(value) for name, value in scalars.items()}
    with self.path.open("a") as file:
      file.write(json.dumps({"step": int(step), **named}) + "\n")
    for name, value in named.items():
      self._tensorboard.add_scalar(name, value, step)

  def progress(self, total: int, initial: int) -> tqdm:
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not self.enabled,
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def drop_incomplete_last_line(path: pathlib.Path) -> None:
  """Cuts off a last line that lacks its newline: what a run killed while appending a line leaves.

  Without this, a resumed run's first record would be glued onto the fragment, and both would be lost.
  Nothing is lost by cutting: every line is written before the checkpoint of its step, so the fragment
  belongs to a step after the newest checkpoint, which the resumed run trains and logs again.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return
  if not data or data.endswith(b"\n"):
    return
  keep = data.rfind(b"\n") + 1
  os.truncate(path, keep)
  logging.warning("%s: dropped an incomplete last line (the run was stopped while writing it): %r", path,
                  data[keep:keep + 80].decode("ascii", errors="replace"))


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The metrics log as a list of dicts (for plots and tests).

  A line that is not complete JSON (the last line of a run killed while appending it) is skipped with a
  warning, so a killed run's log can still be read and plotted.
  """
  path = pathlib.Path(workdir) / METRICS_FILENAME
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      logging.warning("%s: skipped line %d, which is not complete JSON (as a run stopped while writing a "
                      "line leaves it): %r", path, number, line[:80])
  return records
