"""The one exception type for mistakes a user can fix: the CLI prints it as a single line, exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class UserError(Exception):
    """Bad input (recipe, file, data, checkpoint). The message names the key path or file and a fix."""
