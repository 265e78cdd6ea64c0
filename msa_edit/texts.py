"""Text for analyses and evaluations: token blocks from a local file or a Hub data set, packed
as the tokenizer's model expects.

>>> # blocks = text_blocks(tokenizer, "fr.txt", n_seq=8, seq_len=64)   # [8, 64] token ids
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from msa_edit.errors import MsaEditError

if TYPE_CHECKING:
    import torch

Packing = Literal["auto", "documents", "text"]
PACKINGS: tuple[Packing, ...] = ("auto", "documents", "text")


def resolve_packing(tokenizer: Any, packing: Packing = "auto") -> Packing:
    """`packing`, with "auto" made concrete: "text" for a chat-tuned tokenizer (one with a chat
    template: its EOS ends a chat turn, e.g. `<|im_end|>`, not a document), else "documents".

    >>> class Plain: chat_template = None
    >>> resolve_packing(Plain()), resolve_packing(Plain(), "text")
    ('documents', 'text')
    """
    if packing not in PACKINGS:
        raise MsaEditError(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
    if packing != "auto":
        return packing
    return "text" if getattr(tokenizer, "chat_template", None) else "documents"


def text_blocks(
    tokenizer: Any,
    source: str | Path,
    n_seq: int,
    seq_len: int,
    *,
    split: str = "train",
    packing: Packing = "auto",
    skip: int = 0,
) -> torch.Tensor:
    """`n_seq` blocks of `seq_len` tokens `[n_seq, seq_len]` from a text data set.

    `source` is a local .txt (one document per line), .json/.jsonl or .parquet file with a "text"
    column, or a Hub data set id (where the Hub is reachable). `packing` "documents" tokenises
    each document with the tokenizer's own special tokens (e.g. a BOS) and follows it by EOS — the
    packing base LMs are trained on; "text" runs the documents together, one per line, with no
    special tokens — for chat-tuned models, whose EOS ends a turn; "auto" picks by the tokenizer
    (`resolve_packing`). The first `skip` documents are left out (e.g. to evaluate on the part of
    a file an analysis did not read). The stream is cut into consecutive blocks.
    """
    texts = _load_texts(source, split)
    packing = resolve_packing(tokenizer, packing)
    eos = tokenizer.eos_token_id if packing == "documents" else None
    ids: list[int] = []
    need = n_seq * seq_len
    documents = (text for text in texts if text.strip())
    for text in itertools.islice(documents, skip, None):
        if packing == "text":
            ids += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        else:
            ids += tokenizer(text)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise MsaEditError(
            f"{source} gives {len(ids)} tokens"
            + (f" after its first {skip} documents" if skip else "")
            + f" but {n_seq} blocks of {seq_len} need {need}; "
            "use fewer or shorter blocks, or more text"
        )
    import torch

    return torch.tensor(ids[:need]).reshape(n_seq, seq_len)


def _load_texts(source: str | Path, split: str) -> list[str]:
    import datasets  # heavy import, only when data is loaded

    path = Path(source)
    builders = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if path.suffix in builders:
        if not path.is_file():
            raise MsaEditError(f"data file {path} does not exist; check the path")
        data = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    else:
        try:
            data = datasets.load_dataset(str(source), split=split)
        except Exception as exc:
            raise MsaEditError(
                f"could not load data set {str(source)!r} ({exc.__class__.__name__}); give a local "
                ".txt/.json/.parquet file or a reachable Hub id"
            ) from exc
    if "text" not in data.column_names:
        raise MsaEditError(f"{source} has no 'text' column (columns: {data.column_names})")
    return list(data["text"])
