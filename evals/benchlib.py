"""What the benchmarks share: their models, target text, msapy runs and counting/lookup games.

Scripts import it as `benchlib` (they run as `python evals/<name>.py`, so `evals/` is on the
path). Models are tiny Mixtral-architecture networks trained by `msa_edit.tiny_moe` on the bundled
UD text and cached, so only the first run of a benchmark pays for training:

* `moe`: the default 4-layer, 8-expert (top-2) model of the demo (32 experts, 16 heads);
* `moe-small`: 3 layers x 4 experts (top-2), 12 experts — few enough to enumerate all 4096
  coalitions and take exact Shapley values as the reference;
* `dense`: 3 layers, one expert per layer (a Mixtral with one expert is a dense transformer with
  a SwiGLU MLP: the router's softmax over one logit is 1), 4 heads per layer: 12 heads.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from msapy import msa

import msa_edit
from msa_edit.atomic import atomic_path, write_json
from msa_edit.cachedir import cache_dir
from msa_edit.cli import quiet_libraries
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.shapley import Game
from msa_edit.shapley.cache import CoalitionCache
from msa_edit.shapley.exact import all_coalitions
from msa_edit.texts import text_blocks
from msa_edit.tiny_moe import HELDOUT_DIR, TinyMoeConfig, build_tiny_moe, load_tiny_moe
from msa_edit.units import select

UD_TEXT = Path(msa_edit.__file__).parent / "data" / "ud-text"
LANGUAGES = ("en", "de", "fr", "es", "ru", "zh")
RESULTS = Path(__file__).resolve().parent / "results"
quiet_libraries()  # transformers' and datasets' bars would drown the tables
MODELS = {
    "moe": TinyMoeConfig(),
    "moe-small": TinyMoeConfig(layers=3, experts=4, steps=500),
    "dense": TinyMoeConfig(layers=3, experts=1, top_k=1, steps=500),
}


def model_dir(name: str) -> Path:
    """The cached folder of benchmark model `name` (trained on first use: minutes)."""
    return build_tiny_moe(
        {lang: UD_TEXT / f"{lang}.txt" for lang in LANGUAGES}, config=MODELS[name]
    )


def heldout_targets(folder: Path, tokenizer: Any, n_seq: int, seq_len: int) -> Targets:
    """`n_seq` held-out blocks of `seq_len` tokens per language (text the model never saw)."""
    return Targets.from_dict(
        {
            lang: text_blocks(tokenizer, folder / HELDOUT_DIR / f"{lang}.txt", n_seq, seq_len)
            for lang in LANGUAGES
        }
    )


def language_game(name: str, units: str, n_seq: int, seq_len: int) -> tuple[LesionGame, Any]:
    """Per-language mean-NLL game `[6]` of benchmark model `name` over the units matching the glob
    `units` (experts: `reroute` lesions, other units: `zero`), on held-out text; also returns the
    model."""
    folder = model_dir(name)
    model, tokenizer, _ = load_tiny_moe(folder)
    targets = heldout_targets(folder, tokenizer, n_seq, seq_len)
    players = select(model, units)
    lesion = "reroute" if players[0].kind == "experts" else "zero"
    game = LesionGame(model, players, targets, MeanNLL(), lesion, max_rows=8 * targets.n_rows)
    return game, model


def unit_layers(name: str, units: str) -> list[int]:
    """The layer of each unit of benchmark model `name` matching the glob `units`, in player
    order (the `groups` that `estimate` gives the adjusted estimator)."""
    model, _, _ = load_tiny_moe(model_dir(name))
    return [u.layer for u in select(model, units)]


class CountingGame:
    """Wraps a game; counts the coalitions (rows) it is asked for and how many are distinct."""

    def __init__(self, game: Game) -> None:
        self.game = game
        self.calls = 0
        self.seen: set[bytes] = set()

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        self.calls += coalitions.shape[0]
        self.seen.update(row.tobytes() for row in np.packbits(coalitions.numpy(), axis=1))
        return self.game(coalitions)


class TableGame:
    """A game read from the table of all its 2^n values (row k = coalition with bits of k)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.n_players = int(table.shape[0]).bit_length() - 1

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        index = (coalitions.long() << torch.arange(self.n_players)).sum(1)
        return self.table[index]

    @classmethod
    def enumerate(cls, game: Game, n_players: int, batch_size: int = 8) -> TableGame:
        """Evaluate `game` on all 2^n coalitions once (with a progress bar)."""
        cache = CoalitionCache(game, n_players, batch_size, progress=True, total=1 << n_players)
        try:
            return cls(cache.get(all_coalitions(n_players)))
        finally:
            cache.close()


def language_table(name: str, units: str, n_seq: int, seq_len: int) -> TableGame:
    """`language_game` enumerated over all its coalitions, cached (keyed by the model's build)."""
    key = f"{model_dir(name).name}-{units.replace('*', 'all')}-{n_seq}x{seq_len}.pt"
    path = cache_dir() / "bench-tables" / key
    if path.exists():
        return TableGame(torch.load(path))
    game, _ = language_game(name, units, n_seq, seq_len)
    print(f"enumerating all {1 << game.n_players} coalitions of {name} {units} (cached after)")
    table = TableGame.enumerate(game, game.n_players)
    with atomic_path(path) as tmp:
        torch.save(table.table, tmp)
    return table


def msapy_objective(game: Game, n_players: int) -> Callable[[tuple], Any]:
    """msapy's objective: the tuple of lesioned elements -> float (scalar game) or ndarray."""

    def objective(lesioned: tuple) -> Any:
        mask = torch.ones(n_players, dtype=torch.bool)
        mask[list(lesioned)] = False
        out = game(mask[None])[0]
        return float(out) if out.dim() == 0 else out.numpy()

    return objective


def msapy_values(table: Any, n_players: int, output_shape: tuple[int, ...]) -> np.ndarray:
    """Shapley values `[n, *output_shape]` from msapy's result, players in order 0..n-1.

    Scalar games give a ShapleyTable (one row per permutation, one column per element): the values
    are its column means. Vector games give a ShapleyModeND whose column e holds the (already
    averaged) mode of element e, flattened.
    """
    if not output_shape:
        return table.mean()[list(range(n_players))].to_numpy(dtype=np.float64)
    modes = [table[e].to_numpy(dtype=np.float64).reshape(output_shape) for e in range(n_players)]
    return np.stack(modes)


def run_msapy(
    game: Game, n_players: int, output_shape: tuple[int, ...], n_permutations: int, seed: int
) -> tuple[np.ndarray, CountingGame, float]:
    """msapy 1.7.3 `msa.interface` (lazy, serial, bars silenced): values, the counter, seconds.

    `seed` must be >= 1 (msapy treats 0 as "no seed").
    """
    counter = CountingGame(game)
    quiet = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        table = msa.interface(
            n_permutations=n_permutations,
            elements=list(range(n_players)),
            objective_function=msapy_objective(counter, n_players),
            random_seed=seed,
            n_parallel_games=1,
            dual_progress_bars=False,
        )
    seconds = time.perf_counter() - start
    return msapy_values(table, n_players, output_shape), counter, seconds


def rmse(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Root mean squared error over all entries."""
    return float(np.sqrt(np.mean((estimate - reference) ** 2)))


class Memo:
    """A game with every coalition's value kept, so several searches on one game share
    evaluations (each still counts its own distinct coalitions)."""

    def __init__(self, game: Game) -> None:
        self.game = game
        self.values: dict[bytes, torch.Tensor] = {}

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        keys = [bytes(row.tolist()) for row in coalitions]
        missing = [i for i, key in enumerate(keys) if key not in self.values]
        if missing:
            out = self.game(coalitions[missing])
            self.values |= {keys[i]: row for i, row in zip(missing, out, strict=True)}
        return torch.stack([self.values[key] for key in keys])


def save_results(name: str, quick: bool, payload: dict[str, Any]) -> Path:
    """Write `payload` to evals/results/NAME.json (NAME_quick.json for a quick run), atomically."""
    out = write_json(RESULTS / f"{name}{'_quick' if quick else ''}.json", payload)
    print(f"wrote {out}")
    return out


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
