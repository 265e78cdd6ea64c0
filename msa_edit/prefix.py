"""Prefix reuse: a coalition's forward pass starts at its first lesioned layer.

Every decoder layer below a coalition's first lesioned layer computes exactly what the intact
model computes on the same tokens. `IntactPrefix` runs the intact model once over the target
rows, keeps each decoder layer's output, and while `skip_below(start, rows)` is active the layers
below `start` are not computed: the last of them returns the kept output of those rows, the ones
before it pass their input through. Embeddings, masks and position encodings are still computed
(they are cheap and the layers above need them), and so is everything from `start` up.

Values agree with a full forward up to float rounding (the kept outputs were computed in other
batch shapes: within 1e-6 in fp32, `tests/test_prefix.py`), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from msa_edit.units import decoder_layers

MAX_BYTES = 1 << 30
"""The intact outputs of every layer are kept only when they fit in this many bytes."""


class IntactPrefix:
    """The intact model's decoder-layer outputs on `input_ids [N, T]`, computed on first use."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, max_rows: int) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.input_ids = input_ids
        self.max_rows = max_rows
        self._outputs: list[torch.Tensor] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def fits(self) -> bool:
        """Whether the kept outputs stay within `MAX_BYTES` (hidden size from the config, 4 bytes
        a number: 4-bit weights still compute in fp16 or fp32)."""
        config = getattr(self.model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if not isinstance(hidden, int):
            return False
        per_layer = self.input_ids.numel() * hidden * 4  # at most fp32 activations
        return self.n_layers * per_layer <= MAX_BYTES

    def outputs(self) -> list[torch.Tensor]:
        """Each decoder layer's output `[N, T, H]` on the intact model (one pass, then kept)."""
        if self._outputs is None:
            kept: list[list[torch.Tensor]] = [[] for _ in self.layers]

            def keep(index: int) -> Any:
                def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                    kept[index].append(output.detach())

                return hook

            handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(self.layers)]
            device = next(self.model.parameters()).device
            try:
                for start in range(0, len(self.input_ids), self.max_rows):
                    ids = self.input_ids[start : start + self.max_rows].to(device)
                    self.model(ids, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            self._outputs = [torch.cat(parts) for parts in kept]
        return self._outputs

    @contextmanager
    def skip_below(self, start: int, rows: torch.Tensor) -> Iterator[None]:
        """Layers below `start` are not computed for a batch of target rows `rows` (indices into
        `input_ids`): layer `start - 1` returns their intact output. `start = 0`: no change."""
        if start <= 0:
            yield
            return
        kept = self.outputs()[start - 1][rows.to(self.outputs()[start - 1].device)]

        def through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

        def last(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return kept

        patched = self.layers[:start]
        try:
            for index, layer in enumerate(patched):
                layer.forward = last if index == start - 1 else through
            yield
        finally:
            for layer in patched:
                if "forward" in vars(layer):
                    del layer.forward
