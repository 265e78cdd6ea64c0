"""Lesion games: a model, its units, a lesion, target data and an objective, as the engine's
`game(coalitions)`: `bool [B, n_units]` (True = intact) -> `float [B, *output_shape]`.

Each coalition's lesion is applied to its own copy of the target rows inside one batched forward
(rows are chunked to `max_rows`, so memory stays flat whatever B is); the model is never copied.

>>> # targets = Targets.from_dict({"en": text_blocks(tok, "en.txt", 8, 64), "fr": ...})
>>> # game = LesionGame(model, select(model, "layers.*.experts.*"), targets, MeanNLL(), "reroute")
>>> # res = estimate(game, game.n_players, budget=2000)   # res.values: [n_experts, n_languages]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion, LesionKind
from msa_edit.units import Unit


@dataclass(frozen=True)
class Targets:
    """Token rows `input_ids [N, T]` in named target sets (`group[i]` indexes `names`)."""

    names: tuple[str, ...]
    input_ids: torch.Tensor
    group: torch.Tensor

    @classmethod
    def from_dict(cls, sets: Mapping[str, torch.Tensor]) -> Targets:
        """One target set per entry, e.g. one per language: `{"fr": ids [n, T], ...}`.

        >>> t = Targets.from_dict({"a": torch.zeros(2, 4, dtype=torch.long),
        ...                        "b": torch.ones(1, 4, dtype=torch.long)})
        >>> t.names, t.group.tolist()
        (('a', 'b'), [0, 0, 1])
        """
        if not sets:
            raise MsaEditError("no target data; give at least one target set")
        lengths = {ids.shape[1] for ids in sets.values()}
        if len(lengths) != 1:
            raise MsaEditError(f"target sets have different sequence lengths {sorted(lengths)}")
        names = tuple(sets)
        ids = torch.cat([sets[n].long() for n in names])
        group = torch.cat([torch.full((sets[n].shape[0],), i) for i, n in enumerate(names)])
        return cls(names, ids, group)

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])


Packing = Literal["auto", "documents", "text"]
PACKINGS: tuple[Packing, ...] = ("auto", "documents", "text")


def resolve_packing(tokenizer: Any, packing: Packing = "auto") -> Packing:
    """`packing`, with "auto" made concrete: "text" for a chat-tuned tokenizer (one with a chat
    template: its EOS ends a chat turn, e.g. `<|im_end|>`, not a document), else "documents".

    >>> class Plain: chat_template = None
    >>> resolve_packing(Plain()), resolve_packing(Plain(), "text")
    ('documents', 'text')
    """
    if packing not in PACKINGS:
        raise MsaEditError(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
    if packing != "auto":
        return packing
    return "text" if getattr(tokenizer, "chat_template", None) else "documents"


def text_blocks(
    tokenizer: Any,
    source: str | Path,
    n_seq: int,
    seq_len: int,
    *,
    split: str = "train",
    packing: Packing = "auto",
    skip: int = 0,
) -> torch.Tensor:
    """`n_seq` blocks of `seq_len` tokens `[n_seq, seq_len]` from a text data set.

    `source` is a local .txt (one document per line), .json/.jsonl or .parquet file with a "text"
    column, or a Hub data set id (where the Hub is reachable). `packing` "documents" tokenises
    each document with the tokenizer's own special tokens (e.g. a BOS) and follows it by EOS — the
    packing base LMs are trained on; "text" runs the documents together, one per line, with no
    special tokens — for chat-tuned models, whose EOS ends a turn; "auto" picks by the tokenizer
    (`resolve_packing`). The first `skip` documents are left out (e.g. to evaluate on the part of
    a file an analysis did not read). The stream is cut into consecutive blocks.
    """
    texts = _load_texts(source, split)
    packing = resolve_packing(tokenizer, packing)
    eos = tokenizer.eos_token_id if packing == "documents" else None
    ids: list[int] = []
    need = n_seq * seq_len
    documents = (text for text in texts if text.strip())
    for text in itertools.islice(documents, skip, None):
        if packing == "text":
            ids += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        else:
            ids += tokenizer(text)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise MsaEditError(
            f"{source} gives {len(ids)} tokens"
            + (f" after its first {skip} documents" if skip else "")
            + f" but {n_seq} blocks of {seq_len} need {need}; "
            "use fewer or shorter blocks, or more text"
        )
    return torch.tensor(ids[:need]).reshape(n_seq, seq_len)


def _load_texts(source: str | Path, split: str) -> list[str]:
    import datasets  # heavy import, only when data is loaded

    path = Path(source)
    builders = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if path.suffix in builders:
        if not path.is_file():
            raise MsaEditError(f"data file {path} does not exist; check the path")
        data = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    else:
        try:
            data = datasets.load_dataset(str(source), split=split)
        except Exception as exc:
            raise MsaEditError(
                f"could not load data set {str(source)!r} ({exc.__class__.__name__}); give a local "
                ".txt/.json/.parquet file or a reachable Hub id"
            ) from exc
    if "text" not in data.column_names:
        raise MsaEditError(f"{source} has no 'text' column (columns: {data.column_names})")
    return list(data["text"])


class Objective(Protocol):
    """Per-row sufficient statistics of the model's output, reduced to one value per coalition."""

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Statistics `[R, ...]` of target rows `rows` from their logits `[R, T, V]`."""
        ...

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        """One coalition's value from the statistics `[N, ...]` of all target rows."""
        ...


def token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, rows_per_chunk: int = 4
) -> torch.Tensor:
    """Next-token negative log-likelihood `[R, T-1]` (float32): logsumexp minus the target logit,
    a few rows at a time so the vocabulary-sized temporaries stay in cache."""
    targets = input_ids[:, 1:, None].to(logits.device)
    out = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk, :-1].float()
        target = chunk.gather(-1, targets[start : start + rows_per_chunk])[..., 0]
        out.append(torch.logsumexp(chunk, dim=-1) - target)
    return torch.cat(out)


class MeanNLL:
    """Mean next-token NLL per target set: output `[n_sets]` (a mode over e.g. languages)."""

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        nll = token_nll(logits, input_ids)
        return torch.stack([nll.sum(1), torch.full_like(nll[:, 0], nll.shape[1])], 1)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        sums = torch.zeros(len(targets.names), 2, dtype=torch.float64)
        sums.index_add_(0, targets.group, stats.double())
        return sums[:, 0] / sums[:, 1]


class RowNLL:
    """Mean next-token NLL of each target row: output `[N]` (one loss per block of text, so a
    removal search gets a standard error over blocks; see `msa_edit.search`)."""

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return token_nll(logits, input_ids).double().mean(1, keepdim=True)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats[:, 0].double()


class PositionNLL:
    """Next-token NLL at every position of every row: output `[N, T-1]`."""

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return token_nll(logits, input_ids)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats.double()


class NextTokenLogits:
    """Mean logits of chosen vocabulary entries at the last position: output `[len(token_ids)]`."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = torch.tensor(list(token_ids))

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return logits[:, -1, self.token_ids.to(logits.device)].float()

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats.double().mean(0)


class Accuracy:
    """Share of rows whose highest-scoring choice at the last position is the label: output `[]`.

    `choices` are the candidate token ids (e.g. " A", " B"), `labels[i]` the index of row i's
    correct choice.
    """

    def __init__(self, choices: Sequence[int], labels: torch.Tensor) -> None:
        self.choices = torch.tensor(list(choices))
        self.labels = labels.long()

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        scores = logits[:, -1, self.choices.to(logits.device)]
        return (scores.argmax(-1).cpu() == self.labels[rows]).float()[:, None]

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats.double().mean()


class Custom:
    """Any per-row function `fn(logits [R, T, V], input_ids [R, T]) -> [R, *shape]`, averaged."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return self.fn(logits, input_ids).float()

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats.double().mean(0)


class LesionGame:
    """The engine's game for `units` of `model` under `lesion`, valued by `objective`."""

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        targets: Targets,
        objective: Objective | None = None,
        lesion: LesionKind = "zero",
        *,
        alpha: float = 0.0,
        means: Mapping[Unit, torch.Tensor] | None = None,
        max_rows: int = 64,
    ) -> None:
        if max_rows < 1:
            raise MsaEditError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.units = list(units)
        self.targets = targets
        self.objective: Objective = objective if objective is not None else MeanNLL()
        self.lesion = Lesion(model, self.units, lesion, alpha=alpha, means=means)
        self.max_rows = max_rows
        self.device = next(model.parameters()).device

    @property
    def n_players(self) -> int:
        return len(self.units)

    @torch.inference_mode()
    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        n_rows = self.targets.n_rows
        b = coalitions.shape[0]
        stats: list[torch.Tensor] = []
        with self.lesion:
            for start in range(0, b * n_rows, self.max_rows):
                flat = torch.arange(start, min(start + self.max_rows, b * n_rows))
                which, rows = flat // n_rows, flat % n_rows
                self.lesion.set_coalitions(coalitions[which].cpu())
                ids = self.targets.input_ids[rows].to(self.device)
                logits = self.model(ids).logits
                stats.append(self.objective.row_stats(logits, ids, rows).cpu())
        per_row = torch.cat(stats).reshape(b, n_rows, *stats[0].shape[1:])
        return torch.stack([self.objective.reduce(s, self.targets) for s in per_row])
