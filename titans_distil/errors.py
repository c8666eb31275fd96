"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """A problem with what the user asked for; the message names the problem and the fix."""
