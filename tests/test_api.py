"""The package's public face: configs by name, the lazy exports, the XLA flag every entry point gets.

(Training and loading through the API run end to end in tests/test_python_docs.py.)
"""

import os
import pathlib
import subprocess
import sys

import pytest

import siamese_jax
from siamese_jax.configs import omniglot
from siamese_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_config_names_are_every_shipped_config_file():
  files = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.py")
                 if p.name != "__init__.py")
  assert siamese_jax.config_names() == files
  assert "omniglot" in files and "ablations/omniglot_triplet" in files


def test_get_config_by_name_variant_or_path(tmp_path):
  assert siamese_jax.get_config("omniglot:smoke").to_dict() == omniglot.get_config("smoke").to_dict()
  assert siamese_jax.get_config("omniglot").train.num_steps == omniglot.get_config().train.num_steps
  finetune = siamese_jax.get_config("ablations/omniglot_pretrained:finetune")
  assert finetune.model.name == "efficientnet_lite0"
  own = tmp_path / "mine.py"
  own.write_text("from siamese_jax.configs import omniglot\n\n\ndef get_config(arg=None):\n"
                 "  config = omniglot.get_config(arg)\n  config.seed = 7\n  return config\n")
  assert siamese_jax.get_config(f"{own}:smoke").seed == 7


def test_get_config_mistakes_are_one_line():
  with pytest.raises(UserError, match=r"^config 'omniglott': no shipped config 'omniglott'; the shipped configs "
                                      r"are ablations/omniglot_best, .*omniglot, "):
    siamese_jax.get_config("omniglott")
  with pytest.raises(UserError, match=r"^config 'omniglot:nope': unknown config variant 'nope' \(known: smoke\)"):
    siamese_jax.get_config("omniglot:nope")
  with pytest.raises(UserError, match=r"^config 'nowhere.py': no config file 'nowhere.py'"):
    siamese_jax.get_config("nowhere.py")


def test_every_public_name_resolves_and_unknown_names_do_not():
  for name in siamese_jax.__all__:
    assert getattr(siamese_jax, name) is not None, name
  assert callable(siamese_jax.train) and callable(siamese_jax.load)  # functions, not the modules of those names
  with pytest.raises(AttributeError, match="has no attribute 'trian'"):
    siamese_jax.trian  # noqa: B018


@pytest.mark.parametrize("given, expected", [
    (None, "--xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_cpu_experimental_ynn_fusion_type=dot", "--xla_cpu_experimental_ynn_fusion_type=dot"),  # the user's wins
])
def test_importing_the_package_sets_the_cpu_flag(given, expected):
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  if given is not None:
    env["XLA_FLAGS"] = given
  result = subprocess.run([sys.executable, "-c", "import os, siamese_jax; print(os.environ['XLA_FLAGS'])"],
                          env=env, capture_output=True, text=True, check=True, cwd=REPO)
  assert result.stdout.strip() == expected
