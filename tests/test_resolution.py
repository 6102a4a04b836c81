"""adapt_resolution: the paper's block-diagonal init (App. C) is exact; resampling is a sane approximation."""

import pytest
import torch
import torch.nn.functional as F
import yaml

import allmlp
from allmlp.tools.resolution import load_weights_adapted

BASE = (16, 24)  # non-square on purpose: a 4 x 6 token grid with 4-pixel patches


def tiny_mixer(img_size=BASE, num_classes=5, seed=0) -> allmlp.MlpMixer:
    torch.manual_seed(seed)
    model = allmlp.MlpMixer(
        img_size=img_size,
        patch_size=4,
        num_classes=num_classes,
        hidden_dim=16,
        num_blocks=2,
        tokens_mlp_dim=8,
        channels_mlp_dim=32,
    ).eval()
    with torch.no_grad():  # non-zero everything, head and biases included, so nothing can hide behind a zero
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def parts(x: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
    height, width = size
    rows, cols = x.shape[2] // height, x.shape[3] // width
    return [
        x[:, :, i * height : (i + 1) * height, j * width : (j + 1) * width] for i in range(rows) for j in range(cols)
    ]


@pytest.mark.parametrize(
    "factors",
    [(2, 2), (3, 3), (2, 3), (1, 2), (3, 1)],
    ids=["K=2", "K=3", "2x3", "1x2", "3x1"],
)
def test_block_diagonal_logits_are_the_mean_over_parts(factors):
    model = tiny_mixer()
    size = (BASE[0] * factors[0], BASE[1] * factors[1])
    adapted = allmlp.adapt_resolution(model, size)
    assert adapted.img_size == size
    assert adapted.config["tokens_mlp_dim"] == 8 * factors[0] * factors[1]
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected = torch.stack([model(part) for part in parts(x, BASE)]).mean(0)
        got = adapted(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_block_diagonal_structure_of_the_token_weights():
    model = tiny_mixer()
    adapted = allmlp.adapt_resolution(model, (32, 48))
    w1 = adapted.blocks[0].mlp_tokens.fc1.weight  # (4 D_S, 4 S)
    assert w1.shape == (32, 96)
    grid = w1[:8].reshape(8, 8, 12)  # the first part's hidden units, over the full 8 x 12 token grid
    assert torch.equal(grid[:, :4, :6].reshape(8, 24), model.blocks[0].mlp_tokens.fc1.weight)
    assert grid[:, 4:].abs().sum() == 0 and grid[:, :, 6:].abs().sum() == 0
    torch.testing.assert_close(adapted.blocks[0].mlp_tokens.fc1.bias, model.blocks[0].mlp_tokens.fc1.bias.repeat(4))


def test_input_model_is_untouched_and_shares_no_storage():
    model = tiny_mixer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = dict(model.config)
    adapted = allmlp.adapt_resolution(model, (32, 48))
    with torch.no_grad():
        for param in adapted.parameters():
            param.add_(1.0)
    assert model.config == config and model.img_size == BASE
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_keeps_dtype_device_mode_and_nothing_on_meta():
    model = tiny_mixer().to(torch.bfloat16).train()
    model.set_grad_checkpointing()
    adapted = allmlp.adapt_resolution(model, (32, 48))
    tensors = list(adapted.parameters()) + list(adapted.buffers())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    assert all(p.requires_grad for p in adapted.parameters())
    assert adapted.training and adapted.grad_checkpointing
    out = adapted(torch.randn(2, 3, 32, 48, dtype=torch.bfloat16))
    out.sum().backward()
    assert adapted.blocks[0].mlp_tokens.fc1.weight.grad is not None


def test_same_size_is_an_independent_copy():
    model = tiny_mixer()
    copy = allmlp.adapt_resolution(model, BASE)
    assert copy is not model
    x = torch.randn(2, 3, *BASE)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


@pytest.mark.parametrize("size", [(20, 28), (12, 20), (40, 24)])
def test_resample_other_sizes_shapes(size):
    model = tiny_mixer()
    adapted = allmlp.adapt_resolution(model, size)
    grid = (size[0] // 4, size[1] // 4)
    tokens = grid[0] * grid[1]
    block = adapted.blocks[1].mlp_tokens
    assert block.fc1.weight.shape == (8, tokens) and block.fc2.weight.shape == (tokens, 8)
    assert block.fc2.bias.shape == (tokens,)
    assert adapted.config["tokens_mlp_dim"] == 8
    out = adapted(torch.randn(2, 3, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_resample_approximates_the_token_mlp_on_smooth_inputs():
    """On a smooth map over the token grid, the resampled token MLP ~ the original one, resampled.

    Without the S / S' scaling of W1 the pre-activations would be off by S'/S - 1 (56% here).
    """
    model = tiny_mixer(img_size=32)  # 8 x 8 tokens
    adapted = allmlp.adapt_resolution(model, 48)  # 12 x 12, a factor of 1.5
    torch.manual_seed(1)
    smooth = F.interpolate(torch.randn(32, 1, 3, 3), size=(8, 8), mode="bilinear", align_corners=False)
    upsampled = F.interpolate(smooth, size=(12, 12), mode="bilinear", align_corners=False)
    old, new = model.blocks[0].mlp_tokens, adapted.blocks[0].mlp_tokens
    with torch.no_grad():
        hidden_old, hidden_new = old.fc1(smooth.flatten(1)), new.fc1(upsampled.flatten(1))
        out_old = F.interpolate(old(smooth.flatten(1)).reshape(-1, 1, 8, 8), size=(12, 12), mode="bilinear")
        out_new = new(upsampled.flatten(1))
    assert (hidden_new - hidden_old).norm() / hidden_old.norm() < 0.3
    assert (out_new - out_old.flatten(1)).norm() / out_old.norm() < 0.3


def test_forced_methods():
    model = tiny_mixer()
    resampled = allmlp.adapt_resolution(model, (32, 48), method="resample")
    assert resampled.config["tokens_mlp_dim"] == 8
    with pytest.raises(ValueError, match="integer multiple"):
        allmlp.adapt_resolution(model, (20, 28), method="block_diagonal")
    with pytest.raises(ValueError, match="method must be one of"):
        allmlp.adapt_resolution(model, (32, 48), method="nearest")


def test_bad_inputs():
    model = tiny_mixer()
    with pytest.raises(ValueError, match="divisible by the model's patch_size"):
        allmlp.adapt_resolution(model, 30)
    with pytest.raises(ValueError, match="positive int"):
        allmlp.adapt_resolution(model, 0)
    with pytest.raises(ValueError, match="MlpMixer"):
        allmlp.adapt_resolution(torch.nn.Linear(2, 2), 32)


def test_registry_model_roundtrip_through_safetensors(tmp_path):
    model = allmlp.create_model("mixer_s32_224", num_classes=3, hidden_dim=16, num_blocks=1, channels_mlp_dim=16)
    adapted = allmlp.adapt_resolution(model, 448)
    assert adapted.num_tokens == 4 * model.num_tokens
    path = allmlp.save_weights(adapted, tmp_path / "m448.safetensors")
    rebuilt = allmlp.create_model(path)
    assert rebuilt.img_size == (448, 448) and rebuilt.config["tokens_mlp_dim"] == 4 * 256


def test_load_weights_adapted_fine_tunes_at_another_size(tmp_path):
    small = tiny_mixer(img_size=16, num_classes=5)
    path = allmlp.save_weights(small, tmp_path / "m16.safetensors")
    for source in (path, small.state_dict()):  # the file records its size; a bare state dict has a square grid
        model = allmlp.MlpMixer(**{**small.config, "img_size": 32})
        adapted = load_weights_adapted(model, source)
        assert adapted.img_size == (32, 32) and adapted.config["tokens_mlp_dim"] == 4 * 8
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = torch.stack([small(part) for part in parts(x, (16, 16))]).mean(0)
            torch.testing.assert_close(adapted.eval()(x), expected, atol=1e-5, rtol=1e-5)

    new_head = load_weights_adapted(allmlp.MlpMixer(**{**small.config, "img_size": 24, "num_classes": 3}), path,
                                    reset_head=True)  # fmt: skip
    assert new_head.num_tokens == 36 and new_head.head.weight.shape == (3, 16) and new_head.head.weight.abs().sum() == 0
    same = allmlp.MlpMixer(**small.config)
    assert load_weights_adapted(same, path) is same

    # evaluating a model fine-tuned at 32: the checkpoint's D_S (4 x 8) differs from the entry's, S does not
    tuned = allmlp.save_weights(allmlp.adapt_resolution(small, 32), tmp_path / "m32.safetensors")
    rebuilt = load_weights_adapted(allmlp.MlpMixer(**{**small.config, "img_size": 32}), tuned)
    assert rebuilt.config["tokens_mlp_dim"] == 32
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), allmlp.create_model(tuned).eval()(x))


def test_load_weights_adapted_non_square_state_dict_and_other_models():
    wide = tiny_mixer()  # 4 x 6 tokens, saved without its config
    with pytest.raises(ValueError, match="24 tokens, not a square grid"):
        load_weights_adapted(tiny_mixer(img_size=32), wide.state_dict())
    linear = torch.nn.Linear(2, 2)
    assert load_weights_adapted(linear, torch.nn.Linear(2, 2).state_dict()) is linear


def test_finetune_engine_adapts_mixer_weights_of_another_size(tmp_path):
    from allmlp.train import load_config
    from allmlp.train.engine import build_model

    dims = dict(patch_size=7, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=32)
    small = allmlp.MlpMixer(img_size=14, in_chans=1, num_classes=10, **dims)
    path = allmlp.save_weights(small, tmp_path / "m14.safetensors")
    recipe = {"model": {"name": "mixer_s16_224", "img_size": 28, "in_chans": 1, "weights": path, "overrides": dims}}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(recipe))
    model = build_model(load_config(str(tmp_path / "finetune.yaml")), num_classes=3, new_head=True)
    assert model.img_size == (28, 28) and model.config["tokens_mlp_dim"] == 4 * 8 and model.num_classes == 3
    torch.testing.assert_close(model.stem.proj.weight, small.stem.proj.weight)
