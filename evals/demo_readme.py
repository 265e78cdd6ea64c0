"""Run `msa-edit demo` as a new user would (empty model cache); write its figures into the README.

    python evals/demo_readme.py            # ~6 min on 2 cores: trains, analyses, edits, evaluates
    python evals/demo_readme.py --check    # only compare the README with evals/results/demo

The run directory goes to `evals/results/demo` (replaced). The README section between the
`<!-- demo-results -->` markers is rewritten from that run's files: wall time, peak memory, the
plan (each removed expert's score and z), what the edit did, the held-out NLL table and the
headline (target increase against the largest other). Nothing in that section is typed by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from msa_edit.evaluate.language import selectivity
from msa_edit.progress import format_duration

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "evals" / "results" / "demo"
README = ROOT / "README.md"
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def run_demo(out: Path) -> dict[str, str]:
    """`msa-edit demo --out out` with an empty model cache, its output to a file: wall time,
    training time, peak RSS and the longest gap between timestamped progress lines."""
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(prefix="msa-edit-cache-") as cache:
        env = os.environ | {"MSA_EDIT_CACHE": cache}
        start = time.perf_counter()
        log = out.parent / "demo.log"
        with log.open("w") as f:
            subprocess.run(
                [str(Path(sys.executable).parent / "msa-edit"), "demo", "--out", str(out)],
                env=env, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT,
            )  # fmt: skip
        wall = time.perf_counter() - start
    text = log.read_text()  # kept: evals/results/demo.log
    stamps = [time.mktime(time.strptime(m, "%Y-%m-%d %H:%M:%S"))
              for m in re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", text, re.M)]  # fmt: skip
    gap = max((b - a for a, b in itertools.pairwise(stamps)), default=float("nan"))
    trained = re.search(r"tiny-moe: trained in (\w+),", text)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    return {"wall": format_duration(wall), "train": trained[1] if trained else "?",
            "peak_gb": f"{peak:.2f}", "gap": f"{gap:.0f} s"}  # fmt: skip


def timing_line(timing: dict[str, str]) -> str:
    """Where and how long the regenerating run took."""
    return (
        f"Last regenerated on {platform.machine()} with {os.cpu_count()} cores, from an empty "
        f"model cache: {timing['wall']} wall (training {timing['train']} of it), "
        f"peak memory {timing['peak_gb']} GB; with output to a file "
        f"([`demo.log`](evals/results/demo.log)) the longest silence between timestamped "
        f"progress lines was {timing['gap']}."
    )


def body(run: Path = OUT) -> str:
    """The README's demo figures from the files of the run directory `run`."""
    plan, ev, edit = (json.loads((run / f"{n}.json").read_text()) for n in ("plan", "eval", "edit"))
    texts = yaml.safe_load((run / "recipe.yaml").read_text())["evaluate"]
    target = plan["target"]
    found = selectivity(ev["delta"], target)
    if found is None:
        raise SystemExit(f"{run}/eval.json has no target and other language; rerun the demo")
    z = {u: plan["scores"][u] / plan["stderr"][u] for u in plan["units"]}
    removed = ", ".join(f"`{u}` (z = {z[u]:.1f})" for u in plan["units"])
    lines = [
        f"The plan: {len(plan['units'])} of {len(plan['scores'])} experts past the bar: {removed}."
    ]
    for r in edit["records"]:
        lines.append(
            f"The edit: {'; '.join(r['notes'])}; {r['params_saved']:,} parameters removed."
        )
        if r.get("differs"):
            lines.append(
                f"The exported model computes the `{r['matches']}` lesion, not the analysed "
                f"`{edit['analysed_lesion']}` one (the run warns and records it)."
            )
    lines += [
        "",
        f"Held-out NLL (nats/token, {texts['n_seq']} blocks of {texts['seq_len']} tokens per "
        "language, never trained on or analysed):",
        "",
        "| language | before | after | change | bits/byte change |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, before in ev["before"].items():
        if key.startswith("nll/"):
            lang, change = key[4:], ev["delta"][key]
            shown = f"**{change:+.4f}**" if lang in target else f"{change:+.4f}"
            bpb = ev["delta"].get(f"bpb/{lang}")
            per_byte = "—" if bpb is None else f"{bpb:+.4f}"
            lines.append(
                f"| {lang} | {before:.4f} | {ev['after'][key]:.4f} | {shown} | {per_byte} |"
            )
    lines += ["", f"Headline (`msa-edit demo` prints it last): **{found.line()}**."]
    return "\n".join(lines)


def readme_body(readme: str) -> str:
    """The README's section between the markers, without its timing paragraph."""
    inner = readme[readme.index(START) + len(START) : readme.index(END)].strip("\n")
    return inner.split("\n\n", 1)[1] if inner.startswith("Last regenerated") else inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args()
    if args.check:
        stale = readme_body(README.read_text()) != body()
        print("README demo section is", "stale" if stale else "current")
        sys.exit(int(stale))
    section = f"{START}\n{timing_line(run_demo(OUT))}\n\n{body()}\n{END}"
    readme = README.read_text()  # read after the run: edits made meanwhile are kept
    i, j = readme.index(START), readme.index(END) + len(END)
    README.write_text(readme[:i] + section + readme[j:])
    print(section)


if __name__ == "__main__":
    main()
