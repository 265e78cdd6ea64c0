"""push_to_hub works end to end, gives up on a stalled Hub in bounded time, refuses bad repo ids
before connecting, and never shows the token in any form.

Everything runs against small servers on 127.0.0.1, so no network is needed: a fake of the Hub
API (repo create, validate-yaml, preupload, commit), a server that accepts connections and never
answers, and one that answers every request with an error echoing the credentials.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from huggingface_hub import get_session, set_client_factory
from huggingface_hub.utils import _http as hub_http
from tiny_models import build

from msa_edit import hub
from msa_edit.errors import MsaEditError
from msa_edit.export import CardInfo, export_model
from msa_edit.hub import hub_timeouts, push_to_hub, scrub

TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
CARD = CardInfo(
    base_model="org/tiny-mixtral",
    license="apache-2.0",
    plan={"action": "remove", "units": ["layers.0.experts.3"], "target": "ru"},
    metrics={"before": {"ppl/ru": 12.18}, "after": {"ppl/ru": 54.6}},
)
LEAKS = {
    "token": TOKEN,
    "prefix": TOKEN[:12],
    "upper": TOKEN.upper(),
    "base64": base64.b64encode(TOKEN.encode()).decode(),
    "urlsafe base64": base64.urlsafe_b64encode(TOKEN.encode()).decode(),
    "basic auth": base64.b64encode(f"me:{TOKEN}".encode()).decode(),
    "bearer base64": base64.b64encode(f"Bearer {TOKEN}".encode()).decode(),
    "other token": "hf_AnotherUsersToken42",
}
"""What a careless server might echo back; none of it may reach an error message."""
PUBLIC_CHARS = {"basic auth": len("me:") * 8 // 6, "bearer base64": len("Bearer ") * 8 // 6}
"""Leading characters of a leak that encode only its public prefix (``me:``, ``Bearer ``)."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny exported Mixtral in several shards; pushing never changes it, so tests share it."""
    out = tmp_path_factory.mktemp("export") / "m"
    return export_model(build("mixtral"), None, out, card=CARD, max_shard_size="60KB")


def _refused_port() -> int:
    """A local port nothing listens on (connecting is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def default_hub_is_local(monkeypatch) -> None:
    """huggingface_hub's own side requests (the agent registry) go to its default endpoint; point
    that at a refused local port so no test touches the network or the servers it counts."""
    monkeypatch.setattr(
        huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_refused_port()}"
    )


@pytest.fixture(autouse=True)
def factory_restored() -> Iterator[None]:
    """Every test leaves huggingface_hub's client factory as it found it."""
    before = hub_http._GLOBAL_CLIENT_FACTORY
    yield
    assert hub_http._GLOBAL_CLIENT_FACTORY is before, "the client factory was not restored"


# --------------------------------------------------------------------------- servers


class SilentServer:
    """A stalled Hub: accepts TCP connections on 127.0.0.1 and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in [*self.connections, self.sock]:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


class EchoError(BaseHTTPRequestHandler):
    """Answers every request with HTTP 400 and an error that echoes the credentials."""

    requests: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _echo(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        leaks = " ".join(f"{name}={value}" for name, value in LEAKS.items())
        data = json.dumps({"error": f"bad request from {self.headers['Authorization']}: {leaks}"})
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    do_GET = do_POST = do_PUT = _echo


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[tuple[str, Any]]:
    """Serve ``handler`` on a free local port; yields its URL and the handler class."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def echo() -> Iterator[tuple[str, type[EchoError]]]:
    with _serve(type("Echo", (EchoError,), {"requests": []})) as served:
        yield served


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for create_repo + upload_folder (regular, non-LFS uploads)."""

    calls: list[dict[str, Any]]
    files: dict[str, bytes]

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        self.calls.append({"method": "GET", "path": self.path, "auth": auth})
        self._reply(404, {"error": "not faked"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        self.calls.append({"method": "POST", "path": path, "auth": self.headers["Authorization"]})
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if path == "/api/repos/create":
            self.calls[-1]["json"] = json.loads(body)
            payload = self.calls[-1]["json"]
            self._reply(200, {"url": f"{base}/{payload['organization']}/{payload['name']}"})
        elif path == "/api/validate-yaml":
            self.calls[-1]["json"] = json.loads(body)
            self._reply(200, {"errors": [], "warnings": []})
        elif re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            self._reply(200, {"files": modes})
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path):
            self._commit([json.loads(line) for line in body.splitlines() if line.strip()])
            oid = "a" * 40
            self._reply(
                200,
                {
                    "commitUrl": f"{base}/{match.group(1)}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )
        else:  # a careless server echoing the credentials: push_to_hub must still not show them
            self._reply(404, {"error": f"not faked; you sent {self.calls[-1]['auth']}"})

    def _commit(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            if item["key"] == "header":
                self.calls[-1]["summary"] = item["value"]["summary"]
            elif item["key"] == "file":
                self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                raise AssertionError(f"unexpected commit item {item['key']}")


@pytest.fixture
def fake_hub(monkeypatch) -> Iterator[tuple[str, type[FakeHub]]]:
    """A fake Hub on 127.0.0.1; huggingface_hub's default endpoint points there too, so its own
    unauthenticated side requests (the user-agent registry, GET /api/agent-harnesses) stay local."""
    with _serve(type("Hub", (FakeHub,), {"calls": [], "files": {}})) as (url, handler):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        yield url, handler


def _push_in_thread(limit_s: float, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run push_to_hub in a thread (no pytest-timeout here) and fail if it is still running after
    ``limit_s``; returns ``{"url": ...}`` or ``{"error": ...}`` and the seconds it took."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["url"] = push_to_hub(*args, **kwargs)
        except BaseException as err:
            result["error"] = err

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"push_to_hub still running after {limit_s} s: it hangs"
    result["seconds"] = time.monotonic() - start
    return result


# --------------------------------------------------------------------------- push end to end


def test_push_end_to_end(exported, fake_hub, caplog, capsys, monkeypatch) -> None:
    endpoint, server = fake_hub
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "huggingface_hub"):
        url = push_to_hub(
            exported,
            "me/edited",
            private=True,
            commit_message="msa edit v1",
            token=TOKEN,
            endpoint=endpoint,
        )
    assert url.startswith(endpoint)
    assert all(c["auth"] is None for c in server.calls if c["method"] == "GET")
    create = next(c for c in server.calls if c["path"] == "/api/repos/create")
    assert create["json"]["visibility"] == "private"
    assert create["json"]["organization"] == "me" and create["json"]["name"] == "edited"
    commit = next(c for c in server.calls if "/commit/" in c["path"])
    assert commit["path"] == "/api/models/me/edited/commit/main"
    assert commit["summary"] == "msa edit v1"
    assert {c["auth"] for c in server.calls if c["method"] == "POST"} == {f"Bearer {TOKEN}"}
    card = next(c for c in server.calls if c["path"] == "/api/validate-yaml")
    assert card["json"]["content"] == (exported / "README.md").read_text()
    local = {str(p.relative_to(exported)): p.read_bytes() for p in exported.rglob("*")}
    assert server.files == local and len(local) > 5
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    assert not any(TOKEN.encode() in data for data in local.values())


def test_push_uses_hf_token_and_hf_endpoint_env(exported, fake_hub, monkeypatch) -> None:
    endpoint, server = fake_hub
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    push_to_hub(exported, "me/public")
    create = next(c for c in server.calls if c["path"] == "/api/repos/create")
    assert create["json"]["visibility"] == "public" and create["auth"] == f"Bearer {TOKEN}"
    assert set(server.files) == {p.name for p in exported.iterdir()}


def test_push_without_token_is_clear_error(exported, monkeypatch) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(MsaEditError, match="no Hugging Face token"):
        push_to_hub(exported, "me/x")


def test_push_of_a_non_export_is_clear_error(tmp_path) -> None:
    with pytest.raises(MsaEditError, match="not an exported model"):
        push_to_hub(tmp_path, "me/x", token=TOKEN)


def test_push_server_error_never_shows_token(exported, fake_hub) -> None:
    endpoint, _ = fake_hub
    with pytest.raises(MsaEditError) as err:
        push_to_hub(exported, "me/x", token=TOKEN, endpoint=endpoint + "/nothing-here")
    assert "***" in str(err.value), "the fake echoed the token, so it must have been masked"
    assert TOKEN not in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --------------------------------------------------------------------------- stalls and retries


def test_stalled_hub_times_out_with_one_line(exported, silent) -> None:
    result = _push_in_thread(
        15, exported, "me/x", token=TOKEN, endpoint=silent.url, timeout=1, retries=1
    )
    err = result.get("error")
    assert isinstance(err, MsaEditError), f"expected MsaEditError, got {result}"
    message = str(err)
    assert result["seconds"] < 10
    assert f"at {silent.url} timed out after 2 attempts (1 s limit per request)" in message
    assert "raise the timeout" in message and "\n" not in message
    assert len(silent.connections) >= 2, "retries=1 must try a second time"
    assert err.__cause__ is None and err.__suppress_context__


def test_unreachable_hub_retries_then_names_the_connection(exported, caplog) -> None:
    endpoint = f"http://127.0.0.1:{_refused_port()}"
    with caplog.at_level(logging.WARNING, "msa_edit.hub"):
        result = _push_in_thread(15, exported, "me/x", token=TOKEN, endpoint=endpoint, retries=1)
    message = str(result["error"])
    assert f"at {endpoint} lost its connection after 2 attempts (ConnectError" in message
    assert "retrying in 0.5 s" in caplog.text and TOKEN not in caplog.text + message


def test_http_errors_are_not_retried(exported, echo) -> None:
    endpoint, server = echo
    with pytest.raises(MsaEditError, match=r"failed \(BadRequestError"):
        push_to_hub(exported, "me/x", token=TOKEN, endpoint=endpoint, retries=3)
    assert server.requests == ["POST /api/repos/create"]


def test_hub_timeouts_bound_requests_that_ask_for_none(silent) -> None:
    start = time.monotonic()
    with hub_timeouts(0.5), pytest.raises(Exception) as err:
        get_session().get(silent.url, timeout=None)  # explicitly "no timeout"
    assert "Timeout" in type(err.value).__name__ and time.monotonic() - start < 5


def test_hub_timeouts_keep_a_custom_factory_and_restore_it() -> None:
    previous = hub_http._GLOBAL_CLIENT_FACTORY

    def custom() -> Any:
        client = previous()
        client.headers["X-Custom"] = "kept"
        return client

    set_client_factory(custom)
    try:
        with hub_timeouts(7):
            client = get_session()
            assert client.headers["X-Custom"] == "kept"
            assert client.timeout.connect == client.timeout.read == client.timeout.write == 7
        assert hub_http._GLOBAL_CLIENT_FACTORY is custom
        assert get_session() is not client and get_session().timeout.read is None
    finally:
        set_client_factory(previous)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"timeout": 0}, "timeout=0 must be"),
        ({"timeout": float("nan")}, "timeout=nan must be"),
        ({"timeout": "60"}, "timeout='60' is not a number"),
        ({"retries": -1}, "retries=-1 must be"),
        ({"retries": True}, "retries=True must be"),
    ],
)
def test_bad_limits_are_one_line_errors(exported, kwargs, expected) -> None:
    with pytest.raises(MsaEditError, match=re.escape(expected)) as err:
        push_to_hub(exported, "me/x", token=TOKEN, **kwargs)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- repo ids


@pytest.mark.parametrize(
    ("repo_id", "expected"),
    [
        ("../..", "is not a Hub repo id"),
        ("me/x--y", "is not a Hub repo id"),
        ("a/b/c", "is not a Hub repo id"),
        ("me/model.git", "is not a Hub repo id"),
        ("edited", "has no namespace"),
    ],
)
def test_bad_repo_id_refused_before_connecting(exported, silent, repo_id, expected) -> None:
    result = _push_in_thread(15, exported, repo_id, token=TOKEN, endpoint=silent.url, timeout=1)
    message = str(result.get("error"))
    assert isinstance(result.get("error"), MsaEditError), result
    assert message.startswith(f"repo id {repo_id!r} {expected}") and "namespace/name" in message
    time.sleep(0.2)  # let the accept loop see a connection, had there been one
    assert silent.connections == [], "the server was contacted before the repo id was checked"


# --------------------------------------------------------------------------- the token


def test_echoed_token_in_any_form_is_masked(exported, echo) -> None:
    endpoint, _ = echo
    with pytest.raises(MsaEditError) as err:
        push_to_hub(exported, "me/x", token=TOKEN, endpoint=endpoint)
    message = str(err.value)
    assert "bad request from" in message, "the server's message should still be shown"
    shown = {name: leak for name, leak in LEAKS.items() if leak.lower() in message.lower()}
    assert shown == {}, f"leaked into {message!r}"
    assert "\n" not in message and err.value.__cause__ is None


@pytest.mark.parametrize("name", sorted(LEAKS))
def test_scrub_masks_each_form(name: str) -> None:
    text = f"server said: <{LEAKS[name]}> (request 1)"
    masked = scrub(text, TOKEN)
    assert masked.startswith("server said: <") and masked.endswith("> (request 1)")
    leak = LEAKS[name]
    assert "***" in masked
    start = PUBLIC_CHARS.get(name, 0)
    assert not any(leak[i : i + 8] in masked for i in range(start, len(leak) - 7)), masked


@pytest.mark.parametrize("size", [8, 13, 20])
def test_scrub_masks_any_run_of_eight_or_more(size: int) -> None:
    for start in range(len(TOKEN) - size + 1):
        part = TOKEN[start : start + size]
        assert part.lower() not in scrub(f"x {part.swapcase()} y", TOKEN).lower()


def test_scrub_leaves_plain_text_alone() -> None:
    text = "push of /tmp/m to me/x at http://127.0.0.1:8080 failed; set HF_ENDPOINT or use hf_xet"
    assert scrub(text, TOKEN) == text
    assert scrub(text, None) == text and scrub("", TOKEN) == ""
