r"""Omniglot with a triplet loss: 4-block conv at 28x28, batch-hard mining on m-per-class batches.

Command:
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_triplet.py --workdir=runs/triplet
Expected: not yet measured (see the README's results table).
"""

from configs import omniglot


def get_config(arg: str | None = None):
  config = omniglot.get_config(arg)
  config.loss.name = "triplet"
  config.loss.margin = 0.2  # in squared Euclidean units of L2-normalised embeddings (range 0..4)
  config.loss.distance = "squared_euclidean"  # squared_euclidean | cosine
  config.loss.mining = "batch_hard"  # none (needs sampling.kind=triplets) | batch_all | batch_hard | semi_hard
  config.model.embedding_dim = 128
  config.model.l2_normalize = True
  return config
