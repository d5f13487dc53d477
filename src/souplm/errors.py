"""One error type for every bad input.

A `SoupError` carries a one-line message that names the culprit (file, tensor, model, config key).
The CLI prints it as `souplm: error: ...` and exits with status 2; library callers can catch it.
"""


class SoupError(Exception):
    """A user-facing error: bad input, bad config, or an unmet precondition."""

    def __init__(self, message: str):
        # Keep it one line: multi-line messages get folded so the CLI output stays greppable.
        super().__init__(" ".join(str(message).split()))


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to at most `limit` characters, for echoing user values in error messages.

    A config value can be arbitrarily large (or, from a YAML alias bomb, exponentially large when
    expanded); an error message must stay one short line whatever it echoes. Containers are summarised
    without formatting their whole contents."""
    if isinstance(value, (dict, list, tuple, set, frozenset)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value) if not isinstance(value, (dict, list, tuple)) else _bounded_repr(value, limit)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_repr(value: object, limit: int, depth: int = 0) -> str:
    """repr of a small container, giving up (with '...') before the text passes `limit` or depth 4."""
    if depth > 4:
        return "..."
    if isinstance(value, dict):
        parts, opener, closer = ((f"{_bounded_repr(k, limit, depth + 1)}: {_bounded_repr(v, limit, depth + 1)}"
                                  for k, v in value.items()), "{", "}")
    elif isinstance(value, (list, tuple)):
        parts, opener, closer = ((_bounded_repr(v, limit, depth + 1) for v in value),
                                 "[" if isinstance(value, list) else "(", "]" if isinstance(value, list) else ")")
    else:
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    out: list[str] = []
    size = 0
    for part in parts:
        out.append(part)
        size += len(part) + 2
        if size > limit:
            out.append("...")
            break
    return opener + ", ".join(out) + closer


def input_not_finite(tensor: str, model) -> SoupError:
    """The one message for an input tensor holding NaN or Inf (every executor and path raises this)."""
    return SoupError(f"tensor {tensor} of model {model} contains NaN or Inf")


def output_not_finite(out_name: str, dtype_name: str) -> SoupError:
    """The one message for finite inputs whose merged value is not finite (overflow or the final cast)."""
    return SoupError(f"output tensor {out_name} would hold Inf or NaN although its inputs are finite "
                     f"(the merge overflows {dtype_name}); nothing was written: use a wider dtype or smaller weights")
