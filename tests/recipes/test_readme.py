"""The README's Python blocks run as written, in order, in one namespace (as a reader would paste
them), given `model`, `tok` and `path`: a tiny Mixtral, its tokenizer and its folder."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = "not run by the tests"


def python_blocks(text: str) -> list[str]:
    """Every fenced ```python block (list-indented ones dedented)."""
    found = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.M | re.S)
    return [textwrap.dedent(body) for _, body in found]


@pytest.mark.filterwarnings("ignore")
def test_readme_python_blocks_run(tiny_mixtral: Path, tmp_path: Path, monkeypatch) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    runnable = [b for b in blocks if SKIP not in b]
    assert len(blocks) >= 6 and len(runnable) >= 4
    monkeypatch.chdir(tmp_path)  # the blocks write run/...
    namespace = {
        "model": AutoModelForCausalLM.from_pretrained(tiny_mixtral),
        "tok": AutoTokenizer.from_pretrained(tiny_mixtral),
        "path": str(tiny_mixtral),
    }
    for block in runnable:
        exec(compile(block, str(README), "exec"), namespace)
    res = namespace["res"]
    assert res.values.shape == (8, 3) and res.n_evaluations <= 64
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert namespace["result"].n_evaluations <= 60 and len(namespace["result"].units) == 2


def test_the_readme_demo_figures_are_the_committed_runs() -> None:
    """Every figure of the README's demo section comes from `evals/results/demo`'s files (the
    run `evals/demo_readme.py` made and wrote the section from)."""
    import demo_readme

    assert demo_readme.readme_body(README.read_text(encoding="utf-8")) == demo_readme.body()
