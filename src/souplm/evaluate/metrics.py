"""Pure metric functions: answer normalisation and extraction, accuracy, perplexity, bits per byte.

Nothing here touches a model, so every function can be checked on hand-made cases.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

# A number as people write it in answers: optional sign, thousands commas, optional decimals.
# The comma group requires exactly three digits so "1,2" in a list does not become 12.
_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+−]?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_number(token: str) -> str:
    """Canonical spelling of a number: no commas, no '+', no trailing zeros, '3.0' -> '3'."""
    token = token.replace(",", "").replace("−", "-").lstrip("+")
    try:
        value = float(token)
    except ValueError:
        return token
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def extract_number(text: str) -> str | None:
    """The answer number of a GSM8K-style completion, normalised, or None when there is none.

    The first number after the last `####` wins (the GSM8K convention); without `####`, the last
    number in the text (models state the result at the end of their reasoning).
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(tail)
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


_FRACTION = re.compile(r"(?<![\w.])([-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*/\s*(\d+)(?!\w|\.\d)")


def extract_math(text: str) -> str | None:
    """First number or fraction ("-3/4") on the first line: short arithmetic answers.

    A fraction keeps its form (only the numerator's sign and commas are normalised), so "6/8" does not
    equal "3/4": the task asks for the answer as the data writes it.
    """
    line = first_line(text)
    frac = _FRACTION.search(line)
    num = _NUMBER.search(line)
    if frac and (num is None or frac.start() <= num.start()):
        return f"{normalize_number(frac.group(1))}/{int(frac.group(2))}"
    return normalize_number(num.group(0)) if num else None


def first_line(text: str) -> str:
    """The first non-empty line: short-answer models often keep talking after the answer."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def same_number(prediction: str | None, gold: str | None) -> float:
    """1.0 when two extracted answers are equal as written: signs and decimal points matter."""
    return float(prediction is not None and gold is not None and prediction == gold)


def exact_match(prediction: str | None, gold: str | None) -> float:
    """1.0 when both normalise to the same non-empty string; a missing prediction never matches."""
    if prediction is None or gold is None:
        return 0.0
    p, g = normalize_text(prediction), normalize_text(gold)
    return float(bool(g) and p == g)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first, like numpy."""
    if not values:
        raise ValueError("argmax of an empty sequence")
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_correct(logliks: Sequence[float], gold: int) -> float:
    """1.0 when the highest log-likelihood choice is the gold one."""
    return float(argmax(logliks) == gold)


def choice_correct_norm(logliks: Sequence[float], lengths: Sequence[int], gold: int) -> float:
    """Like `choice_correct`, with each log-likelihood divided by its continuation's length in bytes.

    Byte length (as lm-evaluation-harness does) does not depend on the tokenizer, so acc_norm is
    comparable across models with different vocabularies.
    """
    normed = [ll / max(n, 1) for ll, n in zip(logliks, lengths, strict=True)]
    return float(argmax(normed) == gold)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Token perplexity exp(mean negative log-likelihood in nats)."""
    return float(math.exp(total_nll / n_tokens)) if n_tokens else float("nan")


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total negative log-likelihood in bits divided by UTF-8 bytes: comparable across tokenizers."""
    return float(total_nll / (math.log(2) * n_bytes)) if n_bytes else float("nan")


# -- lm-evaluation-harness's definitions (docs/EVALUATION.md puts each next to souplm's) ---------------


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word_perplexity: pieces of a split on runs of whitespace."""
    return len(re.split(r"\s+", text))


def word_perplexity(total_nll: float, n_words: int) -> float:
    """lm-eval's word_perplexity: exp(total NLL in nats / words)."""
    return float(math.exp(total_nll / n_words)) if n_words else float("nan")


def byte_perplexity(total_nll: float, n_bytes: int) -> float:
    """lm-eval's byte_perplexity: exp(total NLL in nats / UTF-8 bytes)."""
    return float(math.exp(total_nll / n_bytes)) if n_bytes else float("nan")


def lm_eval_request(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's HF model moves the context's trailing whitespace to the continuation's start."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def choice_correct_norm_chars(logliks: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """lm-eval's acc_norm: log-likelihoods divided by each choice's length in characters (the choice as
    the task lists it, without the target delimiter)."""
    normed = [ll / max(len(c), 1) for ll, c in zip(logliks, choices, strict=True)]
    return float(argmax(normed) == gold)
