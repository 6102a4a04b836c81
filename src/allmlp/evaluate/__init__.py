"""Evaluation: metrics, the linear few-shot probe, representation similarity (CKA) and the invariance experiment."""
