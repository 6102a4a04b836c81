"""allmlp.optimize_for_inference: the same function as the model for every family, in both kernels' paths, and a
clear refusal of every model whose layers were changed in a way the fused module would not see."""

import copy

import pytest
import torch
from test_fast_paths import assert_agrees, fp32_reference, mnist, trained  # noqa: F401 (fixtures)
from torch import nn
from torch.nn.utils import parametrize, prune

import allmlp
from allmlp.models import optimize
from allmlp.models.interface import FeatureNet

from helpers import randomise, randomise_batchnorm_stats

MODELS = {
    "mixer": (lambda: allmlp.MlpMixer(img_size=32, patch_size=8, hidden_dim=24, num_blocks=2, tokens_mlp_dim=12,
                                      channels_mlp_dim=40, num_classes=7), (3, 3, 32, 32)),
    "mixer_tokens": (lambda: allmlp.MlpMixer(img_size=(16, 24), patch_size=8, hidden_dim=16, num_blocks=1,
                                             tokens_mlp_dim=6, channels_mlp_dim=20, num_classes=5, global_pool="",
                                             gelu="erf"), (2, 3, 16, 24)),
    "mixer_no_head": (lambda: allmlp.MlpMixer(img_size=16, patch_size=8, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                                              channels_mlp_dim=12, num_classes=0, global_pool=""), (2, 3, 16, 16)),
    "vip": (lambda: allmlp.VisionPermutator(layers=[1, 2], img_size=28, patch_size=7, embed_dims=[16, 32],
                                            transitions=[True], segment_dim=[4, 2], mlp_ratios=[2, 3], num_classes=5,
                                            skip_lam=3.0, qkv_bias=True), (2, 3, 28, 28)),
    "cyclemlp": (lambda: allmlp.CycleMLP(layers=[1, 2], embed_dims=[8, 16], transitions=[True], mlp_ratios=[2, 3],
                                         num_classes=5, skip_lam=1.5), (2, 3, 37, 29)),
    "cyclemlp_fork_feat": (lambda: allmlp.CycleMLP(layers=[1, 1, 1], embed_dims=[8, 16, 16], qkv_bias=True,
                                                   transitions=[True, False], mlp_ratios=[2, 2, 2], fork_feat=True),
                           (2, 3, 45, 31)),
}  # fmt: skip
# Families whose inference module swaps layers for faster equivalents but fuses no linears.
SWAPPED = {
    "wavemlp": (lambda: allmlp.WaveMLP(layers=[1, 1], embed_dims=[8, 16], transitions=[True], mlp_ratios=[2, 3],
                                       num_classes=5), (2, 3, 37, 29)),
    "wavemlp_fork_feat": (lambda: allmlp.WaveMLP(layers=[1, 2], embed_dims=[8, 16], transitions=[True],
                                                 mlp_ratios=[2, 2], norm_layer="group", mode="depthwise",
                                                 ds_use_norm=False, fork_feat=True), (2, 3, 45, 31)),
}  # fmt: skip


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    make, shape = {**MODELS, **SWAPPED}[name]
    torch.manual_seed(seed)
    model = randomise_batchnorm_stats(randomise(make(), seed), seed).eval()
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same(got, expected, atol: float = 1e-5) -> None:
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert_same(a, b, atol)
        return
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)


def ops_run(module: nn.Module, x: torch.Tensor) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x)
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "portable"])
def test_same_outputs_and_features_as_the_model(name, onednn, monkeypatch):
    if onednn and not optimize.ONEDNN_LINEAR:
        pytest.skip("this PyTorch has no oneDNN fused linear")
    monkeypatch.setattr(optimize, "ONEDNN_LINEAR", onednn)
    model, x = build(name)
    fast = allmlp.optimize_for_inference(model)
    with torch.no_grad():
        expected, features = model(x), model.forward_features(x)
    assert_same(fast(x), expected)
    assert_same(fast.forward_features(x), features)
    ops = ops_run(fast, x)
    assert ("mkldnn::_linear_pointwise" in ops) == onednn
    assert "aten::addmm_" in ops or "mkldnn::_linear_pointwise" in ops  # residuals ride in the products


@pytest.mark.parametrize("name", sorted(SWAPPED))
def test_wavemlp_grouped_convolutions_run_depthwise_with_the_same_function(name):
    """Every `tfc_h` / `tfc_w` (two input channels per group) becomes a depthwise convolution and a pair sum; the
    logits, features and fork_feat maps are the model's, on odd sizes too."""
    model, x = build(name)
    fast = allmlp.optimize_for_inference(model)
    mixers = [m for m in fast.modules() if isinstance(m, allmlp.models.wavemlp.PATM)]
    assert len(mixers) == sum(model.config["layers"])
    assert all(isinstance(m.tfc_h, optimize.PairedGroupConv) and isinstance(m.tfc_w, optimize.PairedGroupConv)
               for m in mixers)  # fmt: skip
    for images in (x, torch.randn(1, 3, 3, 8), torch.randn(3, 3, 50, 21)):
        with torch.no_grad():
            expected, features = model(images), model.forward_features(images)
        assert_same(fast(images), expected)
        assert_same(fast.forward_features(images), features)


@pytest.mark.parametrize("fold_min", [0, 10**9], ids=["folded", "direct"])
def test_cyclemlp_folded_and_direct_mixers_agree(fold_min, monkeypatch):
    """The threshold decides per stage; 0 folds every stage and 10**9 none, on odd input sizes."""
    monkeypatch.setattr(optimize, "FOLD_MIN_TOKENS_PER_CHANNEL", fold_min)
    model, _ = build("cyclemlp", seed=1)
    fast = allmlp.optimize_for_inference(model)
    for size in [(3, 3), (17, 45), (40, 33)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
        assert_same(fast(x), expected)
        assert ("aten::baddbmm_" in ops_run(fast, x)) == (fold_min == 0)


def test_default_threshold_folds_only_large_grids():
    model, x = build("cyclemlp")  # stage 1: 9x7 tokens of 8 channels (folded); stage 2: 5x4 of 16 (direct)
    fast = allmlp.optimize_for_inference(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fast(x)
    assert sum(event.name == "aten::baddbmm_" for event in prof.events()) == 3  # one per branch, one block


@pytest.mark.parametrize("name", ["mixer", pytest.param("cyclemlp", marks=pytest.mark.slow), "wavemlp"])
def test_compiles_with_freezing_to_the_same_function(name):
    """`torch.compile` of the inference module (Wave-MLP's fastest form; `allmlp bench --optimize on --compile
    on`), with inductor's freezing as the benchmarks compile it: inside the compiled graph the fused linears take
    their portable ops, which inductor fuses itself."""
    import torch._inductor.config as inductor_config

    model, x = build(name)
    fast = allmlp.optimize_for_inference(model)
    with torch.no_grad():
        expected = model(x)
    with inductor_config.patch(freezing=True):
        compiled = torch.compile(fast)(x)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)


def test_the_model_is_left_untouched_and_trainable():
    model, x = build("vip")
    model.train()
    before = copy.deepcopy(model.state_dict())
    fast = allmlp.optimize_for_inference(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        expected = model.eval()(x)
        for p in model.parameters():  # the optimized module holds a copy: later training does not reach it
            p.add_(1.0)
    assert_same(fast(x), expected)


@pytest.mark.skipif(not optimize.ONEDNN_LINEAR, reason="this PyTorch has no oneDNN fused linear")
def test_onednn_weights_are_packed_once_and_follow_the_weights(tmp_path):
    """oneDNN's blocked copy of a weight is made on first use and reused; a weight changed in place or converted
    is packed again; the module still deep-copies and saves (the blocked copy is not part of its state)."""
    model, x = build("mixer")
    fast = allmlp.optimize_for_inference(model)
    linear = fast.layers[0].mlp.fc1
    with torch.no_grad():
        expected = fast.forward_features(x)
        packed = linear.packed_weight()
        assert packed.is_mkldnn and linear.packed_weight() is packed
        linear.weight.mul_(2.0)
        assert linear.packed_weight() is not packed
        assert not torch.equal(fast.forward_features(x), expected)
        linear.weight.div_(2.0)
        assert_same(copy.deepcopy(fast).forward_features(x), expected)
        torch.save(fast, tmp_path / "fast.pt")
        bf16 = fast.to(torch.bfloat16)
        assert linear.packed_weight().dtype == torch.bfloat16
        got = bf16.forward_features(x.bfloat16()).float()
    assert ((got - expected).norm() / expected.norm()).item() < 0.03


@pytest.mark.skipif(not optimize.ONEDNN_LINEAR, reason="this PyTorch has no oneDNN fused linear")
def test_bf16_weights_stay_plain_where_onednn_cannot_pack_them(monkeypatch):
    """On a CPU without bfloat16 support oneDNN refuses to pack bfloat16 weights: the plain weight serves."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model, x = build("mixer")
    fast = allmlp.optimize_for_inference(model.to(torch.bfloat16))
    linear = fast.layers[0].mlp.fc1
    assert linear.packed_weight() is linear.weight
    assert fast(x.bfloat16()).dtype == torch.bfloat16


def test_runs_without_grad_whatever_the_input():
    model, x = build("mixer")
    out = allmlp.optimize_for_inference(model)(x.requires_grad_())
    assert not out.requires_grad


def test_keeps_the_dtype_bf16_agrees_with_fp32_on_a_trained_mixer(trained, mnist):  # noqa: F811
    test = mnist[0][4000:]
    reference = fp32_reference(trained, test)
    assert_same(allmlp.optimize_for_inference(trained)(test), reference)
    bf16 = copy.deepcopy(trained).to(torch.bfloat16)
    fast = allmlp.optimize_for_inference(bf16)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    logits = fast(test.bfloat16())
    assert logits.dtype == torch.bfloat16
    assert_agrees(logits, reference)
    with torch.no_grad():
        assert_agrees(logits, bf16(test.bfloat16()).float(), top1=0.99, relative=0.01)


@pytest.mark.parametrize("name", ["vip", "cyclemlp", "wavemlp"])
def test_bf16_close_to_the_bf16_model(name):
    model, x = build(name)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x.bfloat16()).float()
    got = allmlp.optimize_for_inference(model)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.03


def test_input_is_checked_as_the_model_checks_it():
    model, _ = build("mixer")
    with pytest.raises(ValueError, match=r"MlpMixer expects input of shape \(B, 3, 32, 32\).*got \(2, 3, 16, 16\)"):
        allmlp.optimize_for_inference(model)(torch.randn(2, 3, 16, 16))


def lora_by_replacement(model: nn.Module) -> nn.Module:
    class LoraLinear(nn.Linear):
        pass

    old = model.blocks[0].mlp_channels.fc1
    new = LoraLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.blocks[0].mlp_channels.fc1 = new
    return model


REFUSALS = {
    "forward hook": (lambda m: m.blocks[1].mlp_tokens.fc2.register_forward_hook(lambda *a: None) and m,
                     ValueError, r"MlpMixer\.blocks\.1\.mlp_tokens\.fc2 has forward_hooks"),
    "pre-hook": (lambda m: m.norm.register_forward_pre_hook(lambda *a: None) and m,
                 ValueError, r"MlpMixer\.norm has forward_pre_hooks"),
    "backward hook": (lambda m: m.blocks[0].register_full_backward_hook(lambda *a: None) and m,
                      ValueError, r"MlpMixer\.blocks\.0 has .*backward_hooks"),
    "pruned": (lambda m: prune.l1_unstructured(m.blocks[0].mlp_channels.fc2, "weight", 0.5) and m,
               ValueError, r"blocks\.0\.mlp_channels\.fc2 has forward_pre_hooks.*prune"),
    "parametrised": (lambda m: parametrize.register_parametrization(m.stem.proj, "weight", nn.Identity()) and m,
                     ValueError, r"MlpMixer\.stem\.proj is parametrised"),
    "subclassed layer": (lora_by_replacement, ValueError,
                         r"blocks\.0\.mlp_channels\.fc1 is a test_optimize\..*LoraLinear where the model's constructor "
                         r"builds torch\.nn\.modules\.linear\.Linear"),
    "quantised": (lambda m: torch.ao.quantization.quantize_dynamic(m, {nn.Linear}), ValueError,
                  r"MlpMixer\.blocks\.0\.mlp_tokens\.fc1 is a torch\.ao\.nn\.quantized\.dynamic.*Linear where"),
    "pruned layers": (lambda m: m.prune_intermediate_layers([0], prune_head=False) and m, ValueError,
                      r"MlpMixer lacks \['blocks\.1'"),
    "edited head": (lambda m: setattr(m, "head", nn.Linear(24, 3)) or m, ValueError,
                    r"head\.weight \(3, 24\) \(expected \(7, 24\)\)"),
    "features only": (lambda m: FeatureNet(m, [0]), TypeError, r"takes an allmlp model .*got FeatureNet"),
    "other module": (lambda m: nn.Sequential(m), TypeError, r"takes an allmlp model .*got Sequential"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_changed_models_naming_module_and_reason(case):
    change, error, message = REFUSALS[case]
    model, _ = build("mixer")
    with pytest.raises(error, match=message):
        allmlp.optimize_for_inference(change(model))


def test_refuses_peft_lora():
    peft = pytest.importorskip("peft")
    model, _ = build("vip")
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, r=2))
    with pytest.raises(TypeError, match="got PeftModel"):
        allmlp.optimize_for_inference(wrapped)
    with pytest.raises(ValueError, match=r"VisionPermutator\.network\.0\.0\.attn\.mlp_c is a peft\..*Linear where"):
        allmlp.optimize_for_inference(wrapped.base_model.model)


def test_a_training_mode_model_gives_the_eval_function():
    model, x = build("cyclemlp")
    model.train()
    fast = allmlp.optimize_for_inference(model)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    assert_same(fast(x), expected)


def test_computes_in_the_models_dtype_under_autocast():
    model, x = build("mixer")
    with torch.no_grad():
        expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = allmlp.optimize_for_inference(model)(x)
    assert_same(got, expected)
