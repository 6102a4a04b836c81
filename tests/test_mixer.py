"""MLP-Mixer as the paper and the reference code define it: configs, numerics, interface, bad input."""

import math

import pytest
import torch

import allmlp
from allmlp.models.mixer import MlpMixer

TINY = dict(
    img_size=32, patch_size=8, num_classes=10, hidden_dim=32, num_blocks=3, tokens_mlp_dim=16, channels_mlp_dim=64
)

PAPER_PARAMS = {
    "mixer_s32_224": 19_104_624,
    "mixer_s16_224": 18_528_264,
    "mixer_s8_224": 20_646_504,
    "mixer_b32_224": 60_293_428,
    "mixer_b16_224": 59_880_472,
    "mixer_l32_224": 206_939_264,
    "mixer_l16_224": 208_196_168,
    "mixer_h14_224": 432_350_952,
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the reference init zeroes the head and biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] > 0 else 0))
    return model


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_table_1(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[name]


def test_token_mixing_is_the_bottleneck_and_channel_mixing_the_expansion():
    with torch.device("meta"):
        block = allmlp.create_model("mixer_b16_224").blocks[0]
    assert block.mlp_tokens.fc1.weight.shape == (384, 196)  # D_S x S
    assert block.mlp_channels.fc1.weight.shape == (3072, 768)  # D_C x C


def test_reference_init():
    torch.manual_seed(0)
    model = MlpMixer(**{**TINY, "hidden_dim": 256, "channels_mlp_dim": 1024})
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
    kernel = model.blocks[0].mlp_channels.fc1.weight  # fan_in 256
    std = math.sqrt(1 / 256)
    assert abs(kernel.std().item() - std) / std < 0.03  # lecun normal: variance 1 / fan_in after truncation
    assert kernel.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6  # truncated at 2 sigma
    stem = model.stem.proj.weight  # fan_in = 3 * 8 * 8
    assert abs(stem.std().item() - math.sqrt(1 / 192)) / math.sqrt(1 / 192) < 0.1


def test_layernorm_eps_and_gelu_follow_the_reference():
    model = MlpMixer(**TINY)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert model.blocks[0].mlp_tokens.act.approximate == "tanh"
    assert MlpMixer(**TINY, gelu="erf").blocks[0].mlp_tokens.act.approximate == "none"


def test_shapes_of_the_interface():
    model = randomise(MlpMixer(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 16, 32)  # (B, S, C)
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)
    assert torch.equal(model(x), model.forward_head(features))
    assert model(x).shape == (2, 10)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and torch.count_nonzero(model.head.weight) == 0
    assert model.config["num_classes"] == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    headless = MlpMixer(**{**TINY, "num_classes": 0})
    assert headless(x).shape == (2, 32)


def test_forward_head_pools_by_mean_over_tokens():
    model = randomise(MlpMixer(**TINY)).eval()
    tokens = torch.randn(2, 16, 32)
    expected = tokens.mean(1) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model.forward_head(tokens), expected)


def test_tokens_are_row_major_over_the_patch_grid():
    model = MlpMixer(
        img_size=(16, 24), patch_size=8, num_classes=0, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8
    )
    x = torch.zeros(1, 3, 16, 24)
    x[:, :, 8:16, 16:24] = 1.0  # patch at grid row 1, column 2 of a 2 x 3 grid
    tokens = model.stem(x)
    changed = (tokens - model.stem(torch.zeros_like(x))).abs().sum(-1).squeeze(0)
    assert changed.nonzero().flatten().tolist() == [1 * 3 + 2]


def test_non_square_images_and_patches():
    model = randomise(
        MlpMixer(
            img_size=(32, 48),
            patch_size=(8, 16),
            num_classes=3,
            hidden_dim=16,
            num_blocks=2,
            tokens_mlp_dim=8,
            channels_mlp_dim=32,
        )
    )
    assert model.num_tokens == 4 * 3
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 3)


@pytest.mark.parametrize(
    "shape, fragment",
    [((2, 3, 32, 40), "(B, 3, 32, 32)"), ((2, 1, 32, 32), "got (2, 1, 32, 32)"), ((3, 32, 32), "got (3, 32, 32)")],
)
def test_wrong_input_names_expected_and_received_shape(shape, fragment):
    model = MlpMixer(**TINY)
    with pytest.raises(ValueError, match="expects input of shape") as err:
        model(torch.randn(*shape))
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"img_size": 30}, "divisible by patch_size"),
        ({"patch_size": (8, 8, 8)}, "patch_size must be"),
        ({"hidden_dim": 0}, "hidden_dim must be a positive int"),
        ({"num_blocks": 2.5}, "num_blocks must be a positive int"),
        ({"num_classes": -1}, "num_classes must be an int >= 0"),
        ({"gelu": "relu"}, "gelu must be one of"),
        ({"drop_path_rate": 1.0}, "drop path rate must be in"),
        ({"drop_rate": -0.1}, "drop_rate must be in"),
    ],
)
def test_bad_config_values_are_named(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        MlpMixer(**{**TINY, **override})


def test_stochastic_depth_rises_linearly_over_blocks():
    model = MlpMixer(**{**TINY, "num_blocks": 5, "drop_path_rate": 0.2})
    assert [round(b.drop_path.rate, 6) for b in model.blocks] == [0.0, 0.05, 0.1, 0.15, 0.2]


def test_stochastic_depth_drops_whole_samples_in_training_only():
    model = randomise(MlpMixer(**{**TINY, "num_blocks": 1, "drop_path_rate": 0.5, "num_classes": 0}))
    # With one block its rate is 0 (linear from 0); force the rate to see the per-sample behaviour.
    model.blocks[0].drop_path.rate = 0.5
    x = torch.randn(64, 3, 32, 32)
    model.eval()
    reference = model(x)
    model.train()
    torch.manual_seed(0)
    out = model(x)
    assert not torch.allclose(out, reference)
    model.eval()
    assert torch.equal(model(x), reference)


def test_grad_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    model = randomise(MlpMixer(**{**TINY, "drop_path_rate": 0.3})).train()
    x = torch.randn(4, 3, 32, 32)

    def run(checkpointing: bool):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    assert torch.equal(out_plain, out_ckpt)
    for a, b in zip(grads_plain, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jit_trace_matches_eager():
    model = randomise(MlpMixer(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))


def test_torch_compile_matches_eager():
    model = randomise(MlpMixer(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_run_and_stay_close():
    model = randomise(MlpMixer(**TINY)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        fast = model.to(torch.bfloat16)(x.bfloat16())
    assert fast.dtype == torch.bfloat16
    error = (fast.float() - reference).norm() / reference.norm()
    assert error < 0.05
