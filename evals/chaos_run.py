"""Kill `msa-edit run` at random moments; after each rerun the run directory must be whole.

Builds a small tiny Mixtral (2 layers x 4 experts, trained 60 steps on the bundled en/ru/zh
text, cached), runs one recipe uninterrupted (the reference: analysis with a checkpoint written
after every batch, plan, edit, evaluation, export, report), then for each trial starts the same
run in a fresh directory, sends SIGKILL at a moment drawn uniformly from the working time of the
faster of two uninterrupted runs (from the moment the run directory appears to the end; the two
must agree bit for bit), checks the directory as the kill left it, reruns the command to
completion and checks:

- right after the kill: `model/` exists whenever `eval.json` does (the model is written first);
- after the rerun: exit 0, no hidden temporary file or folder and no lock file left, and
  shapley.json, plan.json, eval.json, edit.json and every weight file of `model/` bit-identical to
  the uninterrupted run.

    python evals/chaos_run.py               # 30 kills, about 15 minutes on 2 cores
    python evals/chaos_run.py --quick       # 5 kills
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import markdown, save_results

from msa_edit.cachedir import cache_dir
from msa_edit.rundir import LOCK, stale_paths
from msa_edit.tiny_moe import TinyMoeConfig, build_tiny_moe

UD_TEXT = Path(__file__).resolve().parents[1] / "msa_edit" / "data" / "ud-text"
LANGS = ("en", "ru", "zh")
SMALL = TinyMoeConfig(
    layers=2, experts=4, top_k=2, hidden=64, intermediate=128, heads=2, vocab=512, seq_len=32,
    batch_size=8, steps=60,
)  # fmt: skip
COMPARED = ("shapley.json", "plan.json", "eval.json", "edit.json")


def recipe(model: Path) -> dict[str, Any]:
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": 4, "seq_len": 32}
            for lang in LANGS}  # fmt: skip
    return {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "estimator": {"method": "exact", "batch_size": 4, "checkpoint_every": 0},
        "plan": {"mode": "least_useful", "target": ["ru"], "per_layer": 1},
        "evaluate": {"n_seq": 4, "seq_len": 32},
    }


def digest(out: Path) -> dict[str, str]:
    """SHA-256 of the compared files and of every file under model/ except the card."""
    names = [out / n for n in COMPARED] + sorted((out / "model").glob("*.safetensors"))
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in names}  # fmt: skip


def command(recipe_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "msa_edit.cli", "run", str(recipe_path), "--out", str(out)]


def uninterrupted(recipe_path: Path, out: Path) -> float:
    """Run to completion; the seconds from the run directory's creation to the end."""
    run = subprocess.Popen(command(recipe_path, out), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    while not out.exists() and run.poll() is None:
        time.sleep(0.005)
    start = time.perf_counter()
    if run.wait() != 0:
        sys.exit("the reference run failed")
    return time.perf_counter() - start


def trial(recipe_path: Path, out: Path, at: float, reference: dict[str, str]) -> dict[str, Any]:
    """One kill at `at` seconds, the checks on what it left, the rerun and its checks."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run = subprocess.Popen(command(recipe_path, out), **quiet)  # type: ignore[call-overload]
    while not out.exists() and run.poll() is None:
        time.sleep(0.005)
    time.sleep(at)
    finished = run.poll() is not None
    run.kill()
    run.wait()
    left = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    model_with_eval = not (out / "eval.json").exists() or (out / "model" / "config.json").is_file()
    rerun = subprocess.run(command(recipe_path, out), capture_output=True, text=True)
    stray = [p.name for p in stale_paths(out)] + ([LOCK] if (out / LOCK).exists() else [])
    same = rerun.returncode == 0 and digest(out) == reference
    return {
        "kill_at_s": round(at, 2),  # after the run directory appeared
        "finished_before_kill": finished,
        "left_by_kill": left,
        "model_whenever_eval": model_with_eval,
        "rerun_exit": rerun.returncode,
        "stray_after_rerun": stray,
        "identical": same,
        "ok": model_with_eval and rerun.returncode == 0 and not stray and same,
        "error": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 kills instead of 30")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trials = args.trials or (5 if args.quick else 30)
    texts = {lang: UD_TEXT / f"{lang}.txt" for lang in LANGS}
    model = build_tiny_moe(texts, cache_dir() / "chaos-model", config=SMALL)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe_path = root / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe(model)), encoding="utf-8")
        walls = [uninterrupted(recipe_path, root / f"reference{i}") for i in range(2)]
        wall = min(walls)
        reference = digest(root / "reference0")
        if digest(root / "reference1") != reference:
            sys.exit("two uninterrupted runs differ: the run is not deterministic")
        print(f"reference run: {wall:.1f} s from its directory's creation; {trials} kills in it")
        results = []
        for i in range(trials):
            out = root / f"trial{i}"
            results.append(trial(recipe_path, out, rng.uniform(0, wall), reference))
            r = results[-1]
            print(
                f"kill {i + 1:2d} at {r['kill_at_s']:5.1f} s: left {len(r['left_by_kill'])} "
                f"entries; rerun exit {r['rerun_exit']}, stray {r['stray_after_rerun']}, "
                f"identical {r['identical']} -> {'ok' if r['ok'] else 'FAILED'} {r['error']}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    passed = sum(r["ok"] for r in results)
    print(markdown(
        ["kills", "mid-run", "passed", "model/ whenever eval.json", "rerun exit 0", "no strays",
         "bit-identical"],
        [[trials, sum(not r["finished_before_kill"] for r in results), passed,
          sum(r["model_whenever_eval"] for r in results),
          sum(r["rerun_exit"] == 0 for r in results),
          sum(not r["stray_after_rerun"] for r in results), sum(r["identical"] for r in results)]],
    ))  # fmt: skip
    save_results(
        "chaos_run", args.quick,
        {"reference_wall_s": round(wall, 1), "trials": trials, "passed": passed,
         "seed": args.seed, "results": results},
    )  # fmt: skip
    if passed != trials:
        sys.exit(1)


if __name__ == "__main__":
    main()
