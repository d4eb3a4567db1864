"""Every shipped config builds, in full and as `:smoke`, with exactly the fields of the base config.

Configs are plain ConfigDicts that start from `configs/omniglot.py` and set fields; a misspelt field
would silently add a new key that nothing reads, so each config's set of keys must equal the base's.
An ensemble config is `members` (one such config per member) and `checkpoint`; every member must also
load alone as `file.py:<member>`.
"""

import ast
import importlib
import pathlib

import pytest

from siamese_jax.configs import omniglot

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(".".join(p.relative_to(CONFIG_DIR).with_suffix("").parts)
                 for p in CONFIG_DIR.rglob("*.py") if p.stem != "__init__")
ENSEMBLES = ("omniglot_best_ensemble", "omniglot_vinyals_ensemble", "ablations.omniglot_best")
MAX_HEADER_LINES = 10


def load(name):
  return importlib.import_module(f"configs.{name}")


def keys(config, prefix=""):
  found = set()
  for key, value in config.items():
    found.add(prefix + key)
    if hasattr(value, "items"):
      found |= keys(value, prefix + key + ".")
  return found


def trainable(config):
  """The training configs a config stands for: itself, or each member of an ensemble config."""
  return list(config.members.values()) if "members" in config else [config]


def test_the_configs_are_found():
  assert {"omniglot", "omniglot_hour", "omniglot_best_single", "omniglot_best_ensemble", "omniglot_vinyals",
          "omniglot_vinyals_ensemble", "omniglot_koch", "folder", "ablations.omniglot_cpu_hour",
          "ablations.omniglot_triplet", "ablations.omniglot_best"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_config_has_exactly_the_base_fields(name, variant):
  base = omniglot.get_config(variant)
  # Loss and model options depend on the loss and model chosen (margin, mining, widths, ...); the loss
  # and model modules validate those at setup.
  own = lambda config: {k for k in keys(config) if not k.startswith(("loss.", "model."))}
  for config in trainable(load(name).get_config(variant)):
    extra = own(config) - own(base)
    assert not extra, f"configs/{name}.py sets fields the base config does not have: {sorted(extra)}"
    assert not own(base) - own(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_is_refused(name):
  with pytest.raises(ValueError, match="unknown config variant"):
    load(name).get_config("nope")


@pytest.mark.parametrize("name", CONFIGS)
def test_header_is_short_and_has_the_rendered_expected_line(name):
  # Purpose, command, expected minutes (rendered by results/render.py from results/*.json) and where the
  # figures are: the header is not a measurement log.
  path = CONFIG_DIR.joinpath(*name.split(".")).with_suffix(".py")
  docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
  assert docstring is not None, f"{path.name} has no header"
  assert len(docstring.splitlines()) <= MAX_HEADER_LINES, f"configs/{name}.py: header over {MAX_HEADER_LINES} lines"
  assert sum(line.startswith("Expected [results/render.py]: ") for line in docstring.splitlines()) == 1


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_config_is_members_and_checkpoint(name):
  module = load(name)
  config = module.get_config()
  assert set(config.keys()) == {"members", "checkpoint"} and config.checkpoint == "best"
  # A ConfigDict lists its keys sorted; the members are combined in that order, the documented one.
  assert list(config.members.keys()) == list(module.MEMBERS)
  for member, member_config in config.members.items():
    assert member_config == module.get_config(member), member  # each member loads alone, the same
  smoke = module.get_config("smoke")
  assert set(smoke.keys()) == {"members", "checkpoint"} and len(smoke.members) == 2
  assert all(c.train.num_steps <= omniglot.get_config("smoke").train.num_steps for c in smoke.members.values())


def test_the_default_of_each_config_is_what_its_name_promises():
  from siamese_jax.configs import omniglot_best_ensemble, omniglot_best_single, omniglot_hour, omniglot_vinyals
  hour, single = omniglot_hour.get_config(), omniglot_best_single.get_config()
  assert hour.loss.name == "triplet" and hour.train.time_limit_minutes == 60.0
  assert single.seed == 3 and single.data.train_class_rotations == (90, 180, 270)
  assert len(omniglot_best_ensemble.get_config().members) == 4
  assert omniglot_vinyals.get_config().data.omniglot_split == "vinyals"


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


@pytest.mark.parametrize("member, expected", [
    ("batches120", {"sampling.m_per_class": 2, "sampling.classes_per_group": 20, "train.num_steps": 12000}),
    ("rotations", {"data.train_class_rotations": (90, 180, 270)}),
    ("rotations_batches120", {"sampling.m_per_class": 2, "sampling.classes_per_group": 20,
                              "data.train_class_rotations": (90, 180, 270), "train.num_steps": 9000}),
])
def test_cpu_hour_ensemble_members_change_only_their_fields(member, expected):
  # The three members of configs/ablations/omniglot_best.py are the CPU-hour recipe plus these fields and
  # the time limit off; anything else changed would not be the ensemble that was measured.
  from siamese_jax.configs.ablations import omniglot_best, omniglot_cpu_hour
  assert_changes_only(omniglot_best.get_config(member), omniglot_cpu_hour.get_config(),
                      {**expected, "train.time_limit_minutes": 0.0})


@pytest.mark.parametrize("member, expected", [
    ("seed0", {"train.num_steps": 12000}),
    ("seed1", {"train.num_steps": 12000, "seed": 1, "data.split_seed": 0}),
    ("seed2_rotations_6k", {"train.num_steps": 6000, "seed": 2, "data.split_seed": 0,
                            "data.train_class_rotations": (90, 180, 270)}),
    ("seed4_rotations", {"train.num_steps": 12000, "seed": 4, "data.split_seed": 0,
                         "data.train_class_rotations": (90, 180, 270)}),
])
def test_best_ensemble_members_change_only_their_fields(member, expected):
  # The hour's triplet recipe with 120-way batches, the time limit off, and these fields; the split seed
  # stays 0, so every member is judged on the same validation classes.
  from siamese_jax.configs import omniglot_best_ensemble, omniglot_hour
  assert_changes_only(omniglot_best_ensemble.get_config(member), omniglot_hour.get_config(),
                      {**expected, "sampling.m_per_class": 2, "sampling.classes_per_group": 20,
                       "train.time_limit_minutes": 0.0})


def test_best_single_is_the_rotations_recipe_with_seed_3():
  from siamese_jax.configs import omniglot_best_ensemble, omniglot_best_single
  single, member = omniglot_best_single.get_config(), omniglot_best_ensemble.get_config("seed4_rotations")
  assert_changes_only(single, member, {"seed": 3})


@pytest.mark.parametrize("member, expected", [
    ("run1_width96", {"model.width": 96}),
    ("run2_steps24k", {"train.num_steps": 24000}),
    ("run3_batches60x4", {"sampling.m_per_class": 4}),
])
def test_vinyals_ensemble_members_change_only_their_fields(member, expected):
  from siamese_jax.configs import omniglot_vinyals, omniglot_vinyals_ensemble
  assert_changes_only(omniglot_vinyals_ensemble.get_config(member), omniglot_vinyals.get_config(), expected)


def test_hour_is_the_cpu_hour_recipe_with_the_triplet_loss_and_head():
  # What was measured is exactly the prototype-loss CPU hour with the triplet config's loss and head.
  from siamese_jax.configs import omniglot_hour
  from siamese_jax.configs.ablations import omniglot_cpu_hour, omniglot_triplet
  config, recipe, triplet = (omniglot_hour.get_config(), omniglot_cpu_hour.get_config(),
                             omniglot_triplet.get_config())
  assert omniglot_triplet.get_config("cpu_hour") == config
  rest = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("loss", "model")}
  assert rest(config) == rest(recipe) and rest(config) != rest(triplet)
  assert config.loss.to_dict() == triplet.loss.to_dict() and config.loss.name == "triplet"
  assert config.model.to_dict() == triplet.model.to_dict()
  head = {"embedding_dim": 128, "l2_normalize": True}
  assert config.model.to_dict() == {**recipe.model.to_dict(), **head} != recipe.model.to_dict()
