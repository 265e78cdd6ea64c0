"""The tiny MoE's settings and the names of its files.

>>> TinyMoeConfig().family, FAMILIES
('mixtral', ('mixtral', 'olmoe'))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from msa_edit.errors import MsaEditError

FORMAT = "msa_edit.tiny_moe"


FORMAT_VERSION = 1


FAMILIES = ("mixtral", "olmoe")
"""Model families `TinyMoeConfig.family` can build (Hugging Face `model_type`s)."""


DEFAULT_FAMILY = "mixtral"


META_FILE = "tiny_moe.json"


HELDOUT_DIR = "heldout"


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


N_BYTES = 256  # byte-level BPE starts from the 256 byte symbols


@dataclass(frozen=True)
class TinyMoeConfig:
    """Model family, size and training knobs of a tiny MoE; validates itself.

    The defaults give a 4-layer, 8-expert (top-2) model of 3.53 M parameters (3.02 M outside
    the tied embedding) that trains on the six UD languages in about five minutes (one thread).

    >>> TinyMoeConfig(layers=2, experts=4).experts
    4
    >>> TinyMoeConfig(top_k=9)
    Traceback (most recent call last):
    msa_edit.errors.MsaEditError: top_k=9 must be between 1 and experts=8
    >>> TinyMoeConfig(family="olmoe").hf_config(4000).model_type
    'olmoe'
    """

    layers: int = 4
    experts: int = 8
    top_k: int = 2
    hidden: int = 128
    intermediate: int = 224
    heads: int = 4
    vocab: int = 4000
    seq_len: int = 64
    batch_size: int = 24
    lr: float = 3e-3
    warmup: float = 0.05
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.05
    heldout_fraction: float = 0.1
    steps: int = 800
    seed: int = 0
    family: str = DEFAULT_FAMILY

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise MsaEditError(
                f"family={self.family!r} is not one of {', '.join(FAMILIES)}; pick one of them"
            )
        positive = ("layers", "experts", "hidden", "intermediate", "heads", "seq_len", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise MsaEditError(f"{name}={getattr(self, name)} must be at least 1")
        if self.steps < 1:
            raise MsaEditError(f"steps={self.steps} must be at least 1; pass --steps 1 or more")
        if not 1 <= self.top_k <= self.experts:
            raise MsaEditError(f"top_k={self.top_k} must be between 1 and experts={self.experts}")
        if self.hidden % self.heads:
            raise MsaEditError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.vocab < N_BYTES + len(SPECIAL_TOKENS):
            raise MsaEditError(
                f"vocab={self.vocab} is too small for a byte-level BPE; use at least "
                f"{N_BYTES + len(SPECIAL_TOKENS)}"
            )
        if not 0 < self.heldout_fraction < 1:
            raise MsaEditError(f"heldout_fraction={self.heldout_fraction} must be in (0, 1)")
        if self.lr <= 0 or not 0 <= self.warmup < 1:
            raise MsaEditError(f"need lr > 0 and 0 <= warmup < 1, got {self.lr}, {self.warmup}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict; `TinyMoeConfig(**d)` reads it back.

        The default family is left out, so Mixtral builds keep the cache keys and metadata they
        had before families existed.

        >>> TinyMoeConfig(**TinyMoeConfig(seed=3).to_dict()) == TinyMoeConfig(seed=3)
        True
        >>> "family" in TinyMoeConfig().to_dict(), TinyMoeConfig(family="olmoe").to_dict()["family"]
        (False, 'olmoe')
        """
        out = dataclasses.asdict(self)
        if self.family == DEFAULT_FAMILY:
            del out["family"]
        return out

    def hf_config(self, vocab_size: int) -> Any:
        """The `transformers` config of this model (its `family`) for a tokenizer of `vocab_size`.

        >>> TinyMoeConfig().hf_config(4000).num_local_experts
        8
        """
        if self.family == "olmoe":
            from transformers import OlmoeConfig

            return OlmoeConfig(
                **self._common(vocab_size), num_experts=self.experts, norm_topk_prob=False
            )
        return self.mixtral_config(vocab_size)

    def mixtral_config(self, vocab_size: int) -> Any:
        """The `transformers.MixtralConfig` of this size for a tokenizer of `vocab_size`
        (whatever `family` says; `hf_config` follows it).

        >>> TinyMoeConfig().mixtral_config(4000).num_local_experts
        8
        """
        from transformers import MixtralConfig

        return MixtralConfig(
            **self._common(vocab_size),
            num_local_experts=self.experts,
            router_jitter_noise=0.0,
        )

    def _common(self, vocab_size: int) -> dict[str, Any]:
        """Config arguments every family shares."""
        return dict(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            num_experts_per_tok=self.top_k,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=True,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            router_aux_loss_coef=self.aux_loss_coef,
            attention_dropout=0.0,
        )
