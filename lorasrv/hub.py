"""Resolve a model or adapter source (local folder or Hugging Face Hub id) to a local folder.

Pure: stdlib and huggingface_hub only, no torch (the engine imports it too). Never runs remote code.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

_TRUE = frozenset({"1", "true", "yes", "on"})


def is_offline() -> bool:
    """`HF_HUB_OFFLINE`, read at call time (huggingface_hub reads its constants at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """The Hub cache the environment names now; None lets huggingface_hub use its default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(var):
            return value
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return None


def _looks_like_path(path_or_id: str) -> bool:
    # A Hub id is `name` or `org/name`; anything else can only be a local path.
    return (
        path_or_id.startswith((".", "/", "~", os.sep))
        or path_or_id.count("/") > 1
        or (os.altsep is not None and os.altsep in path_or_id)
    )


def resolve_path(
    path_or_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None
) -> str:
    """A local directory as is, else a Hub id resolved through the cache (or downloaded).

    With `HF_HUB_OFFLINE=1` only the cache is consulted. Raises FileNotFoundError naming the id.
    """
    expanded = os.path.expanduser(path_or_id)
    if os.path.isdir(expanded):
        return expanded
    if _looks_like_path(path_or_id):
        raise FileNotFoundError(f"{path_or_id!r}: no such local directory")
    offline = is_offline()
    where = "in the local Hub cache (HF_HUB_OFFLINE=1)" if offline else "locally or on the Hub"
    at_revision = f" at revision {revision!r}" if revision else ""
    try:
        resolved = snapshot_download(
            path_or_id,
            revision=revision,
            allow_patterns=allow_patterns,
            cache_dir=hub_cache_dir(),
            local_files_only=offline,
        )
    except HFValidationError:
        raise FileNotFoundError(
            f"{path_or_id!r}: not a local directory and not a valid Hugging Face Hub id"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FileNotFoundError(
            f"{path_or_id!r}{at_revision}: not found {where}: {type(exc).__name__}"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        # LocalEntryNotFoundError also covers "network unreachable and nothing cached".
        raise FileNotFoundError(
            f"{path_or_id!r}{at_revision}: could not be resolved {where}: {exc}"
        ) from None
    if not isinstance(resolved, str):  # only a dry run returns file infos
        raise FileNotFoundError(f"{path_or_id!r}: unexpected snapshot_download result")
    return resolved
