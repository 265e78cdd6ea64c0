"""The one home for Hugging Face Hub calls: push an exported model, with timeouts and no leaks.

``push_to_hub`` uploads a directory written by ``export.export_model`` with
``huggingface_hub.HfApi``. Every HTTP call it makes has connect/read/write/pool timeouts
(``hub_timeouts``), timeouts and connection errors are retried a bounded number of times, and every
error is one ``MsaEditError`` line. The token is only ever handed to ``HfApi``: it is never printed,
logged or written, and ``scrub`` masks it (and anything that looks like it) in every error text.

Example (masking needs no network)::

    >>> token = "hf_abcdefgh12345678"
    >>> scrub("401 for Bearer hf_abcdefgh12345678 (HF_ABCDEFGH1234 upper-cased)", token)
    '401 for Bearer *** (*** upper-cased)'
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token, set_client_factory
from huggingface_hub.utils import HFValidationError, validate_repo_id
from huggingface_hub.utils import _http as hub_http

from msa_edit.errors import MsaEditError, short

__all__ = ["hub_timeouts", "push_to_hub", "scrub"]

log = logging.getLogger(__name__)

MASK = "***"
MIN_SECRET_PART = 8
"""Any run of this many characters of the token (or of its base64) is masked."""
BACKOFF_S = (0.5, 2.0, 5.0)
"""Pause before retry 1, 2, 3...; the last value repeats."""
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")
_FACTORY_LOCK = threading.RLock()
_BASE64 = (base64.b64encode, base64.urlsafe_b64encode)


# --------------------------------------------------------------------------- push


def push_to_hub(
    out_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Upload model edited with msa-edit",
    token: str | None = None,
    endpoint: str | None = None,
    timeout: float = 60.0,
    retries: int = 2,
) -> str:
    """Create ``repo_id`` (if missing) and upload the exported directory; returns the commit URL.

    ``repo_id`` must be ``namespace/name``; it is checked before anything else, so a bad id never
    reaches the network. The token comes from ``token``, else ``HF_TOKEN`` or the saved login
    (``huggingface_hub.get_token``). ``endpoint`` (else ``HF_ENDPOINT``, else the public Hub)
    lets it target another server, e.g. a local one.

    Every HTTP request gets ``timeout`` seconds to connect, to send each chunk and to receive each
    chunk (``hub_timeouts``). A push that times out or loses its connection is tried again, up to
    ``retries`` more times after a short pause; re-pushing is safe because the repo is created
    with ``exist_ok`` and unchanged files are skipped. Any other failure (HTTP 4xx/5xx, a bad
    token) is reported at once. huggingface_hub retries a few calls of its own (preupload, LFS
    batch) inside one attempt, so an attempt can last several times ``timeout``.

    >>> push_to_hub("runs/demo/model", "me/tiny-moe-no-ru", private=True)  # doctest: +SKIP
    'https://huggingface.co/me/tiny-moe-no-ru/commit/...'
    """
    _check_repo_id(repo_id)
    _check_limits(timeout, retries)
    folder = Path(out_dir)
    if not (folder / "config.json").is_file():
        raise MsaEditError(
            f"{folder} is not an exported model (no config.json); run export_model first"
        )
    secret = token or get_token()
    if not secret:
        raise MsaEditError(
            "no Hugging Face token found; pass token=..., set HF_TOKEN, or run `hf auth login`"
        )
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=secret)
    where = f"push of {folder} to {repo_id} at {api.endpoint}"
    attempts = retries + 1
    with hub_timeouts(timeout):
        for attempt in range(1, attempts + 1):
            try:
                api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                info = api.upload_folder(
                    folder_path=folder,
                    repo_id=repo_id,
                    repo_type="model",
                    commit_message=commit_message,
                )
            except Exception as err:  # re-raised as one line; the cause is dropped: no header leaks
                reason = _one_line(err)
                kind = _network_failure(err)
                if kind is None:
                    message = (
                        f"{where} failed ({reason}); check the repo id, the token's write "
                        "permission and the endpoint"
                    )
                    raise MsaEditError(scrub(message, secret)) from None
                if attempt == attempts:
                    message = _gave_up(where, kind, reason, attempts, timeout)
                    raise MsaEditError(scrub(message, secret)) from None
                pause = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
                log.warning("%s", scrub(f"{where}: {reason}; retrying in {pause:g} s", secret))
                time.sleep(pause)
            else:
                log.info("%s", scrub(f"pushed {folder} to {repo_id} ({info.commit_url})", secret))
                return str(info.commit_url)
    raise AssertionError("unreachable: the last attempt returns or raises")


def is_repo_id(name: str) -> bool:
    """Whether `name` is a valid Hub repo id (`name` or `namespace/name`) that is not also an
    existing local path (a local folder or file wins).

    >>> is_repo_id("mistralai/Mixtral-8x7B-v0.1"), is_repo_id("/tmp/base"), is_repo_id("./m")
    (True, False, False)
    """
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def _check_repo_id(repo_id: str) -> None:
    """Refuse what the Hub would refuse (or read as a path) before any network call."""
    if not isinstance(repo_id, str):
        raise MsaEditError(f"repo id {short(repo_id)} is not a string; pass 'namespace/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        message = (
            f"repo id {short(repo_id)} is not a Hub repo id ({_one_line(err)}); use "
            "'namespace/name' with letters, digits, '-', '_' and '.'"
        )
        raise MsaEditError(scrub(message, None)) from None
    if repo_id.count("/") != 1:
        message = (
            f"repo id {short(repo_id)} has no namespace; use 'namespace/name' (your user or "
            "organisation, then the model name)"
        )
        raise MsaEditError(scrub(message, None))


def _check_limits(timeout: float, retries: int) -> None:
    """``timeout`` a finite number of seconds > 0; ``retries`` an integer >= 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise MsaEditError(f"timeout={timeout!r} is not a number; pass seconds, e.g. timeout=60")
    if not (math.isfinite(timeout) and timeout > 0):
        raise MsaEditError(f"timeout={timeout!r} must be a finite number of seconds > 0")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise MsaEditError(f"retries={retries!r} must be an integer >= 0, e.g. retries=2")


def _gave_up(where: str, failure: str, reason: str, attempts: int, timeout: float) -> str:
    """The one-line message after the last failed attempt (`failure`: "timeout" or another)."""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    if failure == "timeout":
        return (
            f"{where} timed out after {tries} ({timeout:g} s limit per request); check the "
            "network or raise the timeout (export.timeout / timeout=)"
        )
    return (
        f"{where} lost its connection after {tries} ({reason}); check the network and the "
        "endpoint, then push again"
    )


def _network_failure(err: BaseException) -> str | None:
    """``"timeout"``, ``"connection"`` or ``None`` (not worth retrying) for a failed push.

    Looks through the exception's causes, since huggingface_hub sometimes wraps the transport
    error. The HTTP library's classes are recognised by name (``TimeoutException``,
    ``NetworkError``, ``RemoteProtocolError`` of httpx or httpx2) so that this works with either
    library huggingface_hub is built on.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {
            cls.__name__
            for cls in type(current).__mro__
            if cls.__module__.partition(".")[0] in ("httpx", "httpx2")
        }
        if "TimeoutException" in names or isinstance(current, TimeoutError):
            return "timeout"
        if names & {"NetworkError", "RemoteProtocolError"} or isinstance(current, ConnectionError):
            return "connection"
        current = current.__cause__ or current.__context__
    return None


def _one_line(err: BaseException) -> str:
    """The error's type, first line and (for Hub HTTP errors) the server's message, on one line."""
    lines = str(err).splitlines() or [""]
    text = f"{type(err).__name__}: {lines[0]}"
    server = getattr(err, "server_message", None)
    if server:
        text += f" ({' '.join(str(server).split())})"
    return text


# --------------------------------------------------------------------------- timeouts


@contextmanager
def hub_timeouts(seconds: float) -> Iterator[None]:
    """Give every huggingface_hub HTTP request inside the block ``seconds`` to connect, send,
    receive and wait for a pooled connection; the previous client factory is restored after.

    huggingface_hub shares one HTTP client per process, made by a replaceable factory whose
    client has no timeout. This wraps the current factory (so a custom one, e.g. with a proxy,
    keeps its settings), sets the client's default timeout and fills in any limit a request
    turns off explicitly (``timeout=None``). The switch is process-wide: other threads' Hub
    calls get the same limits meanwhile, and blocks in different threads run one at a time.

    >>> from huggingface_hub import get_session
    >>> with hub_timeouts(5):
    ...     get_session().timeout.read
    5.0
    """
    _check_limits(seconds, 0)
    with _FACTORY_LOCK:
        previous = _current_factory()
        set_client_factory(partial(_client_with_timeouts, previous, float(seconds)))
        try:
            yield
        finally:
            set_client_factory(previous)  # also closes the client made inside the block


def _current_factory() -> Callable[[], Any]:
    """The client factory huggingface_hub uses now (it has no public getter)."""
    factory = getattr(hub_http, "_GLOBAL_CLIENT_FACTORY", None)
    return factory if callable(factory) else hub_http.default_client_factory


def _client_with_timeouts(make: Callable[[], Any], seconds: float) -> Any:
    """A client from ``make`` whose requests all have finite timeouts of ``seconds``."""
    client = make()
    client.timeout = seconds
    hooks = client.event_hooks
    client.event_hooks = {
        **hooks,
        "request": [*hooks.get("request", []), partial(_fill_timeouts, seconds=seconds)],
    }
    return client


def _fill_timeouts(request: Any, *, seconds: float) -> None:
    """Request hook: replace each missing (``None``) timeout of ``request`` with ``seconds``."""
    limits = dict(request.extensions.get("timeout") or {})
    for key in _TIMEOUT_KEYS:
        if limits.get(key) is None:
            limits[key] = seconds
    request.extensions = {**request.extensions, "timeout": limits}


# --------------------------------------------------------------------------- scrub


def scrub(text: str, secret: str | None) -> str:
    """``text`` with the token and anything that gives it away replaced by ``***``.

    Masked, ignoring case: any run of >= 8 characters of ``secret`` (so the whole token, its
    prefixes and its upper-cased copy), the same of its base64 and URL-safe base64 (at each of the
    three byte alignments, so ``base64("user:" + token)`` is caught too), and anything that looks
    like a Hugging Face token (``hf_`` then 8 or more letters/digits). A secret shorter than 8
    characters is masked whole.

    >>> echo = "echo: hf_SECRETtoken99 / HF_SECRETTOKEN99 / aGZfU0VDUkVUdG9rZW45OQ=="
    >>> scrub(echo, "hf_SECRETtoken99")
    'echo: *** / *** / ***'
    >>> scrub("nothing to hide", None)
    'nothing to hide'
    """
    masked = [False] * len(text)
    lowered = text.lower()
    for form in _secret_forms(secret or ""):
        width = min(MIN_SECRET_PART, len(form))
        grams = {form[i : i + width] for i in range(len(form) - width + 1)}
        for start in range(len(text) - width + 1):
            if lowered[start : start + width] in grams:
                masked[start : start + width] = [True] * width
    for match in _TOKEN_LIKE.finditer(text):
        masked[match.start() : match.end()] = [True] * (match.end() - match.start())
    out: list[str] = []
    for i, char in enumerate(text):
        if not masked[i]:
            out.append(char)
        elif i == 0 or not masked[i - 1]:
            out.append(MASK)
    return "".join(out)


def _secret_forms(secret: str) -> list[str]:
    """Lower-cased strings whose runs give ``secret`` away: itself and its base64 encodings."""
    if not secret:
        return []
    raw = secret.encode()
    forms = [secret.lower(), *(e(raw).decode("ascii").lower() for e in _BASE64)]
    for offset in range(3):  # base64 of text with the secret at any byte offset
        for encode in _BASE64:
            encoded = encode(b"\0" * offset + raw).decode("ascii")
            # only the characters made of the secret's bits alone are stable across contexts
            core = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
            if len(core) >= MIN_SECRET_PART:
                forms.append(core.lower())
    return forms
