"""Canonical unit names, the unit kinds, and where each architecture keeps its units.

A unit prints as its canonical name and parses back from it:
`layers.{L}.experts.{E}`, `layers.{L}.heads.{H}`, `layers.{L}.mlp.neurons.{N}`,
`layers.{L}.shared_experts.{S}`, `layers.{L}`.
Two registries hold what the rest of the package asks: `UNIT_KINDS`, one `UnitKind` per kind
(its name segment, how many a layer has, the projection that carries it, how it is removed and
plotted), and `ARCHITECTURES`, one entry per `model_type`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, Literal, cast

import torch
from torch import nn

from msa_edit.errors import MsaEditError, short
from msa_edit.routers import ROUTERS, Router, RouterFlags

Kind = Literal["experts", "heads", "neurons", "shared_experts", "layer"]
MAX_INDEX = 2**31 - 1
"""The largest layer or unit index a name may hold; larger ones would overflow index tensors."""


@dataclass(frozen=True, order=True)
class Unit:
    """One lesionable unit: an expert, an attention head, an MLP neuron, or a whole layer.

    >>> Unit.parse("layers.3.experts.5")
    Unit('layers.3.experts.5')
    >>> str(Unit(2, "neurons", 117)), Unit.parse("layers.4").kind
    ('layers.2.mlp.neurons.117', 'layer')
    """

    layer: int
    kind: Kind
    index: int = -1

    def __str__(self) -> str:
        segment = self.spec.segment
        return (
            f"layers.{self.layer}"
            if segment is None
            else f"layers.{self.layer}.{segment}.{self.index}"
        )

    @property
    def spec(self) -> UnitKind:
        """The registry entry of this unit's kind."""
        return UNIT_KINDS[self.kind]

    def __repr__(self) -> str:
        return f"Unit('{self}')"

    @classmethod
    def parse(cls, name: str) -> Unit:
        """The unit named `name`; raises `MsaEditError` for a malformed name.

        Indices are ASCII digits below 2**31 (`MAX_INDEX`):

        >>> Unit.parse("layers.10000000000000000000000.experts.0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        msa_edit.errors.MsaEditError: unit name '...' has an index above 2147483647; use ...
        """
        match = _name_regex().fullmatch(name.strip()) if isinstance(name, str) else None
        if match is None:
            forms = [f"layers.L.{k.segment}.{k.letter}" for k in UNIT_KINDS.values() if k.segment]
            raise MsaEditError(
                f"malformed unit name {short(name)}; use layers.L, {', '.join(forms[:-1])} "
                f"or {forms[-1]} (0-based)"
            )
        layer, kind, index = match.groups()
        numbers = [n for n in (layer, index) if n is not None]
        if any(len(n.lstrip("0")) > len(str(MAX_INDEX)) or int(n) > MAX_INDEX for n in numbers):
            raise MsaEditError(
                f"unit name {short(name)} has an index above {MAX_INDEX}; "
                "use the model's real layer and unit indices (0-based)"
            )
        if kind is None:
            return cls(int(layer), "layer")
        by_segment = {k.segment: k.name for k in UNIT_KINDS.values()}
        return cls(int(layer), by_segment[kind], int(index))


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its units, as dotted paths, and how its router routes.

    `layers` leads from the causal-LM root to the decoder layers; the others start at one layer.
    MoE blocks have a router `{moe}.{router}` (weight [E, H]) whose scheme is
    `routers.ROUTERS[route]`, and fused experts `{moe}.experts` called as
    experts(hidden [N, H], index [N, k], weights [N, k]), the last two named `expert_args[1:]`.
    """

    layers: str
    attn_out: str
    n_heads: str
    mlp_down: str | None
    moe: str | None = None
    n_experts: str | None = None
    renormalize: str | bool = True
    """Top-k weights renormalised to sum 1: always (True) or per the named config flag."""
    scores_in_logits_dtype: bool = True
    """Router returns top-k weights cast back to the logits' dtype (Mixtral keeps float32)."""
    router: str = "gate"
    route: str = "softmax_top_k"
    expert_args: tuple[str, str, str] = ("hidden_states", "top_k_index", "top_k_weights")
    expert_out: tuple[str, ...] = ("down_proj",)
    """The fused experts' per-expert tensors through which an expert writes (weight, bias)."""
    shared: str | None = None
    """The MoE block's always-on shared-expert MLP, whose `down_proj` writes to the residual."""
    n_shared: str | None = None
    """Config key of the shared experts' count (their MLP is that many experts wide); else 1."""
    mlp_inputs: tuple[str, ...] = ()
    """The dense MLP's input projections, sliced by output when neurons are cut out (empty: the
    family's MLP is not sliced; its neurons are zeroed)."""
    mlp_width_key: str | None = None
    """Config key of the dense MLP's width, lowered when neurons are cut out."""
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    """Substring renames from older checkpoints' tensor names to the transformers 5 module tree."""


_LLAMA = Architecture(
    "model.layers",
    "self_attn.o_proj",
    "num_attention_heads",
    "mlp.down_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_width_key="intermediate_size",
)
_QWEN_MOE = Architecture(
    "model.layers",
    "self_attn.o_proj",
    "num_attention_heads",
    "mlp.down_proj",
    moe="mlp",
    n_experts="num_experts",
    renormalize="norm_topk_prob",
)
_DEEPSEEK = Architecture(
    "model.layers",
    "self_attn.o_proj",
    "num_attention_heads",
    "mlp.down_proj",
    moe="mlp",
    n_experts="n_routed_experts",
    route="sigmoid_group_top_k",
    shared="shared_experts",
    n_shared="n_shared_experts",
)
ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture(
        "model.layers",
        "self_attn.o_proj",
        "num_attention_heads",
        None,
        moe="mlp",
        n_experts="num_local_experts",
        renormalize=True,
        scores_in_logits_dtype=False,
        checkpoint_renames=((".block_sparse_moe.", ".mlp."),),  # older Mixtral checkpoints
    ),
    "qwen2_moe": replace(_QWEN_MOE, shared="shared_expert"),
    "qwen3_moe": replace(_QWEN_MOE, n_experts="num_local_experts"),  # its config.json key
    "olmoe": _QWEN_MOE,
    "deepseek_v3": _DEEPSEEK,
    "glm4_moe": _DEEPSEEK,
    "gpt_oss": Architecture(
        "model.layers",
        "self_attn.o_proj",
        "num_attention_heads",
        None,
        moe="mlp",
        n_experts="num_local_experts",
        router="router",
        route="top_k_softmax",
        expert_args=("hidden_states", "router_indices", "routing_weights"),
        expert_out=("down_proj", "down_proj_bias"),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Architecture(
        "transformer.h",
        "attn.c_proj",
        "n_head",
        "mlp.c_proj",
        mlp_inputs=("mlp.c_fc",),
        mlp_width_key="n_inner",
    ),
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture(model: nn.Module) -> Architecture:
    """The `Architecture` entry of `model.config.model_type`, or a clear error listing them."""
    model_type = _model_type(model)
    if model_type not in ARCHITECTURES:
        raise MsaEditError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))} (add an entry to msa_edit.units.ARCHITECTURES)"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, from a causal LM or its base model."""
    path = architecture(model).layers
    for candidate in (path, path.split(".", 1)[1]):
        found = _get(model, candidate)
        if isinstance(found, nn.ModuleList):
            return found
    raise MsaEditError(f"could not find the decoder layers at {path!r} in {type(model).__name__}")


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def submodule(layer: nn.Module, path: str | None) -> nn.Module | None:
    """The module at dotted `path` inside `layer`, or None."""
    return None if path is None else _get(layer, path)


def moe_block(model: nn.Module, layer: nn.Module) -> nn.Module | None:
    """The layer's MoE block (with a router and `.experts`), or None for a dense layer."""
    arch = architecture(model)
    block = submodule(layer, arch.moe)
    if block is None or not hasattr(block, arch.router) or not hasattr(block, "experts"):
        return None
    return block


def moe_parts(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The (router, experts) modules of an MoE layer."""
    block = moe_block(model, layer)
    if block is None:
        raise MsaEditError(f"{type(layer).__name__} has no MoE block with a router and experts")
    gate = getattr(block, architecture(model).router)
    return cast(nn.Module, gate), cast(nn.Module, block.experts)


def router(model: nn.Module) -> tuple[Router, RouterFlags]:
    """The model's routing scheme and the switches it reads."""
    arch = architecture(model)
    return ROUTERS[arch.route], RouterFlags(renormalizes(model), arch.scores_in_logits_dtype)


def expert_groups(config: Any) -> int:
    """How many expert groups the router of `config` (an object or a config.json dict) picks
    from: experts leave a layer only in equal numbers per group. 1 for most families."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    arch = ARCHITECTURES.get(str(get("model_type")))
    key = None if arch is None else ROUTERS[arch.route].groups
    return 1 if key is None else int(get(key) or 1)


def n_heads(model: nn.Module) -> int:
    return int(getattr(model.config, architecture(model).n_heads))


def n_experts(model: nn.Module) -> int:
    arch = architecture(model)
    return 0 if arch.n_experts is None else int(getattr(model.config, arch.n_experts))


def renormalizes(model: nn.Module) -> bool:
    """Whether the router renormalises its top-k weights."""
    flag = architecture(model).renormalize
    return flag if isinstance(flag, bool) else bool(getattr(model.config, flag))


def in_dim(module: nn.Module) -> int:
    """The axis of `module.weight` that runs over input channels: 1 for `nn.Linear` (and
    bitsandbytes' Linear), 0 for GPT-2's `Conv1D` (weight [in, out])."""
    return 1 if hasattr(module, "in_features") else 0


def out_dim(module: nn.Module) -> int:
    """The axis of `module.weight` that runs over output channels (see `in_dim`)."""
    return 1 - in_dim(module)


def mlp_width(module: nn.Module) -> int:
    """Input width of a projection (an MLP down projection, an attention output projection)."""
    width = getattr(module, "in_features", None)
    if width is None:
        width = cast(torch.Tensor, module.weight).shape[in_dim(module)]
    return int(width)


def out_width(module: nn.Module) -> int:
    """Output width of a projection (see `mlp_width`)."""
    width = getattr(module, "out_features", None)
    if width is None:
        width = cast(torch.Tensor, module.weight).shape[out_dim(module)]
    return int(width)


def n_shared_experts(model: nn.Module) -> int:
    """Shared experts per MoE layer (0 when the family has none)."""
    arch = architecture(model)
    if arch.shared is None:
        return 0
    return 1 if arch.n_shared is None else int(getattr(model.config, arch.n_shared))


# ---- the unit kinds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitKind:
    """One kind of unit, with everything the package asks about it.

    `count(model, layer)` says how many the decoder layer has (0: none). Units with `channels`
    are equal slices of the input channels of that projection (a head's columns of the attention
    output, one neuron, one shared expert's share of the shared MLP): lesions, scaling and IA³
    export act on those channels. `routed` units (experts) are lesioned through the router;
    a unit kind without a `segment` is the whole layer. `removal` names how `remove` edits it:
    "reroute" (sliced out of router and experts), "slice" (cut out of the MLP where the config
    allows, else zeroed), "zero" (its channels zeroed), None (not removable; scale it by 0).
    """

    name: Kind
    segment: str | None
    letter: str
    axis: str
    count: Callable[[nn.Module, nn.Module], int]
    channels: Callable[[nn.Module, nn.Module], nn.Module | None] | None = None
    routed: bool = False
    removal: Literal["reroute", "slice", "zero"] | None = "zero"
    holder: str = ""
    """What a layer lacks when it has none of these units ("dense MLP"); default the name."""

    @property
    def heatmap(self) -> str:
        """The run directory's heat-map file of this kind."""
        return f"heatmap_{self.segment.rsplit('.', 1)[-1] if self.segment else 'layers'}.png"

    def site(self, model: nn.Module, layer: nn.Module) -> nn.Module:
        """The projection whose input channels carry this kind's units in `layer`."""
        found = None if self.channels is None else self.channels(model, layer)
        if found is None:
            raise MsaEditError(f"{self.name} have no channel site in {type(layer).__name__}")
        return found


def _dense_down(model: nn.Module, layer: nn.Module) -> nn.Module | None:
    if moe_block(model, layer) is not None:
        return None
    return submodule(layer, architecture(model).mlp_down)


def _shared_down(model: nn.Module, layer: nn.Module) -> nn.Module | None:
    block, shared = moe_block(model, layer), architecture(model).shared
    return None if block is None or shared is None else submodule(block, f"{shared}.down_proj")


def _n_neurons(model: nn.Module, layer: nn.Module) -> int:
    down = _dense_down(model, layer)
    return 0 if down is None else mlp_width(down)


UNIT_KINDS: dict[str, UnitKind] = {
    k.name: k
    for k in (
        UnitKind(
            "experts", "experts", "E", "expert",
            lambda m, layer: n_experts(m) if moe_block(m, layer) is not None else 0,
            routed=True, removal="reroute",
        ),
        UnitKind(
            "heads", "heads", "H", "head", lambda m, layer: n_heads(m),
            channels=lambda m, layer: submodule(layer, architecture(m).attn_out),
        ),
        UnitKind(
            "neurons", "mlp.neurons", "N", "neuron", _n_neurons, channels=_dense_down,
            removal="slice", holder="dense MLP",
        ),
        UnitKind(
            "shared_experts", "shared_experts", "S", "shared expert",
            lambda m, layer: n_shared_experts(m) if _shared_down(m, layer) is not None else 0,
            channels=_shared_down,
        ),
        UnitKind("layer", None, "", "layer", lambda m, layer: 1, removal=None),
    )
}  # fmt: skip
KINDS: tuple[Kind, ...] = tuple(k.name for k in UNIT_KINDS.values())


@cache
def _name_regex() -> re.Pattern[str]:
    segments = "|".join(re.escape(k.segment) for k in UNIT_KINDS.values() if k.segment)
    return re.compile(rf"layers\.([0-9]+)(?:\.({segments})\.([0-9]+))?")


def discover(model: nn.Module, kinds: Iterable[Kind] = KINDS) -> list[Unit]:
    """Every unit of the requested kinds, in canonical order (layer, kind, index).

    Experts and shared experts exist in MoE layers, neurons in dense MLP layers, heads and
    layers everywhere.
    """
    wanted = [UNIT_KINDS[k] for k in dict.fromkeys(kinds)]
    units: list[Unit] = []
    for i, layer in enumerate(decoder_layers(model)):
        for kind in wanted:
            count = kind.count(model, layer)
            units += [Unit(i, kind.name, -1 if kind.segment is None else n) for n in range(count)]
    return sorted(units)


def summarize(units: Sequence[Unit]) -> str:
    """A short description of a unit set, e.g. 'layers.0-3.experts.0-7 (32)'."""
    parts = []
    for kind in UNIT_KINDS.values():
        of_kind = [u for u in units if u.spec is kind]
        if not of_kind:
            continue
        layers = sorted({u.layer for u in of_kind})
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        if kind.segment is None:
            parts.append(f"layers.{span} ({len(of_kind)})")
            continue
        idx = sorted({u.index for u in of_kind})
        parts.append(f"layers.{span}.{kind.segment}.{idx[0]}-{idx[-1]} ({len(of_kind)})")
    return ", ".join(parts) or "no units"


_NUMBER = re.compile(r"^[0-9*?]+$")


def _segment_matches(glob: str, word: str) -> bool:
    """Whether a one-segment glob matches `word`."""
    regex = re.escape(glob).replace(r"\*", "[^.]*").replace(r"\?", "[^.]")
    return re.fullmatch(regex, word) is not None


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a unit glob: `*` matches one dotted segment (or part of one), `?` one character.

    >>> bool(glob_regex("layers.*.experts.*").match("layers.3.experts.5"))
    True
    >>> bool(glob_regex("layers.*").match("layers.3.experts.5"))
    False
    """
    body = re.escape(pattern.strip()).replace(r"\*", "[^.]*").replace(r"\?", "[^.]")
    return re.compile(f"^{body}$")


def select(model: nn.Module, names: str | Sequence[str]) -> list[Unit]:
    """Units matching canonical names and/or globs (`layers.*.experts.*`), in canonical order.

    A name or glob that matches nothing is an error that lists what the model has.
    """
    patterns = [names] if isinstance(names, str) else list(names)
    if not patterns:
        raise MsaEditError("no units named; give names or globs such as 'layers.*.experts.*'")
    kinds = {k for p in patterns for k in kinds_of(p)}
    by_name = {str(u): u for u in discover(model, kinds)}
    chosen: set[Unit] = set()
    for pattern in patterns:
        regex = glob_regex(pattern)
        hits = [u for n, u in by_name.items() if regex.match(n)]
        if not hits:
            raise MsaEditError(
                f"no unit of this {_model_type(model)} model matches {pattern!r}; "
                f"it has {summarize(discover(model))}"
            )
        chosen.update(hits)
    return sorted(chosen)


def kinds_of(pattern: str) -> set[Kind]:
    """Unit kinds a canonical name or glob can name (empty: none).

    >>> sorted(kinds_of("layers.*.*.0")), kinds_of("layers.2.mlp.neurons.*"), kinds_of("layer.1")
    (['experts', 'heads', 'shared_experts'], {'neurons'}, set())
    """
    parts = pattern.strip().split(".")
    if len(parts) < 2 or not _segment_matches(parts[0], "layers") or not _NUMBER.match(parts[1]):
        return set()
    if len(parts) == 2:
        return {"layer"}
    middle = parts[2:-1]
    if not _NUMBER.match(parts[-1]):
        return set()
    return {
        k.name
        for k in UNIT_KINDS.values()
        if k.segment is not None
        and len(k.segment.split(".")) == len(middle)
        and all(_segment_matches(g, w) for g, w in zip(middle, k.segment.split("."), strict=True))
    }
