"""Fused MoE experts as one `nn.Linear` per expert projection, so bitsandbytes can quantise them.

transformers 5 stores Mixtral-style experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`); bitsandbytes quantises only `nn.Linear`. `swap_fused_experts`
replaces each fused experts module by a `LinearExperts` with the same attribute path, forward
signature and math.

>>> # names = swap_fused_experts(model)   # ['model.layers.0.mlp.experts', ...]
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from msa_edit.errors import MsaEditError


class LinearExperts(nn.Module):
    """Fused MoE experts as one `nn.Linear` pair per expert, so bitsandbytes can quantise them.

    Drop-in for transformers' fused experts modules (`MixtralExperts` and others with the same
    layout): `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`,
    with the same eager math (`act(gate) * up` from one `[2I, H]` projection, then `[H, I]`), so in
    full precision it is bit-identical to the fused module under `experts_implementation="eager"`
    (and, measured, under the default "grouped_mm" on CPU). Index `num_experts` means "no expert".

    >>> from transformers import MixtralConfig
    >>> from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    >>> config = MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=4)
    >>> fused = MixtralExperts(config)
    >>> experts = LinearExperts.from_fused(fused)
    >>> experts.num_experts, tuple(experts.gate_up_proj[0].weight.shape)
    (4, (32, 8))
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.gate_up_proj = nn.ModuleList(
            nn.Linear(hidden_dim, 2 * intermediate_dim, bias=False) for _ in range(num_experts)
        )
        self.down_proj = nn.ModuleList(
            nn.Linear(intermediate_dim, hidden_dim, bias=False) for _ in range(num_experts)
        )
        self.act_fn = act_fn

    @classmethod
    def empty_like(cls, fused: nn.Module) -> LinearExperts:
        """A `LinearExperts` with `fused`'s shapes and activation, parameters on the meta device."""
        gate_up, _ = _fused_weights(fused)
        num_experts, two_i, hidden = gate_up.shape
        with torch.device("meta"):
            return cls(num_experts, hidden, two_i // 2, cast(nn.Module, fused.act_fn))

    @classmethod
    def from_fused(cls, fused: nn.Module) -> LinearExperts:
        """A `LinearExperts` whose weights are views of `fused`'s tensors (no copy)."""
        new = cls.empty_like(fused)
        gate_up, down = _fused_weights(fused)
        for e in range(new.num_experts):
            new.gate_up_proj[e].weight = nn.Parameter(gate_up.data[e], requires_grad=False)
            new.down_proj[e].weight = nn.Parameter(down.data[e], requires_grad=False)
        return new

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of each token's top-k expert outputs; `[T, H]` in, `[T, H]` out."""
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for hit in expert_hit:
            e = int(hit[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            out = self.down_proj[e](self.act_fn(gate) * up)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        """Shapes, for `print(model)`."""
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}"
        )


def _fused_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused experts module's `(gate_up_proj [E, 2I, H], down_proj [E, H, I])`."""
    return cast(torch.Tensor, module.gate_up_proj), cast(torch.Tensor, module.down_proj)


def _is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` holds fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` experts."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
    )


def _check_fused_layout(name: str, module: nn.Module) -> None:
    """Raise unless `module`'s fused layout is the one `LinearExperts` reproduces exactly."""
    gate_up, down = _fused_weights(module)
    e, two_i, h = gate_up.shape
    layout_ok = (
        tuple(down.shape) == (e, h, two_i // 2)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_post_expert_norm", False)
        and not any(n.endswith("bias") for n, _ in module.named_parameters())
        and hasattr(module, "act_fn")
    )
    if not layout_ok:
        raise MsaEditError(
            f"experts module {name} ({type(module).__name__}) has a fused layout msa_edit cannot "
            "quantise (transposed, interleaved, biased or normed); load it in full precision"
        )


def swap_fused_experts(model: nn.Module) -> list[str]:
    """Replace each fused experts module of `model` in place by a `LinearExperts`; return the names.

    Meta-device modules get empty (meta) replacements; materialised ones get views of their
    weights, so the swap copies nothing and the outputs stay bit-identical.

    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    ...                     num_local_experts=4)
    >>> model = MixtralForCausalLM(cfg)
    >>> swap_fused_experts(model)
    ['model.layers.0.mlp.experts']
    """
    names = [n for n, m in model.named_modules() if _is_fused_experts(m)]
    for name in names:
        fused = model.get_submodule(name)
        _check_fused_layout(name, fused)
        on_meta = _fused_weights(fused)[0].device.type == "meta"
        new = LinearExperts.empty_like(fused) if on_meta else LinearExperts.from_fused(fused)
        model.set_submodule(name, new)
    return names
