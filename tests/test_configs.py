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


def changed(config, base, prefix=""):
  """The dotted fields whose values differ between two configs of the same fields."""
  found = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      found |= changed(value, base[key], prefix + key + ".")
    elif value != base[key]:
      found.add(prefix + key)
  return found


def assert_changes_only(config, base, expected):
  """`config` differs from `base` in exactly the dotted fields of `expected`, and has their values."""
  assert changed(config, base) == set(expected)
  for field, value in expected.items():
    node = config
    for part in field.split("."):
      node = node[part]
    assert node == value, field


@pytest.mark.parametrize("variant, expected", [
    ("batches120", {"sampling.m_per_class": 2, "sampling.classes_per_group": 20, "train.num_steps": 12000}),
    ("rotations", {"data.train_class_rotations": (90, 180, 270)}),
    ("both", {"sampling.m_per_class": 2, "sampling.classes_per_group": 20,
              "data.train_class_rotations": (90, 180, 270), "train.num_steps": 9000}),
])
def test_best_variants_change_only_their_fields(variant, expected):
  # The three members of the best result (docs/ablations.md, L4) are the CPU-hour recipe plus these
  # fields and the time limit off; anything else changed would not be the ensemble that was measured.
  from configs import omniglot_best, omniglot_cpu_hour
  assert_changes_only(omniglot_best.get_config(variant), omniglot_cpu_hour.get_config(),
                      {**expected, "train.time_limit_minutes": 0.0})
  assert omniglot_best.get_config(None) == omniglot_best.get_config("batches120")


@pytest.mark.parametrize("variant, expected", [
    ("t5", {"train.num_steps": 12000}),
    ("t5_seed1", {"train.num_steps": 12000, "seed": 1, "data.split_seed": 0}),
    ("rotations", {"train.num_steps": 6000, "seed": 2, "data.split_seed": 0,
                   "data.train_class_rotations": (90, 180, 270)}),
    ("rotations_12k", {"train.num_steps": 12000, "seed": 3, "data.split_seed": 0,
                       "data.train_class_rotations": (90, 180, 270)}),
    ("rotations_12k_seed4", {"train.num_steps": 12000, "seed": 4, "data.split_seed": 0,
                             "data.train_class_rotations": (90, 180, 270)}),
])
def test_best_triplet_variants_change_only_their_fields(variant, expected):
  # The networks of docs/ablations.md T5-T9: T3's recipe with 120-way batches, the time limit off, and
  # these fields; the split seed stays 0, so every member is judged on the same validation classes.
  from configs import omniglot_best_triplet, omniglot_triplet
  assert_changes_only(omniglot_best_triplet.get_config(variant), omniglot_triplet.get_config("cpu_hour"),
                      {**expected, "sampling.m_per_class": 2, "sampling.classes_per_group": 20,
                       "train.time_limit_minutes": 0.0})
  assert omniglot_best_triplet.get_config(None) == omniglot_best_triplet.get_config("t5")


def test_triplet_cpu_hour_is_the_cpu_hour_recipe_with_the_triplet_loss_and_head():
  # docs/ablations.md, T3: what was measured is exactly these two configs put together.
  from configs import omniglot_cpu_hour, omniglot_triplet
  config, recipe, triplet = (omniglot_triplet.get_config("cpu_hour"), omniglot_cpu_hour.get_config(),
                             omniglot_triplet.get_config())
  rest = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("loss", "model")}
  assert rest(config) == rest(recipe) and rest(config) != rest(triplet)
  assert config.loss.to_dict() == triplet.loss.to_dict() and config.loss.name == "triplet"
  assert config.model.to_dict() == triplet.model.to_dict()
  head = {"embedding_dim": 128, "l2_normalize": True}
  assert config.model.to_dict() == {**recipe.model.to_dict(), **head} != recipe.model.to_dict()
