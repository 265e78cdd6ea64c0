"""Plans: which units to remove (or scale), under budgets; saved as the run directory's plan.json.

`make_plan` ranks by Shapley modes: contribution to target behaviours relative to behaviours to
retain. Scores are in "help" units: for a loss-like value (NLL; `lower_is_better=True`) a unit
helps a target when its Shapley value is negative, so help = -value. For a target set T and
retained sets R,

    selectivity_i = mean_{t in T} help_{i,t} - max(0, max_{r in R} help_{i,r})

with a standard error from the Shapley stderrs; `least_useful` ranks by -mean help over all
targets instead (compression: remove what the model needs least). A `Plan` can also come from
leave-one-out, a search over removal sets or the router's statistics (`Plan.method`; see
`msa_edit.search` and `msa_edit.routing`) — for compression those beat Shapley ranking.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from msa_edit.atomic import read_json, write_json
from msa_edit.errors import MsaEditError, short
from msa_edit.shapley.result import InteractionResult
from msa_edit.units import Unit

Action = Literal["remove", "prune", "scale"]
Mode = Literal["specific", "least_useful"]
Method = Literal["shapley", "loo", "search", "reap", "frequency"]
METHODS: tuple[Method, ...] = ("shapley", "loo", "search", "reap", "frequency")
"""How a plan chooses its units: by Shapley modes (`make_plan`), by leave-one-out or a search
that evaluates removal sets with the game (`msa_edit.search`), or by the router's statistics
(`msa_edit.routing`: REAP saliency, selection frequency)."""


def specificity(values: torch.Tensor, lower_is_better: bool = True) -> torch.Tensor:
    """How much more each unit helps each target than it helps any other target: `[n_units, T]`.

    `values[i, t]` is unit i's Shapley value for target t (e.g. mean NLL of language t, where a
    unit that helps has a negative value). The result is positive only where unit i helps target
    t more than every other target; the most specific unit of t is `argmax` of column t.

    >>> phi = torch.tensor([[-1.0, -0.9], [-0.5, 0.0]])   # unit 0 helps both, unit 1 only t0
    >>> specificity(phi).tolist()
    [[0.10000002384185791, -0.10000002384185791], [0.5, -0.5]]
    """
    if values.dim() != 2 or values.shape[1] < 2:
        raise MsaEditError(f"specificity needs values [n_units, T >= 2], got {list(values.shape)}")
    helps = -values if lower_is_better else values
    columns = []
    for t in range(values.shape[1]):
        others = torch.cat([helps[:, :t], helps[:, t + 1 :]], dim=1)
        columns.append(helps[:, t] - others.max(dim=1).values)
    return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class Budget:
    """How many units a plan may take, and the guards it must respect.

    `per_layer`: at most k units per layer; `fraction`: at most this share of all units;
    `min_keep_per_layer`: never leave fewer units of a kind in a layer (e.g. the router's top-k);
    `min_z`: only units whose score is at least this many standard errors above zero.
    """

    per_layer: int | None = None
    fraction: float | None = None
    min_keep_per_layer: int = 0
    min_z: float | None = None

    def __post_init__(self) -> None:
        if self.per_layer is None and self.fraction is None:
            raise MsaEditError("a budget needs per_layer (k per layer) or fraction (share of all)")
        if self.per_layer is not None and self.per_layer < 1:
            raise MsaEditError(f"per_layer must be >= 1, got {self.per_layer}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise MsaEditError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_keep_per_layer < 0:
            raise MsaEditError(f"min_keep_per_layer must be >= 0, got {self.min_keep_per_layer}")


@dataclass(frozen=True)
class Plan:
    """What to do to which units, with the scores that chose them (the plan.json contract).

    `method` says how the units were chosen (see `METHODS`); a search records its candidates,
    their calibration loss on both halves and the coalitions it spent in `search`.
    """

    action: Action
    units: tuple[str, ...]
    scores: dict[str, float]
    target: list[str]
    base_model: str
    retain: list[str] = field(default_factory=list)
    mode: Mode = "specific"
    budget: dict[str, Any] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    shapley: dict[str, Any] = field(default_factory=dict)
    method: Method = "shapley"
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def unit_list(self) -> list[Unit]:
        return [Unit.parse(name) for name in self.units]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["units"] = list(self.units)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Plan:
        """A plan from its plan.json object; every field's type is checked (one error line).

        Unit names are stored canonically; `scores`, `stderr` and `alpha` map unit names to
        finite numbers, and each alpha (a scale factor) is within ±`MAX_ALPHA`.

        >>> Plan.from_json({"action": "scale", "units": ["layers.0.experts.1"], "scores": {},
        ...                 "target": ["ru"], "base_model": "m",
        ...                 "alpha": {"layers.0.experts.1": 1e9}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        msa_edit.errors.MsaEditError: plan alpha of layers.0.experts.1 is 1e+09; a scale factor ...
        """
        if not isinstance(obj, Mapping):
            raise MsaEditError(f"a plan is a JSON object of fields, got {_kind(obj)}; re-plan")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in set(obj) - known)
        if unknown:
            shown = short(unknown)
            raise MsaEditError(f"plan has unknown fields {shown}; known: {sorted(known)}")
        missing = [k for k in ("action", "units", "scores", "target", "base_model") if k not in obj]
        if missing:
            raise MsaEditError(f"plan lacks fields {missing}; re-plan or add them")
        if obj.get("action") not in ("remove", "prune", "scale"):
            action = short(obj.get("action"))
            raise MsaEditError(f"plan action must be remove, prune or scale, got {action}")
        if obj.get("method", "shapley") not in METHODS:
            method = short(obj.get("method"))
            raise MsaEditError(f"plan method must be one of {', '.join(METHODS)}, got {method}")
        if obj.get("mode", "specific") not in ("specific", "least_useful"):
            mode = short(obj.get("mode"))
            raise MsaEditError(f"plan mode must be specific or least_useful, got {mode}")
        units = _unit_names(obj["units"])
        fields: dict[str, Any] = {
            "units": units,
            "target": _strings(obj["target"], "target"),
            "retain": _strings(obj.get("retain", []), "retain"),
            "base_model": _string(obj["base_model"], "base_model"),
            "scores": _numbers(obj["scores"], "scores"),
            "stderr": _numbers(obj.get("stderr", {}), "stderr"),
            "alpha": _numbers(obj.get("alpha", {}), "alpha", units=units),
        }
        for key in ("budget", "shapley", "search"):
            fields[key] = _record(obj.get(key, {}), key)
        return cls(**{**obj, **fields})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write plan.json atomically (temp file, then rename)."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read and check plan.json: strict UTF-8 JSON (no NaN or Infinity), then `from_json`."""
        obj = read_json(path, "fix it or re-plan")
        try:
            return cls.from_json(obj)
        except MsaEditError as exc:
            raise MsaEditError(f"{path}: {exc}") from None


MAX_ALPHA = 1000.0
"""The largest |alpha| (scale factor) a plan may hold."""
MAX_DEPTH = 32
"""How deeply plan.json's records (budget, shapley, search) may nest."""


def _kind(value: Any) -> str:
    """The JSON kind of a value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, Mapping) else "an array"


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise MsaEditError(f"plan {key} must be a string, got {_kind(value)}")
    return value


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MsaEditError(f"plan {key} must be a list of target-set names (strings)")
    return list(value)


def _unit_names(value: Any) -> tuple[str, ...]:
    """Canonical unit names, each once."""
    if not isinstance(value, (list, tuple)):
        raise MsaEditError(f"plan units must be a list of unit names, got {_kind(value)}")
    names = [_unit(v, "units") for v in value]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise MsaEditError(f"plan units name {', '.join(twice[:3])} twice; list each unit once")
    return tuple(names)


def _unit(name: Any, key: str) -> str:
    """The canonical form of a unit name in plan field `key`."""
    try:
        return str(Unit.parse(name))
    except MsaEditError as exc:
        raise MsaEditError(f"plan {key}: {exc}") from None


def _numbers(value: Any, key: str, units: Sequence[str] | None = None) -> dict[str, float]:
    """A mapping of unit name -> finite number; with `units`, an alpha of plan units."""
    if not isinstance(value, Mapping):
        raise MsaEditError(f"plan {key} must map unit names to numbers, got {_kind(value)}")
    allowed = None if units is None else set(units)
    out: dict[str, float] = {}
    for name, number in value.items():
        unit = _unit(name, key)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise MsaEditError(f"plan {key} of {unit} must be a number, got {_kind(number)}")
        if not math.isfinite(number):
            raise MsaEditError(f"plan {key} of {unit} is {number}; use a finite number")
        if allowed is not None:
            if unit not in allowed:
                raise MsaEditError(
                    f"plan alpha names {unit}, which is not in the plan's units; "
                    "add it to units or drop its alpha"
                )
            if abs(number) > MAX_ALPHA:
                raise MsaEditError(
                    f"plan alpha of {unit} is {number:g}; a scale factor must be finite and "
                    f"within ±{MAX_ALPHA:g}"
                )
            name = unit
        out[name] = number
    return out


def _record(value: Any, key: str) -> dict[str, Any]:
    """A JSON object of the plan's provenance (`budget`, `shapley`, `search`), not too deep."""
    if not isinstance(value, Mapping):
        raise MsaEditError(f"plan {key} must be a JSON object, got {_kind(value)}")
    level: list[Any] = [value]
    depth = 1
    while level:
        if depth > MAX_DEPTH:
            raise MsaEditError(f"plan {key} nests deeper than {MAX_DEPTH} levels; re-plan")
        children = [v for x in level for v in (x.values() if isinstance(x, Mapping) else x)]
        level = [c for c in children if isinstance(c, (Mapping, list, tuple))]
        depth += 1
    return dict(value)


def scores(
    values: torch.Tensor,
    stderr: torch.Tensor,
    target_names: Sequence[str],
    target: Sequence[str],
    retain: Sequence[str] = (),
    mode: Mode = "specific",
    lower_is_better: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit score (higher = remove first) and its standard error, from `[n, T]` modes.

    "specific": how much the unit helps the targets (mean over them) minus how much it helps the
    retained set it helps most — a unit is specific only if no retained set needs it as much.
    "least_useful": minus its mean help to the targets (compression: the least needed go first).
    """
    values, stderr = values.reshape(values.shape[0], -1), stderr.reshape(stderr.shape[0], -1)
    cols = _columns(target_names, target)
    sign = -1.0 if lower_is_better else 1.0
    helps = sign * values.double()
    se = stderr.double().nan_to_num(posinf=1e30)
    if mode == "least_useful":
        score = -helps[:, cols].mean(1)
        return score, se[:, cols].pow(2).mean(1).sqrt() / math.sqrt(len(cols))
    score = helps[:, cols].mean(1)
    var = se[:, cols].pow(2).sum(1) / len(cols) ** 2
    if retain:
        rcols = torch.tensor(_columns(target_names, retain))
        keep, worst = helps[:, rcols].max(1)
        score = score - keep.clamp_min(0)
        worst_se = se[:, rcols].gather(1, worst[:, None]).squeeze(1)
        var = var + (keep > 0).double() * worst_se.pow(2)
    return score, var.sqrt()


def _columns(names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    if not wanted:
        raise MsaEditError("name at least one target, e.g. target=['ru']")
    missing = [w for w in wanted if w not in names]
    if missing:
        raise MsaEditError(f"targets {missing} are not in the Shapley result; it has {list(names)}")
    return [list(names).index(w) for w in wanted]


def make_plan(
    values: torch.Tensor,
    stderr: torch.Tensor,
    units: Sequence[Unit],
    target_names: Sequence[str],
    *,
    target: Sequence[str],
    budget: Budget,
    retain: Sequence[str] = (),
    mode: Mode = "specific",
    action: Action = "remove",
    base_model: str = "",
    lower_is_better: bool = True,
    layer_sizes: dict[tuple[int, str], int] | None = None,
    shapley: dict[str, Any] | None = None,
    interactions: InteractionResult | None = None,
    max_redundancy: float = 0.0,
) -> Plan:
    """Choose units by score under `budget` (see `Budget`) and return the plan.

    `layer_sizes[(layer, kind)]` is how many units of a kind each layer has (needed for
    `min_keep_per_layer`; defaults to the units given). With `interactions` (pairwise Shapley
    interaction indices over the same targets, pairs indexing `units`), a unit is not taken
    together with a chosen unit it is redundant with — redundancy above `max_redundancy`, in
    the targets' units — since removing both loses what either alone would have covered.
    """
    if values.shape[0] != len(units):
        raise MsaEditError(f"{values.shape[0]} rows of values for {len(units)} units")
    score, se = scores(values, stderr, target_names, target, retain, mode, lower_is_better)
    redundant = _redundant_pairs(
        interactions, target_names, target, lower_is_better, max_redundancy
    )
    sizes = layer_sizes or _count(units)
    limit = len(units) if budget.fraction is None else int(budget.fraction * len(units))
    taken: dict[tuple[int, str], int] = {}
    chosen: list[int] = []
    for i in torch.argsort(score, descending=True, stable=True).tolist():
        key = (units[i].layer, units[i].kind)
        if len(chosen) >= limit:
            break
        if budget.per_layer is not None and taken.get(key, 0) >= budget.per_layer:
            continue
        if sizes.get(key, 0) - taken.get(key, 0) - 1 < budget.min_keep_per_layer:
            continue
        if budget.min_z is not None and not score[i] >= budget.min_z * se[i]:
            continue
        if mode == "specific" and score[i] <= 0:
            continue
        if any((min(i, j), max(i, j)) in redundant for j in chosen):
            continue
        taken[key] = taken.get(key, 0) + 1
        chosen.append(i)
    chosen.sort(key=lambda i: units[i])
    names = tuple(str(units[i]) for i in chosen)
    return Plan(
        action=action,
        units=names,
        scores={str(u): round(float(s), 6) for u, s in zip(units, score, strict=True)},
        stderr={str(u): round(float(s), 6) for u, s in zip(units, se, strict=True)},
        target=list(target),
        retain=list(retain),
        mode=mode,
        budget={k: v for k, v in asdict(budget).items() if v is not None},
        base_model=base_model,
        shapley=shapley or {},
    )


def _redundant_pairs(
    interactions: InteractionResult | None,
    target_names: Sequence[str],
    target: Sequence[str],
    lower_is_better: bool,
    threshold: float,
) -> set[tuple[int, int]]:
    """Pairs (i < j) whose interaction makes them redundant on the targets beyond `threshold`.

    For a loss, a redundant pair of helpful units has a positive interaction index (together
    they lower the loss less than the sum of their separate effects).
    """
    if interactions is None:
        return set()
    cols = _columns(target_names, target)
    mean = interactions.values.reshape(len(interactions.pairs), -1)[:, cols].double().mean(1)
    redundancy = mean if lower_is_better else -mean
    return {
        (min(i, j), max(i, j))
        for (i, j), r in zip(interactions.pairs, redundancy.tolist(), strict=True)
        if r > threshold
    }


def _count(units: Sequence[Unit]) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for u in units:
        counts[(u.layer, u.kind)] = counts.get((u.layer, u.kind), 0) + 1
    return counts
