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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion, LesionKind
from msa_edit.prefix import IntactPrefix
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
    """The engine's game for `units` of `model` under `lesion`, valued by `objective`.

    With `prefix_reuse` (the default, when the intact layer outputs fit in
    `prefix.MAX_BYTES`), each coalition's forward starts at its first lesioned layer, on the
    intact model's output of the layer below (`msa_edit.prefix`); values agree with full forwards
    to float rounding (within 1e-6 in fp32).
    """

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
        prefix_reuse: bool = True,
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
        prefix = IntactPrefix(model, targets.input_ids, max_rows)
        self.prefix = prefix if prefix_reuse and prefix.fits() else None
        self._layer_of = torch.tensor([u.layer for u in self.units])

    @property
    def n_players(self) -> int:
        return len(self.units)

    def starts(self, coalitions: torch.Tensor) -> torch.Tensor:
        """Each coalition's first lesioned layer `long [B]` (the layer count when it lesions
        nothing; all zeros without prefix reuse): where its forward pass starts."""
        if self.prefix is None:
            return torch.zeros(coalitions.shape[0], dtype=torch.long)
        layers = torch.where(coalitions.cpu(), self.prefix.n_layers, self._layer_of)
        return layers.amin(1).clamp_max(self.prefix.n_layers)

    @torch.inference_mode()
    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        n_rows = self.targets.n_rows
        b = coalitions.shape[0]
        starts = self.starts(coalitions)
        if self.prefix is not None and bool((starts > 0).any()):
            self.prefix.outputs()  # the intact pass, before any lesion hook is installed
        per_row: torch.Tensor | None = None
        with self.lesion:
            for start in sorted(set(starts.tolist())):
                members = (starts == start).nonzero()[:, 0]
                flat_all = (members[:, None] * n_rows + torch.arange(n_rows)).reshape(-1)
                for chunk in flat_all.split(self.max_rows):
                    which, rows = chunk // n_rows, chunk % n_rows
                    self.lesion.set_coalitions(coalitions[which].cpu())
                    ids = self.targets.input_ids[rows].to(self.device)
                    with self._skip(start, rows):
                        logits = self.model(ids, use_cache=False).logits
                    stats = self.objective.row_stats(logits, ids, rows).cpu()
                    if per_row is None:
                        per_row = torch.empty(b * n_rows, *stats.shape[1:], dtype=stats.dtype)
                    per_row[chunk] = stats
        assert per_row is not None
        per_row = per_row.reshape(b, n_rows, *per_row.shape[1:])
        return torch.stack([self.objective.reduce(s, self.targets) for s in per_row])

    def _skip(self, start: int, rows: torch.Tensor) -> AbstractContextManager[None]:
        return nullcontext() if self.prefix is None else self.prefix.skip_below(start, rows)
