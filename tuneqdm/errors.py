"""One exception type for every user-facing failure: a single line saying what was wrong and what to do."""


class TuneQDMError(ValueError):
    """A problem with the user's input, files or configuration (never a bug in tuneqdm)."""


class TuneQDMWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one line)."""
