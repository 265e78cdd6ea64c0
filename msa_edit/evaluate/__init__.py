"""Evaluation and reporting: per-language NLL and bits per byte (language), lm-eval tasks
(harness), report.md (report) and its plots (plots)."""
