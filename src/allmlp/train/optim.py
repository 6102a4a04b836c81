"""Optimizers, the learning-rate schedule and the weight EMA.

The schedule is a pure function of the step (linear warmup, then linear or cosine decay to an end value), so
the scheduler's whole state is the step number stored in the checkpoint.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay >= 2-D weights only: biases, LayerNorm scales and other 1-D params are never decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    # PyTorch's AdamW decays by lr_t * weight_decay per step, so big_vision's decoupled wd 1e-4 at lr 1e-3 is 0.1
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class Schedule:
    """lr(step): linear warmup from `warmup_start_lr` to `peak`, then decay to `end_lr` at `total_steps`."""

    def __init__(self, cfg: ScheduleConfig, peak: float, total_steps: int, steps_per_epoch: int):
        self.peak, self.total_steps = peak, total_steps
        self.warmup = min(total_steps, cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch))
        self.start, self.end, self.decay = cfg.warmup_start_lr, cfg.end_lr, cfg.decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        if self.decay == "constant" or self.total_steps <= self.warmup:
            return self.peak
        progress = min(1.0, (step - self.warmup) / (self.total_steps - self.warmup))
        shape = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.end + (self.peak - self.end) * shape

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


class EMA:
    """Exponential moving average of a model's weights and buffers: ema = decay * ema + (1 - decay) * model.

    The average is a full copy of the model, so it is evaluated and saved like one.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [
            (mine, theirs)
            for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)
            if mine.is_floating_point()
        ]
        torch._foreach_lerp_([m for m, _ in pairs], [t for _, t in pairs], 1.0 - self.decay)
