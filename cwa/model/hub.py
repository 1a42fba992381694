"""Whether the Hugging Face Hub can be reached, found out once per process with one short TCP connection.

huggingface_hub retries an unreachable endpoint for about 45 s and logs every retry, and a launched run
does that in every process; :func:`check_hub` says it in one sentence instead, before any of that starts.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

from cwa.common.errors import CwaError

HUB_PROBE_S = 5.0
"""How long the reachability probe of the hub waits: huggingface_hub's own retries take about 45 s."""
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: set[str] = set()
"""Endpoints this process has reached: each is probed once, however many models and tokenizers it loads."""


def check_hub(pretrained: str) -> None:
    """Refuse a hub name in one sentence when the hub's endpoint does not accept a TCP connection.

    Nothing is checked for a local directory, the embedded models or a proxy (the direct connection says
    nothing then); with ``HF_HUB_OFFLINE`` only whether the Hugging Face cache holds the model's config.

    Args:
        pretrained: the model as given (``model.pretrained``, or a run's ``config.yaml``).
    """
    from huggingface_hub import constants

    if not _hub_name(pretrained):
        return
    if constants.HF_HUB_OFFLINE:
        if not _cached(pretrained):  # said here once, not by every process a launched run starts
            raise CwaError(
                f"cannot fetch '{pretrained}': the Hugging Face Hub is unreachable from here (HF_HUB_OFFLINE is set); "
                f"download the model where the hub is reachable (e.g. `hf download {pretrained} --local-dir DIR`) "
                "and pass that directory instead."
            )
        return
    reason = unreachable()
    if reason is not None:
        advice = (
            "set HF_HUB_OFFLINE=1 to use the copy in your Hugging Face cache"
            if _cached(pretrained)
            else f"download the model where the hub is reachable (e.g. `hf download {pretrained} --local-dir DIR`) "
            "and pass that directory instead"
        )
        raise CwaError(
            f"cannot fetch '{pretrained}': the Hugging Face Hub at {constants.ENDPOINT} is unreachable from here "
            f"({reason}); {advice}."
        )


def unreachable() -> str | None:
    """Why the hub's endpoint does not accept a TCP connection within ``HUB_PROBE_S`` (None: it does, or a
    proxy is set, which the direct connection says nothing about). Probed once per endpoint and process."""
    from huggingface_hub import constants

    if constants.ENDPOINT in _reachable or any(os.environ.get(p) for p in PROXIES):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((_address(endpoint.hostname, port), port), timeout=HUB_PROBE_S).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    _reachable.add(constants.ENDPOINT)
    return None


def _hub_name(name: str) -> bool:
    """Whether ``name`` is fetched from the hub: not empty, not an embedded model, not an existing path, and a
    repository id (a malformed path is refused by the load that follows, in its own sentence)."""
    from pathlib import Path

    from cwa.model.loading import is_embedded, resolve_model_path

    if not name or is_embedded(name) or Path(name).expanduser().exists():
        return False
    try:
        return resolve_model_path(name) == name
    except CwaError:
        return False


def _cached(pretrained: str) -> bool:
    """Whether the Hugging Face cache holds the model's ``config.json`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(pretrained, "config.json"), str)
    except Exception:  # a name the cache cannot hold (not a repository id): transformers says what is wrong
        return True


def _address(host: str, port: int) -> str:
    """``host``'s first address, looked up in a thread so that a resolver that never answers costs
    ``HUB_PROBE_S`` too (the connection's own timeout does not cover the name lookup)."""
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_S)
    if not found:
        raise TimeoutError(f"no answer to the name lookup of {host} in {HUB_PROBE_S:.0f} s")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]
