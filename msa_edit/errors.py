"""The one error type users see: a single line naming the problem and the fix."""

from __future__ import annotations

import reprlib


class MsaEditError(ValueError):
    """Bad input or an impossible request; the message names the problem and the fix.

    >>> str(MsaEditError("budget=3 is too small; raise it"))
    'budget=3 is too small; raise it'
    """


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 4, 4, 2


def short(value: object) -> str:
    """A bounded `repr` of user input for an error line (long strings and containers cut).

    >>> short("x" * 1000)[:10], len(short("x" * 1000)) < 100
    ("'xxxxxxxxx", True)
    """
    return _REPR.repr(value)
