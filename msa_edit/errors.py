"""The one error type users see: a single line naming the problem and the fix."""

from __future__ import annotations


class MsaEditError(ValueError):
    """Bad input or an impossible request; the message names the problem and the fix.

    >>> str(MsaEditError("budget=3 is too small; raise it"))
    'budget=3 is too small; raise it'
    """
