r"""Omniglot on Vinyals et al.'s split: 1,028 + 172 characters x 4 rotations to train and validate on,
423 x 4 to test, 28x28, unstructured episodes (the protocol of matching and prototypical networks).

The recipe of `configs/omniglot_cpu_hour.py` that applies here (translations up to +-3 px, 4 test-time
shifts of 3 px), without its alphabet-by-alphabet batches: the test is not within one alphabet.
Command:
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_vinyals.py --workdir=runs/vinyals
  python launch.py --mode=eval --workdir=runs/vinyals      # the README's table (best checkpoint)
Expected (2 CPU cores, measured, 12,000 steps): 48 min of training; best validation 97.3 % (step 12000);
eval mode on that checkpoint, Vinyals test: 20-way 1-shot 96.4 % +- 0.3, 20-way 5-shot 99.2 % +- 0.1,
5-way 1-shot 98.9 % +- 0.3, 5-way 5-shot 99.8 % +- 0.1 (prototypical networks: 96.0 / 98.9 / 98.8 /
99.7 %). The issue's 97 % at 20-way 1-shot is not reached by one run (docs/ablations.md, Vinyals split:
24,000 steps, 60-way batches or width 96 leave validation at 97.2-97.37 %).
Ensemble of three runs, 97 % reached (docs/ablations.md V2-V4, E2; 257 min of training in all):
  OMNIGLOT_DIR=... python launch.py --config=configs/omniglot_vinyals.py --config.model.width=96 --workdir=runs/vinyals_w96
  OMNIGLOT_DIR=... python launch.py --config=configs/omniglot_vinyals.py --config.train.num_steps=24000 --workdir=runs/vinyals_24k
  OMNIGLOT_DIR=... python launch.py --config=configs/omniglot_vinyals.py --config.sampling.m_per_class=4 --workdir=runs/vinyals_60x4
  python launch.py --mode=ensemble --workdir=runs/vinyals_ensemble --members=runs/vinyals_w96,runs/vinyals_24k,runs/vinyals_60x4
  python launch.py --mode=eval --workdir=runs/vinyals_ensemble
Expected (measured): 86 + 113 + 58 min; validation 97.37 / 97.35 / 97.18 % alone, 97.70 % together;
Vinyals test 20-way 1-shot 97.1 % +- 0.2 (97.2 / 97.3 % with --seed=1 / 2), 20-way 5-shot 99.3 % +- 0.1,
5-way 1-shot 99.2 % +- 0.2, 5-way 5-shot 99.7 % +- 0.2. Rerun from these five commands on an idle 2-core
Intel Xeon (78 + 109 + 56 min; the last two each stopped once by an added time limit and resumed;
docs/ablations.md, "Vinyals ensemble rerun"): every validation and every figure of the report equal.
Validation is 20-way 1-shot across the val.txt classes (unstructured, like the test); Lake's runs are
not scored, because this split trains on characters of the evaluation alphabets they are drawn from.
"""

from configs import omniglot


def get_config(arg: str | None = None):
  config = omniglot.get_config("smoke" if arg == "smoke" else None)
  config.data.omniglot_split = "vinyals"  # train.txt / val.txt / test.txt under splits/vinyals/
  config.augment.translate_px = 3.0
  config.eval.tta_shift_px = 3
  config.eval.validation_within_group = False
  config.eval.lake_runs = False
  if arg == "smoke":
    return config
  if arg:
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  config.train.num_steps = 12000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
