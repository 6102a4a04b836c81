"""gMLP and gMixer as timm computes them: there is no official gMLP vision code, and the only weights are timm's, so
the reference formulation is timm's own MlpMixer (timm/models/mlp_mixer.py), built from an allmlp config. timm is a
test dependency only. Same state-dict keys as allmlp's GMLP / GMixer."""

from __future__ import annotations

from torch import nn


def _common(config: dict) -> dict:
    return dict(
        num_classes=config.get("num_classes", 1000),
        img_size=config.get("img_size", 224),
        in_chans=config.get("in_chans", 3),
        patch_size=config.get("patch_size", 16),
        num_blocks=config["num_blocks"],
        embed_dim=config["embed_dim"],
        drop_rate=config.get("drop_rate", 0.0),
        proj_drop_rate=config.get("proj_drop_rate", 0.0),
        drop_path_rate=config.get("drop_path_rate", 0.0),
        global_pool=config.get("global_pool", "avg"),
    )


def timm_gmlp(**config) -> nn.Module:
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(
        **_common(config), mlp_ratio=config.get("mlp_ratio", 6.0), block_layer=SpatialGatingBlock, mlp_layer=GatedMlp
    )


def timm_gmixer(**config) -> nn.Module:
    from timm.layers import GluMlp
    from timm.models.mlp_mixer import MlpMixer

    ratio = config.get("mlp_ratio", (1.0, 4.0))
    ratio = tuple(ratio) if isinstance(ratio, (list, tuple)) else ratio
    return MlpMixer(**_common(config), mlp_ratio=ratio, mlp_layer=GluMlp, act_layer=nn.SiLU)


AUTHORS = {"GMLP": timm_gmlp, "GMixer": timm_gmixer}
