r"""siamese-jax command line: the only file that defines flags; each mode calls one library function.

  python launch.py --config=configs/omniglot.py --workdir=runs/omniglot              # train (resumes)
  python launch.py --config=configs/omniglot.py:smoke --workdir=/tmp/smoke           # seconds
  python launch.py --config=configs/omniglot.py --config.train.num_steps=100 --workdir=...  # override

Running the same command again with the same workdir resumes from its newest checkpoint.
"""

import difflib
import os
import re
import sys

# Before JAX starts: XLA:CPU's YNNPACK convolution fusions are slow on these CPUs (GUIDE section 4,
# 3.4x slower train step); an empty fusion type turns them off. A user-set XLA_FLAGS is left alone.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_cpu_experimental_ynn_fusion_type="

from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train",)

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/omniglot.py or configs/omniglot.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the resolved config and results.")
flags.DEFINE_enum("mode", "train", MODES, "What to do: train (then evaluate on the test classes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from siamese_jax import train
  from siamese_jax.errors import UserError

  config = flags.FLAGS.config
  try:
    if flags.FLAGS.mode == "train":
      results = train.train_and_evaluate(config, flags.FLAGS.workdir)
      print_results(results)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a clear error for a --config.<field> override that names no field.

  ml_collections lets that surface as a bare KeyError/AttributeError traceback from inside flag
  parsing (exit 1); here it becomes `error: <flag>: <what is wrong, what exists>` and exit 2.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_override_message(argv)
    if message is None:  # not a mistyped override after all: keep the original error
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def unknown_override_message(argv: list[str]) -> str | None:
  """Names the first --config.<path> override whose path is not in the config, and the valid fields.

  None when the config cannot be loaded again or every override names an existing field.
  """
  config_argument = None
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(?:=(.*))?$", arg)
    if match:
      config_argument = match.group(1) if match.group(1) is not None else next(iter(argv[i + 1:]), None)
  try:
    config = flags.FLAGS["config"].parser.parse(config_argument)
  except Exception:  # noqa: BLE001 -- only used to improve the message; else the original error stands
    return None
  if not isinstance(config, ml_collections.ConfigDict):
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


def print_results(results: dict) -> None:
  lines = [f"Results at step {results.get('step')}:"]
  if "lake_runs" in results:
    lines.append(f"  Lake's 20 runs (20-way 1-shot, within alphabet): {100 * results['lake_runs']['accuracy']:.1f} %")
  for mode, settings in results.get("episodes", {}).items():
    for setting, value in settings.items():
      if "mean" in value:
        lines.append(f"  {mode:>12} {setting:>10}: {100 * value['mean']:.1f} % +- {100 * value['ci95']:.1f}")
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO
  app.run(main, flags_parser=parse_flags)
