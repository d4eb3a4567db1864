"""User mistakes give a specific UserError (file, class or field named, what was expected), never a deep
JAX traceback; through `launch.py` they print `error: <message>` and exit 2.

Most cases call `training.setup(config)`, which builds everything before training and so finds every
config and data mistake; a few go through `launch.py` as a subprocess to check the exit code and stderr.
The tests run with 4 fake CPU devices (conftest.py).
"""

import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from siamese_jax.configs import folder as folder_config
from siamese_jax.configs import omniglot as omniglot_config
from siamese_jax import training
from siamese_jax.errors import UserError, optional_import

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES, PER_CLASS = 8, 5  # folder smoke: 5 train classes after the test/validation split, m = 4


def write_images(class_dir: pathlib.Path, count: int, seed: int = 0) -> None:
  class_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(class_dir / f"img{i}.png")


def make_folder_dataset(root: pathlib.Path, extra: dict[str, int] | None = None) -> pathlib.Path:
  """root/class<i>/img<j>.png: NUM_CLASSES classes of PER_CLASS images, plus `extra` {class: count}."""
  counts = {f"class{i}": PER_CLASS for i in range(NUM_CLASSES)} | dict(extra or {})
  for seed, (name, count) in enumerate(counts.items()):
    write_images(root / name, count, seed)
  return root


def folder_smoke(path: pathlib.Path) -> ml_collections.ConfigDict:
  config = folder_config.get_config("smoke")
  config.data.path = str(path)
  return config


def setup_error(config: ml_collections.ConfigDict) -> str:
  with pytest.raises(UserError) as error:
    training.setup(config)
  return str(error.value)


def run_launch(args: list[str], tmp_path: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
  environment = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  environment["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type="
  return subprocess.run([sys.executable, "launch.py", f"--workdir={tmp_path / 'run'}", *args], cwd=REPO,
                        env=environment, capture_output=True, text=True, timeout=120)


def assert_user_error_exit(result: subprocess.CompletedProcess) -> str:
  """Exit 2, an `error:` line on stderr and no traceback; returns the error line."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> pathlib.Path:
  return make_folder_dataset(tmp_path_factory.mktemp("good_folder"))


# ------------------------------------------------------------------------------------------------
# 1. A missing dataset path says which path and how to fix it.


def test_missing_omniglot_dir_names_path_and_env(monkeypatch):
  monkeypatch.setenv("OMNIGLOT_DIR", "/nonexistent")
  config = omniglot_config.get_config("smoke")
  config.data.download = False
  message = setup_error(config)
  assert "/nonexistent/images_background.zip" in message
  assert "folder from $OMNIGLOT_DIR" in message  # where the path came from, not "the data_dir argument"
  assert "set OMNIGLOT_DIR to the folder that holds it" in message
  assert "data.download" in message


def test_missing_omniglot_dir_through_launch(tmp_path):
  result = run_launch(["--config=configs/omniglot.py:smoke", "--config.data.download=False"], tmp_path,
                      OMNIGLOT_DIR="/nonexistent")
  line = assert_user_error_exit(result)
  assert line.startswith("error: Omniglot background: neither /nonexistent/images_background.zip")
  assert "OMNIGLOT_DIR" in line


def test_missing_folder_path(tmp_path):
  message = setup_error(folder_smoke(tmp_path / "no_such_folder"))
  assert f"image folder {tmp_path / 'no_such_folder'}: not found" in message
  config = folder_smoke(tmp_path)
  config.data.path = ""
  assert "data.path must name the image folder" in setup_error(config)


# ------------------------------------------------------------------------------------------------
# 2-4. Folder data sets: an empty class, a class too small for the sampler, an unreadable image.


def test_empty_class_folder_is_named(tmp_path):
  make_folder_dataset(tmp_path)
  (tmp_path / "emptyclass").mkdir()
  (tmp_path / "emptyclass" / "notes.txt").write_text("not an image")
  message = setup_error(folder_smoke(tmp_path))
  assert f"class folder {tmp_path / 'emptyclass'}: holds no images" in message
  assert "add images or remove the folder" in message


def train_only_one_held_out(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """1 of the 10 classes is held out for testing and none for validation, so of the two short classes
  at least one is a training class, whichever the seeded split holds out."""
  config.data.test_fraction = 0.1
  config.data.validation_fraction = 0.0
  return config


def test_single_image_class_with_pair_sampling_is_named(tmp_path):
  config = train_only_one_held_out(folder_smoke(make_folder_dataset(tmp_path, {"lonely_a": 1, "lonely_b": 1})))
  config.sampling.kind = "pairs"
  config.loss = ml_collections.ConfigDict({"name": "contrastive"})
  message = setup_error(config)
  assert re.search(r"class 'lonely_[ab]' has 1 image\(s\); pairs sampling", message), message
  assert "needs at least 2 per class" in message


def test_class_smaller_than_m_per_class_is_named(tmp_path):
  config = train_only_one_held_out(folder_smoke(make_folder_dataset(tmp_path, {"short_a": 3, "short_b": 3})))
  assert config.sampling.kind == "m_per_class" and config.sampling.m_per_class == 4
  message = setup_error(config)
  assert re.search(r"class 'short_[ab]' has 3 image\(s\); m-per-class sampling with m=4", message), message
  assert "needs at least 4 per class" in message


def test_unreadable_image_is_named(tmp_path):
  make_folder_dataset(tmp_path)
  broken = tmp_path / "class3" / "broken.png"
  broken.write_bytes(b"\x00garbage, not a PNG\xff" * 10)
  message = setup_error(folder_smoke(tmp_path))
  assert f"{broken}: cannot decode this image" in message
  assert "Replace or delete the file" in message
  assert "BytesIO" not in message  # PIL's own text names an in-memory buffer, not the file


# ------------------------------------------------------------------------------------------------
# 5. Unknown config keys: on the command line (locked config) and inside sub-configs.


def test_unknown_config_key_on_command_line(tmp_path):
  result = run_launch(["--config=configs/omniglot.py:smoke", "--config.train.nonexistent=1"], tmp_path)
  line = assert_user_error_exit(result)
  assert line.startswith("error: --config.train.nonexistent: config.train has no field 'nonexistent'")
  assert "configs/omniglot.py:smoke" in line and "num_steps" in line  # the file, and the valid fields


def test_missing_config_file_is_named(tmp_path):
  result = run_launch(["--config=configs/omniglot_tripplet.py"], tmp_path)
  line = assert_user_error_exit(result)
  assert line.startswith("error: --config=configs/omniglot_tripplet.py: no config file 'configs/omniglot_tripplet.py'")
  assert "configs/omniglot_hour.py" in line  # the shipped configs, to pick from


def test_unknown_config_variant_is_named(tmp_path):
  result = run_launch(["--config=configs/ablations/omniglot_best.py:rotation"], tmp_path)
  line = assert_user_error_exit(result)
  assert line == ("error: --config=configs/ablations/omniglot_best.py:rotation: unknown config variant 'rotation' "
                  "(known: batches120, rotations, rotations_batches120, smoke)")


def test_misspelled_sub_config_field_on_command_line(tmp_path):
  result = run_launch(["--config=configs/omniglot.py:smoke", "--config.model.widht=32"], tmp_path)
  line = assert_user_error_exit(result)
  assert "--config.model.widht: config.model has no field 'widht'" in line
  assert "Did you mean --config.model.width?" in line


def test_misspelled_model_field(good_folder):
  config = folder_smoke(good_folder)
  config.model.widht = (8, 16)
  message = setup_error(config)
  assert "model: unknown field(s) ['widht'] for model.name='resnet'" in message
  assert "valid fields are" in message and "(model.widht: did you mean model.widths?)" in message


def test_field_of_another_model_is_named(good_folder):
  config = folder_smoke(good_folder)
  config.model.name = "conv4"  # resnet's widths/blocks_per_stage do not exist on conv4
  message = setup_error(config)
  assert "model: unknown field(s) ['blocks_per_stage', 'widths'] for model.name='conv4'" in message
  assert "remove the old model's fields" in message


def test_unknown_optimizer_and_loss_fields(good_folder):
  config = folder_smoke(good_folder)
  config.optim.nonexistent = 1
  assert "optimizer config has no field 'nonexistent'; valid fields:" in setup_error(config)
  config = folder_smoke(good_folder)
  config.loss.marign = 0.3
  assert "loss 'triplet' has no option 'marign'; valid options: distance, margin, mining" in setup_error(config)


# ------------------------------------------------------------------------------------------------
# 6. Unknown loss, model and optimizer names list the valid ones.


def test_unknown_loss_name_lists_valid_losses(good_folder):
  config = folder_smoke(good_folder)
  config.loss = ml_collections.ConfigDict({"name": "foo"})
  message = setup_error(config)
  assert ("loss name 'foo' is not known; choose one of arcface, circle, contrastive, cosface, koch_bce, "
          "lifted_structure, multi_similarity, prototypical, proxy_anchor, supcon, triplet") in message


def test_unknown_model_name_lists_valid_models(good_folder):
  config = folder_smoke(good_folder)
  config.model = ml_collections.ConfigDict({"name": "vgg"})
  assert "model.name='vgg' is not a known model; choose one of ['conv4', 'efficientnet_lite0', 'koch', 'resnet', 'resnet18', 'resnet34', 'resnet50', 'vgg16']" in setup_error(config)


def test_unknown_optimizer_name_lists_valid_optimizers(good_folder):
  config = folder_smoke(good_folder)
  config.optim.name = "adagrad"
  assert "name='adagrad' is not known; choose one of sgd, adam, adamw, rmsprop" in setup_error(config)


# ------------------------------------------------------------------------------------------------
# 7. The global batch must split evenly over the devices.


def test_batch_size_not_divisible_by_device_count():
  config = omniglot_config.get_config("smoke")
  config.data.source = "synthetic"
  config.sampling.batch_size = 18
  config.sampling.m_per_class = 3
  message = setup_error(config)
  assert "sampling.batch_size=18 is not divisible by the number of devices (4); choose a multiple of 4" in message


def test_batch_size_not_divisible_through_launch(tmp_path):
  result = run_launch(["--config=configs/omniglot.py:smoke", "--config.data.source=synthetic",
                       "--config.sampling.batch_size=18"], tmp_path)
  line = assert_user_error_exit(result)
  assert line == ("error: sampling.batch_size=18 is not divisible by the number of devices (4); "
                  "choose a multiple of 4.")


def test_a_pair_head_that_no_loss_trains_is_refused():
  config = omniglot_config.get_config("smoke")
  config.data.source = "synthetic"
  config.model.pair_head = True  # the prototype loss never reads the head: it would score untrained
  assert "only loss.name='koch_bce' trains it (loss.name='prototypical')" in setup_error(config)
  config.loss = ml_collections.ConfigDict({"name": "koch_bce"})
  config.sampling.kind = "pairs"
  config.model.pair_head = False
  assert "model.name='conv4' lacks; set model.pair_head=True" in setup_error(config)
  config.model.pair_head = True
  assert training.setup(config).state.params["head"]["kernel"].shape == (64, 1)  # 64 conv4 features at 28 px


# ------------------------------------------------------------------------------------------------
# 8. The loss and the sampling kind must agree.


@pytest.mark.parametrize("loss, kind, expected", [
    ({"name": "koch_bce"}, "m_per_class",
     "sampling.kind='m_per_class' cannot feed loss 'koch_bce'; use sampling.kind='pairs'"),
    ({"name": "triplet", "mining": "none"}, "pairs",
     "sampling.kind='pairs' cannot feed loss 'triplet' with options {'mining': 'none'}; "
     "use sampling.kind='triplets'"),
])
def test_loss_that_does_not_match_sampling_kind(loss, kind, expected):
  config = omniglot_config.get_config("smoke")
  config.data.source = "synthetic"
  config.loss = ml_collections.ConfigDict(loss)
  config.sampling.kind = kind
  assert expected in setup_error(config)


def test_a_missing_optional_package_names_its_extra():
  with pytest.raises(UserError, match=r"^--mode=plots needs no_such_package_xyz, which is not installed: "
                                      r"pip install 'siamese-jax\[plots\]'$"):
    optional_import("no_such_package_xyz.manifold", "plots", "--mode=plots")
