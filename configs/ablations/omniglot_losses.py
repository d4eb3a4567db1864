r"""Ablation: each metric-learning loss in configs/ablations/omniglot_triplet.py's recipe and training minutes.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/ablations/omniglot_losses.py:circle --workdir=runs/circle
Expected [results/render.py]: 7 variants measured, 17.7 to 19.5 min of training on 2 CPU cores; validation only, in docs/ablations.md.
One variant per loss (`:multi_similarity`, `:circle`, `:lifted_structure`, `:supcon`, `:proxy_anchor`, `:arcface`,
`:cosface`), with its published options; `:<loss>_smoke` (and `:smoke`) run in seconds.
"""

import ml_collections

from siamese_jax.configs import omniglot, omniglot_hour

# Each loss with the options its paper (or pytorch-metric-learning's defaults, for fine-grained retrieval) uses.
LOSSES = {
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1, "mining": True},
    "circle": {"margin": 0.4, "gamma": 80.0},  # Sun et al.'s fine-grained retrieval setting
    "lifted_structure": {"margin": 1.0},  # on the unit sphere, where distances lie in [0, 2]
    "supcon": {"temperature": 0.1, "supervised": True},
    "proxy_anchor": {"margin": 0.1, "alpha": 32.0},
    "arcface": {"scale": 30.0, "margin": 0.5},  # s = 30: ample for ~800 classes (64 is for 10k-class faces)
    "cosface": {"scale": 30.0, "margin": 0.35},
}


def get_config(arg: str | None = None):
  """`arg`: a loss of LOSSES (default multi_similarity), `<loss>_smoke`, or `smoke` (multi_similarity's)."""
  arg = {None: "multi_similarity", "": "multi_similarity", "smoke": "multi_similarity_smoke"}.get(arg, arg)
  smoke = arg.endswith("_smoke")
  loss = arg.removesuffix("_smoke")
  if loss not in LOSSES:
    known = ", ".join([*LOSSES, *(f"{name}_smoke" for name in LOSSES), "smoke"])
    raise ValueError(f"unknown config variant '{arg}' (known: {known})")
  config = omniglot_hour.with_triplet_loss(omniglot.get_config("smoke" if smoke else None))
  config.loss = ml_collections.ConfigDict({"name": loss, **LOSSES[loss]})
  config.parallel.num_devices = 1  # its figures ran on one CPU device: pinned so that they reproduce
  # Validation decides (docs/ablations.md); the final report on the evaluation alphabets is kept to one setting.
  config.eval.lake_runs = False
  config.eval.test_ways = (20,)
  config.eval.test_shots = (1,)
  if loss == "supcon":
    # Two distorted views of each image, from half as many images: the same 240 embeddings a step.
    config.augment.views = 2
    config.sampling.batch_size //= 2
  if loss == "proxy_anchor":
    config.optim.proxy_lr_multiplier = 10.0  # the proxies at 1e-2, as Kim et al. (100 x their 1e-4)
  return config
