"""CycleMLP-B1 and ViP-S/7 inference: allmlp against the authors' formulation, in one process, interleaved.

allmlp runs three ways: the plain model (eager), `allmlp.optimize_for_inference(model)` ("optimized") and
`torch.compile` with inductor freezing ("compiled"; `--no-compile` skips it, compiling takes minutes on 2 cores).

The authors' formulation is written out below as their code computes it (cycle_mlp.py of ShoufaChen/CycleMLP:
Cycle FC by torchvision's deform_conv2d on NCHW tokens; models/vip.py of houqb/VisionPermutator: the
permute/reshape Weighted Permute-MLP) and gets the same weights as allmlp, so the logits must agree.
deform_conv2d has no bfloat16 CPU kernel: the authors' CycleMLP runs in float32 only.

    python benchmarks/bench_cyclemlp_vip.py --threads 2 --batch 8 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torchvision.ops import deform_conv2d

import allmlp


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DeformCycleFC(nn.Module):
    def __init__(self, dim: int, kernel_size: tuple[int, int]):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.empty(dim, dim, 1, 1)), nn.Parameter(torch.empty(dim))
        k = kernel_size[0] * kernel_size[1]
        shifts = [(i + k // 2) % k - k // 2 for i in range(dim)]
        pairs = [(0, s) if kernel_size[0] == 1 else (s, 0) for s in shifts]
        self.register_buffer("offset", torch.tensor(pairs, dtype=torch.float32).reshape(1, 2 * dim, 1, 1))

    def forward(self, x):  # NCHW, as the authors call it
        batch, _, height, width = x.shape
        return deform_conv2d(x, self.offset.expand(batch, -1, height, width), self.weight, self.bias)


class AuthorsMixer(nn.Module):
    """CycleMLP's token mixer (cyclic=True) or ViP's Weighted Permute-MLP (cyclic=False), as the authors compute."""

    def __init__(self, dim: int, segment_dim: int, cyclic: bool):
        super().__init__()
        self.cyclic, self.segment_dim = cyclic, segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        if cyclic:
            self.sfc_h, self.sfc_w = DeformCycleFC(dim, (1, 3)), DeformCycleFC(dim, (3, 1))
        else:
            self.mlp_h, self.mlp_w = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.reweight, self.proj = Mlp(dim, dim // 4, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        if self.cyclic:
            h = self.sfc_h(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            w = self.sfc_w(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            seg, S = self.segment_dim, C // self.segment_dim
            h = x.reshape(B, H, W, seg, S).permute(0, 3, 2, 1, 4).reshape(B, seg, W, H * S)
            h = self.mlp_h(h).reshape(B, seg, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H, W, C)
            w = x.reshape(B, H, W, seg, S).permute(0, 1, 3, 2, 4).reshape(B, H, seg, W * S)
            w = self.mlp_w(w).reshape(B, H, seg, W, S).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)
        c = self.mlp_c(x)
        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class Block(nn.Module):
    def __init__(self, dim: int, segment_dim: int, mlp_ratio: float, cyclic: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), AuthorsMixer(dim, segment_dim, cyclic)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Conv(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.proj = nn.Conv2d(*args, **kwargs)

    def forward(self, x):  # tokens (B, H, W, C) in and out, permuted around the convolution as the authors do
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class AuthorsNet(nn.Module):
    """The authors' CycleNet / VisionPermutator forward for the released layouts."""

    def __init__(self, config: dict, cyclic: bool):
        super().__init__()
        dims, layers = config["embed_dims"], config["layers"]
        segments = config.get("segment_dim", [0] * len(layers))
        stem = dict(kernel_size=7, stride=4, padding=2) if cyclic else dict(kernel_size=7, stride=7)
        self.patch_embed = Conv(3, dims[0], **stem)
        network = []
        for i, depth in enumerate(layers):
            network.append(
                nn.Sequential(*(Block(dims[i], segments[i], config["mlp_ratios"][i], cyclic) for _ in range(depth)))
            )
            if i < len(layers) - 1 and (config["transitions"][i] or dims[i] != dims[i + 1]):
                conv = dict(kernel_size=3, stride=2, padding=1) if cyclic else dict(kernel_size=2, stride=2)
                network.append(Conv(dims[i], dims[i + 1], **conv))
        self.network = nn.ModuleList(network)
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], 1000)

    def forward(self, x):
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        for layer in self.network:
            x = layer(x)
        return self.head(self.norm(x.flatten(1, 2)).mean(1))


def images_per_second(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (median reported)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip allmlp compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    runs = {}  # (model, implementation, dtype) -> module or compiled function
    for name, cyclic in (("cyclemlp_b1", True), ("vip_s7", False)):
        ours = allmlp.create_model(name).eval()
        with torch.no_grad():
            ours.head.weight.normal_(0, 0.02)  # the authors' init draws the head too; a zero head hides differences
        authors = AuthorsNet(allmlp.get_entry(name).config, cyclic).eval()
        missing, unexpected = authors.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(key.endswith(".offset") for key in missing)  # offsets: their own constants
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.inference_mode():
            difference = (ours(x) - authors(x)).abs().max().item()
        print(f"{name}: max |logit difference| allmlp vs the authors' formulation (float32): {difference:.2e}")
        for dtype in (torch.float32, torch.bfloat16):
            plain = copy.deepcopy(ours).to(dtype)
            runs[(name, "allmlp", dtype)] = plain
            runs[(name, "allmlp optimized", dtype)] = allmlp.optimize_for_inference(plain)
            if args.compile:
                runs[(name, "allmlp compiled", dtype)] = torch.compile(plain)
            if dtype == torch.float32 or not cyclic:
                runs[(name, "authors", dtype)] = copy.deepcopy(authors).to(dtype)
    x = torch.randn(args.batch, 3, args.size, args.size)

    speeds = {key: [] for key in runs}
    with torch.inference_mode():
        for (_, _, dtype), module in runs.items():  # warm-up; compiles, with freezing (weights as constants)
            with inductor_config.patch(freezing=True):
                module(x.to(dtype))
        for _ in range(args.rounds):
            for (name, implementation, dtype), module in runs.items():
                speeds[(name, implementation, dtype)].append(images_per_second(module, x.to(dtype)))
    median = {key: statistics.median(values) for key, values in speeds.items()}

    def ratio(name: str, implementation: str, dtype: torch.dtype) -> float:
        """Median over rounds of a speed over the authors' float32 speed in the same round: drift of a shared
        machine between rounds cancels out."""
        ours, base = speeds[(name, implementation, dtype)], speeds[(name, "authors", torch.float32)]
        return statistics.median(a / b for a, b in zip(ours, base, strict=True))

    print(
        f"\nbatch {args.batch}, {args.size}x{args.size}, {args.threads} threads, median of {args.rounds} rounds, "
        f"torch {torch.__version__}\n"
    )
    print("| model | dtype | implementation | img/s | / authors' float32 (per round) |")
    print("|---|---|---|---|---|")
    for name, implementation, dtype in sorted(runs, key=lambda key: (key[0], key[2] != torch.float32, key[1])):
        dtype_name = str(dtype).removeprefix("torch.")
        speed, vs = median[(name, implementation, dtype)], ratio(name, implementation, dtype)
        print(f"| {name} | {dtype_name} | {implementation} | {speed:.1f} | {vs:.2f}x |")
        if (name, "authors", dtype) not in runs and implementation == "allmlp":
            print(f"| {name} | {dtype_name} | authors | n/a (deform_conv2d: no bf16 CPU kernel) | |")


if __name__ == "__main__":
    main()
