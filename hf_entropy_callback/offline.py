"""Failing fast, with a useful message, when a hub id or URL is used without network access."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUB_HOST = "huggingface.co"


def _env_offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host:port` opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be used (not forced offline and reachable)."""
    return not _env_offline() and host_reachable(HUB_HOST, timeout=timeout)


def require_hub(what: str, hint: str) -> None:
    """Raise `ConnectionError` at once when `what` needs the hub and the hub cannot be reached."""
    if not hub_reachable():
        raise ConnectionError(f"{what} needs the Hugging Face hub, which cannot be reached (offline?). {hint}")


def require_url(url: str, hint: str) -> None:
    """Raise `ConnectionError` at once when the host of `url` cannot be reached."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not parsed.hostname or not host_reachable(parsed.hostname, port):
        raise ConnectionError(f"{url} cannot be reached (offline?). {hint}")
