"""The tiny MoE's text: `LANG=FILE` arguments, held-out splits, its byte-level BPE tokenizer and
the token windows it trains on.

>>> windows(token_stream(train_tokenizer(["ab ab"], vocab=270), ["ab", "ab"]), 2).shape[1]
2
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from msa_edit.errors import MsaEditError
from msa_edit.tiny_moe.config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS


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
