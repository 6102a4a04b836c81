"""A sweep over every registered model: forward, backward, finite outputs, grad checkpointing, bf16, bad sizes.

Models above FULL_DEPTH_LIMIT parameters are built with fewer blocks (same widths, token counts and stage
layout) to keep the sweep fast; the parameter-count tests of each family check the full configurations.
"""

import pytest
import torch

import allmlp

BATCH = 2
FULL_DEPTH_LIMIT = 30_000_000


# The fewest blocks per stage a family's constructor takes where it is more than one (ActiveMLP: a stage's first
# block makes the offsets the others read).
MIN_STAGE_DEPTH = {"ActiveMLP": 2}


def shallower(name: str) -> dict:
    """The override that leaves 2 blocks (isotropic families) or the fewest per stage, whatever the family calls
    its depths."""
    entry = allmlp.get_entry(name)
    for key in ("num_blocks", "depth", "layers", "depths", "blocks"):
        if key in entry.config:
            if isinstance(entry.config[key], int):
                return {key: 2}
            return {key: [MIN_STAGE_DEPTH.get(entry.architecture.__name__, 1)] * len(entry.config[key])}
    if "net_arch" in entry.config:  # SPACH: (mixer, depth) pairs, one list of them per stage in SpachMS
        arch = entry.config["net_arch"]
        staged = isinstance(arch[0][0], (list, tuple))
        return {"net_arch": [[[mixer, 1] for mixer, _ in stage] for stage in arch] if staged else [[arch[0][0], 2]]}
    raise KeyError(f"no depth option among {sorted(entry.config)}")


def build(name: str, full_depth_limit: int = FULL_DEPTH_LIMIT) -> torch.nn.Module:
    with torch.device("meta"):
        params = sum(p.numel() for p in allmlp.create_model(name).parameters())
    overrides = shallower(name) if params > full_depth_limit else {}
    torch.manual_seed(0)
    model = allmlp.create_model(name, num_classes=7, **overrides)
    with torch.no_grad():
        model.get_classifier().weight.normal_(0, 0.02)  # the reference init zeroes the head: no gradient signal
    return model


def input_size(model: torch.nn.Module) -> tuple[int, int]:
    size = model.config.get("img_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


@pytest.mark.parametrize("name", allmlp.list_models())
def test_forward_backward_finite(name):
    model = build(name).train()
    x = torch.randn(BATCH, 3, *input_size(model))
    out = model(x)
    assert out.shape == (BATCH, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (BATCH, model.num_features)


@pytest.mark.parametrize("name", allmlp.list_models())
def test_grad_checkpointing_equal_and_bf16_runs(name):
    model = build(name).eval()
    x = torch.randn(1, 3, *input_size(model))
    reference = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    with torch.no_grad():
        fast = model.to(torch.bfloat16)(x.bfloat16())
    assert fast.dtype == torch.bfloat16 and torch.isfinite(fast).all()


@pytest.mark.parametrize("name", allmlp.list_models())
def test_wrong_size_or_channels_is_a_clear_value_error(name):
    model = build(name, full_depth_limit=0).eval()
    height, width = input_size(model)
    with pytest.raises(ValueError, match=str(tuple(torch.Size([1, 4, height, width])))):
        model(torch.randn(1, 4, height, width))
