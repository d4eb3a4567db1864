r"""Omniglot with a triplet loss: 4-block conv at 28x28, FaceNet's semi-hard mining on m-per-class batches.

Semi-hard, not batch-hard: from initialisation, batch-hard mining collapsed every embedding onto one
point on these batches (loss stuck at the margin, all distances below 0.002 by step 400 with the squared
distance, below 0.02 and falling by step 300 with the plain one), as Schroff et al. 2015 warn of the
hardest negatives early in training; semi-hard mining separates the classes from the start
(docs/ablations.md, "Triplet config").

Command:
  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot_triplet.py --workdir=runs/triplet
Expected: not yet measured (see the README's results table).
"""

from configs import omniglot


def get_config(arg: str | None = None):
  config = omniglot.get_config(arg)
  config.loss.name = "triplet"
  config.loss.margin = 0.2  # in squared Euclidean units of L2-normalised embeddings (range 0..4)
  config.loss.distance = "squared_euclidean"  # euclidean | squared_euclidean | cosine
  config.loss.mining = "semi_hard"  # none (needs sampling.kind=triplets) | batch_all | batch_hard | semi_hard
  config.model.embedding_dim = 128
  config.model.l2_normalize = True
  return config
