"""What the CycleMLP and ViP tests share: the authors' MLP, random weights, published key lists, ONNX runs."""

import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

import allmlp


class AuthorsMlp(nn.Module):
    """The MLP both authors' repositories use (timm's of 2021): fc1, GELU, fc2."""

    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (biases and heads start at zero); LayerNorm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.ndim == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * scale + offset)
    return model


def published_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a published checkpoint or an authors' model, from its key list: one entry per line, the key
    then its shape in brackets (`key [d0,d1]`, or tab-separated key, shape, dtype[, kind]); `#` lines are comments."""
    shapes = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, rest = line.split(None, 1)
            shapes[key] = tuple(int(d) for d in re.findall(r"\d+", re.search(r"[\[(][^\])]*", rest).group()))
    return shapes


def onnx_outputs(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> np.ndarray:
    """Export `model` to ONNX at `path` with either exporter and run it on x with onnxruntime."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def fake_yacs_module(monkeypatch):
    """A stand-in for yacs (not installed here) whose CfgNode pickles under yacs's own name, as AS-MLP's files do."""
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, entries=None):
            super().__init__(entries or {})
            self.__dict__["__immutable__"] = True

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    package.config = module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def assert_checkpointing_changes_nothing(
    model: nn.Module, x: torch.Tensor, atol: float = 0.0, rtol: float = 0.0, buffers: bool = False
) -> None:
    """A training step of `model` (in train mode) gives the same outputs and gradients (and with `buffers`, the same
    BatchNorm statistics) with grad checkpointing as without: stochastic depth replays its draws."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for checkpointing in (False, True):
        model.load_state_dict(state)
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        runs.append((out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}))
    (expected_out, expected, expected_buffers), (out, grads, got_buffers) = runs
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=atol, rtol=rtol, msg=name)
    if buffers:
        for name, buffer in got_buffers.items():
            torch.testing.assert_close(buffer, expected_buffers[name], atol=0, rtol=0, msg=name)


# Tiny models of every family, for tests of behaviour (the contract, optimisers, ...).


def tiny_mixer(**overrides) -> nn.Module:
    config = dict(
        img_size=32,
        patch_size=8,
        in_chans=3,
        num_classes=10,
        hidden_dim=32,
        num_blocks=2,
        tokens_mlp_dim=16,
        channels_mlp_dim=64,
        gelu="tanh",
        drop_rate=0.0,
        drop_path_rate=0.0,
        global_pool="avg",
    )
    return allmlp.MlpMixer(**{**config, **overrides})


def tiny_cyclemlp(**overrides) -> nn.Module:
    config = dict(
        layers=[1, 1, 1, 1],
        embed_dims=[16, 32, 48, 64],
        mlp_ratios=[2, 2, 2, 2],
        transitions=[True] * 4,
        num_classes=10,
        fork_feat=False,
        global_pool="avg",
    )
    return allmlp.CycleMLP(**{**config, **overrides})


def tiny_vip(**overrides) -> nn.Module:
    config = dict(
        layers=[1, 1],
        img_size=28,
        patch_size=7,
        embed_dims=[16, 32],
        transitions=[True, False],
        segment_dim=[4, 2],
        mlp_ratios=[2, 2],
        num_classes=10,
    )
    return allmlp.VisionPermutator(**{**config, **overrides})


def tiny_resmlp(**overrides) -> nn.Module:
    config = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=16, depth=2, init_scale=0.1)
    return allmlp.ResMLP(**{**config, **overrides})


def tiny_gmlp(**overrides) -> nn.Module:
    config = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=16, num_blocks=2, mlp_ratio=3)
    return allmlp.GMLP(**{**config, **overrides})


def tiny_gmixer(**overrides) -> nn.Module:
    config = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=16, num_blocks=2, mlp_ratio=[1.0, 4.0])
    return allmlp.GMixer(**{**config, **overrides})


def tiny_msmlp(**overrides) -> nn.Module:
    config = dict(
        img_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=10,
        depths=[1, 1, 1, 1],
        shift_size=5,
        shift_dist=[-2, -1, 0, 1, 2],
        mix_size=[[1, 3, 5, 7, 3], [3, 1, 5, 3, 7], [5, 3, 1, 3, 3], [3, 3, 3, 1, 1]],
        mlp_ratio=2,
        drop_path_rate=0.0,
    )
    return allmlp.MSMLP(**{**config, **overrides})


def tiny_convmlp(**overrides) -> nn.Module:
    config = dict(
        blocks=[1, 1, 1],
        dims=[8, 16, 24],
        mlp_ratios=[2, 2, 2],
        channels=8,
        n_conv_blocks=1,
        classifier_head=True,
        num_classes=10,
        drop_path_rate=0.0,
        global_pool="avg",
    )
    return allmlp.ConvMLP(**{**config, **overrides})


def tiny_asmlp(**overrides) -> nn.Module:
    config = dict(
        img_size=64,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        shift_size=3,
        mlp_ratio=2.0,
        num_classes=10,
        drop_path_rate=0.0,
    )
    return allmlp.ASMLP(**{**config, **overrides})


def tiny_swinmlp(**overrides) -> nn.Module:
    config = dict(
        img_size=32,  # an 8x8 grid in windows of 4 (the odd blocks shifted), then one 4x4 window (clamped)
        embed_dim=8,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        mlp_ratio=2.0,
        num_classes=10,
        drop_path_rate=0.0,
    )
    return allmlp.SwinMLP(**{**config, **overrides})


def tiny_activemlp(**overrides) -> nn.Module:
    config = dict(
        depths=[2, 2, 2, 2],
        embed_dims=[16, 32, 48, 64],
        mlp_ratios=[2, 2, 2, 2],
        share_dims=[2, 4, 4, 8],
        intv=2,
        num_classes=10,
        global_pool="avg",
    )
    return allmlp.ActiveMLP(**{**config, **overrides})


def tiny_repmlpnet(**overrides) -> nn.Module:
    config = dict(
        num_blocks=[1, 1, 1, 1],
        channels=[8, 16, 24, 32],
        hs=[4, 2, 2, 1],
        ws=[4, 2, 2, 1],
        sharesets_nums=[1, 2, 4, 8],
        reparam_conv_k=[1, 3],
        globalperceptron_reduce=1,
        num_class=10,
    )
    return allmlp.RepMLPNet(**{**config, **overrides})


# A recipe's model section: a 1-block Mixer for the grey 28x28 demo digits (tiny, for CLI and engine tests).
TINY_DEMO_MODEL = {
    "name": "mixer_s16_224",
    "img_size": 28,
    "in_chans": 1,
    "overrides": {"patch_size": 7, "hidden_dim": 8, "num_blocks": 1, "tokens_mlp_dim": 4, "channels_mlp_dim": 8},
}


def tiny_smlpnet(**overrides) -> nn.Module:
    config = dict(
        in_chans=3, dim=8, alpha=2, num_classes=10, patch_size=4, image_size=64, depths=[1, 1, 1, 1], dp_rate=0.0
    )
    return allmlp.SMLPNet(**{**config, **overrides})


def tiny_spach_ms(**overrides) -> nn.Module:
    config = dict(
        num_classes=10,
        img_size=64,
        hidden_dim=8,
        patch_size=4,
        net_arch=[[["pass", 1]], [["mlp", 1]], [["mlp", 1]], [["mlp", 1]]],
        token_ratio=0.5,
        channel_ratio=2.0,
    )
    return allmlp.SpachMS(**{**config, **overrides})


def tiny_spach(**overrides) -> nn.Module:
    config = dict(
        num_classes=10, img_size=32, hidden_dim=16, patch_size=8, net_arch=[["mlp", 2]], token_ratio=0.5,
        channel_ratio=2.0,
    )  # fmt: skip
    return allmlp.Spach(**{**config, **overrides})


def randomise_batchnorm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm running means and variances (eval-mode outputs then depend on them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def tiny_wavemlp(**overrides) -> nn.Module:
    config = dict(
        layers=[1, 1, 1, 1],
        embed_dims=[16, 32, 48, 64],
        transitions=[True] * 4,
        mlp_ratios=[2, 2, 2, 2],
        num_classes=10,
        norm_layer="batch",
        mode="fc",
        fork_feat=False,
        global_pool="avg",
    )
    return allmlp.WaveMLP(**{**config, **overrides})


def tiny_hiremlp(**overrides) -> nn.Module:
    config = dict(
        layers=[2, 1, 1, 1],  # two blocks: the second one shifts
        embed_dims=[16, 32, 48, 64],
        mlp_ratios=[2, 2, 2, 2],
        pixel=[4, 3, 3, 2],
        step_stride=[2, 2, 3, 2],
        step_dilation=[2, 2, 1, 1],
        num_classes=10,
        global_pool="avg",
    )
    return allmlp.HireMLP(**{**config, **overrides})
