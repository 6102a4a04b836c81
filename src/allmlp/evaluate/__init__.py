"""Evaluation: metrics and the linear few-shot probe."""
