"""Streamed expert surgery on checkpoint shards == the in-memory editor, tensor by tensor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import MOE_FAMILIES, VOCAB, build
from transformers import AutoModelForCausalLM

from msa_edit.edit import remove_experts
from msa_edit.edit.checkpoint import slice_checkpoint
from msa_edit.errors import MsaEditError
from msa_edit.export import export_checkpoint
from msa_edit.lesions import lesioned
from msa_edit.units import Unit

IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
UNIFORM = [
    Unit(0, "experts", 1),
    Unit(0, "experts", 4),
    Unit(1, "experts", 0),
    Unit(1, "experts", 5),
]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in `folder`."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            out |= {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return out


def saved(model, folder: Path, shard: str = "12KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize(("units", "extra"), [(UNIFORM, "refuse"), (UNIFORM[:3], "zero")])
def test_streamed_export_equals_the_in_memory_editor(
    family: str, units: list[Unit], extra: str, tmp_path: Path
) -> None:
    model = build(family)
    src = saved(model, tmp_path / "src")
    assert len(list(src.glob("*.safetensors"))) > 3  # one expert's matrices span two shards
    edited = copy.deepcopy(model)
    record = remove_experts(edited, units, extra=extra)  # type: ignore[arg-type]
    reference = saved(edited, tmp_path / "ref")
    out, streamed = export_checkpoint(src, units, tmp_path / "out", extra=extra)  # type: ignore[arg-type]
    got, want = tensors(out), tensors(reference)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert streamed.matches == record.matches and streamed.units == record.units
    assert streamed.params_before - streamed.params_after == record.params_saved
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert all((out / shard).is_file() for shard in index["weight_map"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(IDS).logits, edited(IDS).logits, atol=1e-5, rtol=1e-5)
    if extra == "refuse":
        with lesioned(model, units, "reroute"), torch.inference_mode():
            expected = model(IDS).logits
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert (out / "README.md").is_file() and not list(tmp_path.glob(".out.tmp-*"))


def fused_checkpoint(model, folder: Path) -> Path:
    """The model's own transformers 5 tensors (fused `experts.gate_up_proj [E, 2I, H]` and
    `down_proj [E, H, I]`; save_pretrained converts back to per-expert names) in two shards that
    split layer 0's gate_up_proj from its down_proj."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return two_shards(model, state, folder, "model.layers.0.mlp.experts.gate_up_proj")


def two_shards(model, state: dict[str, torch.Tensor], folder: Path, split_at: str) -> Path:
    """`state` saved as a checkpoint of two shards (keys in sorted order, the second one starting
    at `split_at`), with an index and the model's config."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    keys = sorted(state)
    split = keys.index(split_at)
    halves = {"model-1.safetensors": keys[:split], "model-2.safetensors": keys[split:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in halves.items() for k in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize(("units", "extra"), [(UNIFORM, "refuse"), (UNIFORM[:3], "zero")])
def test_fused_checkpoints_slice_like_the_in_memory_editor(
    family: str, units: list[Unit], extra: str, tmp_path: Path
) -> None:
    model = build(family)
    src = fused_checkpoint(model, tmp_path / "src")
    edited = copy.deepcopy(model)
    remove_experts(edited, units, extra=extra)  # type: ignore[arg-type]
    out, _ = export_checkpoint(src, units, tmp_path / "out", extra=extra)  # type: ignore[arg-type]
    got, want = tensors(out), edited.state_dict()
    assert got.keys() == set(want) and "model.layers.1.mlp.experts.down_proj" in got
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(IDS).logits, edited(IDS).logits, atol=1e-6, rtol=0)


def per_expert_checkpoint(model, folder: Path) -> Path:
    """The model saved with Mixtral's original per-expert names (`block_sparse_moe.experts.{e}.
    w1|w2|w3.weight`), in two shards that split one expert's matrices."""
    size = model.config.intermediate_size
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        old = key.replace(".mlp.", ".block_sparse_moe.")
        if key.endswith("experts.gate_up_proj"):
            for e in range(value.shape[0]):
                out[f"{old[: -len('.gate_up_proj')]}.{e}.w1.weight"] = value[e, :size].clone()
                out[f"{old[: -len('.gate_up_proj')]}.{e}.w3.weight"] = value[e, size:].clone()
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                out[f"{old[: -len('.down_proj')]}.{e}.w2.weight"] = value[e].clone()
        else:
            out[old] = value.clone()
    # w1 of layer 0's expert 3 in the first shard, its w2 in the second
    return two_shards(model, out, folder, "model.layers.0.block_sparse_moe.experts.3.w2.weight")


def test_per_expert_checkpoints_drop_and_renumber_experts(tmp_path: Path) -> None:
    model = build("mixtral")
    src = per_expert_checkpoint(model, tmp_path / "src")
    units = [
        Unit(0, "experts", 3),
        Unit(0, "experts", 0),
        Unit(1, "experts", 2),
        Unit(1, "experts", 4),
    ]
    out, _ = export_checkpoint(src, units, tmp_path / "out")
    got, old = tensors(out), tensors(src)
    prefix = "model.layers.0.block_sparse_moe"
    assert f"{prefix}.experts.4.w1.weight" not in got  # 6 experts - 2 = 4, numbered 0-3
    assert torch.equal(got[f"{prefix}.experts.2.w2.weight"], old[f"{prefix}.experts.4.w2.weight"])
    assert torch.equal(got[f"{prefix}.gate.weight"], old[f"{prefix}.gate.weight"][[1, 2, 4, 5]])
    edited = copy.deepcopy(model)
    remove_experts(edited, units)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # transformers fuses the old layout
    assert reloaded.config.num_local_experts == 4
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(IDS).logits, edited(IDS).logits, atol=1e-6, rtol=0)


def test_infeasible_plans_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    src = saved(build("mixtral"), tmp_path / "src")
    too_many = [Unit(0, "experts", e) for e in range(5)] + [Unit(1, "experts", e) for e in range(5)]
    for units, extra, message in (
        (too_many, "refuse", "fewer than top-k=2"),
        (UNIFORM[:3], "refuse", "non-uniform expert removal"),
        ([Unit(0, "experts", 9)], "refuse", "is not an expert of this model"),
        ([Unit(0, "heads", 1)], "refuse", "is not an expert of this model"),
    ):
        with pytest.raises(MsaEditError, match=message):
            export_checkpoint(src, units, tmp_path / "out", extra=extra)  # type: ignore[arg-type]
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    dense = saved(build("llama"), tmp_path / "dense")
    with pytest.raises(MsaEditError, match="has no experts msa_edit can remove"):
        export_checkpoint(dense, UNIFORM, tmp_path / "out")


def test_a_failure_mid_write_leaves_no_model_folder(tmp_path: Path, monkeypatch) -> None:
    src = saved(build("olmoe"), tmp_path / "src")
    from msa_edit.edit import checkpoint

    calls = []
    real = checkpoint.write_tensors

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(src, UNIFORM, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_slice_checkpoint_wants_an_empty_folder(tmp_path: Path) -> None:
    src = saved(build("mixtral"), tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_text("")
    with pytest.raises(MsaEditError, match="is not empty"):
        slice_checkpoint(src, UNIFORM, tmp_path / "dst")
