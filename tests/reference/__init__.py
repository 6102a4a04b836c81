"""Independent re-implementations of the authors' forward passes, written from their code's semantics (their
layouts, ops and quirks), one module per family. The parity tests compare allmlp against them, and
`benchmarks/bench_families.py` times allmlp against them: each module's `AUTHORS` maps an allmlp class name to a
constructor that takes the same config as keyword arguments (the authors' argument names) and builds the authors'
formulation with the same state-dict keys, so `reference.load_state_dict(allmlp_model.state_dict())` works."""
