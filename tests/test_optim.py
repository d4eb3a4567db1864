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
      "unfreeze_after_steps", "proxy_lr_multiplier", "rmsprop_rho", "rmsprop_epsilon", "rmsprop_momentum",
      "min_lr", "decay_rate", "decay_steps", "inverse_time_staircase", "plateau_patience", "plateau_factor",
      "plateau_min_delta", "plateau_cooldown", "plateau_min_scale"}
  for name in optim.OPTIMIZERS:
    tx, schedule = make(name=name)
    assert one_update(tx, [1.0], [1.0]).shape == (1,)
    assert lr_at(schedule, 0) == pytest.approx([1e-3])


@pytest.mark.parametrize("fields,match", [
    ({"name": "lion"}, "optimizer.name='lion'.*sgd, adam, adamw, rmsprop"),
    ({"schedule": "linear"}, "optimizer.schedule='linear'.*constant, piecewise, cosine, exponential, inverse_time"),
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
    ({"name": "rmsprop", "rmsprop_rho": 1.0}, r"rmsprop_rho=1.0 .*\[0, 1\)"),
    ({"name": "rmsprop", "rmsprop_epsilon": 0.0}, "rmsprop_epsilon"),
    ({"name": "rmsprop", "rmsprop_momentum": -0.1}, "rmsprop_momentum"),
    ({"name": "rmsprop", "nesterov": True}, "nesterov=True .*False for rmsprop"),
    ({"schedule": "cosine", "total_steps": 10, "min_lr": 1e-3}, "min_lr=0.001 .*below the peak learning rate 0.001"),
    ({"min_lr": -1e-4}, "min_lr"),
    ({"schedule": "inverse_time", "decay_steps": 0}, "decay_steps=0 .*integer >= 1"),
    ({"decay_rate": -1.0}, "decay_rate"),
    ({"plateau_patience": -1}, "plateau_patience"),
    ({"plateau_patience": 2, "plateau_factor": 1.0}, r"plateau_factor=1.0 .*\(0, 1\)"),
    ({"plateau_min_scale": 1.0}, "plateau_min_scale"),
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


# ------------------------------------------------------------------------------------------------
# The Keras options: RMSprop, inverse-time decay, a cosine floor, reduce on plateau.


def test_rmsprop_equals_keras_rmsprop_in_numpy():
  # Keras's RMSprop (rho 0.9, epsilon 1e-7 inside the root, velocity from 0, no bias correction), with and
  # without momentum, written out in float64 numpy over three steps of changing gradients.
  grads = [np.array([0.5, -2.0, 1e-4]), np.array([0.1, -1.0, 3e-4]), np.array([-0.7, 0.0, 2e-4])]
  for momentum in (0.0, 0.8):
    tx, _ = make(name="rmsprop", learning_rate=0.01, rmsprop_momentum=momentum)
    params = jnp.zeros(3, jnp.float32)
    state = tx.init(params)
    velocity, mean_square, expected, got = np.zeros(3), np.zeros(3), [], []
    for grad in grads:
      mean_square = 0.9 * mean_square + 0.1 * grad**2
      increment = 0.01 * grad / np.sqrt(mean_square + 1e-7)
      velocity = momentum * velocity + increment
      expected.append(-velocity)
      updates, state = jax.jit(tx.update)(jnp.asarray(grad, jnp.float32), state, params)
      got.append(np.asarray(updates))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
  # epsilon inside the root matters where v is small: g = 1e-4 gives v = 1e-9, so the first step is
  # 0.01 * 1e-4 / sqrt(1e-9 + 1e-7) = 9.95e-5, where epsilon outside the root would give 0.01 * 1e-4 / 3.2e-5 = 0.0316.
  tx, _ = make(name="rmsprop", learning_rate=0.01)
  assert one_update(tx, [0.0], [1e-4]) == pytest.approx([-0.01 * 1e-4 / np.sqrt(1e-9 + 1e-7)], rel=1e-5)


def test_inverse_time_is_keras_formula_with_staircase_and_warmup():
  # lr = 0.1 / (1 + 0.5 * step / 10): step 0 -> 0.1, 5 -> 0.1 / 1.25, 10 -> 0.1 / 1.5, 40 -> 0.1 / 3.
  _, schedule = make(schedule="inverse_time", learning_rate=0.1, decay_rate=0.5, decay_steps=10)
  assert lr_at(schedule, 0, 5, 10, 40) == pytest.approx([0.1, 0.08, 0.1 / 1.5, 0.1 / 3], rel=1e-6)
  # Staircase: floor(step / 10), so step 5 is still 0.1 and step 19 is 0.1 / 1.5.
  _, schedule = make(schedule="inverse_time", learning_rate=0.1, decay_rate=0.5, decay_steps=10,
                     inverse_time_staircase=True)
  assert lr_at(schedule, 5, 9, 10, 19, 20) == pytest.approx([0.1, 0.1, 0.1 / 1.5, 0.1 / 1.5, 0.05], rel=1e-6)
  # Keras's legacy SGD(decay=1e-2): decay_steps 1; with a 4-step warmup multiplying it: step 2 is
  # 0.5 * 0.1 / 1.02, step 100 is 0.1 / 2.
  _, schedule = make(schedule="inverse_time", learning_rate=0.1, decay_rate=1e-2, decay_steps=1, warmup_steps=4)
  assert lr_at(schedule, 0, 2, 100) == pytest.approx([0.0, 0.05 / 1.02, 0.05], rel=1e-6)


def test_cosine_floor_is_reached_at_the_end_and_zero_keeps_the_old_schedule():
  # min_lr 0.1 under peak 1: the cosine runs from 1 to 0.1, so halfway is (1 + 0.1) / 2 and it stays at 0.1.
  _, schedule = make(schedule="cosine", learning_rate=1.0, total_steps=100, min_lr=0.1)
  assert lr_at(schedule, 0, 50, 100, 150) == pytest.approx([1.0, 0.55, 0.1, 0.1], abs=1e-6)
  _, schedule = make(schedule="cosine", learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
  assert lr_at(schedule, 5, 10, 60, 110, 200) == pytest.approx([0.5, 1.0, 0.55, 0.1, 0.1], abs=1e-6)
  # min_lr 0 is the schedule of before the field, bit for bit (not approximately).
  steps = jnp.arange(0, 130, dtype=jnp.int32)
  for warmup in (0, 10):
    _, floored = make(schedule="cosine", learning_rate=1e-3, warmup_steps=warmup, total_steps=110, min_lr=0.0)
    old = (optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, 110) if warmup
           else optax.cosine_decay_schedule(1e-3, 110))
    np.testing.assert_array_equal(jax.jit(jax.vmap(floored))(steps), jax.jit(jax.vmap(old))(steps))


def plateau_tx(**fields):
  return make(name="sgd", momentum=0.0, learning_rate=1.0, plateau_patience=2, plateau_factor=0.5, **fields)


def scale_after(accuracies, **fields):
  """The update of gradient 1 (= -scale with sgd at lr 1) after each validation of `accuracies`."""
  tx, _ = plateau_tx(**fields)
  config = {"name": "sgd", "momentum": 0.0, "learning_rate": 1.0, "plateau_patience": 2, "plateau_factor": 0.5,
            **fields}
  params = jnp.zeros(1, jnp.float32)
  state = tx.init(params)
  scales = []
  for accuracy in accuracies:
    state = jax.tree.map(jnp.asarray, optim.record_validation(state, accuracy, config))
    updates, state = jax.jit(tx.update)(jnp.ones(1, jnp.float32), state, params)
    scales.append(-float(updates[0]))
  return scales


def test_plateau_halves_the_lr_after_patience_validations_without_improvement():
  # Patience 2, factor 0.5: 0.5 (best), 0.6 (best), 0.6 (equal: 1 without improvement, not yet), 0.55 (2: halve,
  # counting restarts), 0.58 (1), 0.59 (2: halve again), 0.7 (best), 0.7 (1).
  assert scale_after([0.5, 0.6, 0.6, 0.55, 0.58, 0.59, 0.7, 0.7]) == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25]
  # min_delta 0.05: 0.62 does not beat 0.6 by more than 0.05, so it counts as a plateau.
  assert scale_after([0.6, 0.62, 0.64], plateau_min_delta=0.05) == [1, 1, 0.5]
  # Cooldown 2, Keras's counter: the first validation after the reduction (at the third) is not counted, the
  # second already is (the counter reaches 0 before the check), so the fifth and sixth reduce again.
  assert scale_after([0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], plateau_cooldown=2) == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
  # The floor: never below 0.3 of the schedule, and no reduction once there.
  assert scale_after([0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], plateau_min_scale=0.3) == pytest.approx(
      [1, 1, 0.5, 0.5, 0.3, 0.3, 0.3])


def test_plateau_scales_the_step_only_and_is_off_by_default():
  # The step multiplies by the stored scale and never changes it: only record_validation does.
  tx, _ = plateau_tx()
  params = jnp.zeros(1, jnp.float32)
  state = tx.init(params)
  reduced = jax.tree.map(lambda node: node._replace(scale=jnp.float32(0.25)) if isinstance(node, optim.PlateauState)
                         else node, state, is_leaf=lambda node: isinstance(node, optim.PlateauState))
  updates, after = jax.jit(tx.update)(jnp.ones(1, jnp.float32), reduced, params)
  assert float(updates[0]) == -0.25
  plateau = lambda state: [node for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, optim.PlateauState))
                           if isinstance(node, optim.PlateauState)]
  assert len(plateau(after)) == 1
  jax.tree.map(np.testing.assert_array_equal, plateau(after), plateau(reduced))
  # Off (patience 0, the default): no PlateauState in the optimizer state, which is the state of before.
  tx, _ = make(name="sgd", momentum=0.0)
  assert not any(isinstance(node, optim.PlateauState) for node in
                 jax.tree.leaves(tx.init(params), is_leaf=lambda node: isinstance(node, optim.PlateauState)))
  assert not optim.plateau_enabled(optim.default_config())


def test_plateau_scales_every_part_of_a_fine_tuned_model():
  params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  config = {"name": "sgd", "momentum": 0.0, "learning_rate": 1.0, "backbone_learning_rate": 0.1,
            "plateau_patience": 1, "plateau_factor": 0.5}
  tx, _ = optim.create_optimizer(config, steps_per_epoch=1, global_batch_size=1,
                                 labels={"a": "head", "b": "backbone"})
  state = tx.init(params)
  for accuracy in (0.5, 0.4):
    state = jax.tree.map(jnp.asarray, optim.record_validation(state, accuracy, config))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert (float(updates["a"][0]), float(updates["b"][0])) == pytest.approx((-0.5, -0.05))


def test_proxy_optimizer_runs_the_models_rule_at_its_multiple_of_the_learning_rate():
  """A proxy loss's class proxies: plain SGD at learning_rate x proxy_lr_multiplier (batch scaling included),
  following the model's schedule; the model's gradient clip does not apply to them."""
  config = {"name": "sgd", "momentum": 0.0, "learning_rate": 0.01, "proxy_lr_multiplier": 10.0,
            "scale_lr_by_batch": True, "base_batch_size": 32, "schedule": "constant", "clip_grad_norm": 0.5}
  tx = optim.create_proxy_optimizer(config, steps_per_epoch=10, global_batch_size=64)
  proxies = jnp.ones((3, 2))
  gradient = jnp.full((3, 2), 4.0)  # global norm 9.8, far above the clip
  updates, _ = tx.update(gradient, tx.init(proxies), proxies)
  np.testing.assert_allclose(updates, -0.01 * 10.0 * (64 / 32) * gradient, rtol=1e-6)
  with pytest.raises(UserError, match="proxy_lr_multiplier"):
    optim.create_proxy_optimizer(dict(config, proxy_lr_multiplier=0.0), steps_per_epoch=10, global_batch_size=64)
