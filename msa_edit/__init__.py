"""msa_edit: find which units of a model produce a behaviour (MSA Shapley modes) and edit them."""

from __future__ import annotations

__version__ = "0.1.0"
