"""Evaluation and reporting: plots of Shapley modes (more to come: perplexity, lm-eval, report)."""
