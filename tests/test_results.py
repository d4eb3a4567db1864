"""Every published figure comes from results/*.json through results/render.py.

docs/results.md, README.md's rendered blocks and the Expected line of each config's header are the
script's output; editing a figure there by hand (instead of in the JSON) makes the rendering stale, and
this test says which file.
"""

import importlib.util
import json
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_render():
  spec = importlib.util.spec_from_file_location("render", REPO / "results" / "render.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


render = load_render()


def test_committed_renderings_match_the_results_files():
  stale = render.stale_files(REPO)
  assert not stale, (f"stale renderings: {', '.join(stale)}; a figure was edited by hand or a results file "
                     "changed: edit results/*.json, then run python results/render.py")


def test_every_results_file_names_an_existing_config_and_how_it_was_made():
  results = render.load_results(REPO)
  assert set(render.README_RESULTS) <= set(results)
  for config, result in results.items():
    assert (REPO / config.split(":")[0]).is_file(), f"{result['_file']}: no config file {config}"
    for key in ("command", "hardware", "source"):
      assert result.get(key), f"{result['_file']}: no {key!r}"


def test_each_result_records_the_device_count_its_config_trains_on():
  """Figures are bit-reproducible for a device count: the one each was trained on must be the one its config's
  command trains on (a pinned parallel.num_devices, else the CPU's default split for the batch)."""
  from siamese_jax import api, parallel
  from siamese_jax.modes import ensemble

  results = {**render.load_results(REPO), **render.load_results(REPO, validation_only=True)}
  for name, result in results.items():
    devices = result.get("devices")
    assert isinstance(devices, dict) and devices.get("kind") == "cpu", f"{result['_file']}: no CPU device count"
    config = api.get_config(name.replace("configs/", "", 1).replace(".py", "", 1))
    configs = (list(config.members.values()) if ensemble.is_ensemble_config(config)
               else [config])
    for member in configs:
      expected = member.parallel.num_devices or parallel.default_cpu_devices(member.sampling.batch_size)
      assert devices["count"] == expected, f"{result['_file']}: ran on {devices['count']}, {name} trains on {expected}"


def copy_checkout(tmp_path):
  for name in ("README.md", "docs", "configs", "results"):
    source = REPO / name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
  return tmp_path


def test_check_names_each_stale_file_and_render_repairs_it(tmp_path, capsys):
  root = copy_checkout(tmp_path)
  assert render.main(["--root", str(root)]) == 0  # fresh, whatever the checkout's state
  readme = root / "README.md"
  rendered = readme.read_text()
  main_job = render.load_results(root)["configs/omniglot.py"]
  lake = f"| {render.with_interval(main_job['lake_runs'], fine=True)} |"  # the main job's row, Lake's runs
  assert lake in rendered
  readme.write_text(rendered.replace(lake, "| 99.9 % ± 0.1 |", 1))
  header = root / "configs" / "omniglot.py"
  minutes = f"{render.minutes(main_job['training_minutes'])} of training"
  assert minutes in header.read_text()
  header.write_text(header.read_text().replace(minutes, "1 min of training", 1))
  assert render.main(["--check", "--root", str(root)]) == 1
  err = capsys.readouterr().err
  assert "stale: README.md" in err and "stale: configs/omniglot.py" in err and "docs/results.md" not in err
  assert render.main(["--root", str(root)]) == 0
  assert render.main(["--check", "--root", str(root)]) == 0
  assert readme.read_text() == rendered


def test_an_eval_runs_own_file_renders(tmp_path):
  # What --mode=eval writes has more keys (per-run accuracies, skipped settings, thresholds, open set,
  # timings) and full-precision floats; the renderer takes it as it is.
  root = copy_checkout(tmp_path)
  path = root / "results" / "omniglot.json"
  result = json.loads(path.read_text())
  result.pop("note", None)  # a transcribed file explains its rounding; an eval output has no note
  result["lake_runs"] = {"accuracy": 0.9025, "error_percent": 9.75, "ci95": 0.02712, "per_run": [0.9] * 20,
                         "runs": [f"run{i:02d}" for i in range(1, 21)]}
  result["episodes"]["within"]["20way5shot"] = {"skipped": "too few classes"}
  result["episodes"]["within"]["20way1shot"] = {"mean": 0.77125, "ci95": 0.00712, "episodes": 1000}
  result["verification"] = {"threshold": {"scoring": "distance", "threshold": 0.9},
                            "test": {"roc_auc": 0.98987, "eer": 0.0471, "eer_threshold": 0.91, "pairs": 10000}}
  result["retrieval"].update({"recall_at_k": {"1": 0.805, "5": 0.95}, "queries": 13180})
  result.update({"checkpoint": "runs/omniglot/checkpoints/3500", "open_set": {"skipped": "no"},
                 "seconds": {"load": 3.0, "total": 21.6}, "test_split": {"images": 13180, "classes": 659,
                                                                          "groups": 20}})
  path.write_text(json.dumps(result))
  assert render.main(["--root", str(root)]) == 0
  readme = (root / "README.md").read_text()
  assert "| `configs/omniglot.py` | 90.25 % ± 2.7 | 77.1 % ± 0.7 |" in readme
  doc = (root / "docs" / "results.md").read_text()
  assert "| 20-way 5-shot | not scored |" in doc and "ROC-AUC 0.990, EER 4.7 %" in doc


@pytest.mark.parametrize("fraction, text", [(0.9625, "96.25 %"), (0.903, "90.3 %"), (0.96, "96.0 %"),
                                            (0.955, "95.5 %")])
def test_lake_figures_keep_the_hundredths_they_have(fraction, text):
  assert render.fine_percent(fraction) == text
