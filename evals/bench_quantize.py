"""Benchmark `msa_edit.quantize.load_quantized` on a Mixtral-architecture model of a few hundred MB.

The model (4 layers, hidden 512, 8 experts of width 1792, top-2, vocab 4096: ≈ 95 M parameters,
≈ 93 % of them in the experts, ≈ 380 MB in fp32) is built from a config with random weights
(seed 0) and saved with `save_pretrained` to a temporary directory. Each variant is then loaded
in a fresh Python process, so load time and peak memory are its own:

* `fp32`, `fp16`: plain `from_pretrained(dtype=...)`;
* `hf-bnb-4bit`: plain transformers `BitsAndBytesConfig(load_in_4bit=True, nf4)` — what users get
  by default: attention quantised, fused experts left in fp16;
* `msa-8bit`, `msa-4bit`: `load_quantized(bits=8|4, dtype=torch.float16)` — experts quantised,
  embeddings, norms, routers and `lm_head` in fp16 (not bf16: on the AMX CPUs this was
  measured on, bf16 matmuls die with SIGILL).

For each: footprint (`msa_edit.footprint.footprint`, bytes as stored, quantisation statistics
included) after loading and after one forward (bitsandbytes repacks 4-bit weights on the first
CPU forward), ratio to the fp16 footprint (goal for `msa-4bit`: <= 0.35), load time, peak
anonymous resident memory added during the load (sampled every 2 ms; the memory-mapped
checkpoint is excluded), mean NLL on 4 x 128 random tokens (seed 1), its difference to
fp32, the relative L2 error of the logits, and the share of (token, layer) pairs routed to the
same top-2 experts as in fp32 (a random router's logits are nearly tied, so small errors flip
routes; a flipped route changes that token's output wholesale). Printed as a Markdown table and
written to `evals/results/bench_quantize.json`. About 1.5 minutes on 2 CPU cores. Run from the
repository root:

    python evals/bench_quantize.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from msa_edit import atomic

RESULTS = Path(__file__).resolve().parent / "results" / "bench_quantize.json"
VARIANTS = ("fp32", "fp16", "hf-bnb-4bit", "msa-8bit", "msa-4bit")
GOAL_RATIO = 0.35
TOKENS_SHAPE = (4, 128)
CONFIG = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1792,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)


def build_and_save(folder: Path) -> dict[str, Any]:
    """Save the random-weight benchmark model to `folder`; return its parameter counts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).eval()
    model.save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"parameters": total, "expert_parameters": experts, "config": CONFIG}


def _anon_rss_bytes() -> int:
    """Resident anonymous memory of this process (excludes the memory-mapped checkpoint)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class PeakSampler(threading.Thread):
    """Samples `_anon_rss_bytes` every few milliseconds until stopped; keeps the maximum."""

    def __init__(self, period_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak = _anon_rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _anon_rss_bytes())
            time.sleep(self.period_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _anon_rss_bytes())


def _load(variant: str, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from msa_edit.quantize import load_quantized

    if variant in ("fp32", "fp16"):
        dtype = torch.float32 if variant == "fp32" else torch.float16
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if variant == "hf-bnb-4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
        )
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.float16, device_map={"": "cpu"}
        ).eval()
    bits = 8 if variant == "msa-8bit" else 4
    return load_quantized(folder, bits=bits, dtype=torch.float16, device="cpu")


def worker(variant: str, folder: Path, out: Path) -> None:
    """Load one variant in this (fresh) process; write its measurements and logits to `out`."""
    import bitsandbytes  # noqa: F401 - imports are not part of the load
    import transformers  # noqa: F401

    from msa_edit.footprint import footprint
    from msa_edit.games import token_nll

    baseline = _anon_rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model = _load(variant, folder)
    load_s = time.perf_counter() - start
    peak_extra = sampler.stop() - baseline
    footprint_loaded = footprint(model)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG["vocab_size"], TOKENS_SHAPE, generator=gen)
    start = time.perf_counter()
    with torch.no_grad():
        output = model(tokens, output_router_logits=True)
    forward_s = time.perf_counter() - start
    logits = output.logits.float()
    nll = token_nll(logits, tokens).mean()
    k = CONFIG["num_experts_per_tok"]
    routes = torch.stack(
        [r.topk(k, dim=-1).indices.sort(dim=-1).values for r in output.router_logits]
    )
    torch.save({"logits": logits, "routes": routes}, out.with_suffix(".pt"))
    row = {
        "variant": variant,
        "footprint_loaded": footprint_loaded,
        "footprint_after_forward": footprint(model),
        "load_s": load_s,
        "forward_s": forward_s,
        "peak_extra_anon_rss": max(peak_extra, 0),
        "nll": float(nll),
    }
    out.write_text(json.dumps(row))


def run_variant(variant: str, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run `worker` for `variant` in a subprocess; its row, logits and top-k routes."""
    out = folder / f"result-{variant}.json"
    cmd = [sys.executable, __file__, "--worker", variant, str(folder), str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text()), torch.load(out.with_suffix(".pt"))


def add_comparisons(
    rows: list[dict[str, Any]], outputs: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Ratios to fp16 and errors relative to fp32, in place."""
    fp16 = next(r for r in rows if r["variant"] == "fp16")["footprint_loaded"]
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    ref, ref_routes = outputs["fp32"]["logits"], outputs["fp32"]["routes"]
    for row in rows:
        logits, routes = outputs[row["variant"]]["logits"], outputs[row["variant"]]["routes"]
        row["ratio_to_fp16"] = row["footprint_loaded"] / fp16
        row["ratio_to_fp16_after_forward"] = row["footprint_after_forward"] / fp16
        row["nll_diff"] = row["nll"] - fp32["nll"]
        row["nll_rel_diff"] = row["nll_diff"] / fp32["nll"]
        row["logits_rel_error"] = float((logits - ref).norm() / ref.norm())
        row["routing_agreement"] = float((routes == ref_routes).all(dim=-1).float().mean())


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    mb = 1e6
    lines = [
        "| variant | footprint MB | after fwd MB | / fp16 | / fp16 after fwd | load s | "
        "load peak anon MB | NLL | NLL - fp32 | logits rel err | same top-2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['footprint_loaded'] / mb:.1f} | "
            f"{r['footprint_after_forward'] / mb:.1f} | {r['ratio_to_fp16']:.3f} | "
            f"{r['ratio_to_fp16_after_forward']:.3f} | {r['load_s']:.2f} | "
            f"{r['peak_extra_anon_rss'] / mb:.0f} | {r['nll']:.4f} | {r['nll_diff']:+.4f} | "
            f"{r['logits_rel_error']:.4f} | {r['routing_agreement']:.3f} |"
        )
    return "\n".join(lines)


def write_json(payload: dict[str, Any]) -> None:
    """Write `payload` to RESULTS atomically."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(RESULTS, payload)


def main() -> None:
    """Build, save, load every variant in its own process, print and save the comparison."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        folder = Path(tmp)
        model_info = build_and_save(folder)
        results = [run_variant(v, folder) for v in VARIANTS]
    rows = [row for row, _ in results]
    add_comparisons(rows, {row["variant"]: out for row, out in results})
    msa4 = next(r for r in rows if r["variant"] == "msa-4bit")
    payload = {
        "model": model_info,
        "tokens_shape": list(TOKENS_SHAPE),
        "rows": rows,
        "goal_ratio_4bit_to_fp16": GOAL_RATIO,
        "goal_met": msa4["ratio_to_fp16"] <= GOAL_RATIO
        and msa4["ratio_to_fp16_after_forward"] <= GOAL_RATIO,
        "versions": {p: version(p) for p in ("torch", "transformers", "bitsandbytes")},
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
    }
    share = model_info["expert_parameters"] / model_info["parameters"]
    print(
        f"Mixtral-architecture model, {model_info['parameters'] / 1e6:.1f} M parameters "
        f"({share:.1%} in experts), random weights; NLL on {TOKENS_SHAPE[0]} x "
        f"{TOKENS_SHAPE[1]} random tokens\n"
    )
    print(table(rows))
    print(
        f"\nmsa-4bit / fp16 = {msa4['ratio_to_fp16']:.3f} "
        f"(after a forward {msa4['ratio_to_fp16_after_forward']:.3f}); goal <= {GOAL_RATIO}: "
        f"{'met' if payload['goal_met'] else 'NOT met'}. Wall {payload['wall_s']:.0f} s."
    )
    write_json(payload)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL_DIR", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
    else:
        main()
