"""allmlp export: ONNX (checked with onnxruntime), TorchScript and ExportedProgram, all with a dynamic batch axis."""

import numpy as np
import onnxruntime
import pytest
import torch

import allmlp
from allmlp.cli import main
from allmlp.models.registry import REGISTRY
from allmlp.tools import export as ex

# One small model per family in the registry, built through the registry so the family's own code is exported.
SMALL = {
    "MlpMixer": (
        "mixer_s16_224",
        dict(img_size=(16, 24), patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32),
    ),
    "CycleMLP": (
        "cyclemlp_b1",
        dict(img_size=16, layers=[1, 1], embed_dims=[8, 16], mlp_ratios=[2, 2], transitions=[True, True]),
    ),
    "VisionPermutator": (  # ViP's permute-MLPs need H * (C / segments) = C: a 4 x 4 grid, then 2 x 2
        "vip_s7",
        dict(
            img_size=28,
            layers=[1, 1],
            embed_dims=[16, 16],
            transitions=[True, False],
            segment_dim=[4, 2],
            mlp_ratios=[2, 2],
        ),
    ),  # fmt: skip
    "ResMLP": ("resmlp_12_224", dict(img_size=(16, 24), patch_size=4, embed_dim=16, depth=2)),
    "GMLP": ("gmlp_s16_224", dict(img_size=(16, 24), patch_size=4, embed_dim=16, num_blocks=2)),
    "GMixer": ("gmixer_24_224", dict(img_size=(16, 24), patch_size=4, embed_dim=16, num_blocks=2)),
    "MSMLP": (  # 32 = the smallest input of 4 stages at patch 4; shifts of 2 wrap the 1x1 and 2x2 grids
        "msmlp_t",
        dict(img_size=32, embed_dim=10, depths=[1, 1, 1, 1], mlp_ratio=2),
    ),
    "ConvMLP": (
        "convmlp_s",
        dict(img_size=37, blocks=[1, 1], dims=[8, 16], mlp_ratios=[2, 2], channels=8, n_conv_blocks=1),
    ),
    "ASMLP": ("asmlp_t", dict(img_size=(32, 64), embed_dim=8, depths=[1, 1], shift_size=3, mlp_ratio=2.0)),
    "SwinMLP": (
        "swinmlp_t_c24",
        dict(img_size=(16, 32), embed_dim=8, depths=[2, 1], num_heads=[2, 4], window_size=4, mlp_ratio=2.0),
    ),
    "ActiveMLP": (
        "activemlp_xt",
        dict(img_size=19, depths=[2, 3], embed_dims=[8, 16], mlp_ratios=[2, 2], share_dims=[2, 4], intv=2),
    ),
    "RepMLPNet": (  # two partitions of 4 x 4 in the first stage, one in the second
        "repmlpnet_t224",
        dict(img_size=[32, 16], num_blocks=[1, 1], channels=[8, 16], hs=[4, 4], ws=[4, 2], sharesets_nums=[2, 4]),
    ),
    "SMLPNet": ("smlpnet_t", dict(img_size=32, dim=8, alpha=2, depths=[1, 1, 1, 1])),  # img_size: its image_size
    "SpachMS": (
        "spach_ms_mlp_xxs",
        dict(img_size=64, hidden_dim=8, net_arch=[[["pass", 1]], [["mlp", 1]], [["mlp", 1]], [["mlp", 1]]]),
    ),
    "Spach": ("spach_mlp_xxs", dict(img_size=32, patch_size=8, hidden_dim=16, net_arch=[["mlp", 1], ["pass", 1]])),
    "WaveMLP": (
        "wavemlp_s",
        dict(img_size=29, layers=[1, 1], embed_dims=[8, 16], mlp_ratios=[2, 2], transitions=[True, True]),
    ),
    "HireMLP": (  # two blocks in the first stage: the second one shifts
        "hiremlp_tiny",
        dict(
            img_size=29,
            layers=[2, 1],
            embed_dims=[8, 16],
            mlp_ratios=[2, 2],
            pixel=[3, 2],
            step_stride=[2, 2],
            step_dilation=[1, 1],
        ),
    ),  # fmt: skip
}


def small_model(architecture: str, num_classes: int = 7) -> torch.nn.Module:
    name, overrides = SMALL[architecture]
    torch.manual_seed(0)
    model = allmlp.create_model(name, num_classes=num_classes, **overrides).eval()
    with torch.no_grad():  # a zero head would make every output 0 and hide any difference
        for param in model.parameters():
            if param.ndim <= 1:
                param.normal_(0.0, 0.2)
        model.get_classifier().weight.normal_(0.0, 0.2)
    return model


def test_every_registered_family_has_a_small_export_config():
    assert {entry.architecture.__name__ for entry in REGISTRY.values()} <= set(SMALL)


@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_onnx_runs_in_onnxruntime_with_any_batch(tmp_path, architecture):
    model = small_model(architecture)
    check = ex.export(model, tmp_path / "model.onnx", "onnx")
    assert check.max_abs_diff <= 1e-4 and check.path == tmp_path / "model.onnx"
    session = onnxruntime.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "pixels" and isinstance(session.get_inputs()[0].shape[0], str)
    height, width = ex.input_size(model)
    for batch in (1, 5):
        x = torch.randn(batch, 3, height, width)
        got = session.run(None, {"pixels": x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, 7)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_torch_formats_load_back_with_any_batch(tmp_path, fmt, architecture):
    model = small_model(architecture)
    path = tmp_path / ("model.pt" if fmt == "torchscript" else "model.pt2")
    ex.export(model, path, fmt)
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    x = torch.randn(4, 3, *ex.input_size(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_wrong_export_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    def off_by_a_little(model, example, path):
        path.write_bytes(b"broken")
        return lambda x: model(x).detach() + 1e-3

    monkeypatch.setitem(ex._WRITERS, "torchscript", off_by_a_little)
    with pytest.raises(ValueError, match="does not reproduce PyTorch: max abs difference 0.001"):
        ex.export(small_model("MlpMixer"), tmp_path / "model.pt", "torchscript")
    monkeypatch.setitem(ex._WRITERS, "torchscript", lambda model, example, path: lambda x: model(x[:1]).detach())
    with pytest.raises(ValueError, match="the batch axis is not dynamic"):
        ex.export(small_model("MlpMixer"), tmp_path / "model.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_command_from_weights_and_bad_input(tmp_path, capsys):
    model = small_model("MlpMixer").to(torch.bfloat16).train()
    weights = allmlp.save_weights(model, tmp_path / "m.safetensors")
    ex.export(model, tmp_path / "direct.pt2", "exported-program")
    assert model.training and model.head.weight.dtype == torch.bfloat16  # the caller's model is left as it was
    out = tmp_path / "out" / "m.pt2"
    assert main(["export", "--weights", weights, "--format", "exported-program", "-o", str(out)]) == 0
    assert "reproduces PyTorch" in capsys.readouterr().out and out.is_file()
    assert main(["export", "--format", "onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "give --model NAME, --weights FILE, or both" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format must be one of"):
        ex.export(small_model("MlpMixer"), tmp_path / "m.tflite", "tflite")


def test_the_suffix_must_fit_the_format(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"onnx files end in \.onnx .*got model\.pt2"):
        ex.export(small_model("MlpMixer"), tmp_path / "model.pt2", "onnx")
    assert main(["export", "--model", "mixer_s32_224", "--format", "torchscript", "-o", str(tmp_path / "m.txt")]) == 2
    assert "torchscript files end in .pt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_exporting_a_model_whose_outputs_are_all_zero_warns(tmp_path, capsys):
    weights = tmp_path / "fresh.safetensors"
    allmlp.save_weights(allmlp.create_model("mixer_s32_224", **SMALL["MlpMixer"][1]), weights)  # zero head
    assert main(["export", "--weights", str(weights), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
    captured = capsys.readouterr()
    assert "max abs difference 0.00e+00" in captured.out and "warning: every output of the model is the same" in (
        captured.err
    )
    small = tmp_path / "trained.safetensors"
    allmlp.save_weights(small_model("MlpMixer"), small)
    assert main(["export", "--weights", str(small), "--format", "torchscript", "-o", str(tmp_path / "t.pt")]) == 0
    assert "warning" not in capsys.readouterr().err  # outputs that differ: nothing to warn about
