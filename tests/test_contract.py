"""Issue 11, the module contract: every family works with the PyTorch ecosystem's tools as timm's models do.

One tiny configuration per family (FAMILIES; a new architecture must join, see the first test) runs through:
hooks, PEFT and hand-made LoRA, pruning and parametrisations, dynamic quantisation, partial freezing, Opacus,
FLOP counters and summaries, FX / feature extraction / torch.func / meta-device construction / torch.export /
TorchScript, timm's model interface (forward_intermediates, features_only, pooling, param groups, pretrained_cfg),
and, for Mixer, equality with timm's MlpMixer under the same tools. In the spirit of timm's tests/test_models.py.
Weights are random everywhere (biases and heads too), so no check passes because something is zero.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
from torch import nn
from torch.fx.experimental import _config as fx_config
from torch.nn.utils import parametrize, prune

import allmlp
from allmlp.models.registry import ARCHITECTURES

from helpers import (
    randomise,
    tiny_activemlp,
    tiny_asmlp,
    tiny_convmlp,
    tiny_cyclemlp,
    tiny_gmixer,
    tiny_gmlp,
    tiny_hiremlp,
    tiny_mixer,
    tiny_msmlp,
    tiny_repmlpnet,
    tiny_resmlp,
    tiny_smlpnet,
    tiny_spach,
    tiny_spach_ms,
    tiny_swinmlp,
    tiny_vip,
    tiny_wavemlp,
)

BATCH = 2
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
HOOKED = (nn.Linear, nn.Conv1d, nn.Conv2d, *NORMS)
PRETRAINED_CFG_KEYS = {
    "input_size",
    "mean",
    "std",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "num_classes",
    "first_conv",
    "classifier",
    "fixed_input_size",
}


# ----------------------------------------------------------------------------------------------------------------
# The families


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module]  # the tiny constructor; keyword arguments override its config
    size: tuple[int, int]  # the input height and width
    architecture: str  # its key in allmlp.models.registry.ARCHITECTURES
    deep_linear: str  # the last block's channel-MLP fc2: the one layer left trainable in the freezing test
    registered: str  # a registered name, built small through `registered_overrides` for create_model tests
    registered_overrides: dict = field(default_factory=dict)
    classifier: bool = True  # False: a dense backbone (fork_feat) without pooling or head
    fixed_input_size: bool = True
    stage_counts: int = 0  # how many feature_info entries the tiny model has
    norm_after_pool: bool = False  # the final norm follows the pooling (per-token logits: head(norm(token)))
    dynamic_min: int = 35  # any-size families: the smallest side of the dynamic export range (stage grids >= 2)
    dynamic_size_export: bool = True  # False: torch.export takes a dynamic batch, one program per input size
    # BatchNorm layers: in training they normalise by batch statistics, so one sample's gradient depends on the
    # others' and per-sample gradients are defined in eval mode only; Opacus refuses BatchNorm outright (its
    # ModuleValidator.fix swaps in GroupNorm, which is what a private training of such a model uses)
    batch_norm: bool = False
    # Opacus's own Conv2d grad sampler unfolds activations with as_strided, assuming contiguous NCHW: convs fed
    # channels-last views (AS-MLP's 1x1 convs on (B, H, W, C) tokens, ConvMLP's convs) get wrong per-sample
    # gradients there, so such families are checked with Opacus's functorch sampler (force_functorch=True), which
    # is exact
    opacus_functorch: bool = False
    # LoRA also targets the 1x1 Conv2d channel maps (AS-MLP's, whose only Linear is the head)
    lora_pointwise_convs: bool = False
    # inputs whose sides are multiples of this (up to the stem's rounding; AS-MLP's patch merging needs even grids):
    # the dynamic-shape export then uses multiples of it, from a 2x2 last-stage grid up
    size_step: int = 1
    # why torchvision's create_feature_extractor cannot return the feature_info modules' outputs ("" where it can)
    not_extractable: str = ""
    # why one exported program cannot cover the smallest input and larger ones (staged families; "" where it can)
    not_exportable_down_to_smallest: str = ""


CYCLE_FC_GUARD = (
    "one program cannot cover 3x3 inputs (1x1 grids) and larger ones: torch.export guards grid != 1 in Cycle FC, "
    "whose shift is a depthwise conv on a channels-last view (with a conv-free shift the classifier exports over "
    "3..256; fork_feat still guards in Cycle FC under forward_intermediates)"
)
FAMILIES = {
    "mixer": Family(
        tiny_mixer,
        (32, 32),
        "MlpMixer",
        "blocks.1.mlp_channels.fc2",
        "mixer_s32_224",
        dict(num_blocks=2),
        stage_counts=2,
    ),
    "cyclemlp": Family(
        tiny_cyclemlp,
        (32, 32),
        "CycleMLP",
        "network.6.0.mlp.fc2",
        "cyclemlp_b1",
        dict(layers=[1, 1, 1, 1]),
        fixed_input_size=False,
        stage_counts=4,
        not_exportable_down_to_smallest=CYCLE_FC_GUARD,
    ),
    "cyclemlp_fork": Family(
        partial(tiny_cyclemlp, fork_feat=True),
        (32, 32),
        "CycleMLP",
        "network.6.0.mlp.fc2",
        "cyclemlp_b1",
        dict(layers=[1, 1, 1, 1], fork_feat=True),
        classifier=False,
        fixed_input_size=False,
        stage_counts=4,
        not_exportable_down_to_smallest=CYCLE_FC_GUARD,
    ),
    "vip": Family(
        tiny_vip,
        (28, 28),
        "VisionPermutator",
        "network.2.0.mlp.fc2",
        "vip_s7",
        dict(layers=[1, 1, 1, 1]),
        stage_counts=2,
    ),
    "resmlp": Family(
        tiny_resmlp,
        (32, 32),
        "ResMLP",
        "blocks.1.mlp.fc2",
        "resmlp_12_224",
        dict(depth=2, img_size=64, embed_dim=16),
        stage_counts=2,
    ),
    "gmlp": Family(
        tiny_gmlp,
        (32, 32),
        "GMLP",
        "blocks.1.mlp_channels.fc2",
        "gmlp_ti16_224",
        dict(num_blocks=2, img_size=64, embed_dim=16),
        stage_counts=2,
    ),
    "gmixer": Family(
        tiny_gmixer,
        (32, 32),
        "GMixer",
        "blocks.1.mlp_channels.fc2",
        "gmixer_12_224",
        dict(num_blocks=2, img_size=64, embed_dim=16),
        stage_counts=2,
    ),
    "msmlp": Family(
        tiny_msmlp,
        (32, 32),
        "MSMLP",
        "layers.3.blocks.0.pwconv2",
        "msmlp_t",
        dict(depths=[1, 1, 1, 1]),
        fixed_input_size=False,
        stage_counts=4,
        norm_after_pool=True,
        dynamic_min=64,
        not_exportable_down_to_smallest="torch.export guards grid != 1 in the depthwise mixing convs on a "
        "channels-last view: one program cannot cover 32x32 (1x1 last grid) and larger inputs",
    ),
    "convmlp": Family(
        tiny_convmlp,
        (32, 32),
        "ConvMLP",
        "stages.2.blocks.0.channel_mlp2.fc2",
        "convmlp_s",
        dict(blocks=[1, 1, 1], n_conv_blocks=1),
        fixed_input_size=False,
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
        not_exportable_down_to_smallest="torch.export guards the stride-2 steps' grids (ceil(n / 2)) against 1 and "
        "specialises around the example: one program cannot cover tiny inputs (1x1 grids) and larger ones; "
        "dynamic height and width from 33 up and static sizes down to 1x1 export (test_convmlp)",
    ),
    "convmlp_backbone": Family(
        partial(tiny_convmlp, classifier_head=False),
        (32, 32),
        "ConvMLP",
        "stages.2.blocks.0.channel_mlp2.fc2",
        "convmlp_s",
        dict(blocks=[1, 1, 1], n_conv_blocks=1, classifier_head=False),
        classifier=False,
        fixed_input_size=False,
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
        not_exportable_down_to_smallest="torch.export guards the stride-2 steps' grids (ceil(n / 2)) against 1 and "
        "specialises around the example: one program cannot cover tiny inputs (1x1 grids) and larger ones; "
        "dynamic height and width from 33 up and static sizes down to 1x1 export (test_convmlp)",
    ),
    "asmlp": Family(
        tiny_asmlp,
        (64, 64),
        "ASMLP",
        "head",  # AS-MLP's only Linear: its channel maps are 1x1 convolutions, as in the authors' code
        "asmlp_t",
        dict(depths=[1, 1, 1, 1], embed_dim=8),
        fixed_input_size=False,
        stage_counts=4,
        opacus_functorch=True,
        lora_pointwise_convs=True,
        size_step=32,
    ),
    "swinmlp": Family(
        tiny_swinmlp,
        (32, 32),
        "SwinMLP",
        "layers.1.blocks.1.mlp.fc2",
        "swinmlp_b",
        dict(depths=[1, 1, 1, 1], embed_dim=32),
        stage_counts=2,
    ),
    "activemlp": Family(
        tiny_activemlp,
        (32, 32),
        "ActiveMLP",
        "blocks.3.1.mlp.fc2",
        "activemlp_xt",
        dict(depths=[2, 2, 2, 2]),
        fixed_input_size=False,
        stage_counts=4,
        not_extractable="each stage's downsampling is a child of its last block (the authors' keys, blocks.i.j."
        "downsample) and runs after it; create_feature_extractor takes the last node under a module's name, the "
        "downsampled map (hooks on the block, forward_intermediates and features_only give the stage's own)",
    ),
    "repmlpnet": Family(
        tiny_repmlpnet,
        (32, 64),  # 2x2 and 2x4 partitions in the first two stages; the last grid 1x2 (train-mode BN at batch 1)
        "RepMLPNet",
        "head",  # RepMLPNet's only Linear: its channel maps are 1x1 convolutions, as in the authors' code
        "repmlpnet_t224",
        dict(num_blocks=[1, 1, 1, 1], channels=[8, 16, 24, 32], sharesets_nums=[1, 2, 4, 8]),
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
        lora_pointwise_convs=True,
    ),
    "smlpnet": Family(
        tiny_smlpnet,
        (64, 64),
        "SMLPNet",
        "channel_mix.3.2.net.3",
        "smlpnet_t",
        dict(depths=[1, 1, 1, 1]),
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
    ),
    "spach_ms": Family(
        tiny_spach_ms,
        (64, 64),
        "SpachMS",
        "layer4.1.channel_func.fc2",
        "spach_ms_mlp_xxs",
        dict(net_arch=[[["pass", 1]], [["mlp", 1]], [["mlp", 1]], [["mlp", 1]]]),
        stage_counts=4,
        opacus_functorch=True,
    ),
    "spach": Family(
        tiny_spach,
        (32, 32),
        "Spach",
        "blocks.1.channel_func.fc2",
        "spach_mlp_xxs",
        dict(net_arch=[["mlp", 2]]),
        stage_counts=2,
        opacus_functorch=True,
    ),
    "wavemlp": Family(
        tiny_wavemlp,
        (64, 64),
        "WaveMLP",
        "network.6.0.mlp.fc2",
        "wavemlp_t",
        dict(layers=[1, 1, 1, 1]),
        fixed_input_size=False,
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
        lora_pointwise_convs=True,
        not_exportable_down_to_smallest="torch.export guards every stage grid >= 2 (H, W >= 35) in the depthwise "
        "and grouped convs on channels-last views: one program cannot cover 3x3 inputs and larger ones; dynamic "
        "from 35 up and static sizes down to 3x3 export",
    ),
    "wavemlp_fork": Family(
        partial(tiny_wavemlp, fork_feat=True, norm_layer="group"),
        (64, 64),
        "WaveMLP",
        "network.6.0.mlp.fc2",
        "wavemlp_s",
        dict(layers=[1, 1, 1, 1], fork_feat=True),
        classifier=False,
        fixed_input_size=False,
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
        lora_pointwise_convs=True,
        not_exportable_down_to_smallest="torch.export guards every stage grid >= 2 (H, W >= 35) in the depthwise "
        "and grouped convs on channels-last views: one program cannot cover 3x3 inputs and larger ones; dynamic "
        "from 35 up and static sizes down to 3x3 export",
    ),
    "hiremlp": Family(
        tiny_hiremlp,
        (64, 64),
        "HireMLP",
        "network.6.0.mlp.fc2",
        "hiremlp_tiny",
        dict(layers=[1, 1, 1, 1]),
        fixed_input_size=False,
        stage_counts=4,
        batch_norm=True,
        opacus_functorch=True,
        lora_pointwise_convs=True,
        dynamic_size_export=False,
    ),
}
CLASSIFIERS = [name for name, family in FAMILIES.items() if family.classifier]
# the lead documents why a family cannot be scripted; xfail(strict=True) entries go here with the reason
NOT_SCRIPTABLE: dict[str, str] = {
    "wavemlp_fork": "fork_feat's forward is forward_intermediates(norm=True), as CycleMLP's",
    "cyclemlp_fork": "fork_feat's forward is forward_intermediates(norm=True), which TorchScript cannot compile "
    "(f-string errors, int-or-list indices)",
    "repmlpnet": "its layers subclass Conv2d and Sequential (channels-last views around the authors' modules) and call "
    "super().forward, which TorchScript cannot compile; torch.export and ONNX cover deployment",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def make(name: str, seed: int = 0, **overrides) -> nn.Module:
    """The tiny model of family `name` with random weights everywhere (heads and biases too)."""
    torch.manual_seed(seed)
    return randomise(FAMILIES[name].build(**overrides), seed)


def image(name: str, batch: int = BATCH, seed: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
    height, width = size or FAMILIES[name].size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def flat(out) -> torch.Tensor:
    """A model's output as one (B, N) tensor: logits, per-token logits, or fork_feat's list of maps."""
    if isinstance(out, (list, tuple)):
        return torch.cat([o.flatten(1) for o in out], dim=1)
    return out.flatten(1)


def loss_of(out) -> torch.Tensor:
    """A sum over samples of a per-sample loss (so per-sample gradients are those of each sample alone)."""
    return flat(out).square().mean(dim=1).sum()


def assert_same(a, b, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(flat(a), flat(b), atol=atol, rtol=rtol)


def assert_differs(a, b, margin: float = 1e-4) -> None:
    assert (flat(a) - flat(b)).abs().max() > margin, "the change had no effect on the output"


def hooked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear, convolution and norm, and every other module that holds parameters itself (CycleFC)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, HOOKED) or next(m.parameters(recurse=False), None) is not None
    }


def linear_names(model: nn.Module, head: bool = False) -> list[str]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")  # timm's models too
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (head or n != classifier)]


def lora_names(model: nn.Module, family: str | None = None) -> list[str]:
    """The LoRA targets: every Linear but the head, and 1x1 convolutions where the family maps channels by them
    (ungrouped ones: a dense low-rank update does not merge into a grouped conv's block-diagonal weight)."""
    names = linear_names(model)
    if family is not None and FAMILIES[family].lora_pointwise_convs:
        names += [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        ]
    return names


def feature_modules(model: nn.Module) -> list[str]:
    return [info["module"] for info in model.feature_info]


def capture(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[object, dict[str, torch.Tensor]]:
    """The model's output and the outputs of the named submodules, from one forward pass."""
    seen, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(partial(_keep, seen, name)))
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def _keep(store, name, module, args, output):
    store[name] = output


def to_nchw(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, S, C) with S = height * width row-major, or (B, H, W, C), as (B, C, H, W)."""
    if tokens.ndim == 3:
        tokens = tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1])
    return tokens.permute(0, 3, 1, 2)


def grid(model: nn.Module, index: int, size: tuple[int, int]) -> tuple[int, int]:
    reduction = model.feature_info[index]["reduction"]
    return -(-size[0] // reduction), -(-size[1] // reduction)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def per_sample_grads_by_loop(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each trainable parameter's gradient of each sample's loss, one sample at a time: (B, *shape)."""
    grads = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_of(model(x[i : i + 1])).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                grads[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in grads.items()}


ALL = pytest.mark.parametrize("family", list(FAMILIES))
CLASSIFIER = pytest.mark.parametrize("family", CLASSIFIERS)
MODES = [(train, grad) for train in (True, False) for grad in (True, False)]
MODE_IDS = [f"{'train' if t else 'eval'}-{'grad' if g else 'nograd'}" for t, g in MODES]


# ----------------------------------------------------------------------------------------------------------------
# Every architecture has a tiny configuration here


def test_every_architecture_has_a_tiny_config():
    covered = {family.architecture for family in FAMILIES.values()}
    missing = sorted(set(ARCHITECTURES) - covered)
    assert not missing, f"add a tiny config to FAMILIES in tests/test_contract.py for: {', '.join(missing)}"
    assert covered <= set(ARCHITECTURES)
    registered = {entry.architecture for entry in allmlp.models.REGISTRY.values()}
    assert registered <= set(ARCHITECTURES.values()), "a registered architecture is missing from ARCHITECTURES"
    for name, family in FAMILIES.items():
        assert type(make(name)) is ARCHITECTURES[family.architecture]
        assert allmlp.get_entry(family.registered).architecture is ARCHITECTURES[family.architecture]


# ----------------------------------------------------------------------------------------------------------------
# 1. Hooks


@ALL
@pytest.mark.parametrize(("train", "grad"), MODES, ids=MODE_IDS)
def test_forward_hooks_fire_once_per_forward(family, train, grad):
    model = make(family).train(train)
    modules = hooked_modules(model)
    assert any(isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)) for m in
               modules.values())  # fmt: skip  # channel maps: Linear, or 1x1 convs (Wave-MLP's fork_feat backbone)
    assert any(isinstance(m, NORMS) or "norm" in name for name, m in modules.items())  # ResMLP: Affine
    assert any(isinstance(m, nn.Conv2d) for m in modules.values())
    calls = Counter()
    pre_calls = Counter()
    for name, module in modules.items():
        module.register_forward_hook(lambda m, a, o, name=name: calls.update([name]))
        module.register_forward_pre_hook(lambda m, a, name=name: pre_calls.update([name]))
    x = image(family)
    with torch.set_grad_enabled(grad):
        model(x)
    once = Counter(dict.fromkeys(modules, 1))
    assert calls == once, {n: calls[n] for n in modules if calls[n] != 1}
    assert pre_calls == once
    with torch.set_grad_enabled(grad):
        model(x)
    assert calls == once + once


@ALL
def test_hooks_that_modify_inputs_or_outputs_change_the_output(family):
    model = make(family).eval()
    x = image(family)
    with torch.no_grad():
        reference = model(x)

    def nudge(t: torch.Tensor) -> torch.Tensor:  # not a scaling or a shift: LayerNorm would ignore those
        return t + 0.5 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7))

    for name, module in hooked_modules(model).items():
        for kind in ("pre", "post"):
            if kind == "pre":
                handle = module.register_forward_pre_hook(lambda m, args: (nudge(args[0]),) + tuple(args[1:]))
            else:
                handle = module.register_forward_hook(lambda m, args, out: nudge(out))
            with torch.no_grad():
                changed = model(x)
            handle.remove()
            assert (flat(changed) - flat(reference)).abs().max() > 1e-5, f"{kind}-hook on {name} had no effect"
    with torch.no_grad():
        assert_same(model(x), reference, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 2. LoRA: PEFT and by hand


def peft_lora(model: nn.Module, seed: int = 3, family: str | None = None) -> nn.Module:
    """PEFT LoRA (r=4) on every Linear but the head, lora_A and lora_B drawn at random (B is zero by default)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=lora_names(model, family), r=4, lora_alpha=8, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return peft_model


@ALL
def test_peft_lora(family):
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import Linear as LoraLinear

    base = make(family).eval()
    targets = lora_names(base, family)
    x = image(family)
    with torch.no_grad():
        base_out = base(x)
    lora = peft_lora(copy.deepcopy(base), family=family).eval()
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in lora.named_modules() if isinstance(m, (LoraLinear, LoraConv2d))
    }
    assert wrapped == set(targets)
    out = lora(x)
    assert_differs(out, base_out, margin=1e-3)
    lora_params = {n: p for n, p in lora.named_parameters() if "lora_" in n}
    assert len(lora_params) == 2 * len(targets)
    assert all(p.requires_grad for p in lora_params.values())
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    loss_of(out).backward()
    for name, p in lora_params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    merged = lora.merge_and_unload().eval()
    assert not any(isinstance(m, (LoraLinear, LoraConv2d)) for m in merged.modules())
    with torch.no_grad():  # merging reorders float32 sums: the error scales with the outputs (large under LoRA)
        assert_same(merged(x), flat(out).detach(), atol=1e-5 * max(1.0, flat(out).abs().max().item()))


class HandLoRA(nn.Module):
    """LoRA by module replacement: base(x) + x A^T B^T over the features (a 1x1 conv's channels), base frozen."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.channels = isinstance(base, nn.Conv2d)
        features_in, features_out = base.weight.shape[1], base.weight.shape[0]
        self.lora_A = nn.Parameter(torch.randn(rank, features_in, generator=generator) * 0.2)
        self.lora_B = nn.Parameter(torch.randn(features_out, rank, generator=generator) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels:
            low_rank = (x.movedim(1, -1) @ self.lora_A.t()) @ self.lora_B.t()
            return self.base(x) + low_rank.movedim(-1, 1)
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A).reshape(self.base.weight.shape)


def hand_lora(model: nn.Module, seed: int = 3, family: str | None = None) -> nn.Module:
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(lora_names(model, family)):
        replace_module(model, name, HandLoRA(model.get_submodule(name), 4, generator))
    return model


@ALL
def test_lora_by_module_replacement(family):
    base = make(family).eval()
    x = image(family)
    with torch.no_grad():
        base_out = base(x)
    lora = hand_lora(copy.deepcopy(base), family=family)
    out = lora(x)
    assert_differs(out, base_out, margin=1e-3)
    loss_of(out).backward()
    wrappers = {n: m for n, m in lora.named_modules() if isinstance(m, HandLoRA)}
    assert set(wrappers) == set(lora_names(base, family))
    for name, wrapper in wrappers.items():
        for p in (wrapper.lora_A, wrapper.lora_B):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, wrapper in wrappers.items():
            merged.get_submodule(name).weight.copy_(wrapper.merged_weight())
        assert_same(merged(x), flat(out).detach())


# ----------------------------------------------------------------------------------------------------------------
# 3. Pruning and parametrisations


def channel_maps(model: nn.Module, family: str | None = None) -> list[str]:
    """Every Linear (the head too), and the 1x1 convolutions of families that map channels by them."""
    names = linear_names(model, head=True)
    if family is not None and FAMILIES[family].lora_pointwise_convs:
        names += [n for n in lora_names(model, family) if n not in names]
    return names


def l1_prune(model: nn.Module, family: str | None = None) -> nn.Module:
    for name in channel_maps(model, family):
        prune.l1_unstructured(model.get_submodule(name), "weight", 0.5)
    return model


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of `model` with the given Linear weights written in."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in weights.items():
            plain.get_submodule(name).weight.copy_(weight)
    return plain


@ALL
def test_l1_unstructured_pruning(family):
    base = make(family).eval()
    x = image(family)
    pruned = l1_prune(copy.deepcopy(base), family)
    names = channel_maps(base, family)
    # Change the unpruned weights after pruning: a forward that reads a stale `.weight` instead of calling the
    # module (whose pre-hook recomputes weight_orig * weight_mask) is caught.
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name in names:
            module = pruned.get_submodule(name)
            module.weight_orig.add_(0.1 * torch.randn(module.weight_orig.shape, generator=generator))
    masks = {n: pruned.get_submodule(n).weight_mask for n in names}
    assert all(int((m == 0).sum()) == round(0.5 * m.numel()) for m in masks.values())  # what prune promises
    expected = with_weights(base, {n: pruned.get_submodule(n).weight_orig * masks[n] for n in names})
    out = pruned(x)
    with torch.no_grad():
        assert_same(out, expected(x))
        assert_differs(out, base(x))
    loss_of(out).backward()
    for name in names:
        grad = pruned.get_submodule(name).weight_orig.grad
        assert grad is not None and grad.abs().sum() > 0
        assert (grad[masks[name] == 0] == 0).all(), f"{name}: gradient reaches pruned weights"
    for name in names:
        prune.remove(pruned.get_submodule(name), "weight")
    with torch.no_grad():
        assert_same(pruned(x), expected(x))


class RowScale(nn.Module):
    """A parametrisation: W -> diag(scale) W, with a trainable scale."""

    def __init__(self, rows: int, generator: torch.Generator):
        super().__init__()
        self.scale = nn.Parameter(0.5 + torch.rand(rows, generator=generator))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale.reshape([-1] + [1] * (weight.ndim - 1))


@ALL
def test_parametrize_every_linear(family):
    base = make(family).eval()
    x = image(family)
    model = copy.deepcopy(base)
    names = channel_maps(model, family)
    generator = torch.Generator().manual_seed(5)
    for name in names:
        module = model.get_submodule(name)
        parametrize.register_parametrization(module, "weight", RowScale(module.weight.shape[0], generator))
    expected = with_weights(base, {n: model.get_submodule(n).weight for n in names})
    out = model(x)
    with torch.no_grad():
        assert_same(out, expected(x))
        assert_differs(out, base(x))
        with parametrize.cached():
            assert_same(model(x), expected(x))
    loss_of(out).backward()
    for name in names:
        module = model.get_submodule(name)
        assert module.parametrizations.weight.original.grad.abs().sum() > 0
        assert module.parametrizations.weight[0].scale.grad.abs().sum() > 0, f"{name}: no gradient for its scale"


# ----------------------------------------------------------------------------------------------------------------
# 4. Dynamic quantisation


@ALL
def test_quantize_dynamic_replaces_every_linear(family):
    model = make(family).eval()
    x = image(family)
    count = sum(isinstance(m, nn.Linear) for m in model.modules())  # dynamic quantisation takes Linear only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert not any(type(m) is nn.Linear for m in quantized.modules()), "an nn.Linear was not quantised"
    dynamic = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(dynamic) == count
    with torch.no_grad():
        ref, out = flat(model(x)), flat(quantized(x))
    error = (out - ref).norm() / ref.norm()
    if count:
        assert 0 < error < 0.05, f"relative error {error:.4f}"
    else:  # a backbone of convolutions only (Wave-MLP with fork_feat): nothing to quantise
        assert error == 0


# ----------------------------------------------------------------------------------------------------------------
# 5. Partial freezing


@ALL
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_only_one_deep_linear_trainable(family, train):
    model = make(family).train(train)
    x = image(family)
    with torch.no_grad():
        before = model(x)
    model.requires_grad_(False)
    layer = model.get_submodule(FAMILIES[family].deep_linear)
    assert isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))
    layer.requires_grad_(True)
    out = model(x)
    assert_same(out, before, atol=0, rtol=0)
    loss_of(out).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    with torch.no_grad():
        assert_differs(model(x), before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ----------------------------------------------------------------------------------------------------------------
# 6. Opacus


@ALL
def test_opacus_grad_samples_equal_per_sample_gradients(family):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = make(family).train()
    if FAMILIES[family].batch_norm:
        model = ModuleValidator.fix(model)
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):  # a BatchNorm subclass the fix leaves
            with warnings.catch_warnings(), pytest.raises(NotImplementedError, match="not supported by Opacus"):
                warnings.simplefilter("ignore")
                GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
            return
    x = image(family, batch=3)
    expected = per_sample_grads_by_loop(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = GradSampleModule(
            model, batch_first=True, loss_reduction="sum", force_functorch=FAMILIES[family].opacus_functorch
        )
        loss_of(private(x)).backward()
    for name, p in model.named_parameters():
        assert getattr(p, "grad_sample", None) is not None, f"{name} has no grad_sample"
        torch.testing.assert_close(p.grad_sample, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    private._close()


# ----------------------------------------------------------------------------------------------------------------
# 7. FLOPs and summaries


def counted_flops(model: nn.Module, x: torch.Tensor, grad: bool = False) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@ALL
def test_flop_count_is_the_same_with_and_without_grad(family):
    model = make(family)
    x = image(family)
    counts = {}
    for train, grad in MODES:
        counts[train, grad] = counted_flops(model.train(train), x, grad)
    assert len(set(counts.values())) == 1, counts
    assert counts[False, False] > 0


def timm_mixer(**overrides) -> nn.Module:
    """timm's MlpMixer in the tiny Mixer's configuration (tokens 0.5 * 32 = 16, channels 2 * 32 = 64, tanh GELU)."""
    from timm.models.mlp_mixer import MlpMixer as TimmMixer

    config = dict(
        num_classes=10,
        img_size=32,
        in_chans=3,
        patch_size=8,
        num_blocks=2,
        embed_dim=32,
        mlp_ratio=(0.5, 2.0),
        act_layer=partial(nn.GELU, approximate="tanh"),
        global_pool="avg",
    )
    return TimmMixer(**{**config, **overrides})


def mixer_pair(**overrides) -> tuple[nn.Module, nn.Module]:
    """(allmlp's tiny Mixer, timm's) with the same random weights: timm's state dict loaded into ours, strictly."""
    torch.manual_seed(0)
    theirs = randomise(timm_mixer(**overrides), seed=11)
    ours = tiny_mixer(**overrides)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_mixer_flops_equal_timm_and_the_formula():
    ours, theirs = mixer_pair()
    x = image("mixer")
    count = counted_flops(ours, x)
    assert count == counted_flops(theirs, x)
    b, s, c, p, dt, dc, k = BATCH, 16, 32, 8, 16, 64, 10
    per_block = 2 * b * c * (2 * s * dt) + 2 * b * s * (2 * c * dc)
    assert count == 2 * b * s * c * 3 * p * p + 2 * per_block + 2 * b * c * k


@ALL
def test_torchinfo_and_ptflops_count_every_parameter(family):
    import torchinfo
    from ptflops import get_model_complexity_info

    model = make(family).eval()
    params = sum(p.numel() for p in model.parameters())
    height, width = FAMILIES[family].size
    stats = torchinfo.summary(model, input_size=(1, 3, height, width), verbose=0, device="cpu")
    assert stats.total_params == params
    assert stats.trainable_params == params
    macs = {}
    for backend in ("pytorch", "aten"):  # module hooks (also counts norms, GELUs, biases) / aten matmuls and convs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            macs[backend], ptflops_params = get_model_complexity_info(
                model, (3, height, width), as_strings=False, print_per_layer_stat=False, verbose=False, backend=backend
            )
        assert ptflops_params == params, backend
        assert macs[backend] > 0
    if family == "mixer":
        half = counted_flops(model, image(family, batch=1)) / 2
        assert abs(macs["aten"] - half) <= 0.03 * half, (macs, half)
        assert abs(macs["pytorch"] - half) <= 0.08 * half, (macs, half)


# ----------------------------------------------------------------------------------------------------------------
# 8. Graph capture, torch.func, meta-device construction, export, TorchScript


@ALL
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_reproduces_eager(family, train):
    model = make(family).train(train)
    traced = torch.fx.symbolic_trace(model)
    for batch in (1, 3):
        x = image(family, batch=batch)
        assert_same(traced(x), model(x), atol=0, rtol=0)
    x = image(family)
    loss_of(model(x)).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss_of(traced(x)).backward()  # the traced module shares the model's parameters
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name], atol=0, rtol=0, msg=name)


@ALL
def test_create_feature_extractor_returns_the_feature_info_modules(family, request):
    if FAMILIES[family].not_extractable:
        request.applymarker(pytest.mark.xfail(reason=FAMILIES[family].not_extractable, strict=True))
    from torchvision.models.feature_extraction import create_feature_extractor

    model = make(family).eval()
    names = feature_modules(model)
    assert len(names) == FAMILIES[family].stage_counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = create_feature_extractor(model, return_nodes={n: n for n in names})
    x = image(family)
    with torch.no_grad():
        _, expected = capture(model, names, x)
        got = extractor(x)
    assert list(got) == names
    for name in names:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0)


@ALL
def test_functional_call(family):
    from torch.func import functional_call

    model = make(family).eval()
    x = image(family)
    changed = {n: p.detach() * 0.9 + 0.01 for n, p in model.named_parameters()}
    with torch.no_grad():
        out = functional_call(model, changed, (x,))
        assert_differs(out, model(x))
        expected = copy.deepcopy(model)
        expected.load_state_dict(changed, strict=False)
        assert_same(out, expected(x), atol=0, rtol=0)
        assert_same(functional_call(model, dict(model.named_parameters()), (x,)), model(x), atol=0, rtol=0)


@ALL
def test_vmap_grad_gives_per_sample_gradients(family):
    from torch.func import functional_call, grad, vmap

    model = make(family).train(not FAMILIES[family].batch_norm)  # BatchNorm: running statistics (see Family)
    x = image(family, batch=3)
    expected = per_sample_grads_by_loop(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sample_loss(params, sample):
        return loss_of(functional_call(model, (params, buffers), (sample.unsqueeze(0),)))

    got = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@ALL
def test_meta_device_to_empty_then_load_state_dict(family):
    reference = make(family).eval()
    with torch.device("meta"):
        model = FAMILIES[family].build()
    assert all(t.is_meta for t in model.state_dict().values())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert n1 == n2 and torch.equal(b1, b2), f"buffer {n1} is not restored by load_state_dict"
    x = image(family)
    with torch.no_grad():
        assert_same(model(x), reference(x), atol=0, rtol=0)


@ALL
def test_accelerate_init_empty_weights_then_assign(family):
    from accelerate import init_empty_weights

    reference = make(family).eval()
    with init_empty_weights(include_buffers=True):
        model = FAMILIES[family].build()
    assert all(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    model.eval()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    x = image(family)
    with torch.no_grad():
        assert_same(model(x), reference(x), atol=0, rtol=0)


EXPORT_SIZES = {  # (batch, height, width) the dynamic program is checked at
    "wavemlp": [(1, 35, 35), (3, 40, 64), (2, 64, 64), (1, 97, 50)],
    "wavemlp_fork": [(1, 35, 35), (2, 41, 70), (1, 64, 64)],
    "hiremlp": [(1, 64, 64), (3, 64, 64)],
    "mixer": [(1, 32, 32), (3, 32, 32), (5, 32, 32)],
    "cyclemlp": [(1, 35, 35), (3, 40, 64), (2, 64, 64), (1, 97, 50)],
    "cyclemlp_fork": [(1, 35, 35), (2, 41, 70), (1, 64, 64)],
    "vip": [(1, 28, 28), (3, 28, 28), (5, 28, 28)],
    "smlpnet": [(1, 64, 64), (3, 64, 64), (5, 64, 64)],
    "spach_ms": [(1, 64, 64), (3, 64, 64), (5, 64, 64)],
    "spach": [(1, 32, 32), (3, 32, 32), (5, 32, 32)],
    "resmlp": [(1, 32, 32), (3, 32, 32), (5, 32, 32)],
    "gmlp": [(1, 32, 32), (3, 32, 32), (5, 32, 32)],
    "gmixer": [(1, 32, 32), (3, 32, 32), (5, 32, 32)],
    "msmlp": [(1, 64, 64), (3, 70, 96), (2, 128, 64), (1, 97, 66)],
    "convmlp": [(1, 35, 35), (3, 40, 64), (2, 64, 64), (1, 97, 50)],
    "convmlp_backbone": [(1, 35, 35), (2, 41, 70), (1, 64, 64)],
    "asmlp": [(1, 64, 64), (3, 64, 96), (2, 128, 64), (1, 96, 256)],
    "swinmlp": [(1, 32, 32), (3, 32, 32), (5, 32, 32)],
    "activemlp": [(1, 35, 35), (3, 40, 64), (2, 64, 64), (1, 97, 50)],
    "repmlpnet": [(1, 32, 64), (3, 32, 64), (5, 32, 64)],
}
ANY_SIZE = [name for name, family in FAMILIES.items() if not family.fixed_input_size]
STAGED = [name for name in ANY_SIZE if FAMILIES[name].dynamic_size_export]  # one program for a range of sizes


def export(model: nn.Module, x: torch.Tensor, dynamic: dict, oblivious: bool = False):
    context = fx_config.patch(backed_size_oblivious=True) if oblivious else contextlib.nullcontext()
    with warnings.catch_warnings(), context:
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,), dynamic_shapes=(dynamic,)).module()


def assert_exported_matches(family: str, exported: nn.Module, model: nn.Module, sizes) -> None:
    for batch, height, width in sizes:
        x = image(family, batch=batch, size=(height, width))
        with torch.no_grad():
            assert_same(exported(x), model(x))


@ALL
def test_torch_export_with_dynamic_shapes(family):
    """A dynamic batch everywhere; the any-size families also a dynamic height and width over their documented range
    (CycleMLP's README: every stage grid at least 2x2, i.e. H, W >= 35; MS-MLP: >= 64; AS-MLP: multiples of 32)."""
    from torch.export import Dim

    model = make(family).eval()
    dynamic = {0: Dim("batch", min=1, max=64)}
    example = image(family)
    step = FAMILIES[family].size_step
    if family in STAGED and step > 1:
        rows, cols = Dim("rows", min=2, max=256 // step), Dim("cols", min=2, max=256 // step)
        dynamic |= {2: step * rows, 3: step * cols}
        example = image(family, size=(2 * step, 3 * step))
    elif family in STAGED:
        low = FAMILIES[family].dynamic_min
        dynamic |= {2: Dim("height", min=low, max=256), 3: Dim("width", min=low, max=256)}
        example = image(family, size=(64, 64))
    assert_exported_matches(family, export(model, example, dynamic), model, EXPORT_SIZES[family])


@pytest.mark.parametrize("family", [name for name in ANY_SIZE if FAMILIES[name].size_step == 1])
def test_export_at_the_smallest_input(family):
    """The smallest input an any-size family takes (every stage grid 1x1; CycleMLP 3x3, MS-MLP 32x32) exports with a
    static size."""
    from torch.export import Dim

    model = make(family).eval()
    side = model.accepts[2][0]  # the smallest height the model takes
    exported = export(model, image(family, size=(side, side)), {0: Dim("batch", min=1, max=64)})
    assert_exported_matches(family, exported, model, [(1, side, side), (3, side, side)])


@pytest.mark.parametrize("family", [name for name in STAGED if FAMILIES[name].size_step == 1])
def test_export_dynamic_down_to_the_smallest_input(family, request):
    if FAMILIES[family].not_exportable_down_to_smallest:
        request.applymarker(pytest.mark.xfail(reason=FAMILIES[family].not_exportable_down_to_smallest, strict=True))
    from torch.export import Dim

    model = make(family).eval()
    side = model.accepts[2][0]  # the smallest height the model takes (CycleMLP: 3)
    dynamic = {0: Dim("batch", min=1, max=64), 2: Dim("height", min=side, max=256), 3: Dim("width", min=side, max=256)}
    exported = export(model, image(family), dynamic, oblivious=True)
    sizes = [(1, side, side), (3, side + 14, side + 37), (2, side + 29, side + 29), (1, side + 61, side + 45)]
    assert_exported_matches(family, exported, model, sizes)


@ALL
def test_torch_jit_script(family, request):
    if family in NOT_SCRIPTABLE:
        request.applymarker(pytest.mark.xfail(reason=NOT_SCRIPTABLE[family], strict=True))
    model = make(family).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    for batch in (1, 3):
        x = image(family, batch=batch)
        with torch.no_grad():
            assert_same(scripted(x), model(x))


# ----------------------------------------------------------------------------------------------------------------
# 9. timm's model interface


@CLASSIFIER
def test_forward_intermediates(family):
    model = make(family).eval()
    x = image(family)
    size = FAMILIES[family].size
    names = feature_modules(model)
    count = len(names)
    with torch.no_grad():
        _, stages = capture(model, names, x)
        features = model.forward_features(x)
        final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, features, atol=0, rtol=0)
    assert len(maps) == count
    for i, (name, info, got) in enumerate(zip(names, model.feature_info, maps, strict=True)):
        assert got.shape == (BATCH, info["num_chs"], *grid(model, i, size)), name
        torch.testing.assert_close(got, to_nchw(stages[name], *grid(model, i, size)), atol=0, rtol=0)

    def taken(indices, **kwargs):
        with torch.no_grad():
            return model.forward_intermediates(x, indices=indices, intermediates_only=True, **kwargs)

    for indices, picked in (
        (1, [count - 1]),
        (count, list(range(count))),
        ([0], [0]),
        ([-1], [count - 1]),
        ([0, -1], [0, count - 1]),
        ([-count], [0]),
    ):
        got = taken(indices)
        assert len(got) == len(picked), indices
        for g, i in zip(got, picked, strict=True):
            torch.testing.assert_close(g, maps[i], atol=0, rtol=0)
    # norm=True: the last stage normalised is the final features
    (last,) = taken([-1], norm=True)
    torch.testing.assert_close(last, to_nchw(features, *grid(model, count - 1, size)), atol=1e-6, rtol=1e-6)
    # the token formats: the isotropic families (Mixer, ResMLP, gMLP, gMixer) NLC, the staged families NHWC
    fmt = model.token_format
    for got, expected in zip(taken(None, output_fmt=fmt), maps, strict=True):
        if fmt == "NLC":
            assert got.ndim == 3
            got = got.reshape(BATCH, *expected.shape[2:], -1)
        torch.testing.assert_close(got.permute(0, 3, 1, 2), expected, atol=0, rtol=0)
    assert isinstance(taken(None), list)


@CLASSIFIER
def test_forward_intermediates_stop_early(family):
    model = make(family).eval()
    x = image(family)
    names = feature_modules(model)
    calls = Counter()
    model.get_submodule(names[-1]).register_forward_hook(lambda m, a, o: calls.update(["last"]))
    with torch.no_grad():
        final, full = model.forward_intermediates(x, indices=[0])
        assert calls["last"] == 1, "the final features need every stage"
        torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
        calls.clear()
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        _, listed = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert calls["last"] == 0, "stop_early still ran the last stage"
    torch.testing.assert_close(early[0], full[0], atol=0, rtol=0)
    torch.testing.assert_close(listed[0], full[0], atol=0, rtol=0)


@CLASSIFIER
def test_prune_intermediate_layers(family):
    model = make(family).eval()
    x = image(family)
    count = len(model.feature_info)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    pruned = copy.deepcopy(model)
    kept = pruned.prune_intermediate_layers(indices=[0, 1])
    assert list(kept) == [0, 1]
    assert sum(p.numel() for p in pruned.parameters()) < params
    assert pruned.num_classes == 0 and not isinstance(pruned.get_classifier(), nn.Linear)
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    kept_all = copy.deepcopy(model).prune_intermediate_layers(indices=count, prune_head=False)
    assert list(kept_all) == list(range(count))
    unpruned_norm = copy.deepcopy(model)
    assert unpruned_norm.prune_intermediate_layers(indices=1, prune_head=False) == [count - 1]
    with torch.no_grad():
        torch.testing.assert_close(
            unpruned_norm.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0], last[0]
        )
        assert_same(unpruned_norm(x), model(x), atol=0, rtol=0)


def copy_matching(source: dict[str, torch.Tensor], target: nn.Module) -> None:
    """Load `source` into `target` whose keys may carry a wrapper prefix ('model.'); every target key must match."""
    state = {}
    for key in target.state_dict():
        parts = key.split(".")
        found = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in source), None)
        assert found is not None, f"{key} has no counterpart in the full model"
        state[key] = source[found]
    target.load_state_dict(state, strict=True)


@CLASSIFIER
def test_create_model_features_only(family):
    info = FAMILIES[family]
    overrides = {k: v for k, v in info.registered_overrides.items() if k != "fork_feat"}
    full = randomise(allmlp.create_model(info.registered, **overrides), seed=2).eval()
    count = len(full.feature_info)
    out_indices = (0, count - 1) if count > 2 else (count - 1,)
    features = allmlp.create_model(info.registered, features_only=True, out_indices=out_indices, **overrides)
    copy_matching(full.state_dict(), features)
    features.eval()
    side = full.pretrained_cfg["input_size"][1]
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        maps = features(x)
        expected = full.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert isinstance(maps, (list, tuple)) and len(maps) == len(out_indices)
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    assert channels == [full.feature_info[i]["num_chs"] for i in out_indices]
    assert reductions == [full.feature_info[i]["reduction"] for i in out_indices]
    assert features.feature_info.module_name() == [full.feature_info[i]["module"] for i in out_indices]
    for got, want, chs, red in zip(maps, expected, channels, reductions, strict=True):
        assert got.shape == (1, chs, -(-side // red), -(-side // red))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fork_feat_forward_gives_the_feature_info_maps():
    model = make("cyclemlp_fork").eval()
    for size in ((32, 32), (64, 96)):
        x = image("cyclemlp_fork", size=size)
        with torch.no_grad():
            maps = model(x)
        assert isinstance(maps, (list, tuple)) and len(maps) == len(model.feature_info) == 4
        assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
        for i, (info, got) in enumerate(zip(model.feature_info, maps, strict=True)):
            assert got.shape == (BATCH, info["num_chs"], *grid(model, i, size))


@CLASSIFIER
def test_global_pool_and_reset_classifier(family):
    model = make(family).eval()
    tokens_model = make(family, global_pool="").eval()
    x = image(family)
    with torch.no_grad():
        pooled = model(x)
        per_token = tokens_model(x)
        features = model.forward_features(x)
    assert pooled.shape == (BATCH, 10)
    assert per_token.shape == (*features.shape[:-1], 10) and per_token.ndim >= 3
    if FAMILIES[family].norm_after_pool:  # the norm of pooled features (MS-MLP) normalises each token instead
        torch.testing.assert_close(per_token, model.get_classifier()(model.norm(features)), atol=1e-6, rtol=1e-6)
        pooled_features = model.norm(features.mean(dim=tuple(range(1, features.ndim - 1))))
        torch.testing.assert_close(pooled, model.get_classifier()(pooled_features), atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(per_token, model.get_classifier()(features), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(per_token.reshape(BATCH, -1, 10).mean(1), pooled, atol=1e-5, rtol=1e-5)

    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (BATCH, 5)
    assert model.get_classifier() is model.get_submodule(model.pretrained_cfg["classifier"])
    model.reset_classifier(5, global_pool="")
    assert model(x).shape == (*features.shape[:-1], 5)
    model.reset_classifier(7, global_pool="avg")
    assert model(x).shape == (BATCH, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(features, pre_logits=True), atol=0, rtol=0)
    assert model(x).shape == (BATCH, model.num_features)


@CLASSIFIER
def test_head_hidden_size_and_pre_logits(family):
    model = make(family).eval()
    x = image(family)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert_same(model.forward_head(features), model(x), atol=0, rtol=0)
    assert model.head_hidden_size == model.num_features == pre_logits.shape[-1] == features.shape[-1]
    assert pre_logits.shape == (BATCH, model.num_features)
    assert features.is_contiguous()


def matcher_regexes(matcher: dict) -> list[str]:
    regexes = []
    for value in matcher.values():
        if isinstance(value, str):
            regexes.append(value)
        else:
            regexes.extend(pattern for pattern, _ in value)
    return regexes


@ALL
def test_group_matcher_covers_every_parameter(family):
    """Every parameter but the classifier's matches one of the regexes (timm puts the unmatched head last); the
    groups follow the network: stem, then each stage / block in order, the head last."""
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = make(family)
    first_conv = model.pretrained_cfg["first_conv"].rsplit(".", 1)[0]
    head = model.pretrained_cfg["classifier"]
    for coarse in (False, True):
        matcher = model.group_matcher(coarse=coarse)
        regexes = matcher_regexes(matcher)
        for name, _ in model.named_parameters():
            if not name.startswith(head + "."):
                assert any(re.match(r, name) for r in regexes), f"{name} matches no group (coarse={coarse})"
        layer_of = group_parameters(model, matcher, reverse=True)
        assert set(layer_of) == {n for n, _ in model.named_parameters()}
        stem = {layer_of[n] for n in layer_of if n.startswith(first_conv + ".")}
        # a feature output may be the stem itself (ConvMLP's tokenizer, its stride-4 map): that is the stem group
        outputs = [m for m in feature_modules(model) if not first_conv.startswith(m + ".")]
        stages = [{layer_of[n] for n in layer_of if n.startswith(m + ".")} for m in outputs]
        assert len(stem) == 1 and all(stages)
        if not coarse:
            assert max(stem) < min(stages[0]), "the stem is not the first group"
            for earlier, later in zip(stages[:-1], stages[1:], strict=True):
                assert max(earlier) < min(later), "stages are not grouped in order"
        if family in CLASSIFIERS:
            assert {layer_of[n] for n in layer_of if n.startswith(head + ".")} == {max(layer_of.values())}
    # timm's layer-wise lr decay groups by the matcher: every stage/block gets its own scale
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=0.05, layer_decay=0.8)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert len({group["lr_scale"] for group in optimizer.param_groups}) >= FAMILIES[family].stage_counts + 1


@ALL
def test_no_weight_decay_is_a_set_of_parameter_names(family):
    model = make(family)
    names = model.no_weight_decay()
    assert isinstance(names, set)
    assert names <= {n for n, _ in model.named_parameters()}


@ALL
def test_pretrained_cfg(family):
    model = make(family)
    cfg = model.pretrained_cfg
    assert isinstance(cfg, dict) and PRETRAINED_CFG_KEYS <= set(cfg), PRETRAINED_CFG_KEYS - set(cfg)
    assert model.default_cfg == cfg
    assert len(cfg["input_size"]) == 3 and cfg["input_size"][0] == 3
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["interpolation"] in ("bilinear", "bicubic") and 0 < cfg["crop_pct"] <= 1
    assert cfg["crop_mode"] == "center"
    assert cfg["fixed_input_size"] is FAMILIES[family].fixed_input_size
    if FAMILIES[family].classifier:
        assert model.get_classifier() is model.get_submodule(cfg["classifier"])  # "head", or the authors' name
        assert isinstance(model.get_classifier(), nn.Linear)
    else:
        assert cfg["classifier"] == "head"
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    x = image(family)
    _, seen = capture(model, [cfg["first_conv"]], x)  # the first conv is the one that sees the image
    torch.testing.assert_close(
        seen[cfg["first_conv"]], nn.functional.conv2d(x, first_conv.weight, first_conv.bias, **_conv_args(first_conv))
    )


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


@pytest.mark.parametrize("name", allmlp.list_models())
def test_resolve_model_data_config_gives_the_registry_preprocessing(name):
    from timm.data import resolve_model_data_config

    with torch.device("meta"):
        model = allmlp.create_model(name)
    config = resolve_model_data_config(model)
    entry = allmlp.get_entry(name)
    pre = entry.preprocessing
    side = entry.config.get("img_size", 224)  # the entry's own input size (Swin-MLP-T: 256)
    assert config["input_size"] == (3, side, side)
    assert tuple(config["mean"]) == tuple(pre.mean) and tuple(config["std"]) == tuple(pre.std)
    assert config["interpolation"] == pre.interpolation and config["crop_pct"] == pre.crop_pct
    assert config["crop_mode"] == "center"
    if name == "mixer_b16_224":
        assert tuple(config["mean"]) == (0.5, 0.5, 0.5) and tuple(config["std"]) == (0.5, 0.5, 0.5)
        assert config["interpolation"] == "bilinear" and config["crop_pct"] == 1.0


@ALL
def test_stage_activations_are_batch_first(family):
    """Mixer's blocks see and give (B, S, C); CycleMLP/ViP stages (B, H, W, C); sample i of a batch is row i."""
    model = make(family).eval()
    x = image(family, batch=3)
    size = FAMILIES[family].size
    names = feature_modules(model)
    inputs = {}
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
    with torch.no_grad():
        out, outputs = capture(model, names, x)
        inputs_batch = dict(inputs)
        out_one, outputs_one = capture(model, names, x[1:2])
    assert_same(flat(out)[1:2], out_one)
    for i, name in enumerate(names):
        h, w = grid(model, i, size)
        channels = model.feature_info[i]["num_chs"]
        if model.token_format == "NLC":
            assert outputs[name].shape == inputs_batch[name].shape == (3, h * w, channels), name
        else:
            assert outputs[name].shape == (3, h, w, channels), name
            assert inputs_batch[name].shape[0] == 3 and inputs_batch[name].ndim == 4, name
        torch.testing.assert_close(outputs[name][1:2], outputs_one[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inputs_batch[name][1:2], inputs[name], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 10. Equality with timm's MlpMixer


@pytest.mark.parametrize(("train", "grad"), MODES, ids=MODE_IDS)
def test_mixer_equals_timm(train, grad):
    ours, theirs = mixer_pair()
    ours.train(train), theirs.train(train)
    x = image("mixer")
    with torch.set_grad_enabled(grad):
        out, expected = ours(x), theirs(x)
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if grad:
        loss_of(out).backward()
        loss_of(expected).backward()
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_mixer_hooks_see_what_timm_hooks_see():
    ours, theirs = mixer_pair()
    x = image("mixer")
    seen = {}
    for label, model in (("ours", ours), ("theirs", theirs)):
        seen[label] = {}
        for name, module in hooked_modules(model).items():
            module.register_forward_hook(
                lambda m, a, o, name=name, store=seen[label]: store.__setitem__(name, (a[0], o))
            )
        with torch.no_grad():
            model.eval()(x)
    assert set(seen["ours"]) == set(seen["theirs"])
    for name, (inp, out) in seen["theirs"].items():
        torch.testing.assert_close(seen["ours"][name][0], inp, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(seen["ours"][name][1], out, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tool", ["peft", "hand_lora", "prune", "pre_hooks"])
def test_mixer_under_tools_equals_timm(tool):
    ours, theirs = mixer_pair()
    x = image("mixer")
    outputs = []
    for model in (ours, theirs):
        model.eval()
        if tool == "peft":
            model = peft_lora(model)
        elif tool == "hand_lora":
            model = hand_lora(model)
        elif tool == "prune":
            model = l1_prune(model)
        else:
            for i, (_, module) in enumerate(sorted(hooked_modules(model).items())):
                module.register_forward_pre_hook(lambda m, a, i=i: (a[0] * (1 + 0.01 * i) + 0.01,))
        outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert_differs(outputs[0], mixer_pair()[0].eval()(x))


def test_mixer_interface_equals_timm():
    ours, theirs = mixer_pair()
    ours.eval(), theirs.eval()
    x = image("mixer")
    assert ours.feature_info == theirs.feature_info
    assert ours.group_matcher() == theirs.group_matcher()
    assert ours.num_features == ours.head_hidden_size == theirs.head_hidden_size
    with torch.no_grad():
        for norm in (False, True):
            for fmt in ("NCHW", "NLC"):
                final, maps = ours.forward_intermediates(x, norm=norm, output_fmt=fmt)
                final_t, maps_t = theirs.forward_intermediates(x, norm=norm, output_fmt=fmt)
                torch.testing.assert_close(final, final_t, atol=1e-5, rtol=1e-5)
                for a, b in zip(maps, maps_t, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ours_tokens, theirs_tokens = mixer_pair(global_pool="")
    with torch.no_grad():
        torch.testing.assert_close(ours_tokens.eval()(x), theirs_tokens.eval()(x), atol=1e-5, rtol=1e-5)
    ours.prune_intermediate_layers(indices=[0])
    theirs.prune_intermediate_layers(indices=[0])
    assert set(ours.state_dict()) == set(theirs.state_dict())
