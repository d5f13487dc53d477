"""One error type for every bad input.

A `SoupError` carries a one-line message that names the culprit (file, tensor, model, config key).
The CLI prints it as `souplm: error: ...` and exits with status 2; library callers can catch it.
"""


class SoupError(Exception):
    """A user-facing error: bad input, bad config, or an unmet precondition."""

    def __init__(self, message: str):
        # Keep it one line: multi-line messages get folded so the CLI output stays greppable.
        super().__init__(" ".join(str(message).split()))
