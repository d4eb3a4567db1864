r"""Omniglot, the best prototype-loss result: an ensemble of three variants of `configs/omniglot_cpu_hour.py`.

The best result overall is `configs/omniglot_best_triplet.py` (four triplet-loss networks: validation
92.85 % against this ensemble's 92.18 %; docs/ablations.md, T14). Nothing here is specific to a CPU, GPU
or TPU, but it has only ever run on CPUs.
Each variant is one member; `--mode=ensemble` combines their best checkpoints (docs/ablations.md, rows
10-12 and L4):
  :batches120  120-way 1-shot-style batches (6 alphabets x 20 classes x 2 images), 12,000 steps
  :rotations   every train character also turned by 90/180/270 degrees as classes of its own, 15,000 steps
  :both        the two together, 9,000 steps
The time limit is off in all three, so a slower machine still finishes each schedule.

Commands:
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best.py:batches120 --workdir=runs/best_batches120
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best.py:rotations --workdir=runs/best_rotations
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best.py:both --workdir=runs/best_both
  python launch.py --mode=ensemble --workdir=runs/best --members=runs/best_batches120,runs/best_rotations,runs/best_both
  python launch.py --mode=eval --workdir=runs/best      # the README's table
Expected (2 CPU cores, Intel Xeon with AVX-512, measured): 52 + 59 + 34 min of training; validation
91.45 / 91.1 / 91.25 % alone, 92.2 % together; Lake's 20 runs 96.7 % +- 1.5, 20-way 1-shot within
alphabet 87.2 % +- 0.6 (86.6 / 87.3 % with --seed=1 / 2), unstructured 96.4 % +- 0.3, Vinyals test
20-way 1-shot 97.0 % +- 0.2. No accelerator was lent to this project, so the time on a GPU/TPU is not
measured; the next ablations there are in docs/ablations.md ("what next").
"""

from configs import omniglot_cpu_hour

VARIANTS = ("batches120", "rotations", "both")


def get_config(arg: str | None = None):
  """`arg`: one of VARIANTS (default: the first) or `smoke` (both changes at smoke size, in seconds)."""
  variant = arg or VARIANTS[0]
  if variant not in VARIANTS + ("smoke",):
    raise ValueError(f"unknown config variant '{arg}' (known: {', '.join(VARIANTS)}, smoke)")
  config = omniglot_cpu_hour.get_config("smoke" if variant == "smoke" else None)
  if variant == "smoke":
    config.sampling.m_per_class = 2
    config.data.train_class_rotations = (90, 180, 270)
    return config
  if variant in ("batches120", "both"):
    config.sampling.m_per_class = 2  # 240 images: 120 classes, 20 from each of 6 alphabets
    config.sampling.classes_per_group = 20
  if variant in ("rotations", "both"):
    config.data.train_class_rotations = (90, 180, 270)
  config.train.num_steps = {"batches120": 12000, "rotations": 15000, "both": 9000}[variant]
  config.train.time_limit_minutes = 0.0
  return config
