"""Lesion games: a model, its units, a lesion, target data and an objective, as the engine's
`game(coalitions)`: `bool [B, n_units]` (True = intact) -> `float [B, *output_shape]`.

Each coalition's lesion is applied to its own copy of the target rows inside one batched forward
(rows are chunked to `max_rows`, so memory stays flat whatever B is); the model is never copied.

>>> # targets = Targets.from_dict({"en": text_blocks(tok, "en.txt", 8, 64), "fr": ...})
>>> # (text_blocks: msa_edit.texts)
>>> # game = LesionGame(model, select(model, "layers.*.experts.*"), targets, MeanNLL(), "reroute")
>>> # res = estimate(game, game.n_players, budget=2000)   # res.values: [n_experts, n_languages]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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


class Objective(Protocol):
    """Per-row sufficient statistics of the model's output, reduced to one value per coalition.

    `lower_is_better` says the value's sign: True for losses (a unit whose removal raises it
    helps), False for scores; results and reports store it rather than guess it from a name.
    """

    lower_is_better: bool

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

    lower_is_better = True

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

    lower_is_better = True

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return token_nll(logits, input_ids).double().mean(1, keepdim=True)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats[:, 0].double()


class PositionNLL:
    """Next-token NLL at every position of every row: output `[N, T-1]`."""

    lower_is_better = True

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return token_nll(logits, input_ids)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats.double()


class NextTokenLogits:
    """Mean logits of chosen vocabulary entries at the last position: output `[len(token_ids)]`."""

    lower_is_better = False

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

    lower_is_better = False

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
    """Any per-row function `fn(logits [R, T, V], input_ids [R, T]) -> [R, *shape]`, averaged;
    `lower_is_better` gives its sign (default: a loss)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lower_is_better: bool = True,
    ) -> None:
        self.fn = fn
        self.lower_is_better = lower_is_better

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
