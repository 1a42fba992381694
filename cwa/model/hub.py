"""Whether the Hugging Face Hub can be reached, found out once per process with one short TCP connection.

huggingface_hub retries an unreachable endpoint for about 45 s and logs every retry, and a launched run
does that in every process; :func:`check_hub` says it in one sentence instead, before any of that starts.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from cwa.common.errors import CwaError

HUB_PROBE_S = 5.0
"""How long the reachability probe of the hub waits: huggingface_hub's own retries take about 45 s."""
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: set[str] = set()
"""Endpoints this process has reached: each is probed once, however many models and tokenizers it loads."""


def check_hub(pretrained: str) -> None:
    """Refuse a hub name in one sentence when the hub's endpoint does not accept a TCP connection.

    Nothing is checked for a local directory, the embedded models, ``HF_HUB_OFFLINE`` (transformers then
    fails at once where the cache lacks the model) or a proxy (the direct connection says nothing then).

    Args:
        pretrained: the model as given (``model.pretrained``, or a run's ``config.yaml``).
    """
    from huggingface_hub import constants

    from cwa.model.loading import resolve_model_path

    if not pretrained or constants.HF_HUB_OFFLINE or any(os.environ.get(p) for p in PROXIES):
        return
    if constants.ENDPOINT in _reachable or resolve_model_path(pretrained) != pretrained:
        return
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError as exc:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(pretrained, "config.json"), str)
        advice = (
            "set HF_HUB_OFFLINE=1 to use the copy in your Hugging Face cache"
            if cached
            else f"download the model where the hub is reachable (e.g. `hf download {pretrained} --local-dir DIR`) "
            "and pass that directory instead"
        )
        reason = exc.strerror or type(exc).__name__
        raise CwaError(
            f"cannot fetch '{pretrained}': the Hugging Face Hub at {constants.ENDPOINT} is unreachable from here "
            f"({reason}); {advice}."
        ) from None
    _reachable.add(constants.ENDPOINT)
