"""One exception type for every user-facing failure: a single line saying what was wrong and what to do."""


def either(choices) -> str:
    """The choices of a setting as an error message names them: ``either((2, 4, 8)) == "2, 4 or 8"``."""
    words = [str(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


class TuneQDMError(ValueError):
    """A problem with the user's input, files or configuration (never a bug in tuneqdm)."""


class TuneQDMWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one line)."""


class TrainWarning(UserWarning):
    """A problem with the training data that tuneqdm worked around (printed as one line)."""
