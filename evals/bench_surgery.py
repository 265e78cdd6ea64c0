"""Expert removal on a multi-GB checkpoint: streamed shard surgery vs load, edit and export.

Builds (once, cached) a Mixtral-architecture checkpoint with random bf16 weights — 12 layers x 8
experts, hidden 1024, expert width 3584, vocabulary 32000: 1.1 B parameters, 2.1 GB on disk in
500 MB shards — then removes 2 experts from every layer two ways, each in its own process:

- in memory: `AutoModelForCausalLM.from_pretrained` (bf16), `remove_experts`, `export_model`;
- streamed: `export_checkpoint` (`msa_edit.edit.checkpoint`: one tensor slab at a time).

Reported: each process's peak resident memory (`ru_maxrss`) and wall time, the interpreter's own
peak after the same imports (the constant both pay), the largest shard, and a tensor-by-tensor
comparison of the two exports. Goals (issue 19): streamed peak ≤ 1.5 x the largest shard plus
the interpreter, and ≥ 5 x below the in-memory path.

    python evals/bench_surgery.py           # about 3 minutes on 2 cores (checkpoint cached)
    python evals/bench_surgery.py --quick   # 4 layers (0.4 B parameters), well under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from typing import Any

from benchlib import markdown, save_results

from msa_edit.cachedir import cache_dir

EXPERTS, REMOVE = 8, 2
SHARD = "500MB"
SNIPPETS = {
    "baseline": """
import torch, transformers, safetensors
import msa_edit.export, msa_edit.edit
""",
    "in_memory": """
import torch
from transformers import AutoModelForCausalLM
from msa_edit.edit import remove_experts
from msa_edit.export import export_model
from msa_edit.units import select
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
units = [u for u in select(model, "layers.*.experts.*") if u.index < REMOVE]
remove_experts(model, units)
export_model(model, None, OUT, max_shard_size="500MB")
""",
    "streamed": """
import json
from msa_edit.export import export_checkpoint
from msa_edit.units import Unit
layers = json.load(open(f"{SRC}/config.json"))["num_hidden_layers"]
units = [Unit(la, "experts", e) for la in range(layers) for e in range(REMOVE)]
export_checkpoint(SRC, units, OUT)
""",
    "build": """
import torch
from transformers import AutoModelForCausalLM, MixtralConfig
config = MixtralConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=LAYERS,
                       num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                       num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(SRC, max_shard_size="500MB")
""",
    "compare": """
from pathlib import Path
from safetensors import safe_open
def index(folder):
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as h:
            out |= {k: shard for k in h.keys()}
    return out
a, b = index(OUT_A), index(OUT_B)
assert a.keys() == b.keys(), (len(a), len(b))
for key in a:
    with safe_open(str(a[key]), framework="pt") as ha, safe_open(str(b[key]), framework="pt") as hb:
        assert ha.get_tensor(key).equal(hb.get_tensor(key)), key
print("EQUAL", len(a))
""",
}
MEASURE = """
import json, resource, time
tick = time.perf_counter()
{body}
print("RESULT", json.dumps({{"seconds": time.perf_counter() - tick,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run(name: str, **values: Any) -> dict[str, Any]:
    """Run snippet `name` in a fresh interpreter with `values` as globals; its measurements."""
    head = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    code = MEASURE.format(body=head + SNIPPETS[name])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    result = json.loads(next(x for x in lines if x.startswith("RESULT "))[7:])
    return result | {"stdout": [x for x in lines if not x.startswith("RESULT ")]}


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 12")
    args = parser.parse_args()
    layers = 4 if args.quick else 12
    root = cache_dir() / "bench_surgery"
    src = root / f"mixtral-{layers}x{EXPERTS}-h1024"
    if not (src / "config.json").is_file():
        print(f"building the checkpoint in {src} ...", flush=True)
        shutil.rmtree(src, ignore_errors=True)
        run("build", SRC=str(src), LAYERS=layers)
    shards = sorted(src.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards) / 2**20
    total = sum(s.stat().st_size for s in shards) / 2**20
    work = root / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    baseline = run("baseline")
    memory = run("in_memory", SRC=str(src), OUT=str(work / "in_memory"), REMOVE=REMOVE)
    streamed = run("streamed", SRC=str(src), OUT=str(work / "streamed"), REMOVE=REMOVE)
    compare = run("compare", OUT_A=str(work / "in_memory"), OUT_B=str(work / "streamed"))
    equal = compare["stdout"][-1]
    shutil.rmtree(work, ignore_errors=True)
    over = streamed["peak_rss_mb"] - baseline["peak_rss_mb"]
    rows = [
        ["interpreter + imports", f"{baseline['peak_rss_mb']:.0f}", "—", "—"],
        ["in memory (load, edit, export)", f"{memory['peak_rss_mb']:.0f}",
         f"{memory['seconds']:.1f}", f"{memory['peak_rss_mb'] / streamed['peak_rss_mb']:.1f}"],
        ["streamed (export_checkpoint)", f"{streamed['peak_rss_mb']:.0f}",
         f"{streamed['seconds']:.1f}", "1.0"],
    ]  # fmt: skip
    print(
        f"# Expert surgery: {src.name}, {len(shards)} shards, {total:.0f} MB on disk, largest "
        f"shard {largest:.0f} MB; {REMOVE} of {EXPERTS} experts removed per layer\n"
    )
    print(markdown(["path", "peak RSS (MB)", "wall (s)", "peak ÷ streamed"], rows))
    print(
        f"\nstreamed peak above the interpreter: {over:.0f} MB = {over / largest:.2f} x the "
        f"largest shard (goal <= 1.5); in-memory / streamed peak: "
        f"{memory['peak_rss_mb'] / streamed['peak_rss_mb']:.1f} x (goal >= 5); exports {equal}"
    )
    payload = {
        "checkpoint": src.name, "layers": layers, "shards": len(shards), "disk_mb": total,
        "largest_shard_mb": largest, "baseline": baseline, "in_memory": memory,
        "streamed": streamed, "exports": equal,
        "streamed_over_interpreter_per_shard": over / largest,
        "in_memory_over_streamed": memory["peak_rss_mb"] / streamed["peak_rss_mb"],
    }  # fmt: skip
    save_results("bench_surgery", args.quick, payload)
    return payload


if __name__ == "__main__":
    main()
