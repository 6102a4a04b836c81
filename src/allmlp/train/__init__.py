"""Training: recipe configs, the loop with checkpoints and exact resumption, optimizers and schedules, DDP."""

from .config import ConfigError, RunConfig, check_run_config, load_config
from .engine import NonFiniteLossError, build_model, evaluate, fit

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "RunConfig",
    "build_model",
    "check_run_config",
    "evaluate",
    "fit",
    "load_config",
]
