r"""Renders every published figure from the results files, so that each figure has one source.

  python results/render.py           # rewrite docs/results.md, README.md's rendered blocks, config headers
  python results/render.py --check   # rewrite nothing; exit 1 naming each file whose rendering is stale

Sources: `results/**/*.json`, one per shipped config (variant): what `launch.py --mode=eval` writes to
`<workdir>/eval/results.json`, plus "config" (the config file, `:variant` where not the default), "command",
"hardware", "devices" (training's results.json: count, kind, strategy, processes), "training_minutes", "steps",
"best_validation" and "source"; an ensemble adds "members"; other
optional keys: "num_steps" and "stopped_by" (a run its time limit stopped), "training_report" (what the
training command printed on its last state), "other_episode_seeds" ({seed: partial eval report}).
`results/literature.json` holds published figures of other methods. Fields a file lacks are shown as "—".
An ablation measured on validation alphabets only (`results/ablations/losses/*.json`) has "validation_only":
true, "change" (what differs from its reference), "validation" ({step: accuracy}), "decision" and optionally
"idle_minutes" (steps at the run's median logged speed of its faster half, where it shared the machine); it is not
a published test figure, so it appears only in docs/ablations.md's tables.

Renderings: docs/results.md (whole file); README.md between `<!-- configs:begin -->` / `<!-- configs:end -->`
and `<!-- results:begin -->` / `<!-- results:end -->`; docs/ablations.md between `<!-- losses:begin -->` /
`<!-- losses:end -->`; in each config's docstring, the line starting with `Expected [results/render.py]: `.
Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LITERATURE = "literature.json"
SETTINGS = ("20way1shot", "20way5shot", "5way1shot", "5way5shot")
EXPECTED_PREFIX = "Expected [results/render.py]: "
RESULTS_DOC = "docs/results.md"
ABLATIONS_DOC = "docs/ablations.md"
# docs/ablations.md's loss table: the reference every loss is set against, then each validation-only result.
LOSS_REFERENCE = "configs/ablations/omniglot_triplet.py"
DASH = "—"

# The README's "which config?" table: (what you want, config file).
INTENTS = (
    ("the fast default (the main job)", "configs/omniglot.py"),
    ("the best in an hour of CPU", "configs/omniglot_hour.py"),
    ("the best single network", "configs/omniglot_best_single.py"),
    ("the best result: an ensemble", "configs/omniglot_best_ensemble.py"),
    ("Vinyals et al.'s split", "configs/omniglot_vinyals.py"),
    ("the best on Vinyals et al.'s split: an ensemble", "configs/omniglot_vinyals_ensemble.py"),
    ("Koch et al.'s setting (a GPU/TPU)", "configs/omniglot_koch.py"),
    ("your own folder of images", "configs/folder.py"),
    ("your own photos, from ImageNet weights", "configs/folder_pretrained.py"),
)
UNMEASURED = {"configs/omniglot_koch.py": "not measured", "configs/folder.py": "depends on your data",
              "configs/folder_pretrained.py": "depends on your data"}
# docs/results.md's side-by-side tables: (title, what they share, configs in order).
COMPARISONS = (
    ("ImageNet-pretrained EfficientNet-Lite0 against the from-scratch default",
     "Omniglot background -> evaluation alphabets, 28x28, prototype loss, the same training minutes on the same "
     "machine kind; the pretrained network sees each character repeated to RGB",
     ("configs/omniglot.py", "configs/ablations/omniglot_pretrained.py:frozen",
      "configs/ablations/omniglot_pretrained.py:finetune")),
)
# The README's results table: the shipped configs with results, in this order.
README_RESULTS = ("configs/omniglot.py", "configs/omniglot_hour.py", "configs/omniglot_best_single.py",
                  "configs/omniglot_best_ensemble.py", "configs/omniglot_vinyals.py",
                  "configs/omniglot_vinyals_ensemble.py")


# --------------------------------------------------------------------------------------------------
# Loading


def load_results(root: pathlib.Path = ROOT, *, validation_only: bool = False) -> dict[str, dict]:
  """{config: results} of every results file but the literature's, in README order, then by path: the
  published (test) results, or with `validation_only` the ablations measured on validation alone."""
  found = {}
  for path in sorted((root / "results").rglob("*.json")):
    if path.name == LITERATURE:
      continue
    data = json.loads(path.read_text())
    if "config" not in data:
      raise ValueError(f"{path.relative_to(root)}: no \"config\" key (the config file it is the result of)")
    if bool(data.get("validation_only")) == validation_only:
      found[data["config"]] = {**data, "_file": str(path.relative_to(root))}
  first = [c for c in README_RESULTS if c in found]
  return {c: found[c] for c in first + sorted(set(found) - set(first))}


def load_literature(root: pathlib.Path = ROOT) -> dict:
  path = root / "results" / LITERATURE
  return json.loads(path.read_text()) if path.is_file() else {}


def get(data, *keys):
  """data[k1][k2]... or None where any level is missing."""
  for key in keys:
    if not isinstance(data, dict) or key not in data:
      return None
    data = data[key]
  return data


# --------------------------------------------------------------------------------------------------
# Formatting


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def percent(fraction, decimals: int = 1) -> str:
  """0.771 -> "77.1 %"."""
  return f"{round(100 * fraction, 6):.{decimals}f} %" if _finite(fraction) else DASH


def fine_percent(fraction) -> str:
  """Up to two decimals, at least one: 0.9625 -> "96.25 %", 0.903 -> "90.3 %" (Lake's 400 trials and
  validation accuracies resolve hundredths)."""
  if not _finite(fraction):
    return DASH
  text = f"{round(100 * fraction, 6):.2f}"
  return (text[:-1] if text.endswith("0") else text) + " %"


def with_interval(entry, fine: bool = False) -> str:
  """An accuracy record ({"mean"|"accuracy", "ci95"} or {"skipped"}) as "77.1 % ± 0.7"."""
  if not isinstance(entry, dict):
    return DASH
  if "skipped" in entry:
    return "not scored"
  value = entry.get("mean", entry.get("accuracy"))
  text = fine_percent(value) if fine else percent(value)
  ci95 = entry.get("ci95")
  return f"{text} ± {round(100 * ci95, 6):.1f}" if _finite(ci95) and text != DASH else text


def minutes(value) -> str:
  return f"{value:g} min" if _finite(value) else DASH


def count(value) -> str:
  return f"{value:,}" if isinstance(value, int) else DASH


def config_link(config: str) -> str:
  return f"`{config}`"


def training_time(result: dict) -> str:
  """Minutes on 2 CPU cores; an ensemble's with its members' ("214 min (53 + 57 + 31 + 73)")."""
  total = minutes(result.get("training_minutes"))
  members = [get(m, "training_minutes") for m in (result.get("members") or {}).values()]
  if members and all(_finite(m) for m in members):
    total += " (" + " + ".join(f"{m:g}" for m in members) + ")"
  return total


def devices_text(devices) -> str:
  """"8 CPU devices (shard_map)": the device count the figures are bit-reproducible for (its config pins it)."""
  if not isinstance(devices, dict) or not isinstance(devices.get("count"), int):
    return DASH
  count, kind = devices["count"], str(devices.get("kind", "")).upper()
  processes = devices.get("processes", 1)
  where = f" in {processes} processes" if isinstance(processes, int) and processes > 1 else ""
  return f"{count} {kind} device{'s' if count != 1 else ''}{where} ({devices.get('strategy', DASH)})"


def steps_text(result: dict) -> str:
  steps, planned = result.get("steps"), result.get("num_steps")
  if steps is None:
    return DASH
  text = f"{count(steps)} of {count(planned)}" if planned and planned != steps else count(steps)
  if result.get("stopped_by"):
    text += f", stopped by {result['stopped_by']}"
  return text


def validation_text(entry) -> str:
  if not isinstance(entry, dict):
    return DASH
  text = fine_percent(entry.get("accuracy"))
  kind = {"within": "within alphabet", "unstructured": "unstructured"}.get(entry.get("episodes"))
  if kind:
    text += f" {kind}"
  if entry.get("step") is not None:
    text += f" (step {entry['step']})"
  return text


def setting_name(setting: str) -> str:
  ways, shots = setting.replace("shot", "").split("way")
  return f"{ways}-way {shots}-shot"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def commands(result: dict) -> list[str]:
  command = result.get("command") or []
  return [command] if isinstance(command, str) else list(command)


# --------------------------------------------------------------------------------------------------
# Renderings


def expected_line(config: str, results: dict[str, dict], validation: dict[str, dict] | None = None) -> str:
  """The rendered Expected line of configs/<config>.py's header (each measured variant's where the file
  itself has no results; a file measured on validation only points at docs/ablations.md)."""
  measured = [r.get("idle_minutes", r.get("training_minutes")) for c, r in (validation or {}).items()
              if c.startswith(config + ":")]
  measured = [m for m in measured if _finite(m)]
  if config not in results and measured:
    low, high = min(measured), max(measured)
    return EXPECTED_PREFIX + (f"{len(measured)} variants measured, {low:g} to {high:g} min of training on 2 CPU "
                              f"cores; validation only, in {ABLATIONS_DOC}.")
  result = results.get(config)
  variants = {c.split(":", 1)[1]: r for c, r in results.items()
              if c.startswith(config + ":") and _finite(r.get("training_minutes"))}
  if result is None and variants:
    text = ", ".join(f":{name} {training_time(r)}" for name, r in variants.items())
    return EXPECTED_PREFIX + f"{text} of training on 2 CPU cores; figures in {RESULTS_DOC}."
  if result is None or not _finite(result.get("training_minutes")):
    return EXPECTED_PREFIX + f"{UNMEASURED.get(config, 'not measured')}; measured configs: {RESULTS_DOC}."
  text = f"{training_time(result)} of training on 2 CPU cores"
  if result.get("stopped_by"):
    text += f" (step {count(result.get('steps'))} of {count(result.get('num_steps'))})"
  return EXPECTED_PREFIX + f"{text}; figures in {RESULTS_DOC}."


def readme_configs_block(results: dict[str, dict]) -> str:
  rows = []
  for intent, config in INTENTS:
    result = results.get(config)
    if result is None:
      rows.append([intent, config_link(config), UNMEASURED.get(config, "not measured"), DASH, DASH])
      continue
    lake = get(result, "lake_runs") or {}
    if "skipped" in lake:  # the Vinyals split: its own test classes
      lake_text = "not scored"
      new = percent(get(result, "vinyals", "20way1shot", "mean")) + " Vinyals test"
    else:
      lake_text = fine_percent(lake.get("accuracy"))
      new = percent(get(result, "episodes", "within", "20way1shot", "mean")) + " within alphabet"
    rows.append([intent, config_link(config), minutes(result.get("training_minutes")), lake_text, new])
  lines = table(["I want", "config", "training, 2 CPU cores", "Lake's 20 runs", "20-way 1-shot, new characters"],
                rows)
  return "\n".join(lines)


def readme_results_block(results: dict[str, dict], literature: dict) -> str:
  rows = []
  for config in README_RESULTS:
    result = results.get(config)
    if result is None:
      continue
    rows.append([config_link(config), with_interval(get(result, "lake_runs"), fine=True),
                 with_interval(get(result, "episodes", "within", "20way1shot")),
                 with_interval(get(result, "episodes", "within", "5way1shot")),
                 with_interval(get(result, "vinyals", "20way1shot"))])
  lines = table(["config", "Lake's 20 runs", "20-way 1-shot, within alphabet", "5-way 1-shot, within alphabet",
                 "Vinyals test, 20-way 1-shot"], rows)
  scale = [f"{entry['method'].split(' (')[0]} {fine_percent(entry.get('accuracy'))}"
           for entry in literature.get("lake_runs", [])[:3]]
  if scale:
    lines += ["", "For scale, on Lake's 20 runs: " + ", ".join(scale) + "."]
  return "\n".join(lines)


def loss_ablations_block(results: dict[str, dict], validation: dict[str, dict]) -> str:
  """docs/ablations.md's table of losses: the reference's row, then one row per validation-only result."""

  def row(name: str, result: dict, decision: str) -> list[str]:
    training = training_time(result)
    if _finite(result.get("idle_minutes")) and result.get("idle_minutes") != result.get("training_minutes"):
      training += f" ({minutes(result['idle_minutes'])} at its idle speed)"
    curve = ", ".join(f"{int(step) / 1000:g}k {fine_percent(accuracy)}"
                      for step, accuracy in (result.get("validation") or {}).items())
    command = f"`{commands(result)[0]}`" if commands(result) else DASH
    return [name, count(result.get("steps")), training, validation_text(result.get("best_validation")),
            curve or DASH, decision, command]

  rows = []
  if LOSS_REFERENCE in results:
    rows.append(row("reference: triplet, semi-hard, margin 0.2 (T2)", results[LOSS_REFERENCE],
                    "the best loss in this recipe so far"))
  rows += [row(result.get("change", config), result, result.get("decision", DASH))
           for config, result in validation.items()]
  return "\n".join(table(["loss", "steps", "training", "best validation", "validation by step", "decision",
                          "command"], rows))


def _episode_table(result: dict) -> list[str]:
  rows = [[setting_name(s), with_interval(get(result, "episodes", "within", s)),
           with_interval(get(result, "episodes", "unstructured", s)), with_interval(get(result, "vinyals", s))]
          for s in SETTINGS]
  return table(["N-way K-shot", "within alphabet", "unstructured", "Vinyals test (unstructured)"], rows)


def _verification(result: dict) -> str:
  test = get(result, "verification", "test") or {}
  if not test:
    return DASH
  auc = f"{test['roc_auc']:.3f}" if _finite(test.get("roc_auc")) else DASH
  return f"ROC-AUC {auc}, EER {percent(test.get('eer'))}"


def _retrieval(result: dict) -> str:
  retrieval = get(result, "retrieval") or {}
  if not retrieval:
    return DASH
  return f"P@1 {percent(retrieval.get('precision_at_1'))}, MAP@R {percent(retrieval.get('map_at_r'))}"


def _section(result: dict) -> list[str]:
  config = result["config"]
  lines = [f"## `{config}`", "", "Reproduce:", "", "```"] + commands(result) + ["```", ""]
  facts = [
      ("hardware", result.get("hardware") or DASH),
      ("trained on", devices_text(result.get("devices"))),
      ("training", f"{steps_text(result)} steps, {training_time(result)}" if result.get("steps") is not None
       else training_time(result)),
      ("best validation (20-way 1-shot)", validation_text(result.get("best_validation"))),
      ("evaluated checkpoint", f"step {result['step']}" if result.get("step") is not None
       else "the best of each member" if result.get("members") else DASH),
      ("test classes", count(get(result, "test_split", "classes"))),
      ("episode seed", str(result["seed"]) if result.get("seed") is not None else DASH),
      ("Lake's 20 runs", with_interval(get(result, "lake_runs"), fine=True)),
      ("verification on test pairs", _verification(result)),
      ("retrieval", _retrieval(result)),
      ("eval mode's time", f"{get(result, 'seconds', 'total'):.0f} s" if _finite(get(result, "seconds", "total"))
       else DASH),
  ]
  lines += table(["", ""], [[name, value] for name, value in facts]) + [""]
  lines += _episode_table(result) + [""]
  members = result.get("members") or {}
  if members:
    rows = [[f"`{m.get('config', name)}`", count(m.get("steps")), minutes(m.get("training_minutes")),
             validation_text(m.get("best_validation"))] for name, m in members.items()]
    lines += ["Members, combined in this order:", ""]
    lines += table(["member", "steps", "training", "best validation"], rows) + [""]
  others = result.get("other_episode_seeds") or {}
  if others:
    reports = [(str(result.get("seed", 0)), result)] + sorted(others.items())
    rows = [[seed, with_interval(get(r, "episodes", "within", "20way1shot")),
             with_interval(get(r, "vinyals", "20way1shot"))] for seed, r in reports]
    lines += ["Fresh episodes (`--mode=eval --seed=S`), 20-way 1-shot (Lake's runs do not depend on the seed):", ""]
    lines += table(["episode seed", "within alphabet", "Vinyals test"], rows) + [""]
  report = result.get("training_report")
  if report:
    parts = [f"Lake's 20 runs {with_interval(get(report, 'lake_runs'), fine=True)}"]
    parts += [f"20-way 1-shot {kind} {with_interval(get(report, 'episodes', mode, '20way1shot'))}"
              for mode, kind in (("within", "within alphabet"), ("unstructured", "unstructured"))
              if get(report, "episodes", mode, "20way1shot")]
    lines += [f"The training command's own report, on its last state (step {report.get('step')}): "
              + "; ".join(parts) + ".", ""]
  lines += [f"Source: `{result['_file']}`: {result.get('source') or 'the eval run'}."]
  if result.get("note"):
    lines += [f"Note: {result['note']}."]
  lines += [""]
  return lines


def results_doc(results: dict[str, dict], literature: dict) -> str:
  lines = [
      "<!-- Rendered by results/render.py from results/*.json: edit those, then run python results/render.py. -->",
      "# Results", "",
      "Each figure is `python launch.py --mode=eval --workdir=W` on the checkpoint the config's own command wrote "
      "(the best by validation accuracy; for an ensemble, the best of each member, combined). Episodes: 1,000 "
      "per setting, 1 query per class, on the test classes; ± is the half-width of the 95 % interval (for Lake's "
      "runs, over the 20 runs: how far a rerun's score may move). Training times are on 2 CPU cores, no "
      "accelerator. How each recipe was chosen, on validation alphabets only: `docs/ablations.md`.", "",
  ]
  rows = [[config_link(c), with_interval(get(r, "lake_runs"), fine=True),
           with_interval(get(r, "episodes", "within", "20way1shot")),
           with_interval(get(r, "episodes", "unstructured", "20way1shot")),
           with_interval(get(r, "vinyals", "20way1shot")), training_time(r)] for c, r in results.items()]
  lines += table(["config", "Lake's 20 runs", "20-way 1-shot, within alphabet", "20-way 1-shot, unstructured",
                  "Vinyals test, 20-way 1-shot", "training"], rows) + [""]
  if literature:
    lines += ["For scale (published figures):", ""]
    lines += table(["Lake's 20 runs", "accuracy"],
                   [[e["method"], fine_percent(e.get("accuracy"))] for e in literature.get("lake_runs", [])])
    lines += [""] + table(["Vinyals test", *(setting_name(s) for s in SETTINGS)],
                          [[e["method"], *(percent(e[s]) if s in e else DASH for s in SETTINGS)]
                           for e in literature.get("vinyals", [])]) + [""]
  for title, shared, configs in COMPARISONS:
    compared = [results[c] for c in configs if c in results]
    if len(compared) < 2:
      continue
    lines += [f"## {title}", "", f"Shared: {shared}. Each row's own section below has its commands.", ""]
    lines += table(["config", "training", "steps", "Lake's 20 runs", "20-way 1-shot, within alphabet",
                    "5-way 1-shot, within alphabet", "20-way 1-shot, unstructured"],
                   [[config_link(r["config"]), training_time(r), count(r.get("steps")),
                     with_interval(get(r, "lake_runs"), fine=True),
                     with_interval(get(r, "episodes", "within", "20way1shot")),
                     with_interval(get(r, "episodes", "within", "5way1shot")),
                     with_interval(get(r, "episodes", "unstructured", "20way1shot"))] for r in compared]) + [""]
  for result in results.values():
    lines += _section(result)
  return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------
# Files


def replace_block(text: str, name: str, body: str, path: str) -> str:
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
    raise ValueError(f"{path}: needs exactly one {begin} ... {end} block")
  head, rest = text.split(begin)
  return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def config_files(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in (root / "configs").rglob("*.py") if p.name != "__init__.py")


def render_config_header(path: pathlib.Path, root: pathlib.Path, results: dict[str, dict],
                         validation: dict[str, dict]) -> str:
  text = path.read_text()
  docstring = ast.get_docstring(ast.parse(text), clean=False) or ""
  config = str(path.relative_to(root))
  lines = [line for line in docstring.splitlines() if line.startswith(EXPECTED_PREFIX)]
  if len(lines) != 1:
    raise ValueError(f"{config}: its header needs exactly one line starting with {EXPECTED_PREFIX!r}")
  return text.replace(lines[0], expected_line(config, results, validation), 1)


def renderings(root: pathlib.Path = ROOT) -> dict[pathlib.Path, str]:
  """{file: its rendered text} for every file this script writes."""
  results, literature = load_results(root), load_literature(root)
  validation = load_results(root, validation_only=True)
  readme = (root / "README.md").read_text()
  readme = replace_block(readme, "configs", readme_configs_block(results), "README.md")
  readme = replace_block(readme, "results", readme_results_block(results, literature), "README.md")
  ablations = replace_block((root / ABLATIONS_DOC).read_text(), "losses",
                            loss_ablations_block(results, validation), ABLATIONS_DOC)
  out = {root / RESULTS_DOC: results_doc(results, literature), root / "README.md": readme,
         root / ABLATIONS_DOC: ablations}
  for path in config_files(root):
    out[path] = render_config_header(path, root, results, validation)
  return out


def stale_files(root: pathlib.Path = ROOT) -> list[str]:
  """Files whose committed text differs from what this script renders."""
  return [str(path.relative_to(root)) for path, text in renderings(root).items()
          if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
  parser.add_argument("--root", default=str(ROOT), help="the checkout (default: this script's)")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root).resolve()
  if args.check:
    stale = stale_files(root)
    for name in stale:
      print(f"stale: {name} differs from what results/render.py renders from results/*.json "
            "(edit the JSON, not the figure; then run python results/render.py)", file=sys.stderr)
    return 1 if stale else 0
  for path, text in renderings(root).items():
    if not path.is_file() or path.read_text() != text:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
      print(f"rendered {path.relative_to(root)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
