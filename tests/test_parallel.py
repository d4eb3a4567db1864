"""Data parallelism: pmap, shard_map and one device give the same parameters (4 fake CPU devices)."""

import jax
import numpy as np
import pytest

from siamese_jax.configs import omniglot
from siamese_jax import models, training
from siamese_jax.data import pipeline


def run_steps(config, num_steps: int):
  """Trains `num_steps` steps with the config's parallel strategy; returns the canonical final state."""
  built = training.setup(config)
  step_fn = built.parallel.wrap_step(training.bind_train_step(built, config))
  state = built.parallel.put_state(built.state)
  dataset = pipeline.train_dataset(built.splits.train, built.sampler, num_steps=num_steps)
  metrics = None
  for batch in dataset:
    state, metrics = step_fn(state, built.parallel.put_batch(batch))
  return jax.device_get(built.parallel.get_state(state)), jax.device_get(built.parallel.unreplicate_metrics(metrics))


def synthetic_config(loss: str, kind: str, **loss_options):
  config = omniglot.get_config("smoke")
  config.data.source = "synthetic"
  config.data.synthetic_classes = 24
  config.sampling.kind = kind
  config.sampling.batch_size = 16
  config.sampling.m_per_class = 4
  config.model.width = 8
  config.loss.name = loss
  config.model.pair_head = loss == "koch_bce"  # Koch's loss scores pairs with the model's head
  # SGD, not Adam: Adam divides by sqrt(v), which turns float-rounding differences in near-zero
  # gradients into full-size steps, hiding what this test checks (the data-parallel arithmetic).
  config.optim.name = "sgd"
  config.optim.learning_rate = 0.05
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  for key, value in loss_options.items():
    config.loss[key] = value
  return config


CASES = {
    # BatchNorm statistics must be synchronised and the prototype loss computed on the global batch.
    "prototypical": ("prototypical", "m_per_class", {}),
    # In-batch mining over the global batch, not per device.
    "triplet_batch_hard": ("triplet", "m_per_class", {"margin": 0.2, "mining": "batch_hard"}),
    "contrastive_pairs": ("contrastive", "pairs", {"margin": 1.0}),
    # The pair head's weights are replicated like the rest, and its gradient summed the same way.
    "koch_bce_pair_head": ("koch_bce", "pairs", {}),
}


# Two of the four in CI (the pair head's replicated gradient, and a loss over the whole m-per-class batch);
# the triplet and contrastive cases on demand (pytest -m slow), for the suite's 15 minutes.
ON_DEMAND = ("triplet_batch_hard", "contrastive_pairs")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ON_DEMAND else c
                                  for c in sorted(CASES)])
def test_strategies_match_one_device(case):
  assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
  loss, kind, options = CASES[case]
  results = {}
  for name, strategy, devices in [("one", "shard_map", 1), ("shard_map", "shard_map", 4), ("pmap", "pmap", 4)]:
    config = synthetic_config(loss, kind, **options)
    config.parallel.strategy = strategy
    config.parallel.num_devices = devices
    results[name] = run_steps(config, num_steps=3)
  reference_state, reference_metrics = results["one"]
  initial = training.setup(synthetic_config(loss, kind, **options)).state
  # The parameters moved (so equality below is not trivially about untouched weights)...
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       reference_state.params, jax.device_get(initial.params))
  assert max(jax.tree.leaves(moved)) > 1e-4
  # ...and every strategy moved them identically, up to float32 reduction order.
  for name in ("shard_map", "pmap"):
    state, metrics = results[name]
    assert int(state.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 state.params, reference_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 state.model_state, reference_state.model_state)
    np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-5)


def fine_tuning_config(loss: str = "prototypical", kind: str = "m_per_class", **loss_options):
  """A pretrained-style backbone (random weights: the arithmetic does not depend on them) with frozen
  stages that unfreeze at step 1, the backbone at its own learning rate and warm-up (the unfrozen stages'
  warm-up starts at 0 at step 1, so step 2 is the first to move them)."""
  config = synthetic_config(loss, kind, **loss_options)
  config.data.channels = 3
  config.data.image_size = 32
  config.augment.kind = "photo"  # crops, flips and colour jitter, as fine-tuning on photos does
  pair_head = config.model.pair_head
  config.model = models.default_config("resnet18")
  config.model.freeze_until = "layer1"
  config.model.embedding_dim = 16
  config.model.pair_head = pair_head
  config.optim.backbone_learning_rate = 0.01
  config.optim.backbone_warmup_steps = 1
  config.optim.unfreeze_after_steps = 1
  return config


@pytest.mark.slow
def test_fine_tuning_strategies_match():
  # The reference is two devices, not one: with XLA:CPU's YNNPACK fusions off (conftest, launch.py), this
  # network's one-device program moves layer3's weights by a few per cent differently from the same program
  # with them on and from 2 and 4 devices, which agree to 3e-8 among themselves (an XLA matter, noted on the
  # issue); what this test checks is the data-parallel arithmetic of fine-tuning.
  results = {}
  for name, strategy, devices in [("one", "shard_map", 2), ("shard_map", "shard_map", 4), ("pmap", "pmap", 4)]:
    config = fine_tuning_config()
    config.parallel.strategy = strategy
    config.parallel.num_devices = devices
    results[name] = run_steps(config, num_steps=3)
  reference, _ = results["one"]
  initial = jax.device_get(training.setup(fine_tuning_config()).state)
  # The third step moved the frozen stages (unfrozen after one step), and the later stages too.
  for stage in ("layer1", "layer4"):
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                         reference.params["backbone"][stage], initial.params["backbone"][stage]))
    assert max(moved) > 1e-5, stage
  # The frozen stages' BatchNorms stayed in inference mode: their running statistics never changed.
  jax.tree.map(np.testing.assert_array_equal, reference.model_state["backbone"]["layer1"],
               initial.model_state["backbone"]["layer1"])
  # Same updates on 2 and 4 devices, compared as updates (state - initial) relative to each array's largest:
  # float32 reduction order moves them by ~1e-5 of their size; unsynchronised statistics or a gradient
  # summed twice would move them by ~1.
  def assert_same_updates(ours, theirs, start):
    for a, b, s in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(start)):
      a, b = np.asarray(a, np.float64) - s, np.asarray(b, np.float64) - s
      assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max() + 1e-8, (np.abs(a - b).max(), np.abs(b).max())

  for name in ("shard_map", "pmap"):
    state, _ = results[name]
    assert_same_updates(state.params, reference.params, initial.params)
    assert_same_updates(state.model_state, reference.model_state, initial.model_state)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_stages_stay_frozen_with_every_loss(case):
  loss, kind, options = CASES[case]
  config = fine_tuning_config(loss, kind, **options)
  config.optim.unfreeze_after_steps = 0
  state, metrics = run_steps(config, num_steps=2)
  initial = jax.device_get(training.setup(fine_tuning_config(loss, kind, **options)).state)
  assert np.isfinite(metrics["loss"])
  for stage in ("stem", "layer1"):
    jax.tree.map(np.testing.assert_array_equal, state.params["backbone"][stage], initial.params["backbone"][stage])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                       state.params["backbone"]["layer2"], initial.params["backbone"]["layer2"]))
  assert max(moved) > 1e-6
