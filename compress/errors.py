"""The one exception a user should ever see: a short message naming the file, key or value at fault.

The CLI prints it on one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class CompressError(Exception):
    """Bad input (recipe, file, model, data): the message says what is wrong and what was expected."""
