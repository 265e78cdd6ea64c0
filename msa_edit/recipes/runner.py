"""Carry out a recipe stage by stage, reading and writing the run directory of DESIGN.md.

    analyze  -> shapley.json (+ shapley.safetensors for tensor modes), resumable via shapley.ckpt
    plan     -> plan.json (from shapley.json; may be edited by hand before `edit`)
    edit     -> model/ (plan applied, exported) and edit.json
    evaluate -> eval.json (before = base model, after = edited model)
    export   -> model card with the metrics, optional push to the Hub, report.md with its plots

`run` does all of them in one process, keeping the model loaded. Every file is written atomically
(temp file, then rename), and nothing is written before the recipe, the model, its units and the
target data have all been checked, so a bad recipe leaves no trace in the run directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from msa_edit import optional
from msa_edit.atomic import atomic_path, read_json, write_json, write_text
from msa_edit.checkpoints import checkpoint_shards
from msa_edit.edit import EditRecord, apply_plan
from msa_edit.edit.experts import removal_layout
from msa_edit.edit.tensorfile import read_header
from msa_edit.errors import MsaEditError
from msa_edit.evaluate.language import (
    language_nll,
    read_eval_json,
    selectivity,
    write_eval_json,
)
from msa_edit.export import CardInfo, export_checkpoint, export_model, push_to_hub, update_card
from msa_edit.fingerprint import (
    Fingerprint,
    changes,
    describe_changes,
    file_digest,
    flatten,
    folder_digests,
)
from msa_edit.games import LesionGame, MeanNLL, Objective, PositionNLL, RowNLL, Targets
from msa_edit.gguf import plain_path
from msa_edit.half_embeddings import store_half
from msa_edit.lesions import LESIONS, lesioned, scaled, unit_means
from msa_edit.plan import Plan, make_plan
from msa_edit.progress import format_duration
from msa_edit.quantize import load_quantized
from msa_edit.recipes.removal import check_feasible, choose_removals
from msa_edit.recipes.schema import EstimatorStage, ModelStage, Recipe, load_recipe
from msa_edit.recipes.screening import read_screen, screened, write_screen
from msa_edit.routing import routing_stats
from msa_edit.rows import EXACT_ENDS
from msa_edit.rundir import (
    CHECKPOINT,
    EDIT_JSON,
    EVAL_JSON,
    MODEL_DIR,
    PLAN_JSON,
    RECIPE_YAML,
    SEARCH_CHECKPOINT,
    SHAPLEY_JSON,
    SHAPLEY_TENSOR,
    locked,
)
from msa_edit.shapley import ShapleyResult, estimate
from msa_edit.shapley.cache import checkpoint_size
from msa_edit.shapley.checkpoint import read_checkpoint
from msa_edit.shapley.estimate import check_request, default_budget
from msa_edit.shapley.ray_backend import RayBackend
from msa_edit.tensorjson import decode, encode
from msa_edit.texts import resolve_packing, text_blocks
from msa_edit.tiny_moe import HELDOUT_DIR, build_tiny_moe
from msa_edit.units import Unit, discover, select

log = logging.getLogger(__name__)

Say = Callable[[str], None]
StageFn = TypeVar("StageFn", bound=Callable[..., Any])


def say_line(message: str) -> None:
    """Print one progress line now (also when stdout is a pipe or a file)."""
    print(message, flush=True)


@dataclass
class Loaded:
    """A loaded model with its tokenizer, the folder it came from and its base-model name;
    `in_memory` when the caller handed the model over (its weights may differ from `folder`)."""

    model: PreTrainedModel
    tokenizer: Any
    folder: str
    name: str
    in_memory: bool = False


def load_model(stage: ModelStage, *, quantized: bool = True, say: Say = say_line) -> Loaded:
    """Load (building first, for `tiny_moe`) the recipe's model; 4/8-bit when asked and `quantized`.

    >>> # loaded = load_model(load_recipe("recipes/demo.yaml").model)
    """
    bits = f", {stage.bits}-bit" if stage.bits and quantized else ""
    if stage.bits and quantized:
        optional.require("bitsandbytes", f"{stage.bits}-bit loading")  # before any work
    say(f"model: {stage.name} ({stage.dtype}{bits})")
    folder = model_source(stage, say)
    check_fits(stage, folder, stage.bits if quantized else None)
    return _load(folder, stage, stage.bits if quantized else None, name=stage.name)


def model_source(stage: ModelStage, say: Say = say_line) -> str:
    """The recipe model's folder or Hub id (a tiny MoE is built first and a GGUF file made a plain
    folder first, or either is taken from the cache)."""
    if stage.tiny_moe is not None:
        spec = stage.tiny_moe
        say("model: tiny MoE from its texts (trained on first use, minutes on a CPU; then cached)")
        config = spec.tiny_moe_config()
        return str(build_tiny_moe(spec.texts, steps=spec.steps, seed=spec.seed, config=config))
    assert stage.path is not None
    return plain_path(stage.path)


def _load(folder: str, stage: ModelStage, bits: int | None, name: str) -> Loaded:
    dtype = getattr(torch, stage.dtype)
    local = Path(folder).expanduser()
    if folder.startswith(("/", ".", "~")) and not local.is_dir():
        raise MsaEditError(f"model folder {local} does not exist; fix model.path")
    check_device(stage.device_map)
    remote = stage.trust_remote_code
    try:
        if bits is not None:
            device = None if stage.device_map in (None, "auto") else stage.device_map
            model = load_quantized(folder, bits, dtype=dtype, device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, device_map=stage.device_map, trust_remote_code=remote
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
        if bits is not None and stage.embeddings == "float16":
            store_half(model)
    except MsaEditError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise MsaEditError(
            f"cannot load model {folder!r} ({reason}); give a local model folder with "
            "config.json, weights and tokenizer, or a Hub id you can reach"
        ) from None
    model.eval()
    return Loaded(model, tokenizer, folder, name)


BYTES_PER_PARAMETER = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, 8: 1.0, 4: 0.6}
"""Memory per parameter of a load (4-bit: half a byte plus the layers kept in 16 bits)."""


def memory_bytes() -> tuple[int, str]:
    """The memory a model load can use here and where: all GPUs' memory, or the machine's RAM."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(n))
        return total, f"{n} GPU(s)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "no GPU; CPU memory"


def check_fits(stage: ModelStage, folder: str, bits: int | None) -> None:
    """Refuse, before loading, a local checkpoint that cannot fit this machine's memory, in one
    line with what it needs (Hub ids are not measured before they are downloaded)."""
    local = Path(folder).expanduser()
    if not local.is_dir():
        return
    try:
        shards = checkpoint_shards(local)
    except MsaEditError:
        return  # not a safetensors checkpoint: the loader says what is wrong
    params = sum(math.prod(t.shape) for f in shards for t in read_header(f).values())
    need = params * BYTES_PER_PARAMETER[bits or stage.dtype]
    have, where = memory_bytes()
    if need > 0.9 * have:
        load = f"{bits}-bit" if bits else stage.dtype
        raise MsaEditError(
            f"model {stage.name} needs ~{need / 2**30:.1f} GB ({params / 1e9:.2f} B parameters in "
            f"{load}) but this machine has {where}: {have / 2**30:.1f} GB; run it on a machine "
            "with more GPU memory, load it with model.bits: 4, or pick a smaller model"
        )


def check_device(device_map: str | None) -> None:
    """Refuse a `device_map` naming a CUDA device this machine does not have, in one line.

    >>> check_device(None), check_device("cpu")
    (None, None)
    """
    if device_map is None or not device_map.startswith("cuda"):
        return
    count = torch.cuda.device_count()
    index = device_map.partition(":")[2]
    if count == 0 or (index.isdigit() and int(index) >= count):
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise MsaEditError(
            f"model.device_map {device_map!r}, but this machine has {have}; "
            "set model.device_map to cpu, auto or an existing cuda:N"
        )


# --------------------------------------------------------------------------- run directory


def _read_json(path: Path, made_by: str) -> Any:
    if not path.is_file():
        raise MsaEditError(f"{path} does not exist; run `msa-edit {made_by}` first")
    return read_json(path, f"fix it or rerun `msa-edit {made_by}`")


def per_target(modes: torch.Tensor, targets: Targets, objective: str) -> torch.Tensor:
    """Modes `[n, *shape]` as one number per target set `[n, T]` (position modes: their mean).

    >>> t = Targets.from_dict({"a": torch.zeros(1, 3, dtype=torch.long),
    ...                        "b": torch.zeros(2, 3, dtype=torch.long)})
    >>> per_target(torch.tensor([[[1.0, 3.0], [0.0, 0.0], [4.0, 4.0]]]), t, "position_nll")
    tensor([[2., 2.]], dtype=torch.float64)
    """
    if objective == "mean_nll":
        return modes.double().reshape(modes.shape[0], -1)
    groups = [targets.group == t for t in range(len(targets.names))]
    return torch.stack([modes[:, g].double().mean((1, 2)) for g in groups], 1)


def shapley_record(
    result: ShapleyResult, units: list[Unit], targets: Targets, recipe: Recipe
) -> dict[str, Any]:
    """The shapley.json contract: `values[i][t]` is unit i's contribution to target t.

    For position modes the per-target value is the mean over the set's tokens and its stderr
    the mean of the per-token stderr (an upper bound on the mean's standard error).
    """
    objective = recipe.targets.objective

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return per_target(t, targets, objective)

    one = result.v_full.unsqueeze(0)
    trace = [
        {"n_evaluations": p.n_evaluations, "values": encode(reduce(p.values)),
         "stderr": encode(reduce(p.stderr))}
        for p in result.trace
        if p.values.shape == result.values.shape
    ]  # fmt: skip
    return {
        "units": [str(u) for u in units],
        "targets": list(targets.names),
        "values": encode(reduce(result.values)),
        "stderr": encode(reduce(result.stderr)),
        "n_evaluations": result.n_evaluations,
        "method": result.method,
        "surrogate": result.surrogate,
        "seed": result.seed,
        "budget": result.budget,
        "stopped": result.stopped,
        "v_full": encode(reduce(one))[0],
        "v_empty": encode(reduce(result.v_empty.unsqueeze(0)))[0],
        "lesion": recipe.lesion.kind,
        "objective": objective,
        "lower_is_better": recipe_objective(recipe).lower_is_better,
        "model": recipe.model.name,
        "output_shape": list(result.values.shape[1:]),
        "trace": trace,
    }


def read_shapley(out: Path) -> dict[str, Any]:
    """The run directory's shapley.json, checked for the fields the later stages need."""
    record = _read_json(out / SHAPLEY_JSON, "analyze")
    missing = [k for k in ("units", "targets", "values", "stderr") if k not in record]
    if missing:
        raise MsaEditError(f"{out / SHAPLEY_JSON} lacks {missing}; rerun `msa-edit analyze`")
    return dict(record)


# --------------------------------------------------------------------------- analyze


def load_targets(recipe: Recipe, tokenizer: Any) -> Targets:
    """Token blocks of every target set (all files are read now, so errors come early)."""
    sets = recipe.targets.sets
    packing = recipe.targets.packing
    blocks = {
        name: text_blocks(
            tokenizer, s.path, s.n_seq, s.seq_len, split=s.split, packing=packing, skip=s.skip
        )
        for name, s in sets.items()
    }
    return Targets.from_dict(blocks)


def recipe_objective(recipe: Recipe) -> Objective:
    """The objective a recipe's analysis values coalitions by (`targets.objective`)."""
    return MeanNLL() if recipe.targets.objective == "mean_nll" else PositionNLL()


def lesion_game(
    recipe: Recipe,
    model: PreTrainedModel,
    units: list[Unit],
    targets: Targets,
    objective: Objective | None = None,
    *,
    analysis: bool = False,
) -> LesionGame:
    """The recipe's lesion game on `model`: its units, targets, objective and lesion (a removal
    search passes `RowNLL()`: one loss per calibration block). The Shapley analysis's game
    (`analysis`) samples rows when the estimator says `rows_per_set`; every other game sees
    every row."""
    objective = recipe_objective(recipe) if objective is None else objective
    lesion, est = recipe.lesion, _estimator(recipe)
    means = unit_means(model, units, targets.input_ids) if LESIONS[lesion.kind].uses_means else None
    return LesionGame(
        model, units, targets, objective, lesion.kind,  # type: ignore[arg-type]
        alpha=lesion.alpha, means=means, max_rows=est.rows_per_forward,
        rows_per_set=est.rows_per_set if analysis else None, row_seed=est.seed,
    )  # fmt: skip


def _exact_ends(recipe: Recipe) -> int | None:
    """The analysis game's `exact_ends`: set when it samples rows."""
    return None if _estimator(recipe).rows_per_set is None else EXACT_ENDS


def _estimator(recipe: Recipe) -> EstimatorStage:
    """The recipe's estimator settings (defaults where it has no estimator stage)."""
    return recipe.estimator or EstimatorStage()


@dataclass(frozen=True)
class RecipeGame:
    """The recipe's lesion game as a picklable `GameSpec`: `build()` loads the model from
    `folder` (4/8-bit as the recipe says) and the target data where it runs, so each Ray worker
    holds its own replica. `folder` and the data paths must be visible there.

    >>> # estimate(RecipeGame(recipe, "path/to/model"), n_units, backend="ray", workers=4)
    """

    recipe: Recipe
    folder: str
    units: tuple[str, ...] | None = None
    """The players when they are not the recipe's units (a screen narrowed them)."""

    def build(self) -> LesionGame:
        stage = self.recipe.model
        loaded = _load(self.folder, stage, stage.bits, name=stage.name)
        names = list(self.units or self.recipe.units)
        units = select(loaded.model, names)
        return lesion_game(
            self.recipe,
            loaded.model,
            units,
            load_targets(self.recipe, loaded.tokenizer),
            analysis=True,
        )

    @property
    def exact_ends(self) -> int | None:
        """The built game's `exact_ends` (`estimate` reads it before any worker builds it)."""
        return _exact_ends(self.recipe)


def game_fingerprint(
    recipe: Recipe, loaded: Loaded, units: list[Unit], objective: str
) -> Fingerprint:
    """What every coalition's value depends on: the model's files (hashed; a Hub model by its
    commit), each target text, the units, the objective, the lesion, every setting that changes
    the bits and the library versions. A checkpoint stores it and is refused when it differs."""
    fingerprint: Fingerprint = {}
    local = Path(loaded.folder).expanduser()
    if loaded.in_memory:
        fingerprint["model.parameters"] = parameters_digest(loaded.model)
    elif local.is_dir():
        fingerprint |= folder_digests(local, prefix="model/")
    else:
        fingerprint["model.hub"] = loaded.folder
        fingerprint["model.commit"] = getattr(loaded.model.config, "_commit_hash", None)
    model = recipe.model.model_dump(mode="json", exclude={"path", "tiny_moe"})
    fingerprint |= flatten(model, "setting.model")
    fingerprint["units"] = json.dumps([str(u) for u in units])
    fingerprint["targets"] = json.dumps(list(recipe.targets.sets))
    for name, spec in recipe.targets.sets.items():
        path = Path(spec.path)
        fingerprint |= flatten(spec.model_dump(mode="json", exclude={"path"}), f"targets.{name}")
        fingerprint[f"targets.{name}.text"] = file_digest(path) if path.is_file() else spec.path
    fingerprint["packing"] = resolve_packing(loaded.tokenizer, recipe.targets.packing)
    fingerprint["objective"] = objective
    fingerprint |= flatten(recipe.lesion.model_dump(mode="json"), "setting.lesion")
    fingerprint["setting.rows_per_forward"] = _estimator(recipe).rows_per_forward
    if _estimator(recipe).rows_per_set is not None:  # (absent: checkpoints made before it)
        fingerprint["setting.rows_per_set"] = _estimator(recipe).rows_per_set
        fingerprint["setting.row_seed"] = _estimator(recipe).seed
    fingerprint["version.torch"] = torch.__version__
    fingerprint["version.transformers"] = transformers.__version__
    return fingerprint


def parameters_digest(model: torch.nn.Module) -> str:
    """`sha256:<hex>` of a model's parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def _checkpoint(recipe: Recipe, out: Path) -> Path:
    """Where the analysis keeps its evaluated coalitions."""
    checkpoint = _estimator(recipe).checkpoint
    return Path(checkpoint) if checkpoint else out / CHECKPOINT


def _check_checkpoint(path: Path, n_players: int, fingerprint: Fingerprint) -> None:
    """Refuse, before anything is written, a checkpoint that is unreadable, corrupt or made for
    another game (its coalition values would be wrong)."""
    if path.exists():
        read_checkpoint(path, n_players, fingerprint)


def in_run_dir(stage: StageFn) -> StageFn:
    """Run a stage function `stage(recipe, out, ...)` holding the run directory's lock
    (`rundir.locked`), after checking that the directory was made for this recipe."""

    @functools.wraps(stage)
    def holding(recipe: Recipe, out: Path, *args: Any, **kwargs: Any) -> Any:
        with locked(out):
            check_same_run(recipe, out)
            return stage(recipe, out, *args, **kwargs)

    return cast(StageFn, holding)


RUN_DEFINING = ("units", "targets", "screen", "lesion")
"""Recipe sections (besides the model's path) that make a run directory's results what they are."""


def check_same_run(recipe: Recipe, out: Path) -> None:
    """Refuse a stage on a run directory whose recipe.yaml names another model, unit set,
    targets or lesion (its files would be mixed with this recipe's)."""
    saved = out / RECIPE_YAML
    if not saved.is_file():
        return
    try:
        old = Recipe.from_yaml(saved.read_text(encoding="utf-8"))
    except (MsaEditError, ValueError, UnicodeDecodeError):
        raise MsaEditError(
            f"{saved} is not a valid recipe; restore it or use another --out"
        ) from None
    differ = [s for s in RUN_DEFINING if getattr(old, s) != getattr(recipe, s)]
    if (old.model.path, old.model.tiny_moe) != (recipe.model.path, recipe.model.tiny_moe):
        differ.insert(0, "model")
    if differ:
        raise MsaEditError(
            f"run directory {out} was made for another recipe ({', '.join(differ)} differ from "
            f"{saved}); pass that recipe, or use another --out"
        )


@in_run_dir
def analyze(
    recipe: Recipe, out: Path, loaded: Loaded | None = None, say: Say = say_line
) -> ShapleyResult:
    """Shapley modes of the recipe's units on its target sets; writes shapley.json (resumable)."""
    if recipe.estimator is None:
        raise MsaEditError(
            "the recipe has no estimator stage, so there is nothing to analyze; add one "
            "(estimator: {budget: 512}) or run the plan stage, which evaluates its own coalitions"
        )
    loaded = loaded or load_model(recipe.model, say=say)
    targets = load_targets(recipe, loaded.tokenizer)
    units, screen = screened_units(recipe, loaded, targets, out, say)
    est = recipe.estimator
    check_request(len(units), est.method, est.budget, _exact_ends(recipe))
    fingerprint = game_fingerprint(recipe, loaded, units, recipe.targets.objective)
    checkpoint = _checkpoint(recipe, out)
    _check_checkpoint(checkpoint, len(units), fingerprint)
    prepare(recipe, out)
    write_screen(out, screen)
    sampled = "" if est.rows_per_set is None else f"; {est.rows_per_set} per set per coalition"
    say(f"analyze: {len(units)} units x {len(targets.names)} target sets "
        f"({targets.n_rows} rows{sampled})")  # fmt: skip
    game: LesionGame | RecipeGame
    backend: RayBackend | str
    if est.backend == "ray":
        names = tuple(str(u) for u in units) if recipe.screen else None
        game, backend = RecipeGame(recipe, loaded.folder, names), est.ray_backend()
        say(f"analyze: on Ray, each worker loads {loaded.folder}")
    else:
        game, backend = lesion_game(recipe, loaded.model, units, targets, analysis=True), "local"
    stored = checkpoint_size(checkpoint)
    result = estimate(
        game, len(units), est.method, est.budget, est.seed, est.batch_size,
        tol=est.tol, topk=est.topk, checkpoint=checkpoint, checkpoint_every=est.checkpoint_every,
        backend=backend, fingerprint=fingerprint, groups=[u.layer for u in units],
    )  # fmt: skip
    now = checkpoint_size(checkpoint) - stored
    say(
        f"analyze: {result.method}{f' ({result.surrogate})' if result.surrogate else ''}, "
        f"{result.n_evaluations} coalitions "
        f"({now} evaluated now, {result.n_evaluations - now} from the checkpoint), "
        f"stopped: {result.stopped}"
    )
    if result.values.dim() > 2 or recipe.targets.objective != "mean_nll":
        from safetensors.torch import save_file

        with atomic_path(out / SHAPLEY_TENSOR) as tmp:
            save_file({"values": result.values.float(), "stderr": result.stderr.float()}, str(tmp))
    write_json(out / SHAPLEY_JSON, shapley_record(result, units, targets, recipe))
    return result


# --------------------------------------------------------------------------- plan


@in_run_dir
def plan(recipe: Recipe, out: Path, say: Say = say_line, loaded: Loaded | None = None) -> Plan:
    """Choose units as the recipe's plan stage says; writes plan.json.

    `method: shapley` reads shapley.json; the other methods load the model (or use `loaded`)
    and evaluate removal sets (`loo`, `search`) or the router (`reap`, `frequency`) themselves.
    """
    stage = recipe.plan
    if stage is None:
        raise MsaEditError("the recipe has no plan stage; add plan: {target: [...], per_layer: 1}")
    if stage.method != "shapley":
        chosen = _plan_without_shapley(recipe, out, loaded, say)
    else:
        record = read_shapley(out)
        names = list(record["targets"])
        target, retain = _plan_sets(recipe, names)
        shapley = {k: record.get(k) for k in ("method", "budget", "seed", "n_evaluations")}
        chosen = make_plan(
            decode(record["values"]), decode(record["stderr"]),
            [Unit.parse(n) for n in record["units"]], names,
            target=target, retain=retain, mode=stage.mode, budget=stage.budget(),
            action=stage.action, base_model=recipe.model.name, shapley=shapley,
            lower_is_better=bool(record.get("lower_is_better", True)),
        )  # fmt: skip
    if stage.alpha is not None:
        chosen = replace(chosen, alpha={u: stage.alpha for u in chosen.units})
    chosen.save(out / PLAN_JSON)
    say(f"plan: {chosen.action} {len(chosen.units)} units: {', '.join(chosen.units) or 'none'}")
    return chosen


def screened_units(
    recipe: Recipe, loaded: Loaded, targets: Targets, out: Path, say: Say
) -> tuple[list[Unit], dict[str, Any] | None]:
    """The players of the analysis and the plan: the recipe's units, narrowed by its screen;
    and the screen's record when it ran now (to be written once the run directory exists)."""
    units = select(loaded.model, list(recipe.units))
    kept, record = screened(recipe, loaded.model, units, targets, out)
    if record is not None:
        say(
            f"screen: {' + '.join(record['method'])} kept {len(kept)} of {len(units)} units as "
            f"{record['target']}-specific ({record['rows']} calibration rows, no coalitions, "
            f"{record['seconds']:.1f} s)"
        )
    return kept, record


def _plan_sets(recipe: Recipe, names: list[str]) -> tuple[list[str], list[str]]:
    """The plan's target sets (default: all) and retained sets (default for `specific`: the
    recipe's retain list, else every set that is not a target)."""
    stage = recipe.plan
    assert stage is not None
    target = list(stage.target) or names
    retain = list(stage.retain) if stage.retain is not None else list(recipe.targets.retain)
    if stage.mode == "specific" and not retain:
        retain = [n for n in names if n not in target]
    return target, [n for n in retain if n not in target]


def _layer_sizes(model: PreTrainedModel, units: list[Unit]) -> dict[tuple[int, str], int]:
    """How many units of each (layer, kind) of `units` the model has."""
    sizes: dict[tuple[int, str], int] = {}
    for u in discover(model, sorted({u.kind for u in units})):
        sizes[(u.layer, u.kind)] = sizes.get((u.layer, u.kind), 0) + 1
    return sizes


def _plan_without_shapley(recipe: Recipe, out: Path, loaded: Loaded | None, say: Say) -> Plan:
    """A plan by leave-one-out, search, REAP or routing frequency (`recipes.removal`)."""
    stage = recipe.plan
    assert stage is not None
    loaded = loaded or load_model(recipe.model, say=say)
    targets = load_targets(recipe, loaded.tokenizer)
    units, screen = screened_units(recipe, loaded, targets, out, say)
    target, retain = _plan_sets(recipe, list(targets.names))
    sizes = _layer_sizes(loaded.model, units)
    shapley = read_shapley(out) if (out / SHAPLEY_JSON).is_file() else None
    check_feasible(stage, units, sizes, shapley is not None)
    est = _estimator(recipe)
    routing = None
    if all(u.spec.routed for u in units):
        routing = routing_stats(loaded.model, targets.input_ids, batch_size=est.rows_per_forward)
    game, checkpoint = None, None
    fingerprint = None
    if stage.method in ("loo", "search"):
        fingerprint = game_fingerprint(recipe, loaded, units, "row_nll")
        checkpoint = out / SEARCH_CHECKPOINT
        _check_checkpoint(checkpoint, len(units), fingerprint)
        prepare(recipe, out)
        write_screen(out, screen)
        game = lesion_game(recipe, loaded.model, units, targets, RowNLL())
        say(f"plan: {stage.method} over {len(units)} units on {targets.n_rows} calibration blocks")
    return choose_removals(
        stage, units, targets, target, retain, game=game, routing=routing, shapley=shapley,
        layer_sizes=sizes, checkpoint=checkpoint, fingerprint=fingerprint,
        batch_size=est.batch_size, ranked=read_screen(recipe, out, ranked=True),
        base_model=recipe.model.name, say=say,
    )  # fmt: skip


# --------------------------------------------------------------------------- edit


def apply(
    recipe: Recipe, out: Path, model: PreTrainedModel, targets: Targets | None = None
) -> list[EditRecord]:
    """Apply plan.json to `model` in place (and heal it when the recipe says); writes edit.json."""
    chosen = _read_plan(recipe, out)
    if chosen is None:
        raise MsaEditError(f"{out / PLAN_JSON} does not exist; run `msa-edit plan` first")
    records = apply_plan(model, chosen, extra=recipe.edit.extra)
    healed = None
    if recipe.edit.heal is not None:
        heal = recipe.edit.heal
        if targets is None:
            raise MsaEditError("healing needs the target data; run the edit from `msa-edit run`")
        keep = [i for i, n in enumerate(targets.names) if n not in chosen.target]
        rows = (
            torch.isin(targets.group, torch.tensor(keep))
            if keep
            else torch.ones_like(targets.group, dtype=torch.bool)
        )
        from msa_edit.edit.heal import heal_lora

        # merges into and returns the same model object, edited in place
        heal_lora(model, targets.input_ids[rows], heal.steps, heal.lr, heal.r, heal.seed)
        healed = heal.model_dump() | {"rows": int(rows.sum())}
    write_json(out / EDIT_JSON, _edit_json(records, recipe.lesion.kind, healed))
    return records


@in_run_dir
def edit(
    recipe: Recipe,
    out: Path,
    say: Say = say_line,
    loaded: Loaded | None = None,
    targets: Targets | None = None,
) -> Path:
    """Apply plan.json to the base model and export the result to model/ (no metrics yet).

    `loaded` (a full-precision base model already in memory) is edited in place. Otherwise an
    expert removal without healing is done on the checkpoint's shards, one tensor slab at a
    time (`export.export_checkpoint`), so a 4-bit recipe never materialises the full-precision
    model; other edits load the base model in full precision, apply the plan and export it.
    """
    chosen = _read_plan(recipe, out)
    if loaded is None and chosen is not None and _streamable(recipe, chosen):
        folder = model_source(recipe.model, say)
        say(f"edit: removing {len(chosen.units)} experts from the checkpoint shards of {folder}")
        path, record = export_checkpoint(
            folder, chosen.unit_list, out / MODEL_DIR, card=_card(recipe, out, None),
            extra=recipe.edit.extra, overwrite=True,
        )  # fmt: skip
        write_json(out / EDIT_JSON, _edit_json([record], recipe.lesion.kind, None))
        update_card(path, _card(recipe, out, None))  # now with this edit's record
        _say_records([record], say, recipe.lesion.kind)
        return path
    loaded = loaded or load_model(recipe.model, quantized=False, say=say)
    if targets is None and recipe.edit.heal:
        targets = load_targets(recipe, loaded.tokenizer)
    records = apply(recipe, out, loaded.model, targets)
    _say_records(records, say, recipe.lesion.kind)
    return _export(recipe, out, loaded, metrics=None)


def _read_plan(recipe: Recipe, out: Path) -> Plan | None:
    """plan.json (None when absent), refused when it was made for another base model."""
    if not (out / PLAN_JSON).is_file():
        return None
    chosen = Plan.load(out / PLAN_JSON)
    if chosen.base_model != recipe.model.name:
        raise MsaEditError(
            f"{out / PLAN_JSON} was made for base model {chosen.base_model!r}, but the recipe's "
            f"model is {recipe.model.name!r}; re-plan with this recipe or pass the plan's model"
        )
    return chosen


def check_editable(recipe: Recipe, model: PreTrainedModel, units: list[Unit]) -> None:
    """Refuse, before any analysis, an expert removal the editor will refuse whatever the values
    say: `per_layer` experts from each layer of the unit set (the most a plan takes) must leave
    top-k experts, and a layer outside the set makes the removal non-uniform."""
    stage = recipe.plan
    if (
        stage is None or stage.per_layer is None or stage.action == "scale"
        or not units or any(not u.spec.routed for u in units)
    ):  # fmt: skip
        return
    layers: dict[int, list[Unit]] = {}
    for u in units:
        layers.setdefault(u.layer, []).append(u)
    probe = [u for group in layers.values() for u in group[: stage.per_layer]]
    counts: dict[int, int] = {}
    for u in discover(model, ["experts"]):
        counts[u.layer] = counts.get(u.layer, 0) + 1
    top_k = int(getattr(model.config, "num_experts_per_tok", 1))
    try:
        removal_layout(probe, sorted(counts), max(counts.values()), top_k, recipe.edit.extra)
    except MsaEditError as exc:
        raise MsaEditError(
            f"plan.per_layer={stage.per_layer} over units {', '.join(recipe.units)} asks for an "
            f"edit that will be refused ({exc}); fix the plan or the unit set before the analysis"
        ) from None


def _streamable(recipe: Recipe, chosen: Plan) -> bool:
    """Whether the plan is an expert removal the checkpoint surgery can do (no healing)."""
    units = chosen.unit_list
    return (
        chosen.action in ("remove", "prune")
        and bool(units)
        and all(u.spec.routed for u in units)
        and recipe.edit.heal is None
    )


def _say_records(records: list[EditRecord], say: Say, lesion: str | None = None) -> None:
    for r in records:
        say(f"edit: {r.action} on {len(r.units)} units, {r.params_saved:,} parameters removed")
        if lesion is not None and r.matches != lesion:
            log.warning("edit: WARNING: %s", differs(r, lesion))  # stderr, -q and --log-file


def differs(record: EditRecord, lesion: str) -> str | None:
    """Why an edit's meaning differs from the lesion its units were analysed with (None if not).

    >>> r = EditRecord("remove_experts", ("layers.0.experts.1",), "zero", 10, 10, ("non-uniform",))
    >>> differs(r, "reroute")
    "the model computes the 'zero' lesion, not the analysed 'reroute' (non-uniform)"
    """
    if record.matches == lesion:
        return None
    notes = f" ({'; '.join(record.notes)})" if record.notes else ""
    return f"the model computes the {record.matches!r} lesion, not the analysed {lesion!r}{notes}"


def _edit_json(records: list[EditRecord], lesion: str, healed: Any) -> dict[str, Any]:
    """edit.json: each record, the lesion analysed, and where an edit's meaning differs."""
    out = []
    for r in records:
        entry = json.loads(r.to_json())
        entry["differs"] = differs(r, lesion)
        out.append(entry)
    return {"records": out, "analysed_lesion": lesion, "healed": healed}


# --------------------------------------------------------------------------- evaluate


def eval_texts(recipe: Recipe, folder: str) -> dict[str, str]:
    """Held-out texts per language: evaluate.texts, a tiny MoE's held-out files, or the targets."""
    stage = recipe.evaluate
    if stage.texts:
        return dict(stage.texts)
    if stage.heldout:
        return {
            lang: str(Path(folder) / HELDOUT_DIR / f"{lang}.txt")
            for lang in recipe.targets.sets
            if (Path(folder) / HELDOUT_DIR / f"{lang}.txt").is_file()
        }
    return {name: s.path for name, s in recipe.targets.sets.items()}


def metrics(recipe: Recipe, loaded: Loaded, texts: Mapping[str, str]) -> dict[str, float]:
    """Per-language NLL/perplexity and the recipe's lm-eval task scores of a loaded model."""
    stage = recipe.evaluate
    out = language_nll(
        loaded.model, loaded.tokenizer, texts,
        n_seq=stage.n_seq, seq_len=stage.seq_len, batch_size=stage.batch_size,
        packing=recipe.targets.packing, skip=stage.skip,
    )  # fmt: skip
    if stage.lm_eval_tasks:
        from msa_edit.evaluate.harness import lm_eval_scores

        out |= lm_eval_scores(
            loaded.model, loaded.tokenizer, stage.lm_eval_tasks,
            include_path=stage.lm_eval_include, limit=stage.lm_eval_limit,
            num_fewshot=stage.lm_eval_fewshot, batch_size=stage.batch_size,
            seed=_estimator(recipe).seed,
        )  # fmt: skip
    return out


def _load_edited(recipe: Recipe, out: Path, name: str) -> Loaded:
    """The edited model from model/, loaded the way the base was (same bits and dtype)."""
    if not (out / MODEL_DIR / "config.json").is_file():
        raise MsaEditError(f"{out / MODEL_DIR} holds no model; run `msa-edit edit` first")
    return _load(str(out / MODEL_DIR), recipe.model, recipe.model.bits, name=name)


@in_run_dir
def evaluate(recipe: Recipe, out: Path, say: Say = say_line) -> dict[str, Any]:
    """Before (base model) and after (model/) metrics; writes eval.json."""
    if recipe.evaluate.lm_eval_tasks:
        from msa_edit.evaluate.harness import check_tasks

        check_tasks(recipe.evaluate.lm_eval_tasks, recipe.evaluate.lm_eval_include)
    base = load_model(recipe.model, say=say)
    texts = eval_texts(recipe, base.folder)
    before, candidates = baseline(recipe, out, base, texts)
    del base
    after = metrics(recipe, _load_edited(recipe, out, recipe.model.name), texts)
    return record_metrics(recipe, out, before, after, candidates, say)


def baseline(
    recipe: Recipe, out: Path, base: Loaded, texts: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """The base model's metrics and the plan's candidates' held-out metrics (before any edit)."""
    return metrics(recipe, base, texts), candidate_metrics(recipe, out, base, texts)


def record_metrics(
    recipe: Recipe,
    out: Path,
    before: Mapping[str, float],
    after: Mapping[str, float],
    candidates: Mapping[str, Any],
    say: Say,
) -> dict[str, Any]:
    """Write eval.json (after model/, so a kill never leaves metrics of a missing model), say
    the changes and the headline, and return the record."""
    write_eval_json(out / EVAL_JSON, before, after, candidates)
    _say_metrics(out, say, _specific_target(recipe))
    return read_eval_json(out / EVAL_JSON)


def candidate_metrics(
    recipe: Recipe, out: Path, loaded: Loaded, texts: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Held-out NLL per language of every candidate of a search plan (with two or more), each
    applied as the recipe's lesion to the base model (lesion = edit); {} otherwise."""
    chosen = Plan.load(out / PLAN_JSON) if (out / PLAN_JSON).is_file() else None
    found = (chosen.search.get("candidates") or []) if chosen is not None else []
    if len(found) < 2:
        return {}
    stage = recipe.evaluate
    means = None
    out_metrics: dict[str, dict[str, float]] = {}
    for candidate in found:
        units = [Unit.parse(n) for n in candidate["units"]]
        if not units:
            continue
        if LESIONS[recipe.lesion.kind].uses_means and means is None:
            ids = load_targets(recipe, loaded.tokenizer).input_ids
            players = read_screen(recipe, out) or select(loaded.model, list(recipe.units))
            means = unit_means(loaded.model, players, ids)
        with _lesion(recipe, loaded.model, units, means):
            scores = language_nll(
                loaded.model, loaded.tokenizer, texts,
                n_seq=stage.n_seq, seq_len=stage.seq_len, batch_size=stage.batch_size,
                packing=recipe.targets.packing, skip=stage.skip,
            )  # fmt: skip
        out_metrics[candidate["name"]] = {k: v for k, v in scores.items() if k.startswith("nll/")}
    return out_metrics


def _lesion(
    recipe: Recipe,
    model: PreTrainedModel,
    units: list[Unit],
    means: Mapping[Unit, torch.Tensor] | None,
) -> AbstractContextManager[Any]:
    """The recipe's lesion of `units` on `model`, for the duration of a `with` block."""
    lesion = recipe.lesion
    if LESIONS[lesion.kind].scales:
        return scaled(model, {u: lesion.alpha for u in units})
    return lesioned(model, units, lesion.kind, means=means)  # type: ignore[arg-type]


def _specific_target(recipe: Recipe) -> tuple[str, ...]:
    """The sets a targeted ("specific") plan aims at; empty for compression."""
    plan = recipe.plan
    return plan.target if plan is not None and plan.mode == "specific" else ()


def _say_metrics(out: Path, say: Say, target: Sequence[str] = ()) -> None:
    record = read_eval_json(out / EVAL_JSON)
    for k, v in record["after"].items():
        if k in record["before"] and not k.startswith("ppl/"):
            say(
                f"evaluate: {k} {record['before'][k]:.4f} -> {v:.4f} "
                f"({v - record['before'][k]:+.4f})"
            )
    headline = selectivity(record["delta"], target)
    if headline is not None:
        say(f"evaluate: {headline.line()}")


# --------------------------------------------------------------------------- export


def _card(recipe: Recipe, out: Path, metrics: Mapping[str, Any] | None) -> CardInfo:
    shapley = read_shapley(out) if (out / SHAPLEY_JSON).is_file() else None
    chosen = Plan.load(out / PLAN_JSON).to_json() if (out / PLAN_JSON).is_file() else None
    has_edit = (out / EDIT_JSON).is_file()
    edit = read_json(out / EDIT_JSON, "rerun `msa-edit edit`") if has_edit else None
    return CardInfo(
        base_model=portable(recipe.model.path),
        recipe=portable(recipe.model_dump(mode="json")),
        plan=portable(chosen),
        shapley=portable(shapley),
        metrics=metrics,
        edit=edit if isinstance(edit, dict) else None,
    )


def portable(obj: Any) -> Any:
    """Recipe data fit for a model card that may be pushed: local paths reduced to their last
    component (Hub ids and other strings kept), so a card never carries this machine's layout.

    >>> portable({"path": "/home/me/models/base", "hub": "org/model", "n": [1, "./t/en.txt"]})
    {'path': 'base', 'hub': 'org/model', 'n': [1, 'en.txt']}
    """
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str) and (obj.startswith(("/", "~", "./", "../")) or Path(obj).exists()):
        return Path(obj).name
    return obj


def _export(recipe: Recipe, out: Path, loaded: Loaded, metrics: Mapping[str, Any] | None) -> Path:
    card = _card(recipe, out, metrics)
    return export_model(loaded.model, loaded.tokenizer, out / MODEL_DIR, card=card, overwrite=True)


@in_run_dir
def export(recipe: Recipe, out: Path, say: Say = say_line) -> Path:
    """Put eval.json into model/'s card, push it when the recipe says, write report.md."""
    record = read_eval_json(out / EVAL_JSON) if (out / EVAL_JSON).is_file() else None
    if (out / MODEL_DIR / "config.json").is_file():
        update_card(out / MODEL_DIR, _card(recipe, out, record))
        if recipe.export.push:
            assert recipe.export.repo_id is not None
            stage = recipe.export
            assert stage.repo_id is not None
            url = push_to_hub(
                out / MODEL_DIR, stage.repo_id, private=stage.private, timeout=stage.timeout,
                retries=stage.retries,
            )  # fmt: skip
            say(f"export: pushed to {url}")
    from msa_edit.evaluate.report import write_report

    report = write_report(out)
    say(f"report: {report}")
    return report


# --------------------------------------------------------------------------- run


def prepare(recipe: Recipe, out: Path) -> Path:
    """Create the run directory and save the recipe in it (after every check has passed)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RECIPE_YAML, recipe.to_yaml())
    return out


@in_run_dir
def run(recipe: Recipe, out: Path, say: Say = say_line, loaded: Loaded | None = None) -> Path:
    """Every stage the recipe has, in one process, on `loaded` (else the recipe's model, loaded
    here); returns the report's path. A model handed over is edited in place."""
    loaded = loaded or load_model(recipe.model, say=say)
    select(loaded.model, list(recipe.units))  # a bad glob fails before anything is written
    targets = load_targets(recipe, loaded.tokenizer)
    units, screen = screened_units(recipe, loaded, targets, out, say)
    if recipe.plan is not None:
        sizes = _layer_sizes(loaded.model, units)
        check_feasible(recipe.plan, units, sizes, recipe.estimator is not None)
        check_editable(recipe, loaded.model, units)
    if recipe.estimator is not None:  # a budget too small or a stale checkpoint: refused now
        check_request(len(units), recipe.estimator.method, recipe.estimator.budget,
                      _exact_ends(recipe))  # fmt: skip
        fingerprint = game_fingerprint(recipe, loaded, units, recipe.targets.objective)
        _check_checkpoint(_checkpoint(recipe, out), len(units), fingerprint)
    texts = eval_texts(recipe, loaded.folder) if recipe.plan is not None else {}
    for source in texts.values():  # a short or missing evaluation text fails before any writing
        text_blocks(loaded.tokenizer, source, recipe.evaluate.n_seq, recipe.evaluate.seq_len,
                    packing=recipe.targets.packing, skip=recipe.evaluate.skip)  # fmt: skip
    if recipe.plan is not None and recipe.evaluate.lm_eval_tasks:
        from msa_edit.evaluate.harness import check_tasks

        check_tasks(recipe.evaluate.lm_eval_tasks, recipe.evaluate.lm_eval_include)
    if screen is not None:
        prepare(recipe, out)
        write_screen(out, screen)
    if recipe.estimator is not None:
        analyze(recipe, out, loaded, say)
    if recipe.plan is None:
        return export(recipe, out, say)
    chosen = plan(recipe, out, say, loaded)
    if not chosen.units:
        raise MsaEditError(
            f"the plan chose no units ({out / PLAN_JSON} is written; nothing to edit); "
            "lower plan.min_z, raise the estimator budget or the plan's budget, or add target text"
        )
    before, candidates = baseline(recipe, out, loaded, texts)
    if recipe.model.bits is None:  # the model in memory is edited in place and evaluated
        edit(recipe, out, say, loaded, targets)
        edited = loaded
    else:  # edit the full-precision weights, evaluate the edited model quantised like the base
        del loaded
        edit(recipe, out, say)
        edited = _load_edited(recipe, out, recipe.model.name)
    record_metrics(recipe, out, before, metrics(recipe, edited, texts), candidates, say)
    return export(recipe, out, say)


# --------------------------------------------------------------------------- inspection


def stage_recipe(path: str | Path, out: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe a stage command runs: the run directory's recipe.yaml (with `overrides`), so
    what an earlier stage was told by `--set` is not forgotten. The recipe file given on the
    command line must say the same; a conflicting one is refused, naming the differing keys."""
    given = load_recipe(path, overrides)
    saved_path = out / RECIPE_YAML
    if not saved_path.is_file() or Path(path).resolve() == saved_path.resolve():
        return given
    saved = load_recipe(saved_path, overrides)
    if saved == given:
        return saved
    keys = changes(
        flatten(saved.model_dump(mode="json"), "recipe"),
        flatten(given.model_dump(mode="json"), "recipe"),
    )
    shown = describe_changes([k.removeprefix("recipe.") for k in keys])
    raise MsaEditError(
        f"{path} differs from the run directory's {saved_path} in {shown}; stages run the saved "
        f"recipe: pass {saved_path}, or change fields with --set KEY=VALUE"
    )


def show_plan(out: Path) -> str:
    """plan.json as a few readable lines: action, method, sets, and each unit with its score."""
    chosen = Plan.load(out / PLAN_JSON)
    lines = [
        f"{out / PLAN_JSON}: {chosen.action} {len(chosen.units)} units of {chosen.base_model} "
        f"(method {chosen.method}, mode {chosen.mode})",
        f"target: {', '.join(chosen.target) or '-'}; retain: {', '.join(chosen.retain) or '-'}",
    ]
    for unit in chosen.units:
        score = chosen.scores.get(unit)
        se = chosen.stderr.get(unit)
        text = f"  {unit:<28} score {score:+.4g}" if score is not None else f"  {unit}"
        if se is not None:
            text += f" ± {se:.2g}"
        if unit in chosen.alpha:
            text += f"  alpha {chosen.alpha[unit]:g}"
        lines.append(text)
    return "\n".join(lines)


def dry_run(recipe: Recipe, say: Say = say_line) -> str:
    """What the recipe would cost, without writing anything: players, coalitions, forward passes
    and a rough time on this device (one forward of the target rows, timed here)."""
    loaded = load_model(recipe.model, say=say)
    units = select(loaded.model, list(recipe.units))
    targets = load_targets(recipe, loaded.tokenizer)
    if recipe.screen is not None:  # its pick is not needed, only its size
        units = units[: recipe.screen.keep]
    est = _estimator(recipe)
    rows = targets.n_rows
    n_params = sum(p.numel() for p in loaded.model.parameters())
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(u.kind for u in units).items()))
    device = next(loaded.model.parameters()).device
    start = time.perf_counter()
    with torch.no_grad():
        loaded.model(targets.input_ids[: est.rows_per_forward].to(device))
    per_row = (time.perf_counter() - start) / min(rows, est.rows_per_forward)
    lines = [
        f"model {recipe.model.name}: {n_params:,} parameters on {device}",
        f"units: {len(units)} ({kinds}); targets: {len(targets.names)} sets, {rows} rows of "
        f"{targets.input_ids.shape[1]} tokens",
    ]

    def cost(what: str, coalitions: int, rows: int = rows) -> str:
        forwards = math.ceil(coalitions * rows / est.rows_per_forward)
        return (
            f"{what}: {coalitions:,} coalitions x {rows} rows = {forwards:,} forward passes of "
            f"<= {est.rows_per_forward} rows, about "
            f"{format_duration(coalitions * rows * per_row)} here"
        )

    if recipe.estimator is not None:
        method = check_request(len(units), est.method, est.budget, _exact_ends(recipe))
        n = (1 << len(units)) if method == "exact" else est.budget or default_budget(len(units))
        sampled = (
            rows
            if est.rows_per_set is None
            else min(  # (the ends use every row)
                rows, sum(min(est.rows_per_set, int(c)) for c in torch.bincount(targets.group))
            )
        )
        lines.append(cost(f"analysis ({method})", n, sampled))
    stage = recipe.plan
    if stage is not None and stage.method in ("loo", "search"):
        lines.append(cost(f"plan ({stage.method})", stage.coalitions or len(units) + 2))
    if stage is not None:
        texts = eval_texts(recipe, loaded.folder)
        blocks = 2 * len(texts) * recipe.evaluate.n_seq
        lines.append(
            f"evaluation: {len(texts)} texts x {recipe.evaluate.n_seq} blocks, before and after "
            f"({blocks} rows); lm-eval tasks: {', '.join(recipe.evaluate.lm_eval_tasks) or '-'}"
        )
    lines.append(f"measured: {per_row * 1e3:.1f} ms per row of targets on {device}")
    return "\n".join(lines)
