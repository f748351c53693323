"""The errors a user can cause, as one small family.

The CLI maps them to exit code 2, the Label Studio backend to HTTP 4xx and the FiftyOne plugin
to an operator error; anything else is a bug and keeps its traceback.
"""


class XMemLabelError(Exception):
    """Base class: a problem the user can fix, with a one-line message saying what it is."""


class InputError(XMemLabelError, ValueError):
    """Bad frames, masks or arguments (missing file, undecodable video, empty keyframe, ...)."""


class WeightsError(XMemLabelError):
    """Weights that cannot be found, downloaded, verified or loaded."""


def one_line(error: BaseException) -> str:
    """An error as one line for a person: its message with white space folded, or its type
    when it has none."""
    return " ".join(str(error).split()) or type(error).__name__
