"""Download a T5 checkpoint from the Hugging Face Hub: only the files the converter reads.

Offline, it fails within seconds (a short reachability probe comes first, since the Hub client
waits much longer on a silent network) unless the files are already in the local Hub cache.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from engine.errors import ModelError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
# Used only when a repository has no safetensors weights.
TORCH_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and ".." not in source


def hub_reachable(timeout_s: float) -> bool:
    """True when a TCP connection to the Hub endpoint (HF_ENDPOINT) opens within ``timeout_s``."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _unreachable_message(repo_id: str) -> str:
    from huggingface_hub import constants

    return (
        f"cannot download {repo_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
        "and the model is not in the local Hub cache. On a machine without internet, copy the "
        "checkpoint folder (config.json, model.safetensors, spiece.model) here and run "
        "`engine convert PATH/TO/FOLDER --output DIR`, or build a random-weight model with "
        "`engine demo-model --output DIR`"
    )


def download(repo_id: str, *, timeout_s: float = 5.0) -> Path:
    """The local folder of ``repo_id``'s files (downloaded, or from the Hub cache when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    online = not constants.HF_HUB_OFFLINE and hub_reachable(timeout_s)
    if not online:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise ModelError(_unreachable_message(repo_id)) from None
    print(f"[engine] downloading {repo_id} from {constants.ENDPOINT}", file=sys.stderr, flush=True)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, etag_timeout=timeout_s))
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                snapshot_download(
                    repo_id, allow_patterns=ALLOW_PATTERNS + TORCH_PATTERNS, etag_timeout=timeout_s
                )
            )
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id!r} is neither a local folder nor a model on the Hugging Face Hub "
            "(private repositories need `huggingface-cli login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelError(_unreachable_message(repo_id)) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"downloading {repo_id!r} from the Hugging Face Hub failed: {exc}") from exc
    return folder
