"""SPACH-MLP as the authors compute it: parity of SpachMS and Spach with their forward (tests/reference/spach.py)
for both stems, shared spatial MLPs, 'pass' blocks and low-amplitude inputs; their keys, parameter counts and
released layout; export; clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import allmlp
from allmlp.models.spach import Spach, SpachMS
from allmlp.tools.convert import convert

from helpers import onnx_outputs, published_shapes, randomise, randomise_batchnorm_stats
from reference.spach import AUTHORS

KEYS = Path(__file__).parent / "data" / "keys"
VARIANTS = {  # registered name: (key file, parameters as the authors' code counts them)
    "spach_ms_mlp_xxs": ("spach_mlp_ms_xxs_keys.txt", 6_562_446),
    "spach_ms_mlp_xs": ("spach_mlp_ms_xs_keys.txt", 20_260_283),
    "spach_ms_mlp_s": ("spach_mlp_ms_s_keys.txt", 46_542_011),
    "spach_mlp_xxs": ("spach_mlp_xxs_keys.txt", 8_307_184),
    "spach_mlp_xs": ("spach_mlp_xs_keys.txt", 15_932_536),
    "spach_mlp_s": ("spach_mlp_s_keys.txt", 39_820_024),
}
MS = dict(
    num_classes=10,
    img_size=64,
    hidden_dim=8,
    patch_size=4,
    net_arch=[[["pass", 1]], [["mlp", 1], ["pass", 1]], [["pass", 1], ["mlp", 2]], [["mlp", 1]]],
    token_ratio=0.5,
    channel_ratio=2.0,
)
SINGLE = dict(
    num_classes=10,
    img_size=28,  # a 7x7 token grid: odd, and zero padding meets the border everywhere
    hidden_dim=12,
    patch_size=4,
    net_arch=[["mlp", 2], ["pass", 1], ["mlp", 1]],
    token_ratio=0.75,
    channel_ratio=1.5,
)
SHARED_MS = dict(MS, net_arch=[[["pass", 1]], [["mlp", 2]], [["mlp", 2]], [["mlp", 1]]], shared_spatial_func=True)
SHARED_SINGLE = dict(SINGLE, net_arch=[["mlp", 3]], shared_spatial_func=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' state dict, from its key list."""
    return published_shapes(KEYS / name)


def randomise_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (gamma_1 too, far from its 1e-4 start), BatchNorm running statistics too."""
    randomise(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma_1"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
    return randomise_batchnorm_stats(model, seed + 2)


def pair(cls: type, config: dict, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(allmlp's model, the authors') with the same random weights, loaded strictly."""
    torch.manual_seed(seed)
    ours = randomise_all(cls(**config), seed)
    theirs = AUTHORS[cls.__name__](**ours.config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_registered_variants_have_the_authors_keys_shapes_and_parameter_counts(name):
    key_file, params = VARIANTS[name]
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(state) == list(key_shapes(key_file))
    assert state == key_shapes(key_file)


CASES = [
    (SpachMS, MS),
    (SpachMS, dict(MS, stem_type="conv4")),
    (SpachMS, SHARED_MS),
    (SpachMS, dict(MS, net_arch=[[["pass", 1]], [["pass", 1]], [["pass", 2]], [["pass", 1]]])),
    (SpachMS, dict(MS, img_size=32, patch_size=2, stem_type="conv4", in_chans=1)),
    (Spach, SINGLE),
    (Spach, dict(SINGLE, stem_type="conv4")),
    (Spach, SHARED_SINGLE),
    (Spach, dict(SINGLE, net_arch=[["pass", 2]], num_classes=0)),
]
IDS = ["ms", "ms-conv4", "ms-shared", "ms-pass", "ms-conv4-grey", "single", "single-conv4", "single-shared",
       "single-pass-nohead"]  # fmt: skip


@pytest.mark.parametrize("cls, config", CASES, ids=IDS)
def test_forward_equals_the_authors_code(cls, config):
    ours, theirs = pair(cls, config)
    size = config["img_size"]
    x = torch.randn(2, config.get("in_chans", 3), size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        tokens = ours.forward_features(x).flatten(1, 2)  # (B, H, W, C) -> the authors' (B, N, C)
        torch.testing.assert_close(tokens, theirs.forward_features(x), atol=1e-5, rtol=1e-5)
        small = x * 1e-3  # low amplitude: the LayerNorms' eps (1e-6) matters
        torch.testing.assert_close(ours(small), theirs(small), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, config", [CASES[1], CASES[2], CASES[6]], ids=["ms-conv4", "ms-shared", "single-conv4"])
def test_train_mode_outputs_and_gradients_equal_the_authors(cls, config):
    ours, theirs = pair(cls, config)
    ours.train(), theirs.train()
    size = config["img_size"]
    x = torch.randn(3, 3, size, size)
    out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_shared_spatial_func_is_one_module_whose_keys_repeat_per_block():
    ours, _ = pair(Spach, SHARED_SINGLE)
    funcs = {id(block.spatial_func) for block in ours.blocks}
    assert len(funcs) == 1
    state = ours.state_dict()
    assert all(f"blocks.{i}.spatial_func.fc1.weight" in state for i in range(3))  # as in the authors' state dict
    ms, _ = pair(SpachMS, SHARED_MS)
    assert ms.layer2[1].spatial_func is ms.layer2[2].spatial_func
    assert ms.layer3[1].spatial_func is not ms.layer2[1].spatial_func


def test_pass_only_models_take_other_sizes_as_the_authors_blocks_would():
    """'pass' blocks hold nothing sized to the grid: any input large enough runs; the authors' blocks (built for
    that size, so that their stem's assertion passes) give the same, odd grids included."""
    config = dict(MS, net_arch=[[["pass", 1]], [["pass", 1]], [["pass", 1]], [["pass", 1]]])
    ours, _ = pair(SpachMS, config)
    assert ours.pretrained_cfg["fixed_input_size"] is False
    theirs = AUTHORS["SpachMS"](**dict(ours.config, img_size=60)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 60, 60)  # grids 15, 7, 3, 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert ours(torch.randn(1, 3, 32, 45)).shape == (1, 10)  # the smallest height: 8 patches of 4
    with pytest.raises(ValueError, match=r"SpachMS expects input of shape \(B, 3, H, W\) with H, W >= 32"):
        ours(torch.randn(1, 3, 31, 64))


def released_state_dict(key_file: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in key_shapes(key_file).items()}


def test_released_layout_loads_through_every_door(tmp_path):
    """spach_ms_mlp_xxs.pth as published ({"model": state_dict}): load_weights, create_model(weights=), `allmlp
    convert` (which recognises spach_ms_mlp_xxs from the names and shapes), and a fresh head for other classes."""
    state = released_state_dict("spach_mlp_ms_xxs_keys.txt")
    path = tmp_path / "spach_ms_mlp_xxs.pth"
    torch.save({"model": state}, path)
    loaded = [
        allmlp.load_weights(allmlp.create_model("spach_ms_mlp_xxs"), path),
        allmlp.create_model("spach_ms_mlp_xxs", weights=path),
        convert(path, tmp_path / "xxs.safetensors"),
        allmlp.create_model(tmp_path / "xxs.safetensors"),
    ]
    for model in loaded:
        own = model.state_dict()
        assert set(own) == set(state)
        assert all(torch.equal(own[key], value) for key, value in state.items())
    assert loaded[2].config == loaded[0].config
    fresh = allmlp.create_model("spach_ms_mlp_xxs", num_classes=5, weights=path)
    assert fresh.head.out_features == 5 and torch.count_nonzero(fresh.head.weight) == 0


def test_released_layout_of_a_small_model_gives_the_authors_outputs(tmp_path):
    _, theirs = pair(SpachMS, MS)
    randomise_all(theirs, seed=3).eval()
    torch.save({"model": theirs.state_dict()}, tmp_path / "small.pth")
    ours = allmlp.load_weights(SpachMS(**MS), tmp_path / "small.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spach_ms_mlp_s", "spach_mlp_s"])
def test_registered_models_at_224_equal_the_authors_code(name):
    torch.manual_seed(0)
    ours = randomise_all(allmlp.create_model(name)).eval()
    theirs = AUTHORS[type(ours).__name__](**ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_authors_initialisation_and_norms():
    model = SpachMS(**MS)
    blocks = [m for m in model.modules() if type(m).__name__ == "MixingBlock"]
    with_spatial = [b for b in blocks if b.spatial_func is not None]
    assert with_spatial and all(torch.all(b.gamma_1 == 1e-4) for b in with_spatial)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert all(m.eps == 1e-5 and m.num_groups == 1 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert all(b.norm1 is None and b.gamma_1 is None for b in blocks if b.spatial_func is None)


def test_interface():
    ms, _ = pair(SpachMS, MS)
    x = torch.randn(2, 3, 64, 64)
    features = ms.forward_features(x)
    assert features.shape == (2, 2, 2, 64) and features.is_contiguous()
    assert [info["reduction"] for info in ms.feature_info] == [4, 8, 16, 32]
    maps = ms.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    single, _ = pair(Spach, SINGLE)
    assert [info["module"] for info in single.feature_info] == [f"blocks.{i}" for i in range(4)]
    maps = single.forward_intermediates(torch.randn(2, 3, 28, 28), intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 12, 7, 7)] * 4
    backbone = allmlp.create_model("spach_ms_mlp_xxs", features_only=True)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(m.shape[1:]) for m in backbone(torch.randn(1, 3, 224, 224))] == [
        (64, 56, 56),
        (128, 28, 28),
        (256, 14, 14),
        (512, 7, 7),
    ]


def test_bfloat16_forward_is_close_to_float32():
    for cls, config in (CASES[0], CASES[5]):
        ours, _ = pair(cls, config)
        x = torch.randn(2, 3, config["img_size"], config["img_size"])
        with torch.no_grad():
            expected = ours(x)
            got = ours.to(torch.bfloat16)(x.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("cls, config", [CASES[1], CASES[7]], ids=["ms-conv4", "single-shared"])
def test_torch_export_runs_the_model(cls, config):
    from torch.export import Dim

    ours, _ = pair(cls, config)
    size = config["img_size"]
    x = torch.randn(2, 3, size, size)
    program = torch.export.export(ours, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    for batch in (1, 3):
        y = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(y), ours(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("cls, config", [CASES[0], CASES[6]], ids=["ms", "single-conv4"])
def test_onnx_export_reproduces_pytorch(tmp_path, cls, config, dynamo):
    ours, _ = pair(cls, config)
    x = torch.randn(2, 3, config["img_size"], config["img_size"])
    with torch.no_grad():
        expected = ours(x).numpy()
    np.testing.assert_allclose(onnx_outputs(ours, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


def test_safetensors_round_trip(tmp_path):
    for cls, config in (CASES[2], CASES[6]):
        ours, _ = pair(cls, dict(config, drop_path_rate=0.1, global_pool=""))
        path = allmlp.save_weights(ours, tmp_path / "spach.safetensors")
        again = allmlp.create_model(path).eval()
        assert type(again) is cls and again.config == ours.config
        x = torch.randn(1, 3, config["img_size"], config["img_size"])
        with torch.no_grad():
            assert torch.equal(again(x), ours(x))


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (SpachMS, dict(net_arch=[[["pass", 1]], [["attn", 1]], [["mlp", 1]], [["mlp", 1]]]),
         r"net_arch\[1\]: mixer must be 'mlp' or 'pass', got 'attn' \(self-attention is not an MLP mixer"),
        (Spach, dict(net_arch=[["conv", 2]]), r"got 'conv' \(a convolution is not an MLP mixer"),
        (Spach, dict(net_arch=[["mlpp", 2]]), r"mixer must be 'mlp' or 'pass', got 'mlpp'"),
        (Spach, dict(net_arch=[["mlp", 0]]), r"the depth of 'mlp' must be a positive int, got 0"),
        (SpachMS, dict(net_arch=[[["mlp", 1]]] * 3), r"net_arch must be 4 stage lists"),
        (SpachMS, dict(shared_spatial_func=True, net_arch=[[["mlp", 1]], [["mlp", 1]], [["mlp", 1]], [["mlp", 1]]]),
         r"shared_spatial_func: the first stage must be 'pass' blocks"),
        (SpachMS, dict(shared_spatial_func=True),
         r"shared_spatial_func needs one 'mlp' entry per stage after the first .* in stage 2"),
        (Spach, dict(shared_spatial_func=True), r"shared_spatial_func needs net_arch to be one 'mlp' entry"),
        (SpachMS, dict(img_size=60),
         r"no input fits: the 'mlp' blocks of stage 2 are sized for 56 tokens .* a 7x7 grid there"),
        (SpachMS, dict(img_size=(64, 64)), r"img_size must be a positive int \(SPACH takes square inputs\)"),
        (SpachMS, dict(stem_type="conv3"), r"stem_type must be 'conv1' or 'conv4', got 'conv3'"),
        (Spach, dict(stem_type="conv4", patch_size=1), r"'conv4' needs patch_size >= 2"),
        (Spach, dict(stem_type="conv4", img_size=27), r"stage 1 are sized for 36 tokens .* gives a 7x7 grid"),
        (Spach, dict(token_ratio=0.0), r"token_ratio must be a number in \(0.0, inf\)"),
        (Spach, dict(drop_path_rate=1.0), r"drop_path_rate must be a number in \[0.0, 1.0\)"),
        (Spach, dict(num_heads=0), "num_heads must be a positive int"),
        (Spach, dict(num_classes=-1), "num_classes must be an int >= 0"),
    ],
)  # fmt: skip
def test_bad_configs(cls, overrides, message):
    base = MS if cls is SpachMS else SINGLE
    with pytest.raises(ValueError, match=message):
        cls(**{**base, **overrides})


def test_inputs_of_another_size_are_clear_errors():
    ms, _ = pair(SpachMS, MS)
    with pytest.raises(ValueError, match=r"SpachMS expects input of shape \(B, 3, 64, 64\): its token-mixing MLPs .*"
                       r"got \(2, 3, 64, 65\)"):  # fmt: skip
        ms(torch.randn(2, 3, 64, 65))
    single, _ = pair(Spach, SINGLE)
    with pytest.raises(ValueError, match=r"Spach expects input of shape \(B, 3, 28, 28\).* got \(1, 1, 28, 28\)"):
        single(torch.randn(1, 1, 28, 28))


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    for cls, config in (CASES[1], CASES[5]):
        ours, _ = pair(cls, dict(config, drop_path_rate=0.2))
        ours.train()
        x = torch.randn(2, 3, config["img_size"], config["img_size"])
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        torch.manual_seed(1)
        expected_out = ours(x)
        expected_out.square().sum().backward()
        expected = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        ours.load_state_dict(state)
        ours.set_grad_checkpointing(True)
        torch.manual_seed(1)
        out = ours(x)
        torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
        out.square().sum().backward()
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], atol=0, rtol=0, msg=name)
