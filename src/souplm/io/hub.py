"""Model references that are Hugging Face Hub ids (`org/name`, optionally `org/name@revision`).

A reference that names an existing local path is always that path. Otherwise an `org/name` reference is
fetched through huggingface_hub: from the local cache only when offline (`HF_HUB_OFFLINE=1`), otherwise
downloaded (huggingface_hub itself falls back to the cache when the network is unreachable). The cache is
huggingface_hub's own (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), read when the
reference is resolved, so a test or a user can point it elsewhere at any time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SoupError

# Hub repo ids: one namespace, one name; letters, digits, '-', '_', '.'; an optional @revision.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_TRUE = {"1", "on", "yes", "true"}


def hub_id(reference: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `reference` is a Hub id and no such local path exists, else None."""
    text = str(reference)
    if Path(text).exists() or text.startswith((".", "/", "~")):
        return None
    m = _HUB_ID.match(text)
    if m is None or ".." in text:
        return None
    return m["repo"], m["rev"]


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def resolve_model(reference: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """A local directory for `reference`: the path itself, or the Hub snapshot it names."""
    found = hub_id(reference)
    if found is None:
        return Path(reference)
    repo, revision = found
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise SoupError(f"model not found: {reference} (and huggingface_hub is not installed to fetch it)") from None
    patterns = _FILES + (["*.bin", "*.pt", "*.pth"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), allow_patterns=patterns,
                                      local_files_only=offline()))
    except LocalEntryNotFoundError:
        how = "offline (HF_HUB_OFFLINE is set)" if offline() else "the Hub is unreachable"
        raise SoupError(f"model not found: {reference} is neither a local path nor in the Hub cache "
                        f"{cache_dir()}, and {how}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # missing, gated, bad revision, network: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SoupError(f"model not found: {reference} is not a local path, and the Hub says: {first}") from None
