"""Vision Permutator as the authors compute it: their forward and index layouts, checkpoints, sizes, export."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import allmlp
from allmlp.cli import main

from helpers import AuthorsMlp, onnx_outputs, published_shapes, randomise

KEYS_S7 = Path(__file__).parent / "data" / "official_vip_s7_keys.txt"

PUBLISHED_PARAMS = {"vip_s7": 25_114_984, "vip_m7": 55_272_488, "vip_l7": 87_784_936}

# ViP-S/7 in miniature: patch 4 on 32x32 images gives the 8x8 grid of stage 1, a transition halves it to 4x4.
SMALL = dict(
    layers=[1, 1, 2, 1],
    patch_size=4,
    embed_dims=[16, 32, 32, 32],
    transitions=[True, False, False, False],
    segment_dim=[8, 4, 4, 4],
    mlp_ratios=[3, 3, 3, 3],
)
# ViP-M/7 in miniature: no module after stage 1, so the transition sits at network.2.
SMALL_M = dict(
    layers=[1, 2, 1, 1],
    patch_size=4,
    embed_dims=[16, 16, 32, 32],
    transitions=[False, True, False, False],
    segment_dim=[8, 8, 4, 4],
    mlp_ratios=[3, 3, 3, 3],
)


# The authors' models/vip.py (houqb/VisionPermutator), re-written from its description without allmlp: the
# permute/reshape Weighted Permute-MLP, the fusion in their order, permutes around every convolution.
class AuthorsWeightedPermuteMLP(nn.Module):
    def __init__(self, dim, segment_dim, qkv_bias):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_h = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_w = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = AuthorsMlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        S = C // self.segment_dim
        h = x.reshape(B, H, W, self.segment_dim, S).permute(0, 3, 2, 1, 4).reshape(B, self.segment_dim, W, H * S)
        h = self.mlp_h(h).reshape(B, self.segment_dim, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H, W, C)
        w = x.reshape(B, H, W, self.segment_dim, S).permute(0, 1, 3, 2, 4).reshape(B, H, self.segment_dim, W * S)
        w = self.mlp_w(w).reshape(B, H, self.segment_dim, W, S).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)
        c = self.mlp_c(x)
        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class AuthorsBlock(nn.Module):
    def __init__(self, dim, segment_dim, mlp_ratio, skip_lam, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = AuthorsWeightedPermuteMLP(dim, segment_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = AuthorsMlp(dim, int(dim * mlp_ratio))
        self.skip_lam = skip_lam

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) / self.skip_lam
        return x + self.mlp(self.norm2(x)) / self.skip_lam


class AuthorsConv(nn.Module):
    """Their PatchEmbed and Downsample: a conv with kernel = stride = patch_size, under `proj`."""

    def __init__(self, in_dim, out_dim, patch_size, tokens_in):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=patch_size, stride=patch_size)
        self.tokens_in = tokens_in

    def forward(self, x):
        if self.tokens_in:
            return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(x).permute(0, 2, 3, 1)


class AuthorsVisionPermutator(nn.Module):
    def __init__(
        self, layers, patch_size, embed_dims, transitions, segment_dim, mlp_ratios, skip_lam=1.0, qkv_bias=False
    ):
        super().__init__()
        self.patch_embed = AuthorsConv(3, embed_dims[0], patch_size, tokens_in=False)
        network = []
        for i in range(len(layers)):
            network.append(
                nn.Sequential(
                    *(
                        AuthorsBlock(embed_dims[i], segment_dim[i], mlp_ratios[i], skip_lam, qkv_bias)
                        for _ in range(layers[i])
                    )
                )
            )
            if i >= len(layers) - 1:
                break
            if transitions[i] or embed_dims[i] != embed_dims[i + 1]:
                patch = 2 if transitions[i] else 1
                network.append(AuthorsConv(embed_dims[i], embed_dims[i + 1], patch, tokens_in=True))
        self.network = nn.ModuleList(network)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], 10)

    def forward(self, x):
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        B, H, W, C = x.shape
        x = self.norm(x.reshape(B, -1, C))
        return self.head(x.mean(1))


def small_model(config: dict = SMALL, **overrides) -> allmlp.VisionPermutator:
    torch.manual_seed(0)
    return randomise(allmlp.VisionPermutator(**{**config, "num_classes": 10, **overrides})).eval()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_authors_models(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_network_index_layouts_of_s7_and_m7():
    with torch.device("meta"):
        s7, m7 = allmlp.create_model("vip_s7"), allmlp.create_model("vip_m7")
    kinds = [[type(layer).__name__ for layer in model.network] for model in (s7, m7)]
    assert kinds[0] == ["Sequential", "Downsample", "Sequential", "Sequential", "Sequential"]
    assert kinds[1] == ["Sequential", "Sequential", "Downsample", "Sequential", "Sequential"]
    m7_keys = m7.state_dict()
    assert m7_keys["network.2.proj.weight"].shape == (512, 256, 2, 2)
    assert "network.1.2.attn.mlp_h.weight" in m7_keys and "network.4.2.mlp.fc2.bias" in m7_keys
    assert not any(key.startswith("network.1.proj") for key in m7_keys)


@pytest.mark.parametrize(
    "config, size",
    [
        (SMALL, 32),
        (SMALL, 35),  # the patch embedding floors: 32..35 all give the 8x8 grid, as in the authors' code
        (SMALL_M, 33),
        (dict(SMALL, skip_lam=2.0, qkv_bias=True), 34),
        # no transition but a new width: a 1x1 convolution is inserted
        (
            dict(
                layers=[1, 1],
                patch_size=4,
                embed_dims=[16, 24],
                transitions=[False, False],
                segment_dim=[8, 8],
                mlp_ratios=[2, 2],
            ),
            32,
        ),
    ],
)
def test_forward_equals_the_authors_code(config, size):
    torch.manual_seed(0)
    reference = randomise(AuthorsVisionPermutator(**config)).eval()
    model = allmlp.load_weights(allmlp.VisionPermutator(**config, num_classes=10), reference.state_dict()).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_sizes_the_model_cannot_take_are_a_clear_value_error():
    with torch.device("meta"):
        model = allmlp.create_model("vip_s7")
        assert model.accepted_input_sizes() == range(224, 231)
        model(torch.empty(1, 3, 230, 224))
        for shape in [(1, 3, 256, 256), (1, 3, 223, 224), (1, 3, 224, 231), (1, 1, 224, 224), (3, 224, 224)]:
            message = r"shape \(B, 3, 224, 224\) \(any height and width in 224\.\.230\).*32x32 token grid.*"
            message += re.escape(f"got {shape}")
            with pytest.raises(ValueError, match=message):
                model(torch.empty(shape))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(segment_dim=[8, 5, 4, 4]),
            r"stage 1: segment_dim must be a positive int that divides embed_dim 32, got 5",
        ),
        (dict(segment_dim=[8, 8, 4, 4]), r"stage 0 works on a 8x8 token grid, which gives 4x4 in stage 1.*needs 8x8"),
        (dict(layers=[1, 1, 1]), r"embed_dims needs one entry per stage \(3 stages\)"),
        (dict(patch_size=0), "patch_size must be a positive int"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.VisionPermutator(**{**SMALL, **overrides})


def published_state_dict(path: Path = KEYS_S7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every key of the published ViP-S/7 checkpoint, with its shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in published_shapes(path).items()}


@pytest.mark.parametrize("as_file", [False, True])
def test_published_s7_checkpoint_lands_key_by_key(tmp_path, as_file):
    state_dict = published_state_dict()
    assert len(state_dict) == 314
    source = state_dict
    if as_file:
        source = tmp_path / "vip_s7.pth"
        torch.save({"model": state_dict, "epoch": 309}, source)
    model = allmlp.create_model("vip_s7", weights=source)
    own = model.state_dict()
    assert set(own) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(own[key], value), key
    if as_file:  # `allmlp convert` tells S7 from M7 and L7 by the names and shapes alone
        assert main(["convert", str(source), str(tmp_path / "s7.safetensors")]) == 0
        again = allmlp.create_model(tmp_path / "s7.safetensors")
        assert again.config == model.config
        assert all(torch.equal(again.state_dict()[key], value) for key, value in state_dict.items())


def test_a_checkpoint_of_another_layout_is_a_clear_error():
    s7_weights = published_state_dict()
    with torch.device("meta"):
        m7 = allmlp.create_model("vip_m7")
    with pytest.raises(
        allmlp.WeightsError, match=r"unexpected \(\d+\): network\.1\.proj\.weight, network\.1\.proj\.bias"
    ):
        allmlp.load_weights(m7, s7_weights)
    del s7_weights["network.3.2.attn.mlp_w.weight"]
    with pytest.raises(allmlp.WeightsError, match=r"missing \(1\): network\.3\.2\.attn\.mlp_w\.weight"):
        allmlp.load_weights(allmlp.create_model("vip_s7"), s7_weights)


def test_safetensors_round_trip(tmp_path):
    model = small_model(SMALL_M, drop_path_rate=0.1)
    path = allmlp.save_weights(model, tmp_path / "vip.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.VisionPermutator and again.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_interface_and_init():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 4, 4, 32)  # (B, H, W, C) after the final norm
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features) == (2, 32)
    assert torch.equal(model(x), model.forward_head(features))
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and torch.count_nonzero(model.get_classifier().weight) == 0
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    fresh = allmlp.VisionPermutator(**SMALL)
    assert all(m.eps == 1e-5 for m in fresh.modules() if isinstance(m, nn.LayerNorm))
    assert 0.015 < fresh.network[0][0].attn.mlp_h.weight.std() < 0.025
    assert torch.count_nonzero(fresh.network[0][0].attn.proj.bias) == 0


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = small_model(drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 32, 32)
    runs = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=0, rtol=0)
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, atol=0, rtol=0, msg=name)


def test_bfloat16_forward_is_close_to_float32():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    model = small_model(SMALL_M)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_outputs(model, x, tmp_path / "vip.onnx", dynamo)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
