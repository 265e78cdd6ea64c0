"""YAML recipe schema: one file describes one run, model -> units -> lesion games -> plan -> export.

The pydantic models below are both the Python API and the YAML schema (unknown keys are errors).
`load_recipe` reads a file, applies `--set key.path=value` overrides and validates it; every
problem is one `MsaEditError` line naming the file and the key path, echoing at most a short,
clipped piece of the input. Local data paths are resolved against the recipe's folder and must
exist; anything that looks like a Hub id is kept. A YAML file whose anchors and aliases expand to
more than `MAX_YAML_VALUES` values is refused before anything is built from it.

>>> r = Recipe(model={"path": "org/model"}, units=["layers.*.experts.*"],
...            targets={"sets": {"en": {"path": "org/english"}}}, estimator={"budget": 400})
>>> r.estimator.method, r.lesion.kind, r.plan is None
('auto', 'reroute', True)
>>> Recipe.from_yaml(r.to_yaml()) == r
True
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from huggingface_hub.utils import validate_repo_id
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from msa_edit import optional
from msa_edit.errors import MsaEditError, short
from msa_edit.hub import is_repo_id
from msa_edit.lesions import LESION_KINDS, LESIONS
from msa_edit.plan import MAX_ALPHA, Action, Budget, Method, Mode
from msa_edit.search import SearchSettings
from msa_edit.shapley.estimate import METHODS
from msa_edit.shapley.ray_backend import RayBackend
from msa_edit.texts import Packing
from msa_edit.units import UNIT_KINDS, Unit, kinds_of

__all__ = [
    "EditStage",
    "EstimatorStage",
    "EvaluateStage",
    "ExportStage",
    "HealStage",
    "LesionStage",
    "ModelStage",
    "PlanStage",
    "Recipe",
    "TargetSet",
    "TargetsStage",
    "TinyMoeStage",
    "as_recipe",
    "load_recipe",
]

DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
"""Suffixes of local data files (what `texts.text_blocks` reads); other names may be Hub ids."""
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
"""A target-set (language) name: it goes into reports, metric names (`nll/<name>`) and files."""
MAX_YAML_VALUES = 100_000
"""The most values (scalars, lists, mappings) a recipe may hold once aliases are expanded."""
MAX_PROBLEMS = 5
"""How many validation problems one error line lists."""
MAX_PATH = 4096
"""The longest local path or Hub id a recipe may give (Linux's PATH_MAX)."""


class _At(ValueError):
    """A validation error at `path` below the model that raised it."""

    def __init__(self, path: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)


def _check_unit_pattern(pattern: str) -> str:
    """A canonical unit name, or a glob of one (`*` = one dotted segment); syntax only.

    >>> _check_unit_pattern("layers.*.mlp.neurons.1?")
    'layers.*.mlp.neurons.1?'
    """
    pattern = pattern.strip()
    if not any(c in pattern for c in "*?"):
        try:
            Unit.parse(pattern)
        except MsaEditError as exc:
            raise ValueError(str(exc)) from None
        return pattern
    if not kinds_of(pattern):
        raise ValueError(
            f"malformed unit glob {_short(pattern)}; globs look like layers.*, layers.*.experts.*, "
            "layers.0.heads.*, layers.*.mlp.neurons.*, layers.*.shared_experts.* (`*` matches one "
            "dotted segment)"
        )
    return pattern


def _check_data_source(source: str, info: ValidationInfo) -> str:
    """A Hub data set id as given, or a local data file resolved against the recipe's folder."""
    if not source.strip():
        raise ValueError("give a local .txt/.json/.jsonl/.parquet file or a Hub data set id")
    path = _resolve(source, info)
    looks_local = source.endswith(DATA_SUFFIXES) or source.startswith(("/", ".", "~"))
    if path is not None and _is(path, Path.is_file):
        return str(path)
    if looks_local or len(source) > MAX_PATH or not is_repo_id(source):
        where = _clip(str(path if path is not None else source))
        raise ValueError(f"data file {where} does not exist; fix the path or give a Hub id")
    return source


def _check_local_file(source: str, info: ValidationInfo) -> str:
    """A local file resolved against the recipe's folder; it must exist."""
    path = _resolve(source, info)
    if path is None or not _is(path, Path.is_file):
        raise ValueError(f"file {_clip(str(path or source))} does not exist; fix the path")
    return str(path)


def _resolve(source: str, info: ValidationInfo) -> Path | None:
    """`source` resolved against the recipe's folder, or None if it cannot be a path at all."""
    if len(source) > MAX_PATH:
        return None
    base = Path((info.context or {}).get("base_dir", "."))
    try:
        return (base / Path(source).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):  # too long, a symlink loop, a NUL byte
        return None


def _is(path: Path, test: Callable[[Path], bool]) -> bool:
    """`test(path)` (`Path.is_file`, `Path.is_dir`), False where the OS refuses the name."""
    try:
        return bool(test(path))
    except (OSError, ValueError):
        return False


def _check_set_names(names: Sequence[str], key: str) -> None:
    """Refuse names that could not go into a report, a metric name or a file name."""
    for name in names:
        if not SET_NAME.fullmatch(name):
            raise _At(
                (key,),
                f"name {_short(name)} must be 1-64 letters, digits, '_', '.', '+' or '-' "
                "starting with a letter or digit (it goes into reports, metric names and file "
                "names); rename it",
            )


def _experts_only(pattern: str) -> bool:
    """Whether a unit name or glob can only name experts."""
    return kinds_of(pattern) == {"experts"}


def _channels_only(pattern: str) -> bool:
    """Whether a unit name or glob names channel units only (heads, neurons, shared experts)."""
    kinds = kinds_of(pattern)
    return bool(kinds) and all(UNIT_KINDS[k].channels is not None for k in kinds)


PosInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
"""A float that is not NaN or infinite (every float of the schema is one)."""
PosFinite = Annotated[Finite, Field(gt=0)]
NonNegFinite = Annotated[Finite, Field(ge=0)]
Factor = Annotated[Finite, Field(ge=-MAX_ALPHA, le=MAX_ALPHA)]
"""A scale factor (alpha), within ±`msa_edit.plan.MAX_ALPHA` as plan.json requires."""
UnitPattern = Annotated[str, AfterValidator(_check_unit_pattern)]
DataSource = Annotated[str, AfterValidator(_check_data_source)]
LocalFile = Annotated[str, AfterValidator(_check_local_file)]


class _Stage(BaseModel):
    """Frozen, and unknown keys are errors: the schema is the API."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyMoeStage(_Stage):
    """Build (or reuse from the cache) a tiny Mixtral trained on text files, one per language;
    `config` sets `msa_edit.tiny_moe.TinyMoeConfig` fields (size, family, training knobs)."""

    texts: dict[str, LocalFile]
    steps: PosInt | None = None
    seed: NonNegInt = 0
    config: dict[str, StrictInt | Finite | StrictStr] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some_texts(self) -> TinyMoeStage:
        if not self.texts:
            raise _At(("texts",), "give at least one language file, e.g. en: en.txt")
        _check_set_names(list(self.texts), "texts")
        self.tiny_moe_config()
        return self

    def tiny_moe_config(self) -> Any:
        """The `TinyMoeConfig` that `config` describes (`steps` and `seed` stay separate keys).

        >>> stage = TinyMoeStage.model_construct(texts={}, config={"layers": 2, "experts": 4})
        >>> stage.tiny_moe_config().experts, stage.tiny_moe_config().hidden
        (4, 128)
        """
        from dataclasses import fields

        from msa_edit.tiny_moe import TinyMoeConfig

        known = {f.name: f.type for f in fields(TinyMoeConfig)}
        kinds: dict[str, Any] = {"int": int, "float": (int, float), "str": str}
        for key, value in self.config.items():
            if key in ("steps", "seed"):
                raise _At(("config", key), f"set tiny_moe.{key}, not tiny_moe.config.{key}")
            if key not in known:
                names = ", ".join(known)
                raise _At(("config", key), f"unknown TinyMoeConfig field; known: {names}")
            if isinstance(value, bool) or not isinstance(value, kinds[str(known[key])]):
                raise _At(("config", key), f"must be {known[key]}, got {value!r}")
        try:
            return TinyMoeConfig(**dict[str, Any](self.config))
        except MsaEditError as e:
            raise _At(("config",), str(e)) from None


class ModelStage(_Stage):
    """The model to analyse: a local folder, a `.gguf` file or `package:NAME` (the `.gguf` an
    installed package ships; made a plain folder once, `msa_edit.gguf`), a Hub id, or a tiny MoE
    built from text; its dtype, optional 4/8-bit loading and accelerate device map.
    `embeddings: float16` stores the token embeddings and output head of the 4/8-bit load in
    float16 while it computes in `dtype` (`msa_edit.half_embeddings`: bitsandbytes leaves them
    unquantised, and on a small dense model they are most of a 4-bit footprint)."""

    path: str | None = Field(default=None, min_length=1)
    tiny_moe: TinyMoeStage | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    bits: Literal[4, 8] | None = None
    embeddings: Literal["float16"] | None = None
    device_map: str | None = None
    trust_remote_code: StrictBool = Field(
        default=False,
        description="Run the model repository's own Python code (from_pretrained's "
        "trust_remote_code); only for repositories you trust.",
    )

    @model_validator(mode="after")
    def _half_embeddings_with_bits(self) -> ModelStage:
        if self.embeddings is not None and self.bits is None:
            raise _At(
                ("embeddings",),
                "only used with bits: 4 or 8 (the quantised load; edits and exports keep the "
                "full-precision embeddings)",
            )
        return self

    @model_validator(mode="after")
    def _one_source(self) -> ModelStage:
        if (self.path is None) == (self.tiny_moe is None):
            raise _At(
                ("path",),
                "give exactly one of path (a model folder or Hub id) "
                "or tiny_moe (texts to train on)",
            )
        return self

    @property
    def name(self) -> str:
        """The model's path or Hub id, or 'tiny-moe' for a built one."""
        return self.path if self.path is not None else "tiny-moe"


class TargetSet(_Stage):
    """One named target set: `n_seq` blocks of `seq_len` tokens from a data file or Hub id,
    after its first `skip` documents."""

    path: DataSource
    n_seq: PosInt = 24
    seq_len: Annotated[StrictInt, Field(ge=2)] = 64
    split: str = "train"
    skip: NonNegInt = 0


class TargetsStage(_Stage):
    """The behaviours measured: named target sets, which of them to retain, the objective, and
    how text becomes token blocks for the analysis and the evaluation (`packing`: "documents",
    each line a document ended by EOS; "text", lines run together; "auto", "text" for chat-tuned
    tokenizers, see `msa_edit.texts.resolve_packing`)."""

    sets: dict[str, TargetSet]
    retain: tuple[str, ...] = ()
    objective: Literal["mean_nll", "position_nll"] = "mean_nll"
    packing: Packing = "auto"

    @model_validator(mode="after")
    def _retain_known(self) -> TargetsStage:
        if not self.sets:
            raise _At(("sets",), "give at least one target set, e.g. en: {path: en.txt}")
        _check_set_names(list(self.sets), "sets")
        for i, name in enumerate(self.retain):
            if name not in self.sets:
                raise _At(("retain", str(i)), _unknown_set(name, self.sets))
        return self


class LesionStage(_Stage):
    """How a unit is taken out during analysis (and by the matching editor)."""

    kind: str = "reroute"
    alpha: Factor = 0.0

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in LESION_KINDS:
            raise ValueError(
                f"unknown lesion {_short(kind)}; choose one of {', '.join(LESION_KINDS)}"
            )
        return kind

    @model_validator(mode="after")
    def _alpha_for_scale(self) -> LesionStage:
        if not LESIONS[self.kind].scales and self.alpha != 0.0:
            raise _At(("alpha",), f"only used with kind 'scale' (kind is {self.kind!r})")
        return self


class ScreenStage(_Stage):
    """A cheap screen that narrows `units` to the `keep` most `target`-specific candidates
    before the analysis or the plan (`msa_edit.screens.screen`: `lape` over MLP neurons,
    `gradient` x activation over heads and neurons; several methods take turns). It reads the
    target sets' calibration blocks once (forwards, no coalitions); screen.json keeps its pick."""

    method: tuple[Literal["lape", "gradient"], ...] = ("gradient",)
    keep: PosInt
    target: str | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _method_as_list(cls, value: Any) -> Any:
        """Accept one method as a one-item list."""
        return [value] if isinstance(value, str) else value

    @field_validator("method")
    @classmethod
    def _some_method(cls, method: tuple[str, ...]) -> tuple[str, ...]:
        if not method:
            raise ValueError("give at least one screen method: lape or gradient")
        return method


class EstimatorStage(_Stage):
    """Arguments of `msa_edit.shapley.estimate` (see its docstring).

    `backend: ray` spreads the coalitions over Ray workers, each loading the model itself;
    `workers`, `cpus_per_worker` and `gpus_per_worker` are `RayBackend`'s fields.
    `rows_per_set: k` values each coalition on k blocks of each target set, the others filled in
    from the intact model (`msa_edit.rows`; objective mean_nll only): more coalitions for the
    same compute, each noisier. Off by default; where it pays: `evals/bench_rows.py`.
    """

    method: str = "auto"
    budget: PosInt | None = None
    seed: NonNegInt = 0
    batch_size: PosInt = 64
    rows_per_forward: PosInt = 64
    rows_per_set: PosInt | None = None
    tol: PosFinite | None = None
    topk: PosInt | None = None
    checkpoint: str | None = None
    checkpoint_every: NonNegFinite = 30.0
    backend: Literal["local", "ray"] = "local"
    workers: PosInt | None = None
    cpus_per_worker: PosInt = 1
    gpus_per_worker: NonNegFinite | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown method {_short(method)}; choose one of {', '.join(METHODS)}")
        return method

    @field_validator("backend")
    @classmethod
    def _ray_installed(cls, backend: str) -> str:
        if backend == "ray" and not optional.available("ray"):
            raise ValueError(optional.missing("ray", "backend ray"))
        return backend

    @model_validator(mode="after")
    def _workers_for_ray(self) -> EstimatorStage:
        if self.backend == "local":
            for key in ("workers", "cpus_per_worker", "gpus_per_worker"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise _At((key,), "only used with backend 'ray' (backend is 'local')")
        return self

    def ray_backend(self) -> RayBackend:
        """The `RayBackend` these fields describe.

        >>> EstimatorStage(backend="ray", workers=4, gpus_per_worker=1).ray_backend().workers
        4
        """
        return RayBackend(self.workers, self.cpus_per_worker, self.gpus_per_worker)


class PlanStage(_Stage):
    """What to do with which units, chosen how (`method`), under a `Budget`.

    `mode` is the question: `least_useful` (compression: lose least on the target sets) or
    `specific` (hurt the target sets, spare the retained ones). `method` is how units are chosen:
    `shapley` ranks by the analysis' Shapley modes; `loo` by leave-one-out and `search` by
    greedy rounds that evaluate removal sets with the game (`msa_edit.search`; `coalitions`,
    `rounds`, `width`, `swaps` are its knobs); `reap` and `frequency` by the router's statistics
    (experts, `least_useful` only). For `specific` searches a retained set may rise by at most
    `retain_bound` nats, or by default `retain_z` standard errors of its own increase; with
    `min_selectivity` r also at most the target's increase / r.
    """

    action: Action = "remove"
    target: tuple[str, ...] = ()
    retain: tuple[str, ...] | None = None
    mode: Mode = "specific"
    method: Method = "shapley"
    per_layer: PosInt | None = None
    fraction: Annotated[Finite, Field(gt=0, le=1)] | None = None
    min_keep_per_layer: NonNegInt = 0
    min_z: Finite | None = None
    alpha: Factor | None = None
    coalitions: PosInt | None = None
    rounds: PosInt | None = None
    width: NonNegInt = 2
    swaps: NonNegInt = 0
    retain_bound: NonNegFinite | None = None
    retain_z: PosFinite = 2.0
    min_selectivity: PosFinite | None = None

    @model_validator(mode="after")
    def _has_budget(self) -> PlanStage:
        if self.per_layer is None and self.fraction is None:
            raise _At(("per_layer",), "a plan needs per_layer (k per layer) or fraction (share)")
        if self.mode == "specific" and not self.target:
            raise _At(("target",), "mode 'specific' needs target sets, e.g. target: [ru]")
        if (self.action == "scale") != (self.alpha is not None):
            raise _At(("alpha",), "give alpha (the factor) exactly when action is 'scale'")
        if self.method != "shapley" and self.action == "scale":
            raise _At(("method",), f"method {self.method!r} chooses removals; use action remove")
        if self.method in ("reap", "frequency") and self.mode != "least_useful":
            raise _At(
                ("method",),
                f"{self.method} is a compression score: use it with mode least_useful "
                "(for targeted removal use method search or shapley)",
            )
        searching = (
            "coalitions", "rounds", "width", "swaps", "retain_bound", "retain_z", "min_selectivity"
        )  # fmt: skip
        if self.method not in ("loo", "search"):
            for key in searching:
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise _At((key,), f"only used with method loo or search ({self.method!r})")
        return self

    def budget(self) -> Budget:
        """The plan's `Budget`.

        >>> PlanStage(fraction=0.25, mode="least_useful").budget().fraction
        0.25
        """
        return Budget(self.per_layer, self.fraction, self.min_keep_per_layer, self.min_z)

    def search_settings(self) -> SearchSettings:
        """The `msa_edit.search.SearchSettings` these fields describe.

        >>> PlanStage(mode="least_useful", method="search", per_layer=2).search_settings().width
        2
        """
        return SearchSettings(self.rounds, self.width, self.swaps)


class HealStage(_Stage):
    """LoRA healing after the edit (`edit.heal.heal_lora`)."""

    steps: PosInt = 50
    lr: PosFinite = 1e-3
    r: PosInt = 8
    seed: NonNegInt = 0


class EditStage(_Stage):
    """How the plan is baked into weights."""

    extra: Literal["refuse", "zero"] = "refuse"
    heal: HealStage | None = None


class EvaluateStage(_Stage):
    """Before/after evaluation: per-language NLL/perplexity/bits per byte on `texts` (after
    each one's first `skip` documents: text the analysis did not read), optional lm-eval tasks."""

    texts: dict[str, DataSource] = Field(default_factory=dict)
    n_seq: PosInt = 24
    seq_len: Annotated[StrictInt, Field(ge=2)] = 64
    skip: NonNegInt = 0
    batch_size: PosInt = 8
    heldout: StrictBool = False
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None
    lm_eval_limit: PosInt | None = None
    lm_eval_fewshot: NonNegInt | None = None

    @field_validator("lm_eval_include")
    @classmethod
    def _include_folder(cls, folder: str | None, info: ValidationInfo) -> str | None:
        if folder is None:
            return None
        path = _resolve(folder, info)
        if path is None or not _is(path, Path.is_dir):
            raise ValueError(
                f"folder {_clip(str(path or folder))} does not exist; it should hold lm-eval "
                "task YAMLs"
            )
        return str(path)

    @model_validator(mode="after")
    def _text_names(self) -> EvaluateStage:
        _check_set_names(list(self.texts), "texts")
        return self


class ExportStage(_Stage):
    """Where the edited model goes: always `model/` in the run directory, optionally the Hub.

    `timeout` bounds each Hub connect and read; a Hub call that times out or loses its
    connection is tried `retries` more times.
    """

    push: StrictBool = False
    repo_id: str | None = None
    private: StrictBool = True
    timeout: PosFinite = Field(
        default=60.0, description="Seconds each Hub connect or read may take before it fails."
    )
    retries: Annotated[StrictInt, Field(ge=0, le=10)] = Field(
        default=2,
        description="How many more times a Hub call is tried after a timeout or a lost "
        "connection (0-10).",
    )

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, repo_id: str | None) -> str | None:
        if repo_id is None:
            return None
        try:
            validate_repo_id(repo_id)
            ok = repo_id.count("/") == 1
        except ValueError:  # huggingface_hub's HFValidationError
            ok = False
        if not ok:
            raise ValueError(
                f"must look like 'namespace/name' (your user or organisation, then the model "
                f"name: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 "
                f"characters), got {_short(repo_id)}"
            )
        return repo_id

    @model_validator(mode="after")
    def _repo_for_push(self) -> ExportStage:
        if self.push and self.repo_id is None:
            raise _At(("repo_id",), "required when push is true")
        return self


class Recipe(_Stage):
    """One run: model, units and targets are required; the rest have defaults.

    `estimator` (the Shapley analysis, shapley.json) is required unless the plan chooses its
    units without Shapley values (`plan.method` loo, search, reap or frequency). Without a
    `plan` stage the run stops after the analysis.
    """

    model: ModelStage
    units: tuple[UnitPattern, ...]
    targets: TargetsStage
    screen: ScreenStage | None = None
    estimator: EstimatorStage | None = None
    lesion: LesionStage = LesionStage()
    plan: PlanStage | None = None
    edit: EditStage = EditStage()
    evaluate: EvaluateStage = EvaluateStage()
    export: ExportStage = ExportStage()

    @field_validator("units", mode="before")
    @classmethod
    def _units_as_list(cls, value: Any) -> Any:
        """Accept one glob as a one-item list."""
        return [value] if isinstance(value, str) else value

    @field_validator("units")
    @classmethod
    def _some_units(cls, units: tuple[str, ...]) -> tuple[str, ...]:
        if not units:
            raise ValueError("give at least one unit name or glob, e.g. layers.*.experts.*")
        return units

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.evaluate.heldout and self.model.tiny_moe is None:
            raise _At(("evaluate", "heldout"), "held-out text exists only for a model.tiny_moe")
        if LESIONS[self.lesion.kind].routed_only:
            for i, pattern in enumerate(self.units):
                if not _experts_only(pattern):
                    raise _At(
                        ("lesion", "kind"),
                        f"'reroute' applies to experts only but units.{i} is {pattern!r}; "
                        "use zero, mean or scale",
                    )
        if self.estimator is None and (self.plan is None or self.plan.method == "shapley"):
            raise _At(
                ("estimator",),
                "missing (required); only a plan with method loo, search, reap or frequency "
                "chooses units without a Shapley analysis",
            )
        if self.plan is not None and self.plan.method in ("reap", "frequency"):
            for i, pattern in enumerate(self.units):
                if not _experts_only(pattern):
                    raise _At(
                        ("plan", "method"),
                        f"{self.plan.method} scores experts only but units.{i} is {pattern!r}",
                    )
        if self.screen is not None:
            self._check_screen(self.screen)
        est = self.estimator
        if est is not None and est.rows_per_set is not None:
            if self.targets.objective != "mean_nll":
                raise _At(("estimator", "rows_per_set"),
                          "samples rows of objective mean_nll only (objective is "
                          f"{self.targets.objective}); remove rows_per_set")  # fmt: skip
            if est.method not in ("auto", "adjusted"):
                raise _At(("estimator", "rows_per_set"),
                          f"method {est.method} does not count the rows' noise; use method auto "
                          "or adjusted, or remove rows_per_set")  # fmt: skip
        if self.plan is not None:
            for key in ("target", "retain"):
                for i, name in enumerate(getattr(self.plan, key) or ()):
                    if name not in self.targets.sets:
                        raise _At(("plan", key, str(i)), _unknown_set(name, self.targets.sets))
        return self

    @property
    def screen_target(self) -> str | None:
        """The target set the screen ranks units for: its own, else the plan's only target."""
        if self.screen is None or self.screen.target is not None:
            return self.screen.target if self.screen else None
        target = self.plan.target if self.plan is not None else ()
        return target[0] if len(target) == 1 else None

    def _check_screen(self, screen: ScreenStage) -> None:
        target = self.screen_target
        if target is None:
            raise _At(("screen", "target"), "give the set the screen ranks units for, e.g. fr")
        if target not in self.targets.sets:
            raise _At(("screen", "target"), _unknown_set(target, self.targets.sets))
        if len(self.targets.sets) < 2:
            raise _At(("screen",), "a screen ranks specificity: give two or more target sets")
        if "lape" in screen.method:
            for i, pattern in enumerate(self.units):
                if kinds_of(pattern) != {"neurons"}:
                    raise _At(
                        ("screen", "method"),
                        f"lape ranks MLP neurons only but units.{i} is {pattern!r}; use gradient",
                    )
        elif not all(_channels_only(p) for p in self.units):
            raise _At(("screen", "method"), "gradient ranks heads, neurons and shared experts only")

    def to_yaml(self) -> str:
        """The recipe as YAML that `load_recipe` reads back to an equal `Recipe`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<recipe>", base_dir: str | Path = ".") -> Recipe:
        """Validate YAML text (see `load_recipe`; relative data paths are under `base_dir`)."""
        return _validate(_parse(text, source), source, Path(base_dir), ())


def _unknown_set(name: str, sets: Mapping[str, object]) -> str:
    return f"unknown target set {_short(name)}; targets.sets has {_clip(', '.join(sets), 200)}"


def as_recipe(
    recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()
) -> Recipe:
    """A `Recipe` from a recipe file, a plain dict (local paths relative to the working
    directory) or a `Recipe`, with `key.path=value` overrides applied.

    >>> as_recipe({"model": {"path": "org/m"}, "units": "layers.*.experts.*",
    ...            "targets": {"sets": {"en": {"path": "org/en"}}}, "estimator": {}},
    ...           ["estimator.budget=64"]).estimator.budget
    64
    """
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else dict(recipe)
    return _validate(copy.deepcopy(data), "recipe", Path.cwd(), overrides)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (`key.path=value`, value parsed as YAML) and validate a recipe file.

    >>> recipe = load_recipe("recipes/demo.yaml", ["estimator.budget=800"])  # doctest: +SKIP
    """
    path = Path(path)
    if not _is(path, Path.is_file):
        raise MsaEditError(f"recipe {path} does not exist; check the path")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MsaEditError(
            f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "save the recipe as UTF-8"
        ) from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise MsaEditError(f"cannot read recipe {path} ({reason}); check the file") from None
    return _validate(_parse(text, str(path)), str(path), path.resolve().parent, overrides)


def _parse(text: str, source: str) -> dict[str, Any]:
    """The recipe's top-level mapping."""
    try:
        data = _load_yaml(text)
    except _YamlProblem as exc:
        raise MsaEditError(f"{source}: {exc}") from None
    if not isinstance(data, dict):
        raise MsaEditError(
            f"{source}: a recipe is a mapping of stages (model, units, targets, estimator, ...), "
            f"got {type(data).__name__}"
        )
    return data


def _validate(
    data: dict[str, Any], source: str, base_dir: Path, overrides: Sequence[str]
) -> Recipe:
    for override in overrides:
        try:
            _apply_override(data, override)
        except MsaEditError as exc:
            raise MsaEditError(f"{source}: {exc}") from None
    try:
        return Recipe.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        raise MsaEditError(f"{source}: {_describe(exc)}") from None


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Set `key.path=value` in `data`, creating missing stages; the path must be in the schema."""
    key, sep, raw = override.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise MsaEditError(
            f"--set {_short(override)}: write key.path=value, e.g. estimator.budget=800"
        )
    what = f"--set {_short(override)}"
    _schema_at(keys, what)
    try:
        value = _load_yaml(raw, "the value")
    except _YamlProblem as exc:
        problem = f"the value is {exc}" if str(exc).startswith("not valid") else str(exc)
        raise MsaEditError(f"{what}: {problem}") from None
    node = data
    for i, part in enumerate(keys[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = _clip(".".join(keys[: i + 1]))
            raise MsaEditError(f"{what}: {where} is not a mapping in the recipe")
        node = child
    node[keys[-1]] = value


def _unwrap(tp: Any) -> Any:
    """The type inside `Annotated[...]` and `X | None`."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _schema_at(keys: Sequence[str], what: str) -> Any:
    """The schema type at `keys` (dict fields take any key); unknown keys are errors."""
    tp: Any = Recipe
    for i, key in enumerate(keys):
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and key in tp.model_fields:
            tp = tp.model_fields[key].annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            where = _clip(".".join(keys[:i])) or "the recipe"
            raise MsaEditError(f"{what}: unknown key {_short(key)} in {where}{_expected(tp)}")
    return tp


def _expected(tp: Any) -> str:
    """'; expected one of ...' for a model type, else ''."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"; expected one of {', '.join(tp.model_fields)}"
    return ""


def _describe(exc: ValidationError) -> str:
    """A validation error's problems on one line (` | ` between, at most `MAX_PROBLEMS`), each
    with its key path."""
    errors = exc.errors(include_url=False)
    problems = [_describe_one(err) for err in errors[:MAX_PROBLEMS]]
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"... and {len(errors) - MAX_PROBLEMS} more problems")
    return " | ".join(problems)


def _describe_one(err: Any) -> str:
    loc = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _At):
        loc += cause.path
    path = ".".join(_clip(part, 40) for part in loc) or "recipe"
    error_type = err["type"]
    if error_type == "missing":
        return f"{path}: missing (required)"
    if error_type in ("model_type", "dict_type"):
        return f"{path}: must be a mapping (got {_short(err.get('input'))})"
    if error_type == "extra_forbidden":
        parent = _schema_at(loc[:-1], path) if loc[:-1] else Recipe
        return f"{path}: unknown key{_expected(parent)}"
    message = str(err["msg"]).removeprefix("Value error, ").split(", unable")[0]
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    if error_type != "value_error" and not isinstance(cause, _At):
        message += f" (got {_short(err.get('input'))})"
    return _clip(f"{path}: {message}", 400)


def _short(value: Any) -> str:
    """A bounded repr of a piece of user input (long strings and lists are elided)."""
    try:
        return short(value)
    except ValueError:  # an int of more digits than Python will print
        return f"<{type(value).__name__}>"


def _clip(text: str, limit: int = 120) -> str:
    """`text` on one line, at most about `limit` characters (the middle elided)."""
    if len(text) > limit:
        text = text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 2) :]
    return "".join(c if c.isprintable() else " " for c in text)


class _YamlProblem(ValueError):
    """Why YAML text cannot be a recipe (or a --set value): the message completes a sentence."""


def _load_yaml(text: str, what: str = "the recipe") -> Any:
    """`yaml.safe_load`, but refusing an anchor/alias bomb or a self-referring anchor before
    anything is built from it (the node graph is composed first and measured with every alias
    expanded), and turning every parse problem into `_YamlProblem`.

    >>> _load_yaml("{a: &x [1, 2], b: *x}")
    {'a': [1, 2], 'b': [1, 2]}
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, MAX_YAML_VALUES, what)
        if size > MAX_YAML_VALUES:
            raise _YamlProblem(
                f"the YAML expands to more than {MAX_YAML_VALUES:,} values (anchors/aliases?); "
                f"write {what} out plainly"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise _YamlProblem(f"not valid YAML{where} ({_clip(str(problem))})") from None
    except RecursionError:
        raise _YamlProblem("not valid YAML (nested too deeply)") from None
    except ValueError as exc:
        if isinstance(exc, _YamlProblem):
            raise
        # a value PyYAML recognises but cannot build: a huge integer, a date like 2024-13-45
        raise _YamlProblem(f"not valid YAML ({_clip(str(exc).split(':')[0])})") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node, limit: int, what: str) -> int:
    """How many nodes `root` holds with every alias expanded, counted up to `limit` + 1
    (a shared node counts each time it is used); a node inside itself is a `_YamlProblem`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _YamlProblem(
                f"a YAML anchor is used inside itself (a recursive alias); write {what} out plainly"
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
