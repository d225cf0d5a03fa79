"""The one exception type users see.

Every problem with user input (a missing file, a bad YAML, an image without a WCS that must have one) raises
:class:`SkyfmError` with one sentence that names the problem. The command line prints that sentence and exits
non-zero without a traceback; library users can catch it.
"""


class SkyfmError(Exception):
    """A problem with the user's input or configuration, explained in one line."""
