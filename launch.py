r"""siamese-jax command line: the only file that defines flags; each mode calls one library function.

  python launch.py --config=configs/omniglot.py --workdir=runs/omniglot              # train (resumes)
  python launch.py --config=configs/omniglot.py:smoke --workdir=/tmp/smoke           # seconds
  python launch.py --config=configs/omniglot.py --config.train.num_steps=100 --workdir=...  # override

Running the same command again with the same workdir resumes from its newest checkpoint.
"""

import os
import sys

# Before JAX starts: XLA:CPU's YNNPACK convolution fusions are slow on these CPUs (GUIDE section 4,
# 3.4x slower train step); an empty fusion type turns them off. A user-set XLA_FLAGS is left alone.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_cpu_experimental_ynn_fusion_type="

from absl import app, flags, logging  # noqa: E402
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
  logging.set_verbosity(logging.INFO)
  app.run(main)
