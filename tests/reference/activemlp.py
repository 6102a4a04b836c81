"""ActiveMLP as the authors compute it (microsoft/ActiveMLP models/activemlp.py at fb44035), re-written from their
code's semantics without allmlp: each ATM branch is torchvision's deform_conv2d with a 1x1 kernel on NCHW maps,
its offsets a (B, 2C, H, W) tensor of zeros with the branch's offsets written into the dx (width) or dy (height)
slots; offsets repeat_interleave'd from the offset layer's 2C / share_dim channels (the first C for the width);
the fusion weights reshaped (B, C, 3); tokens permuted around every convolution; the position conv before each
offset-making block; downsampling inside the stage's last block; the final norm on (B, N, C), then the mean.
"""

import torch
from torch import nn
from torchvision.ops import deform_conv2d


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ATMOp(nn.Module):
    def __init__(self, in_chans, out_chans, dimension):
        super().__init__()
        self.dimension = dimension
        self.weight = nn.Parameter(torch.randn(out_chans, in_chans, 1, 1) * 0.02)
        self.bias = nn.Parameter(torch.zeros(out_chans))

    def forward(self, x, offset):
        """x (B, C, H, W), offset (B, C, H, W)."""
        B, C, H, W = x.shape
        full = torch.zeros(B, 2 * C, H, W, dtype=x.dtype, device=x.device)
        if self.dimension == "w":
            full[:, 1::2] += offset
        else:
            full[:, 0::2] += offset
        return deform_conv2d(x, full, self.weight, self.bias)


class ATMLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.atm_c = nn.Linear(dim, dim, bias=False)
        self.atm_h = ATMOp(dim, dim, "h")
        self.atm_w = ATMOp(dim, dim, "w")
        self.fusion = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, offset):
        """x (B, H, W, C), offset (B, 2C, H, W)."""
        B, H, W, C = x.shape
        assert offset.shape == (B, 2 * C, H, W)
        w = self.atm_w(x.permute(0, 3, 1, 2), offset[:, :C]).permute(0, 2, 3, 1)
        h = self.atm_h(x.permute(0, 3, 1, 2), offset[:, C:]).permute(0, 2, 3, 1)
        c = self.atm_c(x)
        a = (w + h + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.fusion(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        return self.proj(w * a[0] + h * a[1] + c * a[2])


class Downsample(nn.Module):
    def __init__(self, in_chans, out_chans):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ActiveBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, share_dim, downsample, new_offset):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.atm = ATMLayer(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.downsample = downsample
        self.share_dim = share_dim
        self.offset_layer = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * 2 // share_dim)) if new_offset else None
        )

    def forward(self, x, offset=None):
        if self.offset_layer is not None and offset is None:
            offset = self.offset_layer(x).repeat_interleave(self.share_dim, dim=-1).permute(0, 3, 1, 2)
        x = x + self.atm(self.norm1(x), offset)
        x = x + self.mlp(self.norm2(x))
        if self.downsample is not None:
            x = self.downsample(x)
        if self.offset_layer is not None:
            return x, offset
        return x


class PEG(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        return (self.proj(x) + x).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=2)

    def forward(self, x):
        return self.proj(x)


class AuthorsActiveMLP(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        depths=(2, 2, 4, 2),
        embed_dims=(64, 128, 320, 512),
        mlp_ratios=(4, 4, 4, 4),
        share_dims=(1, 1, 1, 1),
        drop_path_rate=0.0,
        intv=2,
        global_pool="avg",
    ):
        super().__init__()
        self.intv = intv
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.blocks = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.blocks.append(
                nn.ModuleList(
                    ActiveBlock(
                        embed_dims[i],
                        mlp_ratios[i],
                        share_dims[i],
                        Downsample(embed_dims[i], embed_dims[i + 1])
                        if i < len(depths) - 1 and j == depth - 1
                        else None,
                        new_offset=j % intv == 0 and j != depth - 1,
                    )
                    for j in range(depth)
                )
            )
        self.pos_blocks = nn.ModuleList(PEG(dim) for dim in embed_dims)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_blocks(self, x):
        offset = None
        for i, stage in enumerate(self.blocks):
            for j, blk in enumerate(stage):
                if j % self.intv == 0 and j != len(stage) - 1:
                    x = self.pos_blocks[i](x)
                    x, offset = blk(x)
                else:
                    x = blk(x, offset)
        B, H, W, C = x.shape
        return x.reshape(B, -1, C)

    def forward(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        x = self.forward_blocks(x)
        return self.head(self.norm(x).mean(1))


AUTHORS = {"ActiveMLP": AuthorsActiveMLP}
