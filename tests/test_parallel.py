"""Data parallelism: pmap, shard_map and one device give the same parameters (4 fake CPU devices)."""

import jax
import numpy as np
import pytest

from configs import omniglot
from siamese_jax import train
from siamese_jax.data import pipeline


def run_steps(config, num_steps: int):
  """Trains `num_steps` steps with the config's parallel strategy; returns the canonical final state."""
  built = train.setup(config)
  step_fn = built.parallel.wrap_step(train.bind_train_step(built, config))
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


@pytest.mark.parametrize("case", sorted(CASES))
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
  initial = train.setup(synthetic_config(loss, kind, **options)).state
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
