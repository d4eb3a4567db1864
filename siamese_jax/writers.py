"""Metric writers: JSON lines (for scripts and plots), TensorBoard (for people), and the progress bar.

Only the main process writes; other processes get writers that do nothing, so the loop never asks.
"""

from __future__ import annotations

import json
import pathlib
import sys

from tqdm.auto import tqdm


class MetricWriter:
  """Appends `{"step": s, "<prefix>/<name>": value, ...}` lines to `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: only the main process needs it
      self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

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


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The metrics log as a list of dicts (for plots and tests)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
