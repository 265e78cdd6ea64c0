"""Run by test_resume.py in a subprocess: an estimate with a checkpoint that logs every game row.

usage: python resume_worker.py CHECKPOINT LOG OUT DELAY_S
"""

from __future__ import annotations

import sys
import time

import torch

from msa_edit.shapley import estimate
from msa_edit.shapley.toys import mlp_game

N = 12
ARGS = {"method": "adjusted", "budget": 600, "seed": 5, "batch_size": 8,
        "groups": [i // 4 for i in range(N)]}  # fmt: skip


def main() -> None:
    checkpoint, log, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    base = mlp_game(n_hidden=N)

    def game(c: torch.Tensor) -> torch.Tensor:
        with open(log, "a") as fh:
            fh.writelines("".join("1" if b else "0" for b in row.tolist()) + "\n" for row in c)
        time.sleep(delay)
        return base(c)

    res = estimate(game, N, **ARGS, checkpoint=checkpoint, checkpoint_every=0.0, progress=False)
    torch.save({"values": res.values, "stderr": res.stderr, "n": res.n_evaluations}, out)


if __name__ == "__main__":
    main()
