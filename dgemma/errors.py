"""The one base class of user-facing errors.

An error that derives from DgemmaError is something the user can fix (a flag, a file, a request): the CLI prints
its message as one line and exits with status 2. Anything else is a bug in dgemma and shows its traceback. This
module imports nothing, so the lowest layers (config, tokenizer, checkpoint) can derive from it."""


class DgemmaError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it can, what to do."""


def one_line(err: BaseException, with_type: bool = True) -> str:
    """An exception as one line of text for a user-facing message, led by its type unless `with_type` is False."""
    text = " ".join(str(err).split())
    if not with_type:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
