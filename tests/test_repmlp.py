"""RepMLPNet as the authors compute it: parity with their forward (training and deploy form), the locality injection
(allmlp.reparameterize) against theirs, the registered variants' sizes and key layouts, released files, export."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import allmlp
from allmlp.cli import main as cli
from allmlp.models.repmlp import CONFIGS, DepthwiseConv, GroupedPointwiseConv, RepMLPBlock
from allmlp.tools.convert import convert

from helpers import onnx_outputs, published_shapes, randomise
from reference.repmlp import AUTHORS

KEYS = Path(__file__).parent / "data" / "keys"
PUBLISHED_PARAMS = {
    "repmlpnet_t224": 38_293_608,
    "repmlpnet_b224": 68_242_712,
    "repmlpnet_t256": 58_687_848,
    "repmlpnet_b256": 96_447_512,
    "repmlpnet_d256": 86_887_648,
    "repmlpnet_l256": 117_641_560,
}

# Small configs: odd partitions, non-square patches and partitions, several share sets, every local-conv choice.
SMALL = {
    "k13": dict(channels=[8, 16, 24], hs=[6, 3, 3], ws=[4, 4, 2], num_blocks=[1, 2, 1], sharesets_nums=[2, 4, 8],
                reparam_conv_k=[1, 3], globalperceptron_reduce=2, patch_size=[2, 3]),
    "k135": dict(channels=[8, 16], hs=[5, 3], ws=[3, 3], num_blocks=[1, 1], sharesets_nums=[1, 16],
                 reparam_conv_k=[3, 1, 5], globalperceptron_reduce=4, patch_size=[3, 2]),
    "k3": dict(channels=[6, 12], hs=[3, 3], ws=[5, 5], num_blocks=[2, 1], sharesets_nums=[3, 2],
               reparam_conv_k=[3], globalperceptron_reduce=3, patch_size=4),
    "no_local": dict(channels=[8, 16], hs=[4, 2], ws=[4, 2], num_blocks=[1, 1], sharesets_nums=[4, 2],
                     reparam_conv_k=None, globalperceptron_reduce=4, patch_size=[4, 4]),
}  # fmt: skip
# Input sizes per config: one partition per stage, several partitions (the authors' reshape quirk), floor-divided.
SIZES = {
    "k13": [(24, 24), (48, 24), (25, 50)],
    "k135": [(75, 12), (77, 37), (165, 24)],
    "k3": [(24, 40), (27, 43), (48, 80)],
    "no_local": [(16, 16), (32, 16), (35, 19)],
}


def randomise_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere and random BatchNorm statistics (eval-mode BN is then no identity)."""
    randomise(model, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.3)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model


def pair(name: str, seed: int = 0, **overrides) -> tuple[nn.Module, nn.Module]:
    """(allmlp's model, the authors' formulation) with the same random weights."""
    torch.manual_seed(seed)
    ours = randomise_all(allmlp.RepMLPNet(**{**SMALL[name], "num_class": 7, **overrides}), seed)
    theirs = AUTHORS["RepMLPNet"](**ours.config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def image(size, batch: int = 2, seed: int = 1, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_chans, *size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Parity with the authors' forward


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit", "low"])
def test_eval_parity_with_the_authors(name, scale):
    ours, theirs = pair(name)
    ours.eval(), theirs.eval()
    for size in SIZES[name]:
        x = image(size) * scale
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5, msg=f"{name} {size}")


@pytest.mark.parametrize("name", list(SMALL))
def test_train_mode_parity_with_the_authors(name):
    """Batch statistics: every BatchNorm sees the same values per channel (fc3_bn and repconv BNs per share set)."""
    ours, theirs = pair(name)
    for size in SIZES[name][:2]:
        x = image(size, batch=3)
        out, expected = ours.train()(x), theirs.train()(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        expected.square().sum().backward()
        theirs_grads = dict(theirs.named_parameters())
        # float32 sums through train-mode BatchNorms (some gradients are 0 up to rounding): 1e-4 of the largest
        scale = max(p.grad.abs().max().item() for p in theirs.parameters())
        for key, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, theirs_grads[key].grad, atol=1e-4 * scale, rtol=1e-4, msg=key)
        ours.zero_grad(), theirs.zero_grad()
    for key, buffer in theirs.state_dict().items():  # the running statistics moved alike
        torch.testing.assert_close(ours.state_dict()[key], buffer, atol=1e-6, rtol=1e-5, msg=key)


def test_grouped_pointwise_conv_is_nn_conv2d():
    for groups, bias in ((1, False), (4, True), (8, True)):
        conv = GroupedPointwiseConv(24, 24, 1, groups=groups, bias=bias)
        randomise(conv)
        plain = nn.Conv2d(24, 24, 1, groups=groups, bias=bias)
        plain.load_state_dict(conv.state_dict())
        for shape in ((2, 24, 5, 3), (1, 24, 1, 1)):
            x = torch.randn(shape)
            with torch.no_grad():
                torch.testing.assert_close(conv(x), plain(x), atol=1e-5, rtol=1e-5)
                strided = torch.randn(shape[0], shape[2], shape[3], 24).permute(0, 3, 1, 2)
                torch.testing.assert_close(conv(strided), plain(strided), atol=1e-5, rtol=1e-5)
    # any nn.Conv2d configuration (PEFT builds its LoRA layers with the base layer's class)
    for args in (dict(out_channels=12, groups=4), dict(out_channels=24, kernel_size=3, padding=1, groups=8)):
        args = {"in_channels": 24, "kernel_size": 1, **args}
        conv, plain = randomise(GroupedPointwiseConv(**args)), nn.Conv2d(**args)
        plain.load_state_dict(conv.state_dict())
        x = torch.randn(2, 24, 5, 3)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), plain(x), atol=1e-5, rtol=1e-5)


def test_depthwise_conv_is_nn_conv2d():
    for channels, k, bias in ((1, 3, False), (1, 5, True), (4, 1, True), (3, 5, True), (1, 1, False)):
        conv = DepthwiseConv(channels, channels, k, padding=k // 2, groups=channels, bias=bias)
        randomise(conv)
        plain = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=bias)
        plain.load_state_dict(conv.state_dict())
        x = torch.randn(6, channels, 5, 7)
        channels_last_rows = torch.randn(5, 7, 6, channels).permute(2, 3, 0, 1)  # what RepMLPBlock hands in
        with torch.no_grad():
            torch.testing.assert_close(conv(x), plain(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(conv(channels_last_rows), plain(channels_last_rows), atol=1e-5, rtol=1e-5)
    for args in (dict(out_channels=4), dict(kernel_size=3, stride=2, padding=1)):  # not a shifted sum
        args = {"in_channels": 1, "out_channels": 1, "kernel_size": 1, **args}
        conv, plain = randomise(DepthwiseConv(**args)), nn.Conv2d(**args)
        plain.load_state_dict(conv.state_dict())
        x = torch.randn(2, 1, 7, 6)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), plain(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Locality injection: allmlp.reparameterize


@pytest.mark.parametrize("name", list(SMALL))
def test_reparameterize_equals_training_form_and_the_authors_deploy(name):
    ours, theirs = pair(name)
    ours.eval(), theirs.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    deploy = allmlp.reparameterize(ours)
    # the input model is untouched: same keys and values, still in training form
    assert set(ours.state_dict()) == set(before) and not ours.config["deploy"]
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())
    assert deploy.config == {**ours.config, "deploy": True}
    theirs_deploy = copy.deepcopy(theirs).locality_injection()
    ours_state, theirs_state = deploy.state_dict(), theirs_deploy.state_dict()
    assert list(ours_state) == list(theirs_state)  # the authors' deploy layout, in their order
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, atol=1e-5, rtol=1e-5, msg=key)
    # a model built with deploy=True has exactly that layout
    built = allmlp.RepMLPNet(**deploy.config)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in ours_state.items()}
    built.load_state_dict(theirs_state, strict=True)
    for size in SIZES[name]:
        for scale in (1.0, 1e-3):
            x = image(size) * scale
            with torch.no_grad():
                expected = ours(x)
                torch.testing.assert_close(deploy(x), expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(theirs_deploy(x), expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(built.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_reparameterize_is_idempotent_keeps_mode_and_dtype_and_walks_any_model():
    ours, _ = pair("k13")
    ours.eval()
    x = image(SIZES["k13"][1])
    deploy = allmlp.reparameterize(ours)
    again = allmlp.reparameterize(deploy)
    assert not again.training and set(again.state_dict()) == set(deploy.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), deploy(x), atol=0, rtol=0)
    # a wrapper (here a backbone inside a Sequential) is walked, the foldable blocks replaced
    wrapped = allmlp.reparameterize(nn.Sequential(ours, nn.Identity()))
    assert not any(name.split(".")[-1].startswith("repconv") for name, _ in wrapped.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), deploy(x), atol=1e-6, rtol=1e-6)
    half = allmlp.reparameterize(ours.to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    block = next(m for m in ours.train().modules() if isinstance(m, RepMLPBlock))
    assert block.reparameterized().training and block.reparameterized().deploy and not block.deploy
    with pytest.raises(ValueError, match="nothing to reparameterize"):
        allmlp.reparameterize(nn.Sequential(nn.Linear(2, 2)))


def test_reparameterize_on_the_meta_device_gives_the_published_deploy_layout():
    with torch.device("meta"):
        model = allmlp.create_model("repmlpnet_t224")
    deploy = allmlp.reparameterize(model)
    shapes = {k: tuple(v.shape) for k, v in deploy.state_dict().items()}
    assert shapes == published_shapes(KEYS / "repmlp_T224_deploy_keys.txt")


# ----------------------------------------------------------------------------------------------------------------
# Registered variants and released files


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_registered_variants_have_the_published_sizes_and_keys(name):
    label = name.split("_")[1].upper()
    with torch.device("meta"):
        model = allmlp.create_model(name)
        deploy = allmlp.create_model(name, deploy=True)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    for built, suffix in ((model, "keys"), (deploy, "deploy_keys")):
        shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
        assert shapes == published_shapes(KEYS / f"repmlp_{label}_{suffix}.txt"), suffix
    side = int(name[-3:])
    assert model.pretrained_cfg["input_size"] == (3, side, side)
    assert {k: model.config[k] for k in CONFIGS[name.split("_")[1]]} == CONFIGS[name.split("_")[1]]


def test_released_layout_of_a_small_registered_variant_loads(tmp_path):
    """A plain training-time state dict (the released layout) of repmlpnet_t224 built small: load_weights and
    create_model(weights=) give the authors' outputs; `allmlp convert --deploy` of its allmlp file too."""
    small = dict(
        num_blocks=[1, 1, 1, 1], channels=[8, 16, 24, 32], hs=[8, 4, 2, 1], ws=[8, 4, 2, 1], sharesets_nums=[1, 2, 4, 8]
    )
    torch.manual_seed(0)
    source = randomise_all(allmlp.create_model("repmlpnet_t224", **small)).eval()
    path = tmp_path / "RepMLPNet-small-train.pth"
    torch.save(source.state_dict(), path)
    theirs = AUTHORS["RepMLPNet"](**source.config).eval()
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = image((32, 32))
    with torch.no_grad():
        expected = theirs(x)
        loaded = allmlp.load_weights(allmlp.create_model("repmlpnet_t224", **small), path).eval()
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
        created = allmlp.create_model("repmlpnet_t224", weights=path, **small).eval()
        torch.testing.assert_close(created(x), expected, atol=1e-5, rtol=1e-5)
        allmlp.save_weights(created, tmp_path / "small.safetensors")
        assert (
            cli(["convert", str(tmp_path / "small.safetensors"), str(tmp_path / "deploy.safetensors"), "--deploy"]) == 0
        )
        deploy = allmlp.create_model(tmp_path / "deploy.safetensors").eval()
        assert deploy.config["deploy"] and not any("repconv" in key for key in deploy.state_dict())
        torch.testing.assert_close(deploy(x), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(allmlp.WeightsError, match="missing .*repconv"):
            allmlp.load_weights(allmlp.create_model("repmlpnet_t224", **small), tmp_path / "deploy.safetensors")


@pytest.mark.slow
def test_released_state_dict_loads_everywhere_and_converts_to_deploy(tmp_path):
    """A file like the authors' release (plain training-time state dict, `stages.0...`) of RepMLPNet-T224: loaded
    by load_weights, create_model(weights=), `allmlp convert` (auto-detected) and `allmlp convert --deploy`."""
    torch.manual_seed(0)
    source = randomise_all(allmlp.create_model("repmlpnet_t224")).eval()
    path = tmp_path / "RepMLPNet-T224-train-acc76.62.pth"
    torch.save(source.state_dict(), path)
    x = image((224, 224), batch=1)
    theirs = AUTHORS["RepMLPNet"](**source.config).eval()
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        expected = theirs(x)
        loaded = allmlp.load_weights(allmlp.create_model("repmlpnet_t224"), path).eval()
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)
        created = allmlp.create_model("repmlpnet_t224", weights=path).eval()
        torch.testing.assert_close(created(x), expected, atol=1e-4, rtol=1e-4)
        converted = convert(path, tmp_path / "t224.safetensors")
        assert converted.config == source.config
        assert cli(["convert", str(path), str(tmp_path / "t224_deploy.safetensors"), "--deploy"]) == 0
        deploy = allmlp.create_model(tmp_path / "t224_deploy.safetensors").eval()
        assert deploy.config["deploy"] and "stages.0.0.repmlp_block.fc3.bias" in deploy.state_dict()
        assert deploy.pretrained_cfg["architecture"] == "repmlpnet_t224"
        torch.testing.assert_close(deploy(x), expected, atol=1e-4, rtol=1e-4)
        # a deploy-layout file (what the authors' convert.py writes) is recognised and loads back
        torch.save(deploy.state_dict(), tmp_path / "RepMLPNet-T224-deploy.pth")
        again = convert(tmp_path / "RepMLPNet-T224-deploy.pth", tmp_path / "again.safetensors")
        assert again.config["deploy"]
        torch.testing.assert_close(again.eval()(x), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# num_class / num_classes, config round trips, heads


def test_num_class_and_num_classes_are_one_argument(tmp_path):
    assert allmlp.RepMLPNet(**SMALL["k3"], num_class=5).num_classes == 5
    assert allmlp.RepMLPNet(**SMALL["k3"], num_classes=5).config["num_classes"] == 5
    assert allmlp.RepMLPNet(**SMALL["k3"], num_class=5, num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="num_class .* and num_classes .* differ: 5 and 6"):
        allmlp.RepMLPNet(**SMALL["k3"], num_class=5, num_classes=6)
    with torch.device("meta"):
        model = allmlp.create_model("repmlpnet_t224", num_classes=10)
    assert model.head.out_features == 10 and model.config["num_classes"] == 10
    model = pair("k3")[0]
    json.loads(json.dumps(model.config))
    rebuilt = allmlp.RepMLPNet(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    model.reset_classifier(3)
    assert model.config["num_classes"] == 3 and model.head.out_features == 3
    path = allmlp.save_weights(model.eval(), tmp_path / "small.safetensors")
    back = allmlp.create_model(path).eval()
    x = image(SIZES["k3"][1])
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    deploy = allmlp.reparameterize(model)
    back = allmlp.create_model(allmlp.save_weights(deploy, tmp_path / "deploy.safetensors")).eval()
    assert back.config["deploy"]
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(channels=[8]), r"channels needs one positive int per stage \(2 stages\), got \[8\]"),
        (dict(hs=[4, 0]), r"hs needs one positive int per stage"),
        (dict(sharesets_nums=[3, 2]), r"sharesets_nums\[0\] must divide channels\[0\] = 8, got 3"),
        (dict(reparam_conv_k=[2]), r"reparam_conv_k must be None or a list of distinct odd kernel sizes, got \[2\]"),
        (dict(reparam_conv_k=[3, 3]), r"reparam_conv_k must be None or a list of distinct odd kernel sizes"),
        (dict(globalperceptron_reduce=9), r"globalperceptron_reduce must be an int in 1..8"),
        (dict(num_blocks=[]), r"num_blocks must be a non-empty list"),
        (dict(patch_size=0), r"patch_size must be a positive int"),
        (dict(num_class=-1), r"num_class must be an int >= 0"),
        (dict(global_pool="max"), r"global_pool must be 'avg'"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.RepMLPNet(**{**SMALL["no_local"], **overrides})


def test_bad_inputs_are_named():
    model = pair("no_local")[0].eval()
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, H, W\) .* got \(2, 1, 16, 16\)"):
        model(image((16, 16), in_chans=1))
    with pytest.raises(ValueError, match=r"H in 16, 32, 48.*got \(2, 3, 8, 16\)"):
        model(image((8, 16)))
    with pytest.raises(ValueError, match=r"e\.g\. 16x16\), got \(2, 3, 24, 16\), whose stage 0 grid is 6x4"):
        model(image((24, 16)))
    with pytest.raises(ValueError, match=r"got \(3, 16, 16\)"):
        model(torch.randn(3, 16, 16))


# ----------------------------------------------------------------------------------------------------------------
# bf16 and export


def test_bf16_forward_is_close_to_fp32():
    model = pair("k13")[0].eval()
    x = image(SIZES["k13"][1])
    with torch.no_grad():
        expected = model(x)
        for form in (model, allmlp.reparameterize(model)):
            got = copy.deepcopy(form).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
            assert (got - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize("deploy", [False, True], ids=["train_form", "deploy"])
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["onnx", "onnx_dynamo"])
def test_torch_export_and_onnx_match_eager(deploy, dynamo, tmp_path):
    from torch.export import Dim

    model = pair("k13")[0].eval()
    if deploy:
        model = allmlp.reparameterize(model)
    x = image(SIZES["k13"][1])
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=32)},))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(program.module()(x[:1]), expected[:1], atol=1e-5, rtol=1e-5)
    got = onnx_outputs(model, x, tmp_path / "repmlp.onnx", dynamo=dynamo)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The recipe


def test_recipe_has_the_authors_settings_and_builds_in_the_trainer(tmp_path):
    from allmlp.train.config import load_config
    from allmlp.train.engine import build_model

    cfg = load_config("repmlpnet_b256_i1k", [f"data.root={tmp_path}"])
    assert cfg.model.name == "repmlpnet_b256" and cfg.model.drop_path_rate == 0.0
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad_norm) == ("adamw", 1e-3, 0.1, 5.0)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.label_smoothing) == (100, 256, 0.1)
    assert (cfg.schedule.warmup_epochs, cfg.schedule.warmup_start_lr, cfg.schedule.end_lr) == (10, 5e-7, 0.0)
    assert (cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.data.random_erasing) == (0.4, 1.0, 0.0)
    assert (cfg.data.eval_preset, cfg.data.crop_pct) == ("resmall_crop", 1.0)
    with torch.device("meta"):
        model = build_model(cfg, num_classes=10)
    assert type(model) is allmlp.RepMLPNet and model.num_classes == 10
    assert model.pretrained_cfg["input_size"] == (3, 256, 256)


def test_allmlp_options_in_chans_img_size_drop_path():
    grey = allmlp.RepMLPNet(**SMALL["k3"], in_channels=1)
    assert grey.config["in_chans"] == 1 and "in_channels" not in grey.config
    assert allmlp.RepMLPNet(**SMALL["k3"], in_chans=1).config == grey.config
    with pytest.raises(ValueError, match="in_channels .* and in_chans .* differ: 1 and 3"):
        allmlp.RepMLPNet(**SMALL["k3"], in_channels=1, in_chans=3)
    assert grey(image(SIZES["k3"][0], in_chans=1)).shape == (2, 1000)
    assert allmlp.RepMLPNet(**SMALL["k3"], img_size=[48, 80]).pretrained_cfg["input_size"] == (3, 48, 80)
    with pytest.raises(ValueError, match=r"img_size must be an input size the partitions fit \(e\.g\. 24x40\), got 30"):
        allmlp.RepMLPNet(**SMALL["k3"], img_size=30)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        allmlp.RepMLPNet(**SMALL["k3"], drop_path_rate=1.5)
    ours, _ = pair("k3")
    dropped = allmlp.RepMLPNet(**{**ours.config, "drop_path_rate": 0.5})
    dropped.load_state_dict(ours.state_dict())
    x = image(SIZES["k3"][0])
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), ours.eval()(x), atol=0, rtol=0)  # identity in eval
        torch.manual_seed(0)
        assert (dropped.train()(x) - ours.train()(x)).abs().max() > 1e-3
