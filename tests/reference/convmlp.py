"""ConvMLP as the authors compute it (SHI-Labs/Convolutional-MLPs `src/convmlp.py`, `src/utils/` at 092bf71),
re-written from their code's semantics without allmlp: NCHW tokenizer and convolutional stage (contiguous NCHW
tensors, in-place ReLUs), one permute to NHWC before the MLP stages, permutes around every depthwise and
downsampling conv, and the head reshaping to (B, N, C) before LayerNorm and the mean. Stochastic depth as theirs
(timm's 2021 drop_path: floor(keep + U) masks), rates torch.linspace(0, rate, n) within each stage.

`ReferenceConvMLP.forward` is theirs: logits, or (classifier_head=False) the last stage's NHWC tokens;
`dense_forward` is their detection / segmentation backbone (DetConvMLP / SegConvMLP .forward): the tokenizer and
conv-stage maps and, with exactly three stages, the NCHW outputs of stages 0 and 2.
"""

import torch
from torch import nn


def authors_drop_path(x, drop_prob, training):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class AuthorsDropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return authors_drop_path(x, self.drop_prob, self.training)


class AuthorsTokenizer(nn.Module):
    def __init__(self, embedding_dim, in_chans=3):
        super().__init__()
        half = embedding_dim // 2
        self.block = nn.Sequential(
            nn.Conv2d(in_chans, half, (3, 3), (2, 2), (1, 1), bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, (3, 3), (1, 1), (1, 1), bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, embedding_dim, (3, 3), (1, 1), (1, 1), bias=False),
            nn.BatchNorm2d(embedding_dim),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((3, 3), (2, 2), (1, 1), (1, 1)),
        )

    def forward(self, x):
        return self.block(x)


class AuthorsConvStage(nn.Module):
    def __init__(self, num_blocks, embedding_dim_in, hidden_dim, embedding_dim_out):
        super().__init__()
        self.conv_blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self.conv_blocks.append(
                nn.Sequential(
                    nn.Conv2d(embedding_dim_in, hidden_dim, (1, 1), (1, 1), (0, 0), bias=False),
                    nn.BatchNorm2d(hidden_dim),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(hidden_dim, hidden_dim, (3, 3), (1, 1), (1, 1), bias=False),
                    nn.BatchNorm2d(hidden_dim),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(hidden_dim, embedding_dim_in, (1, 1), (1, 1), (0, 0), bias=False),
                    nn.BatchNorm2d(embedding_dim_in),
                    nn.ReLU(inplace=True),
                )
            )
        self.downsample = nn.Conv2d(embedding_dim_in, embedding_dim_out, (3, 3), (2, 2), (1, 1))

    def forward(self, x):
        for block in self.conv_blocks:
            x = x + block(x)
        return self.downsample(x)


class AuthorsMlp(nn.Module):
    def __init__(self, embedding_dim_in, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(embedding_dim_in, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embedding_dim_in)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class AuthorsBlock(nn.Module):  # their ConvMLPStage
    def __init__(self, embedding_dim, dim_feedforward, stochastic_depth_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.channel_mlp1 = AuthorsMlp(embedding_dim, dim_feedforward)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.connect = nn.Conv2d(embedding_dim, embedding_dim, (3, 3), (1, 1), (1, 1), groups=embedding_dim, bias=False)
        self.connect_norm = nn.LayerNorm(embedding_dim)
        self.channel_mlp2 = AuthorsMlp(embedding_dim, dim_feedforward)
        self.drop_path = AuthorsDropPath(stochastic_depth_rate) if stochastic_depth_rate > 0 else nn.Identity()

    def forward(self, src):
        src = src + self.drop_path(self.channel_mlp1(self.norm1(src)))
        src = self.connect(self.connect_norm(src).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return src + self.drop_path(self.channel_mlp2(self.norm2(src)))


class AuthorsDownsample(nn.Module):
    def __init__(self, embedding_dim_in, embedding_dim_out):
        super().__init__()
        self.downsample = nn.Conv2d(embedding_dim_in, embedding_dim_out, (3, 3), (2, 2), (1, 1))

    def forward(self, x):
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class AuthorsBasicStage(nn.Module):
    def __init__(self, num_blocks, embedding_dims, mlp_ratio, stochastic_depth_rate, downsample):
        super().__init__()
        rates = [r.item() for r in torch.linspace(0, stochastic_depth_rate, num_blocks)]
        self.blocks = nn.ModuleList(
            AuthorsBlock(embedding_dims[0], int(embedding_dims[0] * mlp_ratio), rates[i]) for i in range(num_blocks)
        )
        self.downsample_mlp = AuthorsDownsample(embedding_dims[0], embedding_dims[1]) if downsample else nn.Identity()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample_mlp(x)


class ReferenceConvMLP(nn.Module):
    def __init__(
        self,
        blocks,
        dims,
        mlp_ratios,
        channels=64,
        n_conv_blocks=3,
        classifier_head=True,
        num_classes=1000,
        in_chans=3,
        stochastic_depth_rate=0.1,
    ):
        super().__init__()
        self.tokenizer = AuthorsTokenizer(channels, in_chans)
        self.conv_stages = AuthorsConvStage(n_conv_blocks, channels, dims[0], dims[0])
        self.stages = nn.ModuleList(
            AuthorsBasicStage(blocks[i], dims[i : i + 2], mlp_ratios[i], stochastic_depth_rate, i + 1 < len(blocks))
            for i in range(len(blocks))
        )
        if classifier_head:
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], num_classes)
        else:
            self.head = None

    def forward(self, x):
        x = self.tokenizer(x)
        x = self.conv_stages(x)
        x = x.permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        if self.head is None:
            return x
        B, _, _, C = x.shape
        x = x.reshape(B, -1, C)
        x = self.norm(x)
        return self.head(x.mean(dim=1))

    def dense_forward(self, x):
        outs = []
        x = self.tokenizer(x)
        outs.append(x)
        x = self.conv_stages(x)
        outs.append(x)
        x = x.permute(0, 2, 3, 1)
        for i in range(len(self.stages)):
            x = self.stages[i](x)
            if i != 1 and len(self.stages) == 3:
                outs.append(x.permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


class DenseReferenceConvMLP(ReferenceConvMLP):
    """The authors' dense backbone (classifier_head=False) whose forward is DetConvMLP's."""

    def forward(self, x):
        return list(self.dense_forward(x))


def build_authors_convmlp(**config) -> nn.Module:
    """The authors' formulation for an allmlp ConvMLP config (allmlp's extra arguments: in_chans is the tokenizer's
    input, drop_path_rate their stochastic_depth_rate; img_size, drop_rate (must be 0) and global_pool ignored)."""
    if config.get("drop_rate", 0.0) != 0.0:
        raise ValueError("the authors' ConvMLP has no dropout before the head")
    arguments = dict(
        blocks=config["blocks"],
        dims=config["dims"],
        mlp_ratios=config["mlp_ratios"],
        channels=config.get("channels", 64),
        n_conv_blocks=config.get("n_conv_blocks", 3),
        classifier_head=config.get("classifier_head", True),
        num_classes=config.get("num_classes", 1000),
        in_chans=config.get("in_chans", 3),
        stochastic_depth_rate=config.get("drop_path_rate", 0.1),
    )
    return (ReferenceConvMLP if arguments["classifier_head"] else DenseReferenceConvMLP)(**arguments)


AUTHORS = {"ConvMLP": build_authors_convmlp}
