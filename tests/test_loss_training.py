"""Every loss in the registry trains through the real train step and resumes bit for bit from Orbax.

One loop over `losses.LOSSES` (a loss added to the registry is tested without a line here): each loss takes
its own batch kind (`losses.batch_kind`), the pair head where it scores pairs, two augmented views for
supcon, and class proxies where it has them. Four steps straight must equal two steps, an Orbax checkpoint
written and read back into a fresh state, and two more steps: the whole train state (parameters, batch
statistics, optimizer state, and the proxies with their optimizer state) to the last bit. Synthetic images
and a narrow network keep each loss to a few seconds; the loop and the data are the shipped ones
(tests/test_train.py runs the whole loop on Omniglot).
"""

import jax
import numpy as np
import pytest

from siamese_jax import checkpoint, losses, training
from siamese_jax.configs import omniglot
from siamese_jax.data import pipeline

NUM_STEPS = 4


def small_config(name: str):
  config = omniglot.get_config("smoke")
  config.data.source = "synthetic"
  config.data.synthetic_classes = 24
  config.parallel.num_devices = 1
  config.sampling.kind = losses.batch_kind(name)
  config.sampling.batch_size = 16
  config.sampling.m_per_class = 4
  config.model.width = 8
  config.model.embedding_dim = 16
  config.model.pair_head = losses.needs_pair_head(name)
  config.loss.name = name
  config.augment.views = 2 if name == "supcon" else 1
  config.train.num_steps = NUM_STEPS
  config.optim.warmup_steps = 1
  return config


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_every_loss_trains_and_resumes_bit_for_bit(name, tmp_path):
  config = small_config(name)
  built = training.setup(config)
  parallel = built.parallel
  step_fn = parallel.wrap_step(training.bind_train_step(built, config), donate=False)
  batches = list(pipeline.train_dataset(built.splits.train, built.sampler, num_steps=NUM_STEPS))

  def run(state, batches):
    state, losses_seen = parallel.put_state(state), []
    for batch in batches:
      state, metrics = step_fn(state, parallel.put_batch(batch))
      losses_seen.append(parallel.unreplicate_metrics(metrics)["loss"])
    return jax.device_get(parallel.get_state(state)), np.asarray(losses_seen)

  straight, straight_losses = run(built.state, batches)
  half, _ = run(built.state, batches[:2])
  checkpointer = checkpoint.Checkpointer(tmp_path, asynchronous=False)
  checkpointer.save(2, half, {}, {})
  step, restored, _, _ = checkpointer.restore_latest(checkpoint.abstract_like(built.state))
  checkpointer.close()
  resumed, resumed_losses = run(restored, batches[2:])

  assert step == 2 and int(resumed.step) == NUM_STEPS
  assert np.all(np.isfinite(straight_losses)), straight_losses
  np.testing.assert_array_equal(resumed_losses, straight_losses[2:])
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  # It trained: the parameters moved, and so did the proxies of a proxy loss (which are checkpointed).
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), straight.params,
                       jax.device_get(built.state.params))
  assert max(jax.tree.leaves(moved)) > 1e-4
  assert (straight.loss_params is None) == (name not in losses.PROXY_LOSSES)
  if straight.loss_params is not None:
    assert np.abs(straight.loss_params - np.asarray(built.state.loss_params)).max() > 1e-4
