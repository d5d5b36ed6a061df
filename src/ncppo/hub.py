"""Hugging Face Hub ids that cannot be fetched fail at once, not after a minute of retries.

huggingface_hub retries a failed connection five times with backoff (~30 s a file): offline,
`ncppo score --scorer pickscore` took 64 s and `ncppo sample --model org/name` 64 s to fail.
`unreachable()` asks the Hub once per process (one HEAD, 3 s timeout, through huggingface_hub's own
client, so HF_ENDPOINT and proxies apply). When it gets no answer it puts huggingface_hub in offline
mode, as HF_HUB_OFFLINE=1 does: what is cached still loads, anything else fails at once, and the
callers word that failure with `offline_message`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import InputError, first_line

PROBE_TIMEOUT_S = 3.0
_reason: str | None | bool = False  # False until probed


def unreachable() -> str | None:
    """Why the Hub cannot be reached ("HF_HUB_OFFLINE is set", "no answer from https://huggingface.co:
    ..."), or None when it answers. Probes once per process; an unreachable Hub switches
    huggingface_hub (and datasets) to offline mode for the rest of it."""
    global _reason
    if _reason is False:
        _reason = _probe()
        if _reason is not None:
            _go_offline()
    return _reason


def _probe() -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)  # any HTTP answer will do
    except Exception as err:  # connection refused, no DNS, timeout, proxy or TLS failure
        return f"no answer from {constants.ENDPOINT}: {first_line(err)}"
    return None


def _go_offline() -> None:
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # libraries imported later and child processes (DataLoader, accelerate)
    constants.HF_HUB_OFFLINE = True  # huggingface_hub's client refuses every request from now on
    if "datasets.config" in sys.modules:  # datasets copies the flag at import
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def offline_message(what: str, local: str = "a local folder") -> str | None:
    """"<what>: not <local>, and the Hugging Face Hub cannot be reached to load it as a hub id (<reason>)"
    when the Hub is unreachable, else None."""
    reason = unreachable()
    if reason is None:
        return None
    return f"{what}: not {local}, and the Hugging Face Hub cannot be reached to load it as a hub id ({reason})"


def check_hub_id(name: str, what: str, *, local: str = "a local folder") -> None:
    """For a model hub id `name` about to be loaded: raise InputError at once when the Hub cannot be
    reached and nothing of that repository is in the local cache (what is, the library loads or
    refuses at once in offline mode)."""
    message = offline_message(what, local)
    if message is None:
        return
    from huggingface_hub import constants

    if not (Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots").is_dir():
        raise InputError(message)
