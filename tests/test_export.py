"""export_model round-trips, writes a Hub model card, is atomic; push_to_hub works end to end.

The push tests run a small fake of the Hub API on 127.0.0.1 (repo create, validate-yaml,
preupload, commit), so no network is needed; they check the files, flags and auth that arrive, and
that the token leaks nowhere.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
import yaml
from tiny_models import VOCAB, build
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from msa_edit import export
from msa_edit.errors import MsaEditError
from msa_edit.export import CardInfo, export_model, push_to_hub

LINES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "кошка сидит на ковре",
    "собака бежит в парке",
] * 4
TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"

CARD = CardInfo(
    base_model="org/tiny-mixtral",
    license="apache-2.0",
    recipe={"model": "org/tiny-mixtral", "units": "layers.*.experts.*", "budget": 64},
    plan={
        "action": "remove",
        "units": ["layers.0.experts.3", "layers.1.experts.5"],
        "scores": {"layers.0.experts.3": 0.42, "layers.1.experts.5": 0.17},
        "target": "ru",
    },
    shapley={"method": "antithetic", "budget": 64, "seed": 0, "n_evaluations": 64},
    metrics={"before": {"nll/ru": 2.5, "ppl/ru": 12.18}, "after": {"nll/ru": 4.0, "ppl/ru": 54.6}},
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real `tokenizers` BPE trained on a few lines, vocabulary within the tiny models' 96."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(LINES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def model() -> Any:
    return build("mixtral")


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def test_round_trip_gives_identical_logits(model, tokenizer, tmp_path: Path) -> None:
    out = export_model(model, tokenizer, tmp_path / "m", card=CARD)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("the cat sat in the park")["input_ids"]])
    assert tok2("the cat sat in the park")["input_ids"] == ids[0].tolist()
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "msa_edit.json").read_text())["plan"]["action"] == "remove"


def test_forced_shards_reload(model, tmp_path: Path) -> None:
    out = export_model(model, None, tmp_path / "m", max_shard_size="40KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_card_front_matter_and_sections(model, tokenizer, tmp_path: Path) -> None:
    text = (export_model(model, tokenizer, tmp_path / "m", card=CARD) / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "org/tiny-mixtral"
    assert "msa-edit" in meta["tags"]
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers"
    assert "| `layers.0.experts.3` | 0.42 |" in text
    assert "- **method**: antithetic" in text and "- **n_evaluations**: 64" in text
    assert "| ppl/ru | 12.18 | 54.6 | +42.42 |" in text
    recipe = re.search(r"```yaml\n(.*?)```", text, flags=re.S)
    assert recipe and yaml.safe_load(recipe.group(1)) == CARD.recipe


def test_license_carried_over_from_local_base_card(model, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# base\n")
    out = export_model(model, None, tmp_path / "m", card={"base_model": str(base)})
    meta = _front_matter((out / "README.md").read_text())
    assert meta["license"] == "mit"
    assert "base_model" not in meta, "a local path is no Hub id; the Hub would reject it"


def test_failure_midway_leaves_nothing(model, tokenizer, tmp_path, monkeypatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, tmp_path / "m", card=CARD)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_then_overwrites_atomically(model, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MsaEditError, match="overwrite=True"):
        export_model(model, None, out)
    monkeypatch.setattr(type(tokenizer), "save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_model(model, tokenizer, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    export_model(model, tokenizer, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()


def test_empty_existing_dir_is_fine(model, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert (export_model(model, None, tmp_path / "m") / "config.json").is_file()


def test_unknown_card_field_is_one_line_error() -> None:
    with pytest.raises(MsaEditError, match="unknown model-card field") as err:
        CardInfo.from_dict({"base_model": "x", "licence": "mit"})
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- fake Hub


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
    handler = type("Hub", (FakeHub,), {"calls": [], "files": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    try:
        yield url, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_end_to_end(model, tokenizer, tmp_path, fake_hub, caplog, capsys, monkeypatch):
    endpoint, hub = fake_hub
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = export_model(model, tokenizer, tmp_path / "m", card=CARD, max_shard_size="60KB")
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "huggingface_hub"):
        url = push_to_hub(
            out,
            "me/edited",
            private=True,
            commit_message="msa edit v1",
            token=TOKEN,
            endpoint=endpoint,
        )
    assert url.startswith(endpoint)
    assert all(c["auth"] is None for c in hub.calls if c["method"] == "GET")
    create = next(c for c in hub.calls if c["path"] == "/api/repos/create")
    assert create["json"]["visibility"] == "private"
    assert create["json"]["organization"] == "me" and create["json"]["name"] == "edited"
    commit = next(c for c in hub.calls if "/commit/" in c["path"])
    assert commit["path"] == "/api/models/me/edited/commit/main"
    assert commit["summary"] == "msa edit v1"
    assert {c["auth"] for c in hub.calls if c["method"] == "POST"} == {f"Bearer {TOKEN}"}
    card = next(c for c in hub.calls if c["path"] == "/api/validate-yaml")
    assert card["json"]["content"] == (out / "README.md").read_text()
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert hub.files == local and len(local) > 5
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    assert not any(TOKEN.encode() in data for data in local.values())


def test_push_uses_hf_token_and_hf_endpoint_env(model, tmp_path, fake_hub, monkeypatch) -> None:
    endpoint, hub = fake_hub
    out = export_model(model, None, tmp_path / "m")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    push_to_hub(out, "me/public")
    create = next(c for c in hub.calls if c["path"] == "/api/repos/create")
    assert create["json"]["visibility"] == "public" and create["auth"] == f"Bearer {TOKEN}"
    assert set(hub.files) == {p.name for p in out.iterdir()}


def test_push_without_token_is_clear_error(tmp_path, model, monkeypatch) -> None:
    out = export_model(model, None, tmp_path / "m")
    monkeypatch.setattr(export, "get_token", lambda: None)
    with pytest.raises(MsaEditError, match="no Hugging Face token"):
        push_to_hub(out, "me/x")


def test_push_server_error_never_shows_token(model, tmp_path, fake_hub) -> None:
    endpoint, _ = fake_hub
    out = export_model(model, None, tmp_path / "m")
    with pytest.raises(MsaEditError) as err:
        push_to_hub(out, "me/x", token=TOKEN, endpoint=endpoint + "/nothing-here")
    assert "***" in str(err.value), "the fake echoed the token, so it must have been masked"
    assert TOKEN not in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
