"""Load a causal LM in bitsandbytes 4-bit (nf4) or 8-bit with its fused MoE experts quantised too.

transformers 5 stores Mixtral-style experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`, no `nn.Linear`), and its bitsandbytes integration only replaces
`nn.Linear`: a plain `BitsAndBytesConfig(load_in_4bit=True)` load leaves the experts — nearly all
of an MoE's parameters — in full precision. `load_quantized` fixes that:

1. build the model skeleton from its config with parameters on the meta device (no memory);
2. swap every fused experts module for a `LinearExperts` (one `nn.Linear` per expert projection,
   same attribute path `model.model.layers[i].mlp.experts`, same forward signature and math);
3. replace every `nn.Linear` except the output head and the routers by a bitsandbytes layer;
4. stream the safetensors shards tensor by tensor (fused experts one slice at a time) and
   quantise each weight as it arrives, so the full-precision model is never in memory: the
   load's peak is the quantised model plus one expert matrix and bitsandbytes' temporaries for
   it (measured on a 380 MB fp32 checkpoint: +112 MB anonymous memory for a 55 MB 4-bit model).

On CPU, bitsandbytes quantises ≈ 10-15 M parameters/s on 2 cores (Mixtral-8x7B: about an hour); on
CUDA it takes seconds. Checkpoints in transformers' per-expert format (Mixtral `w1/w2/w3`,
Qwen2-MoE/OLMoE `gate_proj/up_proj/down_proj`) and in the fused module-tree format both load.

The routers (`mlp.gate`), embeddings, norms and `lm_head` stay unquantised in `dtype`, so the
router logits the lesions act on are exactly those of the `dtype` model given the same hidden
states. Dense models (Llama, GPT-2, ...) take the plain transformers bitsandbytes path.

The result is for analysis (lesion games, evaluation); it is not meant to be re-saved with
`save_pretrained` — bake edits into the full-precision base model instead.

>>> from msa_edit.footprint import footprint
>>> model = load_quantized("path/to/mixtral", bits=4)  # doctest: +SKIP
>>> footprint(model)  # bytes as stored  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from msa_edit import optional
from msa_edit.checkpoints import checkpoint_key, checkpoint_shards, iter_checkpoint, model_folder
from msa_edit.errors import MsaEditError
from msa_edit.linear_experts import LinearExperts, swap_fused_experts
from msa_edit.units import ARCHITECTURES

__all__ = ["load_quantized"]

BITS = (4, 8)
QUANT_TYPE = "nf4"
"""4-bit data type: NormalFloat4, the QLoRA default for normally distributed weights."""
DOUBLE_QUANT = True
"""Quantise the 4-bit block scales too (≈ 0.37 bit/param saved). On CPUs with AVX512-BF16,
bitsandbytes repacks each weight on its first forward and keeps bf16 scales instead (+0.25
bit/param)."""
INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold (the transformers default)."""

_ROLES = {
    "w1": "gate",
    "gate_proj": "gate",
    "w3": "up",
    "up_proj": "up",
    "w2": "down",
    "down_proj": "down",
}
_EXPERT_KEY = re.compile(
    r"^(?P<path>.+\.experts)\.(?P<e>\d+)\.(?P<proj>" + "|".join(_ROLES) + r")\.weight$"
)
_FUSED_KEY = re.compile(r"^(?P<path>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_IGNORED_KEY = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


def _import_bnb() -> Any:
    """The `bitsandbytes` module, or a one-line error saying how to install it."""
    return optional.require("bitsandbytes", "4/8-bit loading")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise MsaEditError(f"bits={bits!r} is not supported; use bits=4 (nf4) or bits=8 (LLM.int8)")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise MsaEditError(
            f"device={device!r} is not supported for bitsandbytes; use 'cpu' or 'cuda'"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MsaEditError(
            "device='cuda' was asked for but CUDA is not available; use device='cpu'"
        )
    return dev


def _bnb_config(bits: int, dtype: torch.dtype) -> Any:
    """The `BitsAndBytesConfig` of the plain transformers path, matching the MoE path's settings."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=DOUBLE_QUANT,
        bnb_4bit_compute_dtype=dtype,
    )


def _skeleton(config: Any, dtype: torch.dtype) -> PreTrainedModel:
    """The model for `config` with parameters on the meta device and buffers materialised."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _keep_unquantised(model: PreTrainedModel) -> set[str]:
    """Names of `nn.Linear` modules that stay in `dtype`: the output head, routers (the module
    name the architecture table gives, else "gate"), fp32 modules."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if m is head}
    arch = ARCHITECTURES.get(str(getattr(model.config, "model_type", "")))
    router = "gate" if arch is None else arch.router
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] == router or any(k in name.split(".") for k in keep):
            names.add(name)
    return names


def _replace_linears(model: PreTrainedModel, bits: int, dtype: torch.dtype, bnb: Any) -> int:
    """Swap each plain `nn.Linear` (bar `_keep_unquantised`) for a meta-device bnb layer; count."""
    keep = _keep_unquantised(model)
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep]
    for name in targets:
        old = model.get_submodule(name)
        with torch.device("meta"):
            if bits == 8:
                new = bnb.nn.Linear8bitLt(
                    old.in_features,
                    old.out_features,
                    old.bias is not None,
                    has_fp16_weights=False,
                    threshold=INT8_THRESHOLD,
                )
            else:
                new = bnb.nn.Linear4bit(
                    old.in_features,
                    old.out_features,
                    old.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=DOUBLE_QUANT,
                    quant_type=QUANT_TYPE,
                )
        new.requires_grad_(False)
        model.set_submodule(name, new)
    return len(targets)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Called after every quantised matrix: glibc otherwise keeps the freed full-precision
    temporaries, and the load's peak memory drifts towards the checkpoint's size (measured on a
    380 MB checkpoint: +105-115 MB peak with it, +160-400 MB without, same load time).
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass
class _Loader:
    """Puts checkpoint tensors into a meta-device skeleton, quantising bnb layers as they arrive."""

    model: PreTrainedModel
    bnb: Any
    dtype: torch.dtype
    device: torch.device

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Set parameter or buffer `name` (a state-dict key of the model) to `tensor`."""
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if attr == "weight" and isinstance(
            module, (self.bnb.nn.Linear4bit, self.bnb.nn.Linear8bitLt)
        ):
            self._put_quantised(module, tensor)
        elif attr in module._parameters:
            old = module._parameters[attr]
            dtype = old.dtype if old is not None and old.dtype.is_floating_point else tensor.dtype
            module._parameters[attr] = nn.Parameter(
                tensor.to(self.device, dtype=dtype), requires_grad=False
            )
        elif attr in module._buffers:
            old_buf = module._buffers[attr]
            dtype = old_buf.dtype if old_buf is not None else tensor.dtype
            module._buffers[attr] = tensor.to(self.device, dtype=dtype)
        else:
            raise KeyError(name)

    def _put_quantised(self, module: nn.Module, tensor: torch.Tensor) -> None:
        weight = tensor.to(self.dtype).contiguous()
        if isinstance(module, self.bnb.nn.Linear4bit):
            param = self.bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=DOUBLE_QUANT,
                quant_type=QUANT_TYPE,
                quant_storage=torch.uint8,
                module=module,
            )
        else:
            param = self.bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        module.weight = param.to(self.device)  # bitsandbytes quantises on the move
        _malloc_trim()


def _stream_weights(loader: _Loader, shards: list[Path]) -> list[str]:
    """Load every checkpoint tensor into the skeleton; return the keys nothing matched."""
    model = loader.model
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    halves: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, handle in iter_checkpoint(shards):
        name = checkpoint_key(key, model.config.model_type)
        expert, fused = _EXPERT_KEY.match(name), _FUSED_KEY.match(name)
        if expert and isinstance(_module_or_none(model, expert["path"]), LinearExperts):
            _put_expert(loader, expert, handle.get_tensor(key), halves)
        elif fused and isinstance(_module_or_none(model, fused["path"]), LinearExperts):
            sliced = handle.get_slice(key)
            experts = cast(LinearExperts, model.get_submodule(fused["path"]))
            for e in range(experts.num_experts):
                loader.put(f"{fused['path']}.{fused['proj']}.{e}.weight", sliced[e])
        elif name in targets:
            loader.put(name, handle.get_tensor(key))
        elif not _IGNORED_KEY.search(name):
            unexpected.append(key)
    unexpected += [f"{path}.{e}.(gate|up)" for path, e in halves]
    return unexpected


def _put_expert(
    loader: _Loader,
    match: re.Match[str],
    tensor: torch.Tensor,
    halves: dict[tuple[str, int], dict[str, torch.Tensor]],
) -> None:
    """Load one per-expert checkpoint matrix; gate and up are joined once both have arrived."""
    path, e, role = match["path"], int(match["e"]), _ROLES[match["proj"]]
    if role == "down":
        loader.put(f"{path}.down_proj.{e}.weight", tensor)
        return
    pending = halves.setdefault((path, e), {})
    pending[role] = tensor
    if len(pending) == 2:
        del halves[(path, e)]
        loader.put(f"{path}.gate_up_proj.{e}.weight", torch.cat([pending["gate"], pending["up"]]))


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _finish(model: PreTrainedModel, folder: Path, unexpected: list[str]) -> None:
    """Tie weights, check nothing is left on the meta device, load the generation config."""
    if unexpected:
        raise MsaEditError(
            f"{len(unexpected)} checkpoint tensors match nothing in {type(model).__name__} "
            f"(first: {unexpected[0]}); check the checkpoint was saved for this architecture"
        )
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise MsaEditError(
            f"{len(missing)} weights are missing from the checkpoint in {folder} "
            f"(first: {missing[0]}); check the checkpoint is complete"
        )
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)


def _load_moe(
    model: PreTrainedModel, folder: Path, bits: int, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """Quantise `model` (a meta skeleton with `LinearExperts`) while streaming its checkpoint."""
    bnb = _import_bnb()
    _replace_linears(model, bits, dtype, bnb)
    loader = _Loader(model, bnb, dtype, device)
    unexpected = _stream_weights(loader, checkpoint_shards(folder))
    _finish(model, folder, unexpected)
    _guard_cpu_packing(model, bnb)
    if device.type != "cpu":  # the skeleton built its buffers on the CPU
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return model.eval()


def _guard_cpu_packing(model: nn.Module, bnb: Any) -> None:
    """Keep bitsandbytes off its AVX512-BF16 CPU kernel for layers whose shape it cannot pack.

    On such CPUs `Linear4bit` repacks its weight on the first forward, which needs
    `out_features % 32 == 0` and `in_features % 64 == 0` (true for real models, not for tiny test
    models); other layers take the generic dequantise-and-matmul path instead of crashing.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (
            module.out_features % 32 or module.in_features % 64
        ):
            module.support_avx512bf16_for_cpu = False


class _OncePerMessage(logging.Filter):
    """Lets each distinct log message through once (bnb warns on every 8-bit matmul of non-fp16)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


def _quiet_int8_casts() -> None:
    """Say 'MatMul8bitLt: inputs will be cast ... to float16' once, not on every layer call."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
        logger.addFilter(_OncePerMessage())


def _load_dense(
    folder: Path, bits: int, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """The plain transformers + bitsandbytes load (every `nn.Linear` but the head quantised)."""
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=_bnb_config(bits, dtype),
        dtype=dtype,
        device_map={"": str(device)},
    )
    _guard_cpu_packing(model, _import_bnb())
    return model.eval()


def load_quantized(
    path_or_id: str | Path,
    bits: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal LM with bitsandbytes `bits`-bit weights (4: nf4, 8: LLM.int8), experts too.

    `path_or_id` is a model directory with safetensors weights or a Hub id. `dtype` is the dtype of
    what stays unquantised (embeddings, norms, routers, `lm_head`) and the 4-bit compute dtype.
    `device` defaults to CUDA when available, else CPU. Models with fused MoE experts are built on
    the meta device, their experts swapped for `LinearExperts`, and their checkpoint streamed and
    quantised tensor by tensor (peak memory ≈ quantised model + one expert matrix's temporaries);
    dense models go through `from_pretrained(quantization_config=...)`. Both use nf4 with double
    quantisation (4-bit) or LLM.int8 with threshold 6 (8-bit), and keep `lm_head` unquantised.

    >>> model = load_quantized("path/to/mixtral", bits=4)  # doctest: +SKIP
    >>> type(model.model.layers[0].mlp.experts).__name__  # doctest: +SKIP
    'LinearExperts'
    """
    _check_bits(bits)
    _import_bnb()
    dev = _resolve_device(device)
    folder = model_folder(path_or_id)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise MsaEditError(
            f"cannot read a model config in {folder} ({exc}); pass a model directory"
        ) from exc
    if bits == 8:
        _quiet_int8_casts()
    model = _skeleton(config, dtype)
    if swap_fused_experts(model):
        model = _load_moe(model, folder, bits, dtype, dev)
    else:
        model = _load_dense(folder, bits, dtype, dev)
    model.config.name_or_path = str(path_or_id)
    return model
