"""The train state, the pure train step, and the loop (which reads like a schedule).

`train_and_evaluate(config, workdir)` is the library's main entry: it resumes from the newest
checkpoint in `workdir` when there is one, trains, validates, checkpoints, and finally reports one-shot
accuracy on the test classes. `launch.py` only parses flags and calls it.

The loop (`_train_and_evaluate`) keeps its bookkeeping in a `LoopState` and hands each job to a named
helper: `resume`, `validation_due` / `run_validation` / `LoopState.record_validation` (early stopping),
`LoopState.out_of_time`, `PreemptionSignal` / `agree_to_stop`, `log_metrics` (with `check_finite`), and
the checkpointer's save.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from siamese_jax import augment, checkpoint, distributed, losses, models, optim, trained
from siamese_jax.data import pipeline, sampling
from siamese_jax.errors import UserError
from siamese_jax.metrics import embedding, episodes, scoring
from siamese_jax.one_shot import one_shot_results
from siamese_jax.parallel import AXIS, DataParallel, default_cpu_devices, request_cpu_devices
from siamese_jax.workdir import (CHECKPOINTS_DIRNAME, CONFIG_FILENAME, ENSEMBLE_FILENAME, RESULTS_FILENAME,
                                  threshold_path, write_json)
from siamese_jax.writers import MetricWriter


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nnx.State of nnx.Param
  model_state: Any  # nnx.State of everything else (BatchNorm statistics)
  opt_state: Any  # optax state
  # The loss's own parameters (class proxies of losses.PROXY_LOSSES) and their optimizer state; None for
  # every other loss. Checkpointed with the rest; not part of the model, so embed_fn never sees them.
  loss_params: Any = None
  loss_opt_state: Any = None


def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               schedule: Callable, loss_fn: Callable, loss_options: dict, augment_config,
               seed: int, loss_uses_pair_head: bool = False, loss_tx: optax.GradientTransformation | None = None,
               skip_nonfinite_updates: bool = False, frozen: Any = None) -> tuple[TrainState, dict]:
  """One optimizer step, written per device with collectives over `AXIS` (see parallel.py).

  Each example's distortion key is fold_in(step key, its index in the *global* batch), and embeddings
  are all-gathered before the loss, so the step computes the same numbers on 1 or N devices.
  `loss_uses_pair_head` (`losses.needs_pair_head`) passes the model's pair head to the loss as its
  third input; a loss with parameters of its own (`state.loss_params`, class proxies) gets them there
  instead, and `loss_tx` updates them.

  `metrics["finite"]` says whether the loss and gradient were finite; it stays on the device (the loop
  checks it at its periodic fetch). With `skip_nonfinite_updates` a non-finite step leaves parameters,
  batch statistics and optimizer state as they were (the step counter and the data still move on).

  `frozen` (a pytree of bools like the parameters, or None) marks parameters that never train: the loss
  sees them through stop_gradient, so XLA drops their gradient computation (a frozen backbone costs a
  forward pass only).
  """
  num_devices = jax.lax.axis_size(AXIS)
  local_batch = batch["labels"].shape[0]
  step_key = jax.random.fold_in(jax.random.key(seed), state.step)
  example_ids = jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)
  images = augment_examples(step_key, example_ids, batch["images"], augment_config,
                            num_devices * local_batch)  # float [b, k * views, H, W, C]
  views = images.shape[1] // batch["labels"].shape[1]
  labels = jax.lax.all_gather(jnp.tile(batch["labels"], (1, views)), AXIS, tiled=True)

  def loss_of(trained):
    params, loss_params = trained
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    model = nnx.merge(graphdef, params, state.model_state, copy=True)
    model.train()
    embeddings, _ = model(images.reshape((-1,) + images.shape[2:]),
                          dropout_keys=dropout_keys(seed, state.step, example_ids, images.shape[1]))
    embeddings = embeddings.reshape(images.shape[:2] + embeddings.shape[-1:])
    # Every device computes the loss of the global batch; dividing by the device count makes the psum of
    # the per-device gradients below (all_gather transposes to a sum) equal the one-device gradient.
    all_embeddings = jax.lax.all_gather(embeddings, AXIS, tiled=True)
    extra = (model.pair_logits,) if loss_uses_pair_head else ()
    extra += (loss_params,) if loss_params is not None else ()
    loss, metrics = loss_fn(all_embeddings, labels, *extra, **loss_options)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss / num_devices, (loss, metrics, new_model_state)

  (grads, loss_grads), (loss, metrics, model_state) = jax.grad(loss_of, has_aux=True)(
      (state.params, state.loss_params))
  grads, loss_grads = jax.lax.psum((grads, loss_grads), AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss_params, loss_opt_state = state.loss_params, state.loss_opt_state
  if loss_params is not None:
    loss_updates, loss_opt_state = loss_tx.update(loss_grads, loss_opt_state, loss_params)
    loss_params = optax.apply_updates(loss_params, loss_updates)
  grad_norm = optax.global_norm((grads, loss_grads))
  # The global norm is non-finite iff some gradient is (or their squares overflow float32: as bad).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = (params, model_state, opt_state, loss_params, loss_opt_state)
  if skip_nonfinite_updates:
    # A select, not a branch: no host round trip, and the same program for every step.
    old = (state.params, state.model_state, state.opt_state, state.loss_params, state.loss_opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite)
  params, model_state, opt_state, loss_params, loss_opt_state = new
  new_state = TrainState(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                         loss_params=loss_params, loss_opt_state=loss_opt_state)
  return new_state, metrics


# fold_in(key(seed), DROPOUT_STREAM) roots dropout's keys: no step (an int32) folds in this value, so they
# never meet the augmentation keys, which fold the step into key(seed).
DROPOUT_STREAM = 2**31


def dropout_keys(seed: int, step, example_ids, images_per_example: int) -> jax.Array:
  """One dropout key per image row of the model call ([b * images_per_example], row-major like the images):
  the key of image j of the example at global index i is a pure function of (seed, step, i, j), so 1 or N
  devices and a resumed run drop the same features (`models._dropout`; unused and compiled away at rate 0)."""
  root = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)
  fold_each = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  keys = jax.vmap(lambda key: fold_each(key, jnp.arange(images_per_example)))(fold_each(root, example_ids))
  return keys.reshape(-1)


def augment_examples(step_key, example_ids, images, augment_config, global_batch_size: int | None = None):
  """uint8 [b,k,H,W,C] -> float [b, k * views, H, W, C]; every image of every example gets its own distortion.

  With `augment.views` = V > 1 each image is distorted V times, the views side by side along k (view v of
  row j at v * k + j); view 0 keeps the one-view keys, view v >= 1 folds in global_batch_size + v first, so
  no two views share a key and the numbers do not depend on the device count.
  """
  if not augment_config.enabled:
    return augment.to_float(images)
  distort = jax.vmap(augment.distortion(augment_config))
  num_views = augment_config.get("views", 1)
  if num_views > 1 and global_batch_size is None:
    raise ValueError("augment.views > 1 needs the global batch size (the view keys are folded past it)")
  views = []
  for view in range(num_views):
    view_key = step_key if view == 0 else jax.random.fold_in(step_key, global_batch_size + view)
    views.append(distort(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(view_key, example_ids), images))
  return views[0] if len(views) == 1 else jnp.concatenate(views, axis=1)


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the loop starts."""

  splits: pipeline.Splits
  parallel: DataParallel
  graphdef: Any
  state: TrainState
  tx: optax.GradientTransformation
  schedule: Callable
  sampler: sampling.Sampler
  loss_fn: Callable
  loss_options: dict
  loss_uses_pair_head: bool  # `losses.needs_pair_head`: the train step passes the model's head to the loss
  loss_tx: optax.GradientTransformation | None  # updates the loss's own parameters (state.loss_params)
  # `models.make_pair_probability_fn` for a model with a pair head (it is scored by it), else None;
  # built once, so validating every eval_every steps reuses one compiled head.
  pair_probability: Callable | None = None
  frozen: Any = None  # `train_step`'s frozen: parameters that never train (a frozen pretrained stage), or None

  def scorer(self, state: TrainState) -> scoring.Scorer:
    """How the model in `state` scores a pair: its pair head's probability where it has one, else the
    embedding distance; the scorer `trained.load_trained_model` gives the same model."""
    if self.pair_probability is None:
      return scoring.DISTANCE
    return scoring.pair_head_scorer(functools.partial(self.pair_probability, variables_of(state)))


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Data, model, optimizer and a fresh train state; every user mistake found here, before training."""
  loss_fn = losses.get_loss(config.loss.name)
  loss_options = {k: v for k, v in config.loss.items() if k != "name"}
  losses.validate_loss_options(config.loss.name, loss_options)
  # Before anything starts JAX: on CPU, how many devices to split the machine into (parallel.py).
  request_cpu_devices(config.parallel.num_devices or default_cpu_devices(config.sampling.batch_size))
  parallel = DataParallel(config.parallel.strategy, config.parallel.num_devices or None)
  parallel.check_batch_size(config.sampling.batch_size)
  splits = pipeline.load_splits(config.data, seed=config.seed)
  check_plateau(config, splits)
  train_source = splits.train
  sampler = sampling.Sampler(
      sampling.ClassIndex.from_labels(train_source.labels, train_source.class_groups,
                                      train_source.class_names),
      kind=config.sampling.kind, batch_size=config.sampling.batch_size, seed=config.seed,
      m_per_class=config.sampling.m_per_class,
      same_group_negative_probability=config.sampling.same_group_negative_probability,
      classes_per_group=config.sampling.classes_per_group)
  losses.check_batch_kind(config.loss.name, loss_options, sampler.kind)
  check_views(config, loss_options)
  model = models.create(config.model, image_shape=train_source.image_shape, rngs=nnx.Rngs(config.seed))
  if models.load_pretrained(model, config.model):
    print(f"Backbone weights from {config.model.pretrained}", flush=True)
  if isinstance(model, models.Pretrained) and model.gray:
    print(f"note: the data is grayscale (data.channels=1); model.name='{config.model.name}' "
          "repeats it to RGB for its pretrained filters", flush=True)
  loss_uses_pair_head = losses.needs_pair_head(config.loss.name)
  if loss_uses_pair_head and not models.has_pair_head(model):
    raise UserError(f"loss.name='{config.loss.name}' scores pairs with Koch's weighted-L1 head, which "
                    f"model.name='{config.model.name}' lacks; set model.pair_head=True, use model.name='koch', "
                    "or a pair loss such as 'contrastive'.")
  if not loss_uses_pair_head and models.has_pair_head(model):
    raise UserError(f"model.name='{config.model.name}' has Koch's pair head, which scores every validation and "
                    f"evaluation, but only loss.name='koch_bce' trains it (loss.name='{config.loss.name}'); "
                    "use koch_bce, or a model without the head (model.pair_head=False; conv4 or resnet).")
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  steps_per_epoch = config.train.steps_per_epoch
  optim_config = config.optim.copy_and_resolve_references()
  if optim_config.total_steps == -1:
    if optim_config.schedule == "cosine" and config.train.num_steps <= optim_config.warmup_steps:
      raise UserError(f"train.num_steps={config.train.num_steps} must exceed optim.warmup_steps="
                      f"{optim_config.warmup_steps} for the cosine schedule.")
    optim_config.total_steps = config.train.num_steps
  labels = models.parameter_labels(model)
  tx, schedule = optim.create_optimizer(optim_config, steps_per_epoch=steps_per_epoch,
                                        global_batch_size=config.sampling.batch_size, labels=labels)
  frozen = None
  if labels is not None and not optim_config.get("unfreeze_after_steps", 0):
    frozen = jax.tree.map(lambda label: label == "frozen", labels)
    frozen = frozen if any(jax.tree.leaves(frozen)) else None
  embedding_shape = jax.eval_shape(lambda p, s, x: nnx.merge(graphdef, p, s)(x)[0], params, model_state,
                                   jax.ShapeDtypeStruct((1,) + tuple(train_source.image_shape), jnp.float32))
  loss_params = losses.init_loss_params(
      config.loss.name, loss_options, num_classes=len(train_source.class_names),
      embedding_dim=embedding_shape.shape[-1], key=jax.random.fold_in(jax.random.key(config.seed), 1))
  loss_tx = None
  if loss_params is not None:
    loss_tx = optim.create_proxy_optimizer(optim_config, steps_per_epoch=steps_per_epoch,
                                           global_batch_size=config.sampling.batch_size)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=tx.init(params), loss_params=loss_params,
                     loss_opt_state=loss_tx.init(loss_params) if loss_tx else None)
  pair_probability = (models.make_pair_probability_fn(models.make_pair_logits_fn(graphdef))
                      if models.has_pair_head(model) else None)
  return Setup(splits, parallel, graphdef, state, tx, schedule, sampler, loss_fn, loss_options,
               loss_uses_pair_head, loss_tx, pair_probability, frozen)


def check_views(config: ml_collections.ConfigDict, loss_options: dict) -> None:
  """augment.views > 1 doubles (or more) the rows of every example, which only in-batch losses can read."""
  views = config.augment.get("views", 1)
  if isinstance(views, bool) or not isinstance(views, int) or views < 1:
    raise UserError(f"augment.views={views!r} is not valid: expected an integer >= 1")
  if views == 1:
    return
  if not config.augment.enabled:
    raise UserError(f"augment.views={views} makes copies that differ only by their distortion, but "
                    "augment.enabled=False; enable augmentation or set augment.views=1")
  if losses.batch_kind(config.loss.name, loss_options) != "m_per_class":
    raise UserError(f"augment.views={views} puts the views of an image side by side in a batch row, which "
                    f"loss.name={config.loss.name!r} reads as fixed pairs or triplets; use augment.views=1 or "
                    "an in-batch loss such as supcon")


def bind_train_step(built: Setup, config: ml_collections.ConfigDict) -> Callable:
  """`train_step(state, batch)` with everything else bound from the setup and the config: the function
  that `DataParallel.wrap_step` compiles for the loop."""
  return functools.partial(
      train_step, graphdef=built.graphdef, tx=built.tx, schedule=built.schedule, loss_fn=built.loss_fn,
      loss_options=built.loss_options, augment_config=config.augment, seed=config.seed,
      loss_uses_pair_head=built.loss_uses_pair_head, loss_tx=built.loss_tx,
      skip_nonfinite_updates=config.train.skip_nonfinite_updates,
      frozen=built.frozen)


def variables_of(state: TrainState):
  """The whole model state (params + batch statistics) that `embed_fn` takes."""
  return nnx.merge_state(state.params, state.model_state)


def validation_accuracy(embed_fn, state: TrainState, source, eval_config, seed: int,
                        scorer: scoring.Scorer) -> float:
  """`metrics.episodes.validation_accuracy` of the model in `state` on the validation classes `source`,
  scored by `scorer` (`Setup.scorer(state)`, as the test report scores it). `state` must be addressable by
  this process (`DataParallel.local_copy`): every process embeds on its own, with no program spanning
  processes.
  """
  embeddings = embedding.embed_images(embed_fn, variables_of(state), pipeline.all_images(source),
                                      eval_config.batch_size)
  return episodes.validation_accuracy(embeddings, source, eval_config, seed, scorer)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates; returns the results.

  In a multi-process run (`distributed.initialize` first) every process calls this with the same
  arguments: each feeds its own rows of every batch, all write each checkpoint together (Orbax), and only
  process 0 prints and writes config.json, metrics and results.json.

  Faults end with an exception that says what happened and what is safe: FloatingPointError for a
  non-finite loss or gradient (never checkpointed), UserError for a full or unwritable disk (the newest
  complete checkpoint is intact), `distributed.PeerFailure` when another process died.
  """
  workdir = pathlib.Path(workdir)
  if trained.is_ensemble(workdir):
    raise UserError(f"workdir {workdir}: holds an ensemble ({workdir / ENSEMBLE_FILENAME}); train into a "
                    "workdir of its own.")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"cannot create workdir {workdir}: {error}") from error
  built = setup(config)  # first, so a config mistake never overwrites a run's config.json
  try:
    distributed.wait_for_all("setup_done")  # data loading takes each host its own time
    with checkpoint.disk_errors(workdir):
      return _train_and_evaluate(config, workdir, built)
  except Exception as error:
    peer_failure = distributed.peer_failure(error)
    if peer_failure is not None:
      raise peer_failure from error
    raise


def config_changes(previous_path: pathlib.Path, resolved_json: str) -> list[str]:
  """`"field: old -> new"` for each field where the workdir's earlier config.json and this one differ
  (empty when there is no earlier one, or it cannot be read)."""
  try:
    previous = json.loads(previous_path.read_text())
  except (OSError, ValueError):
    return []

  def flat(tree, prefix=""):
    items = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        items.update(flat(value, f"{prefix}{key}."))
      else:
        items[f"{prefix}{key}"] = value
    return items

  old, new = flat(previous), flat(json.loads(resolved_json))
  shown = lambda items, key: json.dumps(items[key]) if key in items else "(absent)"
  return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(old.keys() | new.keys())
          if shown(old, key) != shown(new, key)]


@dataclasses.dataclass
class LoopState:
  """The loop's bookkeeping from one step to the next.

  The first three fields are the early-stopping record: every checkpoint saves them (its `loop` item,
  `checkpointed()`) and a resume restores them, so patience counts across restarts. The others belong
  to this launch and start afresh on every resume.
  """

  best_validation_accuracy: float = -1.0
  evaluations_without_improvement: int = 0
  early_stopped: bool = False
  step: int = 0  # optimizer steps taken, counted on the host: reading it never waits for the device
  preempted: bool = False  # a signal to some process stopped the loop; the run resumes later
  pending_metrics: list = dataclasses.field(default_factory=list)  # per-step metrics still on the device
  started: float = 0.0  # time.perf_counter() at the start of the loop: the time limit counts from here
  last_log_time: float = 0.0  # when and at which step metrics were last logged (for steps_per_second)
  last_log_step: int = 0
  previous_summary: dict | None = None  # the last logged means, which `collapse_warning` compares with
  collapse_warned: bool = False  # the collapse warning is given once per launch

  CHECKPOINTED = ("best_validation_accuracy", "evaluations_without_improvement", "early_stopped")

  @classmethod
  def from_checkpoint(cls, saved: dict) -> LoopState:
    return cls(**{name: saved[name] for name in cls.CHECKPOINTED})

  def checkpointed(self) -> dict:
    """The JSON item saved with every checkpoint."""
    return {name: getattr(self, name) for name in self.CHECKPOINTED}

  def start_clock(self) -> None:
    self.started = self.last_log_time = time.perf_counter()
    self.last_log_step = self.step

  def out_of_time(self, limit_minutes: float) -> bool:
    """Whether train.time_limit_minutes (0: none) has passed since `start_clock`: each launch gets the
    whole limit, so a resumed run trains for the limit again."""
    return limit_minutes > 0 and time.perf_counter() - self.started > 60 * limit_minutes

  def record_validation(self, accuracy: float, patience: int) -> None:
    """Early stopping: counts validations without a new best, and stops after `patience` of them (0: never)."""
    if accuracy > self.best_validation_accuracy:
      self.best_validation_accuracy, self.evaluations_without_improvement = accuracy, 0
    else:
      self.evaluations_without_improvement += 1
    if patience and self.evaluations_without_improvement >= patience:
      self.early_stopped = True
      logging.info("Early stopping at step %d: no improvement in %d validations.", self.step, patience)


def _train_and_evaluate(config, workdir: pathlib.Path, built: Setup) -> dict:
  """The loop of `train_and_evaluate`: resume, then steps with validation, logging and checkpoints on
  their schedules until the last step, early stopping, the time limit or a signal; then the report.

  Steps are dispatched without waiting for the device: the host reads device values only at
  validations and in `log_metrics` (every train.log_every steps and before every save).
  """
  train_config, parallel, num_steps = config.train, built.parallel, config.train.num_steps
  is_main = jax.process_index() == 0
  embed_fn = models.make_embed_fn(built.graphdef, config.eval.tta_shift_px)
  if is_main:
    print(f"Training on {parallel.num_devices} {parallel.devices[0].platform.upper()} device"
          f"{'s' if parallel.num_devices > 1 else ''} ({parallel.strategy}, global batch "
          f"{config.sampling.batch_size})", flush=True)
  checkpointer = checkpoint.Checkpointer(workdir / CHECKPOINTS_DIRNAME, max_to_keep=train_config.max_checkpoints)
  iterator = iter(pipeline.train_dataset(built.splits.train, built.sampler, num_steps=num_steps,
                                         num_workers=config.data.num_workers, process_index=jax.process_index(),
                                         process_count=jax.process_count()))
  state, loop = resume(config, workdir, checkpointer, iterator, built.state)
  writer = MetricWriter(workdir, enabled=is_main)
  step_fn = parallel.wrap_step(bind_train_step(built, config))
  device_state = parallel.put_state(state)
  progress = writer.progress(total=num_steps, initial=loop.step)
  loop.start_clock()
  stop = loop.early_stopped or loop.step >= num_steps
  batches = pipeline.prefetch_to_device(iterator, parallel.put_batch)
  preemption = PreemptionSignal()
  try:
    while not stop:
      batch, data_state = next(batches)
      device_state, metrics = step_fn(device_state, batch)
      loop.step += 1
      loop.pending_metrics.append(metrics)
      progress.update(1)
      is_last = loop.step >= num_steps
      out_of_time = loop.out_of_time(train_config.time_limit_minutes)
      validation = None
      if validation_due(loop.step, is_last, train_config, built.splits):
        validation = run_validation(embed_fn, built, device_state, config)
        device_state, plateau = reduce_on_plateau(parallel, device_state, validation, config.optim)
        writer.write(loop.step, {"accuracy": validation, **plateau}, prefix="validation")
        loop.record_validation(validation, train_config.early_stopping_patience)
      loop.preempted, out_of_time = agree_to_stop(loop.step, train_config.log_every,
                                                  preemption.signal_name is not None, out_of_time)
      stop = is_last or out_of_time or loop.early_stopped or loop.preempted
      will_save = loop.step % train_config.checkpoint_every == 0 or stop
      if loop.step % train_config.log_every == 0 or will_save:  # before every save: see `log_metrics`
        log_metrics(loop, built, writer, progress, train_config, checkpointer.directory)
      if will_save:
        checkpointer.save(loop.step, parallel.get_state(device_state), data_state, loop.checkpointed(),
                          validation_accuracy=validation, force=stop)
  except (FloatingPointError, UserError) as error:
    close_after_fault(checkpointer, error)
    raise
  finally:
    preemption.restore()
    progress.close()
  checkpointer.close()
  training_seconds = time.perf_counter() - loop.started  # the loop and its saves, not the report below
  if loop.preempted:
    if is_main:
      print(f"Stopped by {preemption.signal_name or 'a signal to another process'} at step {loop.step}; "
            "checkpoint saved. Run the same command to resume.", flush=True)
    writer.close()
    return {"step": loop.step, "preempted": True}
  final_state = parallel.local_copy(parallel.get_state(device_state))
  results = final_report(embed_fn, final_state, built.splits, config, step=int(final_state.step),
                         scorer=built.scorer(final_state))
  results["training_seconds"] = training_seconds
  # Bit-reproducible for a machine kind and this count (the parameters depend on how the batch was split).
  results["devices"] = {"count": parallel.num_devices, "kind": parallel.devices[0].device_kind,
                        "strategy": parallel.strategy, "processes": jax.process_count()}
  results["best_validation_accuracy"] = loop.best_validation_accuracy
  if is_main:
    results["threshold"] = calibrate_after_training(workdir, built.splits)
    (workdir / RESULTS_FILENAME).write_text(json.dumps(results, indent=2) + "\n")
  writer.close()
  return results


def resume(config, workdir: pathlib.Path, checkpointer: checkpoint.Checkpointer, iterator,
           fresh_state: TrainState) -> tuple[TrainState, LoopState]:
  """The train state and loop state to start from: the newest readable checkpoint's, or fresh ones.

  Restore order: the train state (arrays; shapes and shardings from `fresh_state`), then the Grain
  iterator position (`iterator` is set to it), then the loop's bookkeeping; the next batch drawn is then
  the one the interrupted run would have drawn. Process 0 writes `config.json` only after the restore
  succeeded: a config whose state the checkpoints cannot hold stops with UserError and leaves the record
  of the config that wrote them; one that differs but fits (training longer, say) resumes with a warning.
  """
  is_main = jax.process_index() == 0
  resolved = config.to_json_best_effort(indent=2) + "\n"
  changes = config_changes(workdir / CONFIG_FILENAME, resolved)
  try:
    restored = checkpointer.restore_latest(checkpoint.abstract_like(fresh_state))
  except checkpoint.StateMismatch as error:
    checkpointer.close()
    written_by = (f"the one that wrote them ({workdir / CONFIG_FILENAME}, left as it was) in: {'; '.join(changes)}"
                  if changes else "the one that wrote them")
    raise UserError(f"config mismatch: this config differs from {written_by}. Resume with that config, or "
                    f"train in a new workdir. ({error})") from error
  except UserError:
    checkpointer.close()
    raise
  if is_main:
    if restored is not None and changes:
      # Legitimate (training longer, say), but a resumed run is then not the run of either config.
      print(f"warning: {workdir / CONFIG_FILENAME} was written by another config; training continues from "
            f"its checkpoints with the new values: {'; '.join(changes)}", file=sys.stderr, flush=True)
    (workdir / CONFIG_FILENAME).write_text(resolved)  # only now: a run that cannot resume keeps its record
  state, loop = fresh_state, LoopState()
  if restored is not None:
    start_step, state, data_state, saved_loop = restored
    iterator.set_state(data_state)
    loop = LoopState.from_checkpoint(saved_loop)
    if is_main:
      print(f"Resuming from the checkpoint at step {start_step} in {workdir}", flush=True)
  loop.step = int(state.step)
  return state, loop


def validation_due(step: int, is_last: bool, train_config, splits: pipeline.Splits) -> bool:
  """Every train.eval_every steps (0: never) and after the last one, where classes are held out."""
  return bool(train_config.eval_every) and (step % train_config.eval_every == 0 or is_last) and \
      splits.validation is not None


def run_validation(embed_fn, built: Setup, device_state, config) -> float:
  """`validation_accuracy` of the model being trained; in a multi-process run, process 0's number.

  Every process embeds on its own copy of the state (`local_copy`), with no program spanning processes;
  their numbers agree up to rounding, but early stopping must stop them all at the same step.
  """
  parallel = built.parallel
  state = parallel.local_copy(parallel.get_state(device_state))
  validation = validation_accuracy(embed_fn, state, built.splits.validation, config.eval,
                                   seed=pipeline.split_seed(config.data, config.seed), scorer=built.scorer(state))
  if jax.process_count() > 1:  # process 0's number decides for all: they must stop at the same step
    validation = float(multihost_utils.broadcast_one_to_all(np.float32(validation)))
  return validation


def check_plateau(config, splits: pipeline.Splits) -> None:
  """optim.plateau_patience > 0 watches the validation accuracy, so the run must measure one."""
  if optim.plateau_enabled(config.optim) and (not config.train.eval_every or splits.validation is None):
    raise UserError(f"optim.plateau_patience={config.optim.plateau_patience} lowers the learning rate when the "
                    "validation accuracy stops improving, but this run never validates (train.eval_every=0 or no "
                    "validation classes); set train.eval_every > 0 with data.validation, or optim.plateau_patience=0.")


def reduce_on_plateau(parallel: DataParallel, device_state, accuracy: float, optim_config) -> tuple[Any, dict]:
  """The train state after a validation of `accuracy`, and what to log of it ({"lr_scale": ...}).

  With optim.plateau_patience > 0, each `optim.PlateauState` in the state (its few scalars, fetched from
  the strategy's layout, at a validation: never per step) goes through `optim.record_validation` on the
  host and is put back; the step then multiplies by the new scale. Otherwise nothing changes.
  """
  if not optim.plateau_enabled(optim_config):
    return device_state, {}
  is_plateau = lambda node: isinstance(node, optim.PlateauState)
  scales = []

  def advance(node):
    if not is_plateau(node):
      return node
    host = jax.device_get(parallel.local_copy(parallel.get_state(node)))
    new = optim.record_validation(host, accuracy, optim_config)
    scales.append(float(new.scale))
    return parallel.put_state(new)

  device_state = jax.tree.map(advance, device_state, is_leaf=is_plateau)
  return device_state, {"lr_scale": scales[0]}


def log_metrics(loop: LoopState, built: Setup, writer: MetricWriter, progress, train_config,
                checkpoint_directory: pathlib.Path) -> None:
  """Fetches the metrics of the steps since the last log, checks them (`check_finite`), writes their means.

  The loop's only regular host sync. It also runs before every save, so a non-finite state is never
  checkpointed. Warns once per launch when the embeddings collapse (`collapse_warning`).
  """
  is_main = jax.process_index() == 0
  fetched = jax.device_get(built.parallel.unreplicate_metrics(loop.pending_metrics))
  loop.pending_metrics = []
  summary = check_finite(fetched, last_step=loop.step, skip=train_config.skip_nonfinite_updates,
                         checkpoint_directory=checkpoint_directory, report=is_main)
  now = time.perf_counter()
  summary["steps_per_second"] = (loop.step - loop.last_log_step) / max(now - loop.last_log_time, 1e-9)
  loop.last_log_time, loop.last_log_step = now, loop.step
  writer.write(loop.step, summary, prefix="train")
  progress.set_postfix(loss=f"{summary['loss']:.4f}", steps_s=f"{summary['steps_per_second']:.2f}")
  warning = collapse_warning(loop.previous_summary, summary, built.loss_options.get("margin"))
  if warning and is_main and not loop.collapse_warned:
    loop.collapse_warned = True
    logging.warning("At step %d: %s", loop.step, warning)
  loop.previous_summary = summary


def close_after_fault(checkpointer: checkpoint.Checkpointer, error: Exception) -> None:
  """Completes a save still in flight after a non-finite loss or a disk error ends the loop.

  That save holds a clean state: complete it rather than abandon it (a disk error may surface again
  here; the first one is reported). Only where every process stops here: a non-finite loss is seen by
  all at the same fetch, a disk error perhaps by process 0 alone, and waiting for the others' part of
  a save would then wait forever.
  """
  if isinstance(error, FloatingPointError) or jax.process_count() == 1:
    try:
      checkpointer.close()
    except Exception:  # noqa: BLE001
      pass


def check_finite(fetched: list[dict], *, last_step: int, skip: bool, checkpoint_directory: pathlib.Path,
                 report: bool) -> dict[str, float]:
  """The mean of each metric over fetched steps `last_step - len(fetched) + 1 .. last_step`, after
  checking that each step's loss and gradient were finite.

  A non-finite step raises FloatingPointError naming it, unless `skip` (train.skip_nonfinite_updates):
  the step already left the state unchanged, so it is reported, counted (`skipped_updates`) and left
  out of the means.
  """
  first_step = last_step - len(fetched) + 1
  bad = [i for i, metrics in enumerate(fetched) if not metrics["finite"]]
  if bad and not skip:
    at = fetched[bad[0]]
    saved = checkpoint.complete_steps(checkpoint_directory)
    newest = f"newest: step {saved[-1]}" if saved else "none written yet"
    raise FloatingPointError(
        f"non-finite loss or gradient at step {first_step + bad[0]} (loss={float(at['loss'])}, gradient "
        f"norm={float(at['grad_norm'])}); no checkpoint holds it or anything after it ({newest}). Lower "
        "optim.learning_rate, set optim.clip_grad_norm, or set train.skip_nonfinite_updates=True to skip "
        "such updates.")
  if bad and report:
    steps = [first_step + i for i in bad]
    logging.warning("Skipped %d update(s) with a non-finite loss or gradient, at step(s) %s.", len(steps),
                    ", ".join(map(str, steps)))
  kept = [metrics for i, metrics in enumerate(fetched) if i not in bad] or fetched
  summary = {k: float(np.mean([m[k] for m in kept])) for k in fetched[0] if k != "finite"}
  if skip:
    summary["skipped_updates"] = float(len(bad))
  return summary


COLLAPSE_FRACTION = 0.1


def collapse_warning(previous: dict | None, summary: dict, margin: float | None) -> str | None:
  """A warning when a margin loss's embeddings are collapsing onto one point, else None.

  Collapsing: both mean distances (anchor-positive, anchor-negative; in the loss's own units) are below
  COLLAPSE_FRACTION of the margin, and the anchor-negative one is still falling since the previous log.
  Every triplet or negative pair then costs about the margin and its gradient vanishes. Batch-hard
  mining from initialisation does this on m-per-class Omniglot batches (docs/ablations.md), while a run
  that learns keeps both distances of the order of the margin and growing. Losses without a margin or
  without distance metrics are never flagged.
  """
  if margin is None or previous is None:
    return None
  try:
    positive, negative = summary["mean_positive_distance"], summary["mean_negative_distance"]
    before = previous["mean_negative_distance"]
  except KeyError:
    return None
  limit = COLLAPSE_FRACTION * margin
  if not (negative < limit and positive < limit and negative < before):
    return None
  return (f"the embeddings are collapsing onto one point: mean anchor-positive distance {positive:.3g}, "
          f"anchor-negative {negative:.3g} (was {before:.3g}), both below {COLLAPSE_FRACTION:g} x the "
          f"margin ({margin:g}), so every loss term sits at the margin and its gradient vanishes. Batch-hard "
          "mining from initialisation does this; try loss.mining=semi_hard, a lower optim.learning_rate, "
          "or a smaller loss.margin.")


def agree_to_stop(step: int, every: int, *requests: bool) -> tuple[bool, ...]:
  """This process's stop requests (a signal, the time limit), made common to all processes.

  Processes must stop at the same step: one that leaves early to save would leave the others waiting in
  the next step's collectives. So with several processes each request is OR-ed over processes every
  `every` steps (a tiny all-gather of flags, no sync of the training state) and ignored in between.
  """
  if jax.process_count() == 1:
    return requests
  if step % every:
    return (False,) * len(requests)
  flags = multihost_utils.process_allgather(np.array(requests, dtype=bool))
  return tuple(bool(flag) for flag in np.any(np.asarray(flags).reshape(-1, len(requests)), axis=0))


class PreemptionSignal:
  """SIGTERM / SIGINT ask the loop to finish its step, save a checkpoint and return.

  The handler only sets `signal_name`, which the loop reads between steps on the host (no device sync);
  with several processes it goes through `agree_to_stop`.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name

  def restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def calibrate_after_training(workdir: pathlib.Path, splits: pipeline.Splits) -> dict:
  """The same/different thresholds of the best checkpoint, calibrated on the validation classes, written to
  `<workdir>/eval/threshold.json` (what compare, gallery and openset decide with); a summary of them.

  The run's splits are already in memory; `--mode=calibrate` redoes this with other settings. In a
  multi-process run process 0 alone cannot restore a checkpoint, so there it is left to that mode.
  """
  if jax.process_count() > 1:
    return {"skipped": "not calibrated in a multi-process run: run --mode=calibrate once it ends"}
  model = trained.load_trained_model(workdir)
  record = trained.calibrate(model, splits)
  write_json(threshold_path(workdir), record)
  return {**{key: record[key] for key in ("scoring", "threshold", "gallery_threshold") if key in record},
          "step": model.step, "written": str(threshold_path(workdir))}


def final_report(embed_fn, state: TrainState, splits: pipeline.Splits, config, *, step: int,
                 scorer: scoring.Scorer) -> dict:
  """One-shot accuracy on the test classes (and Lake's 20 runs for Omniglot), as a results dict, scored by
  `scorer` (`Setup.scorer(state)`: a pair-head model by its head's probability, as `--mode=eval` does).
  """
  eval_config = config.eval
  test = splits.test
  embeddings = None
  if len(test):
    embeddings = embedding.embed_images(embed_fn, variables_of(state), pipeline.all_images(test),
                                        eval_config.batch_size, progress=jax.process_index() == 0)
  return {"step": step, "seed": config.seed, **one_shot_results(
      embed_fn, variables_of(state), splits, embeddings, config, ways=tuple(eval_config.test_ways),
      shots=tuple(eval_config.test_shots), queries=eval_config.queries_per_class,
      num_episodes=eval_config.test_episodes, seed=config.seed, batch_size=eval_config.batch_size,
      scorer=scorer)}
