"""The optax optimizer and learning-rate schedule built from the `optimizer` sub-config.

Everything is an optax building block except what optax lacks: the multiplicative linear warmup in
front of the epoch-based schedules and the checks that turn config mistakes into `UserError`s.

The chain, in order, and why in this order:
  1. clip_by_global_norm   on the raw loss gradient, so the clip threshold does not depend on decay;
  2. add_decayed_weights   L2 for sgd/adam: it enters the gradient and is scaled by Adam like the rest;
  3. sgd / adam / adamw    adamw applies its weight decay itself, decoupled from Adam's scaling
                           (Loshchilov & Hutter 2019), and multiplied by the learning rate as in optax.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from siamese_jax.errors import UserError

Schedule = Callable[[Any], Any]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "piecewise", "cosine", "exponential")


def default_config() -> ml_collections.ConfigDict:
  """Every optimizer field with its default; configs override a few of them."""
  config = ml_collections.ConfigDict()
  config.name = "adam"  # "sgd" | "adam" | "adamw"
  config.learning_rate = 1e-3  # peak learning rate (before batch scaling); reached after warmup
  config.momentum = 0.9  # sgd only; 0 = plain SGD
  config.nesterov = False  # sgd: Nesterov momentum; adam/adamw: NAdam (optax's nesterov=True)
  config.weight_decay = 0.0  # sgd/adam: L2 term added to the gradient; adamw: decoupled decay (x lr)
  config.schedule = "constant"  # "constant" | "piecewise" | "cosine" | "exponential"
  config.warmup_steps = 0  # linear warmup from 0 to the schedule's value over these steps; 0 = none
  config.boundaries_epochs = []  # piecewise: epochs (may be fractional) where the lr is multiplied
  config.decay_factor = 0.1  # piecewise: multiplier applied at each boundary
  config.decay_per_epoch = 0.99  # exponential: lr multiplier per whole epoch (Koch et al.: 0.99)
  config.total_steps = -1  # cosine: steps from 0 (warmup included) to lr 0; -1 = train.num_steps
  config.scale_lr_by_batch = False  # multiply learning_rate by global_batch_size / base_batch_size
  config.base_batch_size = 128  # the batch size learning_rate was tuned for (Koch et al. used 128)
  config.clip_grad_norm = 0.0  # clip the gradient's global L2 norm to this value; 0 = no clipping
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
  for field in ("weight_decay", "clip_grad_norm"):
    _require(_is_number(fields[field]) and fields[field] >= 0, field, fields[field], "a number >= 0")
  momentum = fields["momentum"]
  _require(_is_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "a number in [0, 1)")
  _require(isinstance(fields["nesterov"], bool), "nesterov", fields["nesterov"], "True or False")
  if fields["name"] == "sgd" and fields["nesterov"]:
    _require(momentum > 0, "nesterov", True, "False when optimizer.momentum is 0 (nothing to look ahead with)")
  backbone_lr = fields["backbone_learning_rate"]
  _require(_is_number(backbone_lr) and (backbone_lr > 0 or backbone_lr == -1), "backbone_learning_rate",
           backbone_lr, "a number > 0, or -1 (= learning_rate)")
  for field, lowest in (("warmup_steps", 0), ("total_steps", -1), ("backbone_warmup_steps", -1),
                        ("unfreeze_after_steps", 0)):
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
    # optax's decay_steps counts the warmup too, so total_steps is simply the run's length.
    if warmup_steps:
      return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, fields["total_steps"])
    return optax.cosine_decay_schedule(peak, fields["total_steps"])
  if name == "constant":
    main = optax.constant_schedule(peak)
  elif name == "piecewise":
    main = optax.piecewise_constant_schedule(
        peak, {round(b * steps_per_epoch): fields["decay_factor"] for b in fields["boundaries_epochs"]})
  else:  # exponential, staircase: one multiplication per completed epoch, as in Koch et al. 2015.
    main = optax.exponential_decay(peak, transition_steps=steps_per_epoch,
                                   decay_rate=fields["decay_per_epoch"], staircase=True)
  return _with_warmup(main, warmup_steps)


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
  scale = global_batch_size / fields["base_batch_size"] if fields["scale_lr_by_batch"] else 1.0
  # Linear scaling rule (Goyal et al. 2017): same lr per example when the batch grows.
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
  scale = global_batch_size / fields["base_batch_size"] if fields["scale_lr_by_batch"] else 1.0
  peak = float(fields["learning_rate"]) * scale * float(fields["proxy_lr_multiplier"])
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
  """Weight decay (sgd/adam) and the optimizer itself, following `schedule`."""
  parts = []
  name, weight_decay, nesterov = fields["name"], float(fields["weight_decay"]), fields["nesterov"]
  if name in ("sgd", "adam") and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    # momentum=None rather than 0.0: no trace buffer in the optimizer state (and checkpoints) for nothing.
    momentum = float(fields["momentum"]) or None
    parts.append(optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  elif name == "adam":
    parts.append(optax.adam(schedule, nesterov=nesterov))
  else:
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, nesterov=nesterov))
  return parts
