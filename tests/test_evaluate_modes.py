"""Evaluation and inference on a trained workdir: the eval, calibrate, compare, gallery and openset modes,
checkpoint selection, ensembles of workdirs, and every bad input of them with its message.

The workdir is `tests/trained_workdir.py`'s tiny synthetic run (trained once per session). Modes run
through `launch.py`: in this process (`run_launch`: the same flag parsing and `main`, without a new
JAX start) and, for the eval mode, once as a real subprocess.
"""

import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

import launch
from siamese_jax import checkpoint, models, training
from siamese_jax.data import pipeline
from siamese_jax.errors import UserError
from siamese_jax.metrics.episodes import episode_accuracies, sample_episodes, validation_accuracy
from siamese_jax.metrics.retrieval import gallery_class_similarities
from siamese_jax.metrics import scoring
from siamese_jax.metrics.scoring import resolve_scoring
from siamese_jax.modes.ensemble import make_ensemble
from siamese_jax.modes.evaluate import evaluate_workdir
from siamese_jax.modes.gallery import classify_gallery, compare_images, gallery_size_note, open_set
from siamese_jax.trained import load_gallery, load_image_file, load_queries, load_trained_model, prepare_images
from siamese_jax.writers import read_metrics
from trained_workdir import TEST_CLASSES, copy_of, smoke_config, trained_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  return trained_workdir(tmp_path_factory)


@pytest.fixture
def own_workdir(workdir, tmp_path) -> pathlib.Path:
  """A copy the test may write into (eval/ outputs, damaged checkpoints), without the threshold training
  calibrated at its end: each test calibrates (or not) as it needs."""
  copy = copy_of(workdir, tmp_path / "run")
  (copy / "eval" / "threshold.json").unlink()
  return copy


def test_training_calibrates_the_threshold_at_its_end(workdir):
  record = json.loads((workdir / "eval" / "threshold.json").read_text())
  results = json.loads((workdir / "results.json").read_text())
  assert results["devices"] == {"count": 4, "kind": "cpu", "strategy": "shard_map", "processes": 1}  # conftest's
  model = load_trained_model(workdir)  # the best checkpoint: the one the threshold is for
  assert record["calibrated_on"] == "validation" and record["step"] == model.step == results["threshold"]["step"]
  assert record["scoring"] == "distance" and record["threshold"] > 0 and "gallery_threshold" in record
  assert model.threshold["threshold"] == record["threshold"]
  image = np.zeros((28, 28, 1), np.uint8)
  compared = model.compare(image, image)  # one image twice: distance ~0, below any positive threshold
  assert compared.same is True and compared.distance == pytest.approx(0.0, abs=1e-5)
  assert compared.threshold == record["threshold"] and compared.scoring == "distance"


def run_launch(argv: list[str], capsys) -> tuple[int, str, str]:
  """launch.py's flag parsing and main in this process: (exit code, stdout, stderr)."""
  flags.FLAGS.unparse_flags()
  remaining = launch.parse_flags(["launch.py", *argv])
  code = 0
  try:
    launch.main(remaining)
  except SystemExit as exit_:
    code = exit_.code
  finally:
    flags.FLAGS.unparse_flags()
  out, err = capsys.readouterr()
  return code, out, err


def error_line(code: int, err: str) -> str:
  assert code == 2, err
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, err
  return lines[0]


# ------------------------------------------------------------------------------------------------
# eval: the results file, its numbers, and the launch.py path


def test_eval_mode_writes_results_json(own_workdir):
  environment = dict(os.environ, JAX_PLATFORMS="cpu")
  environment.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "launch.py", "--mode=eval", f"--workdir={own_workdir}",
                         "--episodes=100", "--checkpoint=latest", "--seed=3", "--ways=5,20", "--shots=1,5"],
                        cwd=REPO, env=environment,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Results at step 12" in done.stdout
  assert "episode seed 3:" in done.stdout  # the header names the episodes' seed (the run's is 0)
  assert "unstructured 20way5shot:" in done.stdout and "+-" in done.stdout
  assert "verification: ROC-AUC" in done.stdout and "retrieval: P@1" in done.stdout
  results = json.loads((own_workdir / "eval" / "results.json").read_text())
  assert results["step"] == 12 and results["checkpoint"]["step"] == 12
  for ways in (5, 20):
    for shots in (1, 5):
      setting = results["episodes"]["unstructured"][f"{ways}way{shots}shot"]
      assert 0 <= setting["mean"] <= 1 and setting["ci95"] > 0 and setting["episodes"] == 100
  # 20 test classes in 4 groups: no group has 20, so 20-way within-group episodes are skipped, with why.
  assert "need a group with 20 classes" in results["episodes"]["within"]["20way1shot"]["skipped"]
  assert "skipped" in results["lake_runs"]  # synthetic data: no Lake runs
  assert 0.5 < results["verification"]["test"]["roc_auc"] <= 1
  assert set(results["retrieval"]) == {"precision_at_1", "recall_at_k", "map_at_r", "queries"}
  assert results["open_set"]["known_queries"] > 0 and "unknown_rejection_rate" in results["open_set"]
  threshold = json.loads((own_workdir / "eval" / "threshold.json").read_text())
  assert threshold == results["verification"]["threshold"]
  assert threshold["scoring"] == "distance" and threshold["threshold"] > 0
  assert threshold["calibrated_on"] == "validation" and threshold["step"] == 12


def test_eval_episodes_equal_the_training_report(own_workdir):
  # The training run's own final report scored 50 seeded 5-way 1-shot episodes on the final (step 12)
  # parameters; the eval of the restored step-12 checkpoint must score exactly the same.
  trained = json.loads((own_workdir / "results.json").read_text())
  results = evaluate_workdir(own_workdir, checkpoint="latest", ways=(5,), shots=(1,),
                             num_episodes=50, num_pairs=200, progress=False)
  assert results["episodes"] == trained["episodes"] and results["seed"] == trained["seed"] == 0


def test_eval_seed_moves_the_test_episodes_not_the_thresholds(own_workdir):
  # threshold.json is the model's: calibrated on the validation classes with the run's seed, whatever
  # eval's --seed, so compare/gallery/openset do not change with the seed of the last report.
  by_seed = []
  for seed in (1, 2):  # neither is the run's seed (0)
    results = evaluate_workdir(own_workdir, ways=(5,), shots=(1,), num_episodes=50, num_pairs=200,
                               seed=seed, progress=False)
    by_seed.append((results, json.loads((own_workdir / "eval" / "threshold.json").read_text())))
  (first, first_record), (second, second_record) = by_seed
  assert first["episodes"] != second["episodes"] and first["seed"] == 1 and second["seed"] == 2
  assert first_record == second_record == first["verification"]["threshold"]
  assert first_record["seed"] == 0 and first_record["gallery_calibration_splits"] == 8


def test_eval_settings_larger_than_the_split_are_explained(workdir):
  with pytest.raises(UserError, match=f"ways=50: test split has {TEST_CLASSES} classes"):
    evaluate_workdir(workdir, ways=(5, 50), shots=(1,), progress=False)
  with pytest.raises(UserError, match="shots=30: 30-shot episodes with 1 queries per class need 31 images per "
                                      "class, but class 0 of the test split has 20; K can be at most 19"):
    evaluate_workdir(workdir, ways=(5,), shots=(1, 30), progress=False)


# ------------------------------------------------------------------------------------------------
# Checkpoints: selection, and a missing, mismatched or damaged one


def test_checkpoint_selection(workdir):
  steps = checkpoint.complete_steps(workdir / "checkpoints", with_state=True)
  assert steps == [6, 12]
  accuracies = {s: json.loads((workdir / "checkpoints" / str(s) / "metrics" / "metrics").read_text())
                ["validation_accuracy"] for s in steps}
  best = max(steps, key=lambda s: (accuracies[s], s))
  path, step, why = checkpoint.select_checkpoint(workdir, "best")
  assert (path, step) == (workdir / "checkpoints" / str(best), best)
  assert why.startswith("best validation accuracy")
  assert checkpoint.select_checkpoint(workdir, "latest")[1] == 12
  assert checkpoint.select_checkpoint(workdir, "6")[:2] == (workdir / "checkpoints" / "6", 6)
  assert checkpoint.select_checkpoint(None, workdir / "checkpoints" / "6" / "state")[1] == 6


def test_best_falls_back_to_latest_without_validation(own_workdir):
  for step in (6, 12):
    shutil.rmtree(own_workdir / "checkpoints" / str(step) / "metrics")
  assert checkpoint.select_checkpoint(own_workdir, "best")[1:] == (12, "latest (no checkpoint has a validation "
                                                                       "accuracy)")


def test_missing_checkpoints_are_explained(workdir, tmp_path, capsys):
  empty = tmp_path / "untrained"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  code, _, err = run_launch(["--mode=eval", f"--workdir={empty}"], capsys)
  line = error_line(code, err)
  assert f"{empty / 'checkpoints'}: no checkpoint there. Train first" in line
  with pytest.raises(UserError, match=r"checkpoint step 7 is not in .*; it holds steps \[6, 12\]"):
    load_trained_model(workdir, checkpoint="7")
  with pytest.raises(UserError, match=r"has no 'state' item, so it is not a checkpoint step directory .* "
                                      r"it holds steps \[6, 12\]: pass .*checkpoints/12"):
    load_trained_model(workdir, checkpoint=str(workdir / "checkpoints"))
  with pytest.raises(UserError, match="not 'best', 'latest', a step number, or an existing checkpoint directory"):
    load_trained_model(workdir, checkpoint=str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match=r"workdir .*nowhere: not found"):
    load_trained_model(tmp_path / "nowhere")


def test_checkpoint_without_its_config_needs_one(workdir, tmp_path):
  lone = tmp_path / "lone" / "12"
  shutil.copytree(workdir / "checkpoints" / "12", lone)
  with pytest.raises(UserError, match=r"config.json: not found.*pass --config=<the config file the model was "
                                      "trained with>"):
    load_trained_model(checkpoint=str(lone))
  model = load_trained_model(checkpoint=str(lone), config=smoke_config())
  assert model.step == 12 and model.selected_by == "given path"


def test_mismatched_checkpoint_lists_the_differences(workdir):
  config = smoke_config()
  config.model.width = 32  # the checkpoint's conv4 has 64 channels
  with pytest.raises(UserError) as error:
    load_trained_model(workdir, config=config)
  message = str(error.value)
  assert "does not match the model the config builds" in message
  assert "params.convs.0.kernel.value: checkpoint (3, 3, 1, 64) float32, model from config (3, 3, 1, 32) float32" \
      in message
  assert "leave out --config" in message


def test_damaged_checkpoint_is_explained(own_workdir):
  (own_workdir / "checkpoints" / "12" / "state" / "_METADATA").unlink()
  with pytest.raises(UserError, match=r"checkpoints/12: cannot read it .* pick another with --checkpoint"):
    load_trained_model(own_workdir, checkpoint="latest")


def test_restored_model_embeds_like_the_training_state(workdir):
  # The restored variables reproduce the embeddings of the state the checkpoint holds, read directly.
  import orbax.checkpoint as ocp
  model = load_trained_model(workdir, checkpoint="latest")
  raw = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / "12" / "state").absolute())
  kernel = np.asarray(model.variables[0]["convs"][0]["kernel"].value)
  np.testing.assert_array_equal(kernel, raw["params"]["convs"]["0"]["kernel"]["value"])
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  assert model.embed(images).shape == (3, 64)


# ------------------------------------------------------------------------------------------------
# Images of the wrong size, channels or type


def test_images_of_another_size_or_channels_are_resized_and_wrong_types_explained(workdir):
  model = load_trained_model(workdir)
  rgb = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
  assert prepare_images(rgb, (28, 28, 1)).shape == (2, 28, 28, 1)
  assert model.embed(rgb).shape == (2, 64)
  assert prepare_images(rgb[0, :, :, 0], (28, 28, 1)).shape == (1, 28, 28, 1)  # one [H, W] image
  with pytest.raises(UserError, match=r"images: float32 values in \[-1, 2\]; expected pixels 0..255 \(or floats in "):
    model.embed(np.array([[-1.0, 2.0]], np.float32)[None, :, :, None])
  with pytest.raises(UserError, match=r"shape \(2, 28, 28, 2\); expected \[N, H, W, C\] with C = 1, 3 or 4"):
    model.embed(np.zeros((2, 28, 28, 2), np.uint8))
  with pytest.raises(UserError, match=r"images\[1\]: shape \(5,\); expected"):
    model.embed([rgb[0], np.zeros(5, np.uint8)])


def test_embed_takes_any_dtype_pil_images_paths_and_mixed_lists(workdir, tmp_path):
  model = load_trained_model(workdir)
  gray = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  reference = model.embed(gray)
  # The same pixels in other dtypes: floats in [0, 1] (exact after * 255 for these values), 0..255 floats, int64.
  np.testing.assert_array_equal(model.embed(gray.astype(np.float64) / 255), reference)
  np.testing.assert_array_equal(model.embed(gray.astype(np.float32)), reference)
  np.testing.assert_array_equal(model.embed(gray.astype(np.int64)), reference)
  np.testing.assert_array_equal(model.embed(gray.astype(np.uint16) * 257), reference)  # 16-bit: / 257
  # Files and PIL images are read as training read its files: invert="no" keeps the pixels as they are, so
  # a lossless PNG of the pixels embeds exactly as the array does; "yes" flips them (255 - x).
  # (Another batch size may round float32 differently in the last bit: 1e-5 is far below any real change.)
  path = tmp_path / "a.png"
  Image.fromarray(gray[0, :, :, 0]).save(path)
  close = lambda actual, desired: np.testing.assert_allclose(actual, desired, rtol=0, atol=1e-5)
  close(model.embed(path, invert="no"), reference[:1])
  close(model.embed(Image.open(path), invert="no"), reference[:1])
  close(model.embed(str(path), invert="yes"), model.embed(255 - gray[:1]))
  assert np.abs(model.embed(str(path), invert="yes") - reference[:1]).max() > 1e-2
  # A list mixes kinds and sizes; each item is converted on its own, in order.
  big = np.asarray(Image.fromarray(gray[2, :, :, 0]).resize((56, 56), Image.Resampling.LANCZOS))
  mixed = model.embed([gray[0], Image.open(path), big], invert="no")
  assert mixed.shape == (3, 64)
  close(mixed[:2], reference[[0, 0]])
  close(mixed[2], model.embed(big)[0])


# ------------------------------------------------------------------------------------------------
# compare, gallery, openset on Omniglot evaluation images and on a folder dataset


@pytest.fixture(scope="module")
def omniglot_folders(omniglot_dir, tmp_path_factory) -> pathlib.Path:
  """gallery/<character>/ (2 drawings each of 4 Angelic characters) and queries/<character>/ (3 other
  drawings of those 4 and of 2 characters the gallery lacks), copied from images_evaluation.zip."""
  root = tmp_path_factory.mktemp("omniglot_images")
  with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as archive:
    names = sorted(n for n in archive.namelist() if n.startswith("images_evaluation/Angelic/") and n.endswith(".png"))
    for i, character in enumerate(f"character{c:02d}" for c in range(1, 7)):
      drawings = [n for n in names if f"/{character}/" in n]
      for part, chosen in (("gallery", drawings[:2] if i < 4 else []), ("queries", drawings[2:5])):
        for name in chosen:
          target = root / part / character / pathlib.Path(name).name
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(archive.read(name))
  return root


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory) -> pathlib.Path:
  """A folder dataset of 64x48 RGB images: 3 classes of coloured stripes, plus 1 class the gallery lacks."""
  root = tmp_path_factory.mktemp("colour_images")
  rng = np.random.default_rng(0)
  for c, name in enumerate(["red", "green", "blue", "grey"]):
    for i in range(5):
      image = rng.integers(0, 40, (48, 64, 3), dtype=np.uint8)
      image[:, 8 * c: 8 * c + 16, c % 3] = 255
      part = "gallery" if i < 2 and name != "grey" else "queries"
      (root / part / name).mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(root / part / name / f"{name}{i}.png")
  return root


def read_csv(path: pathlib.Path) -> list[dict]:
  with path.open() as file:
    return list(csv.DictReader(file))


def test_compare_on_omniglot_images(own_workdir, omniglot_folders, capsys):
  same = sorted((omniglot_folders / "queries" / "character01").iterdir())
  other = sorted((omniglot_folders / "queries" / "character02").iterdir())
  code, out, _ = run_launch(["--mode=compare", f"--workdir={own_workdir}", f"--image1={same[0]}",
                             f"--image2={same[1]}", "--invert=yes"], capsys)
  assert code == 0
  assert "decision: None" in out and "no calibrated threshold" in out
  assert "105x105 (PIL mode 1) resized/converted to the model's 28x28x1" in out
  result = compare_images(own_workdir, same[0], other[0], invert="yes", threshold=1e9)
  assert result["decision"] == "same"  # any distance is below 1e9
  model = load_trained_model(own_workdir)
  images = np.stack([load_image_file(p, (28, 28, 1), invert=True)[0] for p in (same[0], other[0])])
  embeddings = model.embed(images)
  assert result["distance"] == pytest.approx(float(np.linalg.norm(embeddings[0] - embeddings[1])), rel=1e-5)
  code, out, _ = run_launch(["--mode=calibrate", f"--workdir={own_workdir}", "--pairs=400"], capsys)
  assert code == 0 and "written:" in out
  threshold = json.loads((own_workdir / "eval" / "threshold.json").read_text())["threshold"]
  result = compare_images(own_workdir, same[0], other[0], invert="yes")
  assert result["threshold"] == threshold
  assert result["decision"] == ("same" if result["distance"] <= threshold else "different")


@pytest.mark.parametrize("method", ["nearest", "centroid", "medoid"])
def test_gallery_on_omniglot_images(own_workdir, omniglot_folders, method, capsys):
  output = own_workdir / f"predictions_{method}.csv"
  code, out, _ = run_launch(["--mode=gallery", f"--workdir={own_workdir}", f"--gallery={omniglot_folders / 'gallery'}",
                             f"--queries={omniglot_folders / 'queries'}", f"--method={method}", "--invert=yes",
                             f"--output={output}"], capsys)
  assert code == 0, out
  assert f"csv: {output}" in out and "gallery_classes: 4" in out and "unknown_class_queries: 6" in out
  rows = read_csv(output)
  assert len(rows) == 18
  first = rows[0]
  # The printed line rounds the raw distance to 4 digits, the CSV to 6: compare numbers, not strings
  # (rounding the CSV's already-rounded value again can differ in the last printed digit).
  prefix = f"  - {first['query']} -> {first['predicted']} (distance "
  assert prefix in out
  printed = float(out.split(prefix)[1].split()[0])
  assert printed == pytest.approx(float(first["distance"]), rel=1e-3)
  assert list(rows[0]) == ["query", "predicted", "distance", "runner_up", "runner_up_distance", "true_class", "correct"]
  # The CSV's distance is the distance to the predicted class, recomputed here from the embeddings.
  model = load_trained_model(own_workdir)
  gallery = load_gallery(omniglot_folders / "gallery", model.image_shape, invert=True)
  queries = load_queries(omniglot_folders / "queries", model.image_shape, invert=True)
  similarities = gallery_class_similarities(model.embed(queries.images), model.embed(gallery), gallery.labels,
                                            4, method)
  for row, scores in zip(rows, similarities):
    assert row["predicted"] == gallery.class_names[int(np.argmax(scores))]
    assert float(row["distance"]) == pytest.approx(-scores.max(), rel=1e-4)
    known = row["true_class"] in gallery.class_names
    assert row["correct"] == (str(int(row["predicted"] == row["true_class"])) if known else "")


def test_open_set_on_omniglot_images(own_workdir, omniglot_folders, capsys):
  arguments = [f"--workdir={own_workdir}", f"--gallery={omniglot_folders / 'gallery'}",
               f"--queries={omniglot_folders / 'queries'}", "--invert=yes"]
  code, _, err = run_launch(["--mode=openset", *arguments], capsys)
  assert "no calibrated threshold. Run `python launch.py --mode=calibrate" in error_line(code, err)
  code, out, _ = run_launch(["--mode=openset", *arguments, "--threshold=4.0"], capsys)
  assert code == 0, out
  assert "known_queries: 12" in out and "unknown_queries: 6" in out and "unknown_rejection_rate:" in out
  rows = read_csv(own_workdir / "eval" / "openset_nearest.csv")
  for row in rows:
    accepted = float(row["distance"]) <= 4.0
    assert row["decision"] == (row["predicted"] if accepted else "unknown")
    if row["true_class"] in ("character05", "character06"):  # not in the gallery: right when rejected
      assert row["correct"] == str(int(not accepted))
  flat = own_workdir / "flat_queries"
  flat.mkdir()
  shutil.copy(next((omniglot_folders / "queries" / "character01").iterdir()), flat / "query.png")
  code, _, err = run_launch(["--mode=openset", f"--workdir={own_workdir}", f"--gallery={omniglot_folders / 'gallery'}",
                             f"--queries={flat}", "--threshold=4.0"], capsys)
  assert "must come in class folders (queries/<class>/<image>)" in error_line(code, err)
  # Calibrated: open set rejects at the gallery threshold (a query's best of many classes), not the pair one.
  code, _, _ = run_launch(["--mode=calibrate", f"--workdir={own_workdir}", "--pairs=400"], capsys)
  assert code == 0
  record = json.loads((own_workdir / "eval" / "threshold.json").read_text())
  assert record["gallery_threshold_classes"] > 0 and record["gallery_threshold"] != record["threshold"]
  assert 0 <= record["gallery_calibration_unknown_rejection_rate"] <= 1
  report = open_set(own_workdir, omniglot_folders / "gallery", omniglot_folders / "queries", invert="yes")
  assert report["threshold"] == pytest.approx(record["gallery_threshold"])
  for row in read_csv(own_workdir / "eval" / "openset_nearest.csv"):
    accepted = float(row["distance"]) <= record["gallery_threshold"]
    assert row["decision"] == (row["predicted"] if accepted else "unknown")
  # A threshold calibrated on a gallery of 40 classes, used with this one of 4: the mode prints the note;
  # calibrated on 4, it does not.
  threshold_file = own_workdir / "eval" / "threshold.json"
  for calibrated, noted in ((40, True), (4, False)):
    threshold_file.write_text(json.dumps({**record, "gallery_threshold_classes": calibrated}))
    code, out, _ = run_launch(["--mode=openset", *arguments], capsys)
    assert code == 0, out
    assert ("note: the gallery threshold was calibrated on a gallery of 40 classes, this one has 4: expect more "
            "unknown queries rejected" in out) == noted, out


def test_gallery_size_note_flags_galleries_far_from_the_calibrated_size():
  # The gallery threshold holds for galleries near the calibration's size (a factor 2 either way); an
  # unknown query meets closer classes in a larger gallery, so fewer are rejected, and the note says so.
  record = {"threshold": 1.0, "gallery_threshold": 0.8, "gallery_threshold_classes": 75,
            "gallery_calibration_unknown_rejection_rate": 0.8}
  assert [gallery_size_note(record, n) for n in (38, 75, 150)] == [None, None, None]
  assert gallery_size_note(record, 330) == (
      "the gallery threshold was calibrated on a gallery of 75 classes, this one has 330: expect fewer unknown "
      "queries rejected than the calibration's 80.0%; check it with --mode=openset on labelled queries, or "
      "set your own with --threshold.")
  assert "this one has 37: expect more unknown queries rejected" in gallery_size_note(record, 37)
  assert gallery_size_note({"threshold": 1.0}, 330) is None  # --threshold given: no calibrated size


def test_compare_gallery_and_open_set_on_a_colour_folder_dataset(own_workdir, colour_folders, capsys):
  red = sorted((colour_folders / "queries" / "red").iterdir())
  code, out, _ = run_launch(["--mode=compare", f"--workdir={own_workdir}", f"--image1={red[0]}",
                             f"--image2={red[1]}", "--threshold=100"], capsys)
  assert code == 0 and "decision: same" in out
  assert "64x48 (PIL mode RGB) resized/converted to the model's 28x28x1" in out
  summary = classify_gallery(own_workdir, colour_folders / "gallery", colour_folders / "queries",
                             method="centroid")
  assert summary["gallery_classes"] == 3 and summary["queries"] == 14 and summary["unknown_class_queries"] == 5
  report = open_set(own_workdir, colour_folders / "gallery", colour_folders / "queries", threshold=0.0)
  # Distance threshold 0: nothing is accepted, so every unknown query is rejected and no known one is right.
  assert report["open_set"]["unknown_rejection_rate"] == 1.0 and report["open_set"]["known_accuracy"] == 0.0
  # Flat query folder (classes unknown): predictions only.
  summary = classify_gallery(own_workdir, colour_folders / "gallery", colour_folders / "queries" / "red")
  assert summary["queries"] == 3 and "accuracy" not in summary


def test_empty_gallery_class_and_gallery_without_classes_are_explained(own_workdir, colour_folders, tmp_path, capsys):
  gallery = tmp_path / "gallery"
  shutil.copytree(colour_folders / "gallery", gallery)
  (gallery / "empty").mkdir()
  code, _, err = run_launch(["--mode=gallery", f"--workdir={own_workdir}", f"--gallery={gallery}",
                             f"--queries={colour_folders / 'queries'}"], capsys)
  line = error_line(code, err)
  assert f"gallery: class folder {gallery / 'empty'}: holds no images" in line
  flat = tmp_path / "flat"
  flat.mkdir()
  shutil.copy(next((colour_folders / "gallery" / "red").iterdir()), flat / "one.png")
  with pytest.raises(UserError, match="holds images but no class folders; a gallery needs one sub-folder per class"):
    classify_gallery(own_workdir, flat, colour_folders / "queries")
  code, _, err = run_launch(["--mode=compare", f"--workdir={own_workdir}", f"--image1={flat / 'one.png'}"], capsys)
  assert error_line(code, err) == "error: --mode=compare needs --image2."
  code, _, err = run_launch(["--mode=eval", f"--workdir={own_workdir}", "--ways=5,x"], capsys)
  assert "--ways=5,x: expected comma-separated positive integers" in error_line(code, err)


# ------------------------------------------------------------------------------------------------
# A model with a pair head (Koch): episodes, thresholds and compare score with the head's probability


@pytest.fixture(scope="module")
def koch_workdir(tmp_path_factory) -> pathlib.Path:
  """A Koch network (65x65, the smallest its valid convolutions take; 32-d features) on synthetic data,
  saved untrained at step 0 with its config: restoring and scoring do not need a trained one."""
  from siamese_jax.configs import omniglot_koch
  workdir = tmp_path_factory.mktemp("koch")
  config = omniglot_koch.get_config("smoke")
  config.data.source = "synthetic"
  config.data.synthetic_classes = 40
  config.data.image_size = 65
  config.model.embedding_dim = 32
  built = training.setup(config)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  saver = checkpoint.Checkpointer(workdir / "checkpoints", asynchronous=False)
  saver.save(0, built.state, {}, {}, force=True)
  saver.close()
  return workdir


def test_koch_head_scores_episodes_thresholds_and_compare(koch_workdir, tmp_path):
  model = load_trained_model(koch_workdir)
  assert model.has_pair_head and model.step == 0
  results = evaluate_workdir(koch_workdir, ways=(5,), shots=(1, 2), num_episodes=20, num_pairs=200,
                             progress=False)
  assert results["scoring"] == "pair_head"
  assert results["verification"]["threshold"]["scoring"] == "pair_head"
  assert 0 < results["verification"]["threshold"]["threshold"] < 1
  assert 0 <= results["episodes"]["unstructured"]["5way2shot"]["mean"] <= 1
  # The episode numbers are the head's: recompute one setting from the model's own functions.
  test = pipeline.load_splits(model.config.data, seed=model.config.seed).test
  embeddings = model.embed(test)
  episodes = sample_episodes(test.labels, test.class_groups, ways=5, shots=1, queries=1, num_episodes=20,
                             seed=0, within_group=False)
  accuracy = episode_accuracies(embeddings, episodes, model.scorer).mean()
  assert results["episodes"]["unstructured"]["5way1shot"]["mean"] == pytest.approx(accuracy)
  image = tmp_path / "a.png"
  Image.fromarray(np.asarray(test[0])[..., 0]).save(image)
  compared = compare_images(koch_workdir, image, image)
  # One image twice: the same embedding up to float32 rounding, which may differ between the two rows of
  # a batch on some CPUs; a real difference is orders of magnitude larger.
  assert compared["distance"] == pytest.approx(0.0, abs=1e-5) and 0 < compared["probability"] < 1
  assert compared["decision"] == ("same" if compared["probability"] >= compared["threshold"] else "different")
  with pytest.raises(UserError, match="scoring='pair_head' needs a model with a pair head"):
    resolve_scoring("pair_head", has_pair_head=False)


def test_training_report_scores_a_koch_model_with_its_head_like_eval_mode(koch_workdir):
  # The report printed at the end of training and --mode=eval must agree on how a pair-head model is
  # scored: the same 20 episodes give the same accuracy, and it is not the distance-based one.
  model = load_trained_model(koch_workdir)
  config = model.config
  config.eval.test_ways, config.eval.test_shots, config.eval.test_episodes = (5,), (1,), 20
  built = training.setup(config)  # the same seed rebuilds the saved step-0 state
  embed_fn = models.make_embed_fn(built.graphdef)
  report = training.final_report(embed_fn, built.state, built.splits, config, step=0,
                              scorer=built.scorer(built.state))
  by_eval = evaluate_workdir(koch_workdir, ways=(5,), shots=(1,), num_episodes=20, num_pairs=200,
                             progress=False)
  # The synthetic test split's groups hold 4 classes, so 5-way within-group episodes are skipped by both.
  assert "skipped" in report["episodes"]["within"]["5way1shot"]
  assert report["episodes"]["unstructured"]["5way1shot"]["mean"] == pytest.approx(
      by_eval["episodes"]["unstructured"]["5way1shot"]["mean"])
  by_distance = training.final_report(embed_fn, built.state, built.splits, config, step=0, scorer=scoring.DISTANCE)
  assert by_distance["episodes"] != report["episodes"]


def test_validation_of_a_pair_head_model_compiles_its_head_once(koch_workdir):
  # Validation runs every eval_every steps with new parameters: the head's probability is built once in
  # setup and reused, so a second validation on other parameters compiles nothing (counted with jax's
  # public compile-time events). A model without a head has none (it is scored by distance).
  config = load_trained_model(koch_workdir).config
  built = training.setup(config)
  embed_fn = models.make_embed_fn(built.graphdef)
  later = built.state.replace(params=jax.tree.map(lambda x: x * 1.5, built.state.params))
  def validate(state):
    return training.validation_accuracy(embed_fn, state, built.splits.validation, config.eval, seed=0,
                                     scorer=built.scorer(state))
  compiles = []
  def count(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    first = validate(built.state)
    compiled_first = len(compiles)
    second = validate(later)
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert compiled_first > 0 and len(compiles) == compiled_first and second != first
  # The same number eval mode's model gives for the step-0 state (scored by its own scorer).
  model = load_trained_model(koch_workdir)
  validation = pipeline.all_images(built.splits.validation)
  assert first == pytest.approx(validation_accuracy(
      model.embed(validation), built.splits.validation, config.eval, 0, model.scorer))
  config.model.name, config.loss.name = "conv4", "contrastive"  # the same pair batches, no head
  assert training.setup(config).pair_probability is None


# ------------------------------------------------------------------------------------------------
# ensemble: several workdirs as one model


@pytest.fixture(scope="module")
def narrow_workdir(tmp_path_factory) -> pathlib.Path:
  """A second member: the smoke run at half the width (same data and seed, so the same splits)."""
  workdir = tmp_path_factory.mktemp("narrow") / "run"
  config = smoke_config()
  config.model.width = 32
  training.train_and_evaluate(config, workdir)
  return workdir


def _squared_distances(embeddings: np.ndarray) -> np.ndarray:
  return np.sum((embeddings[:, None].astype(np.float64) - embeddings[None]) ** 2, axis=-1)


def test_ensemble_is_its_members_side_by_side_in_every_mode(workdir, narrow_workdir, tmp_path, capsys):
  ensemble_dir = tmp_path / "ensemble"
  code, out, err = run_launch(["--mode=ensemble", f"--workdir={ensemble_dir}",
                               f"--members={workdir},{narrow_workdir}"], capsys)
  assert code == 0, err
  record = json.loads((ensemble_dir / "ensemble.json").read_text())
  members = [load_trained_model(w) for w in (workdir, narrow_workdir)]
  # Its paths are relative to the ensemble's workdir, and lead to each member's best checkpoint.
  assert not any(pathlib.Path(m[key]).is_absolute() for m in record["members"] for key in ("workdir", "checkpoint"))
  assert [os.path.normpath(ensemble_dir.resolve() / m["checkpoint"]) for m in record["members"]] == [
      str(m.checkpoint_dir.resolve()) for m in members]
  model = load_trained_model(ensemble_dir)
  assert model.describe()["members"] == [m.describe() for m in members]
  splits = pipeline.load_splits(model.config.data, seed=model.config.seed)
  images = pipeline.all_images(splits.test)[:24]
  separate = [m.embed(images) for m in members]
  together = model.embed(images)
  assert together.shape == (24, 64 + 32)
  # Its squared distance is the mean of the members', each in units of its RMS length on validation.
  expected = sum(_squared_distances(e) / m["rms_embedding_length"] ** 2 for e, m in zip(separate, record["members"]))
  np.testing.assert_allclose(_squared_distances(together), expected / 2, rtol=1e-4, atol=1e-6)
  validation = model.embed(splits.validation)
  assert np.sqrt(np.mean(np.sum(validation.astype(np.float64) ** 2, axis=-1))) == pytest.approx(1.0, rel=1e-5)
  # Each member's validation accuracy is the one its training run stored with that checkpoint (the same
  # protocol), and the ensemble's is that protocol on the ensemble's embeddings.
  summary = make_ensemble(tmp_path / "again", [workdir, narrow_workdir], progress=False)
  for member, loaded in zip((workdir, narrow_workdir), members):
    stored = read_metrics(member)
    at_step = [r["validation/accuracy"] for r in stored if r["step"] == loaded.step and "validation/accuracy" in r]
    assert summary["members"][str(member)]["validation_accuracy"] == pytest.approx(at_step[-1], abs=1e-6)
  assert summary["validation_accuracy"] == pytest.approx(
      validation_accuracy(validation, splits.validation, model.config.eval, model.config.seed))
  assert f"validation_accuracy: {summary['validation_accuracy']:.6g}" in out
  # Every mode on a workdir works on the ensemble's.
  code, out, err = run_launch(["--mode=eval", f"--workdir={ensemble_dir}", "--episodes=50", "--ways=5",
                               "--shots=1", "--pairs=200"], capsys)
  assert code == 0, err
  results = json.loads((ensemble_dir / "eval" / "results.json").read_text())
  assert len(results["checkpoint"]["members"]) == 2 and "ensemble of 2 members" in out
  assert f"Results at steps {members[0].step} / {members[1].step} (" in out  # each member's own step
  image = tmp_path / "a.png"
  Image.fromarray(np.asarray(splits.test[0])[..., 0]).save(image)
  code, out, err = run_launch(["--mode=compare", f"--workdir={ensemble_dir}", f"--image1={image}",
                               f"--image2={image}"], capsys)
  assert code == 0 and "decision: same" in out, err


def test_bad_ensembles_are_explained(workdir, narrow_workdir, koch_workdir, tmp_path, capsys):
  target = tmp_path / "ensemble"
  with pytest.raises(UserError, match="needs at least 2 trained workdirs, got 1"):
    make_ensemble(target, [workdir])
  with pytest.raises(UserError, match="names a workdir twice"):
    make_ensemble(target, [workdir, workdir])
  with pytest.raises(UserError, match=f"ensemble member {koch_workdir}: has a pair head"):
    make_ensemble(target, [workdir, koch_workdir])
  with pytest.raises(UserError, match="holds a training run"):
    make_ensemble(narrow_workdir, [workdir, narrow_workdir])
  # The same run under another seed: on synthetic data its training classes are other records, among
  # them some of the first member's test images, so its scores there would not be one-shot.
  reseeded = copy_of(narrow_workdir, tmp_path / "reseeded")
  config = json.loads((reseeded / "config.json").read_text())
  config["seed"] = 1
  (reseeded / "config.json").write_text(json.dumps(config))
  code, _, err = run_launch(["--mode=ensemble", f"--workdir={target}", f"--members={workdir},{reseeded}"], capsys)
  assert re.match(rf"error: ensemble member {reseeded}: trained on \d+ image\(s\) of the first member's "
                  r"(validation|test) split", error_line(code, err)), err
  assert not target.exists()
  member = copy_of(narrow_workdir, tmp_path / "member")
  make_ensemble(target, [workdir, member], progress=False)
  code, _, err = run_launch(["--mode=eval", f"--workdir={target}", "--checkpoint=latest"], capsys)
  assert "checkpoints and configs were fixed when it was made" in error_line(code, err)
  shutil.rmtree(member / "checkpoints")
  code, _, err = run_launch(["--mode=compare", f"--workdir={target}", "--image1=a", "--image2=b"], capsys)
  assert "is gone; make the ensemble again" in error_line(code, err)
  code, _, err = run_launch(["--mode=ensemble", f"--workdir={tmp_path / 'other'}"], capsys)
  assert error_line(code, err) == "error: --mode=ensemble needs --members."
  with pytest.raises(UserError, match="holds an ensemble .*ensemble.json.*train into a workdir of its own"):
    training.train_and_evaluate(smoke_config(), target)
  assert sorted(p.name for p in target.iterdir()) == ["ensemble.json"]


def test_an_ensemble_moves_with_its_members(workdir, narrow_workdir, tmp_path):
  tree = tmp_path / "tree"
  members = [copy_of(workdir, tree / "runs" / "a"), copy_of(narrow_workdir, tree / "runs" / "b")]
  make_ensemble(tree / "ensembles" / "ab", members, progress=False)
  before = load_trained_model(tree / "ensembles" / "ab")
  images = np.random.default_rng(0).integers(0, 256, (4, *before.image_shape), dtype=np.uint8)
  expected = before.embed(images)
  tree.rename(tmp_path / "moved")
  after = load_trained_model(tmp_path / "moved" / "ensembles" / "ab")
  assert [str(m.checkpoint_dir) for m in after.members] == [
      str(tmp_path / "moved" / "runs" / name / "checkpoints" / str(m.step)) for name, m in zip("ab", after.members)]
  np.testing.assert_array_equal(after.embed(images), expected)
  assert after.config_hash == before.config_hash  # a threshold calibrated before the move still applies
