"""The train state, the pure train step, and the loop (which reads like a schedule).

`train_and_evaluate(config, workdir)` is the library's main entry: it resumes from the newest
checkpoint in `workdir` when there is one, trains, validates, checkpoints, and finally reports one-shot
accuracy on the test classes. `launch.py` only parses flags and calls it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import signal
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

from siamese_jax import augment, checkpoint, evaluate, losses, models, optim
from siamese_jax.data import pipeline, sampling
from siamese_jax.errors import UserError
from siamese_jax.parallel import AXIS, DataParallel
from siamese_jax.writers import MetricWriter


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nnx.State of nnx.Param
  model_state: Any  # nnx.State of everything else (BatchNorm statistics)
  opt_state: Any  # optax state


def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               schedule: Callable, loss_fn: Callable, loss_options: dict, augment_config,
               seed: int) -> tuple[TrainState, dict]:
  """One optimizer step, written per device with collectives over `AXIS` (see parallel.py).

  Each example's distortion key is fold_in(step key, its index in the *global* batch), and embeddings
  are all-gathered before the loss, so the step computes the same numbers on 1 or N devices.
  """
  num_devices = jax.lax.axis_size(AXIS)
  local_batch = batch["labels"].shape[0]
  step_key = jax.random.fold_in(jax.random.key(seed), state.step)
  example_ids = jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)
  images = augment_examples(step_key, example_ids, batch["images"], augment_config)  # float [b,k,H,W,C]
  labels = jax.lax.all_gather(batch["labels"], AXIS, tiled=True)

  def loss_of(params):
    model = nnx.merge(graphdef, params, state.model_state, copy=True)
    model.train()
    embeddings, _ = model(images.reshape((-1,) + images.shape[2:]))
    embeddings = embeddings.reshape(images.shape[:2] + embeddings.shape[-1:])
    # Every device computes the loss of the global batch; dividing by the device count makes the psum of
    # the per-device gradients below (all_gather transposes to a sum) equal the one-device gradient.
    all_embeddings = jax.lax.all_gather(embeddings, AXIS, tiled=True)
    loss, metrics = loss_fn(all_embeddings, labels, pair_logits_fn=getattr(model, "pair_logits", None),
                            **loss_options)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss / num_devices, (loss, metrics, new_model_state)

  grads, (loss, metrics, model_state) = jax.grad(loss_of, has_aux=True)(state.params)
  grads = jax.lax.psum(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                 finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  new_state = TrainState(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
  return new_state, metrics


def augment_examples(step_key, example_ids, images, augment_config):
  """uint8 [b,k,H,W,C] -> float [b,k,H,W,C]; every image of every example gets its own distortion."""
  if not augment_config.enabled:
    return augment.to_float(images)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, example_ids)
  options = {k: v for k, v in augment_config.items() if k != "enabled"}
  return jax.vmap(lambda key, example: augment.random_affine(key, example, **options))(keys, images)


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


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Data, model, optimizer and a fresh train state; every user mistake found here, before training."""
  loss_fn = losses.get_loss(config.loss.name)
  loss_options = {k: v for k, v in config.loss.items() if k != "name"}
  losses.validate_loss_options(config.loss.name, loss_options)
  parallel = DataParallel(config.parallel.strategy, config.parallel.num_devices or None)
  parallel.check_batch_size(config.sampling.batch_size)
  splits = pipeline.load_splits(config.data, seed=config.seed)
  train_source = splits.train
  sampler = sampling.Sampler(
      sampling.ClassIndex.from_labels(train_source.labels, train_source.class_groups,
                                      train_source.class_names),
      kind=config.sampling.kind, batch_size=config.sampling.batch_size, seed=config.seed,
      m_per_class=config.sampling.m_per_class,
      same_group_negative_probability=config.sampling.same_group_negative_probability)
  losses.check_batch_kind(config.loss.name, loss_options, sampler.kind)
  model = models.create(config.model, image_shape=train_source.image_shape, rngs=nnx.Rngs(config.seed))
  if config.loss.name == "koch_bce" and not models.has_pair_head(model):
    raise UserError(f"loss.name='koch_bce' scores pairs with Koch's weighted-L1 head, which "
                    f"model.name='{config.model.name}' lacks; use model.name='koch' or a pair loss such as "
                    "'contrastive'.")
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  steps_per_epoch = config.train.steps_per_epoch
  optim_config = config.optim.copy_and_resolve_references()
  if optim_config.total_steps == -1:
    if optim_config.schedule == "cosine" and config.train.num_steps <= optim_config.warmup_steps:
      raise UserError(f"train.num_steps={config.train.num_steps} must exceed optim.warmup_steps="
                      f"{optim_config.warmup_steps} for the cosine schedule.")
    optim_config.total_steps = config.train.num_steps
  tx, schedule = optim.create_optimizer(optim_config, steps_per_epoch=steps_per_epoch,
                                        global_batch_size=config.sampling.batch_size)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=tx.init(params))
  return Setup(splits, parallel, graphdef, state, tx, schedule, sampler, loss_fn, loss_options)


def variables_of(state: TrainState):
  """The whole model state (params + batch statistics) that `embed_fn` takes."""
  return nnx.merge_state(state.params, state.model_state)


def validation_accuracy(embed_fn, state: TrainState, source, eval_config, seed: int) -> float:
  """Mean N-way 1-shot within-group accuracy on the validation classes (fixed episodes)."""
  embeddings = evaluate.embed_images(embed_fn, variables_of(state), pipeline.all_images(source),
                                     eval_config.batch_size)
  ways = min(eval_config.validation_ways, int(np.bincount(source.class_groups).max()))
  episodes = evaluate.sample_episodes(source.labels, source.class_groups, ways=ways, shots=1,
                                      queries=eval_config.queries_per_class,
                                      num_episodes=eval_config.validation_episodes, seed=seed,
                                      within_group=True)
  return float(evaluate.episode_accuracies(embeddings, episodes).mean())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates; returns the results."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"cannot create workdir {workdir}: {error}") from error
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  built = setup(config)
  train_config = config.train
  embed_fn = models.make_embed_fn(built.graphdef)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=train_config.max_checkpoints)
  dataset = pipeline.train_dataset(built.splits.train, built.sampler, num_steps=train_config.num_steps,
                                   num_workers=config.data.num_workers, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  iterator = iter(dataset)
  state = built.state
  loop_state = {"best_validation_accuracy": -1.0, "evaluations_without_improvement": 0,
                "early_stopped": False}
  restored = checkpointer.restore_latest(checkpoint.abstract_like(state))
  if restored is not None:
    # Restore order: train state (arrays, shapes from a fresh state), then the Grain iterator position,
    # then the loop's bookkeeping; the next batch drawn is then the one the interrupted run would draw.
    start_step, state, data_state, loop_state = restored
    iterator.set_state(data_state)
    print(f"Resuming from the checkpoint at step {start_step} in {workdir}", flush=True)
  start_step = int(state.step)

  writer = MetricWriter(workdir, enabled=is_main)
  step_fn = built.parallel.wrap_step(functools.partial(
      train_step, graphdef=built.graphdef, tx=built.tx, schedule=built.schedule, loss_fn=built.loss_fn,
      loss_options=built.loss_options, augment_config=config.augment, seed=config.seed))
  device_state = built.parallel.put_state(state)
  num_steps = train_config.num_steps
  step = start_step
  pending_metrics = []
  progress = writer.progress(total=num_steps, initial=start_step)
  last_log_time, last_log_step = time.perf_counter(), step
  training_started = time.perf_counter()
  stop = loop_state["early_stopped"] or step >= num_steps
  preempted = False
  batches = pipeline.prefetch_to_device(iterator, built.parallel.put_batch)
  preemption = PreemptionSignal()
  while not stop:
    batch, data_state = next(batches)
    device_state, metrics = step_fn(device_state, batch)
    step += 1
    pending_metrics.append(metrics)
    progress.update(1)
    is_last = step >= num_steps
    out_of_time = (train_config.time_limit_minutes > 0 and
                   time.perf_counter() - training_started > 60 * train_config.time_limit_minutes)

    validation = None
    if train_config.eval_every and (step % train_config.eval_every == 0 or is_last) and \
        built.splits.validation is not None:
      validation = validation_accuracy(embed_fn, built.parallel.get_state(device_state),
                                       built.splits.validation, config.eval, seed=config.seed)
      writer.write(step, {"accuracy": validation}, prefix="validation")
      if validation > loop_state["best_validation_accuracy"]:
        loop_state.update(best_validation_accuracy=validation, evaluations_without_improvement=0)
      else:
        loop_state["evaluations_without_improvement"] += 1
      patience = train_config.early_stopping_patience
      if patience and loop_state["evaluations_without_improvement"] >= patience:
        loop_state["early_stopped"] = True
        logging.info("Early stopping at step %d: no improvement in %d validations.", step, patience)

    preempted = preemption.requested(step, every=train_config.log_every)
    stop = is_last or out_of_time or loop_state["early_stopped"] or preempted
    will_save = step % train_config.checkpoint_every == 0 or stop
    # The only regular host sync; also before every save, so a non-finite state is never checkpointed.
    if step % train_config.log_every == 0 or will_save:
      fetched = jax.device_get(built.parallel.unreplicate_metrics(pending_metrics))
      pending_metrics = []
      summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      if summary.pop("finite") < 1.0:
        bad = next(step - len(fetched) + 1 + i for i, m in enumerate(fetched) if not m["finite"])
        raise FloatingPointError(f"non-finite loss or gradient at step {bad} (loss={fetched[-1]['loss']}); "
                                 f"the last checkpoint ({checkpointer.all_steps()[-1:] or 'none'}) is clean. "
                                 "Lower optim.learning_rate or set optim.clip_grad_norm.")
      now = time.perf_counter()
      summary["steps_per_second"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      writer.write(step, summary, prefix="train")
      progress.set_postfix(loss=f"{summary['loss']:.4f}", steps_s=f"{summary['steps_per_second']:.2f}")

    if will_save:
      checkpointer.save(step, built.parallel.get_state(device_state), data_state, dict(loop_state),
                        validation_accuracy=validation, force=stop)
  progress.close()
  checkpointer.close()
  preemption.restore()
  if preempted:
    print(f"Stopped by {preemption.signal_name} at step {step}; checkpoint saved. Run the same command to "
          "resume.", flush=True)
    writer.close()
    return {"step": step, "preempted": True}
  final_state = built.parallel.get_state(device_state)
  results = final_report(embed_fn, final_state, built.splits, config, step=int(final_state.step))
  results["training_seconds"] = time.perf_counter() - training_started
  results["best_validation_accuracy"] = loop_state["best_validation_accuracy"]
  if is_main:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  writer.close()
  return results


class PreemptionSignal:
  """SIGTERM / SIGINT ask the loop to finish its step, save a checkpoint and return.

  The handler only sets a flag, checked between steps on the host (no device sync). With several
  processes they must agree on the stopping step, so the flag is all-gathered every `every` steps.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name

  def requested(self, step: int, every: int) -> bool:
    if jax.process_count() == 1:
      return self.signal_name is not None
    if step % every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(self.signal_name is not None))
    return bool(np.any(flags))

  def restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def final_report(embed_fn, state: TrainState, splits: pipeline.Splits, config, *, step: int) -> dict:
  """One-shot accuracy on the test classes (and Lake's 20 runs for Omniglot), as a results dict."""
  eval_config = config.eval
  results: dict[str, Any] = {"step": step}
  test = splits.test
  if len(test):
    embeddings = evaluate.embed_images(embed_fn, variables_of(state), pipeline.all_images(test),
                                       eval_config.batch_size, progress=True)
    results["episodes"] = evaluate.one_shot_report(
        embeddings, test.labels, test.class_groups, ways=tuple(eval_config.test_ways),
        shots=tuple(eval_config.test_shots), queries=eval_config.queries_per_class,
        num_episodes=eval_config.test_episodes, seed=config.seed)
  if eval_config.lake_runs and splits.lake_runs:
    results["lake_runs"] = evaluate.lake_runs_accuracy(embed_fn, variables_of(state), splits.lake_runs)
  return results
