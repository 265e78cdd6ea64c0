"""Scores of lm-evaluation-harness tasks on the in-memory model, as flat `{"task/metric": float}`.

`lm_eval_scores` wraps the model object itself (after in-place edits or under a lesion) in
lm-eval's `HFLM` and runs `simple_evaluate` on it: nothing is reloaded from disk or copied. Task
names are checked before the first forward pass; tasks of your own are YAML files in a folder given
as `include_path` (the folder lm-eval's `--include_path` takes). lm-eval is an optional dependency:
`pip install -e '.[lm-eval]' in a clone (or pip install lm-eval)`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from msa_edit.errors import MsaEditError
from msa_edit.optional import missing

log = logging.getLogger(__name__)

INSTALL_HINT = missing("lm_eval", "running lm-eval tasks")


def lm_eval_scores(
    model: PreTrainedModel,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """lm-eval metrics of `model` (as it is in memory) on `tasks`, as `{"task/metric": float}`.

    Metrics are named `"{task}/{metric}"` (`"arc_easy/acc"`, `"arc_easy/acc_norm"`), or
    `"{task}/{metric}@{filter}"` for a filter other than lm-eval's `none`; groups get rows of their
    own. Standard errors, non-numbers and non-finite values (with a warning) are left out.
    `include_path` is a folder of task YAMLs of your own; `limit` takes the first examples of
    each task; the same `seed` gives the same numbers (it seeds Python, NumPy, torch and the
    few-shot sampler; the caller's RNG states, training flag and log levels are put back after).

    >>> # lm_eval_scores(model, tok, ["arc_easy"], limit=100)
    >>> # {'arc_easy/acc': 0.71, 'arc_easy/acc_norm': 0.66}
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise MsaEditError("no lm-eval tasks given; name at least one, e.g. tasks=['arc_easy']")
    if limit is not None and limit < 1:
        raise MsaEditError(f"limit={limit} must be at least 1 (or None for every example)")
    if batch_size < 1:
        raise MsaEditError(f"batch_size={batch_size} must be at least 1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise MsaEditError(INSTALL_HINT) from err

    with _level("lm_eval", logging.WARNING):
        manager = _task_manager(names, include_path)  # fails on an unknown name, before any forward
        with _state_kept(model, tokenizer):
            with _level("lm_eval.models.huggingface", logging.ERROR):
                # HFLM warns that it got a model object, not a name, which is the point here.
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                bootstrap_iters=0,  # no standard errors: they are dropped anyway
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    if out is None:  # lm-eval reports results on the process of local rank 0 only
        raise MsaEditError(
            f"lm-eval gave no results on this process (LOCAL_RANK={os.environ.get('LOCAL_RANK')}); "
            "run lm-eval tasks in a single process"
        )
    return _flat_metrics(out["results"])


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> None:
    """Raise a one-line `MsaEditError` unless lm-eval is installed and knows every task.

    >>> # check_tasks(["arc_easy", "my_task"], include_path="tasks/")
    """
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        raise MsaEditError(INSTALL_HINT) from err
    with _level("lm_eval", logging.WARNING):
        manager = _task_manager(list(tasks), include_path)
        check_task_data(list(tasks), manager)


def check_task_data(tasks: Sequence[str], manager: Any) -> None:
    """Raise a one-line `MsaEditError` unless every task's dataset loads now (so an offline or
    misnamed dataset fails before hours of analysis, not at the "before" evaluation)."""
    from lm_eval.tasks import get_task_dict

    with _level("datasets", logging.ERROR):
        for name in tasks:
            try:
                get_task_dict([name], manager)
            except Exception as exc:  # lm-eval and datasets raise many types: one line for all
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise MsaEditError(
                    f"lm-eval task {name!r}: its data cannot be loaded ({type(exc).__name__}: "
                    f"{reason}); check the dataset path, the network or the datasets cache "
                    "(HF_DATASETS_OFFLINE), or drop the task from evaluate.lm_eval_tasks"
                ) from None


def _flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's `results` block (`{task: {"metric,filter": value}}`) as flat finite floats.

    >>> _flat_metrics({"arc_easy": {"alias": "arc_easy", "sample_len": 9, "acc,none": 0.5,
    ...     "acc_stderr,none": "N/A"}, "gsm8k": {"exact_match,strict-match": 1}})
    {'arc_easy/acc': 0.5, 'gsm8k/exact_match@strict-match': 1.0}
    """
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue  # "alias", "sample_len", ... are not metrics
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                continue
            name = f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}@{filter_name}"
            if not math.isfinite(value):
                log.warning("lm-eval gave %s = %s; left out (not finite)", name, value)
                continue
            flat[name] = float(value)
    return flat


def _task_manager(names: list[str], include_path: str | Path | None) -> Any:
    """The lm-eval `TaskManager` that knows `names`; a one-line MsaEditError names unknown ones.

    Indexing lm-eval's own ~14 000 task YAMLs takes about 10 s, so tasks that are all defined
    in `include_path` are loaded from it alone, and the built-in index is built once per process.
    """
    from lm_eval.tasks import TaskManager

    known: set[str] = set()
    folder = None
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise MsaEditError(
                f"include_path {str(include_path)!r} is not a folder; give the folder of task YAMLs"
            )
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if set(names) <= set(local.all_subtasks):  # leaf tasks need nothing from the built-ins
            return local
        known = set(local.all_tasks)
    builtin = _builtin_task_manager()
    unknown = [name for name in names if name not in known and name not in builtin.all_tasks]
    if unknown:
        fix = (
            f"add its YAML to include_path {str(folder)!r}"
            if folder
            else "give include_path with its YAML"
        )
        raise MsaEditError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}; "
            f"check `lm-eval ls tasks` or {fix}"
        )
    return builtin if folder is None else TaskManager(include_path=str(folder))


@functools.cache
def _builtin_task_manager() -> Any:
    """lm-eval's `TaskManager` of its built-in tasks, indexed once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@contextlib.contextmanager
def _level(logger_name: str, level: int) -> Iterator[None]:
    """`logger_name` at `level` or above for the block; its own level is restored afterwards."""
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _state_kept(model: PreTrainedModel, tokenizer: Any) -> Iterator[None]:
    """What lm-eval changes on the caller's objects is put back after the block.

    That is the model's training flag, the tokenizer's pad token and the global Python, NumPy and
    torch RNG states (`simple_evaluate` seeds them). `model.tie_weights()`, which `HFLM` calls, is a
    no-op inside: it would overwrite an edited, untied `lm_head` with the input embedding when the
    config says the two are tied, and the model is to be scored as it is.
    """
    training, pad_token = model.training, getattr(tokenizer, "pad_token", None)
    py_rng, np_rng = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    shadowed = model.__dict__.get("tie_weights")
    model.__dict__["tie_weights"] = _no_tie
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        if shadowed is None:
            del model.__dict__["tie_weights"]
        else:
            model.__dict__["tie_weights"] = shadowed
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        model.train(training)
        if pad_token is None and getattr(tokenizer, "pad_token", None) is not None:
            tokenizer.pad_token = None


def _no_tie(*args: Any, **kwargs: Any) -> None:
    """Stands in for `model.tie_weights` while lm-eval holds the model."""
