"""Schedules at chosen steps and single updates on known gradients, worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siamese_jax import optim
from siamese_jax.errors import UserError


def make(steps_per_epoch: int = 10, global_batch_size: int = 128, **fields):
  config = optim.default_config()
  config.update(fields)
  return optim.create_optimizer(config, steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size)


def lr_at(schedule, *steps: int) -> list[float]:
  # Through jit with a traced step, as the train step will call it.
  return [float(jax.jit(schedule)(jnp.asarray(step, jnp.int32))) for step in steps]


def one_update(tx, params, grads):
  params = jnp.asarray(params, jnp.float32)
  updates, _ = jax.jit(tx.update)(jnp.asarray(grads, jnp.float32), tx.init(params), params)
  return np.asarray(updates)


# ------------------------------------------------------------------------------------------------
# Schedules.


def test_constant_and_warmup_midpoint():
  _, schedule = make(learning_rate=0.2)
  assert lr_at(schedule, 0, 1000) == pytest.approx([0.2, 0.2])
  # Warmup 10: 0 at step 0, 0.2 * 5/10 = 0.1 at the midpoint, 0.2 from step 10 on.
  _, schedule = make(learning_rate=0.2, warmup_steps=10)
  assert lr_at(schedule, 0, 5, 10, 50) == pytest.approx([0.0, 0.1, 0.2, 0.2])


def test_exponential_is_one_percent_per_epoch_staircase():
  # Koch et al.: lr * 0.99^epoch, constant within an epoch. steps_per_epoch 10, lr 0.1:
  # epoch 0 (steps 0, 9): 0.1; epoch 1 (10, 19): 0.099; epoch 2 (20): 0.09801.
  _, schedule = make(schedule="exponential", learning_rate=0.1, decay_per_epoch=0.99)
  assert lr_at(schedule, 0, 9, 10, 19, 20) == pytest.approx([0.1, 0.1, 0.099, 0.099, 0.09801], rel=1e-6)


def test_warmup_keeps_epochs_absolute():
  # Warmup 10 steps = 1 epoch on an exponential schedule: step 5 is 0.5 * 0.1; step 10 is already epoch 1,
  # so 0.099 (a schedule restarted after warmup would give 0.1); step 20 is 0.09801.
  _, schedule = make(schedule="exponential", learning_rate=0.1, warmup_steps=10)
  assert lr_at(schedule, 5, 10, 20) == pytest.approx([0.05, 0.099, 0.09801], rel=1e-6)


def test_piecewise_boundaries():
  # Boundaries at epochs 0.5, 2, 5 with 10 steps/epoch = steps 5, 20, 50; x0.1 applies *at* the boundary.
  _, schedule = make(schedule="piecewise", learning_rate=1.0, boundaries_epochs=[0.5, 2, 5], decay_factor=0.1)
  assert lr_at(schedule, 0, 4, 5, 19, 20, 49, 50, 999) == pytest.approx(
      [1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-6)


def test_cosine_with_and_without_warmup():
  # total_steps counts the warmup: warmup 10, total 110 -> cosine over steps 10..110;
  # halfway (step 60) is 0.5 * (1 + cos(pi/2)) = 0.5; quarter (step 35) is 0.5 * (1 + cos(pi/4)).
  _, schedule = make(schedule="cosine", learning_rate=1.0, warmup_steps=10, total_steps=110)
  assert lr_at(schedule, 0, 5, 10, 35, 60, 110, 200) == pytest.approx(
      [0.0, 0.5, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.0, 0.0], abs=1e-6)
  _, schedule = make(schedule="cosine", learning_rate=2.0, total_steps=100)
  assert lr_at(schedule, 0, 50, 100) == pytest.approx([2.0, 1.0, 0.0], abs=1e-6)


def test_batch_scaling():
  # 0.1 * 512 / 128 = 0.4; off by default.
  _, schedule = make(learning_rate=0.1, scale_lr_by_batch=True, base_batch_size=128, global_batch_size=512)
  assert lr_at(schedule, 0) == pytest.approx([0.4])
  _, schedule = make(learning_rate=0.1, global_batch_size=512)
  assert lr_at(schedule, 0) == pytest.approx([0.1])


# ------------------------------------------------------------------------------------------------
# Updates.


def test_sgd_l2_weight_decay():
  # g' = g + wd * p = 1 + 0.5 * 2 = 2; update = -lr * g' = -0.2. Without decay: -0.1.
  tx, _ = make(name="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.5)
  assert one_update(tx, [2.0], [1.0]) == pytest.approx([-0.2])
  tx, _ = make(name="sgd", learning_rate=0.1, momentum=0.0)
  assert one_update(tx, [2.0], [1.0]) == pytest.approx([-0.1])


def test_adam_l2_versus_adamw_decoupled():
  # Adam's first step is -lr * sign(gradient) (m/sqrt(v) = g/|g| after bias correction), eps aside.
  # p = 2, g = -0.5, wd = 0.5, lr = 0.1:
  #   adam (L2 in the gradient): g' = -0.5 + 0.5 * 2 = +0.5 -> update -0.1
  #   adamw (decoupled):         -0.1 * sign(-0.5) - lr * wd * p = +0.1 - 0.1 = 0
  #   adam without decay:        +0.1
  tx, _ = make(name="adam", learning_rate=0.1, weight_decay=0.5)
  assert one_update(tx, [2.0], [-0.5]) == pytest.approx([-0.1], abs=1e-6)
  tx, _ = make(name="adamw", learning_rate=0.1, weight_decay=0.5)
  assert one_update(tx, [2.0], [-0.5]) == pytest.approx([0.0], abs=1e-6)
  tx, _ = make(name="adam", learning_rate=0.1)
  assert one_update(tx, [2.0], [-0.5]) == pytest.approx([0.1], abs=1e-6)


def test_clipping_acts_before_weight_decay():
  # Gradient (3, 4) has norm 5; clipped to norm 1 it is (0.6, 0.8). SGD lr 1, no momentum.
  tx, _ = make(name="sgd", learning_rate=1.0, momentum=0.0, clip_grad_norm=1.0)
  assert one_update(tx, [0.0, 0.0], [3.0, 4.0]) == pytest.approx([-0.6, -0.8])
  tx, _ = make(name="sgd", learning_rate=1.0, momentum=0.0, clip_grad_norm=10.0)  # under the threshold
  assert one_update(tx, [0.0, 0.0], [3.0, 4.0]) == pytest.approx([-3.0, -4.0])
  # With params (1, 1) and wd 1: clip first, then add the decay -> -(0.6 + 1, 0.8 + 1).
  tx, _ = make(name="sgd", learning_rate=1.0, momentum=0.0, clip_grad_norm=1.0, weight_decay=1.0)
  assert one_update(tx, [1.0, 1.0], [3.0, 4.0]) == pytest.approx([-1.6, -1.8])


def run_updates(tx, grads: list[float]) -> list[float]:
  params = jnp.zeros((1,), jnp.float32)
  state = tx.init(params)
  out = []
  for grad in grads:
    updates, state = tx.update(jnp.asarray([grad], jnp.float32), state, params)
    out.append(float(updates[0]))
  return out


def test_sgd_momentum_and_nesterov():
  # Constant gradient 1, lr 0.1, momentum 0.9. Heavy ball: trace 1, 1.9 -> updates -0.1, -0.19.
  # Nesterov (optax): g + 0.9 * trace: 1 + 0.9 = 1.9, then 1 + 0.9 * 1.9 = 2.71 -> -0.19, -0.271.
  tx, _ = make(name="sgd", learning_rate=0.1, momentum=0.9)
  assert run_updates(tx, [1.0, 1.0]) == pytest.approx([-0.1, -0.19])
  tx, _ = make(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
  assert run_updates(tx, [1.0, 1.0]) == pytest.approx([-0.19, -0.271])


def test_optimizer_follows_the_schedule():
  # Exponential 0.99/epoch with 2 steps per epoch, plain SGD, gradient 1: updates are -lr(step).
  tx, _ = make(steps_per_epoch=2, name="sgd", momentum=0.0, learning_rate=1.0, schedule="exponential")
  assert run_updates(tx, [1.0] * 5) == pytest.approx([-1.0, -1.0, -0.99, -0.99, -0.9801], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Config mistakes.


def test_default_config_builds_every_optimizer():
  config = optim.default_config()
  assert set(config.keys()) == {
      "name", "learning_rate", "momentum", "nesterov", "weight_decay", "schedule", "warmup_steps",
      "boundaries_epochs", "decay_factor", "decay_per_epoch", "total_steps", "scale_lr_by_batch",
      "base_batch_size", "clip_grad_norm", "backbone_learning_rate", "backbone_warmup_steps",
      "unfreeze_after_steps"}
  for name in optim.OPTIMIZERS:
    tx, schedule = make(name=name)
    assert one_update(tx, [1.0], [1.0]).shape == (1,)
    assert lr_at(schedule, 0) == pytest.approx([1e-3])


@pytest.mark.parametrize("fields,match", [
    ({"name": "rmsprop"}, "optimizer.name='rmsprop'.*sgd, adam, adamw"),
    ({"schedule": "linear"}, "optimizer.schedule='linear'.*constant, piecewise, cosine, exponential"),
    ({"schedule": "cosine"}, "optimizer.total_steps=-1"),  # -1 = train.num_steps, resolved by train
    ({"schedule": "cosine", "total_steps": 0}, "optimizer.total_steps=0"),
    ({"total_steps": -2}, "total_steps"),
    ({"schedule": "cosine", "total_steps": 10, "warmup_steps": 10}, "total_steps"),
    ({"schedule": "piecewise", "boundaries_epochs": [2, 1]}, "boundaries_epochs"),
    ({"schedule": "piecewise", "boundaries_epochs": [0.01]}, "boundaries_epochs"),  # rounds to step 0
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"name": "sgd", "momentum": 0.0, "nesterov": True}, "nesterov"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ({"decay_per_epoch": 0.0}, "decay_per_epoch"),
])
def test_bad_fields_raise_user_error(fields, match):
  with pytest.raises(UserError, match=match):
    make(**fields)


def test_unknown_field_is_a_typo():
  config = optim.default_config()
  config.learning_rte = 0.1  # an unlocked ConfigDict accepts the typo; create_optimizer must not
  with pytest.raises(UserError, match="no field 'learning_rte'; valid fields: backbone_learning_rate, "):
    optim.create_optimizer(config, steps_per_epoch=10, global_batch_size=8)


def test_plain_dict_with_missing_fields_takes_defaults():
  tx, schedule = optim.create_optimizer({"name": "sgd", "learning_rate": 0.5}, steps_per_epoch=10,
                                        global_batch_size=8)
  assert lr_at(schedule, 0, 100) == pytest.approx([0.5, 0.5])
  assert run_updates(tx, [1.0, 1.0]) == pytest.approx([-0.5, -0.95])  # default momentum 0.9


def test_parts_take_their_own_learning_rates_and_frozen_parts_start_late():
  # Adam's first update of each parameter is -lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|), so after
  # k steps with a constant gradient each part has moved by -sum of its learning rates: exact numbers.
  params = {"head": jnp.zeros(2), "backbone": jnp.zeros(2), "frozen": jnp.zeros(2)}
  labels = {"head": "head", "backbone": "backbone", "frozen": "frozen"}
  grads = jax.tree.map(jnp.ones_like, params)
  config = {"name": "adam", "learning_rate": 1e-2, "backbone_learning_rate": 1e-3, "backbone_warmup_steps": 2,
            "unfreeze_after_steps": 3}
  tx, _ = optim.create_optimizer(config, steps_per_epoch=10, global_batch_size=8, labels=labels)
  state = tx.init(params)
  moved = []
  for _ in range(6):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    moved.append({k: float(-v[0]) for k, v in params.items()})
  # head: 1e-2 every step; backbone: warm-up 0, 0.5e-3, then 1e-3; frozen: nothing before step 3, then the
  # backbone's warm-up from there (0 at step 3, 0.5e-3 at 4, 1e-3 at 5), with fresh Adam moments.
  np.testing.assert_allclose([m["head"] for m in moved], 1e-2 * np.arange(1, 7), rtol=1e-4)
  np.testing.assert_allclose([m["backbone"] for m in moved], [0, 5e-4, 1.5e-3, 2.5e-3, 3.5e-3, 4.5e-3],
                             rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose([m["frozen"] for m in moved], [0, 0, 0, 0, 5e-4, 1.5e-3], rtol=1e-3, atol=1e-7)


def test_frozen_parts_never_move_without_unfreeze():
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}
  tx, _ = optim.create_optimizer({"name": "sgd", "learning_rate": 0.1}, steps_per_epoch=1, global_batch_size=1,
                                 labels={"a": "frozen", "b": "head"})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_array_equal(updates["a"], 0.0)
  np.testing.assert_allclose(updates["b"], -0.1)
