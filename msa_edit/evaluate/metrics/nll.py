"""Mean next-token NLL and perplexity of a causal LM, as an `evaluate` metric module.

Self-contained (only `evaluate`, `datasets` and the standard library), so it loads offline from its
path: `evaluate.load(str(path_to_this_file))`. Each input row is one scored sequence: the sum of
its per-token NLLs (nats) and the number of tokens scored. The result is token-weighted:
`nll = Σ nll_sum / Σ n_tokens` and `perplexity = exp(nll)`.
"""

from __future__ import annotations

import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted mean next-token negative log-likelihood (nats) and perplexity."

_KWARGS_DESCRIPTION = """
Args:
    nll_sum: per sequence, the sum of its next-token NLLs in nats (float).
    n_tokens: per sequence, how many tokens were scored (int > 0).
Returns:
    nll: Σ nll_sum / Σ n_tokens.
    perplexity: exp(nll).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load(__file__, keep_in_memory=True)  # doctest: +SKIP
    >>> metric.compute(nll_sum=[2.0, 4.0], n_tokens=[2, 4])  # doctest: +SKIP
    {'nll': 1.0, 'perplexity': 2.718281828459045}
"""


def mean_nll(nll_sum: list[float], n_tokens: list[int]) -> dict[str, float]:
    """Token-weighted mean NLL and its perplexity.

    >>> mean_nll([2.0, 4.0], [2, 4])
    {'nll': 1.0, 'perplexity': 2.718281828459045}
    """
    if len(nll_sum) != len(n_tokens):
        raise ValueError(f"{len(nll_sum)} nll_sum values but {len(n_tokens)} n_tokens values")
    total = sum(int(n) for n in n_tokens)
    if total <= 0 or any(int(n) < 0 for n in n_tokens):
        raise ValueError(f"n_tokens must be non-negative with a positive total, got {n_tokens}")
    nll = math.fsum(float(s) for s in nll_sum) / total
    perplexity = math.exp(nll) if nll < math.log(1.7e308) else math.inf
    return {"nll": nll, "perplexity": perplexity}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NLL(evaluate.Metric):
    """`evaluate` metric: token-weighted mean NLL and perplexity from per-sequence NLL sums."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll_sum": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sum: list[float], n_tokens: list[int]) -> dict[str, float]:
        return mean_nll(nll_sum, n_tokens)
