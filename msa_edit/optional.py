"""Optional dependencies: whether one is installed (without importing it), and one line saying
what needs it and how to install it.

>>> print(missing("gguf", "reading GGUF files"))  # doctest: +ELLIPSIS
reading GGUF files needs gguf, which is not installed; pip install -e '.[gguf]' in a clone ...
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from msa_edit.errors import MsaEditError

EXTRAS = {"bitsandbytes": "quant", "lm_eval": "lm-eval", "ray": "ray", "gguf": "gguf"}
"""Module -> the `pyproject.toml` extra that installs it."""
_DISTRIBUTIONS = {"lm_eval": "lm-eval"}
"""Module -> its PyPI name, where the two differ."""


def available(module: str) -> bool:
    """Whether `module` can be imported (checked without importing it)."""
    return importlib.util.find_spec(module) is not None


def missing(module: str, purpose: str) -> str:
    """The one-line message for `purpose` (e.g. "4-bit loading") lacking `module`."""
    dist = _DISTRIBUTIONS.get(module, module)
    return (
        f"{purpose} needs {dist}, which is not installed; "
        f"pip install -e '.[{EXTRAS[module]}]' in a clone (or pip install {dist})"
    )


def require(module: str, purpose: str) -> ModuleType:
    """`module`, imported; raises `MsaEditError` with `missing`'s line when it is not installed."""
    if not available(module):
        raise MsaEditError(missing(module, purpose))
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MsaEditError(missing(module, purpose)) from None
