"""Optimizers, the learning-rate schedule and the weight EMA.

The schedule is a pure function of the step (linear warmup, then linear or cosine decay to an end value), so
the scheduler's whole state is the step number stored in the checkpoint. Each parameter group carries an
`lr_scale` (layer-wise decay) that multiplies the scheduled learning rate.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig

# timm's MATCH_PREV_GROUP: a group_matcher pattern whose ordinal ends in it joins the layer before it
# (the final norm shares the last block's layer).
_JOIN_PREVIOUS = 99999


def layer_ids(names: list[str], matcher: Mapping) -> dict[str, int]:
    """The layer id of every parameter name under a timm-format `group_matcher` dict, as timm numbers them.

    Each entry is a regex or a list of (regex, suffix); a name gets the ordinal (entry index, the regex's
    numeric groups, suffix) of the first pattern that matches, unmatched names (the head) come last, and the
    distinct ordinals in order are numbered 0, 1, ... (stem 0, blocks 1..N, head N + 1 for Mixer).
    """
    patterns = []
    for index, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for regex, suffix in [(spec, None)] if isinstance(spec, str) else spec:
            patterns.append((re.compile(regex), index, tuple(suffix or ())))

    def ordinal(name: str) -> tuple[float, ...]:
        for regex, index, suffix in patterns:
            match = regex.match(name)
            if match:
                return (index, *map(float, match.groups()), *suffix)
        return (math.inf,)

    ordinals = {name: ordinal(name) for name in names}
    numbers, layer = {}, -1
    for key in sorted(set(ordinals.values())):
        if layer < 0 or key[-1] != _JOIN_PREVIOUS:
            layer += 1
        numbers[key] = layer
    return {name: numbers[key] for name, key in ordinals.items()}


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Decay >= 2-D weights only: biases, LayerNorm scales, other 1-D params and the names in the model's
    `no_weight_decay()` are never decayed.

    layer_decay: the learning rate of layer i (from `model.group_matcher(coarse=False)`) is scaled by
    layer_decay ** (last layer - i), so the head trains at the full rate and the stem slowest. Groups come in
    layer order, a decayed and a non-decayed group per layer, each with its `lr_scale`; without layer_decay
    there are the two groups alone, at scale 1.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay: expected a number in (0, 1] or None, got {layer_decay}")
    named = dict(model.named_parameters())
    if layer_decay is None:
        layers, scales = dict.fromkeys(named, 0), [1.0]
    else:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"layer_decay needs a model with group_matcher(); {type(model).__name__} has none")
        # every parameter (frozen ones too) counts, so freezing some does not renumber the rest
        layers = layer_ids(list(named), model.group_matcher(coarse=False))
        last = max(layers.values())
        scales = [layer_decay ** (last - layer) for layer in range(last + 1)]
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = [
        {"params": [], "weight_decay": decay, "lr_scale": scale} for scale in scales for decay in (weight_decay, 0.0)
    ]
    for name, param in named.items():
        if param.requires_grad:
            decayed = param.ndim > 1 and name not in no_decay
            groups[2 * layers[name] + (0 if decayed else 1)]["params"].append(param)
    return groups


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020, arXiv 1904.00962) as NVIDIA's and timm's implementations compute it (ResMLP's
    optimizer): Adam moments with bias correction, the update m / (sqrt(v) + eps) plus weight_decay * w, scaled per
    parameter by the trust ratio ||w|| / ||update|| (1 where either is 0). Parameters without weight decay (biases,
    norms, layer scales) take the plain Adam step, as in those implementations. Global gradient clipping is the
    training loop's (`optim.clip_grad_norm`), not the optimizer's."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: lr and eps > 0, weight_decay >= 0, betas in [0, 1); got {lr}, {eps}, "
                             f"{weight_decay}, {tuple(betas)}")  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            correction1, correction2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (exp_avg / correction1).div_((exp_avg_sq.sqrt() / correction2**0.5).add_(group["eps"]))
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
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
        """Set every group's lr to lr(step) x its lr_scale; returns lr(step)."""
        lr = self(step)
        for group in optimizer.param_groups:
            # groups restored from checkpoints written before lr_scale existed have no scale: 1
            group["lr"] = lr * group.get("lr_scale", 1.0)
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
