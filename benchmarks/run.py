r"""Throughput benchmarks: train step, input pipeline, evaluation, device scaling, gallery index, PyTorch peer.

  python benchmarks/run.py --quick        # under 5 minutes on 2 CPU cores
  python benchmarks/run.py                # the full suite: more repetitions, more cases

Warms up, times several repetitions of each case, prints markdown tables (median and spread) and
writes everything to benchmarks/results/<machine>.json (e.g. cpu-2core.json), with the speed targets
checked at the end. Reads Omniglot from $OMNIGLOT_DIR (or ../shared/data/omniglot beside the
checkout), else uses the synthetic source of the same shapes. The `peer` section times the same steps in
PyTorch (benchmarks/torch_peer.py, in a Python that has torch: --torch-python or $SIAMESE_TORCH_PYTHON)
in turns with the JAX ones and reports JAX / PyTorch ratios; without torch it is skipped with a note.
See benchmarks/README.md.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

# Before JAX starts (as launch.py does): XLA:CPU's YNNPACK convolution fusions are slow on these CPUs.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_cpu_experimental_ynn_fusion_type="

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):  # `configs` and `siamese_jax` from the checkout; helpers from here
  if path not in sys.path:
    sys.path.insert(0, path)

SCALING_DEVICES = (1, 2, 4, 8)

# Repetitions per suite. The quick suite keeps the 2-core total under 5 minutes (the Koch step alone
# takes seconds) by leaving out the pretrained backbones and the gallery index (`sections`; run them with
# --only); the full one runs every section and times more.
SUITES = {
    "quick": dict(matmul_warmup=2, matmul_repeats=5, warmup=1, repeats=3, conv_steps=4, koch_steps=1,
                  train_cases=(0, 1, 2), loader_warmup=32, loader_seconds=0.3, loader_workers=(0,),
                  lazy_workers=(), koch_loader=((True, 0),), fed_workers=(0,), fed_steps=4, fed_repeats=4,
                  eval_repeats=2, koch_embed=False, scaling_steps=3, scaling_repeats=3,
                  scaling_strategies=("shard_map",), backbone_size=64,
                  backbone_steps=1, backbone_embed=128, index_sizes=(10_000, 100_000), index_queries=1000,
                  index_queries_1m_exact=200, index_repeats=2, peer_cases=((2, ("eager", "compile")),),
                  peer_rounds=3, peer_repeats=1, peer_conv_steps=3, peer_koch_steps=1, peer_koch_rounds=2,
                  peer_embed_images=2048, peer_backbones=(), peer_backbone_images=128,
                  sections=("peak", "train", "loader", "fed", "eval", "scaling", "peer")),
    "full": dict(matmul_warmup=3, matmul_repeats=10, warmup=2, repeats=7, conv_steps=20, koch_steps=2,
                 train_cases=(0, 1, 2, 3), loader_warmup=64, loader_seconds=1.5, loader_workers=(0, 1, 2),
                 lazy_workers=(0, 1, 2), koch_loader=tuple((m, w) for m in (True, False) for w in (0, 1, 2)),
                 fed_workers=(0, 1), fed_steps=20, fed_repeats=7, eval_repeats=7, koch_embed=True, scaling_steps=10,
                 scaling_repeats=5, scaling_strategies=("shard_map", "pmap"), backbone_size=128, backbone_steps=2,
                 backbone_embed=512, index_sizes=(10_000, 100_000, 1_000_000), index_queries=4000,
                 index_queries_1m_exact=1000, index_repeats=3,
                 peer_cases=((2, ("eager", "compile")), (0, ("eager", "compile")), (3, ("eager", "compile"))),
                 peer_rounds=5, peer_repeats=2, peer_conv_steps=10, peer_koch_steps=1, peer_koch_rounds=3,
                 peer_embed_images=0, peer_backbones=("resnet18", "resnet50"), peer_backbone_images=128,
                 sections=None),
}

# Train-step cases: (label, config module, overrides). The third is the conv4 target's case (128 triplets,
# benchmarks/README.md): 128 explicit triplets (384 images) with the plain triplet loss. Each runs on the devices
# training with its config uses; the triplet ablation pins one device only to reproduce its figures, so its
# cases ask for the default split, like a new run of that network.
TRAIN_CASES = (
    ("omniglot (conv4, prototypical)", "omniglot", {}),
    ("omniglot_triplet (conv4, triplet semi-hard)", "ablations.omniglot_triplet", {"parallel.num_devices": 0}),
    ("conv4, 128 triplets (conv4 target)", "ablations.omniglot_triplet",
     {"sampling.kind": "triplets", "sampling.batch_size": 128, "loss.mining": "none", "parallel.num_devices": 0}),
    ("omniglot_koch (Koch, 105x105)", "omniglot_koch", {}),
)


# The PyTorch peer (benchmarks/torch_peer.py): each suite's peer_cases are (index into TRAIN_CASES, the
# PyTorch variants timed against it). The quick suite times the conv4 target's step only (Koch's step takes
# 10-20 s a side on 2 cores: the full suite, or --only peer without --quick, times it); its embedding case
# embeds the first peer_embed_images test images (0: all). peer_backbones are the pretrained backbones whose
# embedding is timed against torchvision's network (the full suite's; --peer-cases names them in the quick one).
PEER_VARIANTS = ("eager", "compile")
PEER_CASE_NAMES = {"prototypical": 0, "triplets": 2, "koch": 3}  # --peer-cases: name -> index into TRAIN_CASES
PEER_BACKBONE_CASES = {"resnet18_embed": "resnet18", "resnet50_embed": "resnet50"}  # --peer-cases: name -> backbone
PEER_BACKBONE_SIZE = 64  # pixels: the quick `backbones` section's images
# --peer-smoke (a check that the peer works, not a measurement): small batches, one round of one step.
PEER_SMOKE_BATCH = {"triplets": 8, "pairs": 8, "m_per_class": 20}

# Pretrained backbones (configs/folder_pretrained.py on synthetic RGB data, random weights): model names.
BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg16", "efficientnet_lite0")

# Gallery index: k of the top-k searches, and the one structureless (uniform) gallery size measured beside
# the clustered ones (benchmarks/README.md says why).
INDEX_K = 10
INDEX_EXPANSIONS = (128, 256)  # the approximate search's beam, measured beside its default (64) on the same graph
INDEX_UNIFORM_SIZE = 100_000


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="the short suite (under 5 minutes on 2 cores)")
  parser.add_argument("--only", default="", help="comma-separated sections to run: peak,train,loader,fed,eval,"
                      "scaling,backbones,index,peer (default: all); writes <machine>-partial.json")
  parser.add_argument("--machine", default="", help="results file name; default from platform and cores")
  parser.add_argument("--out", default=str(HERE / "results"), help="folder for <machine>.json")
  parser.add_argument("--cache-dir", default=str(pathlib.Path.home() / ".cache" / "siamese_jax" / "decoded"),
                      help="decoded-image cache (config.data.cache_dir); '' decodes every time")
  parser.add_argument("--matmul-size", type=int, default=0,
                      help="n of the n x n fp32 matmul peak (default 4096 on CPU, 8192 on accelerators)")
  parser.add_argument("--synthetic", action="store_true",
                      help="use the synthetic source (same shapes) even where Omniglot is present")
  parser.add_argument("--torch-python", default="",
                      help="a Python with torch for the PyTorch peer (default: $SIAMESE_TORCH_PYTHON, else this one)")
  parser.add_argument("--peer-rounds", type=int, default=0, help="rounds of the PyTorch peer (default: the suite's)")
  parser.add_argument("--peer-cases", default="", help="the PyTorch peer's train steps and backbone embeddings, "
                      f"comma-separated from {', '.join([*PEER_CASE_NAMES, *PEER_BACKBONE_CASES])} (default: the "
                      "suite's; the quick suite's is triplets; Koch's takes minutes; the backbones need torchvision); "
                      "the conv4 embedding case always runs")
  parser.add_argument("--peer-smoke", action="store_true", help=argparse.SUPPRESS)  # small batches, 1 round, 1 step
  parser.add_argument("--index-child", default="", help=argparse.SUPPRESS)  # internal: JSON path of the case
  return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Tables


def _format(value, spec: str) -> str:
  if value is None or value == "":
    return "-"
  if isinstance(value, str):
    return value
  return format(value, spec)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_format(row.get(key), spec) for _, key, spec in columns) + " |")
  return "\n".join(lines)


TRAIN_COLUMNS = [("train step", "case", ""), ("batch", "batch", "d"), ("item", "item", ""),
                 ("items/s", "items_per_s", ".0f"), ("images/s", "images_per_s", ".0f"),
                 ("steps/s", "steps_per_s", ".2f"), ("spread", "spread", ".1%"),
                 ("GFLOP/item", "gflops_per_item", ".3f"), ("GFLOP/s", "gflops_per_s", ".1f"),
                 ("% of peak", "pct_of_peak", ".1f"), ("compile s", "compile_seconds", ".1f"),
                 ("XLA peak MB", "xla_peak_mb", ".0f")]
LOADER_COLUMNS = [("loader", "case", ""), ("decoded", "decoded", ""), ("workers", "workers", ""),
                  ("batch", "batch", "d"), ("item", "item", ""), ("items/s", "items_per_s", ".0f"),
                  ("images/s", "images_per_s", ".0f"), ("spread", "spread", ".1%"),
                  ("start-up s", "startup_seconds", ".1f")]
FED_COLUMNS = [("step fed by the loader", "case", ""), ("workers", "workers", ""),
               ("resident items/s", "resident_items_per_s", ".0f"), ("fed items/s", "items_per_s", ".0f"),
               ("slowdown", "slowdown_pct", "+.1f")]
EVAL_COLUMNS = [("evaluation", "case", ""), ("images", "images", ""), ("seconds", "seconds_median", ".3f"),
                ("spread", "spread", ".1%"), ("images/s", "images_per_s", ".0f")]
SCALING_COLUMNS = [("scaling (same global batch)", "case", ""), ("strategy", "strategy", ""),
                   ("devices", "devices", "d"), ("items/s", "items_per_s", ".0f"),
                   ("steps/s", "steps_per_s", ".2f"), ("spread", "spread", ".1%"),
                   ("vs 1 device", "vs_one_device", ".2f"), ("compile s", "compile_seconds", ".1f")]
BACKBONE_COLUMNS = [("backbone", "case", ""), ("batch", "batch", "d"), ("images/s", "images_per_s", ".1f"),
                    ("spread", "spread", ".1%"), ("GFLOP/s", "gflops_per_s", ".1f"), ("% of peak", "pct_of_peak", ".1f"),
                    ("compile s", "compile_seconds", ".1f")]
INDEX_COLUMNS = [("gallery index", "case", ""), ("queries", "queries", "d"), ("build s", "build_seconds", ".1f"),
                 ("queries/s (k=10)", "queries_per_s", ".0f"), ("spread", "spread", ".1%"),
                 ("recall@10", "recall_at_k", ".3f"), ("RSS at start MB", "rss_start_mb", ".0f"),
                 ("peak RSS MB", "max_rss_mb", ".0f"),
                 ("embeddings MB", "embeddings_mb", ".0f"),
                 ("peak - embeddings MB", "max_rss_beside_embeddings_mb", ".0f")]
PEER_COLUMNS = [("PyTorch peer (same run, in turns)", "case", ""), ("batch", "batch", "d"), ("item", "item", ""),
                ("JAX items/s", "jax_items_per_s", ".1f"), ("eager items/s", "eager_items_per_s", ".1f"),
                ("compile items/s", "compile_items_per_s", ".1f"), ("JAX / eager", "eager_ratio_text", ""),
                ("JAX / compile", "compile_ratio_text", ""), ("rounds", "rounds", "d"),
                ("parameters JAX, torch", "parameters_text", ""), ("note", "note", "")]
TARGET_COLUMNS = [("target", "target", ""), ("measured", "measured", ""), ("needed", "needed", ""),
                  ("holds", "holds", "")]


def report_tables(results: dict) -> str:
  parts = []
  peak = results.get("matmul")
  if peak:
    load = [results.get(f"load_average_{when}", (float("nan"),))[0] for when in ("start", "end")]
    machine = results["machine"]
    parts.append(f"fp32 matmul peak ({peak['size']}x{peak['size']}, XLA): "
                 f"**{results['matmul_peak_gflops']:.0f} GFLOP/s** (best repetition, start and end of the "
                 f"run; start median {peak['gflops_median']:.0f}) on {machine['machine']} "
                 f"({machine['cpu_model']}), {results['suite']} suite, data: {results['data']}; "
                 f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.")
  for key, columns in (("train_step", TRAIN_COLUMNS), ("loader", LOADER_COLUMNS), ("fed_step", FED_COLUMNS),
                       ("evaluation", EVAL_COLUMNS), ("scaling", SCALING_COLUMNS), ("backbones", BACKBONE_COLUMNS),
                       ("index", INDEX_COLUMNS), ("peer", PEER_COLUMNS), ("targets", TARGET_COLUMNS)):
    rows = results.get(key)
    if key == "peer" and results.get("peer_note"):
      parts.append(results["peer_note"])
    if rows:
      for row in rows:
        if "xla_peak_bytes" in row:
          row.setdefault("xla_peak_mb", row["xla_peak_bytes"] / 2**20)
      if key == "peer":
        rows = [peer_display(row) for row in rows]
      parts.append(markdown_table(rows, columns))
  return "\n\n".join(parts)


def ratio_text(row: dict, variant: str) -> str:
  """JAX / PyTorch speed ratio over the rounds: "1.23x (1.15-1.29)", median (min-max); > 1: JAX is faster."""
  if f"ratio_{variant}_median" not in row:
    return ""
  return (f"{row[f'ratio_{variant}_median']:.2f}x ({row[f'ratio_{variant}_min']:.2f}-"
          f"{row[f'ratio_{variant}_max']:.2f})")


def peer_display(row: dict) -> dict:
  """A peer row with the table's text columns (kept out of the JSON)."""
  shown = dict(row, case=f"{row['case']} ({row['kind']})", eager_ratio_text=ratio_text(row, "eager"),
               compile_ratio_text=ratio_text(row, "compile"))
  if "parameters_torch" in row:
    same = "equal" if row["parameters_match"] else "DIFFERENT"
    shown["parameters_text"] = f"{row['parameters_jax']:,}, {row['parameters_torch']:,} ({same})"
  return shown


# ----------------------------------------------------------------------------------------------------
# Speed targets (benchmarks/README.md), checked on this run's numbers


def check_targets(results: dict) -> list[dict]:
  targets = []
  steps = {row["case"]: row for row in results.get("train_step", [])}

  def add(target, measured, needed, holds):
    targets.append({"target": target, "measured": measured, "needed": needed,
                    "holds": "yes" if holds else "NO"})

  koch = steps.get(TRAIN_CASES[3][0])
  if koch and "pct_of_peak" in koch:
    add("Koch 105x105, 128 pairs: % of matmul peak", f"{koch['pct_of_peak']:.1f} % "
        f"({koch['items_per_s']:.1f} pairs/s)", ">= 70 %", koch["pct_of_peak"] >= 70)
  triplets = steps.get(TRAIN_CASES[2][0])
  if triplets and "pct_of_peak" in triplets:
    add("conv4 28x28, 128 triplets: % of matmul peak", f"{triplets['pct_of_peak']:.1f} % "
        f"({triplets['items_per_s']:.0f} triplets/s)", ">= 25 %",
        triplets["pct_of_peak"] >= 25)
  shipped = [row for label, _, overrides in TRAIN_CASES
             if not set(overrides) - {"parallel.num_devices"} and (row := steps.get(label))]
  if shipped:
    # The fastest shipped config consumes the most images per second; the default loader (decoded in
    # memory, no worker processes) for the same batches must deliver 3x that.
    fastest = max(shipped, key=lambda row: row["images_per_s"])
    loader = next((row for row in results.get("loader", []) if row["decoded"] == "in memory"
                   and row["workers"] == 0 and row["sampling"] == fastest["sampling"]
                   and row["batch"] == fastest["batch"] and row["image_size"] == fastest["image_size"]), None)
    if loader:
      ratio = loader["images_per_s"] / fastest["images_per_s"]
      add(f"loader (in memory, 0 workers) vs the fastest shipped step ({fastest['config']})",
          f"{loader['images_per_s']:.0f} vs {fastest['images_per_s']:.0f} images/s = {ratio:.0f}x", ">= 3x",
          ratio >= 3)
  from siamese_jax.parallel import default_cpu_devices
  scaling = [row for row in results.get("scaling", []) if row["strategy"] == "shard_map"]
  default = next((row for row in scaling if row["devices"] == default_cpu_devices(row["batch"])), None)
  if default and default["devices"] > 1:
    add(f"the main job's step ({default['batch']} images) on its default {default['devices']} CPU devices vs 1 "
        "(before the split)",
        f"{default['vs_one_device']:.2f}x", ">= 1.3x", default["vs_one_device"] >= 1.3)
  for row in results.get("fed_step", []):
    add(f"step fed by the loader vs resident ({row['case']}, {row['workers']} workers)",
        f"{row['slowdown_pct']:+.1f} %", "within 5 %", row["slowdown_pct"] <= 5)
  peer = {(row["kind"], row["case"]): row for row in results.get("peer", [])}
  triplets = peer.get(("train step", TRAIN_CASES[2][0]), {})
  if "ratio_compile_median" in triplets:
    add(f"conv4 28x28, {triplets['batch']} triplets: JAX / torch.compile (median of rounds)",
        ratio_text(triplets, "compile"),
        ">= 1.5x", triplets["ratio_compile_median"] >= 1.5)
  koch = peer.get(("train step", TRAIN_CASES[3][0]), {})
  if "ratio_eager_median" in koch:
    add(f"Koch 105x105, {koch['batch']} pairs: JAX / PyTorch eager (median of rounds)", ratio_text(koch, "eager"),
        ">= 1.2x", koch["ratio_eager_median"] >= 1.2)
  for row in results.get("peer", []):
    ratios = [(row[f"ratio_{v}_median"], v) for v in PEER_VARIANTS if f"ratio_{v}_median" in row]
    if row["kind"] == "embedding" and row["model"] == "conv4" and ratios:
      ratio, variant = min(ratios)  # against the faster PyTorch variant
      add(f"{row['case']}: JAX / PyTorch inference ({variant}, the faster)", ratio_text(row, variant), ">= 2x",
          ratio >= 2)
  for row in results.get("evaluation", []):
    if row.get("model") == "conv4" and "images_per_s" in row:
      add("conv4 28x28 embedding for evaluation", f"{row['images_per_s']:.0f} images/s", ">= 5,000 images/s",
          row["images_per_s"] >= 5000)
  return targets


# ----------------------------------------------------------------------------------------------------
# Sections


@dataclasses.dataclass
class Context:
  """What every section needs: the suite's repetition counts, the data, the measured peak."""

  args: argparse.Namespace
  settings: dict
  data_dir: pathlib.Path | None
  peak_gflops: float = 0.0

  def config(self, name: str, **overrides):
    import cases
    return cases.load_config(name, data_dir=self.data_dir, cache_dir=self.args.cache_dir, **overrides)


def measure_peak(context: Context) -> dict:
  import jax
  import common
  size = context.args.matmul_size or (4096 if jax.default_backend() == "cpu" else 8192)
  return common.matmul_peak(size, warmup=context.settings["matmul_warmup"],
                            repeats=context.settings["matmul_repeats"])


def section_peak(context: Context) -> dict:
  """The peak every pct_of_peak divides by: the best repetition, so that a busy moment during the
  measurement can only make the percentages smaller, never flatter the step (it is measured again at
  the end of the run, and the higher of the two is kept)."""
  matmul = measure_peak(context)
  context.peak_gflops = matmul["gflops_best"]
  print(f"matmul peak: {context.peak_gflops:.0f} GFLOP/s (best of {matmul['repeats']}; median "
        f"{matmul['gflops_median']:.0f})", flush=True)
  return {"matmul": matmul, "matmul_peak_gflops": context.peak_gflops}


def rescale_to_peak(results: dict, peak_gflops: float) -> None:
  """Recomputes every pct_of_peak against the final peak."""
  results["matmul_peak_gflops"] = peak_gflops
  for key in ("train_step", "scaling", "backbones"):
    for row in results.get(key, []):
      if "gflops_per_s" in row:
        row["pct_of_peak"] = 100.0 * row["gflops_per_s"] / peak_gflops


def section_train(context: Context) -> dict:
  import cases
  settings, rows = context.settings, []
  for label, name, overrides in [TRAIN_CASES[index] for index in settings["train_cases"]]:
    steps = settings["koch_steps" if name == "omniglot_koch" else "conv_steps"]
    row = cases.train_step_case(label, context.config(name, **overrides), warmup=settings["warmup"],
                                repeats=settings["repeats"], steps_per_repeat=steps,
                                peak_gflops=context.peak_gflops)
    row["config"] = name
    rows.append(row)
    print(f"  {label}: {row['items_per_s']:.1f} {row['item']}/s, {row.get('pct_of_peak', 0):.1f} % of peak",
          flush=True)
  return {"train_step": rows}


def section_loader(context: Context) -> dict:
  """The Grain loader alone (host side), then the on-device augmentation alone."""
  import cases
  from siamese_jax.data import pipeline
  settings, rows = context.settings, []
  plans = [("omniglot", True, w) for w in settings["loader_workers"]]
  plans += [("omniglot", False, w) for w in settings["lazy_workers"]]
  plans += [("omniglot_koch", m, w) for m, w in settings["koch_loader"]]
  train_sources = {}
  for name, in_memory, workers in plans:
    config = context.config(name, **{"data.in_memory": in_memory})
    key = (config.data.image_size, in_memory)
    if key not in train_sources:
      train_sources[key] = pipeline.load_splits(config.data, seed=config.seed).train
    if not in_memory and train_sources[key].images is not None:
      continue  # a source that is always in memory (synthetic): the lazy case would repeat another
    row = cases.loader_case(name, config, train_sources[key], workers=workers,
                            warmup=settings["loader_warmup"], repeats=settings["repeats"],
                            min_seconds=settings["loader_seconds"])
    row["config"] = name
    rows.append(row)
    print(f"  loader {name}, {row['decoded']}, {workers} workers: {row['items_per_s']:.0f} {row['item']}/s",
          flush=True)
  for name in ("omniglot", "omniglot_koch"):
    config = context.config(name)
    row = cases.augment_case(f"{name}: augment_examples on device", config,
                             train_sources[(config.data.image_size, True)], warmup=settings["warmup"] + 1,
                             repeats=settings["repeats"])
    row["config"] = f"{name} (augment)"
    rows.append(row)
    print(f"  augment {name}: {row['items_per_s']:.0f} {row['item']}/s", flush=True)
  return {"loader": rows}


def section_fed(context: Context) -> dict:
  import cases
  settings, rows = context.settings, []
  for workers in settings["fed_workers"]:
    row = cases.fed_step_case("omniglot (conv4, prototypical)", context.config("omniglot"), workers=workers,
                              warmup=settings["warmup"], repeats=settings["fed_repeats"],
                              steps_per_repeat=settings["fed_steps"])
    rows.append(row)
    print(f"  step fed by the loader ({workers} workers): {row['slowdown_pct']:+.1f} % vs resident", flush=True)
  return {"fed_step": rows}


def section_eval(context: Context) -> dict:
  import cases
  settings = context.settings
  rows = cases.evaluation_cases("omniglot conv4", context.config("omniglot"), warmup=1,
                                repeats=settings["eval_repeats"])
  if settings["koch_embed"]:
    rows += cases.evaluation_cases("omniglot_koch", context.config("omniglot_koch"), warmup=1, repeats=3,
                                   embed_limit=2048)
  for row in rows:
    print(f"  {row['case']}: {row['seconds_median']:.3f} s", flush=True)
  return {"evaluation": rows}


def section_scaling(context: Context) -> dict:
  """The main job's global batch over 1, 2, 4, 8 devices with each strategy, timed in turns (interleaved
  rounds). On CPU these are the XLA CPU devices this process created at its start (`main`), as a training run
  does (parallel.request_cpu_devices); 1 device is what training used before it split the CPU."""
  import jax
  import cases
  settings, rows = context.settings, []
  counts = [n for n in SCALING_DEVICES if n <= len(jax.devices())]
  for strategy in settings["scaling_strategies"]:
    labelled = [("omniglot (conv4, prototypical)",
                 context.config("omniglot", num_devices=n, strategy=strategy)) for n in counts]
    measured = cases.interleaved_step_cases(labelled, warmup=settings["warmup"], rounds=settings["scaling_repeats"],
                                            steps_per_repeat=settings["scaling_steps"],
                                            peak_gflops=context.peak_gflops)
    one = measured[0]
    for row in measured:
      row.update(config="omniglot", vs_one_device=one["step_seconds_median"] / row["step_seconds_median"])
      print(f"  scaling {strategy} x{row['devices']}: {row['items_per_s']:.0f} {row['item']}/s "
            f"({row['vs_one_device']:.2f}x one device)", flush=True)
    rows += measured
  return {"scaling": rows}


def section_backbones(context: Context) -> dict:
  """Each pretrained backbone's fine-tuning and frozen-features steps and its embedding speed, on RGB images
  (synthetic data of configs/folder_pretrained.py's shape; the weights do not change the speed)."""
  import cases
  settings, rows = context.settings, []
  for name in BACKBONES:
    config = backbone_config(context, name, settings["backbone_size"])
    for row in cases.backbone_cases(name, config, warmup=settings["warmup"], repeats=settings["repeats"],
                                    steps=settings["backbone_steps"], embed_images=settings["backbone_embed"],
                                    peak_gflops=context.peak_gflops):
      rows.append(row)
      print(f"  {row['case']}: {row['images_per_s']:.1f} images/s, {row.get('pct_of_peak', 0):.1f} % of peak",
            flush=True)
  return {"backbones": rows}


def backbone_config(context: Context, name: str, size: int):
  """configs/folder_pretrained.py with backbone `name` on synthetic RGB images of `size` pixels, random weights
  (the speed does not depend on them), nothing frozen: the `backbones` section's config and the peer's."""
  import cases
  config = cases.load_config("folder_pretrained", data_dir=None, cache_dir=context.args.cache_dir,
                             **{"model.name": name, "model.pretrained": "", "data.image_size": size,
                                "data.channels": 3, "data.synthetic_classes": 40, "sampling.batch_size": 32,
                                "eval.batch_size": 64})
  config.model = _backbone_model(config.model)
  return config


def _backbone_model(model_config):
  """The config's model fields on another backbone's defaults (each backbone takes the same fields)."""
  from siamese_jax import models
  fresh = models.default_config(model_config.name)
  for field in ("embedding_dim", "l2_normalize", "freeze_until"):
    fresh[field] = model_config[field]
  fresh.freeze_until = ""
  return fresh


def section_index(context: Context) -> dict:
  """Gallery index build time, search queries/s (k=10), peak resident memory and the approximate
  backend's recall@10, each case in a child process of this script (its own peak memory): galleries of
  clustered unit vectors of dimension 128, exact then usearch at each size, and one uniform gallery."""
  settings, rows = context.settings, []
  plans = [(size, "clustered") for size in settings["index_sizes"]]
  if INDEX_UNIFORM_SIZE in settings["index_sizes"]:
    plans.append((INDEX_UNIFORM_SIZE, "uniform"))
  with tempfile.TemporaryDirectory() as folder:
    for size, data in plans:
      exact_file = str(pathlib.Path(folder) / f"exact-{size}-{data}.npy")
      for backend in ("exact", "usearch"):
        queries = settings["index_queries"]
        if backend == "exact" and size >= 1_000_000:
          queries = settings["index_queries_1m_exact"]  # about 200 queries/s on 2 cores: keep it to seconds
        spec = {"num": size, "backend": backend, "data": data, "queries": queries,
                "query_pool": settings["index_queries"], "k": INDEX_K,
                "repeats": settings["index_repeats"], "exact_file": exact_file, "expansions": INDEX_EXPANSIONS}
        spec_path = pathlib.Path(folder) / "case.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--index-child", str(spec_path)],
                       check=True)
        for row in json.loads(spec_path.with_suffix(".out.json").read_text()):
          rows.append(row)
          recall = f", recall@10 {row['recall_at_k']:.3f}" if "recall_at_k" in row else ""
          built = f"build {row['build_seconds']:.1f} s, " if row["build_seconds"] is not None else ""
          print(f"  {row['case']}: {built}{row['queries_per_s']:.0f} queries/s{recall}, peak RSS "
                f"{row['max_rss_mb']:.0f} MB ({row['embeddings_mb']:.0f} MB of embeddings)", flush=True)
  return {"index": rows}


def section_peer(context: Context) -> dict:
  """The suite's train-step cases, evaluation's conv4 embedding and the suite's backbone embeddings (64x64 RGB,
  as the `backbones` section's config), each against the same work in PyTorch (benchmarks/torch_peer.py in a
  child process), timed in turns over rounds; skipped with a note where no Python with torch is found."""
  import cases
  import common
  args, settings = context.args, context.settings
  python, found = cases.find_torch_python(args.torch_python)
  print(f"  {found}", flush=True)
  if python is None:
    return {"peer_note": found}
  smoke = args.peer_smoke
  rounds = 1 if smoke else args.peer_rounds or settings["peer_rounds"]
  repeats = 1 if smoke else settings["peer_repeats"]
  peer = cases.TorchPeer(python, common.cpu_count())
  rows = []
  try:
    cases_run, backbones = settings["peer_cases"], settings["peer_backbones"]
    if args.peer_cases:
      named = args.peer_cases.split(",")
      # Koch's compiled variant is the full suite's only (its compilation and steps take minutes).
      cases_run = [(PEER_CASE_NAMES[name], ("eager",) if name == "koch" and args.quick else PEER_VARIANTS)
                   for name in named if name in PEER_CASE_NAMES]
      backbones = [PEER_BACKBONE_CASES[name] for name in named if name in PEER_BACKBONE_CASES]
    for index, variants in cases_run:
      label, name, overrides = TRAIN_CASES[index]
      config = context.config(name, **overrides)
      koch = name == "omniglot_koch"
      if smoke:
        config.sampling.batch_size = PEER_SMOKE_BATCH[config.sampling.kind]
      steps = 1 if smoke else settings["peer_koch_steps" if koch else "peer_conv_steps"]
      rows.append(cases.peer_train_case(label, config, peer, variants=variants, warmup=1,
                                        rounds=min(rounds, settings["peer_koch_rounds"]) if koch else rounds,
                                        repeats=repeats, steps_per_repeat=steps))
      print_peer_row(rows[-1])
    images = 256 if smoke else settings["peer_embed_images"] or 1 << 30
    rows.append(cases.peer_embed_case("omniglot conv4: embed test images", context.config("omniglot"), peer,
                                      variants=PEER_VARIANTS, rounds=rounds, repeats=repeats, max_images=images))
    print_peer_row(rows[-1])
    for name in backbones:
      config = backbone_config(context, name, PEER_BACKBONE_SIZE)
      rows.append(cases.peer_embed_case(f"{name} {PEER_BACKBONE_SIZE}px: embed synthetic RGB images", config, peer,
                                        variants=PEER_VARIANTS, rounds=rounds, repeats=repeats,
                                        max_images=64 if smoke else settings["peer_backbone_images"]))
      print_peer_row(rows[-1])
  finally:
    peer.close()
  return {"peer": rows, "peer_torch": peer.hello}


def print_peer_row(row: dict) -> None:
  shown = peer_display(row)
  ratios = ", ".join(f"JAX / {v} {shown[f'{v}_ratio_text']}" for v in PEER_VARIANTS if shown[f"{v}_ratio_text"])
  print(f"  peer {shown['case']}: {ratios or '-'}; parameters JAX, torch {shown.get('parameters_text', '-')}"
        + (f"; note: {row['note']}" if row.get("note") else ""), flush=True)


SECTIONS = {"peak": section_peak, "train": section_train, "loader": section_loader, "fed": section_fed,
            "eval": section_eval, "scaling": section_scaling, "backbones": section_backbones,
            "index": section_index, "peer": section_peer}


def main(args) -> None:
  started = time.perf_counter()
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # Grain worker processes fail until absl flags count as parsed
  suite = "quick" if args.quick else "full"

  if args.index_child:  # one gallery index case, alone in this process
    import cases
    spec_path = pathlib.Path(args.index_child)
    rows = cases.index_case(**json.loads(spec_path.read_text()))
    spec_path.with_suffix(".out.json").write_text(json.dumps(rows))
    return

  # Training on CPU splits the machine into devices (siamese_jax/parallel.py); the benchmark's process does the
  # same, before any JAX computation, with enough devices for the scaling table. Every case then runs on the
  # count training would use for its batch (cases.load_config). Harmless on GPU/TPU hosts.
  from siamese_jax import parallel
  parallel.request_cpu_devices(max(SCALING_DEVICES))
  import common
  import cases
  selected = set(args.only.split(",") if args.only else SUITES[suite]["sections"] or SECTIONS)
  unknown = selected - set(SECTIONS)
  if unknown:
    sys.exit(f"error: --only: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
  peer_names = [*PEER_CASE_NAMES, *PEER_BACKBONE_CASES]
  unknown_peer = set(args.peer_cases.split(",")) - set(peer_names) if args.peer_cases else set()
  if unknown_peer:
    sys.exit(f"error: --peer-cases: unknown {sorted(unknown_peer)}; choose from {peer_names}")
  selected.add("peak")  # every pct_of_peak of this run divides by the peak measured in it
  context = Context(args, SUITES[suite], None if args.synthetic else cases.find_omniglot_dir())
  machine = common.machine_info()
  if args.machine:
    machine["machine"] = args.machine
  data = (f"omniglot from {context.data_dir}" if context.data_dir else
          "synthetic (--synthetic)" if args.synthetic else "synthetic (no Omniglot found)")
  results = {"suite": suite, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "machine": machine, "data": data,
             "command": " ".join([pathlib.Path(sys.executable).name] + sys.argv),
             "section_seconds": {"startup": time.perf_counter() - started}}
  results["load_average_start"] = os.getloadavg()
  print(f"{machine['machine']}: {machine['device_count']} x {machine['device_kind']}, {suite} suite, "
        f"data: {data}", flush=True)
  if os.getloadavg()[0] > 0.5 * common.cpu_count():
    print(f"warning: load average {os.getloadavg()[0]:.1f} on {common.cpu_count()} cores: other processes are "
          "running, and the numbers will be low and noisy", flush=True)
  for name, section in SECTIONS.items():
    if name in selected:
      section_started = time.perf_counter()
      results.update(section(context))
      results["section_seconds"][name] = time.perf_counter() - section_started

  matmul_end = measure_peak(context)
  results["matmul_end"] = matmul_end
  print(f"matmul peak again: {matmul_end['gflops_best']:.0f} GFLOP/s", flush=True)
  rescale_to_peak(results, max(context.peak_gflops, matmul_end["gflops_best"]))
  results["load_average_end"] = os.getloadavg()
  results["targets"] = check_targets(results)
  results["total_seconds"] = time.perf_counter() - started
  results["process_max_rss_mb"] = common.process_max_rss_mb()
  # A partial run (--only) never overwrites the suite's file.
  out = pathlib.Path(args.out) / (f"{machine['machine']}.json" if not args.only else
                                  f"{machine['machine']}-partial.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print()
  print(report_tables(results))
  print(f"\n{suite} suite: {results['total_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":  # Grain spawns worker processes, which re-import this file
  main(parse_args())
