"""Ensembles: several trained workdirs combined into one model.

  python launch.py --mode=ensemble --workdir=runs/ens --members=runs/a,runs/b   # writes runs/ens/ensemble.json
  python launch.py --mode=eval --workdir=runs/ens                              # any mode on a workdir
  python launch.py --config=configs/omniglot_best_ensemble.py --workdir=runs/best  # train the members, combine

`train_ensemble` runs an ensemble config (`config.members`: name -> a training config, `config.checkpoint`):
each member trains in `<workdir>/members/<name>`, one after the other in the order of `config.members`,
then `make_ensemble` combines them and `--mode=eval` reports on the result.

`make_ensemble` fixes each member's checkpoint (`--checkpoint`, best by default, resolved once) and
writes `<workdir>/ensemble.json`, with paths relative to that workdir (so the members and the ensemble can
move together); from then on `trained.load_trained_model` loads that workdir as one model (how the
members' embeddings are combined is described there), so eval, calibrate, export, compare, gallery,
openset and plots all work on it unchanged.

The first member's config is the ensemble's: its splits (validation, test, Lake's runs) are what the
ensemble is validated and tested on. Members must take the same input and be distance models (a Koch
pair head is not combined), and no member may have trained on an image of those splits: a member from
another split or seed is checked image file by image file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from siamese_jax import distributed, training
from siamese_jax.data import pipeline
from siamese_jax.errors import UserError
from siamese_jax.metrics.episodes import validation_accuracy
from siamese_jax.modes import evaluate
from siamese_jax.trained import TrainedModel, is_ensemble, load_trained_model
from siamese_jax.workdir import CHECKPOINTS_DIRNAME, ENSEMBLE_FILENAME, MEMBERS_DIRNAME, RESULTS_FILENAME, write_json

# How long the other processes of a multi-process run wait while process 0 combines and evaluates.
COMBINE_TIMEOUT_SECONDS = 6 * 3600


def _image_files(source) -> set[str]:
  # A record's file without its view suffix ("...png#rot090" in Vinyals' split is that file rotated).
  return {file_id.split("#")[0] for file_id in source.file_ids}


def _check_members(models: list[TrainedModel], workdirs: list[pathlib.Path], splits) -> None:
  """Same input, no pair head, and no member trained on an image the first member's `splits` hold out."""
  first = models[0]
  for model, workdir in zip(models, workdirs):
    if model.has_pair_head:
      raise UserError(f"ensemble member {workdir}: has a pair head (model.name='{model.config.model.name}'); "
                      "an ensemble combines embedding distances, so its members must be distance models.")
    if model.image_shape != first.image_shape:
      raise UserError(f"ensemble member {workdir}: takes {model.image_shape} images, the first member "
                      f"({workdirs[0]}) {first.image_shape}; members must take the same input.")
    if model.config.data.source != first.config.data.source:
      raise UserError(f"ensemble member {workdir}: trained on data.source='{model.config.data.source}', "
                      f"the first member on '{first.config.data.source}'.")
  held_out = {name: _image_files(source) for name, source in
              (("validation", splits.validation), ("test", splits.test), ("Vinyals test", splits.vinyals_test))
              if source is not None}
  seen = {(first.config.data.to_json(), first.config.seed)}
  for model, workdir in zip(models[1:], workdirs[1:]):
    key = (model.config.data.to_json(), model.config.seed)
    if key in seen:  # the same data and seed: the same splits as a member already checked
      continue
    seen.add(key)
    trained_on = _image_files(pipeline.load_splits(model.config.data, seed=model.config.seed).train)
    for name, files in held_out.items():
      overlap = sorted(trained_on & files)
      if overlap:
        raise UserError(f"ensemble member {workdir}: trained on {len(overlap)} image(s) of the first member's "
                        f"{name} split (e.g. {overlap[0]}); an ensemble must not be validated or tested on "
                        "what a member saw. Use members trained on the same split.")


def make_ensemble(workdir: str | pathlib.Path, members: Sequence[str | pathlib.Path], *, checkpoint: str = "best",
                  batch_size: int | None = None, progress: bool = True) -> dict:
  """Writes `<workdir>/ensemble.json` for `members` (trained workdirs) and returns a summary with the
  validation accuracy of each member and of the ensemble (the training runs' protocol: fixed N-way
  1-shot episodes of the first member's validation classes)."""
  workdir = pathlib.Path(workdir).expanduser()
  member_dirs = [pathlib.Path(m).expanduser().resolve() for m in members]
  if len(member_dirs) < 2:
    raise UserError(f"--members: an ensemble needs at least 2 trained workdirs, got {len(member_dirs)}.")
  if len(set(member_dirs)) != len(member_dirs):
    raise UserError(f"--members: {', '.join(map(str, member_dirs))} names a workdir twice.")
  if workdir.resolve() in member_dirs or (workdir / CHECKPOINTS_DIRNAME).exists():
    raise UserError(f"workdir {workdir}: holds a training run; give the ensemble a workdir of its own.")
  for member in member_dirs:
    if is_ensemble(member):
      raise UserError(f"ensemble member {member}: is an ensemble itself; list its members instead.")
  models = [load_trained_model(member, checkpoint=checkpoint) for member in member_dirs]
  config = models[0].config
  splits = pipeline.load_splits(config.data, seed=config.seed)
  _check_members(models, member_dirs, splits)
  source, source_name = (splits.validation, "validation") if splits.validation is not None else (splits.train,
                                                                                                  "train")
  batch_size = batch_size or int(config.eval.batch_size)
  embeddings = [model.embed(source, batch_size=batch_size, progress=progress) for model in models]
  rms = [float(np.sqrt(np.mean(np.sum(e.astype(np.float64) ** 2, axis=-1)))) for e in embeddings]
  scales = [1.0 / (max(r, 1e-12) * np.sqrt(len(models))) for r in rms]
  relative = lambda path: os.path.relpath(path, workdir.resolve())  # survives moving the whole tree
  record = {"members": [{"workdir": relative(member), "checkpoint": relative(model.checkpoint_dir),
                         "step": model.step,
                         "selected_by": model.selected_by, "rms_embedding_length": r, "scale": s}
                        for member, model, r, s in zip(member_dirs, models, rms, scales)],
            "scales_from": f"{source_name} split of the first member ({len(source)} images)"}
  summary = {"written": str(workdir / ENSEMBLE_FILENAME), "members": {}}
  if splits.validation is not None:
    validation_seed = pipeline.split_seed(config.data, config.seed)  # the members' training validation
    combined = np.concatenate([e * s for e, s in zip(embeddings, scales)], axis=-1)
    for member, model, member_embeddings in zip(member_dirs, models, embeddings):
      summary["members"][str(member)] = {"step": model.step, "validation_accuracy": validation_accuracy(
          member_embeddings, splits.validation, config.eval, validation_seed)}
    summary["validation_accuracy"] = validation_accuracy(combined, splits.validation, config.eval, validation_seed)
    record["validation_accuracy"] = summary["validation_accuracy"]
  workdir.mkdir(parents=True, exist_ok=True)
  write_json(workdir / ENSEMBLE_FILENAME, record)
  return summary


def ensemble_config(arg: str | None, member: Callable[[str, bool], ml_collections.ConfigDict],
                    names: Sequence[str], smoke_names: Sequence[str]) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an ensemble config file, whose `member(name, smoke)` builds one member's training config.

  `arg`: None (the ensemble of `names`), a member's name (that network alone, to train or study it by
  itself) or "smoke" (the members `smoke_names`, each at smoke size). An ensemble config is
  `members` (name -> training config, combined in sorted-name order: a ConfigDict sorts its keys, and the
  first member's splits are the ensemble's) and `checkpoint` (which checkpoint of each member to combine).
  """
  if arg in names:
    return member(arg, False)
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config variant '{arg}' (known: {', '.join(names)}, smoke)")
  smoke = arg == "smoke"
  config = ml_collections.ConfigDict()
  config.members = ml_collections.ConfigDict({name: member(name, smoke) for name in (smoke_names if smoke else names)})
  config.checkpoint = "best"  # which checkpoint of each member to combine: best | latest | <step>
  return config


def is_ensemble_config(config: ml_collections.ConfigDict | None) -> bool:
  return config is not None and "members" in config


def member_workdirs(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """{member name: its workdir} in the order the members train and combine (the first one's splits are the
  ensemble's)."""
  return {name: pathlib.Path(workdir) / MEMBERS_DIRNAME / name for name in config.members}


def train_ensemble(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True) -> dict:
  """Trains every member of an ensemble config, combines them in `workdir`, and evaluates the ensemble.

  Resumable like one training run: a member whose workdir holds a finished run's results.json is not
  trained again, an unfinished one resumes from its newest checkpoint, and a stop by a signal (preemption)
  ends here with the members so far intact. Every process of a multi-process run calls this; only process 0
  combines and evaluates. Returns `--mode=eval`'s results on the ensemble, or `{"preempted": True, ...}`.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if len(config.members) < 2:
    raise UserError(f"config.members: an ensemble config needs at least 2 members, got {len(config.members)}.")
  if (workdir / CHECKPOINTS_DIRNAME).exists():
    raise UserError(f"workdir {workdir}: holds a training run; give the ensemble a workdir of its own.")
  members = member_workdirs(config, workdir)
  for name, member_dir in members.items():
    if (member_dir / RESULTS_FILENAME).is_file():  # a finished training run's report
      continue
    results = training.train_and_evaluate(config.members[name], member_dir)
    if results.get("preempted"):
      return {**results, "member": name}
  results = {}
  if jax.process_index() == 0:
    make_ensemble(workdir, list(members.values()), checkpoint=config.checkpoint, progress=progress)
    results = evaluate.evaluate_workdir(workdir, progress=progress)
  # The other processes wait here: leaving now, their shutdown would wait for process 0 and time out.
  distributed.wait_for_all("ensemble_evaluated", timeout_seconds=COMBINE_TIMEOUT_SECONDS)
  return results
