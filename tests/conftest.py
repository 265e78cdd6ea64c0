"""Shared fixtures. Tiny models are built from configs in code, never downloaded."""

from __future__ import annotations
