"""Export an edited model: safetensors checkpoint + tokenizer + model card, and push it to the Hub.

``export_model`` writes a directory that plain ``AutoModelForCausalLM.from_pretrained`` loads
(no custom code), with a ``README.md`` model card whose YAML front matter the Hub understands and
whose sections record how the model was made (recipe, plan, Shapley analysis, before/after
metrics). The write is atomic: everything goes into a temporary directory beside ``out_dir`` that
is renamed into place at the end, so a failure leaves neither a half-written ``out_dir`` nor the
temporary directory behind.

``push_to_hub`` (from ``msa_edit.hub``, re-exported here) uploads such a directory, with timeouts
and bounded retries; the token never reaches a message, a log or a file.

Example (the card alone; exporting needs a model and a tokenizer)::

    >>> card = CardInfo(base_model="org/base", license="apache-2.0",
    ...                 metrics={"before": {"ppl/ru": 12.0}, "after": {"ppl/ru": 30.0}})
    >>> text = render_card(card, title="my-model")
    >>> row = "| ppl/ru | 12.0000 | 30.0000 | +18.0000 |"
    >>> text.splitlines()[0], "msa-edit" in text, row in text
    ('---', True, True)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, ModelCardData

from msa_edit.atomic import staged_dir, write_json, write_text
from msa_edit.edit.checkpoint import slice_checkpoint
from msa_edit.edit.experts import Extra
from msa_edit.edit.record import EditRecord
from msa_edit.errors import MsaEditError
from msa_edit.evaluate.numbers import fmt, fmt_delta
from msa_edit.hub import is_repo_id, push_to_hub
from msa_edit.units import Unit

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CardInfo", "export_checkpoint", "export_model", "push_to_hub", "render_card"]

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
INFO_NAME = "msa_edit.json"
BASE_TAGS = ("msa-edit", "shapley", "model-editing")
SHAPLEY_FIELDS = ("method", "budget", "seed", "n_evaluations", "batch_size")


@dataclass(frozen=True)
class CardInfo:
    """What the model card says about how the model was made; every field is optional plain data.

    ``plan`` is a ``plan.json`` dict (``action``, ``units``, ``scores``, ``target``, ...),
    ``shapley`` a ``shapley.json``-like dict (``method``, ``budget``, ``seed``,
    ``n_evaluations``; arrays are ignored), ``metrics`` an ``eval.json`` dict
    ``{"before": {...}, "after": {...}}``, ``edit`` an ``edit.json`` dict (each record's action and
    the lesion the model equals; where that differs from the analysed lesion, the card says so),
    ``recipe`` the recipe as a dict. ``license`` falls back
    to the base model's card when left ``None``.

    >>> CardInfo.from_dict({"base_model": "org/m", "plan": {"action": "remove"}}).plan
    {'action': 'remove'}
    """

    base_model: str | None = None
    license: str | None = None
    recipe: Mapping[str, Any] | None = None
    plan: Mapping[str, Any] | None = None
    shapley: Mapping[str, Any] | None = None
    metrics: Mapping[str, Mapping[str, float]] | None = None
    edit: Mapping[str, Any] | None = None
    tags: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CardInfo:
        """Build from a plain dict (unknown keys are an error naming the allowed ones)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MsaEditError(f"unknown model-card field(s) {unknown}; use only {sorted(names)}")
        kwargs = dict(data)
        if "tags" in kwargs:
            kwargs["tags"] = tuple(kwargs["tags"])
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict of all fields."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# --------------------------------------------------------------------------- export


def export_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    card: CardInfo | Mapping[str, Any] | None = None,
    max_shard_size: int | str = "200MB",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (safetensors, sharded above ``max_shard_size``), tokenizer and model card.

    ``tokenizer`` is a tokenizer object, or a path/Hub id to load one from and re-save (``None``
    exports the model alone). Refuses a non-empty existing ``out_dir`` unless ``overwrite=True``,
    which replaces it only once the new export is complete. Returns the output directory.

    >>> import tempfile
    >>> from tiny_models import build
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     d = export_model(build("llama"), None, f"{tmp}/m", card={"base_model": "x/y"})
    ...     names = sorted(p.name for p in d.iterdir())
    >>> names[:3]
    ['README.md', 'config.json', 'generation_config.json']
    """
    out = Path(out_dir)
    info = _as_card(card)
    with _staged(out, overwrite) as tmp:
        _write_export(model, tokenizer, tmp, info, max_shard_size, title=out.name)
    log.info("exported model to %s", out)
    return out


COPIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
"""Files of a source model folder `export_checkpoint` copies besides the weights: tokenizer,
generation config, chat template (never other weight formats)."""
_NOT_COPIED = {"config.json", "model.safetensors.index.json", CARD_NAME, INFO_NAME}


def export_checkpoint(
    src: str | os.PathLike[str],
    units: Sequence[Unit],
    out_dir: str | os.PathLike[str],
    *,
    card: CardInfo | Mapping[str, Any] | None = None,
    extra: Extra = "refuse",
    overwrite: bool = False,
) -> tuple[Path, EditRecord]:
    """Export the checkpoint of `src` (a local folder or Hub id) without the experts `units`,
    streaming its shards (`edit.checkpoint.slice_checkpoint`: the model is never loaded), with
    its tokenizer files and a model card; atomic like `export_model`. Returns the folder and
    what the edit did.

    >>> # out, record = export_checkpoint("mistralai/Mixtral-8x7B-v0.1", units, "run/model")
    """
    from msa_edit.checkpoints import model_folder

    folder = model_folder(os.fspath(src))
    out = Path(out_dir)
    info = _as_card(card)
    with _staged(out, overwrite) as tmp:
        record = slice_checkpoint(folder, units, tmp, extra=extra)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in COPIED_SUFFIXES and path.name not in _NOT_COPIED:
                shutil.copy2(path, tmp / path.name)
        if info.license is None:
            info = dataclasses.replace(info, license=_card_license(folder))
        (tmp / CARD_NAME).write_text(render_card(info, title=out.name), encoding="utf-8")
        (tmp / INFO_NAME).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
    log.info("exported %s without %d experts to %s", folder, len(units), out)
    return out, record


def update_card(out_dir: str | os.PathLike[str], card: CardInfo | Mapping[str, Any]) -> Path:
    """Rewrite an exported model's card (README.md and msa_edit.json) atomically, weights untouched.

    >>> # update_card("run/model", {"base_model": "org/m", "metrics": {"before": {}, "after": {}}})
    """
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        raise MsaEditError(f"{out} is not an exported model (no config.json); export it first")
    info = _as_card(card)
    write_json(out / INFO_NAME, info.to_json())
    return write_text(out / CARD_NAME, render_card(info, title=out.name))


def _as_card(card: CardInfo | Mapping[str, Any] | None) -> CardInfo:
    """Normalise the ``card`` argument to a ``CardInfo``."""
    if card is None:
        return CardInfo()
    if isinstance(card, CardInfo):
        return card
    return CardInfo.from_dict(card)


def _check_target(out: Path, overwrite: bool) -> None:
    """Fail early if ``out`` cannot be (re)placed by a fresh export."""
    if out.exists() and not out.is_dir():
        raise MsaEditError(f"export target {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MsaEditError(
            f"export target {out} exists and is not empty; "
            "pass overwrite=True or choose another path"
        )


def _write_export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None,
    tmp: Path,
    info: CardInfo,
    max_shard_size: int | str,
    *,
    title: str,
) -> None:
    """Fill ``tmp`` with weights, config, tokenizer, card and the machine-readable card info."""
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    _save_tokenizer(tokenizer, tmp)
    if info.license is None:
        info = dataclasses.replace(info, license=_base_license(info.base_model, model))
    (tmp / CARD_NAME).write_text(render_card(info, title=title), encoding="utf-8")
    (tmp / INFO_NAME).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")


def _save_tokenizer(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None, tmp: Path
) -> None:
    """Save the tokenizer object, or load it from a path/Hub id and save it."""
    if tokenizer is None:
        log.warning("exporting without a tokenizer; AutoTokenizer won't load from this directory")
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    tokenizer.save_pretrained(tmp)


@contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `out` to fill; it replaces `out` when the block succeeds (never
    leaving a moment without `out`) and is deleted when it raises."""
    _check_target(out, overwrite)
    with staged_dir(out) as tmp:
        yield tmp


def _base_license(base_model: str | None, model: PreTrainedModel) -> str | None:
    """The ``license`` of the base model's local card (or config), when one is known."""
    config = getattr(model, "config", None)
    from_config = getattr(config, "license", None)
    if isinstance(from_config, str):
        return from_config
    for source in (base_model, getattr(config, "_name_or_path", None)):
        found = _card_license(Path(source)) if source else None
        if found:
            return found
    return None


def _card_license(folder: Path) -> str | None:
    """The ``license`` in the front matter of a local model folder's card, if any."""
    if not (folder / CARD_NAME).is_file():
        return None
    meta = _front_matter((folder / CARD_NAME).read_text(encoding="utf-8"))
    return str(meta["license"]) if isinstance(meta.get("license"), str) else None


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (``{}`` when absent or malformed)."""
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    try:
        meta = yaml.safe_load(parts[0].removeprefix("---"))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- card


def render_card(card: CardInfo, *, title: str = "model") -> str:
    """Model card text: Hub YAML front matter, then plan, Shapley, metrics and recipe sections."""
    sections = [
        _front_matter_block(card, title),
        f"# {title}\n\n{_intro(card)}",
        _plan_section(card.plan),
        _shapley_section(card.shapley),
        _edit_section(card.edit),
        _metrics_section(card.metrics),
        _recipe_section(card.recipe),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _front_matter_block(card: CardInfo, title: str) -> str:
    """``---``-fenced YAML metadata for the Hub (`huggingface_hub.ModelCardData`): base model,
    tags, license, and the edited model's evaluation as model-index results."""
    results = _eval_results(card.metrics)
    data = ModelCardData(
        base_model=card.base_model if card.base_model and is_repo_id(card.base_model) else None,
        tags=list(dict.fromkeys([*BASE_TAGS, *card.tags])),
        license=card.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=title if results else None,
        eval_results=results or None,
    )
    return "---\n" + data.to_yaml() + "\n---"


METRIC_TYPES = {"nll": "nll", "ppl": "perplexity", "bpb": "bits_per_byte"}
"""model-index metric types of msa-edit's per-language metrics (`nll/fr`, `ppl/fr`, `bpb/fr`)."""


def _eval_results(metrics: Mapping[str, Mapping[str, float]] | None) -> list[EvalResult]:
    """The edited model's numbers (eval.json's `after`) as model-index results: per-language
    metrics on the run's held-out text of that language, lm-eval metrics on their task."""
    out = []
    for name, value in ((metrics or {}).get("after") or {}).items():
        if not isinstance(value, int | float) or not math.isfinite(value) or "/" not in name:
            continue
        group, rest = name.split("/", 1)
        if group in METRIC_TYPES:
            dataset, metric = f"held-out {rest} text", METRIC_TYPES[group]
        else:
            dataset, metric = group, rest
        out.append(EvalResult(
            task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
            metric_type=metric, metric_value=float(value), metric_name=name,
        ))  # fmt: skip
    return out


def _intro(card: CardInfo) -> str:
    """One paragraph saying what this model is."""
    base = f"`{card.base_model}`" if card.base_model else "a base model"
    return (
        f"Edited from {base} with msa-edit, which finds the units (experts, "
        "heads, neurons) that produce a behaviour by Multiperturbation Shapley-value Analysis and "
        "edits them. Loads with plain `AutoModelForCausalLM.from_pretrained` (no custom code)."
    )


def _plan_section(plan: Mapping[str, Any] | None) -> str:
    """The edit plan: action, target and a unit/score table."""
    if not plan:
        return ""
    lines = ["## Edit plan", ""]
    for key in ("action", "target"):
        if key in plan:
            lines.append(f"- **{key}**: `{_cell(plan[key])}`")
    units = [str(u) for u in plan.get("units", [])]
    lines.append(f"- **units edited**: {len(units)}")
    if units:
        lines += ["", *_unit_table(units, plan)]
    return "\n".join(lines)


def _unit_table(units: list[str], plan: Mapping[str, Any]) -> list[str]:
    """Markdown rows ``unit | score [| scale]`` for the plan's units."""
    scores = plan.get("scores") or {}
    scales = plan.get("alpha") or {}  # Plan.to_json: {unit: factor} for a scale plan
    header = "| unit | score |" + (" scale |" if scales else "")
    rows = [header, "|---|---:|" + ("---:|" if scales else "")]
    for unit in units:
        row = f"| `{unit}` | {_cell(scores.get(unit, ''))} |"
        if scales:
            row += f" {_cell(scales.get(unit, ''))} |"
        rows.append(row)
    return rows


def _shapley_section(shapley: Mapping[str, Any] | None) -> str:
    """Method, budget, seed and evaluation count of the Shapley analysis."""
    if not shapley:
        return ""
    lines = ["## Shapley analysis", ""]
    for key in SHAPLEY_FIELDS:
        if key in shapley:
            lines.append(f"- **{key}**: {_cell(shapley[key])}")
    for key in ("units", "targets"):
        if isinstance(shapley.get(key), (list, tuple)):
            lines.append(f"- **{key}**: {len(shapley[key])}")
    return "\n".join(lines)


def _edit_section(edit: Mapping[str, Any] | None) -> str:
    """Each edit record: action, units, the lesion the model equals, and any difference from the
    lesion the units were analysed with."""
    records = (edit or {}).get("records") or []
    lines = []
    for rec in records:
        if not isinstance(rec, Mapping):
            continue
        n = len(rec.get("units") or [])
        lines.append(
            f"- `{_cell(rec.get('action'))}` on {n} units: the model equals the "
            f"`{_cell(rec.get('matches'))}` lesion"
        )
        if rec.get("differs"):
            lines.append(f"  - **differs from the analysis**: {_cell(rec['differs'])}")
    return "\n".join(["## Edit", "", *lines]) if lines else ""


def _metrics_section(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    """A before/after/delta table over the union of metric names."""
    if not metrics:
        return ""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = list(dict.fromkeys([*before, *after]))
    rows = ["## Evaluation", "", "| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name in names:
        b, a = before.get(name), after.get(name)
        rows.append(f"| {_cell(name)} | {_num(b)} | {_num(a)} | {_delta(b, a)} |")
    return "\n".join(rows)


def _recipe_section(recipe: Mapping[str, Any] | None) -> str:
    """The recipe that produced the model, as YAML."""
    if not recipe:
        return ""
    body = yaml.safe_dump(_plain(recipe), sort_keys=False, allow_unicode=True)
    return f"## Recipe\n\n```yaml\n{body}```"


def _num(x: Any) -> str:
    """A metric value for a table cell, rounded as report.md rounds it."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return fmt(float(x))
    return "" if x is None else _cell(x)


def _delta(before: Any, after: Any) -> str:
    """``after - before`` with a sign, or empty when either is missing or not finite."""
    if not all(isinstance(x, (int, float)) for x in (before, after)):
        return ""
    d = float(after) - float(before)
    return fmt_delta(d) if math.isfinite(d) else ""


def _cell(x: Any) -> str:
    """Any value as a single-line markdown cell."""
    text = x if isinstance(x, str) else json.dumps(_plain(x))
    return text.replace("|", "\\|").replace("\n", " ")


def _plain(x: Any) -> Any:
    """``x`` as JSON/YAML-safe plain data (dataclasses, tensors and numpy scalars included)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if hasattr(x, "tolist"):
        return _plain(x.tolist())
    return str(x)
