"""The served model (--mode=export_model, siamese_jax/serving.py): a fresh process that imports only
jax, numpy and siamese_jax.serving embeds as the eval mode does, at any batch size; damaged or foreign
files are one clear error naming the file."""

import contextlib
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
from absl import flags

import launch
from siamese_jax import checkpoint, serving, trained, training
from siamese_jax.data import pipeline, sources
from siamese_jax.errors import UserError
from siamese_jax.modes.ensemble import make_ensemble
from siamese_jax.modes.evaluate import calibrate_workdir
from siamese_jax.modes.export_model import export_model_workdir, export_served_model
from siamese_jax.trained import load_trained_model
from trained_workdir import copy_of, smoke_config, trained_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
# Rounding only: the artifact runs the eval's own function and weights, at other batch sizes (XLA may
# then pick other convolution algorithms; a real difference is orders of magnitude larger).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A copy of the session's smoke run (training calibrated its distance threshold on the validation classes)."""
  return copy_of(trained_workdir(tmp_path_factory), tmp_path_factory.mktemp("serving") / "run")


def run_launch(argv: list[str]) -> tuple[int, str, str]:
  """launch.py's flag parsing and main in this process: (exit code, stdout, stderr)."""
  flags.FLAGS.unparse_flags()
  out, err = io.StringIO(), io.StringIO()
  code = 0
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      launch.main(launch.parse_flags(["launch.py", *argv]))
  except SystemExit as exit_:
    code = exit_.code
  finally:
    flags.FLAGS.unparse_flags()
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def artifact(workdir) -> pathlib.Path:
  code, out, err = run_launch(["--mode=export_model", f"--workdir={workdir}"])
  assert code == 0, err
  path = workdir / "eval" / "model.zip"
  assert f"written: {path}" in out and "platforms: \n  - cpu\n  - cuda\n" in out
  return path


# What the fresh process runs: only the serving module, then the artifact at two batch sizes.
SERVE = """
import json, sys
import numpy as np
import siamese_jax.serving as serving
served = serving.load_artifact(sys.argv[1])
images = np.load(sys.argv[2])
np.savez(sys.argv[3], whole=served.embed(images, batch_size=16), in_threes=served.embed(images, batch_size=3),
         none=served.embed(images[:0]))
heavy = ("flax", "optax", "orbax", "grain", "ml_collections", "tensorflow", "PIL", "matplotlib", "sklearn")
print(json.dumps({"project": sorted(m for m in sys.modules if m.split(".")[0] == "siamese_jax"),
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
                  "threshold": served.threshold, "image_shape": list(served.image_shape)}))
"""


def test_a_fresh_process_with_only_jax_embeds_as_the_eval_mode(workdir, artifact, tmp_path):
  model = load_trained_model(workdir)
  test = pipeline.load_splits(model.config.data, seed=model.config.seed).test
  images = pipeline.all_images(test)[:10]
  expected = model.embed(images)
  np.save(tmp_path / "images.npy", images)
  done = subprocess.run([sys.executable, "-c", SERVE, str(artifact), str(tmp_path / "images.npy"),
                         str(tmp_path / "out.npz")], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  report = json.loads(done.stdout.splitlines()[-1])
  assert report["project"] == ["siamese_jax", "siamese_jax.errors", "siamese_jax.serving"]
  assert report["heavy"] == []
  record = json.loads((workdir / "eval" / "threshold.json").read_text())
  assert report["threshold"] == record["threshold"] and report["image_shape"] == [28, 28, 1]
  with np.load(tmp_path / "out.npz") as out:
    # 10 images in one padded batch of 16, and in batches of 3, 3, 3 and 1: the batch dimension is symbolic.
    for name in ("whole", "in_threes"):
      assert out[name].shape == (10, 64) and out[name].dtype == np.float32
      assert np.abs(out[name] - expected).max() <= TOLERANCE, name
    assert out["none"].shape == (0, 64)


def test_the_spec_says_what_the_function_takes_and_how_to_decide(workdir, artifact):
  model = load_trained_model(workdir)
  served = serving.load_artifact(artifact)
  spec = served.spec
  assert spec["format"] == "siamese_jax.served_model" and spec["format_version"] == 1
  assert spec["platforms"] == ["cpu", "cuda"]
  assert spec["input"] == {"shape": [None, 28, 28, 1], "dtype": "uint8", "layout": "NHWC", "channels": 1,
                           "range": [0, 255]}
  assert spec["output"] == {"shape": [None, 64], "dtype": "float32", "embedding_dim": 64}
  assert spec["preprocessing"] == {"invert": False, "resize": "stretch", "color": "L"}  # synthetic data: as is
  assert spec["normalisation"]["backbone_preprocessing"] is None and spec["normalisation"]["tta_shift_px"] == 0
  assert (spec["model"], spec["step"], spec["config_hash"]) == ("conv4", model.step, model.config_hash)
  record = json.loads((workdir / "eval" / "threshold.json").read_text())
  assert spec["threshold"] == record and "threshold_note" not in spec
  assert served.threshold == record["threshold"] and served.gallery_threshold == record["gallery_threshold"]
  assert served.exported.in_avals[0].shape[1:] == (28, 28, 1)
  assert not isinstance(served.exported.in_avals[0].shape[0], int)  # symbolic: any batch size
  with pytest.raises(UserError, match=r"takes uint8 images \[N, 28, 28, 1\]; got float32 \[2, 28, 28, 1\]"):
    served.embed(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(UserError, match=r"got uint8 \[2, 32, 32, 1\]"):
    served.embed(np.zeros((2, 32, 32, 1), np.uint8))


def _rewrite(source: pathlib.Path, target: pathlib.Path, edit_spec=None, drop: str | None = None) -> pathlib.Path:
  with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
    for name in old.namelist():
      data = old.read(name)
      if name == drop:
        continue
      if name == "spec.json" and edit_spec:
        spec = json.loads(data)
        edit_spec(spec)
        data = json.dumps(spec).encode()
      new.writestr(name, data)
  return target


def test_damaged_and_foreign_files_are_one_clear_error(workdir, artifact, tmp_path):
  data = artifact.read_bytes()
  cases = {}
  cases["missing.zip"] = "not found; write a served model with `python launch.py --mode=export_model"
  (tmp_path / "text.zip").write_text("not a zip")
  cases["text.zip"] = r"not a readable served model \(BadZipFile"
  (tmp_path / "truncated.zip").write_bytes(data[:len(data) // 2])
  cases["truncated.zip"] = "not a readable served model"
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0xFF  # inside the compressed function: zlib or the CRC-32 notices
  (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
  cases["flipped.zip"] = "not a readable served model"
  with zipfile.ZipFile(tmp_path / "foreign.zip", "w") as foreign:
    foreign.writestr("hello.txt", "hello")
  cases["foreign.zip"] = r"not a siamese_jax served model \(no spec.json in the zip\)"
  _rewrite(artifact, tmp_path / "other_format.zip", lambda spec: spec.update(format="keras"))
  cases["other_format.zip"] = "spec.json format 'keras', expected 'siamese_jax.served_model'"
  _rewrite(artifact, tmp_path / "version.zip", lambda spec: spec.update(format_version=2))
  cases["version.zip"] = "served model format version 2; this siamese_jax reads version 1"
  _rewrite(artifact, tmp_path / "checksum.zip", lambda spec: spec["sha256"].update({"embed.jax_export": "0" * 64}))
  cases["checksum.zip"] = "embed.jax_export does not match its checksum in spec.json"
  _rewrite(artifact, tmp_path / "no_function.zip", drop="embed.jax_export")
  cases["no_function.zip"] = "its embed.jax_export is missing"
  garbage = tmp_path / "garbage.zip"
  checksum = hashlib.sha256(b"garbage").hexdigest()
  _rewrite(artifact, garbage, lambda spec: spec["sha256"].update({"embed.jax_export": checksum}),
           drop="embed.jax_export")
  with zipfile.ZipFile(garbage, "a") as archive:
    archive.writestr("embed.jax_export", b"garbage")
  cases["garbage.zip"] = "cannot deserialize its exported function"
  for name, message in cases.items():
    path = tmp_path / name
    with pytest.raises(UserError, match=message) as raised:
      serving.load_artifact(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value), name
  # Lowered for CUDA only: a CPU process says so, and how to export for both.
  cuda_only = tmp_path / "cuda.zip"
  result = export_served_model(load_trained_model(workdir), cuda_only, platforms=("cuda",))
  assert result["check"] == "not run: this machine runs on cpu"
  with pytest.raises(UserError, match=r"cuda.zip: exported for cuda, but this process runs on cpu; export it "
                                      r"with --platforms=cuda,cpu"):
    serving.load_artifact(cuda_only)
  code, _, err = run_launch(["--mode=export_model", f"--workdir={workdir}", "--platforms=cpu,gpu"])
  assert code == 2 and "error: platforms=['cpu', 'gpu']: expected some of ('cpu', 'cuda', 'rocm', 'tpu')" in err


def test_an_uncalibrated_workdir_exports_without_a_threshold_and_says_why(tmp_path_factory, tmp_path):
  workdir = copy_of(trained_workdir(tmp_path_factory), tmp_path / "run")
  (workdir / "eval" / "threshold.json").unlink()
  result = export_model_workdir(workdir, output=tmp_path / "model.zip", progress=False)
  assert result["threshold"] is None and result["check_max_abs_difference"] <= TOLERANCE
  assert result["threshold_note"].startswith("no calibrated threshold (")
  served = serving.load_artifact(tmp_path / "model.zip")
  assert served.threshold is None and served.spec["threshold_note"] == result["threshold_note"]


@pytest.mark.slow
def test_an_ensemble_and_a_pair_head_model_export_as_distance_models(tmp_path_factory, tmp_path):
  # An ensemble exports through its combined embed_fn: its members' scaled embeddings side by side.
  workdir = trained_workdir(tmp_path_factory)
  ensemble_dir = tmp_path / "ensemble"
  make_ensemble(ensemble_dir, [workdir, copy_of(workdir, tmp_path / "copy")], progress=False)
  ensemble = load_trained_model(ensemble_dir)
  result = export_served_model(ensemble, tmp_path / "ensemble.zip")
  served = serving.load_artifact(tmp_path / "ensemble.zip")
  images = pipeline.all_images(pipeline.load_splits(ensemble.config.data, seed=ensemble.config.seed).test)[:6]
  assert np.abs(served.embed(images) - ensemble.embed(images)).max() <= TOLERANCE
  assert result["embedding_dim"] == 128 and served.spec["model"] == "ensemble"
  assert [m["step"] for m in served.spec["members"]] == [m.step for m in ensemble.members]
  # A pair-head model (untrained, step 0): the artifact has no head, so its threshold.json (the head's
  # probability) is replaced by a distance threshold calibrated on the validation classes.
  config = smoke_config()
  config.loss = ml_collections.ConfigDict({"name": "koch_bce"})
  config.sampling.kind = "pairs"
  config.model.pair_head = True
  head_dir = tmp_path / "head"
  head_dir.mkdir()
  (head_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
  saver = checkpoint.Checkpointer(head_dir / "checkpoints", asynchronous=False)
  saver.save(0, training.setup(config).state, {}, {}, force=True)
  saver.close()
  assert calibrate_workdir(head_dir, num_pairs=200, progress=False)["scoring"] == "pair_head"
  result = export_model_workdir(head_dir, progress=False)
  served = serving.load_artifact(head_dir / "eval" / "model.zip")
  assert served.spec["threshold"]["scoring"] == "distance" and served.threshold == result["threshold"] > 0
  assert "holds the pair head's threshold; the artifact's is a distance threshold" in result["threshold_note"]


def test_load_gives_the_served_file_the_trained_models_api(workdir, artifact):
  # siamese_jax.load on the file: embed takes what TrainedModel.embed takes (here an ImageSource and one
  # image of another size), compare decides at the exported threshold, as the trained model does.
  served, model = trained.load(artifact), trained.load(workdir)
  assert isinstance(served, trained.ExportedModel) and served.step == model.step
  source = sources.synthetic_source(num_classes=3, per_class=2, image_shape=model.image_shape)
  np.testing.assert_allclose(served.embed(source), model.embed(source), rtol=0, atol=1e-5)
  image = np.zeros((40, 40), np.uint8)
  compared, expected = served.compare(image, source[0]), model.compare(image, source[0])
  assert compared.distance == pytest.approx(expected.distance, abs=1e-5)
  assert compared.threshold == expected.threshold and compared.same == expected.same
  with pytest.raises(UserError, match="is a served model file: it holds one checkpoint"):
    trained.load(artifact, checkpoint="latest")
