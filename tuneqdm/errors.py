"""One exception type for every user-facing failure: a single line saying what was wrong and what to do."""


class TuneQDMError(ValueError):
    """A problem with the user's input, files or configuration (never a bug in tuneqdm)."""
