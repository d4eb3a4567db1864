"""The optax optimizer and learning-rate schedule built from the `optimizer` sub-config.

Everything is an optax building block except what optax lacks: the multiplicative linear warmup in
front of the epoch-based schedules and the checks that turn config mistakes into `UserError`s.

The chain, in order, and why in this order:
  1. clip_by_global_norm   on the raw loss gradient, so the clip threshold does not depend on decay;
  2. add_decayed_weights   L2 for sgd/adam: it enters the gradient and is scaled by Adam like the rest;
  3. sgd / adam / adamw    adamw applies its weight decay itself, decoupled from Adam's scaling
     / rmsprop             (Loshchilov & Hutter 2019), and multiplied by the learning rate as in optax;
  4. plateau scale         (plateau_patience > 0) the update times a factor that falls when the validation
                           accuracy stops improving: last, so it scales exactly what the learning rate
                           scales. Its state (`PlateauState`) lives in the optimizer state, and so in every
                           checkpoint; the loop changes it at validations only (`record_validation`), and
                           the step merely multiplies by it.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from siamese_jax.errors import UserError

Schedule = Callable[[Any], Any]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "piecewise", "cosine", "exponential", "inverse_time")


def default_config() -> ml_collections.ConfigDict:
  """Every optimizer field with its default; configs override a few of them."""
  config = ml_collections.ConfigDict()
  config.name = "adam"  # "sgd" | "adam" | "adamw" | "rmsprop"
  config.learning_rate = 1e-3  # peak learning rate (before batch scaling); reached after warmup
  config.momentum = 0.9  # sgd only; 0 = plain SGD
  config.nesterov = False  # sgd: Nesterov momentum; adam/adamw: NAdam (optax's nesterov=True)
  config.weight_decay = 0.0  # sgd/adam/rmsprop: L2 term added to the gradient; adamw: decoupled decay (x lr)
  # rmsprop (Keras's RMSprop and its defaults): v = rho v + (1 - rho) g^2; step = lr g / sqrt(v + epsilon),
  # epsilon inside the root as in Keras 2.x/3 and optax's eps_in_sqrt=True; no bias correction.
  config.rmsprop_rho = 0.9  # decay of the running mean square (Keras rho, optax decay)
  config.rmsprop_epsilon = 1e-7  # added to the mean square inside the square root (Keras epsilon)
  config.rmsprop_momentum = 0.0  # velocity = momentum * velocity + step, as Keras; 0 = none (Keras default)
  config.schedule = "constant"  # "constant" | "piecewise" | "cosine" | "exponential" | "inverse_time"
  config.warmup_steps = 0  # linear warmup from 0 to the schedule's value over these steps; 0 = none
  config.boundaries_epochs = []  # piecewise: epochs (may be fractional) where the lr is multiplied
  config.decay_factor = 0.1  # piecewise: multiplier applied at each boundary
  config.decay_per_epoch = 0.99  # exponential: lr multiplier per whole epoch (Koch et al.: 0.99)
  config.total_steps = -1  # cosine: steps from 0 (warmup included) to lr min_lr; -1 = train.num_steps
  config.min_lr = 0.0  # cosine: the lr it ends at (absolute, not batch-scaled; < the peak); 0 = decay to 0
  # inverse_time (Keras InverseTimeDecay; its legacy `decay=d` argument is decay_steps=1, decay_rate=d):
  # lr = peak / (1 + decay_rate * step / decay_steps), with step // decay_steps if inverse_time_staircase
  config.decay_rate = 1.0  # inverse_time: 1 halves the lr after decay_steps, thirds it after 2 decay_steps
  config.decay_steps = 1000  # inverse_time: steps over which the denominator grows by decay_rate
  config.inverse_time_staircase = False  # inverse_time: drop in whole decay_steps (step // decay_steps)
  config.scale_lr_by_batch = False  # multiply learning_rate by global_batch_size / base_batch_size
  config.base_batch_size = 128  # the batch size learning_rate was tuned for (Koch et al. used 128)
  config.clip_grad_norm = 0.0  # clip the gradient's global L2 norm to this value; 0 = no clipping
  # Reduce on plateau (Keras ReduceLROnPlateau on the validation accuracy, mode "max"), on top of the schedule:
  # after plateau_patience validations (every train.eval_every steps) without an accuracy above the best by
  # more than plateau_min_delta, the update is multiplied by plateau_factor (never below plateau_min_scale)
  # and the count restarts. Kept in the optimizer state (checkpointed); logged as validation/lr_scale.
  config.plateau_patience = 0  # validations without improvement before a reduction; 0 = off
  config.plateau_factor = 0.1  # multiplier of each reduction, in (0, 1) (Keras factor)
  config.plateau_min_delta = 0.0  # an accuracy must beat the best by more than this to count as better
  config.plateau_cooldown = 0  # Keras's cooldown: after a reduction, the next cooldown - 1 validations don't count
  config.plateau_min_scale = 0.0  # lowest scale: Keras's min_lr as a fraction of the schedule's lr
  # Pretrained backbones (models.Pretrained) only:
  config.backbone_learning_rate = -1.0  # peak lr of the pretrained backbone's trainable part; -1 = learning_rate
  config.backbone_warmup_steps = -1  # its linear warm-up; -1 = warmup_steps
  config.unfreeze_after_steps = 0  # frozen stages (model.freeze_until) train from this step on; 0 = never
  # Losses with class proxies (proxy_anchor, arcface, cosface) only:
  config.proxy_lr_multiplier = 1.0  # the proxies' peak lr = learning_rate x this (Kim et al.'s proxy-anchor: 100)
  return config


def _fields(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's fields over the defaults; an unknown field is a typo and fails here, not silently."""
  defaults = default_config().to_dict()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for key in given:
    if key not in defaults:
      raise UserError(f"optimizer config has no field {key!r}; valid fields: {', '.join(defaults)}")
  return {**defaults, **given}


def _require(condition: bool, field: str, value: Any, expected: str) -> None:
  if not condition:
    raise UserError(f"optimizer.{field}={value!r} is not valid: expected {expected}")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(fields: dict[str, Any], steps_per_epoch: int, global_batch_size: int) -> None:
  if fields["name"] not in OPTIMIZERS:
    raise UserError(f"optimizer.name={fields['name']!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
  if fields["schedule"] not in SCHEDULES:
    raise UserError(
        f"optimizer.schedule={fields['schedule']!r} is not known; choose one of {', '.join(SCHEDULES)}")
  for field in ("learning_rate", "decay_factor", "decay_per_epoch", "proxy_lr_multiplier"):
    _require(_is_number(fields[field]) and fields[field] > 0, field, fields[field], "a number > 0")
  for field in ("weight_decay", "clip_grad_norm", "min_lr", "decay_rate", "plateau_min_delta"):
    _require(_is_number(fields[field]) and fields[field] >= 0, field, fields[field], "a number >= 0")
  for field in ("rmsprop_rho", "rmsprop_momentum", "plateau_min_scale"):
    _require(_is_number(fields[field]) and 0 <= fields[field] < 1, field, fields[field], "a number in [0, 1)")
  for field in ("rmsprop_epsilon", "plateau_factor"):
    _require(_is_number(fields[field]) and 0 < fields[field] < 1, field, fields[field], "a number in (0, 1)")
  _require(isinstance(fields["inverse_time_staircase"], bool), "inverse_time_staircase",
           fields["inverse_time_staircase"], "True or False")
  momentum = fields["momentum"]
  _require(_is_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "a number in [0, 1)")
  _require(isinstance(fields["nesterov"], bool), "nesterov", fields["nesterov"], "True or False")
  if fields["name"] == "rmsprop":
    _require(not fields["nesterov"], "nesterov", True, "False for rmsprop (Keras's RMSprop has no Nesterov form)")
  if fields["name"] == "sgd" and fields["nesterov"]:
    _require(momentum > 0, "nesterov", True, "False when optimizer.momentum is 0 (nothing to look ahead with)")
  backbone_lr = fields["backbone_learning_rate"]
  _require(_is_number(backbone_lr) and (backbone_lr > 0 or backbone_lr == -1), "backbone_learning_rate",
           backbone_lr, "a number > 0, or -1 (= learning_rate)")
  for field, lowest in (("warmup_steps", 0), ("total_steps", -1), ("backbone_warmup_steps", -1),
                        ("unfreeze_after_steps", 0), ("decay_steps", 1), ("plateau_patience", 0),
                        ("plateau_cooldown", 0)):
    value = fields[field]
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= lowest, field, value,
             f"an integer >= {lowest}")
  base = fields["base_batch_size"]
  _require(isinstance(base, int) and base >= 1, "base_batch_size", base, "an integer >= 1")
  if fields["schedule"] == "cosine":
    # -1 ("the run's length") is resolved by train before it calls create_optimizer, which cannot know it.
    _require(fields["total_steps"] > fields["warmup_steps"], "total_steps", fields["total_steps"],
             f"more than warmup_steps={fields['warmup_steps']} for the cosine schedule "
             "(usually the number of training steps; -1 must be replaced by the trainer)")
  boundaries = fields["boundaries_epochs"]
  _require(isinstance(boundaries, (list, tuple)) and all(_is_number(b) for b in boundaries),
           "boundaries_epochs", boundaries, "a list of epochs")
  if fields["schedule"] == "piecewise":
    steps = [round(b * steps_per_epoch) for b in boundaries]
    _require(all(s > 0 for s in steps) and all(a < b for a, b in zip(steps, steps[1:])),
             "boundaries_epochs", list(boundaries),
             f"increasing epochs > 0 that fall on distinct steps (steps_per_epoch={steps_per_epoch})")
  # These two come from the data pipeline, not the user's optimizer config, so they are bugs if wrong.
  if steps_per_epoch < 1 or global_batch_size < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} and global_batch_size={global_batch_size} must be >= 1")


def _with_warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
  """Multiply a schedule by min(1, step / warmup_steps).

  Multiplying (rather than optax.join_schedules, which restarts the second schedule's step count at the
  join) keeps epoch boundaries and per-epoch decay on absolute epochs, and the lr continuous at the
  end of warmup whatever the schedule has done meanwhile.
  """
  if warmup_steps == 0:
    return schedule

  def warmed_up(step):
    return schedule(step) * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)

  return warmed_up


def _schedule(fields: dict[str, Any], peak: float, steps_per_epoch: int) -> Schedule:
  name, warmup_steps = fields["schedule"], fields["warmup_steps"]
  if name == "cosine":
    min_lr = float(fields["min_lr"])
    _require(min_lr < peak, "min_lr", fields["min_lr"], f"a number below the peak learning rate {peak:g}")
    # optax's decay_steps counts the warmup too, so total_steps is simply the run's length. min_lr = 0 passes
    # optax's own defaults (end_value=0, alpha=0): the schedule of before the field existed, bit for bit.
    if warmup_steps:
      return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, fields["total_steps"], end_value=min_lr)
    return optax.cosine_decay_schedule(peak, fields["total_steps"], alpha=min_lr / peak)
  if name == "constant":
    main = optax.constant_schedule(peak)
  elif name == "piecewise":
    main = optax.piecewise_constant_schedule(
        peak, {round(b * steps_per_epoch): fields["decay_factor"] for b in fields["boundaries_epochs"]})
  elif name == "inverse_time":
    main = _inverse_time(peak, fields["decay_rate"], fields["decay_steps"], fields["inverse_time_staircase"])
  else:  # exponential, staircase: one multiplication per completed epoch, as in Koch et al. 2015.
    main = optax.exponential_decay(peak, transition_steps=steps_per_epoch,
                                   decay_rate=fields["decay_per_epoch"], staircase=True)
  return _with_warmup(main, warmup_steps)


def _inverse_time(peak: float, decay_rate: float, decay_steps: int, staircase: bool) -> Schedule:
  """Keras's InverseTimeDecay, which optax lacks: peak / (1 + decay_rate * step / decay_steps), with the
  fraction floored when `staircase`."""

  def schedule(step):
    progress = jnp.asarray(step, jnp.float32) / decay_steps
    if staircase:
      progress = jnp.floor(progress)
    return peak / (1.0 + decay_rate * progress)

  return schedule


def _batch_scale(fields: dict[str, Any], global_batch_size: int) -> float:
  """The learning rate's multiplier for this batch: the linear scaling rule (Goyal et al. 2017), the same lr
  per example when the batch grows, if scale_lr_by_batch; else 1."""
  return global_batch_size / fields["base_batch_size"] if fields["scale_lr_by_batch"] else 1.0


def create_optimizer(config: ml_collections.ConfigDict | Mapping[str, Any], *, steps_per_epoch: int,
                     global_batch_size: int, labels: Any = None) -> tuple[optax.GradientTransformation, Schedule]:
  """The optax transformation and its schedule (step -> learning rate of the new layers, for logging).

  `config` is the optimizer sub-config (fields of `default_config()`; missing fields take the
  defaults). `steps_per_epoch` turns epoch-based fields into steps; `global_batch_size` (batch rows
  over all devices) drives `scale_lr_by_batch`.

  `labels` (`models.parameter_labels`: a pytree like the parameters, leaves "head", "backbone" or
  "frozen") splits the parameters into parts with `optax.multi_transform`, after one global gradient
  clip: "head" takes learning_rate and warmup_steps; "backbone" takes backbone_learning_rate and
  backbone_warmup_steps; "frozen" is never updated, or, with unfreeze_after_steps=N, is updated like the
  backbone from step N on (its gradients are zeroed before N, and its warm-up starts at N).
  """
  fields = _fields(config)
  _validate(fields, steps_per_epoch, global_batch_size)
  scale = _batch_scale(fields, global_batch_size)
  peak = float(fields["learning_rate"]) * scale
  schedule = _schedule(fields, peak, steps_per_epoch)
  clip = [optax.clip_by_global_norm(fields["clip_grad_norm"])] if fields["clip_grad_norm"] > 0 else []
  if labels is None:
    return optax.chain(*clip, *_update_rule(fields, schedule)), schedule

  backbone_fields = dict(fields)
  if fields["backbone_warmup_steps"] >= 0:
    backbone_fields["warmup_steps"] = fields["backbone_warmup_steps"]
  backbone_peak = peak if fields["backbone_learning_rate"] == -1 else float(fields["backbone_learning_rate"]) * scale
  backbone_schedule = _schedule(backbone_fields, backbone_peak, steps_per_epoch)
  start = fields["unfreeze_after_steps"]
  frozen = (_start_at(start, optax.chain(*_update_rule(fields, backbone_schedule))) if start
            else optax.set_to_zero())
  parts = {"head": optax.chain(*_update_rule(fields, schedule)),
           "backbone": optax.chain(*_update_rule(fields, backbone_schedule)), "frozen": frozen}
  return optax.chain(*clip, optax.multi_transform(parts, labels)), schedule


def create_proxy_optimizer(config: ml_collections.ConfigDict | Mapping[str, Any], *, steps_per_epoch: int,
                           global_batch_size: int) -> optax.GradientTransformation:
  """The update rule of a loss's own parameters (class proxies): the model's optimizer and schedule, at
  proxy_lr_multiplier times its peak learning rate; no gradient clipping (the model's clip is its own)."""
  fields = _fields(config)
  _validate(fields, steps_per_epoch, global_batch_size)
  peak = float(fields["learning_rate"]) * _batch_scale(fields, global_batch_size) * float(fields["proxy_lr_multiplier"])
  return optax.chain(*_update_rule(fields, _schedule(fields, peak, steps_per_epoch)))


class _StartAtState(NamedTuple):
  count: jax.Array  # steps seen, including those before the start
  inner: Any


def _start_at(start: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` as if created at step `start`: zero updates before it, and its state (moments, its own step
  count and so its schedule) held at init until then. A select, not a branch: one program for every step."""

  def init(params):
    return _StartAtState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    started = state.count >= start
    new_updates = jax.tree.map(lambda u: jnp.where(started, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda new, old: jnp.where(started, new, old), new_inner, state.inner)
    return new_updates, _StartAtState(count=optax.safe_int32_increment(state.count), inner=new_inner)

  return optax.GradientTransformation(init, update)


def _update_rule(fields: dict[str, Any], schedule: Schedule) -> list[optax.GradientTransformation]:
  """Weight decay (sgd/adam/rmsprop), the optimizer itself, following `schedule`, and the plateau scale."""
  parts = []
  name, weight_decay, nesterov = fields["name"], float(fields["weight_decay"]), fields["nesterov"]
  if name in ("sgd", "adam", "rmsprop") and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    # momentum=None rather than 0.0: no trace buffer in the optimizer state (and checkpoints) for nothing.
    momentum = float(fields["momentum"]) or None
    parts.append(optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  elif name == "adam":
    parts.append(optax.adam(schedule, nesterov=nesterov))
  elif name == "rmsprop":
    # eps_in_sqrt=True (optax's default, spelled out because it is the point): Keras's sqrt(v + epsilon).
    # optax's momentum, like Keras's, accumulates lr-scaled steps (scale by lr, then trace).
    parts.append(optax.rmsprop(schedule, decay=float(fields["rmsprop_rho"]), eps=float(fields["rmsprop_epsilon"]),
                               eps_in_sqrt=True, momentum=float(fields["rmsprop_momentum"]) or None))
  else:
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, nesterov=nesterov))
  if fields["plateau_patience"]:
    parts.append(_plateau_scale())
  return parts


# ------------------------------------------------------------------------------------------------
# Reduce on plateau


class PlateauState(NamedTuple):
  """Keras ReduceLROnPlateau's bookkeeping, as arrays in the optimizer state (so checkpoints hold it)."""

  scale: jax.Array  # float32: the multiplier of every update; 1 until the first reduction
  best: jax.Array  # float32: the best validation accuracy so far; -inf before the first validation
  wait: jax.Array  # int32: validations without improvement since the best or the last reduction
  cooldown: jax.Array  # int32: validations left in the cooldown after a reduction


def _plateau_scale() -> optax.GradientTransformation:
  """Multiplies the updates by the state's scale, which only `record_validation` changes.

  The last link of each part's chain (in each part: they all see the same validations, so their scales
  agree). Like optax.contrib.reduce_on_plateau it scales the update, so for sgd and rmsprop with
  momentum a reduction also scales the velocity built up before it (Keras's lower lr only scales new steps).
  """

  def init(params):
    del params
    return PlateauState(scale=jnp.ones([], jnp.float32), best=jnp.full([], -jnp.inf, jnp.float32),
                        wait=jnp.zeros([], jnp.int32), cooldown=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def plateau_enabled(config: ml_collections.ConfigDict | Mapping[str, Any]) -> bool:
  """Whether the optimizer config reduces on plateau (the loop must then call `record_validation`)."""
  return bool(_fields(config)["plateau_patience"])


def record_validation(tree: Any, accuracy: float, config: ml_collections.ConfigDict | Mapping[str, Any]) -> Any:
  """`tree` (a train state, an optimizer state: any pytree) with each `PlateauState` in it advanced by one
  validation of accuracy `accuracy`, as Keras's ReduceLROnPlateau(mode="max").on_epoch_end does.

  Plain numpy on the host: the states must be fetched (scalars, one per state) and put back by the caller,
  whatever its device layout. Comparisons and products are float32, the dtype the state keeps, so an
  accuracy equal to the best never counts as better after a round trip through the state.
  """
  fields = _fields(config)
  patience, cooldown_length = fields["plateau_patience"], fields["plateau_cooldown"]
  current = np.float32(accuracy)
  factor, min_scale, min_delta = (np.float32(fields[f]) for f in ("plateau_factor", "plateau_min_scale",
                                                                  "plateau_min_delta"))

  def advance(state: PlateauState) -> PlateauState:
    scale, best = np.float32(state.scale), np.float32(state.best)
    wait, cooldown = int(state.wait), int(state.cooldown)
    if cooldown > 0:
      cooldown, wait = cooldown - 1, 0
    if current > best + min_delta:
      best, wait = current, 0
    elif cooldown == 0:
      wait += 1
      if wait >= patience and scale > min_scale:
        scale = max(scale * factor, min_scale)
        cooldown, wait = cooldown_length, 0
    return PlateauState(scale=np.float32(scale), best=np.float32(best), wait=np.int32(wait),
                        cooldown=np.int32(cooldown))

  return jax.tree.map(lambda node: advance(node) if isinstance(node, PlateauState) else node, tree,
                      is_leaf=lambda node: isinstance(node, PlateauState))
