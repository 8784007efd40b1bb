"""Hub datasets without a network: find out once whether the Hub answers, and if not, make `datasets` go
straight to its local cache instead of retrying every file for half a minute."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from functools import lru_cache

from linearize.sources import offline_flag

PROBE_TIMEOUT_S = 3.0


@lru_cache(maxsize=1)
def _probe(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except (OSError, ValueError):
        return False
    return True


def hub_reachable() -> bool:
    """False when the user said offline (`linearize.sources.offline_flag`) or the Hub endpoint does not answer within 3 s."""
    if offline_flag():
        return False
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"))


@contextmanager
def offline_datasets(enabled: bool = True):
    """Inside: `datasets` and `huggingface_hub` read only their caches (they copy the flags at import, so the
    module attributes are set too, and everything is put back afterwards)."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in saved_env})
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def download_hint(dataset: str, name: str | None = None, split: str | None = None) -> str:
    """How to get a Hub dataset into the cache, as one shell command."""
    import datasets.config

    config = (f", {name!r}" if name else "") + (f", split={split!r}" if split else "")
    return (
        f"run once with network, or pre-download it into the datasets cache ({datasets.config.HF_DATASETS_CACHE}) with "
        f"python -c \"import datasets; datasets.load_dataset({dataset!r}{config})\""
    )
