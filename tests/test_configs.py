"""Every shipped config builds, in full and as `:smoke`, with exactly the fields of the base config.

Configs are plain ConfigDicts that start from `configs/omniglot.py` and set fields; a misspelt field
would silently add a new key that nothing reads, so each config's set of keys must equal the base's.
"""

import importlib
import pathlib

import pytest

from configs import omniglot

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__")


def keys(config, prefix=""):
  found = set()
  for key, value in config.items():
    found.add(prefix + key)
    if hasattr(value, "items"):
      found |= keys(value, prefix + key + ".")
  return found


def test_the_configs_are_found():
  assert {"omniglot", "omniglot_cpu_hour", "omniglot_vinyals", "omniglot_koch"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_config_has_exactly_the_base_fields(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  base = omniglot.get_config(variant)
  # Loss and model options depend on the loss and model chosen (margin, mining, widths, ...); the loss
  # and model modules validate those at setup.
  own = lambda config: {k for k in keys(config) if not k.startswith(("loss.", "model."))}
  extra = own(config) - own(base)
  assert not extra, f"configs/{name}.py sets fields the base config does not have: {sorted(extra)}"
  assert not own(base) - own(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_is_refused(name):
  with pytest.raises(ValueError, match="unknown config variant"):
    importlib.import_module(f"configs.{name}").get_config("nope")
