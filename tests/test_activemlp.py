"""ActiveMLP as the authors compute it: the sampling against deform_conv2d, the forward against the authors'
formulation (tests/reference/activemlp.py), their released checkpoints, sizes, bf16 and export."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d

import allmlp
from allmlp.models.activemlp import CONFIGS, ATMOp, sample_along
from allmlp.tools.convert import convert

from helpers import onnx_outputs, published_shapes, randomise
from reference.activemlp import AuthorsActiveMLP

KEYS = Path(__file__).parent / "data" / "keys"
KEY_FILES = {"xt": "xT", "t": "T", "s": "S", "b": "B", "l": "L"}
PUBLISHED_PARAMS = {
    "activemlp_xt": 15_349_128,
    "activemlp_t": 27_152_232,
    "activemlp_s": 38_631_448,
    "activemlp_b": 52_154_792,
    "activemlp_l": 76_238_032,
}

# Small models that keep every quirk: several offset-making blocks per stage (intv 1, 2, 3), a last block that
# would make offsets by the interval but does not, offsets shared by 1..8 channels, and a share_dim that divides 2C
# but not C (a shared offset straddles the width and height halves).
SMALL = dict(depths=[3, 5, 2, 4], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 3, 2, 2], share_dims=[1, 4, 2, 8], intv=2)
SMALL_CONFIGS = {
    "intv2": SMALL,
    "intv1_straddle": dict(
        depths=[2, 3, 2, 2], embed_dims=[8, 12, 24, 32], mlp_ratios=[2] * 4, share_dims=[2, 8, 3, 8], intv=1
    ),
    "intv3_two_stages": dict(depths=[7, 2], embed_dims=[12, 16], mlp_ratios=[2, 2], share_dims=[8, 4], intv=3),
}


def key_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' model, from its key list."""
    return published_shapes(KEYS / f"activemlp_{KEY_FILES[variant]}_keys.txt")


def wide_offsets(model: nn.Module, scale: float = 20.0) -> nn.Module:
    """Offsets of tens of pixels, positive and negative: most samples fall between pixels, many beyond the border."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".offset_layer.1." in name:
                p.mul_(scale)
    return model


def pair(config: dict, seed: int = 0, offset_scale: float = 20.0) -> tuple[allmlp.ActiveMLP, nn.Module]:
    """(allmlp's model, the authors' formulation) with the same random weights (the authors' loads ours strictly)."""
    torch.manual_seed(seed)
    ours = wide_offsets(randomise(allmlp.ActiveMLP(**config, num_classes=10), seed), offset_scale).eval()
    theirs = AuthorsActiveMLP(**ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


# ----------------------------------------------------------------------------------------------------------------
# The sampling


def deform_sampled(x: torch.Tensor, offset: torch.Tensor, dim: int) -> torch.Tensor:
    """What the authors' ATMOp samples: deform_conv2d, 1x1 identity kernel, the offsets of each channel (shared by
    C // G consecutive channels) in its dx (width) or dy (height) slot, zeros in the other. NHWC in and out."""
    channels = x.shape[-1]
    full = offset.repeat_interleave(channels // offset.shape[-1], dim=-1).permute(0, 3, 1, 2)
    slots = torch.zeros(x.shape[0], 2 * channels, x.shape[1], x.shape[2], dtype=x.dtype)
    slots[:, (1 if dim == 2 else 0) :: 2] = full
    identity = torch.eye(channels, dtype=x.dtype)[:, :, None, None]
    return deform_conv2d(x.permute(0, 3, 1, 2), slots, identity).permute(0, 2, 3, 1)


@pytest.mark.parametrize("dim", [1, 2], ids=["height", "width"])
@pytest.mark.parametrize(
    "shape, groups", [((2, 7, 9, 6), 3), ((1, 5, 3, 8), 2), ((2, 13, 11, 4), 4), ((1, 1, 6, 3), 1)]
)
@pytest.mark.parametrize("scale", [0.5, 3.0, 40.0])
def test_sampling_equals_deform_conv2d(dim, shape, groups, scale):
    """Fractional offsets, small and far beyond the border on both sides: the same values as deform_conv2d (and
    bit-identical on x86 CPUs: same positions, weights and products), the same gradients for x and the offsets."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    offset = (torch.randn(*shape[:3], groups) * scale).requires_grad_()
    got, expected = sample_along(x, offset, dim), deform_sampled(x, offset, dim)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    probe = torch.randn(shape)
    grads = torch.autograd.grad((got * probe).sum(), (x, offset))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, offset))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_sampling_at_integer_and_border_positions():
    """Integer offsets move pixels exactly; a position at -1 or at the size (and anything beyond) reads zero."""
    x = torch.arange(1.0, 6.0).view(1, 1, 5, 1)  # width 5, values 1..5
    cases = {0.0: [1, 2, 3, 4, 5], 1.0: [2, 3, 4, 5, 0], -2.0: [0, 0, 1, 2, 3], 0.5: [1.5, 2.5, 3.5, 4.5, 2.5]}
    for shift, expected in cases.items():
        offset = torch.full((1, 1, 5, 1), shift)
        assert sample_along(x, offset, 2).flatten().tolist() == expected
        assert torch.equal(sample_along(x, offset, 2), deform_sampled(x, offset, 2))
    edges = torch.tensor([-1.0, -1.0 - 1, 5.0 - 2, 1e6, -1e6]).view(1, 1, 5, 1)  # positions -1, -1, 5, far, far
    assert sample_along(x, edges, 2).flatten().tolist() == [0, 0, 0, 0, 0]


def test_nan_offsets_give_nan_not_an_index_error():
    x = torch.randn(1, 4, 4, 2)
    offset = torch.full((1, 4, 4, 2), float("nan"))
    assert sample_along(x, offset, 1).isnan().all()


def test_sampling_keeps_float32_positions_in_bfloat16():
    """bfloat16 cannot hold 50.3 (its neighbours are 50 and 50.5): positions are formed in float32."""
    x = torch.randn(1, 1, 64, 4)
    offset = torch.full((1, 1, 64, 4), 0.3)
    expected = sample_along(x, offset, 2)
    got = sample_along(x.bfloat16(), offset.bfloat16(), 2)
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)


def test_atm_op_is_its_linear_map_with_the_authors_parameters():
    op = ATMOp(6, 5)
    assert op.weight.shape == (5, 6, 1, 1) and op.bias.shape == (5,)
    assert torch.count_nonzero(op.bias) == 0 and 0.01 < op.weight.std() < 0.03
    x = torch.randn(2, 3, 4, 6)
    expected = nn.functional.conv2d(x.permute(0, 3, 1, 2), op.weight, op.bias).permute(0, 2, 3, 1)
    torch.testing.assert_close(op(x), expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The forward against the authors'


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize("size", [(37, 45), (29, 19), (3, 3)])
@pytest.mark.parametrize("amplitude", [1.0, 1e-3])
def test_forward_equals_the_authors(name, size, amplitude):
    ours, theirs = pair(SMALL_CONFIGS[name])
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)) * amplitude
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.train(), theirs.train()  # no dropout in ActiveMLP: training mode computes the same (drop path 0)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_authors():
    ours, theirs = pair(SMALL_CONFIGS["intv1_straddle"])
    x = torch.randn(2, 3, 33, 27, generator=torch.Generator().manual_seed(2))
    for model in (ours, theirs):
        model.train()
        model(x).square().sum().backward()
    expected = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def authors_stage_maps(theirs: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The authors' stage outputs before downsampling (the inputs of each stage's downsample and of the final
    norm), as their segmentation backbone takes them; NCHW."""
    seen = []
    hooks = [
        stage[-1].downsample.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for stage in theirs.blocks[:-1]
    ]
    hooks.append(theirs.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0])))
    with torch.no_grad():
        theirs(x)
    for hook in hooks:
        hook.remove()
    maps = [m.permute(0, 3, 1, 2) for m in seen[:-1]]
    height, width = maps[-1].shape[2:]
    final = seen[-1].reshape(x.shape[0], -(-height // 2), -(-width // 2), -1)  # (B, N, C) before the final norm
    return maps + [final.permute(0, 3, 1, 2)]


def test_features_are_the_stages_outputs_before_downsampling_at_strides_4_to_32():
    # offsets of a few pixels: the un-normalised stage maps are larger than the logits, and wider offsets scale up
    # the rounding differences of the offsets themselves
    ours, theirs = pair(SMALL, offset_scale=4.0)
    x = torch.randn(2, 3, 61, 75, generator=torch.Generator().manual_seed(3))
    features = allmlp.create_model("activemlp_xt", features_only=True, **{**SMALL, "num_classes": 10})
    wanted = features.model.state_dict()  # no head, no final norm
    features.model.load_state_dict({k: v for k, v in ours.state_dict().items() if k in wanted})
    features.eval()
    with torch.no_grad():
        maps = features(x)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 15, 19), (16, 8, 10), (24, 4, 5), (32, 2, 3)]
    for got, expected in zip(maps, authors_stage_maps(theirs, x), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert features.model.blocks[-1][-1].downsample is None  # nothing after the last wanted output is kept


# ----------------------------------------------------------------------------------------------------------------
# Registered variants and the released files


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_and_keys_equal_the_authors_models(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert own == key_shapes(name.removeprefix("activemlp_"))
    assert not list(model.buffers())  # no derived state: the authors' models have no buffers either


def released_checkpoint(variant: str, path: Path) -> tuple[dict, dict]:
    """A file in the layout of the authors' releases (their utils.save_checkpoint): `model` and `model_ema` (other
    random values under every published key), optimizer, scheduler, scaler, acc_max, epoch and the argparse
    Namespace of their command line. Returns (model, model_ema) state dicts."""
    generator = torch.Generator().manual_seed(7)
    shapes = key_shapes(variant)
    trained = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
    averaged = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
    args = argparse.Namespace(model="ActivexTiny", drop_path_rate=0.1, lr=1e-3, model_ema=True, input_size=224)
    torch.save(
        {
            "model": trained,
            "model_ema": averaged,
            "optimizer": {"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
            "lr_scheduler": {"t_initial": 300, "base_values": [1e-3], "t_in_epochs": True},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "acc_max": 79.7,
            "epoch": 299,
            "args": args,
        },
        path,
    )
    return trained, averaged


@pytest.mark.parametrize(
    "variant", ["xt", pytest.param("t", marks=pytest.mark.slow), pytest.param("l", marks=pytest.mark.slow)]
)
def test_released_checkpoint_loads_its_ema_weights(tmp_path, variant):
    path = tmp_path / f"activemlp_{variant}.pth"
    _, averaged = released_checkpoint(variant, path)
    name = f"activemlp_{variant}"
    loaded = allmlp.create_model(name, weights=path).eval()
    again = allmlp.load_weights(allmlp.create_model(name), path).eval()
    converted = convert(path, tmp_path / f"{name}.safetensors").eval()  # recognised by names and shapes alone
    assert converted.config == loaded.config
    for model in (loaded, again, converted, allmlp.create_model(tmp_path / f"{name}.safetensors")):
        own = model.state_dict()
        assert all(torch.equal(own[key], value) for key, value in averaged.items())
    theirs = AuthorsActiveMLP(**CONFIGS[variant], num_classes=1000).eval()
    theirs.load_state_dict(averaged, strict=True)
    x = torch.randn(1, 3, 71, 57, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_registry_entries():
    assert allmlp.list_models("activemlp_*") == sorted(PUBLISHED_PARAMS)
    for name in PUBLISHED_PARAMS:
        entry = allmlp.get_entry(name)
        assert entry.preprocessing.crop_pct == 0.875 and entry.preprocessing.interpolation == "bicubic"
        tops = {release.tag: release.top1 for release in entry.releases}
        assert tops == (
            {"imagenet1k": {"xt": 79.7, "t": 82.0, "l": 83.8}[name[10:]]} if name[10:] in "xt t l".split() else {}
        )
    release = allmlp.get_entry("activemlp_l").releases[0]
    assert release.page == "https://drive.google.com/file/d/1aIEnq_5-oS8jiLr2W8ryLabmzHTmR3J0/view" and not release.url


# ----------------------------------------------------------------------------------------------------------------
# Sizes, dtypes, export


def small_model(**overrides) -> allmlp.ActiveMLP:
    torch.manual_seed(0)
    return wide_offsets(randomise(allmlp.ActiveMLP(**{**SMALL, "num_classes": 10, **overrides}))).eval()


def test_bfloat16_forward_is_close_to_float32():
    model = small_model()
    x = torch.randn(2, 3, 45, 45, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.15, rtol=0.05)


def test_exported_program_reproduces_pytorch():
    from torch.export import Dim

    model = small_model(**SMALL_CONFIGS["intv3_two_stages"])
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(6))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=8)},))
    for batch in (1, 3):
        with torch.no_grad():
            torch.testing.assert_close(
                program.module()(x[:1].repeat(batch, 1, 1, 1)), model(x[:1].repeat(batch, 1, 1, 1))
            )


@pytest.mark.slow
def test_one_exported_program_takes_every_size_from_3x3():
    """Nothing in the sampling depends on the grid being larger than 1x1: one program covers 3x3 to 256x256."""
    from torch.export import Dim
    from torch.fx.experimental import _config as fx_config

    model = small_model(**SMALL_CONFIGS["intv3_two_stages"])
    dynamic = {0: Dim("batch", min=1, max=8), 2: Dim("height", min=3, max=256), 3: Dim("width", min=3, max=256)}
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(model, (torch.randn(2, 3, 64, 48),), dynamic_shapes=(dynamic,))
    for shape in [(1, 3, 3, 3), (2, 3, 37, 45), (3, 3, 97, 50)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    """Both exporters: the sampling is Gather / Floor / Clip (deform_conv2d has no ONNX op)."""
    model = small_model(**SMALL_CONFIGS["intv3_two_stages"])
    x = torch.randn(2, 3, 29, 38, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


def test_any_input_size_from_3x3():
    model = small_model()
    for size in [(3, 3), (3, 40), (17, 5), (224, 161)]:
        with torch.no_grad():
            assert model(torch.randn(1, 3, *size)).shape == (1, 10)
    with pytest.raises(
        ValueError, match=r"ActiveMLP expects input of shape \(B, 3, H, W\) with any H, W >= 3, got \(1, 3, 2, 9\)"
    ):
        model(torch.randn(1, 3, 2, 9))
    with pytest.raises(ValueError, match=r"got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# Errors, round trip, interface


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depths=[2, 1, 2, 2]), r"depths must be a non-empty list of block counts >= 2 .* got \[2, 1, 2, 2\]"),
        (dict(embed_dims=[8, 16]), r"embed_dims needs one entry per stage \(4 stages\), got \[8, 16\]"),
        (
            dict(share_dims=[1, 3, 2, 8]),
            r"share_dims\[1\] must be a positive int that divides 2 \* embed_dims\[1\] = 32",
        ),
        (dict(intv=0), r"intv \(blocks between new offsets\) must be a positive int, got 0"),
        (dict(mlp_ratios=[2, 0, 2, 2]), r"mlp_ratios must be positive numbers"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(num_classes=-1), r"num_classes must be an int >= 0"),
        (dict(global_pool="max"), r"global_pool must be 'avg'"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.ActiveMLP(**{**SMALL, **overrides})


def test_safetensors_round_trip(tmp_path):
    model = small_model(drop_path_rate=0.1)
    path = allmlp.save_weights(model, tmp_path / "active.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.ActiveMLP and again.config == model.config
    x = torch.randn(1, 3, 40, 33)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = small_model(drop_path_rate=0.3).train()  # stochastic depth too: recomputation replays its draws
    x = torch.randn(2, 3, 41, 39)
    results = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain, atol=0, rtol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=0, rtol=0, msg=name)


def test_authors_initialisation_and_numerics():
    model = allmlp.ActiveMLP(**SMALL)
    atm = model.blocks[1][0].atm
    assert torch.count_nonzero(atm.atm_h.bias) == 0 and 0.01 < atm.atm_w.weight.std() < 0.03
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert model.blocks[0][0].mlp.act.approximate == "none"
    peg = model.pos_blocks[1].proj
    assert torch.count_nonzero(peg.bias) == 0 and abs(peg.weight.std().item() - (2 / 9) ** 0.5) < 0.15
    assert model.no_weight_decay() == {"pos_blocks.0.proj.weight", "pos_blocks.0.proj.bias", "pos_blocks.1.proj.weight",
                                       "pos_blocks.1.proj.bias", "pos_blocks.2.proj.weight", "pos_blocks.2.proj.bias",
                                       "pos_blocks.3.proj.weight", "pos_blocks.3.proj.bias"}  # fmt: skip
    # offset-making blocks: every intv blocks, never a stage's last; the authors' keys say which
    makers = [[j for j, block in enumerate(stage) if block.offset_layer is not None] for stage in model.blocks]
    assert makers == [[0], [0, 2], [0], [0, 2]]
    assert [stage[-1].downsample is not None for stage in model.blocks] == [True, True, True, False]


def test_recipe_holds_the_authors_settings():
    from allmlp.train.config import load_config

    cfg = load_config("activemlp_xt_i1k")
    assert cfg.model.name == "activemlp_xt" and cfg.model.drop_path_rate == 0.1
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.lr * 512 / cfg.train.batch_size) == ("adamw", 0.05, 5e-4)
    assert cfg.train.ema_decay == 0.99996 and cfg.train.label_smoothing == 0.1 and cfg.train.epochs == 300
    assert (cfg.schedule.warmup_epochs, cfg.schedule.warmup_start_lr, cfg.schedule.end_lr) == (5, 1e-6, 1e-5)
    d = cfg.data
    assert (d.mixup_alpha, d.cutmix_alpha, d.random_erasing, d.crop_pct) == (0.8, 1.0, 0.25, 0.875)
