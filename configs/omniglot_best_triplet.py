r"""Omniglot: an ensemble of three triplet-loss networks (docs/ablations.md, T5-T7), the highest validation.

Each variant is one member, all `configs/omniglot_triplet.py:cpu_hour` (semi-hard triplet loss, 128-d
L2-normalised embeddings, alphabet batches, +-3 px, test-time shifts) with 120-way batches of 6 alphabets
x 20 classes x 2 images; `--mode=ensemble` combines their best checkpoints:
  :t5         12,000 steps, seed 0
  :t5_seed1   the same with seed 1 (new initialisation and batches, seed 0's validation: data.split_seed=0)
  :rotations  every train character also turned by 90/180/270 degrees as classes of its own, seed 2, 6,000 steps
The time limit is off in all three.

Commands:
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best_triplet.py:t5 --workdir=runs/t5
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best_triplet.py:t5_seed1 --workdir=runs/t5s1
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_best_triplet.py:rotations --workdir=runs/t7
  python launch.py --mode=ensemble --workdir=runs/t8 --members=runs/t5,runs/t5s1,runs/t7
  python launch.py --mode=eval --workdir=runs/t8
Measured once (2 CPU cores, Intel Xeon; the members were run with the command-line overrides this file
sets, and their config.json files equal this file's variants): 53 + 57 + 31 min of training; validation
91.63 / 91.38 / 91.42 % alone, 92.62 % together (configs/omniglot_best.py: 92.18 %); eval mode there,
episode seed 0: Lake's 20 runs 96.5 % +- 1.8, 20-way 1-shot within alphabet 88.0 % +- 0.5, unstructured
96.8 % +- 0.2, Vinyals test 20-way 1-shot 96.8 % +- 0.2. Not yet rerun from this file, and not yet in the
README's table (docs/ablations.md, T7).
"""

from configs import omniglot_triplet

VARIANTS = ("t5", "t5_seed1", "rotations")


def get_config(arg: str | None = None):
  """`arg`: one of VARIANTS (default: the first) or `smoke` (the batches and rotations at smoke size)."""
  variant = arg or VARIANTS[0]
  if variant not in VARIANTS + ("smoke",):
    raise ValueError(f"unknown config variant '{arg}' (known: {', '.join(VARIANTS)}, smoke)")
  if variant == "smoke":
    config = omniglot_triplet.get_config("smoke")
    config.sampling.m_per_class = 2
    config.data.train_class_rotations = (90, 180, 270)
    return config
  config = omniglot_triplet.get_config("cpu_hour")
  config.sampling.m_per_class = 2  # 240 images: 120 classes, 20 from each of 6 alphabets
  config.sampling.classes_per_group = 20
  config.train.time_limit_minutes = 0.0
  config.train.num_steps = 6000 if variant == "rotations" else 12000
  if variant != "t5":
    config.seed = {"t5_seed1": 1, "rotations": 2}[variant]
    config.data.split_seed = 0  # seed 0's validation classes and episodes: the members' validations compare
  if variant == "rotations":
    config.data.train_class_rotations = (90, 180, 270)
  return config
