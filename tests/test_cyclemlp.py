"""CycleMLP as the authors compute it: Cycle FC vs deform_conv2d, the authors' forward, their checkpoints, export."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d

import allmlp
from allmlp.models.cyclemlp import CycleFC, cycle_shift, cycle_shifts
from allmlp.tools.convert import convert
from allmlp.weights.authors import cycle_offsets

from helpers import AuthorsMlp, assert_checkpointing_changes_nothing, onnx_outputs, published_shapes, randomise

KEYS_B1 = Path(__file__).parent / "data" / "official_cyclemlp_b1_keys.txt"

PUBLISHED_PARAMS = {
    "cyclemlp_b1": 15_155_400,
    "cyclemlp_b2": 26_802_504,
    "cyclemlp_b3": 38_385_720,
    "cyclemlp_b4": 51_796_552,
    "cyclemlp_b5": 75_747_280,
}

SMALL = dict(layers=[1, 1, 2, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 3, 2], transitions=[True] * 4)


# The authors' cycle_mlp.py (ShoufaChen/CycleMLP), re-written from its description without allmlp: Cycle FC by
# deform_conv2d on NCHW with the offset buffer, tokens permuted around every convolution, the fusion in their order.
class AuthorsCycleFC(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1) * 0.1)
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1)
        offset = torch.empty(1, in_channels * 2, 1, 1)
        start_idx = (kernel_size[0] * kernel_size[1]) // 2
        for i in range(in_channels):
            if kernel_size[0] == 1:
                offset[0, 2 * i + 0, 0, 0] = 0
                offset[0, 2 * i + 1, 0, 0] = (i + start_idx) % kernel_size[1] - (kernel_size[1] // 2)
            else:
                offset[0, 2 * i + 0, 0, 0] = (i + start_idx) % kernel_size[0] - (kernel_size[0] // 2)
                offset[0, 2 * i + 1, 0, 0] = 0
        self.register_buffer("offset", offset)

    def forward(self, x):
        batch, _, height, width = x.size()
        return deform_conv2d(x, self.offset.expand(batch, -1, height, width), self.weight, self.bias)


class AuthorsCycleMixer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        self.sfc_h = AuthorsCycleFC(dim, dim, (1, 3))
        self.sfc_w = AuthorsCycleFC(dim, dim, (3, 1))
        self.reweight = AuthorsMlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        h = self.sfc_h(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        w = self.sfc_w(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        c = self.mlp_c(x)
        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        x = h * a[0] + w * a[1] + c * a[2]
        return self.proj(x)


class AuthorsBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, skip_lam):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = AuthorsCycleMixer(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = AuthorsMlp(dim, int(dim * mlp_ratio))
        self.skip_lam = skip_lam

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) / self.skip_lam
        return x + self.mlp(self.norm2(x)) / self.skip_lam


class AuthorsDownsample(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class AuthorsPatchEmbed(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=7, stride=4, padding=2)


class AuthorsCycleNet(nn.Module):
    def __init__(self, layers, embed_dims, mlp_ratios, transitions, num_classes=10, skip_lam=1.0, fork_feat=False):
        super().__init__()
        self.fork_feat = fork_feat
        self.patch_embed = AuthorsPatchEmbed(embed_dims[0])
        network = []
        for i in range(len(layers)):
            network.append(
                nn.Sequential(*(AuthorsBlock(embed_dims[i], mlp_ratios[i], skip_lam) for _ in range(layers[i])))
            )
            if i >= len(layers) - 1:
                break
            if transitions[i] or embed_dims[i] != embed_dims[i + 1]:
                network.append(AuthorsDownsample(embed_dims[i], embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        if fork_feat:
            self.out_indices = [0, 2, 4, 6]
            for i_emb, i_layer in enumerate(self.out_indices):
                self.add_module(f"norm{i_layer}", nn.LayerNorm(embed_dims[i_emb]))
        else:
            self.norm = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        outs = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if self.fork_feat and idx in self.out_indices:
                outs.append(getattr(self, f"norm{idx}")(x).permute(0, 3, 1, 2).contiguous())
        if self.fork_feat:
            return outs
        B, H, W, C = x.shape
        x = self.norm(x.reshape(B, -1, C))
        return self.head(x.mean(1))


def small_model(**overrides) -> allmlp.CycleMLP:
    torch.manual_seed(0)
    return randomise(allmlp.CycleMLP(**{**SMALL, "num_classes": 10, **overrides})).eval()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_authors_models(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}  # offsets derived, not stored


def test_cycle_offset_pattern():
    assert cycle_shifts(7, 3) == [0, 1, -1, 0, 1, -1, 0]
    assert cycle_shifts(9, 7) == [0, 1, 2, 3, -3, -2, -1, 0, 1]
    # sfc_h (1x3) moves along the width (dx, the second of each pair), sfc_w (3x1) along the height.
    assert cycle_offsets(4, (1, 3)).flatten().tolist() == [0, 0, 0, 1, 0, -1, 0, 0]
    assert cycle_offsets(4, (3, 1)).flatten().tolist() == [0, 0, 1, 0, -1, 0, 0, 0]
    assert torch.equal(cycle_offsets(10, (1, 3)), AuthorsCycleFC(10, 4, (1, 3)).offset)
    assert torch.equal(cycle_offsets(10, (5, 1)), AuthorsCycleFC(10, 4, (5, 1)).offset)


@pytest.mark.parametrize("kernel_size", [(1, 3), (3, 1), (1, 7), (5, 1)])
@pytest.mark.parametrize("shape", [(2, 11, 9, 6), (1, 5, 2, 3), (3, 16, 7, 13)])
def test_cycle_fc_equals_deform_conv2d(kernel_size, shape):
    """Same values as deform_conv2d with the authors' offsets, on odd sizes, grids smaller than the kernel and
    fewer channels than the kernel has taps; the shifted values themselves are bit-identical."""
    batch, channels, height, width = shape
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    offsets = cycle_offsets(channels, kernel_size).expand(batch, -1, height, width)

    identity = torch.eye(channels)[:, :, None, None]
    moved = deform_conv2d(x, offsets, identity, torch.zeros(channels))
    shifted = cycle_shift(x.permute(0, 2, 3, 1), kernel_size, channels)
    assert torch.equal(shifted.permute(0, 3, 1, 2), moved)

    fc = CycleFC(channels, 4, kernel_size)
    with torch.no_grad():
        fc.weight.normal_()
        fc.bias.normal_()
    expected = deform_conv2d(x, offsets, fc.weight, fc.bias)
    got = fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    grad_expected = torch.autograd.grad(expected.square().sum(), x)[0]
    grad_got = torch.autograd.grad(got.square().sum(), x)[0]
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-5, rtol=1e-5)


def test_cycle_fc_rejects_a_real_kernel():
    with pytest.raises(ValueError, match=r"1 x k or k x 1 pseudo-kernel, got \(3, 3\)"):
        CycleFC(8, 8, (3, 3))


def load_authors(model: allmlp.CycleMLP, reference: nn.Module) -> allmlp.CycleMLP:
    """The reference's state dict, offsets included, through allmlp.load_weights (which checks and drops them)."""
    state_dict = reference.state_dict()
    assert any(key.endswith("sfc_h.offset") for key in state_dict)
    return allmlp.load_weights(model, state_dict)


@pytest.mark.parametrize(
    "config, size",
    [
        (SMALL, (37, 45)),  # odd sizes: zero padding and the shifts meet the border on every stage
        (dict(SMALL, skip_lam=2.0), (64, 64)),
        # no transition and equal widths after stage 1: no module is inserted, the indices shift
        (
            dict(
                layers=[1, 1, 1, 1],
                embed_dims=[8, 16, 16, 24],
                mlp_ratios=[2] * 4,
                transitions=[True, False, True, True],
            ),
            (33, 50),
        ),
    ],
)
def test_forward_equals_the_authors_code(config, size):
    torch.manual_seed(0)
    reference = randomise(AuthorsCycleNet(**config)).eval()
    model = load_authors(allmlp.CycleMLP(**config, num_classes=10), reference).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_fork_feat_returns_the_authors_normalised_maps():
    torch.manual_seed(0)
    reference = randomise(AuthorsCycleNet(**SMALL, fork_feat=True)).eval()
    model = load_authors(allmlp.CycleMLP(**SMALL, fork_feat=True), reference).eval()
    x = torch.randn(2, 3, 61, 75)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert [tuple(m.shape) for m in got] == [(2, 8, 15, 19), (2, 16, 8, 10), (2, 24, 4, 5), (2, 32, 2, 3)]
    for g, e in zip(got, expected, strict=True):
        assert g.is_contiguous()
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert model.num_classes == 0 and isinstance(model.head, nn.Identity) and isinstance(model.norm, nn.Identity)
    with pytest.raises(ValueError, match="fork_feat=True"):
        model.reset_classifier(3)


def test_b1_pyramid_at_224():
    with torch.device("meta"):
        model = allmlp.create_model("cyclemlp_b1", fork_feat=True)
        maps = model(torch.empty(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 56, 56), (128, 28, 28), (320, 14, 14), (512, 7, 7)]
    assert [name for name, _ in model.named_children() if re.fullmatch(r"norm\d+", name)] == [
        "norm0",
        "norm2",
        "norm4",
        "norm6",
    ]


def published_state_dict(path: Path = KEYS_B1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every key of the published B1 checkpoint, with its shapes; the offsets as released."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in published_shapes(path).items():
        if key.endswith(".offset"):
            kernel = (1, 3) if ".sfc_h." in key else (3, 1)
            state_dict[key] = cycle_offsets(shape[1] // 2, kernel)
        else:
            state_dict[key] = torch.randn(shape, generator=generator)
    return state_dict


@pytest.mark.parametrize("wrapped", [False, True])
def test_published_b1_checkpoint_lands_key_by_key(tmp_path, wrapped):
    state_dict = published_state_dict()
    assert len(state_dict) == 222
    path = tmp_path / "cyclemlp_b1.pth"
    torch.save({"model": state_dict, "epoch": 299, "args": {"lr": 5e-4}} if wrapped else state_dict, path)
    model = allmlp.create_model("cyclemlp_b1", weights=path)
    own = model.state_dict()
    weights = {k: v for k, v in state_dict.items() if not k.endswith(".offset")}
    assert set(own) == set(weights) and len(own) == 222 - 20  # two offset buffers in each of the 10 blocks
    for key, value in weights.items():
        assert torch.equal(own[key], value), key
    if wrapped:  # `allmlp convert` recognises the variant from the names and shapes alone
        converted = convert(path, tmp_path / "b1.safetensors")
        assert converted.config == model.config
        again = allmlp.create_model(tmp_path / "b1.safetensors")
        assert all(torch.equal(again.state_dict()[key], value) for key, value in weights.items())


def test_published_layout_without_offsets_loads_too():
    state_dict = {k: v for k, v in published_state_dict().items() if not k.endswith(".offset")}
    model = allmlp.load_weights(allmlp.create_model("cyclemlp_b1"), state_dict)
    assert torch.equal(model.network[4][1].attn.sfc_w.weight, state_dict["network.4.1.attn.sfc_w.weight"])


def test_wrong_offsets_or_missing_keys_are_clear_errors():
    reference = AuthorsCycleNet(**SMALL)
    state_dict = reference.state_dict()
    bad = dict(state_dict)
    bad["network.2.0.attn.sfc_w.offset"] = cycle_offsets(16, (1, 3))  # the width pattern on the height layer
    with pytest.raises(allmlp.WeightsError, match=r"network\.2\.0\.attn\.sfc_w\.offset: offsets differ .* 3x1"):
        allmlp.load_weights(allmlp.CycleMLP(**SMALL, num_classes=10), bad)
    missing = {k: v for k, v in state_dict.items() if k != "network.4.1.attn.proj.weight"}
    with pytest.raises(allmlp.WeightsError, match=r"missing \(1\): network\.4\.1\.attn\.proj\.weight"):
        allmlp.load_weights(allmlp.CycleMLP(**SMALL, num_classes=10), missing)
    shapeless = dict(state_dict, **{"network.0.0.attn.sfc_h.offset": torch.zeros(16)})
    with pytest.raises(allmlp.WeightsError, match=r"has shape \(1, 2 \* C, 1, 1\), got \(16,\)"):
        allmlp.load_weights(allmlp.CycleMLP(**SMALL, num_classes=10), shapeless)


def test_safetensors_round_trip(tmp_path):
    model = small_model(fork_feat=True, drop_path_rate=0.1)
    path = allmlp.save_weights(model, tmp_path / "cycle.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.CycleMLP and again.config == model.config and again.fork_feat
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for a, b in zip(again(x), model(x), strict=True):
            assert torch.equal(a, b)


def test_interface():
    model = small_model()
    x = torch.randn(2, 3, 50, 35)
    features = model.forward_features(x)
    assert features.shape == (2, 2, 2, 32)  # (B, H, W, C) after the final norm
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features) == (2, 32)
    assert torch.equal(model(x), model.forward_head(features))
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.config["num_classes"] == 3
    assert torch.count_nonzero(model.get_classifier().weight) == 0
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    with pytest.raises(ValueError, match=r"CycleMLP expects input of shape \(B, 3, H, W\).*got \(2, 1, 50, 35\)"):
        model(torch.randn(2, 1, 50, 35))


def test_authors_init():
    model = allmlp.CycleMLP(**SMALL)
    fc = model.network[2][0].attn.sfc_h
    assert torch.count_nonzero(fc.bias) == 0 and 0.015 < fc.weight.std() < 0.025
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert model.network[0][0].mlp.act.approximate == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(transitions=[True, False, True, True]), r"stage 1 changes the width \(16 -> 24\) without a transition"),
        (dict(mlp_ratios=[2, 2]), r"mlp_ratios needs one entry per stage \(4 stages\)"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.CycleMLP(**{**SMALL, **overrides})


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = small_model(drop_path_rate=0.3).train()  # stochastic depth too: recomputation replays its draws
    assert_checkpointing_changes_nothing(model, torch.randn(2, 3, 41, 39))


def test_bfloat16_forward_is_close_to_float32():
    model = small_model()
    x = torch.randn(2, 3, 45, 45)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    """Both exporters: deform_conv2d has no ONNX op, the shift-and-linear Cycle FC exports with either."""
    model = small_model(layers=[1, 1], embed_dims=[8, 16], mlp_ratios=[2, 2], transitions=[True, True])
    x = torch.randn(2, 3, 29, 38)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


def test_shift_has_no_wraparound():
    x = torch.ones(1, 2, 4, 3)  # (B, H, W, C): channels 1 and 2 move by +1 and -1 along the axis
    along_width = cycle_shift(x, (1, 3), 3)
    assert along_width[0, 0, :, 0].tolist() == [1, 1, 1, 1]
    assert along_width[0, 0, :, 1].tolist() == [1, 1, 1, 0]
    assert along_width[0, 0, :, 2].tolist() == [0, 1, 1, 1]
    along_height = cycle_shift(x, (3, 1), 3)
    assert along_height[0, :, 0, :].tolist() == [[1, 1, 0], [1, 0, 1]]


def test_convert_recognises_a_dense_prediction_backbone_and_refuses_unknown_shapes(tmp_path):
    backbone = allmlp.create_model("cyclemlp_b1", fork_feat=True)
    torch.save({"model": backbone.state_dict()}, tmp_path / "b1_feat.pth")
    converted = convert(tmp_path / "b1_feat.pth", tmp_path / "b1_feat.safetensors")
    assert converted.config == backbone.config and converted.fork_feat
    torch.save(AuthorsCycleNet(**SMALL).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="match no registered model .*pass --model NAME"):
        convert(tmp_path / "small.pth", tmp_path / "small.safetensors")
