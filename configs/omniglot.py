r"""Omniglot, the fast default (the main job): 4-block conv at 28x28, prototype loss on m-per-class batches.

  OMNIGLOT_DIR=../shared/data/omniglot python launch.py --config=configs/omniglot.py --workdir=runs/omniglot
Expected [results/render.py]: 19.9 min of training on 2 CPU cores; figures in docs/results.md.
Every other config starts from this one and changes a few fields. `:smoke` shrinks it to seconds:
  python launch.py --config=configs/omniglot.py:smoke --workdir=/tmp/smoke
"""

import ml_collections

from siamese_jax import augment, models, optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # one seed for initialisation, batches, augmentation, episodes (and splits: data.split_seed)

  config.data = ml_collections.ConfigDict()
  config.data.source = "omniglot"  # omniglot | folder | tfds | synthetic (fake, for tests)
  config.data.data_dir = ""  # Omniglot zips or folders; "" = $OMNIGLOT_DIR, else ~/.cache/siamese_jax/omniglot
  config.data.download = True  # fetch the official zips (checksummed) when absent from data_dir
  # Images are resized to image_size x image_size, or (height, width) when given a pair such as (96, 64)
  # (a FieldReference of type object, so configs and --config.data.image_size may set either).
  config.data.image_size = ml_collections.FieldReference(28, field_type=object)
  config.data.resize = "stretch"  # other proportions: stretch | center_crop (cover, crop centre) | letterbox (pad)
  config.data.channels = 1  # 1 = grayscale, 3 = RGB
  config.data.in_memory = True  # decode once into RAM; False decodes on each access (data larger than memory)
  config.data.cache_dir = ""  # "" = no on-disk cache of decoded arrays; else a directory for it
  config.data.omniglot_split = "lake"  # lake: background/evaluation alphabets | vinyals: rotated splits
  config.data.validation = "alphabets"  # alphabets | drawers | none: held out of the 30 background alphabets
  config.data.num_validation_alphabets = 5  # with validation=alphabets
  config.data.validation_drawers = (13, 14, 15, 16, 17, 18, 19, 20)  # with validation=drawers
  config.data.train_class_rotations = ()  # e.g. (90, 180, 270): each turn of a train class is one more class
  config.data.split_seed = -1  # draws held-out classes and validation episodes; -1 = config.seed
  config.data.num_workers = 0  # Grain worker processes building batches (0 = in the training process)
  # folder / tfds sources only:
  config.data.path = ""  # folder root (one sub-folder per class, or group/class)
  config.data.test_path = ""  # folder: a separate test folder (same layout); then data.path is train + validation
  config.data.layout = "auto"  # flat | grouped | auto
  config.data.split = "class"  # class: hold out whole classes (open-set) | image: part of every class's images
  config.data.test_fraction = 0.2  # folders: fraction of classes (or of each class's images) held out for testing
  config.data.validation_fraction = 0.1  # folders: fraction of classes (or of each class's images) for validation
  config.data.tfds_name = ""  # tfds: dataset name, e.g. omniglot
  config.data.tfds_train_split = "train"  # tfds: split to train on
  config.data.tfds_test_split = "test"  # tfds: split to test on
  config.data.tfds_group_key = ""  # tfds: feature holding the group (e.g. alphabet), "" = none
  config.data.synthetic_classes = 40  # synthetic: number of fake classes (20 images each)

  config.sampling = ml_collections.ConfigDict()
  config.sampling.kind = "m_per_class"  # pairs | triplets | m_per_class (must suit the loss)
  config.sampling.batch_size = 240  # global batch: examples (pairs, triplets or images) per step
  config.sampling.m_per_class = 5  # m_per_class: images per class in a batch
  config.sampling.same_group_negative_probability = 0.0  # pairs/triplets: negatives from the same alphabet
  config.sampling.classes_per_group = 0  # m_per_class: 0 = classes from anywhere; c = whole alphabets, <= c each

  config.augment = augment.default_config()  # Koch et al. affine distortions, on device inside the step
  config.augment.translate_px = 1.0  # +-1 px at 28x28 (the paper's +-2 px was at 105x105)

  config.model = models.default_config("conv4")  # every field and its meaning: siamese_jax/models.py

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "prototypical"  # every loss, its batch kind and options: docs/losses.md

  config.optim = optim.default_config()  # every field and its meaning: siamese_jax/optim.py
  config.optim.name = "adam"
  config.optim.learning_rate = 1e-3  # peak learning rate
  config.optim.schedule = "cosine"  # to zero at train.num_steps
  config.optim.warmup_steps = 100  # linear warm-up from 0

  config.parallel = ml_collections.ConfigDict()
  config.parallel.strategy = "shard_map"  # shard_map | pmap: same per-device code
  config.parallel.num_devices = 0  # 0 = every GPU/TPU; on CPU, the CPU split into up to 8 devices (docs/scaling.md)

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 4000  # optimizer steps
  config.train.steps_per_epoch = 100  # defines an "epoch" for exponential / piecewise schedules
  config.train.log_every = 50  # fetch metrics from the device every N steps (no per-step host sync)
  config.train.checkpoint_every = 500  # async Orbax save every N steps (and always at the end)
  config.train.max_checkpoints = 2  # keep the last N, plus the best by validation accuracy
  config.train.eval_every = 500  # validation one-shot accuracy every N steps (0 = never)
  config.train.early_stopping_patience = 0  # stop after N validations without improvement (0 = never)
  config.train.time_limit_minutes = 0.0  # stop (and checkpoint) after this much training time; 0 = none
  config.train.skip_nonfinite_updates = False  # skip (and count) NaN/inf updates; False = stop with an error

  config.eval = ml_collections.ConfigDict()
  config.eval.validation_ways = 20  # validation: N-way 1-shot episodes
  config.eval.validation_within_group = True  # validation episodes within one alphabet (Lake) or across
  config.eval.validation_episodes = 300  # Koch et al. used 320 validation trials
  config.eval.test_ways = (5, 20)  # final report on the evaluation alphabets
  config.eval.test_shots = (1, 5)
  config.eval.test_episodes = 1000
  config.eval.queries_per_class = 1  # query images per class in an episode
  config.eval.batch_size = 1024  # images embedded per call
  config.eval.tta_shift_px = 0  # > 0: average each embedding over the image shifted +-N px (5 views)
  config.eval.lake_runs = True  # also score Lake's 20 official runs (all_runs.zip in data_dir)

  if arg == "smoke":
    config.sampling.batch_size = 40
    config.sampling.m_per_class = 4
    config.data.num_validation_alphabets = 2
    config.train.num_steps = 12
    config.train.log_every = 4
    config.train.checkpoint_every = 6
    config.train.eval_every = 6
    config.optim.warmup_steps = 2
    config.eval.validation_episodes = 20
    config.eval.test_ways = (5,)
    config.eval.test_shots = (1,)
    config.eval.test_episodes = 50
  elif arg:
    raise ValueError(f"unknown config variant '{arg}' (known: smoke)")
  return config
