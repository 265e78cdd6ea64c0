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
from msa_edit.rows import EXACT_ENDS, draw_rows, impute, on_every_row
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
    An objective whose value is a mean over rows (per target set) of statistics linear in them
    may set `averages_rows = True`: `LesionGame(rows_per_set=k)` then values coalitions on a
    sample of the rows (`msa_edit.rows`).
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
    averages_rows = True

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
    averages_rows = False

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return token_nll(logits, input_ids).double().mean(1, keepdim=True)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats[:, 0].double()


class PositionNLL:
    """Next-token NLL at every position of every row: output `[N, T-1]`."""

    lower_is_better = True
    averages_rows = False

    def row_stats(
        self, logits: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return token_nll(logits, input_ids)

    def reduce(self, stats: torch.Tensor, targets: Targets) -> torch.Tensor:
        return stats.double()


class NextTokenLogits:
    """Mean logits of chosen vocabulary entries at the last position: output `[len(token_ids)]`."""

    lower_is_better = False
    averages_rows = True

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
    averages_rows = True

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
        self.averages_rows = True

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

    With `rows_per_set = k`, each coalition runs on k rows of each target set (drawn from its bits
    and `row_seed`) and the others are filled in from the intact model (`msa_edit.rows`): a
    coalition costs k / n_set of a full one and its value is unbiased but noisy, except for
    coalitions within `exact_ends` of either end, which run on every row. Only for objectives that
    average their rows; estimators account for it (`estimate` enumerates only the exact ends).
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
        rows_per_set: int | None = None,
        row_seed: int = 0,
    ) -> None:
        if max_rows < 1:
            raise MsaEditError(f"max_rows must be >= 1, got {max_rows}")
        objective = objective if objective is not None else MeanNLL()
        if rows_per_set is not None:
            k = rows_per_set
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise MsaEditError(f"rows_per_set must be an int >= 1 or unset, got {k!r}")
            if not getattr(objective, "averages_rows", False):
                raise MsaEditError(
                    f"rows_per_set needs an objective that averages its rows; "
                    f"{type(objective).__name__} does not: leave rows_per_set unset"
                )
        self.model = model
        self.units = list(units)
        self.targets = targets
        self.objective: Objective = objective
        self.lesion = Lesion(model, self.units, lesion, alpha=alpha, means=means)
        self.max_rows = max_rows
        self.device = next(model.parameters()).device
        prefix = IntactPrefix(model, targets.input_ids, max_rows)
        self.prefix = prefix if prefix_reuse and prefix.fits() else None
        self._layer_of = torch.tensor([u.layer for u in self.units])
        self.rows_per_set = rows_per_set
        self.row_seed = row_seed
        self._intact: torch.Tensor | None = None

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

    @property
    def exact_ends(self) -> int | None:
        """None when every value is exact; with row sampling, `rows.EXACT_ENDS`: only coalitions
        with at most that many lesioned or intact units are valued exactly (on every row), the
        others without bias. Estimators enumerate only those sizes (`msa_edit.shapley`)."""
        return None if self.rows_per_set is None else EXACT_ENDS

    @torch.inference_mode()
    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        coalitions = coalitions.cpu()
        every = torch.arange(self.targets.n_rows)
        if self.rows_per_set is None:
            rows_of = [every] * coalitions.shape[0]
        else:
            full = on_every_row(coalitions).tolist()
            group, k, seed = self.targets.group, self.rows_per_set, self.row_seed
            rows_of = [every if f else draw_rows(c, group, k, seed)
                       for c, f in zip(coalitions, full, strict=True)]  # fmt: skip
        stats = self._row_stats(coalitions, rows_of)
        if self.rows_per_set is not None:
            intact = self._intact_stats()
            stats = [s if len(r) == len(every) else impute(s, r, intact, self.targets.group)
                     for s, r in zip(stats, rows_of, strict=True)]  # fmt: skip
        return torch.stack([self.objective.reduce(s, self.targets) for s in stats])

    def _intact_stats(self) -> torch.Tensor:
        """The intact model's statistics of every target row (computed once)."""
        if self._intact is None:
            intact = torch.ones(1, self.n_players, dtype=torch.bool)
            self._intact = self._row_stats(intact, [torch.arange(self.targets.n_rows)])[0]
        return self._intact

    def _row_stats(
        self, coalitions: torch.Tensor, rows_of: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The objective's statistics `[len(rows_of[b]), ...]` of each coalition b on its rows,
        in batched forwards of at most `max_rows` rows (grouped by where the forward starts)."""
        starts = self.starts(coalitions)
        if self.prefix is not None and bool((starts > 0).any()):
            self.prefix.outputs()  # the intact pass, before any lesion hook is installed
        which_all = torch.cat([torch.full((len(r),), b) for b, r in enumerate(rows_of)])
        rows_all = torch.cat(list(rows_of))
        per_row: torch.Tensor | None = None
        with self.lesion:
            for start in sorted(set(starts.tolist())):
                flat_all = (starts[which_all] == start).nonzero()[:, 0]
                for chunk in flat_all.split(self.max_rows):
                    which, rows = which_all[chunk], rows_all[chunk]
                    self.lesion.set_coalitions(coalitions[which])
                    ids = self.targets.input_ids[rows].to(self.device)
                    with self._skip(start, rows):
                        logits = self.model(ids, use_cache=False).logits
                    stats = self.objective.row_stats(logits, ids, rows).cpu()
                    if per_row is None:
                        per_row = torch.empty(len(rows_all), *stats.shape[1:], dtype=stats.dtype)
                    per_row[chunk] = stats
        assert per_row is not None
        return list(per_row.split([len(r) for r in rows_of]))

    def _skip(self, start: int, rows: torch.Tensor) -> AbstractContextManager[None]:
        return nullcontext() if self.prefix is None else self.prefix.skip_below(start, rows)
