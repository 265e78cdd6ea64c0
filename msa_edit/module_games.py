"""Lesion games over the output channels of any torch modules: MLP hidden units, conv channels.

`ChannelGame(model, {name: module, ...}, inputs, readout)` is the engine's game
`bool [B, n_players] -> float [B, *shape]` for models that are not Hugging Face transformers.
Players are `(module name, channel)` pairs, channel = index along dim 1 of the module's output
(a Linear's features, a conv's channels), in the order the modules are given. A lesioned channel's
output is set to 0 (`lesion="zero"`) or to its mean over `inputs` (`"mean"`). Every coalition gets
its own copy of `inputs` inside one batched forward (forward hooks scale dim 1 per row; the model
is never copied and carries no hook outside a call), and `readout(output [N, ...]) -> [*shape]`
turns one coalition's model output into its value.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
>>> x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
>>> game = ChannelGame(net, {"hidden": net[1]}, x, lambda out: out.mean(0))
>>> game.n_players, game.names[:2]
(4, ['hidden.0', 'hidden.1'])
>>> game(torch.ones(2, 4, dtype=torch.bool)).shape   # 2 coalitions -> values [2, 2]
torch.Size([2, 2])
>>> # res = estimate(game, game.n_players, budget=1000)   # res.values: [4, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from msa_edit.errors import MsaEditError

Readout = Callable[[torch.Tensor], torch.Tensor]
"""Maps the model's output on the game's `N` inputs (`[N, ...]`) to one coalition's value."""

ChannelLesion = Literal["zero", "mean"]


class ChannelGame:
    """The engine's game whose players are the output channels of `modules` of `model`.

    `inputs` `[N, ...]` is what `model` takes; `readout` maps the output `[N, ...]` of one
    coalition to its value `[*shape]`. Coalitions are evaluated `max_rows // N` (at least one)
    per forward. The model must be in `eval()` mode: in training mode BatchNorm and dropout
    would mix or randomise the coalitions' rows.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        inputs: torch.Tensor,
        readout: Readout,
        *,
        lesion: ChannelLesion = "zero",
        max_rows: int = 8192,
    ) -> None:
        if lesion not in ("zero", "mean"):
            raise MsaEditError(f"unknown channel lesion {lesion!r}; choose 'zero' or 'mean'")
        if not modules:
            raise MsaEditError("no modules to lesion; pass at least one {name: module}")
        if max_rows < 1:
            raise MsaEditError(f"max_rows must be >= 1, got {max_rows}")
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise MsaEditError("inputs must be a tensor [N, ...] with at least one row")
        owned = {id(m) for m in model.modules()}
        for name, module in modules.items():
            if id(module) not in owned:
                raise MsaEditError(f"module {name!r} is not a submodule of the model")
        _check_eval(model)
        self.model = model
        self.modules = dict(modules)
        self.readout = readout
        self.lesion = lesion
        self.max_rows = max_rows
        self.device = _device(model)
        self.inputs = inputs.to(self.device)
        self._factors: torch.Tensor | None = None  # [rows, n_players] while a call runs
        self.channels, self.means = self._probe()
        self.players = [(n, c) for n, size in self.channels.items() for c in range(size)]
        starts = torch.tensor([0, *self.channels.values()]).cumsum(0).tolist()
        self._columns = {n: (starts[i], starts[i + 1]) for i, n in enumerate(self.channels)}

    @property
    def n_players(self) -> int:
        return len(self.players)

    @property
    def names(self) -> list[str]:
        """Player names `"{module name}.{channel}"`, in player order."""
        return [f"{name}.{channel}" for name, channel in self.players]

    @torch.inference_mode()
    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        shape = tuple(coalitions.shape)
        if coalitions.dtype != torch.bool or len(shape) != 2 or shape[1] != self.n_players:
            raise MsaEditError(f"coalitions must be a bool tensor [B, {self.n_players}]")
        _check_eval(self.model)
        n = self.inputs.shape[0]
        per_forward = max(1, self.max_rows // n)
        values = []
        with self._hooks():
            for start in range(0, coalitions.shape[0], per_forward):
                block = coalitions[start : start + per_forward]
                self._factors = block.to(self.device).float().repeat_interleave(n, dim=0)
                rows = self.inputs.repeat(block.shape[0], *([1] * (self.inputs.dim() - 1)))
                out = self.model(rows)
                values += [self.readout(o) for o in out.reshape(block.shape[0], n, *out.shape[1:])]
        return torch.stack(values).double().cpu()

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            self._factors = None
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._factors is None:
                return None
            lo, hi = self._columns[name]
            f = self._factors[:, lo:hi]
            if bool((f == 1).all()):
                return None
            if out.shape[0] != f.shape[0]:
                raise MsaEditError(
                    f"module {name!r} output {out.shape[0]} rows but the forward had "
                    f"{f.shape[0]}; lesion modules whose output's dim 0 is the input's rows"
                )
            f = f.to(device=out.device, dtype=out.dtype).reshape(*f.shape, *[1] * (out.dim() - 2))
            mean = self.means.get(name)
            if mean is None:
                return out * f
            return out * f + (1 - f) * mean.to(device=out.device, dtype=out.dtype)

        return hook

    @torch.inference_mode()
    def _probe(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """Channels per module (dim 1 of its output) and, for mean lesions, each channel's mean."""
        seen: dict[str, torch.Tensor] = {}

        def capture(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if not isinstance(out, torch.Tensor) or out.dim() < 2:
                    raise MsaEditError(
                        f"module {name!r} must output one tensor [rows, channels, ...] to have "
                        "its channels lesioned"
                    )
                seen[name] = out.mean(0) if self.lesion == "mean" else out[:0]

            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in self.modules.items()]
        try:
            self.model(self.inputs if self.lesion == "mean" else self.inputs[:1])
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in self.modules if n not in seen]
        if missing:
            raise MsaEditError(f"modules {missing} did not run in the model's forward on inputs")
        channels = {n: int(seen[n].shape[0 if self.lesion == "mean" else 1]) for n in self.modules}
        means = {n: seen[n] for n in self.modules} if self.lesion == "mean" else {}
        return channels, means


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise MsaEditError(
            "the model is in training mode (BatchNorm/dropout would mix coalitions); "
            "call model.eval() first"
        )


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
