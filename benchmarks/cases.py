"""The benchmark cases: train step, loader, loader-fed step, evaluation, device scaling, PyTorch peer.

Each case builds what it needs through the library's own entry points (`training.setup`,
`pipeline.train_dataset`, `embedding.embed_images`, ...), so what is timed is what training and
evaluation run, and returns a flat dict of numbers that `run.py` prints and writes to JSON.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from siamese_jax import models, parallel, training
from siamese_jax.data import pipeline, sampling
from siamese_jax.index import USEARCH_EXPANSION, GalleryIndex
from siamese_jax.metrics import embedding, lake
from siamese_jax.metrics import episodes as episode_metrics

import common

REPO = pathlib.Path(__file__).resolve().parents[1]

# What one example of a batch is, by sampling kind: the "items" of items_per_s.
ITEM_NAMES = {"pairs": "pairs", "triplets": "triplets", "m_per_class": "images"}


# ----------------------------------------------------------------------------------------------------
# Configs and data


def find_omniglot_dir() -> pathlib.Path | None:
  """$OMNIGLOT_DIR if set, else ../shared/data/omniglot beside the checkout (the tests' rule)."""
  for candidate in (os.environ.get("OMNIGLOT_DIR"), REPO.parent / "shared" / "data" / "omniglot"):
    if candidate and (pathlib.Path(candidate) / "images_background.zip").exists():
      return pathlib.Path(candidate)
  return None


@functools.lru_cache(maxsize=None)
def _config_module(name: str):
  return importlib.import_module(f"configs.{name}")


def load_config(name: str, *, data_dir: pathlib.Path | None, cache_dir: str, num_devices: int | None = None,
                strategy: str = "shard_map", **overrides: Any) -> ml_collections.ConfigDict:
  """A shipped config (configs/<name>.py) pointed at the benchmark's data, on `num_devices` devices
  (None: what training with it uses: the count it pins, else on CPU `parallel.default_cpu_devices` of its batch,
  which run.py's process has created, and elsewhere every device). `overrides` apply first, so an override
  `parallel.num_devices=0` asks for the default split where a config pins a count only for its figures.

  Without Omniglot the synthetic source stands in (same shapes, so the same compute), with enough
  classes for the m-per-class batches of the reference configs.
  """
  config = _config_module(name).get_config()
  config.data.download = False  # never start a download from a benchmark
  config.data.cache_dir = cache_dir
  if data_dir is not None:
    config.data.data_dir = str(data_dir)
  else:
    config.data.source = "synthetic"
    config.data.synthetic_classes = 200
  config.parallel.strategy = strategy
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  if num_devices is not None:
    config.parallel.num_devices = num_devices
  elif not config.parallel.num_devices and jax.default_backend() == "cpu":
    config.parallel.num_devices = parallel.default_cpu_devices(config.sampling.batch_size)
  return config


def make_sampler(config: ml_collections.ConfigDict, source) -> sampling.Sampler:
  """The sampler `training.setup` builds, over another source (e.g. the lazily decoded one)."""
  return sampling.Sampler(
      sampling.ClassIndex.from_labels(source.labels, source.class_groups, source.class_names),
      kind=config.sampling.kind, batch_size=config.sampling.batch_size, seed=config.seed,
      m_per_class=config.sampling.m_per_class,
      same_group_negative_probability=config.sampling.same_group_negative_probability)


def make_step(built: training.Setup, config: ml_collections.ConfigDict):
  """The jitted, data-parallel step exactly as `training.train_and_evaluate` wraps it (state donated)."""
  return built.parallel.wrap_step(training.bind_train_step(built, config))


class CompiledStep:
  """A compiled train step with its state; `run(n, batches)` takes n steps and returns the state."""

  def __init__(self, built: training.Setup, config: ml_collections.ConfigDict):
    self.built = built
    self.parallel = built.parallel
    self.batch = self.parallel.put_batch(pipeline.BatchBuilder(built.splits.train, built.sampler)(0))
    self.state = self.parallel.put_state(built.state)
    start = time.perf_counter()
    # Lower and compile once, explicitly, to time compilation and read XLA's cost and memory analyses;
    # the compiled executable is then called directly (no second compilation by the jit cache).
    self.compiled = make_step(built, config).lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = common.compiled_flops(self.compiled)
    if self.flops is not None and built.parallel.strategy == "shard_map":
      self.flops *= built.parallel.num_devices  # cost analysis is per device for an SPMD program
    self.memory = common.compiled_memory(self.compiled)
    self.metrics = None

  def run(self, num_steps: int, batches=None):
    state = self.state
    for _ in range(num_steps):
      batch = self.batch if batches is None else next(batches)[0]
      state, self.metrics = self.compiled(state, batch)
    self.state = state
    return state

  def final_loss(self) -> float:
    metrics = jax.device_get(self.parallel.unreplicate_metrics(self.metrics))
    return float(metrics["loss"])


# ----------------------------------------------------------------------------------------------------
# Train step


def step_row(label: str, config: ml_collections.ConfigDict, built: training.Setup, step: "CompiledStep",
             timing: common.Timing, peak_gflops: float) -> dict[str, Any]:
  """The JSON row of one timed train step: what it is, steps/s, items/s, FLOP/s, % of peak, memory."""
  batch_size = config.sampling.batch_size
  result = {
      "case": label,
      "model": config.model.name,
      "loss": config.loss.name + (f"/{config.loss.mining}" if "mining" in config.loss else ""),
      "image_size": config.data.image_size,
      "sampling": config.sampling.kind,
      "item": ITEM_NAMES[config.sampling.kind],
      "batch": batch_size,
      "images_per_step": batch_size * built.sampler.k,
      "strategy": built.parallel.strategy,
      "devices": built.parallel.num_devices,
      "parameters": sum(x.size for x in jax.tree.leaves(built.state.params)),
      **timing.as_dict("step_seconds"),
      "steps_per_s": 1.0 / timing.median,
      "items_per_s": batch_size / timing.median,
      "images_per_s": batch_size * built.sampler.k / timing.median,
      "compile_seconds": step.compile_seconds,
      "final_loss": step.final_loss(),
      "process_max_rss_mb": common.process_max_rss_mb(),
      **step.memory,
  }
  if step.flops is not None:
    result["gflops_per_step"] = step.flops / 1e9
    result["gflops_per_item"] = step.flops / 1e9 / batch_size
    result["gflops_per_s"] = step.flops / timing.median / 1e9
    result["pct_of_peak"] = 100.0 * result["gflops_per_s"] / peak_gflops
  device_peak = common.device_peak_bytes()
  if device_peak is not None:
    result["device_peak_bytes"] = device_peak
  return result


def train_step_case(label: str, config: ml_collections.ConfigDict, *, warmup: int, repeats: int,
                    steps_per_repeat: int, peak_gflops: float) -> dict[str, Any]:
  """Steps/s, items/s, FLOP/s and % of the matmul peak of one config's step on a resident batch."""
  built = training.setup(config)
  step = CompiledStep(built, config)
  timing = common.time_repeated(lambda: step.run(steps_per_repeat), warmup=warmup, repeats=repeats,
                                units_per_call=steps_per_repeat)
  result = step_row(label, config, built, step, timing, peak_gflops)
  del step, built
  gc.collect()
  return result


def interleaved_step_cases(labelled_configs: list[tuple[str, ml_collections.ConfigDict]], *, warmup: int,
                           rounds: int, steps_per_repeat: int, peak_gflops: float) -> list[dict[str, Any]]:
  """Several configs' steps (e.g. one config over 1, 2, 4, 8 devices) compiled side by side, then timed in
  turns: each round times every step once, in an order that reverses from one round to the next, so that the
  host's drift (it moves by 15 % from run to run) hits every case alike. One `step_row` each."""
  steps = []
  for label, config in labelled_configs:
    built = training.setup(config)
    steps.append((label, config, built, CompiledStep(built, config)))
  for _ in range(warmup):
    for *_, step in steps:
      jax.block_until_ready(step.run(steps_per_repeat))
  seconds: list[list[float]] = [[] for _ in steps]
  for round_index in range(rounds):
    order = range(len(steps)) if round_index % 2 == 0 else reversed(range(len(steps)))
    for index in order:
      start = time.perf_counter()
      jax.block_until_ready(steps[index][3].run(steps_per_repeat))
      seconds[index].append((time.perf_counter() - start) / steps_per_repeat)
  rows = [step_row(label, config, built, step, common.Timing(times), peak_gflops)
          for (label, config, built, step), times in zip(steps, seconds)]
  del steps
  gc.collect()
  return rows


# ----------------------------------------------------------------------------------------------------
# Input pipeline


def loader_case(label: str, config: ml_collections.ConfigDict, source, *, workers: int, warmup: int,
                repeats: int, min_seconds: float) -> dict[str, Any]:
  """Batches/s and items/s the Grain loader delivers to the host (no device, no augmentation).

  Grain builds batches in a pool of threads (and in `workers` processes), so they arrive in bursts;
  `warmup` batches absorb the start, and each repetition takes enough batches to last `min_seconds`
  (at least 32: a few bursts), else a repetition would time a buffer draining, not batches being made.
  """
  sampler = make_sampler(config, source)
  # A lazy range of steps: never exhausted, and nothing is built that is not drawn.
  dataset = pipeline.train_dataset(source, sampler, num_steps=1 << 40, num_workers=workers)
  start = time.perf_counter()
  iterator = iter(dataset)
  next(iterator)  # worker start-up (processes spawned, modules imported) and the first batch
  startup_seconds = time.perf_counter() - start

  def draw(count: int) -> None:
    for _ in range(count):  # batches are dropped at once: holding thousands would exhaust memory
      next(iterator)

  draw(warmup)
  start = time.perf_counter()
  draw(32)  # calibration: about how long one batch takes once running
  per_batch = max((time.perf_counter() - start) / 32, 1e-7)
  batches_per_repeat = min(max(32, int(min_seconds / per_batch)), 4096)
  timing = common.time_repeated(lambda: draw(batches_per_repeat), warmup=0, repeats=repeats,
                                units_per_call=batches_per_repeat)
  if hasattr(iterator, "close"):
    iterator.close()
  del iterator
  gc.collect()
  batch_size = config.sampling.batch_size
  return {
      "case": label,
      "image_size": config.data.image_size,
      "sampling": config.sampling.kind,
      "item": ITEM_NAMES[config.sampling.kind],
      "batch": batch_size,
      "images_per_batch": batch_size * sampler.k,
      "decoded": "in memory" if getattr(source, "images", None) is not None else "lazy (per access)",
      "workers": workers,
      "startup_seconds": startup_seconds,
      "batches_per_repeat": batches_per_repeat,
      **timing.as_dict("batch_seconds"),
      "batches_per_s": 1.0 / timing.median,
      "items_per_s": batch_size / timing.median,
      "images_per_s": batch_size * sampler.k / timing.median,
  }


def augment_case(label: str, config: ml_collections.ConfigDict, source, *, warmup: int,
                 repeats: int) -> dict[str, Any]:
  """`training.augment_examples` alone, jitted, on a device batch: the on-device half of the pipeline."""
  sampler = make_sampler(config, source)
  batch = jax.device_put(pipeline.BatchBuilder(source, sampler)(0))
  batch_size = config.sampling.batch_size

  @jax.jit
  def distort(images, step):
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    return training.augment_examples(key, np.arange(batch_size), images, config.augment)

  counter = iter(range(1 << 30))
  timing = common.time_repeated(lambda: distort(batch["images"], next(counter)), warmup=warmup,
                                repeats=repeats)
  return {
      "case": label,
      "image_size": config.data.image_size,
      "sampling": config.sampling.kind,
      "item": ITEM_NAMES[config.sampling.kind],
      "batch": batch_size,
      "images_per_batch": batch_size * sampler.k,
      "decoded": "device batch",
      "workers": "-",
      **timing.as_dict("batch_seconds"),
      "batches_per_s": 1.0 / timing.median,
      "items_per_s": batch_size / timing.median,
      "images_per_s": batch_size * sampler.k / timing.median,
  }


def fed_step_case(label: str, config: ml_collections.ConfigDict, *, workers: int, warmup: int,
                  repeats: int, steps_per_repeat: int) -> dict[str, Any]:
  """The same compiled step fed by the real loader (Grain -> prefetch_to_device) vs a resident batch.

  The two are timed in alternating repetitions so that drift (another process, thermal) hits both.
  """
  built = training.setup(config)
  step = CompiledStep(built, config)
  total = (warmup + repeats) * steps_per_repeat + 4
  dataset = pipeline.train_dataset(built.splits.train, built.sampler, num_steps=total, num_workers=workers)
  batches = pipeline.prefetch_to_device(iter(dataset), built.parallel.put_batch)
  for _ in range(warmup):
    jax.block_until_ready(step.run(steps_per_repeat))
    jax.block_until_ready(step.run(steps_per_repeat, batches))
  resident, fed = [], []
  for _ in range(repeats):
    for times, source in ((resident, None), (fed, batches)):
      start = time.perf_counter()
      jax.block_until_ready(step.run(steps_per_repeat, source))
      times.append((time.perf_counter() - start) / steps_per_repeat)
  del batches, dataset
  gc.collect()
  resident_timing, fed_timing = common.Timing(resident), common.Timing(fed)
  batch_size = config.sampling.batch_size
  return {
      "case": label,
      "batch": batch_size,
      "item": ITEM_NAMES[config.sampling.kind],
      "workers": workers,
      "resident_step_seconds": resident_timing.median,
      "resident_spread": resident_timing.as_dict()["spread"],
      "fed_step_seconds": fed_timing.median,
      "fed_spread": fed_timing.as_dict()["spread"],
      "repeats": repeats,
      "resident_items_per_s": batch_size / resident_timing.median,
      "items_per_s": batch_size / fed_timing.median,
      "slowdown_pct": 100.0 * (fed_timing.median / resident_timing.median - 1.0),
  }


# ----------------------------------------------------------------------------------------------------
# Evaluation


def evaluation_cases(label: str, config: ml_collections.ConfigDict, *, warmup: int, repeats: int,
                     num_episodes: int = 1000, ways: int = 20, embed_limit: int | None = None
                     ) -> list[dict[str, Any]]:
  """Images embedded/s on the test split, Lake's 20 runs, and `num_episodes` N-way 1-shot episodes.

  The model is freshly initialised: speed does not depend on the weights.
  """
  built = training.setup(config)
  embed_fn = models.make_embed_fn(built.graphdef)
  variables = training.variables_of(jax.device_put(built.state))
  test = built.splits.test
  images = pipeline.all_images(test)
  if embed_limit:
    images = images[:embed_limit]
  batch_size = config.eval.batch_size
  embed = lambda: embedding.embed_images(embed_fn, variables, images, batch_size)  # noqa: E731
  timing = common.time_repeated(embed, warmup=warmup, repeats=repeats)
  cases = [{"case": f"{label}: embed test images", "model": config.model.name,
            "image_size": config.data.image_size, "images": len(images), "eval_batch": batch_size,
            **timing.as_dict(), "images_per_s": len(images) / timing.median}]
  if embed_limit:  # episodes need every test image embedded
    return cases
  embeddings = embed()
  if built.splits.lake_runs:
    runs = built.splits.lake_runs
    timing = common.time_repeated(lambda: lake.lake_runs_accuracy(embed_fn, variables, runs),
                                  warmup=warmup, repeats=repeats)
    cases.append({"case": f"{label}: Lake's {len(runs)} runs (embed + score)", "model": config.model.name,
                  "images": sum(len(r.training) + len(r.test) for r in runs), **timing.as_dict()})

  # Within one alphabet as in the report; the synthetic stand-in has groups too small for that.
  within_group = bool(np.bincount(test.class_groups).max() >= ways)

  def sample():
    return episode_metrics.sample_episodes(test.labels, test.class_groups, ways=ways, shots=1, queries=1,
                                           num_episodes=num_episodes, seed=config.seed, within_group=within_group)

  episodes = sample()
  sample_timing = common.time_repeated(sample, warmup=warmup, repeats=repeats)
  score_timing = common.time_repeated(lambda: episode_metrics.episode_accuracies(embeddings, episodes),
                                      warmup=warmup, repeats=repeats)
  total_timing = common.time_repeated(lambda: episode_metrics.episode_accuracies(embeddings, sample()),
                                      warmup=0, repeats=repeats)
  kind = "within-group" if within_group else "any-class"
  cases.append({"case": f"{label}: {num_episodes} {ways}-way 1-shot {kind} episodes (sample + score)",
                "model": config.model.name, "episodes": num_episodes, **total_timing.as_dict(),
                "sample_seconds": sample_timing.median, "score_seconds": score_timing.median,
                "episodes_per_s": num_episodes / total_timing.median})
  del built
  gc.collect()
  return cases


# ----------------------------------------------------------------------------------------------------
# Pretrained backbones


def backbone_cases(name: str, config: ml_collections.ConfigDict, *, warmup: int, repeats: int, steps: int,
                   embed_images: int, peak_gflops: float) -> list[dict[str, Any]]:
  """One backbone (configs/folder_pretrained.py with model.name=`name`, random weights: speed does not
  depend on them): the fine-tuning step (nothing frozen) and the frozen-features step, then embedding."""
  rows = []
  for freeze in ("", "all"):
    config.model.freeze_until = freeze
    label = f"{name} {config.data.image_size}px, {'frozen features' if freeze else 'fine-tune all'}"
    row = train_step_case(label, config, warmup=warmup, repeats=repeats, steps_per_repeat=steps,
                          peak_gflops=peak_gflops)
    rows.append(row)
  built = training.setup(config)
  embed_fn = models.make_embed_fn(built.graphdef)
  variables = training.variables_of(jax.device_put(built.state))
  images = pipeline.all_images(built.splits.test)[:embed_images]
  embed = lambda: embedding.embed_images(embed_fn, variables, images, config.eval.batch_size)  # noqa: E731
  timing = common.time_repeated(embed, warmup=warmup, repeats=repeats)
  flops = common.compiled_flops(jax.jit(embed_fn).lower(variables, images[:config.eval.batch_size]).compile())
  row = {"case": f"{name} {config.data.image_size}px, embed", "model": name, "images": len(images),
         **timing.as_dict(), "images_per_s": len(images) / timing.median}
  if flops is not None:
    row["gflops_per_s"] = flops / 1e9 * len(images) / config.eval.batch_size / timing.median
    row["pct_of_peak"] = 100.0 * row["gflops_per_s"] / peak_gflops
  rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------------
# Gallery index (siamese_jax/index.py): one case per process (run.py --index-child), so that each peak
# resident memory is that case's alone


INDEX_DIM = 128
INDEX_PER_CLASS = 10  # items per class of a clustered gallery
INDEX_SPREAD = 0.5  # norm of the noise around a class centre (centres have norm 1), before normalising
INDEX_DEFAULT_EXPANSION = USEARCH_EXPANSION  # the approximate search's default beam


def index_vectors(num: int, centres: np.ndarray | None, rng: np.random.Generator, dim: int = INDEX_DIM):
  """(float32 [num, dim] unit vectors, their classes): a random class centre plus Gaussian noise of norm
  about INDEX_SPREAD ("clustered", as a trained model's embeddings are), or uniform on the sphere
  (`centres` None: no structure, the hardest case for a graph index). Drawn in blocks: no float64 copy."""
  vectors = np.empty((num, dim), np.float32)
  labels = rng.integers(0, len(centres), num) if centres is not None else np.zeros(num, np.int64)
  for start in range(0, num, 65536):
    stop = min(start + 65536, num)
    block = rng.standard_normal((stop - start, dim), dtype=np.float32)
    if centres is not None:
      block = centres[labels[start:stop]] + block * (INDEX_SPREAD / np.sqrt(dim))
    vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
  return vectors, labels


def index_case(*, num: int, backend: str, data: str, queries: int, query_pool: int, k: int, repeats: int,
               exact_file: str, expansions: tuple = (), seed: int = 0) -> list[dict[str, Any]]:
  """Build time, queries/s and memory of one gallery index, and recall@k of the approximate backend
  against the exact results for the same queries (`exact_file`, written by the exact case before it);
  for usearch, one row per search `expansion` (its default first), on the same graph. Every case of a
  gallery draws the same `query_pool` queries and searches the first `queries` of them."""
  rss_start = common.current_rss_mb()
  rng = np.random.default_rng(seed)
  centres = None
  if data == "clustered":
    centres = rng.standard_normal((max(1, num // INDEX_PER_CLASS), INDEX_DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  gallery, labels = index_vectors(num, centres, np.random.default_rng(seed + 1))
  query = index_vectors(query_pool, centres, np.random.default_rng(seed + 2))[0][:queries]
  rss_data = common.current_rss_mb()
  start = time.perf_counter()
  index = GalleryIndex.from_embeddings(gallery, labels, backend=backend)
  if backend == "usearch":
    index.build_ann()
  build_seconds = time.perf_counter() - start
  rss_built = common.current_rss_mb()
  rows = []
  for expansion in (INDEX_DEFAULT_EXPANSION, *expansions) if backend == "usearch" else (None,):
    options = {"expansion": expansion} if expansion else {}
    # Warm-up on one chunk of queries: the same compiled shapes as the timed calls (512-query chunks).
    index.search(query[:512], k, **options)
    found = []
    timing = common.time_repeated(lambda: found.append(index.search(query, k, **options).indices), warmup=0,
                                  repeats=repeats)
    label = f"{num:,} x {INDEX_DIM} {data}, {backend}" + (f", expansion {expansion}" if expansion else "")
    row = {"case": label, "backend": backend, "expansion": expansion, "gallery": num, "dim": INDEX_DIM,
           "data": data, "classes": len(index.class_names), "queries": queries, "k": k,
           "build_seconds": build_seconds if not rows else None, **timing.as_dict("search_seconds"),
           "queries_per_s": queries / timing.median, "rss_start_mb": rss_start, "rss_after_data_mb": rss_data,
           "rss_after_build_mb": rss_built, "max_rss_mb": common.peak_rss_mb(), "embeddings_mb": gallery.nbytes / 2**20}
    row["max_rss_beside_embeddings_mb"] = row["max_rss_mb"] - row["embeddings_mb"]
    if backend == "exact":
      np.save(exact_file, found[-1])
    elif os.path.exists(exact_file):
      exact = np.load(exact_file)
      common_queries = min(len(exact), len(found[-1]))
      approximate = found[-1][:common_queries]
      hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approximate, exact[:common_queries])]
      row["recall_at_k"] = float(np.sum(hits) / (common_queries * k))
      row["recall_queries"] = common_queries
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------------
# The PyTorch peer (benchmarks/torch_peer.py): the same step and embedding in PyTorch, in a child process
# of its own Python environment, timed in turns with the JAX case (round by round), reported as ratios


PEER_SCRIPT = pathlib.Path(__file__).resolve().parent / "torch_peer.py"


def find_torch_python(explicit: str) -> tuple[str | None, str]:
  """(a Python that imports torch, a line saying which and its torch version), or (None, why not).

  `explicit` (run.py's --torch-python) wins, then $SIAMESE_TORCH_PYTHON, then this Python itself.
  """
  candidates = [explicit] if explicit else [os.environ.get("SIAMESE_TORCH_PYTHON", ""), sys.executable]
  tried = []
  for python in filter(None, candidates):
    try:
      probe = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
      tried.append(f"{python} ({type(error).__name__})")
      continue
    if probe.returncode == 0:
      return python, f"torch {probe.stdout.strip()} from {python}"
    tried.append(f"{python} (no torch)")
  return None, (f"PyTorch peer skipped: torch is not importable by {', '.join(tried)}; install it in a venv of its "
                "own and pass --torch-python or set SIAMESE_TORCH_PYTHON (benchmarks/README.md)")


class TorchPeer:
  """benchmarks/torch_peer.py --serve in the torch environment: one JSON request and reply per line.

  Its messages (torch's warnings, the compiler's output) go to this process's stderr; only replies come
  back on the pipe. While one side runs, the other waits on the pipe, so the two never compete for cores.
  """

  def __init__(self, python: str, threads: int):
    self.process = subprocess.Popen([python, str(PEER_SCRIPT), "--serve", "--threads", str(threads)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.hello = self._reply()

  def _reply(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch peer exited with status {self.process.wait()} (its messages are above)")
    return json.loads(line)

  def request(self, **message) -> dict:
    self.process.stdin.write(json.dumps(message) + "\n")
    self.process.stdin.flush()
    return self._reply()

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()
        self.process.wait()


def _image_size(config: ml_collections.ConfigDict) -> list[int]:
  size = config.data.image_size
  return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def peer_spec(config: ml_collections.ConfigDict, kind: str = "train", **extra: Any) -> dict[str, Any]:
  """The config of a JAX case as the plain dicts torch_peer.py builds its case from (it refuses any
  setting it does not reproduce); on the GPU where JAX runs, if JAX runs on one."""
  return {"kind": kind, "model": config.model.to_dict(), "loss": config.loss.to_dict(),
          "optim": config.optim.to_dict(), "augment": config.augment.to_dict(),
          "sampling": config.sampling.to_dict(), "image_size": _image_size(config),
          "channels": config.data.channels, "num_steps": config.train.num_steps,
          "steps_per_epoch": config.train.steps_per_epoch, "seed": config.seed,
          "device": "cuda" if jax.default_backend() == "gpu" else "cpu", **extra}


def _interleaved(label: str, jax_work, peer: TorchPeer, spec: dict, *, variants: tuple[str, ...], warmup: int,
                 rounds: int, repeats: int, steps_per_repeat: int, jax_parameters: int) -> dict[str, Any]:
  """Seconds per unit of JAX (`jax_work()` does `steps_per_repeat` units) and of each PyTorch variant,
  timed in turns: each round times every side `repeats` times, in an order that reverses from one round to
  the next (drift hits both), and yields one ratio per variant (PyTorch seconds / JAX seconds: > 1 means
  JAX is faster). The row has each side's median over rounds and each ratio's median, min and max."""
  setup = peer.request(op="setup", case=spec, variants=list(variants), warmup=warmup)
  row: dict[str, Any] = {"case": label, "parameters_jax": jax_parameters}
  if "error" in setup:
    row["note"] = setup["error"]
    return row
  row.update(parameters_torch=setup["parameters"], parameters_match=setup["parameters"] == jax_parameters)
  row["torch_setup_seconds"] = setup["setup_seconds"]
  notes = [f"{variant}: {setup[f'{variant}_error']}" for variant in variants if f"{variant}_error" in setup]
  if notes:
    row["note"] = "; ".join(notes)
  for _ in range(warmup):
    jax.block_until_ready(jax_work())
  seconds: dict[str, list[float]] = {side: [] for side in ("jax", *setup["variants"])}
  for round_index in range(rounds):
    order = list(seconds) if round_index % 2 == 0 else list(seconds)[::-1]
    for side in order:
      if side == "jax":
        timing = common.time_repeated(jax_work, warmup=0, repeats=repeats, units_per_call=steps_per_repeat)
        seconds[side].append(timing.median)
      else:
        reply = peer.request(op="time", variant=side, steps=steps_per_repeat, repeats=repeats)
        if "error" in reply:
          raise RuntimeError(f"PyTorch peer, {label}, {side}: {reply['error']}")
        seconds[side].append(statistics.median(reply["seconds"]))
  row["rounds"] = rounds
  row["seconds"] = seconds
  for side, values in seconds.items():
    row[f"{side}_seconds_median"] = statistics.median(values)
    row[f"{side}_spread"] = common.Timing(values).as_dict()["spread"]
  for variant in setup["variants"]:
    ratios = [torch_seconds / jax_seconds for torch_seconds, jax_seconds in zip(seconds[variant], seconds["jax"])]
    row[f"ratio_{variant}"] = ratios
    row[f"ratio_{variant}_median"] = statistics.median(ratios)
    row[f"ratio_{variant}_min"] = min(ratios)
    row[f"ratio_{variant}_max"] = max(ratios)
  return row


def peer_train_case(label: str, config: ml_collections.ConfigDict, peer: TorchPeer, *,
                    variants: tuple[str, ...], warmup: int, rounds: int, repeats: int,
                    steps_per_repeat: int) -> dict[str, Any]:
  """The JAX train step of `config` on a resident batch (as `train_step_case`) against the same step in
  PyTorch: items/s of each side and the JAX / PyTorch speed ratios over rounds."""
  built = training.setup(config)
  step = CompiledStep(built, config)
  batch_size = config.sampling.batch_size
  row = {"kind": "train step", "model": config.model.name, "batch": batch_size,
         "item": ITEM_NAMES[config.sampling.kind], "sampling": config.sampling.kind,
         **_interleaved(label, lambda: step.run(steps_per_repeat), peer, peer_spec(config), variants=variants,
                        warmup=warmup, rounds=rounds, repeats=repeats, steps_per_repeat=steps_per_repeat,
                        jax_parameters=sum(x.size for x in jax.tree.leaves(built.state.params)))}
  for side in ("jax", *variants):
    if f"{side}_seconds_median" in row:
      row[f"{side}_items_per_s"] = batch_size / row[f"{side}_seconds_median"]
  del step, built
  gc.collect()
  return row


def peer_embed_case(label: str, config: ml_collections.ConfigDict, peer: TorchPeer, *,
                    variants: tuple[str, ...], rounds: int, repeats: int, max_images: int) -> dict[str, Any]:
  """Evaluation's embedding of the test images (as `evaluation_cases`; for a pretrained backbone, as
  `backbone_cases`) against PyTorch inference of the same network in eval mode, batch for batch
  (config.eval.batch_size, the last one padded)."""
  built = training.setup(config)
  embed_fn = models.make_embed_fn(built.graphdef)
  variables = training.variables_of(jax.device_put(built.state))
  images = pipeline.all_images(built.splits.test)[:max_images]
  batch_size = config.eval.batch_size
  spec = peer_spec(config, "embed", images=len(images), batch_size=batch_size)
  row = {"kind": "embedding", "model": config.model.name, "batch": batch_size, "item": "images",
         "images": len(images),
         **_interleaved(label, lambda: embedding.embed_images(embed_fn, variables, images, batch_size), peer, spec,
                        variants=variants, warmup=1, rounds=rounds, repeats=repeats, steps_per_repeat=1,
                        jax_parameters=sum(x.size for x in jax.tree.leaves(built.state.params)))}
  for side in ("jax", *variants):
    if f"{side}_seconds_median" in row:
      row[f"{side}_items_per_s"] = len(images) / row[f"{side}_seconds_median"]
  del built, variables
  gc.collect()
  return row
