"""Where msa_edit keeps what it builds once and reuses: tiny MoEs trained from text, GGUF files
made plain, benchmark tables. `$MSA_EDIT_CACHE`, default `~/.cache/msa_edit`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MSA_EDIT_CACHE"
"""Environment variable naming the cache folder."""


def cache_dir() -> Path:
    """Where built artefacts are cached: `$MSA_EDIT_CACHE`, default `~/.cache/msa_edit`.

    >>> import os
    >>> os.environ[CACHE_ENV] = "/tmp/c"; str(cache_dir()); del os.environ[CACHE_ENV]
    '/tmp/c'
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "msa_edit")
