"""The one exception type for mistakes a user can fix: the CLI prints it as a single line, exit code 2."""


class UserError(Exception):
    """Bad input (recipe, file, data, checkpoint). The message names the key path or file and a fix."""
