"""siamese-jax: Siamese and metric-learning training in JAX/Flax.

  import siamese_jax
  model = siamese_jax.train("omniglot:smoke", "runs/smoke")   # or siamese_jax.load("runs/smoke")
  model.compare("a.png", "b.png")

The public names (`__all__`) load on first use, so `import siamese_jax.serving` (an exported model, with
only jax and numpy) does not import the training code. docs/python.md documents them.
"""

import importlib
import os

__version__ = "0.1.0"

# XLA:CPU's YNNPACK convolution fusions are slow for these networks on CPU (docs/architecture.md); an
# empty fusion type turns them off. Set here, before JAX starts its CPU backend, for every entry point
# (launch.py, the Python API, tests). A user's own setting of that flag wins.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=".strip()

_PUBLIC = {  # name -> "module" that defines it, or "module:name" there
    "train": "siamese_jax.api", "run_training": "siamese_jax.api", "get_config": "siamese_jax.api",
    "config_names": "siamese_jax.api", "load": "siamese_jax.trained", "TrainedModel": "siamese_jax.trained",
    "ExportedModel": "siamese_jax.trained", "Comparison": "siamese_jax.trained",
    "GalleryIndex": "siamese_jax.index", "load_artifact": "siamese_jax.serving",
    "evaluate": "siamese_jax.modes.evaluate:evaluate_workdir",
    "calibrate": "siamese_jax.modes.evaluate:calibrate_workdir",
    "export_model": "siamese_jax.modes.export_model:export_model_workdir",
    "UserError": "siamese_jax.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'siamese_jax' has no attribute {name!r}")
  module, _, attribute = _PUBLIC[name].partition(":")
  value = getattr(importlib.import_module(module), attribute or name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
