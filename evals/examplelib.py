"""What the paper-finding examples (`mlp_hubs.py`, `gan_hierarchy.py`) share: the digits, the
command line, mean ± sd over seeds, JSON of tensors and matplotlib.

Scripts import it as `examplelib` (they run as `python evals/<name>.py`, so `evals/` is on the
path; pytest puts it there too).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 1797 8x8 digits (no download): images `[N, 8, 8]` in [0, 1] and
    labels `[N]`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16, torch.tensor(data.target)


def example_args(doc: str, quick: str, name: str) -> argparse.Namespace:
    """`--seed` (first seed), `--quick` (help text `quick`) and `--out` (results folder), plus
    `prefix`: where the example's files go, `OUT/name` (`OUT/name_quick` with `--quick`, so a
    quick run never overwrites a full one's results). Sets torch to one thread (these models are
    too small to gain from more)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed (runs use seed, seed+1, ...)"
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and PNGs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    args.prefix = args.out / (f"{name}_quick" if args.quick else name)
    return args


def mean_sd(xs: Sequence[float]) -> list[float]:
    """`[mean, sample sd]` (sd 0 for one value).

    >>> mean_sd([1.0, 2.0, 3.0])
    [2.0, 1.0]
    """
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def plain(obj: Any, drop: Collection[str] = ()) -> Any:
    """`obj` for JSON: every tensor (in dicts and lists, at any depth) as nested lists, and the
    dict entries named in `drop` left out.

    >>> plain({"a": [torch.tensor([1.5])], "b": 2, "big": torch.zeros(9)}, drop={"big"})
    {'a': [[1.5]], 'b': 2}
    """
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {key: plain(value, drop) for key, value in obj.items() if key not in drop}
    if isinstance(obj, list | tuple):
        return [plain(value, drop) for value in obj]
    return obj


def pyplot() -> Any:
    """`matplotlib.pyplot` on the non-interactive `Agg` backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
