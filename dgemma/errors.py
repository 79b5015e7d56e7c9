"""The one base class of user-facing errors.

An error that derives from DgemmaError is something the user can fix (a flag, a file, a request): the CLI prints
its message as one line and exits with status 2. Anything else is a bug in dgemma and shows its traceback. This
module imports nothing, so the lowest layers (config, tokenizer, checkpoint) can derive from it."""


class DgemmaError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it can, what to do."""
