"""MS-MLP as the authors compute it: parity with their forward (tests/reference/msmlp.py), their released
configurations and checkpoints, export, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import allmlp
from allmlp.models.msmlp import CONFIGS, ENTRIES, chunk_sizes
from allmlp.tools.convert import convert

from helpers import assert_checkpointing_changes_nothing, fake_yacs_module, onnx_outputs, published_shapes, randomise
from reference.msmlp import AUTHORS, AuthorsMSMLP

KEYS = Path(__file__).parent / "data" / "keys"
PUBLISHED_PARAMS = {"msmlp_t": 28_656_232, "msmlp_s": 50_303_752, "msmlp_b": 88_696_792}
KEY_FILES = {"msmlp_t": "msmlp_T_keys.txt", "msmlp_s": "msmlp_S_keys.txt", "msmlp_b": "msmlp_B_keys.txt"}

SMALL = dict(
    patch_size=4,
    num_classes=7,
    embed_dim=10,
    depths=[1, 2, 1, 1],
    shift_size=5,
    shift_dist=[-2, -1, 0, 1, 2],
    mix_size=[[1, 1, 3, 5, 7], [1, 3, 3, 5, 7], [1, 5, 5, 5, 7], [1, 7, 7, 7, 7]],  # the released pattern
    mlp_ratio=2.0,
    drop_path_rate=0.0,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' model, from its key list."""
    return published_shapes(KEYS / KEY_FILES[name])


def pair_of_models(config: dict, seed: int = 0) -> tuple[allmlp.MSMLP, nn.Module]:
    """allmlp's model with random weights everywhere (biases, gamma, norms, head) and the authors' with the same."""
    torch.manual_seed(seed)
    ours = randomise(allmlp.MSMLP(**config), seed)
    reference = AUTHORS["MSMLP"](**config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


# ----------------------------------------------------------------------------------------------------------------
# The authors' forward


PARITY = [
    # 4 stages, the released mix sizes, odd sizes: every stage floors and the last grid (2x2) is smaller than
    # the largest kernel
    (SMALL, (67, 99)),
    # uneven torch.chunk groups (13 channels: 3, 3, 3, 3, 1; 26: 6, 6, 6, 6, 2; 52: 11, 11, 11, 11, 8), shifts
    # larger than the later grids (they wrap more than once), no stem norm
    (
        dict(
            SMALL,
            embed_dim=13,
            depths=[1, 1, 1],
            shift_dist=[3, -5, 0, 7, -1],
            patch_norm=False,
            mix_size=[[3, 1, 7, 5, 3], [5, 5, 1, 3, 7], [1, 3, 3, 1, 5]],
        ),
        (45, 61),
    ),  # fmt: skip
    # 3 groups, patch 3, non-square img_size, hidden width int(2.5 * C)
    (
        dict(
            SMALL,
            embed_dim=9,
            depths=[2, 1],
            shift_size=3,
            shift_dist=[-1, 0, 4],
            mix_size=[[3, 1, 5], [7, 3, 1]],
            patch_size=3,
            mlp_ratio=2.5,
        ),
        (31, 20),
    ),  # fmt: skip
    # 4 groups, no zero shift, the smallest input of a 4-stage model (1x1 last grid)
    (dict(SMALL, embed_dim=8, shift_size=4, shift_dist=[2, -2, 1, -3], mix_size=[[1, 3, 5, 3]] * 4), (32, 35)),
]


@pytest.mark.parametrize("config, size", PARITY)
@pytest.mark.parametrize("amplitude", [1.0, 1e-3])
def test_forward_equals_the_authors_code(config, size, amplitude):
    ours, reference = pair_of_models(dict(config, img_size=size))
    ours.eval(), reference.eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)) * amplitude
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
        pooled = ours.forward_head(ours.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, reference.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config, size", PARITY[:2])
def test_train_mode_and_gradients_equal_the_authors_code(config, size):
    """Drop rates 0: training mode is deterministic, outputs and every parameter's gradient agree."""
    ours, reference = pair_of_models(dict(config, img_size=size))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    out, expected = ours.train()(x), reference.train()(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_the_shift_wraps_around_and_comes_before_the_mixing():
    """One group of one channel, shift +1, 3x3 mixing that reads only the left neighbour: the output at column 0
    is the input's column 0 (rolled from the right edge to column 1, read back by the conv), so the roll came
    first and wrapped; a zero-filling shift or mixing before shifting would give something else."""
    block = allmlp.MSMLP(img_size=8, patch_size=1, embed_dim=1, depths=[1], shift_size=1, shift_dist=[1],
                         mix_size=[[3]], num_classes=0).layers[0].blocks[0]  # fmt: skip
    with torch.no_grad():
        for conv in (block.dwconv_lr[0], block.dwconv_td[0]):
            conv.weight.zero_()
            conv.bias.zero_()
        block.dwconv_lr[0].weight[0, 0, 1, 2] = 1.0  # output (i, j) reads the rolled map at (i, j + 1)
    x = torch.arange(12.0).reshape(1, 3, 4, 1)  # (B, H, W, C)
    captured = {}
    block.norm.register_forward_hook(lambda m, args, out: captured.update(mixed=args[0]))
    block(x)
    # rolled by +1 along the width: column j holds x[:, j - 1]; reading j + 1 gives x[:, j] back, except the last
    # column, which reads the zero padding
    expected = x.clone()
    expected[:, :, -1] = 0
    torch.testing.assert_close(captured["mixed"], expected)


def test_chunk_sizes_are_torch_chunk():
    for channels in range(1, 60):
        for groups in range(1, 9):
            expected = [c.shape[0] for c in torch.chunk(torch.zeros(channels), groups)]
            assert chunk_sizes(channels, groups) == expected, (channels, groups)


# ----------------------------------------------------------------------------------------------------------------
# Registered variants, released configurations and files


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_are_the_authors_models(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == key_shapes(name)
    assert list(model.buffers()) == []


def test_registry_holds_the_released_configurations():
    """configs/msmlp_{tiny,small,base}_patch4_shift5_224.yaml: their mix sizes, not the class default."""
    released = [[1, 1, 3, 5, 7], [1, 3, 3, 5, 7], [1, 5, 5, 5, 7], [1, 7, 7, 7, 7]]
    assert all(config["mix_size"] == released for config in CONFIGS.values())
    assert allmlp.MSMLP(num_classes=0).config["mix_size"] == [[1, 1, 3, 5, 7], [1, 1, 3, 5, 5], [1, 1, 3, 3, 3],
                                                              [1, 1, 1, 1, 3]]  # fmt: skip
    assert [(CONFIGS[v]["embed_dim"], CONFIGS[v]["depths"]) for v in "tsb"] == [
        (96, [3, 3, 9, 3]),
        (96, [3, 3, 27, 3]),
        (128, [3, 3, 27, 3]),
    ]
    assert [e.name for e in ENTRIES] == ["msmlp_t", "msmlp_s", "msmlp_b"]
    for entry, (size, top1) in zip(ENTRIES, [("tiny", 82.1), ("small", 83.4), ("base", 83.8)], strict=True):
        (release,) = entry.releases
        assert release.top1 == top1 and release.num_classes == 1000
        assert release.url.endswith(f"/msmlp_{size}_patch4/msmlp_{size}_patch4_ckpt_epoch299.pth")
        assert release.url.startswith("https://tsciencescu.blob.core.windows.net/")
        p = entry.preprocessing
        assert (p.interpolation, p.crop_pct, p.mean, p.std) == (
            "bicubic",
            0.875,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
        )


def released_checkpoint(name: str, path: Path, monkeypatch, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file laid out as the authors' save_checkpoint writes it (Swin's utils.py): the weights under "model", the
    optimizer and scheduler state, accuracy, epoch, apex's amp state and the yacs config."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in key_shapes(name).items()}
    for key in state_dict:
        if key.endswith("norm.weight"):
            state_dict[key] += 1.0
    CfgNode = fake_yacs_module(monkeypatch)
    msmlp = CfgNode({"EMBED_DIM": 96, "DEPTHS": [3, 3, 9, 3], "SHIFT_SIZE": 5, "MIX_SIZE": CONFIGS["t"]["mix_size"]})
    config = CfgNode(
        {
            "MODEL": CfgNode({"TYPE": "ms_mlp", "NAME": "ms_mlp_tiny_patch4_shift5_224", "MSMLP": msmlp}),
            "TRAIN": CfgNode({"BASE_LR": 1e-3, "OPTIMIZER": CfgNode({"BETAS": (0.9, 0.999)})}),
            "AMP_OPT_LEVEL": "O1",
        }
    )
    optimizer = {
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
        "param_groups": [{"lr": 5e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "params": [0]}],
    }
    scheduler = {"t_initial": 375300, "warmup_t": 25020, "base_values": [1e-3, 1e-3], "noise_range_t": None}
    torch.save(
        {
            "model": state_dict,
            "optimizer": optimizer,
            "lr_scheduler": scheduler,
            "max_accuracy": 82.1,
            "epoch": 299,
            "config": config,
            "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 1000}},
        },
        path,
    )
    monkeypatch.delitem(__import__("sys").modules, "yacs.config")  # reading needs no yacs
    monkeypatch.delitem(__import__("sys").modules, "yacs")
    return state_dict


def test_released_tiny_file_loads_every_way(tmp_path, monkeypatch):
    path = tmp_path / "msmlp_tiny_patch4_ckpt_epoch299.pth"
    state_dict = released_checkpoint("msmlp_t", path, monkeypatch)
    reference = AuthorsMSMLP(**CONFIGS["t"], num_classes=1000).eval()
    reference.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x)

    loaded = allmlp.load_weights(allmlp.create_model("msmlp_t"), path).eval()
    created = allmlp.create_model("msmlp_t", weights=path).eval()
    converted = convert(path, tmp_path / "msmlp_t.safetensors")  # the variant recognised by names and shapes
    assert converted.config == created.config
    again = allmlp.create_model(tmp_path / "msmlp_t.safetensors").eval()
    for model in (loaded, created, again):
        for key, value in state_dict.items():
            assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(created(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["msmlp_s", "msmlp_b"])
def test_released_small_and_base_files_are_recognised(tmp_path, monkeypatch, name):
    path = tmp_path / f"{name}.pth"
    state_dict = released_checkpoint(name, path, monkeypatch)
    converted = convert(path, tmp_path / f"{name}.safetensors")
    assert converted.config == allmlp.create_model(name, device="meta").config
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in state_dict.items())


def test_patch_norm_false_drops_only_the_stem_norm():
    """The authors pass their norm layer to every stage transition regardless of patch_norm."""
    keys = set(allmlp.MSMLP(**SMALL, img_size=64, patch_norm=False).state_dict())
    assert "patch_embed.norm.weight" not in keys
    assert {f"layers.{i}.downsample.norm.weight" for i in range(3)} <= keys
    assert "layers.3.downsample.proj.weight" not in keys


def test_authors_init():
    model = allmlp.MSMLP(**SMALL, img_size=64)
    block = model.layers[1].blocks[1]
    assert torch.equal(block.gamma, torch.full((20,), 1e-6))
    assert 0.015 < model.layers[0].blocks[0].pwconv1.weight.std() < 0.025
    assert torch.count_nonzero(block.pwconv2.bias) == 0
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert (
        sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 1 + 5 + 3 + 1
    )  # stem, blocks, transitions, final
    assert block.act.approximate == "none"
    assert [conv.kernel_size for conv in block.dwconv_td] == [(1, 1), (3, 3), (3, 3), (5, 5), (7, 7)]
    assert [conv.padding for conv in block.dwconv_lr] == [(0, 0), (1, 1), (1, 1), (2, 2), (3, 3)]


# ----------------------------------------------------------------------------------------------------------------
# Interface


def test_interface_and_input_sizes():
    model, reference = pair_of_models(dict(SMALL, img_size=64))
    model.eval()
    x = torch.randn(2, 3, 77, 45)
    features = model.forward_features(x)
    assert features.shape == (2, 2, 1, 80)  # (B, H, W, C) as the last stage gives them, not normalised
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, model.norm(features.mean((1, 2))))
    assert torch.equal(model(x), model.forward_head(features))
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and not model.pretrained_cfg["fixed_input_size"]
    # any size from 32 (4 * 2 ** 3) up works; the authors' model built for that size agrees (their assert aside)
    for size in ((32, 32), (33, 47), (130, 70)):
        other = AuthorsMSMLP(**dict(SMALL, img_size=size)).eval()
        other.load_state_dict(model.state_dict())
        y = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(y), other(y), atol=1e-5, rtol=1e-5)
    for bad in ((2, 3, 31, 64), (2, 3, 64, 20), (2, 1, 64, 64), (3, 64, 64)):
        with pytest.raises(ValueError, match=r"MSMLP expects input of shape \(B, 3, H, W\) with H >= 32 and W >= 32"):
            model(torch.randn(bad))


def test_features_only_gives_strides_4_to_32():
    features = allmlp.create_model("msmlp_t", depths=[1, 1, 1, 1], features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [96, 192, 384, 768]
    assert features.feature_info.module_name() == [f"layers.{i}.blocks" for i in range(4)]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    two = allmlp.create_model("msmlp_t", depths=[1, 1, 1, 1], features_only=True, out_indices=(0, 1))
    assert not hasattr(two.model, "head") or not isinstance(two.model.head, nn.Linear)
    assert len(two.model.layers) == 2 and isinstance(two.model.layers[1].downsample, nn.Identity)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model, _ = pair_of_models(dict(SMALL, img_size=64, drop_path_rate=0.3))
    assert_checkpointing_changes_nothing(model.train(), torch.randn(2, 3, 64, 70))


def test_safetensors_round_trip(tmp_path):
    model, _ = pair_of_models(dict(PARITY[2][0], img_size=(31, 20), global_pool=""))
    model.eval()
    path = allmlp.save_weights(model, tmp_path / "msmlp.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.MSMLP and again.config == model.config
    x = torch.randn(1, 3, 31, 20)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ----------------------------------------------------------------------------------------------------------------
# Precision and export


def test_bfloat16_forward_is_close_to_float32():
    model, _ = pair_of_models(dict(SMALL, img_size=64))
    model.eval()
    x = torch.randn(2, 3, 67, 99)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


EXPORTED = dict(PARITY[1][0], img_size=(45, 61))  # shifts beyond the later grids: the roll must wrap exactly


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    model, _ = pair_of_models(EXPORTED)
    model.eval()
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


def test_exported_program_reproduces_pytorch():
    model, _ = pair_of_models(EXPORTED)
    model.eval()
    x = torch.randn(2, 3, 45, 61)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    for n in (1, 2, 5):
        y = torch.randn(n, 3, 45, 61)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(y), model(y), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(embed_dim=6),
            r"stage 0: torch.chunk splits its 6 channels into 3 groups \[2, 2, 2\], but the block "
            r"needs exactly shift_size=5",
        ),  # fmt: skip
        (dict(embed_dim=12), r"stage 0: torch.chunk splits its 12 channels into 4 groups"),
        (dict(shift_dist=[-1, 0, 1]), r"shift_dist needs one int shift per group \(shift_size=5\), got \[-1, 0, 1\]"),
        (dict(mix_size=[[1, 1, 3, 5, 7]] * 3), r"mix_size needs one list per stage \(4 stages\)"),
        (dict(mix_size=[[1, 1, 3, 5, 7]] * 3 + [[1, 1, 4, 1, 1]]), r"mix_size\[3\] needs one odd kernel size"),
        (dict(mix_size=[[1, 1, 3, 5]] * 4), r"mix_size\[0\] needs one odd kernel size per group \(shift_size=5"),
        (dict(shift_size=0), r"shift_size \(the number of channel groups\) must be a positive int, got 0"),
        (dict(depths=[]), r"depths must be a non-empty list of block counts >= 1, got \[\]"),
        (dict(img_size=28), r"img_size must be at least patch_size \* 2 \*\* \(stages - 1\) = 32x32 .*got 28"),
        (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\), got 1.0"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\), got -0.1"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(global_pool="max"), "global_pool must be 'avg'"),
        (dict(mlp_ratio=0), "mlp_ratio must be positive"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.MSMLP(**{**SMALL, "img_size": 64, **overrides})


def test_a_file_of_another_variant_is_a_clear_error(tmp_path):
    small = allmlp.MSMLP(**{**SMALL, "num_classes": 1000}, img_size=64)
    with pytest.raises(allmlp.WeightsError, match=r"weights do not fit MSMLP:\n  mis-shaped"):
        allmlp.load_weights(allmlp.create_model("msmlp_t", depths=[1, 2, 1, 1]), small.state_dict())
