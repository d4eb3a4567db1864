r"""siamese-jax command line: the only file that defines flags; each mode calls one library function.

  python launch.py --config=configs/omniglot.py --workdir=runs/omniglot              # train (resumes)
  python launch.py --config=configs/omniglot.py:smoke --workdir=/tmp/smoke           # seconds
  python launch.py --config=configs/omniglot.py --config.train.num_steps=100 --workdir=...  # override
  python launch.py --config=configs/omniglot_best_ensemble.py --workdir=runs/best   # members, then one model

Running the same command again with the same workdir resumes from its newest checkpoint.

On a trained workdir (its config.json and checkpoints; --checkpoint=best|latest|<step>|<path>):
  python launch.py --mode=eval --workdir=W                     # everything -> W/eval/results.json
  python launch.py --mode=calibrate --workdir=W                # same/different threshold -> W/eval/threshold.json
  python launch.py --mode=export --workdir=W --split=test      # embeddings -> W/eval/embeddings_test.npz
  python launch.py --mode=compare --workdir=W --image1=a.png --image2=b.png
  python launch.py --mode=gallery --workdir=W --gallery=DIR --queries=DIR --method=nearest|centroid|medoid
  python launch.py --mode=openset --workdir=W --gallery=DIR --queries=DIR
  python launch.py --mode=plots --workdir=W                    # PNGs -> W/eval/plots/
  python launch.py --mode=export_model --workdir=W             # served model (jax only) -> W/eval/model.zip
  python launch.py --mode=projector --workdir=W --split=test   # TensorBoard projector -> W/eval/projector/
  python launch.py --mode=index --workdir=W --gallery=DIR     # gallery index -> W/eval/index/
  python launch.py --mode=search --workdir=W --queries=DIR --k=5   # top-k -> W/eval/search.csv
  python launch.py --mode=ensemble --workdir=E --members=W1,W2  # then every mode above works on E
"""

import difflib
import os
import pathlib
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from siamese_jax import api, distributed, trained  # the package sets XLA's CPU flags before JAX starts
from siamese_jax.errors import UserError
from siamese_jax.metrics import retrieval, scoring, verification
from siamese_jax.modes import ensemble, evaluate, export, export_model, gallery, plots, projector
from siamese_jax.modes.index import build_index, search_index
from siamese_jax.modes.report import print_mapping, print_results

MODES = ("train", "eval", "calibrate", "export", "compare", "gallery", "openset", "plots", "ensemble", "export_model",
         "projector", "index", "search")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/omniglot.py or configs/omniglot.py:smoke. "
                                "Required to train; other modes read <workdir>/config.json unless it is given.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the resolved config and results.")
flags.DEFINE_enum("mode", "train", MODES, "train (then evaluate on the test classes) | eval | calibrate | export | "
                  "compare | gallery | openset | plots | ensemble | export_model | projector: see the module "
                  "docstring.")
flags.mark_flags_as_required(["workdir"])
# Training on several processes (several hosts, or one process per GPU): docs/scaling.md.
flags.DEFINE_string("coordinator_address", None, "train on several processes: host:port where process 0 listens "
                    "(or $JAX_COORDINATOR_ADDRESS). Unset, and no SLURM/TPU cluster detected: one process.")
flags.DEFINE_integer("num_processes", None, "train on several processes: how many (or $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "train on several processes: this one's id, 0 .. num_processes-1 (or "
                     "$JAX_PROCESS_ID).")
# Modes on a trained workdir.
flags.DEFINE_string("checkpoint", "best", "Checkpoint to use: best (by validation accuracy), latest, a step number, "
                    "or the path of a <workdir>/checkpoints/<step> directory.")
flags.DEFINE_list("ways", [], "eval: N of the N-way episodes (comma-separated); default: the run's "
                  "eval.test_ways.")
flags.DEFINE_list("shots", [], "eval: K of the K-shot episodes (comma-separated); default: the run's "
                  "eval.test_shots.")
flags.DEFINE_integer("episodes", 1000, "eval: episodes per (mode, N, K) setting.")
flags.DEFINE_integer("queries_per_class", None, "eval: query images per class in an episode (default: the run's "
                     "eval.queries_per_class).")
flags.DEFINE_integer("seed", None, "eval/plots: seed of the test episodes and pairs; projector: of the subsample "
                     "(default: the run's seed); thresholds are always calibrated with the run's seed.")
flags.DEFINE_enum("scoring", "auto", scoring.SCORINGS, "eval/calibrate: score pairs by embedding "
                  "distance or by the Koch head's probability; auto = the head where the model has one.")
flags.DEFINE_enum("threshold_method", "max_accuracy", verification.THRESHOLD_METHODS, "eval/calibrate: calibrate the "
                  "threshold for the highest accuracy on validation pairs, or for a false accept rate <= --target_far.")
flags.DEFINE_float("target_far", 0.001, "eval/calibrate with --threshold_method=far: the false accept rate.")
flags.DEFINE_integer("pairs", 10000, "eval/calibrate/plots: verification pairs (half same, half different).")
flags.DEFINE_float("threshold", None, "compare/gallery/openset: same/different threshold (a distance, or a "
                   "probability for pair-head models; index: a distance) instead of <workdir>/eval/threshold.json.")
flags.DEFINE_enum("split", "test", export.EXPORT_SPLITS, "export/projector: which of the run's splits.")
flags.DEFINE_string("images", None, "export/projector: a folder of images (one sub-folder per class) instead of a "
                    "split.")
flags.DEFINE_string("output", None, "export: .npz path; gallery/openset: CSV path; plots/projector: folder; "
                    "export_model: .zip path; index: folder; search: CSV path. Default: under <workdir>/eval/.")
flags.DEFINE_list("platforms", list(export_model.DEFAULT_PLATFORMS), "export_model: the platforms the served model "
                  f"runs on (comma-separated, of {', '.join(export_model.PLATFORMS)}).")
flags.DEFINE_integer("max_points", projector.DEFAULT_MAX_POINTS, "projector: at most this many images (a seeded "
                     "subsample of more).")
flags.DEFINE_string("image1", None, "compare: first image file.")
flags.DEFINE_string("image2", None, "compare: second image file.")
flags.DEFINE_string("gallery", None, "gallery/openset/index: folder with one sub-folder of images per known class.")
flags.DEFINE_string("queries", None, "gallery/openset/search: an image, a folder of images, or class sub-folders "
                    "(then accuracy is reported; openset needs them: classes not in the gallery are unknown).")
flags.DEFINE_enum("method", "nearest", retrieval.GALLERY_METHODS, "gallery/openset: compare a query with "
                  "the nearest gallery image, the class centroid, or the class medoid.")
flags.DEFINE_enum("invert", "auto", trained.INVERT_CHOICES, "compare/gallery/openset/export/projector --images: "
                  "invert image files (dark ink -> bright); auto = as the model's training data (Omniglot: yes).")
flags.DEFINE_list("members", None, "ensemble: the trained workdirs to combine (comma-separated); --checkpoint "
                  "picks each one's checkpoint, fixed from then on.")
flags.DEFINE_integer("batch_size", None, "Images embedded per call (default: the run's eval.batch_size).")
flags.DEFINE_string("index", None, "search: the index folder --mode=index wrote (default <workdir>/eval/index/).")
flags.DEFINE_integer("k", 5, "search: how many nearest index items to list per query.")
flags.DEFINE_enum("backend", None, ["exact", "usearch"], "index: the search backend saved with the index "
                  "(default exact); search: the one to use (default the saved one). usearch is approximate: "
                  "pip install 'siamese-jax[ann]'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  config, workdir, mode = FLAGS.config, FLAGS.workdir, FLAGS.mode
  common = dict(checkpoint=FLAGS.checkpoint, config=config)
  try:
    if mode != "train" and ensemble.is_ensemble_config(config):
      raise UserError(f"--config: an ensemble config (with members) only trains; for --mode={mode} leave out "
                      "--config, and the workdir's ensemble.json says what the ensemble is.")
    if mode == "train":
      if config is None:
        raise UserError("--config is required to train (e.g. --config=configs/omniglot.py).")
      # Before anything touches a device: every process then sees the devices of all.
      if distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
        logging.set_verbosity(logging.WARNING if distributed.is_main_process() else logging.ERROR)
      results = api.run_training(config, workdir)  # train (or resume), evaluate, calibrate the threshold
      if distributed.is_main_process():
        print_results(results)
    elif mode == "eval":
      results = evaluate.evaluate_workdir(
          workdir, ways=integers(FLAGS.ways, "ways") if FLAGS.ways else None,
          shots=integers(FLAGS.shots, "shots") if FLAGS.shots else None,
          num_episodes=FLAGS.episodes, queries_per_class=FLAGS.queries_per_class, seed=FLAGS.seed,
          scoring=FLAGS.scoring, threshold_method=FLAGS.threshold_method, target_far=FLAGS.target_far,
          num_pairs=FLAGS.pairs, batch_size=FLAGS.batch_size, **common)
      print_results(results)
    elif mode == "calibrate":
      print_mapping(evaluate.calibrate_workdir(
          workdir, scoring=FLAGS.scoring, method=FLAGS.threshold_method, target_far=FLAGS.target_far,
          num_pairs=FLAGS.pairs, batch_size=FLAGS.batch_size, **common))
    elif mode == "export":
      print_mapping(export.export_workdir(workdir, split=FLAGS.split, images=FLAGS.images, output=FLAGS.output,
                                          invert=FLAGS.invert, batch_size=FLAGS.batch_size, **common))
    elif mode == "compare":
      require("compare", image1=FLAGS.image1, image2=FLAGS.image2)
      print_mapping(gallery.compare_images(workdir, FLAGS.image1, FLAGS.image2, invert=FLAGS.invert,
                                           threshold=FLAGS.threshold, **common))
    elif mode in ("gallery", "openset"):
      require(mode, gallery=FLAGS.gallery, queries=FLAGS.queries)
      run = gallery.classify_gallery if mode == "gallery" else gallery.open_set
      print_mapping(run(workdir, FLAGS.gallery, FLAGS.queries, method=FLAGS.method, output=FLAGS.output,
                        invert=FLAGS.invert, threshold=FLAGS.threshold, **common))
    elif mode == "plots":
      print_mapping(plots.plot_workdir(workdir, output=FLAGS.output, num_pairs=FLAGS.pairs, seed=FLAGS.seed,
                                       batch_size=FLAGS.batch_size, **common))
    elif mode == "export_model":
      print_mapping(export_model.export_model_workdir(workdir, output=FLAGS.output, platforms=FLAGS.platforms,
                                                      batch_size=FLAGS.batch_size, **common))
    elif mode == "projector":
      print_mapping(projector.projector_workdir(workdir, split=FLAGS.split, images=FLAGS.images, output=FLAGS.output,
                                                max_points=FLAGS.max_points, seed=FLAGS.seed, invert=FLAGS.invert,
                                                batch_size=FLAGS.batch_size, **common))
    elif mode == "index":
      require("index", gallery=FLAGS.gallery)
      print_mapping(build_index(workdir, FLAGS.gallery, output=FLAGS.output, backend=FLAGS.backend or "exact",
                                threshold=FLAGS.threshold, invert=FLAGS.invert, batch_size=FLAGS.batch_size,
                                **common))
    elif mode == "search":
      require("search", queries=FLAGS.queries)
      print_mapping(search_index(workdir, FLAGS.queries, index=FLAGS.index, k=FLAGS.k, output=FLAGS.output,
                                 backend=FLAGS.backend, invert=FLAGS.invert, batch_size=FLAGS.batch_size,
                                 **common))
    elif mode == "ensemble":
      require("ensemble", members=FLAGS.members)
      print_mapping(ensemble.make_ensemble(workdir, FLAGS.members, checkpoint=FLAGS.checkpoint,
                                           batch_size=FLAGS.batch_size))
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as error:  # names the step and the newest (clean) checkpoint
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except distributed.PeerFailure as error:  # another process died: end at once, skipping JAX's shutdown
    distributed.exit_after_peer_failure(error)


def integers(values: list[str], name: str) -> tuple[int, ...]:
  try:
    parsed = tuple(int(v) for v in values)
  except ValueError:
    parsed = ()
  if not parsed or min(parsed) < 1:
    raise UserError(f"--{name}={','.join(values)}: expected comma-separated positive integers, e.g. --{name}=5,20.")
  return parsed


def require(mode: str, **values) -> None:
  missing = [f"--{name}" for name, value in values.items() if not value]
  if missing:
    raise UserError(f"--mode={mode} needs {' and '.join(missing)}.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a clear error for a --config.<field> override that names no field.

  ml_collections lets that surface as a bare KeyError/AttributeError traceback from inside flag
  parsing (exit 1); here it becomes `error: <flag>: <what is wrong, what exists>` and exit 2.
  """
  message = config_file_message(config_argument_of(argv))
  if message is not None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_override_message(argv)
    if message is None:  # not a mistyped override after all: keep the original error
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config_argument_of(argv: list[str]) -> str | None:
  """The value of the last --config flag (`path` or `path:arg`), None when there is none."""
  config_argument = None
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(?:=(.*))?$", arg)
    if match:
      config_argument = match.group(1) if match.group(1) is not None else next(iter(argv[i + 1:]), None)
  return config_argument


def load_config(config_argument: str | None) -> tuple[ml_collections.ConfigDict | None, Exception | None]:
  """The config that --config=<path>[:<arg>] names, loaded as absl would, or the error that stopped it."""
  try:
    config = flags.FLAGS["config"].parser.parse(config_argument)
  except Exception as error:  # noqa: BLE001 -- callers only use it to word a clearer message
    return None, error
  return (config if isinstance(config, ml_collections.ConfigDict) else None), None


def config_file_message(config_argument: str | None) -> str | None:
  """Why --config=<path>[:<arg>] cannot be loaded: a missing file, or a ValueError from its get_config.

  ml_collections reports the first as a deferred OSError traceback from deep inside training, the second
  as a traceback in absl's usage text; None when the config loads (or fails in another way: left to them).
  """
  if not config_argument:
    return None
  path = config_argument.split(":", 1)[0]
  if not os.path.isfile(path):
    configs = pathlib.Path(__file__).resolve().parent / "configs"
    shipped = ", ".join(sorted(f"configs/{p.name}" for p in configs.glob("*.py") if p.name != "__init__.py"))
    listed = f" (configs shipped: {shipped})" if shipped else ""
    return f"--config={config_argument}: no config file {path!r}{listed}"
  _, cause = load_config(config_argument)
  while cause is not None and (cause.__cause__ is not None or cause.__context__ is not None):
    cause = cause.__cause__ or cause.__context__  # the get_config error under ml_collections' wrapping
  if isinstance(cause, ValueError):
    return f"--config={config_argument}: {cause}"
  return None


def unknown_override_message(argv: list[str]) -> str | None:
  """Names the first --config.<path> override whose path is not in the config, and the valid fields.

  None when the config cannot be loaded again or every override names an existing field.
  """
  config_argument = config_argument_of(argv)
  config, _ = load_config(config_argument)
  if config is None:  # not loadable or not a ConfigDict: the original error stands
    return None
  overrides = [m.group(1) for m in (re.match(r"^--?(?:no)?config\.([^=]+)", a) for a in argv) if m]
  for path in overrides:
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
      parent = "config." + ".".join(parts[:depth]) if depth else "config"
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"--config.{path}: {parent} is a value ({type(node).__name__}), not a section with fields "
                f"(config file {config_argument})")
      if part not in node:
        fields = sorted(node.keys())
        close = difflib.get_close_matches(part, fields, n=1)
        hint = f" Did you mean --config.{'.'.join(parts[:depth] + close + parts[depth + 1:])}?" if close else ""
        return (f"--config.{path}: {parent} has no field {part!r} (config file {config_argument}); "
                f"its fields are: {', '.join(fields)}.{hint}")
      node = node[part]
  return None


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO
  app.run(main, flags_parser=parse_flags)
