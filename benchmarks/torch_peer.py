r"""The PyTorch peer of the benchmark's train-step and embedding cases: the same networks, batches, losses
and optimizers in PyTorch, eager and `torch.compile`, so that benchmarks/run.py can report JAX / PyTorch
ratios measured in the same run.

torch is not a dependency of the project: this file runs in a Python environment of its own that has
torch and numpy, and torchvision (the release that matches torch) for the backbones (benchmarks/README.md says
how to make one); it imports nothing from siamese_jax. Two uses:

  /work/torchvenv/bin/python benchmarks/torch_peer.py --check   # the networks' parameter counts, one step each
  python benchmarks/run.py --quick --torch-python /work/torchvenv/bin/python   # the `peer` section

In the second, run.py starts this file as a child process (`--serve`) and exchanges one JSON object per
line with it, so that torch and XLA never share a process (both size their thread pools to every core)
and the two sides take turns, case by case and round by round:

  {"op": "setup", "case": SPEC, "variants": ["eager", "compile"], "warmup": 1, "steps": 3}
      -> {"parameters": n, "setup_seconds": {...}, "compile_error": "..." (a variant that failed), ...}
  {"op": "time", "variant": "eager", "steps": 3, "repeats": 2}   -> {"seconds": [per step or per pass, ...]}
  {"op": "quit"}                                                 -> (exits)
  any failure                                                    -> {"error": "one line"}

SPEC is the JAX case's config as plain dicts (`cases.peer_spec`): "kind" ("train" or "embed"), "model",
"loss", "optim", "augment", "sampling", "image_size" [h, w], "channels", "num_steps", "steps_per_epoch",
"seed", "device" ("cpu", or "cuda" where JAX runs on a GPU), and for "embed" "images" and "batch_size". What the peer cannot reproduce exactly (another model
or loss, mining other than "none", dropout, photo augmentation, rmsprop, NAdam, a backbone's train step, Keras'
ResNet layout, a backbone without torchvision installed) is refused with an error, never approximated.

What is built, layer by layer as siamese_jax/models.py (NCHW here, NHWC there: same shapes, same FLOPs):
  conv4  4 x [conv 3x3 same (bias), BatchNorm (eps 1e-5, momentum 1 - model.batch_norm_momentum), ReLU,
         max-pool 2], flattened; a linear layer to embedding_dim when > 0; L2 normalisation when asked;
         the weighted-L1 pair head (one linear unit on |e1 - e2|) with model.pair_head.
  koch   convs 64@10, 128@7, 128@4, 256@4 (valid, ReLU; max-pool 2 after the first three), flattened,
         linear to embedding_dim with a sigmoid, and the pair head.
  resnet18, resnet50   models.Pretrained (embedding only): the backbone's preprocessing inside the network
         (ImageNet mean / std for torchvision's layout), torchvision.models.resnetXX(weights=None) with its fc
         dropped (the same network as siamese_jax/backbones/resnet.py's "torch" layout: no conv biases,
         BatchNorm eps 1e-5, stride in the bottleneck's 3x3), global average (or max) pooling, a linear layer
         to embedding_dim when > 0, L2 normalisation when asked; grayscale input repeated to RGB.
The train step times what the JAX step does on a resident uint8 batch: to float, Koch et al.'s random
affine distortion (`augment.kind="affine"`: affine_grid + bilinear grid_sample, zero fill), forward, loss,
backward, optimizer update and learning-rate schedule. With `torch.compile` the distortion, forward and
loss are compiled (backward through AOTAutograd); `optimizer.step()` stays eager (the default foreach
implementation), as most PyTorch training scripts leave it. The embedding pass times eval mode under
`torch.inference_mode()` in fixed-size batches (the last one padded, as `metrics.embedding` does), with
the copy of the embeddings to numpy.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The shipped networks' parameter counts in siamese_jax (benchmarks/results/cpu-2core.json and
# cpu-2core-backbone-peer.json, "parameters" / "parameters_jax"), which `--check` compares against; run.py
# compares every case against the live JAX model instead.
JAX_PARAMETERS = {"conv4 (omniglot)": 111_936, "conv4, 128-d L2 head (omniglot_triplet)": 120_256,
                  "koch (omniglot_koch)": 38_951_745,
                  "resnet18, 128-d L2 head (folder_pretrained)": 11_242_176,
                  "resnet50, 128-d L2 head (folder_pretrained)": 23_770_304}

# The pretrained backbones the peer builds (torchvision's; embedding cases only), and each preprocessing of
# siamese_jax/backbones/base.py as (mean, std) on [0, 1] RGB, (x - mean) / std; caffe first reverses the
# channels to BGR (its x * 255 - mean is (x - mean / 255) / (1 / 255)).
BACKBONES = ("resnet18", "resnet50")
PREPROCESSING = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "caffe": ((103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255, 1 / 255, 1 / 255)),
                 "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}

# Rows per element of a batch, by sampling kind (siamese_jax/losses.py BATCH_K).
BATCH_K = {"pairs": 2, "triplets": 3, "m_per_class": 1}


class Unsupported(Exception):
  """A setting of the JAX case that this peer does not reproduce exactly."""


def _require(condition: bool, what: str) -> None:
  if not condition:
    raise Unsupported(what)


# ----------------------------------------------------------------------------------------------------
# Networks


class Conv4(nn.Module):
  """models.Conv4: 4 x [conv 3x3 same, BatchNorm, ReLU, max-pool 2], flattened, optional linear + L2 + pair head."""

  def __init__(self, model: dict, image_size: tuple[int, int], channels: int):
    super().__init__()
    width = model["width"]
    height, breadth = image_size
    layers, in_channels = [], channels
    for _ in range(4):
      layers += [nn.Conv2d(in_channels, width, 3, padding=1),
                 nn.BatchNorm2d(width, eps=1e-5, momentum=1.0 - model["batch_norm_momentum"]),
                 nn.ReLU(inplace=True), nn.MaxPool2d(2)]
      in_channels, height, breadth = width, height // 2, breadth // 2
    self.features = nn.Sequential(*layers, nn.Flatten())
    flat = height * breadth * width
    self.projection = nn.Linear(flat, model["embedding_dim"]) if model["embedding_dim"] > 0 else None
    self.l2_normalize = bool(model["l2_normalize"])
    self.head = nn.Linear(model["embedding_dim"] or flat, 1) if model.get("pair_head") else None

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.features(images)
    if self.projection is not None:
      x = self.projection(x)
    return _finish(x, self.l2_normalize)


class KochNet(nn.Module):
  """models.KochNet: valid convs with ReLU and max-pools, a sigmoid dense layer, the weighted-L1 pair head."""

  CONVS = ((64, 10, True), (128, 7, True), (128, 4, True), (256, 4, False))

  def __init__(self, model: dict, image_size: tuple[int, int], channels: int):
    super().__init__()
    height, breadth = image_size
    layers, in_channels = [], channels
    for out_channels, kernel, pool in self.CONVS:
      layers += [nn.Conv2d(in_channels, out_channels, kernel), nn.ReLU(inplace=True)]
      height, breadth = height - kernel + 1, breadth - kernel + 1
      if pool:
        layers.append(nn.MaxPool2d(2))
        height, breadth = height // 2, breadth // 2
      in_channels = out_channels
    _require(height >= 1 and breadth >= 1, f"model koch: image size {image_size} is too small")
    self.features = nn.Sequential(*layers, nn.Flatten())
    self.dense = nn.Linear(height * breadth * in_channels, model["embedding_dim"])
    self.l2_normalize = bool(model["l2_normalize"])
    self.head = nn.Linear(model["embedding_dim"], 1)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    return _finish(torch.sigmoid(self.dense(self.features(images))), self.l2_normalize)


class Backbone(nn.Module):
  """models.Pretrained on a torchvision ResNet (random weights): the backbone's preprocessing, torchvision's
  network up to its global pooling (its `fc` dropped), a linear layer to embedding_dim when > 0, L2
  normalisation when asked, the pair head with model.pair_head. Grayscale input is repeated to RGB."""

  def __init__(self, model: dict, image_size: tuple[int, int], channels: int):
    super().__init__()
    name = model["name"]
    layout = model.get("weights_layout", "torch")
    _require(layout == "torch", f"model.weights_layout={layout!r} with {name} (the peer has torchvision's layout)")
    _require(model.get("pooling", "avg") in ("avg", "max"), f"model.pooling={model.get('pooling')!r}")
    preprocessing = model.get("preprocessing", "auto")
    self.preprocessing = "imagenet" if preprocessing == "auto" else preprocessing  # torch layout: ImageNet's
    _require(self.preprocessing in PREPROCESSING, f"model.preprocessing={preprocessing!r}")
    network = getattr(torchvision_models(name), name)(weights=None)
    features = network.fc.in_features
    network.fc = nn.Identity()  # models.Pretrained builds the backbone with num_classes=0
    if model.get("pooling", "avg") == "max":
      network.avgpool = nn.AdaptiveMaxPool2d(1)
    for module in network.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.momentum = 1.0 - model["batch_norm_momentum"]
    self.backbone = network
    self.gray = channels == 1
    self.projection = nn.Linear(features, model["embedding_dim"]) if model["embedding_dim"] > 0 else None
    self.l2_normalize = bool(model["l2_normalize"])
    self.head = nn.Linear(model["embedding_dim"] or features, 1) if model.get("pair_head") else None
    mean, std = PREPROCESSING[self.preprocessing]
    self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = images.repeat(1, 3, 1, 1) if self.gray else images
    if self.preprocessing == "caffe":
      x = x.flip(1)  # RGB -> BGR
    x = self.backbone((x - self.mean) / self.std)
    if self.projection is not None:
      x = self.projection(x)
    return _finish(x, self.l2_normalize)


def torchvision_models(name: str):
  """torchvision.models, imported only for a backbone (conv4 and Koch need no torchvision)."""
  try:
    import torchvision.models
  except ImportError as error:
    raise Unsupported(f"model.name={name!r} needs torchvision in the peer's Python (pip install torchvision, the "
                      f"release that matches torch {torch.__version__}): {error}") from None
  return torchvision.models


def _finish(embeddings: torch.Tensor, l2_normalize: bool) -> torch.Tensor:
  # layers.l2_normalize: x * rsqrt(max(|x|^2, 1e-12)), i.e. F.normalize with eps 1e-6 on the norm.
  return F.normalize(embeddings, dim=-1, eps=1e-6) if l2_normalize else embeddings


NETWORKS = {"conv4": Conv4, "koch": KochNet, **{name: Backbone for name in BACKBONES}}


def build_model(spec: dict) -> nn.Module:
  model = spec["model"]
  _require(model["name"] in NETWORKS, f"model.name={model['name']!r} (the peer has {', '.join(NETWORKS)})")
  _require(not model.get("dropout"), f"model.dropout={model.get('dropout')}")
  return NETWORKS[model["name"]](model, tuple(spec["image_size"]), spec["channels"])


def parameter_count(model: nn.Module) -> int:
  """Trainable parameters (BatchNorm's running statistics are buffers, as they are BatchStat in nnx)."""
  return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Losses (siamese_jax/losses.py), on embeddings [B, k, D] and labels [B, k]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  mask = mask.to(values.dtype)
  return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _row_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
  if distance == "squared_euclidean":
    return (a - b).square().sum(-1)
  if distance == "euclidean":
    squared = (a - b).square().sum(-1)
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, torch.ones_like(squared))), 0.0)
  return 1.0 - (F.normalize(a, dim=-1, eps=1e-6) * F.normalize(b, dim=-1, eps=1e-6)).sum(-1)


def triplet_none(embeddings, labels, model, *, margin, distance):
  """losses.triplet with mining "none": rows (anchor, positive, negative), label-inconsistent rows masked."""
  anchor, positive, negative = embeddings[:, 0], embeddings[:, 1], embeddings[:, 2]
  valid = (labels[:, 0] == labels[:, 1]) & (labels[:, 0] != labels[:, 2])
  hinge = F.relu(margin + _row_distance(anchor, positive, distance) - _row_distance(anchor, negative, distance))
  return _masked_mean(hinge, valid)


def prototypical(embeddings, labels, model):
  """losses.prototypical: leave-one-out prototypes through one matmul against the class means."""
  embeddings = embeddings.reshape(-1, embeddings.shape[-1])
  labels = labels.reshape(-1)
  num_rows = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  same_float = same.to(embeddings.dtype)
  class_size = same_float.sum(1)
  class_mean = (same_float @ embeddings) / class_size[:, None]
  earlier = torch.tril(torch.ones(num_rows, num_rows, dtype=torch.bool, device=labels.device), diagonal=-1)
  representative = ~(same & earlier).any(1)
  to_mean = embeddings.square().sum(-1)[:, None] + class_mean.square().sum(-1)[None, :] \
      - 2.0 * embeddings @ class_mean.T
  to_mean = to_mean.clamp(min=0.0)
  own_size = (class_size - 1.0).clamp(min=1.0)[None, :]
  leave_one_out_scale = torch.where(same, (class_size[None, :] / own_size).square(), 1.0)
  candidate = representative[None, :] & torch.where(same, class_size[None, :] > 1, True)
  valid = class_size > 1
  logits = torch.where(candidate, -to_mean * leave_one_out_scale, -torch.inf)
  logits = torch.where(valid[:, None], logits, 0.0)
  log_probabilities = F.log_softmax(logits, dim=1)
  target = same & representative[None, :]
  cross_entropy = -torch.where(target, log_probabilities, 0.0).sum(1)
  return _masked_mean(cross_entropy, valid)


def koch_bce(embeddings, labels, model):
  """losses.koch_bce: sigmoid cross-entropy on the model's weighted-L1 pair logit."""
  same = (labels[:, 0] == labels[:, 1]).to(embeddings.dtype)
  logits = model.head((embeddings[:, 0] - embeddings[:, 1]).abs())[..., 0]
  return F.binary_cross_entropy_with_logits(logits, same)


def build_loss(spec: dict):
  loss = spec["loss"]
  name = loss["name"]
  if name == "triplet":
    _require(loss.get("mining", "batch_hard") == "none", f"loss.mining={loss.get('mining')!r} (the peer has 'none')")
    _require(loss.get("distance", "squared_euclidean") in ("squared_euclidean", "euclidean", "cosine"),
             f"loss.distance={loss.get('distance')!r}")
    margin, distance = float(loss.get("margin", 0.2)), loss.get("distance", "squared_euclidean")
    return lambda embeddings, labels, model: triplet_none(embeddings, labels, model, margin=margin, distance=distance)
  if name == "prototypical":
    return prototypical
  if name == "koch_bce":
    _require(spec["model"]["name"] == "koch" or spec["model"].get("pair_head"), "koch_bce needs the pair head")
    return koch_bce
  raise Unsupported(f"loss.name={name!r} (the peer has triplet/none, prototypical, koch_bce)")


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule (siamese_jax/optim.py)


def build_optimizer(spec: dict, parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
  """optim.create_optimizer's chain in torch terms: L2 weight decay enters the gradient (torch's
  `weight_decay` for SGD and Adam), AdamW decays decoupled and times the learning rate (as optax)."""
  optim = spec["optim"]
  name, learning_rate, weight_decay = optim["name"], float(optim["learning_rate"]), float(optim["weight_decay"])
  _require(not optim.get("scale_lr_by_batch"), "optim.scale_lr_by_batch")
  _require(not optim.get("plateau_patience"), "optim.plateau_patience")
  if name == "sgd":
    optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=float(optim["momentum"]),
                                weight_decay=weight_decay, nesterov=bool(optim["nesterov"]))
  elif name in ("adam", "adamw"):
    _require(not optim["nesterov"], f"optim.nesterov with {name} (NAdam)")
    kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    optimizer = kind(parameters, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
  else:
    raise Unsupported(f"optim.name={name!r} (the peer has sgd, adam, adamw)")
  return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec))


def _schedule(spec: dict):
  """The multiplier of the peak learning rate at a step: linear warm-up, then the config's schedule."""
  optim = spec["optim"]
  warmup, schedule = int(optim["warmup_steps"]), optim["schedule"]
  total = optim["total_steps"] if optim["total_steps"] > 0 else spec["num_steps"]
  floor = float(optim["min_lr"]) / float(optim["learning_rate"])
  steps_per_epoch, decay = spec["steps_per_epoch"], float(optim["decay_per_epoch"])
  _require(schedule in ("constant", "cosine", "exponential"), f"optim.schedule={schedule!r}")

  def multiplier(step: int) -> float:
    warm = min(1.0, step / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
      progress = min(step, total) / total
      return warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "exponential":
      return warm * decay ** (step // steps_per_epoch)
    return warm

  return multiplier


# ----------------------------------------------------------------------------------------------------
# Augmentation (siamese_jax/augment.py, kind "affine"), on float images [N, C, H, W] in [0, 1]


def random_affine(images: torch.Tensor, augment: dict) -> torch.Tensor:
  """Koch et al.'s distortion: each of the 7 components kept with `probability`, else the identity; the
  inverse map from augment.apply_affine, sampled bilinearly with zero (or edge) fill."""
  num, _, height, width = images.shape
  uniform = torch.rand(7, num, device=images.device)
  keep = torch.rand(7, num, device=images.device) < augment["probability"]
  symmetric = lambda u, half: (2.0 * u - 1.0) * half  # noqa: E731
  theta = torch.where(keep[0], symmetric(uniform[0], augment["rotation_deg"]), 0.0) * (math.pi / 180.0)
  rho_x = torch.where(keep[1], symmetric(uniform[1], augment["shear"]), 0.0)
  rho_y = torch.where(keep[2], symmetric(uniform[2], augment["shear"]), 0.0)
  span = augment["scale_max"] - augment["scale_min"]
  s_x = torch.where(keep[3], augment["scale_min"] + uniform[3] * span, 1.0)
  s_y = torch.where(keep[4], augment["scale_min"] + uniform[4] * span, 1.0)
  t_x = torch.where(keep[5], symmetric(uniform[5], augment["translate_px"]), 0.0)
  t_y = torch.where(keep[6], symmetric(uniform[6], augment["translate_px"]), 0.0)
  cos, sin = torch.cos(theta), torch.sin(theta)
  a00, a01 = (cos - sin * rho_y) * s_x, (cos * rho_x - sin) * s_y
  a10, a11 = (sin + cos * rho_y) * s_x, (sin * rho_x + cos) * s_y
  determinant = a00 * a11 - a01 * a10
  i00, i01, i10, i11 = a11 / determinant, -a01 / determinant, -a10 / determinant, a00 / determinant
  # In affine_grid's normalised coordinates (align_corners=True: -1 and 1 are the edge pixels' centres).
  c_x, c_y = (width - 1) / 2.0, (height - 1) / 2.0
  matrix = torch.stack([
      torch.stack([i00, i01 * c_y / c_x, -(i00 * t_x + i01 * t_y) / c_x], -1),
      torch.stack([i10 * c_x / c_y, i11, -(i10 * t_x + i11 * t_y) / c_y], -1)], 1)
  grid = F.affine_grid(matrix, list(images.shape), align_corners=True)
  fill = "zeros" if augment.get("fill", "zero") == "zero" else "border"
  warped = F.grid_sample(images, grid, mode="bilinear", padding_mode=fill, align_corners=True)
  return warped.clamp(0.0, 1.0)


def make_distortion(spec: dict):
  """images uint8 [N, C, H, W] -> float [N * views, C, H, W], distorted as the JAX step does."""
  augment = spec["augment"]
  views = int(augment.get("views", 1))
  if not augment["enabled"]:
    return lambda images: images.float() / 255.0
  _require(augment["kind"] == "affine", f"augment.kind={augment['kind']!r} (the peer has affine)")
  flip = float(augment.get("flip_probability", 0.0))

  def distort(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    if views > 1:
      x = x.repeat_interleave(views, 0)
    x = random_affine(x, augment)
    if flip:
      flipped = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < flip
      x = torch.where(flipped, x.flip(-1), x)
    return x

  return distort


# ----------------------------------------------------------------------------------------------------
# Cases


def make_batch(spec: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
  """(uint8 images [B * k, C, H, W], labels [B, k], k) laid out as the sampler lays out a batch: a triplet
  is (anchor, positive, negative), half the pairs match, m_per_class has batch_size / m classes of m."""
  sampling = spec["sampling"]
  kind, size = sampling["kind"], int(sampling["batch_size"])
  _require(kind in BATCH_K, f"sampling.kind={kind!r}")
  k = BATCH_K[kind]
  height, width = spec["image_size"]
  images = torch.randint(0, 256, (size * k, spec["channels"], height, width), dtype=torch.uint8, generator=generator)
  classes = torch.arange(size)
  if kind == "triplets":
    labels = torch.stack([classes, classes, classes + size], 1)
  elif kind == "pairs":
    labels = torch.stack([classes, torch.where(classes % 2 == 0, classes, classes + size)], 1)
  else:
    labels = (classes // int(sampling["m_per_class"]))[:, None]
  return images, labels, k


def device_of(spec: dict) -> torch.device:
  device = spec.get("device", "cpu")
  _require(device == "cpu" or (device == "cuda" and torch.cuda.is_available()),
           f"device {device!r} (torch.cuda.is_available() is {torch.cuda.is_available()})")
  return torch.device(device)


class TrainCase:
  """One model, optimizer and resident batch per variant ("eager", "compile"), all from the same seed."""

  def __init__(self, spec: dict):
    # A backbone's JAX step gives the pretrained stages their own learning rate and warm-up (optim.backbone_*)
    # and may freeze some: the peer times the backbones' embedding only.
    _require(spec["model"]["name"] not in BACKBONES, f"the train step of model.name={spec['model']['name']!r} "
             "(the peer has the backbones' embedding only)")
    self.spec = spec
    self.device = device_of(spec)
    self.loss = build_loss(spec)
    self.distort = make_distortion(spec)
    generator = torch.Generator().manual_seed(spec["seed"])
    images, labels, self.k = make_batch(spec, generator)
    self.images, self.labels = images.to(self.device), labels.to(self.device)  # resident, as the JAX batch
    self.views = int(spec["augment"].get("views", 1)) if spec["augment"]["enabled"] else 1
    self.runs = {}

  def parameters(self) -> int:
    return parameter_count(build_model(self.spec))

  def add(self, variant: str) -> None:
    torch.manual_seed(self.spec["seed"])
    model = build_model(self.spec).to(self.device).train()
    optimizer, scheduler = build_optimizer(self.spec, model.parameters())
    batch = self.labels.shape[0]
    labels = self.labels.repeat_interleave(self.views, 1) if self.views > 1 else self.labels

    def loss_of(images: torch.Tensor) -> torch.Tensor:
      embeddings = model(self.distort(images))
      return self.loss(embeddings.reshape(batch, self.k * self.views, -1), labels, model)

    forward = torch.compile(loss_of) if variant == "compile" else loss_of

    def step() -> torch.Tensor:
      optimizer.zero_grad(set_to_none=True)
      loss = forward(self.images)
      loss.backward()
      optimizer.step()
      scheduler.step()
      return loss

    self.runs[variant] = step

  def run(self, variant: str, steps: int) -> None:
    for _ in range(steps):
      loss = self.runs[variant]()
    float(loss.detach())  # waits for the device (CPU ops are synchronous anyway)


class EmbedCase:
  """Eval-mode embedding of `images` random uint8 images in fixed batches of `batch_size` (the last padded)."""

  def __init__(self, spec: dict):
    self.spec = spec
    self.device = device_of(spec)
    generator = torch.Generator().manual_seed(spec["seed"])
    height, width = spec["image_size"]
    self.images = torch.randint(0, 256, (int(spec["images"]), spec["channels"], height, width), dtype=torch.uint8,
                                generator=generator)
    self.batch_size = min(int(spec["batch_size"]), len(self.images))
    self.runs = {}

  def parameters(self) -> int:
    return parameter_count(build_model(self.spec))

  def add(self, variant: str) -> None:
    torch.manual_seed(self.spec["seed"])
    model = build_model(self.spec).to(self.device).eval()
    embed = lambda images: model(images.float() / 255.0)  # noqa: E731
    forward = torch.compile(embed) if variant == "compile" else embed

    def embed_all() -> np.ndarray:
      outputs = []
      with torch.inference_mode():
        for start in range(0, len(self.images), self.batch_size):
          chunk = self.images[start:start + self.batch_size]
          valid = len(chunk)
          if valid < self.batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - valid,) + tuple(chunk.shape[1:]))])
          outputs.append(forward(chunk.to(self.device))[:valid].cpu().numpy())  # host images in, as JAX's
      return np.concatenate(outputs)

    self.runs[variant] = embed_all

  def run(self, variant: str, passes: int) -> None:
    for _ in range(passes):
      self.runs[variant]()


# ----------------------------------------------------------------------------------------------------
# The child-process server (run.py's `peer` section) and the stand-alone check


class Server:
  """Holds one case at a time; answers setup / time / quit requests (module docstring)."""

  def __init__(self):
    self.case = None

  def setup(self, request: dict) -> dict:
    spec = request["case"]
    self.case = None
    case = (TrainCase if spec["kind"] == "train" else EmbedCase)(spec)
    reply = {"parameters": case.parameters(), "setup_seconds": {}, "variants": []}
    for variant in request["variants"]:
      start = time.perf_counter()
      try:
        case.add(variant)
        for _ in range(max(1, int(request.get("warmup", 1)))):  # compilation happens in the first call
          case.run(variant, 1)
      except Unsupported:
        raise
      except Exception as error:  # torch.compile needs a C++ compiler, and may fail on a new torch
        reply[f"{variant}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        case.runs.pop(variant, None)
        continue
      reply["setup_seconds"][variant] = time.perf_counter() - start
      reply["variants"].append(variant)
    self.case = case
    return reply

  def time(self, request: dict) -> dict:
    if self.case is None:
      return {"error": "no case: send setup first"}
    variant, steps = request["variant"], int(request.get("steps", 1))
    seconds = []
    for _ in range(int(request.get("repeats", 1))):
      start = time.perf_counter()
      self.case.run(variant, steps)
      seconds.append((time.perf_counter() - start) / steps)
    return {"seconds": seconds}


def serve(threads: int) -> None:
  """Answers run.py's requests, one JSON line each. Replies go to the stdout run.py reads; everything
  else that writes to stdout (torch, its compiler) is sent to stderr, so it cannot break the protocol."""
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  if threads > 0:
    torch.set_num_threads(threads)
  server = Server()
  replies.write(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "python": sys.version.split()[0]}) + "\n")
  for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "quit":
      break
    try:
      reply = {"setup": server.setup, "time": server.time}[request["op"]](request)
    except Unsupported as error:
      reply = {"error": f"not reproduced by the PyTorch peer: {error}"}
    except Exception as error:
      reply = {"error": f"{type(error).__name__}: {error}"}
    replies.write(json.dumps(reply) + "\n")


def check(threads: int) -> None:
  """Builds the shipped networks, prints their parameter counts beside siamese_jax's, and takes one eager
  train step on a small batch of each case (for the backbones, one eval-mode embedding; without torchvision
  they are skipped with a line saying so): a check of this environment, not a measurement."""
  if threads > 0:
    torch.set_num_threads(threads)
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  conv4 = {"name": "conv4", "width": 64, "embedding_dim": 0, "l2_normalize": False, "batch_norm_momentum": 0.9,
           "pair_head": False, "dropout": 0.0}
  triplet = dict(conv4, embedding_dim=128, l2_normalize=True)
  koch = {"name": "koch", "embedding_dim": 4096, "l2_normalize": False, "dropout": 0.0}
  augment = {"enabled": True, "kind": "affine", "views": 1, "probability": 0.5, "rotation_deg": 10.0, "shear": 0.3,
             "scale_min": 0.8, "scale_max": 1.2, "translate_px": 1.0, "fill": "zero", "flip_probability": 0.0}
  adam = {"name": "adam", "learning_rate": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
          "schedule": "cosine", "warmup_steps": 100, "total_steps": -1, "min_lr": 0.0, "decay_per_epoch": 0.99}
  sgd = dict(adam, name="sgd", learning_rate=0.01, momentum=0.5, weight_decay=2e-4, schedule="exponential",
             warmup_steps=0)
  cases = {
      "conv4 (omniglot)": (conv4, {"name": "prototypical"}, {"kind": "m_per_class", "batch_size": 20,
                                                              "m_per_class": 5}, 28, adam),
      "conv4, 128-d L2 head (omniglot_triplet)": (
          triplet, {"name": "triplet", "margin": 0.2, "distance": "squared_euclidean", "mining": "none"},
          {"kind": "triplets", "batch_size": 8}, 28, adam),
      "koch (omniglot_koch)": (koch, {"name": "koch_bce"}, {"kind": "pairs", "batch_size": 4}, 105, sgd),
  }
  for label, (model, loss, sampling, size, optim) in cases.items():
    spec = {"kind": "train", "model": model, "loss": loss, "sampling": sampling, "image_size": [size, size],
            "channels": 1, "optim": optim, "augment": augment, "num_steps": 4000, "steps_per_epoch": 100, "seed": 0}
    case = TrainCase(spec)
    case.add("eager")
    start = time.perf_counter()
    loss_value = float(case.runs["eager"]().detach())
    torch_count, jax_count = case.parameters(), JAX_PARAMETERS[label]
    verdict = "equal" if torch_count == jax_count else "DIFFERENT"
    print(f"{label}: parameters torch {torch_count:,}, siamese_jax {jax_count:,} ({verdict}); one eager step "
          f"of {sampling['batch_size']} {sampling['kind']}: loss {loss_value:.4f}, {time.perf_counter() - start:.2f} s")
  for name in BACKBONES:  # run.py's backbone peer cases: folder_pretrained's head, 64x64 RGB, random weights
    label = f"{name}, 128-d L2 head (folder_pretrained)"
    model = {"name": name, "weights_layout": "torch", "preprocessing": "auto", "pooling": "avg", "embedding_dim": 128,
             "l2_normalize": True, "batch_norm_momentum": 0.9, "pair_head": False, "dropout": 0.0}
    spec = {"kind": "embed", "model": model, "image_size": [64, 64], "channels": 3, "images": 8, "batch_size": 8,
            "seed": 0}
    try:
      case = EmbedCase(spec)
      case.add("eager")
    except Unsupported as error:
      print(f"{label}: skipped: {error}")
      continue
    start = time.perf_counter()
    case.run("eager", 1)
    torch_count, jax_count = case.parameters(), JAX_PARAMETERS[label]
    verdict = "equal" if torch_count == jax_count else "DIFFERENT"
    print(f"{label}: parameters torch {torch_count:,}, siamese_jax {jax_count:,} ({verdict}); one eval-mode "
          f"embedding of 8 images: {time.perf_counter() - start:.2f} s")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--serve", action="store_true", help="answer benchmarks/run.py's requests on stdin/stdout")
  parser.add_argument("--check", action="store_true", help="parameter counts and one small step of each network")
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
  args = parser.parse_args(argv)
  if args.serve:
    serve(args.threads)
  elif args.check:
    check(args.threads)
  else:
    parser.error("choose --check or --serve")


if __name__ == "__main__":
  main()
