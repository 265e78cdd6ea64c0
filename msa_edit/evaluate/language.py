"""Per-language mean next-token NLL and perplexity, and the run directory's `eval.json`.

The numbers go through the local `evaluate` metric module `metrics/nll.py`, so the same metric can
be used (and cited) outside msa_edit: `evaluate.load(str(NLL_METRIC))`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from msa_edit.atomic import read_json, write_json
from msa_edit.errors import MsaEditError
from msa_edit.games import token_nll
from msa_edit.progress import Progress
from msa_edit.texts import Packing, text_blocks

NLL_METRIC = Path(__file__).parent / "metrics" / "nll.py"


@functools.cache
def nll_metric() -> Any:
    """The local `evaluate` NLL/perplexity metric, loaded offline once per process.

    >>> nll_metric().compute(nll_sum=[3.0], n_tokens=[3])["nll"]
    1.0
    """
    import evaluate  # heavy import, only when a metric is computed

    return evaluate.load(str(NLL_METRIC), keep_in_memory=True)


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode and no autograd for the block; the training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def block_nll(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    batch_size: int = 8,
    *,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Per-block next-token NLL sums `[n_blocks]` (float64) of token blocks `[n_blocks, T]`;
    `progress` (if given) counts the blocks done."""
    device = next(model.parameters()).device
    sums = []
    with _eval_mode(model):
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            sums.append(token_nll(logits, ids).double().sum(1).cpu())
            if progress is not None:
                progress.update(ids.shape[0])
    return torch.cat(sums)


def text_bytes(tokenizer: Any, blocks: torch.Tensor) -> list[int]:
    """UTF-8 bytes of the text each block's predicted tokens (all but the first) decode to,
    special tokens left out.

    >>> class Chars:  # a tokenizer whose tokens are characters
    ...     def decode(self, ids, skip_special_tokens): return "".join(chr(i) for i in ids)
    >>> text_bytes(Chars(), torch.tensor([[104, 105, 233], [97, 98, 99]]))  # "hi\xe9", "abc"
    [3, 2]
    """
    return [
        len(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
        for row in blocks
    ]


def bits_per_byte(nll_sums: Sequence[float], n_bytes: Sequence[int]) -> float:
    """Σ NLL (nats) over Σ bytes, in bits; NaN when the text has no bytes.

    >>> round(bits_per_byte([math.log(2) * 8], [4]), 6)
    2.0
    """
    total = sum(n_bytes)
    return math.fsum(nll_sums) / (math.log(2) * total) if total > 0 else math.nan


def language_nll(
    model: PreTrainedModel,
    tokenizer: Any,
    texts: Mapping[str, Path | str],
    *,
    n_seq: int = 8,
    seq_len: int = 64,
    batch_size: int = 8,
    progress: bool | None = None,
    packing: Packing = "auto",
    skip: int = 0,
) -> dict[str, float]:
    """Mean next-token NLL, perplexity and bits per byte per language on held-out text.

    `texts` maps a language code to a local text file (or data set, see `texts.text_blocks`); each
    gives `n_seq` blocks of `seq_len` tokens. Every file is read before the first forward pass, so a
    bad path fails fast. Returns `{"nll/ru": ..., "ppl/ru": ..., "bpb/ru": ..., ...}` for every
    language. `bpb` (the NLL in bits over the UTF-8 bytes of the predicted text) compares across
    languages and tokenizers; per-token NLL does not (a token is a different amount of text).
    `packing` and `skip` are `texts.text_blocks`'. `progress` counts blocks done
    (`msa_edit.progress`; False: silent, None: a bar on a terminal, timestamped lines on stderr
    otherwise) and shows each finished language's NLL.

    >>> # language_nll(model, tokenizer, {"ru": "heldout/ru.txt", "en": "heldout/en.txt"})
    >>> # {'nll/ru': 3.12, 'ppl/ru': 22.6, 'bpb/ru': 1.41, 'nll/en': 2.71, ...}
    """
    if not texts:
        raise MsaEditError("no held-out texts given; pass at least one LANG=FILE")
    blocks = {
        lang: text_blocks(tokenizer, path, n_seq, seq_len, packing=packing, skip=skip)
        for lang, path in texts.items()
    }
    out: dict[str, float] = {}
    total = sum(ids.shape[0] for ids in blocks.values())
    with Progress(total, "language NLL", "block", enabled=progress) as bar:
        for lang, ids in blocks.items():
            sums = block_nll(model, ids, batch_size, progress=bar)
            n_tokens = [seq_len - 1] * len(sums)
            scores = nll_metric().compute(nll_sum=sums.tolist(), n_tokens=n_tokens)
            out[f"nll/{lang}"] = float(scores["nll"])
            out[f"ppl/{lang}"] = float(scores["perplexity"])
            out[f"bpb/{lang}"] = bits_per_byte(sums.tolist(), text_bytes(tokenizer, ids))
            done = [f"{k[4:]} {v:.3f}" for k, v in out.items() if k.startswith("nll/")]
            bar.set_postfix(nll=" ".join(done))
    return out


def compare(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """The `eval.json` structure with a `delta` (after - before) for every metric both sides have.

    >>> compare({"nll/ru": 2.0}, {"nll/ru": 2.5})
    {'before': {'nll/ru': 2.0}, 'after': {'nll/ru': 2.5}, 'delta': {'nll/ru': 0.5}}
    """
    delta = {k: float(after[k]) - float(before[k]) for k in before if k in after}
    return {
        "before": {k: float(v) for k, v in before.items()},
        "after": {k: float(v) for k, v in after.items()},
        "delta": delta,
    }


@dataclass(frozen=True)
class Selectivity:
    """How much a targeted edit raised its target sets' NLL against the most-raised other set."""

    target: str
    own: float
    other: str
    other_delta: float

    @property
    def ratio(self) -> float:
        """own / largest other increase (inf when no other set rose)."""
        return self.own / self.other_delta if self.other_delta > 0 else math.inf

    def line(self) -> str:
        """One line for logs and READMEs.

        >>> Selectivity("zh", 0.68, "de", 0.004).line()
        'zh +0.680 nats/token; largest other de +0.004: 170x on the target'
        """
        ratio = f"{self.ratio:.0f}x" if math.isfinite(self.ratio) else "no other set rose"
        return (
            f"{self.target} {self.own:+.3f} nats/token; largest other {self.other} "
            f"{self.other_delta:+.3f}: {ratio} on the target"
        )


def selectivity(delta: Mapping[str, float], target: Sequence[str]) -> Selectivity | None:
    """The smallest target increase against the largest other `nll/` increase in `delta`
    (`eval.json`'s), or None without both a target and another set.

    >>> selectivity({"nll/zh": 0.5, "nll/en": 0.01, "nll/de": -0.02, "ppl/zh": 3.0}, ["zh"]).ratio
    50.0
    """
    nll = {k[4:]: v for k, v in delta.items() if k.startswith("nll/")}
    own = {t: nll[t] for t in target if t in nll}
    others = {k: v for k, v in nll.items() if k not in target}
    if not own or not others:
        return None
    t = min(own, key=own.__getitem__)
    o = max(others, key=others.__getitem__)
    return Selectivity(t, own[t], o, others[o])


def write_eval_json(
    path: Path | str,
    before: Mapping[str, float],
    after: Mapping[str, float],
    candidates: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write `compare(before, after)` to `path` atomically as strict JSON (no NaN or infinity).

    `candidates` (a search plan's candidates, each lesioned on the base model) adds their
    metrics under "candidates": `{name: {metric: value}}`.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     read_eval_json(write_eval_json(Path(d) / "eval.json", {"x": 1.0}, {"x": 2.0}))["delta"]
    {'x': 1.0}
    """
    record = compare(before, after)
    sides = {k: record[k] for k in ("before", "after", "delta")}
    if candidates:
        record["candidates"] = {
            n: {k: float(v) for k, v in m.items()} for n, m in candidates.items()
        }
        sides |= {f"candidates.{n}": m for n, m in record["candidates"].items()}
    bad = [f"{s}.{k}" for s, m in sides.items() for k, v in m.items() if not math.isfinite(v)]
    if bad:
        raise MsaEditError(f"eval metrics {bad} are not finite; strict JSON cannot hold them")
    return write_json(path, record)


def read_eval_json(path: Path | str) -> dict[str, Any]:
    """Read an `eval.json`; non-finite numbers (not strict JSON) are rejected."""

    record = read_json(path, "fix it or rerun `msa-edit evaluate`")
    if not isinstance(record, dict):
        raise MsaEditError(f"{path} is not a JSON object; it is not an eval.json")
    for side in ("before", "after"):
        if not isinstance(record.get(side), dict):
            raise MsaEditError(f"{path} has no {side!r} metrics; it is not an eval.json")
    return record
