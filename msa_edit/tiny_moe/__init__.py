"""A tiny mixture-of-experts language model trained on a few languages, reproducibly.

    msa-edit tiny-moe --text en=en.txt --text de=de.txt --out tiny-moe [--steps N] [--seed N]
                      [--family mixtral|olmoe]

`build_tiny_moe` trains a byte-level BPE tokenizer and a small `MixtralForCausalLM` (4 layers,
8 experts, top-2 by default; about 3.5 M parameters) on text files, one sentence a line, and
writes a Hugging Face model directory that loads with plain `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained` (no custom code). `TinyMoeConfig(family="olmoe")` trains an
`OlmoeForCausalLM` of the same size on the same text with the same loop instead (a second MoE
family: query/key norms, top-k weights not renormalised, as in OLMoE-1B-7B). The same files,
steps, seed and config give the same bits (on the same torch build and CPU kind), whatever the
order of the languages and the caller's thread count: training runs by steps, on one thread,
with deterministic algorithms; batches come from a `torch.Generator` seeded by `seed`; the global
RNG is left untouched.

The last `heldout_fraction` of each file's lines is held out (saved as `DIR/heldout/{lang}.txt`)
and never trained on; `DIR/tiny_moe.json` records languages, files and their sha256, config,
train losses, held-out NLL per language and the routing of held-out tokens to experts.
Without `out`, the model is built once under the cache (`$MSA_EDIT_CACHE`, default
`~/.cache/msa_edit`) and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from msa_edit.atomic import replace_dir
from msa_edit.cachedir import cache_dir
from msa_edit.errors import MsaEditError
from msa_edit.progress import format_duration, note
from msa_edit.tiny_moe import training
from msa_edit.tiny_moe.config import (
    DEFAULT_FAMILY,
    FAMILIES,
    FORMAT,
    FORMAT_VERSION,
    HELDOUT_DIR,
    META_FILE,
    TinyMoeConfig,
)
from msa_edit.tiny_moe.inspect import mean_nll, routing_by_language, routing_summary
from msa_edit.tiny_moe.text import (
    file_sha256,
    parse_text_arg,
    parse_text_args,
    read_lines,
    split_heldout,
    token_stream,
    train_tokenizer,
    windows,
)

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "HELDOUT_DIR",
    "META_FILE",
    "TinyMoeConfig",
    "build_environment",
    "build_key",
    "build_tiny_moe",
    "file_sha256",
    "heldout_texts",
    "load_tiny_moe",
    "mean_nll",
    "parse_text_arg",
    "parse_text_args",
    "read_lines",
    "read_meta",
    "routing_by_language",
    "routing_summary",
    "split_heldout",
    "token_stream",
    "train_tokenizer",
    "windows",
]


# ---------------------------------------------------------------------------------------------
# Inputs


# ---------------------------------------------------------------------------------------------
# Tokenizer and token streams


# ---------------------------------------------------------------------------------------------
# Measurements


# ---------------------------------------------------------------------------------------------
# Training


# ---------------------------------------------------------------------------------------------
# Building a model directory


def _resolve(
    texts: Mapping[str, Path | str], steps: int | None, seed: int | None, config: TinyMoeConfig
) -> tuple[TinyMoeConfig, dict[str, Path], dict[str, str]]:
    """Check inputs; languages sorted (so argument order does not change the model)."""
    if not texts:
        raise MsaEditError("no text given; pass at least one --text LANG=FILE")
    if steps is not None or seed is not None:
        config = dataclasses.replace(
            config,
            steps=config.steps if steps is None else steps,
            seed=config.seed if seed is None else seed,
        )
    paths = {lang: Path(texts[lang]) for lang in sorted(texts)}
    for path in paths.values():
        if not path.is_file():
            raise MsaEditError(f"text file {path} does not exist; check --text LANG=FILE")
    return config, paths, {lang: file_sha256(p) for lang, p in paths.items()}


def build_key(shas: Mapping[str, str], config: TinyMoeConfig) -> str:
    """Hash of everything the model's bits depend on: texts, config (steps, seed), format.

    >>> len(build_key({"en": "00"}, TinyMoeConfig()))
    64
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "texts": sorted(shas.items()),
        "config": config.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "numpy")


def build_environment() -> dict[str, str]:
    """What shapes a build's bits besides its inputs: library versions and the CPU kind.

    >>> sorted(build_environment())
    ['cpu', 'numpy', 'python', 'tokenizers', 'torch', 'transformers']
    """
    from importlib.metadata import version

    env = {name: version(name) for name in ENVIRONMENT_PACKAGES}
    env["python"] = platform.python_version()
    env["cpu"] = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return env


def environment_changes(recorded: Mapping[str, str]) -> str:
    """What differs between a build's recorded environment and this one ('' if nothing or
    nothing recorded).

    >>> environment_changes({}), environment_changes({"torch": "0.0"}).startswith("torch 0.0 (")
    ('', True)
    """
    here = build_environment()
    differ = [f"{k} {v} (here {here.get(k)})" for k, v in recorded.items() if here.get(k) != v]
    return ", ".join(differ)


def read_meta(path: Path | str) -> dict[str, Any] | None:
    """The `tiny_moe.json` of a tiny-moe directory, or None if `path` is not one."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _check_out(out: Path) -> None:
    """Refuse to replace anything but nothing, an empty directory or a tiny-moe output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MsaEditError(f"--out {out} is a file; give a directory path")
    if any(out.iterdir()) and read_meta(out) is None:
        raise MsaEditError(
            f"--out {out} is a non-empty directory that is not a tiny-moe output; "
            "refusing to overwrite it, choose another --out or empty it"
        )


def build_tiny_moe(
    texts: Mapping[str, Path | str],
    out: Path | str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    config: TinyMoeConfig | None = None,
) -> Path:
    """Train a tiny MoE on `texts` (language -> file, one sentence a line); return its dir.

    `steps` and `seed` override `config`'s. With `out`, the model is written there (an `out`
    that already holds this exact build is returned as is; another tiny-moe build there is
    replaced; anything else is refused). Without `out`, it lives in the cache, keyed by the
    files' contents, config and format version, and is trained only once. Training shows its
    progress (`msa_edit.progress`: a bar on a terminal, timestamped lines otherwise) and ends
    with one line on stderr naming the folder, the train loss and the held-out NLL.

    >>> import pathlib, shutil, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("the cat sat\\nthe dog ran\\na cat ran\\n" * 20)
    >>> small = TinyMoeConfig(layers=1, experts=2, top_k=1, hidden=16, intermediate=16,
    ...                       heads=2, vocab=300, seq_len=8, batch_size=2)
    >>> path = build_tiny_moe({"xx": d / "a.txt"}, d / "model", steps=3, config=small)
    >>> sorted(p.name for p in path.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['config.json', 'generation_config.json', 'heldout', 'model.safetensors',
     'tiny_moe.json', 'tokenizer.json', 'tokenizer_config.json']
    >>> shutil.rmtree(d)
    """
    start = time.monotonic()
    config, paths, shas = _resolve(texts, steps, seed, config or TinyMoeConfig())
    key = build_key(shas, config)
    where = "saved to" if out is not None else "cached in"
    out = Path(out) if out is not None else cache_dir() / "tiny-moe" / key[:24]
    _check_out(out)
    meta = read_meta(out)
    if meta is not None and meta.get("key") == key:
        note(f"tiny-moe: reusing the model {where} {out}; {_summary(meta)}")
        differ = environment_changes(meta.get("environment") or {})
        if differ:
            note(
                f"tiny-moe: WARNING: this build was made with {differ}; a build here would "
                "not be bit-identical to it (delete the folder to rebuild)"
            )
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        meta = _build_into(tmp, paths, shas, config, key)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    took = format_duration(time.monotonic() - start)
    note(f"tiny-moe: trained in {took}, {where} {out}; {_summary(meta)}")
    return out


def _summary(meta: Mapping[str, Any]) -> str:
    """How well a build trained, from its `tiny_moe.json`: steps, train loss, held-out NLL.

    >>> _summary({"steps": 3, "first_train_loss": 6.0, "final_train_loss": 5.1234,
    ...           "heldout_nll": {"de": 5.5, "en": 5.25}})
    'steps 3, train loss 6.000 -> 5.123, held-out NLL de 5.500 en 5.250'
    """
    parts = [f"steps {meta.get('steps')}"]
    first, final = meta.get("first_train_loss"), meta.get("final_train_loss")
    if isinstance(first, float) and isinstance(final, float):
        parts.append(f"train loss {first:.3f} -> {final:.3f}")
    nll = meta.get("heldout_nll")
    if isinstance(nll, dict) and nll:
        parts.append("held-out NLL " + " ".join(f"{k} {v:.3f}" for k, v in nll.items()))
    return ", ".join(parts)


def _build_into(
    tmp: Path, paths: Mapping[str, Path], shas: Mapping[str, str], config: TinyMoeConfig, key: str
) -> dict[str, Any]:
    """Read, tokenize, train, evaluate and save everything into the directory `tmp`; returns
    the `tiny_moe.json` written."""
    splits = {
        lang: split_heldout(read_lines(p), config.heldout_fraction) for lang, p in paths.items()
    }
    tokenizer = train_tokenizer([s for train, _ in splits.values() for s in train], config.vocab)
    streams = {lang: token_stream(tokenizer, train) for lang, (train, _) in splits.items()}
    for lang, stream in streams.items():
        if len(stream) < config.seq_len:
            raise MsaEditError(
                f"{paths[lang]} gives {len(stream)} training tokens, fewer than seq_len="
                f"{config.seq_len}; give more text"
            )
    with training.reproducible(config.seed):
        model = training.new_model(config, len(tokenizer))
        losses = training.train(model, list(streams.values()), config)
        heldout = {lang: held for lang, (_, held) in splits.items()}
        nll = {
            lang: mean_nll(model, windows(token_stream(tokenizer, held), config.seq_len))
            for lang, held in heldout.items()
        }
        routing = routing_by_language(model, tokenizer, heldout, config.seq_len)
    with training.no_transformers_bars():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / HELDOUT_DIR).mkdir()
    for lang, held in heldout.items():
        (tmp / HELDOUT_DIR / f"{lang}.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
    tail = losses[-max(1, len(losses) // 20) :]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "environment": build_environment(),
        "languages": list(paths),
        "files": {
            lang: {
                "path": str(paths[lang]),
                "sha256": shas[lang],
                "train_lines": len(splits[lang][0]),
                "heldout_lines": len(splits[lang][1]),
                "train_tokens": len(streams[lang]),
            }
            for lang in paths
        },
        "steps": config.steps,
        "seed": config.seed,
        "config": config.to_dict(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "first_train_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        "train_loss_curve": _curve(losses),
        "heldout_nll": nll,
        "routing_heldout": routing.tolist(),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _curve(losses: Sequence[float], points: int = 20) -> list[list[float]]:
    """[last step, mean loss] over `points` equal chunks of the run."""
    size = max(1, math.ceil(len(losses) / points))
    chunks = range(0, len(losses), size)
    return [[min(i + size, len(losses)), sum(losses[i : i + size]) / len(losses[i : i + size])]
            for i in chunks]  # fmt: skip


def load_tiny_moe(path: Path | str) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, tiny_moe.json) of a tiny-moe directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(path)
    if meta is None:
        raise MsaEditError(f"{path} is not a tiny-moe directory (no {META_FILE}); build one first")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path), meta


def heldout_texts(path: Path | str) -> dict[str, list[str]]:
    """The held-out lines per language of a tiny-moe directory (never trained on)."""
    meta = read_meta(path)
    if meta is None:
        raise MsaEditError(f"{path} is not a tiny-moe directory (no {META_FILE}); build one first")
    folder = Path(path) / HELDOUT_DIR
    return {
        lang: (folder / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        for lang in meta["languages"]
    }
