"""Results printed for people: what launch.py shows after each mode."""

from __future__ import annotations

import sys


def print_results(results: dict) -> None:
  """A results dict of training's final report or of `--mode=eval`, as a few lines for people."""
  checkpoint = results.get("checkpoint")
  where = f" ({checkpoint['path']}, {checkpoint['selected_by']})" if checkpoint else ""
  members = (checkpoint or {}).get("members")  # an ensemble: each member's own step
  at = f"steps {' / '.join(str(m['step']) for m in members)}" if members else f"step {results.get('step')}"
  seed = f", episode seed {results['seed']}" if "seed" in results else ""  # eval's --seed; the run's by default
  lines = [f"Results at {at}{where}{seed}:"]
  if "accuracy" in results.get("lake_runs", {}):
    lake = results["lake_runs"]
    interval = f" +- {100 * lake['ci95']:.1f}" if "ci95" in lake else ""  # a results.json may lack it
    lines.append(f"  Lake's 20 runs (20-way 1-shot, within alphabet): {100 * lake['accuracy']:.1f} %{interval}")
  for mode, settings in results.get("episodes", {}).items():
    for setting, value in settings.items():
      if "mean" in value:
        lines.append(f"  {mode:>12} {setting:>10}: {100 * value['mean']:.1f} % +- {100 * value['ci95']:.1f}")
      else:
        lines.append(f"  {mode:>12} {setting:>10}: skipped ({value.get('skipped')})")
  for setting, value in results.get("vinyals", {}).items():
    if "mean" in value:
      lines.append(f"  {'Vinyals test':>12} {setting:>10}: {100 * value['mean']:.1f} % +- {100 * value['ci95']:.1f}")
  if "verification" in results:
    test, threshold = results["verification"]["test"], results["verification"]["threshold"]
    lines.append(f"  verification: ROC-AUC {test['roc_auc']:.4f}, EER {100 * test['eer']:.2f} %, accuracy "
                 f"{100 * test['accuracy_at_threshold']:.1f} % at the {threshold['scoring']} threshold "
                 f"{threshold['threshold']:.4g} (calibrated on {threshold['calibrated_on']} pairs)")
  if "retrieval" in results:
    retrieval = results["retrieval"]
    recall = ", ".join(f"R@{k} {100 * v:.1f} %" for k, v in retrieval["recall_at_k"].items())
    lines.append(f"  retrieval: P@1 {100 * retrieval['precision_at_1']:.1f} %, {recall}, "
                 f"MAP@R {100 * retrieval['map_at_r']:.1f} %")
  if "known_accuracy" in results.get("open_set", {}):
    open_set = results["open_set"]
    gallery_threshold = results.get("verification", {}).get("threshold", {}).get("gallery_threshold")
    at = f" at the gallery threshold {gallery_threshold:.4g}" if gallery_threshold is not None else ""
    lines.append(f"  open set: known accuracy {100 * open_set['known_accuracy']:.1f} %, unknown rejected "
                 f"{100 * open_set['unknown_rejection_rate']:.1f} %{at}")
  if "threshold" in results:  # training's calibration (training.calibrate_after_training)
    record = results["threshold"]
    lines.append(f"  same/different threshold: {record['skipped']}" if "skipped" in record else
                 f"  same/different threshold (step {record['step']}): {record['scoring']} {record['threshold']:.4g}, "
                 f"calibrated on the validation classes -> {record['written']}")
  if "seconds" in results:
    lines.append(f"  took {results['seconds']['total']:.1f} s")
  if "written" in results:
    lines.append(f"  written to {results['written']}")
  print("\n".join(lines), flush=True)


def print_mapping(result: dict, indent: str = "") -> None:
  """A mode's summary dict, one `key: value` per line (nested dicts indented)."""
  for key, value in result.items():
    if isinstance(value, dict):
      print(f"{indent}{key}:")
      print_mapping(value, indent + "  ")
    elif isinstance(value, list):
      print(f"{indent}{key}: " + ("" if value else "[]"))
      for item in value:
        print(f"{indent}  - {item}")
    else:
      print(f"{indent}{key}: {value:.6g}" if isinstance(value, float) else f"{indent}{key}: {value}")
  sys.stdout.flush()
