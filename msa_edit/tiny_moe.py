"""A tiny mixture-of-experts language model trained on a few languages, reproducibly.

    msa-edit tiny-moe --text en=en.txt --text de=de.txt --out tiny-moe [--steps N] [--seed N]
                      [--family mixtral|olmoe]

`build_tiny_moe` trains a byte-level BPE tokenizer and a small `MixtralForCausalLM` (4 layers,
8 experts, top-2 by default; about 3.5 M parameters) on text files, one sentence a line, and
writes a Hugging Face model directory that loads with plain `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained` (no custom code). `TinyMoeConfig(family="olmoe")` trains an
`OlmoeForCausalLM` of the same size on the same text with the same loop instead (a second MoE
family: query/key norms, top-k weights not renormalised, as in OLMoE-1B-7B). The same files,
steps, seed and config give the same bits (on the same torch build and CPU kind), whatever the
order of the languages and the caller's thread count: training runs by steps, on one thread,
with deterministic algorithms; batches come from a `torch.Generator` seeded by `seed`; the global
RNG is left untouched.

The last `heldout_fraction` of each file's lines is held out (saved as `DIR/heldout/{lang}.txt`)
and never trained on; `DIR/tiny_moe.json` records languages, files and their sha256, config,
train losses, held-out NLL per language and the routing of held-out tokens to experts.
Without `out`, the model is built once under the cache (`$MSA_EDIT_CACHE`, default
`~/.cache/msa_edit`) and reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from msa_edit.atomic import replace_dir
from msa_edit.cachedir import cache_dir
from msa_edit.errors import MsaEditError
from msa_edit.games import token_nll
from msa_edit.progress import Progress, format_duration, note

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


# ---------------------------------------------------------------------------------------------
# Inputs


def parse_text_arg(spec: str) -> tuple[str, Path]:
    """Split a `LANG=FILE` argument into the language and the path.

    >>> lang, path = parse_text_arg("en=data/en.txt")
    >>> lang, path.as_posix()
    ('en', 'data/en.txt')
    >>> parse_text_arg("data/en.txt")
    Traceback (most recent call last):
    msa_edit.errors.MsaEditError: --text 'data/en.txt' is not LANG=FILE; write e.g. --text en=en.txt
    """
    lang, sep, file = spec.partition("=")
    lang = lang.strip()
    if not sep or not lang or not file:
        raise MsaEditError(f"--text {spec!r} is not LANG=FILE; write e.g. --text en=en.txt")
    if not all(c.isalnum() or c in "-_" for c in lang):
        raise MsaEditError(
            f"--text {spec!r}: language {lang!r} may hold only letters, digits, '-' and '_'"
        )
    return lang, Path(file)


def parse_text_args(specs: Sequence[str]) -> dict[str, Path]:
    """`LANG=FILE` arguments as a dict; a language given twice is an error.

    >>> {lang: str(path) for lang, path in parse_text_args(["en=a.txt", "de=b.txt"]).items()}
    {'en': 'a.txt', 'de': 'b.txt'}
    """
    texts: dict[str, Path] = {}
    for spec in specs:
        lang, path = parse_text_arg(spec)
        if lang in texts:
            raise MsaEditError(
                f"language {lang!r} is given twice ({texts[lang]} and {path}); "
                "give each language one file"
            )
        texts[lang] = path
    return texts


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; errors name the file and the fix."""
    if not path.is_file():
        raise MsaEditError(f"text file {path} does not exist; check the path in --text LANG=FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MsaEditError(f"text file {path} is not UTF-8 ({exc.reason}); re-encode it") from exc
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise MsaEditError(
            f"text file {path} has {len(lines)} non-blank lines; give at least 2 "
            "(one sentence a line: most for training, the last part held out)"
        )
    return lines


def split_heldout(lines: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split lines into (train, held-out): the last `fraction` of lines (at least one) is held out.

    >>> split_heldout(["a", "b", "c", "d"], 0.1)
    (['a', 'b', 'c'], ['d'])
    """
    n_held = min(len(lines) - 1, max(1, round(len(lines) * fraction)))
    return list(lines[: len(lines) - n_held]), list(lines[len(lines) - n_held :])


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizer and token streams


def train_tokenizer(lines: Sequence[str], vocab: int) -> Any:
    """Train a byte-level BPE (`tokenizers`) on `lines`, wrapped as a `PreTrainedTokenizerFast`.

    Deterministic for the same lines. It adds `<s>` before each text it encodes; `</s>` ends a
    sentence and `<pad>` pads (ids 0, 1, 2).

    >>> tok = train_tokenizer(["hello world", "hallo welt"], vocab=280)
    >>> tok("hello")["input_ids"][0] == tok.bos_token_id == 1
    True
    >>> tok.decode(tok("hallo welt")["input_ids"], skip_special_tokens=True)
    'hallo welt'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
    )  # fmt: skip


def token_stream(tokenizer: Any, lines: Sequence[str]) -> torch.Tensor:
    """All lines as one LongTensor: each line is `<s> tokens </s>` (as the model was trained).

    >>> token_stream(train_tokenizer(["ab ab"], vocab=270), ["ab", "ab"]).tolist()
    [1, 259, 2, 1, 259, 2]
    """
    ids: list[int] = []
    for row in tokenizer(list(lines), add_special_tokens=True)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows `[n, seq_len]` of a token stream (the ragged tail is dropped;
    a stream shorter than `seq_len` is one short window).

    >>> windows(torch.arange(7), 3).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    n = len(stream) // seq_len
    if n == 0:
        return stream[None, :]
    return stream[: n * seq_len].reshape(n, seq_len)


# ---------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def mean_nll(model: Any, batch: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token negative log-likelihood (nats) of `model` over the rows of `batch`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for rows in batch.split(batch_size):
            logits = model(input_ids=rows).logits
            total += float(token_nll(logits, rows).double().sum())
            count += rows[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def routing_by_language(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    seq_len: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Fraction of each language's tokens that each layer routes to each expert (top-k choice).

    `texts` maps a language to its lines. Returns `[n_layers, n_experts, n_langs]` (languages
    in the order of `texts`); each column sums to top-k, so uniform routing is top_k / n_experts.
    Windows are `seq_len` tokens (default: the model's `max_position_embeddings`).

    >>> from transformers import MixtralForCausalLM
    >>> tok = train_tokenizer(["a b c", "x y z"], vocab=270)
    >>> small = TinyMoeConfig(layers=1, experts=4, hidden=16, intermediate=16, heads=2, seq_len=8)
    >>> model = MixtralForCausalLM(small.mixtral_config(len(tok)))
    >>> routing = routing_by_language(model, tok, {"abc": ["a b c"], "xyz": ["x y z"]})
    >>> routing.shape, bool(torch.allclose(routing.sum(dim=1), torch.tensor(2.0)))
    (torch.Size([1, 4, 2]), True)
    """
    config = model.config
    seq_len = seq_len or config.max_position_embeddings
    k, n_experts = config.num_experts_per_tok, config.num_local_experts
    was_training = model.training
    model.eval()
    out = torch.zeros(config.num_hidden_layers, n_experts, len(texts))
    try:
        for j, lines in enumerate(texts.values()):
            batch = windows(token_stream(tokenizer, lines), seq_len)
            for rows in batch.split(batch_size):
                router_logits = model(input_ids=rows, output_router_logits=True).router_logits
                for layer, logits in enumerate(router_logits):
                    chosen = logits.topk(k, dim=-1).indices.reshape(-1)
                    out[layer, :, j] += torch.bincount(chosen, minlength=n_experts).float()
            out[:, :, j] /= batch.numel()
    finally:
        model.train(was_training)
    return out


def routing_summary(routing: torch.Tensor, languages: Sequence[str], top_k: int) -> str:
    """Per layer and language: the expert taking most of its tokens, and (with several
    languages) its most selective expert, whose share most exceeds the other languages' mean.

    >>> r = torch.tensor([[[0.9, 0.6], [0.1, 0.4]]])  # 1 layer, 2 experts, 2 languages
    >>> print(routing_summary(r, ["en", "de"], top_k=1))
    share of each language's tokens (uniform 0.50); selective: share vs other languages' mean
    layer 0 top:       en e0 0.90       de e0 0.60
            selective: en e0 0.90/0.60  de e1 0.40/0.10
    """
    n_experts, n_langs = routing.shape[1], routing.shape[2]
    lines = [
        f"share of each language's tokens (uniform {top_k / n_experts:.2f}); "
        "selective: share vs other languages' mean"
    ]
    for layer, shares in enumerate(routing):
        top = shares.argmax(dim=0)
        cells = [f"{lang} e{int(e)} {float(shares[e, j]):.2f}" for j, (lang, e) in
                 enumerate(zip(languages, top, strict=True))]  # fmt: skip
        lines.append(f"layer {layer} top:       " + "  ".join(f"{c:<15}" for c in cells).rstrip())
        if n_langs < 2:
            continue
        others = (shares.sum(dim=1, keepdim=True) - shares) / (n_langs - 1)
        chosen = (shares - others).argmax(dim=0)
        cells = [
            f"{lang} e{int(e)} {float(shares[e, j]):.2f}/{float(others[e, j]):.2f}"
            for j, (lang, e) in enumerate(zip(languages, chosen, strict=True))
        ]
        lines.append(" " * len(f"layer {layer} ") + "selective: " + "  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Seed a forked global RNG, require deterministic algorithms and use one CPU thread (CPU
    kernels split work by thread count, which changes the bits); restore all three after."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _sample_batch(
    streams: Sequence[torch.Tensor], step: int, config: TinyMoeConfig, gen: torch.Generator
) -> torch.Tensor:
    """Rows of `seq_len` tokens at random offsets, languages taken in turn (balanced)."""
    n, size = len(streams), config.batch_size
    draws = torch.randint(0, 2**62, (size,), generator=gen)
    rows = []
    for i in range(size):
        stream = streams[(step * size + i) % n]
        start = int(draws[i]) % (len(stream) - config.seq_len + 1)
        rows.append(stream[start : start + config.seq_len])
    return torch.stack(rows)


def _lr_factor(step: int, config: TinyMoeConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, round(config.warmup * config.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _train(model: Any, streams: Sequence[torch.Tensor], config: TinyMoeConfig) -> list[float]:
    """Train in place for `config.steps` steps; returns the language-model loss of every step."""
    gen = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    model.train()
    losses: list[float] = []
    with Progress(config.steps, "tiny-moe training", "step") as bar:
        for step in range(config.steps):
            batch = _sample_batch(streams, step, config, gen)
            out = model(input_ids=batch, output_router_logits=True)
            lm_loss = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            loss = lm_loss + config.aux_loss_coef * out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(lm_loss.detach()))
            bar.set_postfix(loss=losses[-1])
            bar.update()
    model.eval()
    return losses


@contextlib.contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """Silence transformers' own progress bars (e.g. "Writing model shards") for a block."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    if enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _new_model(config: TinyMoeConfig, vocab_size: int) -> Any:
    """A freshly initialised causal LM of the config's family (call under `_reproducible`)."""
    from transformers import MixtralForCausalLM, OlmoeForCausalLM

    hf_config = config.hf_config(vocab_size)
    hf_config._experts_implementation = "eager"  # the reference loop, not a fused kernel
    model_class = OlmoeForCausalLM if config.family == "olmoe" else MixtralForCausalLM
    return model_class(hf_config)


# ---------------------------------------------------------------------------------------------
# Building a model directory


def _resolve(
    texts: Mapping[str, Path | str], steps: int | None, seed: int | None, config: TinyMoeConfig
) -> tuple[TinyMoeConfig, dict[str, Path], dict[str, str]]:
    """Check inputs; languages sorted (so argument order does not change the model)."""
    if not texts:
        raise MsaEditError("no text given; pass at least one --text LANG=FILE")
    if steps is not None or seed is not None:
        config = dataclasses.replace(
            config,
            steps=config.steps if steps is None else steps,
            seed=config.seed if seed is None else seed,
        )
    paths = {lang: Path(texts[lang]) for lang in sorted(texts)}
    for path in paths.values():
        if not path.is_file():
            raise MsaEditError(f"text file {path} does not exist; check --text LANG=FILE")
    return config, paths, {lang: file_sha256(p) for lang, p in paths.items()}


def build_key(shas: Mapping[str, str], config: TinyMoeConfig) -> str:
    """Hash of everything the model's bits depend on: texts, config (steps, seed), format.

    >>> len(build_key({"en": "00"}, TinyMoeConfig()))
    64
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "texts": sorted(shas.items()),
        "config": config.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "numpy")


def build_environment() -> dict[str, str]:
    """What shapes a build's bits besides its inputs: library versions and the CPU kind.

    >>> sorted(build_environment())
    ['cpu', 'numpy', 'python', 'tokenizers', 'torch', 'transformers']
    """
    from importlib.metadata import version

    env = {name: version(name) for name in ENVIRONMENT_PACKAGES}
    env["python"] = platform.python_version()
    env["cpu"] = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return env


def environment_changes(recorded: Mapping[str, str]) -> str:
    """What differs between a build's recorded environment and this one ('' if nothing or
    nothing recorded).

    >>> environment_changes({}), environment_changes({"torch": "0.0"}).startswith("torch 0.0 (")
    ('', True)
    """
    here = build_environment()
    differ = [f"{k} {v} (here {here.get(k)})" for k, v in recorded.items() if here.get(k) != v]
    return ", ".join(differ)


def read_meta(path: Path | str) -> dict[str, Any] | None:
    """The `tiny_moe.json` of a tiny-moe directory, or None if `path` is not one."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _check_out(out: Path) -> None:
    """Refuse to replace anything but nothing, an empty directory or a tiny-moe output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MsaEditError(f"--out {out} is a file; give a directory path")
    if any(out.iterdir()) and read_meta(out) is None:
        raise MsaEditError(
            f"--out {out} is a non-empty directory that is not a tiny-moe output; "
            "refusing to overwrite it, choose another --out or empty it"
        )


def build_tiny_moe(
    texts: Mapping[str, Path | str],
    out: Path | str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    config: TinyMoeConfig | None = None,
) -> Path:
    """Train a tiny MoE on `texts` (language -> file, one sentence a line); return its dir.

    `steps` and `seed` override `config`'s. With `out`, the model is written there (an `out`
    that already holds this exact build is returned as is; another tiny-moe build there is
    replaced; anything else is refused). Without `out`, it lives in the cache, keyed by the
    files' contents, config and format version, and is trained only once. Training shows its
    progress (`msa_edit.progress`: a bar on a terminal, timestamped lines otherwise) and ends
    with one line on stderr naming the folder, the train loss and the held-out NLL.

    >>> import pathlib, shutil, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("the cat sat\\nthe dog ran\\na cat ran\\n" * 20)
    >>> small = TinyMoeConfig(layers=1, experts=2, top_k=1, hidden=16, intermediate=16,
    ...                       heads=2, vocab=300, seq_len=8, batch_size=2)
    >>> path = build_tiny_moe({"xx": d / "a.txt"}, d / "model", steps=3, config=small)
    >>> sorted(p.name for p in path.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['config.json', 'generation_config.json', 'heldout', 'model.safetensors',
     'tiny_moe.json', 'tokenizer.json', 'tokenizer_config.json']
    >>> shutil.rmtree(d)
    """
    start = time.monotonic()
    config, paths, shas = _resolve(texts, steps, seed, config or TinyMoeConfig())
    key = build_key(shas, config)
    where = "saved to" if out is not None else "cached in"
    out = Path(out) if out is not None else cache_dir() / "tiny-moe" / key[:24]
    _check_out(out)
    meta = read_meta(out)
    if meta is not None and meta.get("key") == key:
        note(f"tiny-moe: reusing the model {where} {out}; {_summary(meta)}")
        differ = environment_changes(meta.get("environment") or {})
        if differ:
            note(
                f"tiny-moe: WARNING: this build was made with {differ}; a build here would "
                "not be bit-identical to it (delete the folder to rebuild)"
            )
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        meta = _build_into(tmp, paths, shas, config, key)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    took = format_duration(time.monotonic() - start)
    note(f"tiny-moe: trained in {took}, {where} {out}; {_summary(meta)}")
    return out


def _summary(meta: Mapping[str, Any]) -> str:
    """How well a build trained, from its `tiny_moe.json`: steps, train loss, held-out NLL.

    >>> _summary({"steps": 3, "first_train_loss": 6.0, "final_train_loss": 5.1234,
    ...           "heldout_nll": {"de": 5.5, "en": 5.25}})
    'steps 3, train loss 6.000 -> 5.123, held-out NLL de 5.500 en 5.250'
    """
    parts = [f"steps {meta.get('steps')}"]
    first, final = meta.get("first_train_loss"), meta.get("final_train_loss")
    if isinstance(first, float) and isinstance(final, float):
        parts.append(f"train loss {first:.3f} -> {final:.3f}")
    nll = meta.get("heldout_nll")
    if isinstance(nll, dict) and nll:
        parts.append("held-out NLL " + " ".join(f"{k} {v:.3f}" for k, v in nll.items()))
    return ", ".join(parts)


def _build_into(
    tmp: Path, paths: Mapping[str, Path], shas: Mapping[str, str], config: TinyMoeConfig, key: str
) -> dict[str, Any]:
    """Read, tokenize, train, evaluate and save everything into the directory `tmp`; returns
    the `tiny_moe.json` written."""
    splits = {
        lang: split_heldout(read_lines(p), config.heldout_fraction) for lang, p in paths.items()
    }
    tokenizer = train_tokenizer([s for train, _ in splits.values() for s in train], config.vocab)
    streams = {lang: token_stream(tokenizer, train) for lang, (train, _) in splits.items()}
    for lang, stream in streams.items():
        if len(stream) < config.seq_len:
            raise MsaEditError(
                f"{paths[lang]} gives {len(stream)} training tokens, fewer than seq_len="
                f"{config.seq_len}; give more text"
            )
    with _reproducible(config.seed):
        model = _new_model(config, len(tokenizer))
        losses = _train(model, list(streams.values()), config)
        heldout = {lang: held for lang, (_, held) in splits.items()}
        nll = {
            lang: mean_nll(model, windows(token_stream(tokenizer, held), config.seq_len))
            for lang, held in heldout.items()
        }
        routing = routing_by_language(model, tokenizer, heldout, config.seq_len)
    with _no_transformers_bars():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / HELDOUT_DIR).mkdir()
    for lang, held in heldout.items():
        (tmp / HELDOUT_DIR / f"{lang}.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
    tail = losses[-max(1, len(losses) // 20) :]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "environment": build_environment(),
        "languages": list(paths),
        "files": {
            lang: {
                "path": str(paths[lang]),
                "sha256": shas[lang],
                "train_lines": len(splits[lang][0]),
                "heldout_lines": len(splits[lang][1]),
                "train_tokens": len(streams[lang]),
            }
            for lang in paths
        },
        "steps": config.steps,
        "seed": config.seed,
        "config": config.to_dict(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "first_train_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        "train_loss_curve": _curve(losses),
        "heldout_nll": nll,
        "routing_heldout": routing.tolist(),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _curve(losses: Sequence[float], points: int = 20) -> list[list[float]]:
    """[last step, mean loss] over `points` equal chunks of the run."""
    size = max(1, math.ceil(len(losses) / points))
    chunks = range(0, len(losses), size)
    return [[min(i + size, len(losses)), sum(losses[i : i + size]) / len(losses[i : i + size])]
            for i in chunks]  # fmt: skip


def load_tiny_moe(path: Path | str) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, tiny_moe.json) of a tiny-moe directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(path)
    if meta is None:
        raise MsaEditError(f"{path} is not a tiny-moe directory (no {META_FILE}); build one first")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path), meta


def heldout_texts(path: Path | str) -> dict[str, list[str]]:
    """The held-out lines per language of a tiny-moe directory (never trained on)."""
    meta = read_meta(path)
    if meta is None:
        raise MsaEditError(f"{path} is not a tiny-moe directory (no {META_FILE}); build one first")
    folder = Path(path) / HELDOUT_DIR
    return {
        lang: (folder / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        for lang in meta["languages"]
    }
