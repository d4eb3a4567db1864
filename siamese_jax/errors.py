"""The one exception type for user mistakes.

Anything the user can fix (a path, a config field, a dataset) raises `UserError` with a message that
names the file or field and what was expected. `launch.py` prints it without a traceback and exits 2.
"""

import importlib


class UserError(Exception):
  """A problem with the user's input (data, config, checkpoint) and how to fix it."""


def optional_import(module: str, extra: str, purpose: str):
  """`module`, a package of one of the optional extras in pyproject.toml; a UserError naming the extra to
  install when it is missing (e.g. `optional_import("sklearn.manifold", "plots", "--mode=plots' t-SNE")`)."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise UserError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                    f"pip install 'siamese-jax[{extra}]'") from error
