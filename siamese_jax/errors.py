"""The one exception type for user mistakes.

Anything the user can fix (a path, a config field, a dataset) raises `UserError` with a message that
names the file or field and what was expected. `launch.py` prints it without a traceback and exits 2.
"""


class UserError(Exception):
  """A problem with the user's input (data, config, checkpoint) and how to fix it."""
