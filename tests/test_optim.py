"""The optimizer builder: weight-decay groups, layer-wise learning-rate decay from timm's group_matcher, and the
schedule applying each group's scale."""

import pytest
import torch
from timm.models._manipulate import group_parameters
from timm.models.mlp_mixer import MlpMixer as TimmMixer
from timm.optim import param_groups_layer_decay
from torch import nn

from allmlp.train.config import ConfigError, OptimConfig, RunConfig, ScheduleConfig, check_run_config
from allmlp.train.optim import Schedule, build_optimizer, layer_ids, parameter_groups

from helpers import tiny_convmlp, tiny_cyclemlp, tiny_mixer, tiny_resmlp, tiny_vip


class Stand(nn.Module):
    """The spec's Mixer interface in miniature: stem, blocks.{i}, norm, head, a 2-D parameter in no_weight_decay."""

    def __init__(self, num_blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem|^pos_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def scales_of(groups: list[dict], model: nn.Module) -> dict[str, tuple[float, float]]:
    """name -> (lr_scale, weight_decay) of the group holding each parameter."""
    where = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters() if id(p) in where}


def timm_scales_of(groups: list[dict], model: nn.Module) -> dict[str, tuple[float, float]]:
    where = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters()}


def test_layer_ids_number_stem_blocks_norm_head_as_timm():
    model = Stand(num_blocks=3)
    ids = layer_ids([n for n, _ in model.named_parameters()], model.group_matcher())
    assert ids["stem.weight"] == ids["pos_embed"] == 0
    assert [ids[f"blocks.{i}.1.weight"] for i in range(3)] == [1, 2, 3]
    assert ids["norm.weight"] == 3  # the (99999,) suffix: the final norm joins the last block, as in timm
    assert ids["head.weight"] == ids["head.bias"] == 4  # unmatched: after everything
    assert ids == group_parameters(model, model.group_matcher(), reverse=True)


def test_layer_ids_parse_block_numbers_not_their_text():
    names = [f"blocks.{i}.weight" for i in (0, 1, 2, 10, 11)]
    ids = layer_ids(names, dict(blocks=[(r"^blocks\.(\d+)", None)]))
    assert [ids[n] for n in names] == [0, 1, 2, 3, 4]  # "10" sorts after "2"


@pytest.mark.parametrize("decay", [0.5, 0.75, 1.0])
def test_layer_decay_groups_match_timm_on_timms_mixer(decay):
    model = TimmMixer(num_classes=5, img_size=32, patch_size=8, embed_dim=16, num_blocks=3, mlp_ratio=(0.5, 2.0))
    ours = scales_of(parameter_groups(model, 0.05, decay), model)
    theirs = timm_scales_of(param_groups_layer_decay(model, 0.05, layer_decay=decay), model)
    assert ours == theirs  # the same powers, computed the same way


def test_layer_decay_scales_and_no_weight_decay_names():
    model = Stand(num_blocks=3)
    scales = scales_of(parameter_groups(model, 0.1, 0.5), model)
    assert scales["stem.weight"] == (0.5**4, 0.1) and scales["stem.bias"] == (0.5**4, 0.0)
    assert scales["pos_embed"] == (0.5**4, 0.0)  # 2-D, but named by no_weight_decay()
    assert scales["blocks.0.1.weight"] == (0.5**3, 0.1) and scales["blocks.2.1.weight"] == (0.5, 0.1)
    assert scales["norm.weight"] == (0.5, 0.0)
    assert scales["head.weight"] == (1.0, 0.1) and scales["head.bias"] == (1.0, 0.0)


def test_without_layer_decay_two_groups_as_before():
    model = Stand()
    model.blocks[0].requires_grad_(False)  # frozen parameters stay out of the optimizer
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "stem.weight", "blocks.1.1.weight", "blocks.2.1.weight", "head.weight"
    }  # fmt: skip
    assert "pos_embed" in {names[id(p)] for p in no_decay["params"]}
    assert not any(names[id(p)].startswith("blocks.0.") for g in (decay, no_decay) for p in g["params"])


def test_schedule_multiplies_each_groups_scale():
    model = Stand(num_blocks=2)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, layer_decay=0.5))
    schedule = Schedule(ScheduleConfig(warmup_steps=10), peak=0.1, total_steps=100, steps_per_epoch=10)
    assert schedule.apply(optimizer, 5) == pytest.approx(0.05)
    scales = scales_of(optimizer.param_groups, model)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lrs[id(p)] == pytest.approx(0.05 * scales[name][0]), name
    assert lrs[id(model.stem.weight)] == pytest.approx(0.05 * 0.5**3) and lrs[id(model.head.weight)] == 0.05


def test_schedule_restores_groups_saved_without_a_scale():
    # optimizer state saved before lr_scale existed: the loaded groups have no scale and take the plain lr
    model = Stand()
    unscaled = [{k: v for k, v in group.items() if k != "lr_scale"} for group in parameter_groups(model, 0.1)]
    old = torch.optim.AdamW(unscaled)
    optimizer = build_optimizer(model, OptimConfig())
    optimizer.load_state_dict(old.state_dict())
    Schedule(ScheduleConfig(), peak=0.01, total_steps=10, steps_per_epoch=10).apply(optimizer, 0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_layer_decay_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=rf"layer_decay: expected a number in \(0, 1\] or None, got {bad}"):
        parameter_groups(Stand(), 0.0, bad)
    cfg = RunConfig()
    cfg.train.steps, cfg.data.kind, cfg.optim.layer_decay = 1, "demo", bad
    with pytest.raises(ConfigError, match=rf"optim.layer_decay: expected a number in \(0, 1\] or null, got {bad}"):
        check_run_config(cfg)


def test_layer_decay_needs_a_group_matcher():
    with pytest.raises(ValueError, match="layer_decay needs a model with group_matcher\\(\\); Sequential has none"):
        parameter_groups(nn.Sequential(nn.Linear(2, 2)), 0.0, 0.5)


@pytest.mark.parametrize(
    "build",
    [tiny_mixer, tiny_cyclemlp, tiny_vip, tiny_convmlp],
    ids=["mixer", "cyclemlp", "vip", "convmlp"],
)
def test_every_family_decays_from_head_to_stem(build):
    model = build()
    scales = scales_of(parameter_groups(model, 0.05, 0.8), model)
    stem = model.pretrained_cfg["first_conv"]
    ordered = [scales[name][0] for name, _ in model.named_parameters()]
    assert ordered == sorted(ordered)  # parameters are registered from the input to the output
    assert scales[f"{stem}.weight"][0] == min(ordered) < 0.8 and scales["head.weight"][0] == 1.0
    assert len(set(ordered)) > 3  # stem, blocks or stages, head


def test_lamb_steps_as_timms_lamb():
    """ResMLP's optimizer: allmlp's LAMB takes timm's steps (timm's own gradient clipping off; allmlp clips in the
    training loop), the trust ratio on decayed weights only, plain Adam on the rest."""
    from timm.optim import Lamb as TimmLamb

    from allmlp.train.optim import Lamb

    torch.manual_seed(0)
    ours_model = tiny_resmlp()
    theirs_model = tiny_resmlp()
    theirs_model.load_state_dict(ours_model.state_dict())
    cfg = OptimConfig(name="lamb", lr=5e-3, weight_decay=0.2, eps=1e-6)
    ours = build_optimizer(ours_model, cfg)
    assert isinstance(ours, Lamb)
    theirs = TimmLamb(parameter_groups(theirs_model, 0.2), lr=5e-3, eps=1e-6, max_grad_norm=None)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    mine = dict(ours_model.named_parameters())
    for name, p in theirs_model.named_parameters():
        torch.testing.assert_close(mine[name], p, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="Lamb: lr and eps > 0"):
        Lamb(ours_model.parameters(), lr=0.0)
