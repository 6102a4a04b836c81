"""`optimize_for_inference(model)`: an explicit, opt-in transform into a faster inference module.

The models themselves run the plain formulation (timm's for Mixer, the authors' for ViP and CycleMLP) with every
layer called as a module, so hooks, LoRA, pruning, quantisation and tracing see every layer. Speed that needs
another layout of the activations or fused kernels lives here instead, in a new module built from a copy of the
model's current weights:

- Mixer runs token-major, (S, B, C): token mixing is one `W @ X` product on the (S, B*C) view and channel mixing
  one `X @ W^T` on the (S*B, C) view, so no transpose is ever copied.
- Each residual add happens inside the last matrix product of its branch (`addmm_` into residual + bias), and
  the hidden GELU runs in place: one pass over memory instead of three.
- On CPU in float32 or bfloat16, last-dimension linears are oneDNN's fused linear (the kernel torch.compile uses
  on CPU) with its weights packed once into oneDNN's blocked layout: bias and GELU, or bias and residual add,
  happen inside the product. Other devices and dtypes, or a PyTorch without the op, take portable ops that
  compute the same.
- CycleMLP folds split attention into the projection on large token grids (see `fold_cycle_mixer`).
- Wave-MLP's `tfc_h` / `tfc_w` (two input channels per group) run as a depthwise convolution and a pair sum
  (see `PairedGroupConv`).

The result is for inference only: eval mode, parameters frozen, `forward` runs under `torch.no_grad()` and in the
model's dtype, with autocast off (`model.to(torch.bfloat16)` before optimizing is the bfloat16 path).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .cyclemlp import CycleFC, CycleMLP, CycleTokenMixer, cycle_shift
from .interface import check_input
from .layers import Mlp
from .mixer import MixerBlock, MlpMixer
from .vip import PermutatorBlock, VisionPermutator, WeightedPermuteMLP
from .wavemlp import PATM, WaveMLP

FAMILIES = (MlpMixer, CycleMLP, VisionPermutator, WaveMLP)

# oneDNN's fused linear: the bias, a GELU or a residual add run inside the matrix product (5-20% per layer on CPU).
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Fold CycleMLP's split attention into the projection where a token grid has at least this many tokens per channel.
FOLD_MIN_TOKENS_PER_CHANNEL = 4


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused linear may run: CPU, float32 or bfloat16 activations and weights of one dtype,
    outside torch.compile (which has its own fusions)."""
    return (
        ONEDNN_LINEAR
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and not torch.compiler.is_compiling()
    )


def frozen(tensor: torch.Tensor | None, scale: float = 1.0) -> nn.Parameter | None:
    if tensor is None:
        return None
    return nn.Parameter(tensor.detach() * scale if scale != 1.0 else tensor.detach(), requires_grad=False)


class FusedLinear(nn.Module):
    """`x @ W^T + b` over the last dimension (or `W @ x + b` over the first, `features_first`), then the GELU
    `gelu` (nn.GELU's `approximate`) or plus `residual`. `scale` multiplies the map (ViP's 1 / skip_lam)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gelu: str | None = None,
        scale: float = 1.0,
        features_first: bool = False,
    ):
        super().__init__()
        self.weight, self.bias = frozen(weight, scale), frozen(bias, scale)
        self.gelu, self.features_first = gelu, features_first
        self._packed: tuple | None = None  # (the weight's version key, oneDNN's blocked copy of it)

    def packed_weight(self) -> torch.Tensor:
        """The weight reordered into oneDNN's blocked layout once, not on every call (what inductor's freezing
        does), and again whenever the weight is replaced, moved or changed in place. oneDNN packs bfloat16 only
        on CPUs with bfloat16 support (AVX-512 or AMX); elsewhere the plain weight serves, as before packing."""
        key = (self.weight.data_ptr(), self.weight.dtype, self.weight._version)
        if self._packed is None or self._packed[0] != key:
            packable = self.weight.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight) if packable else self.weight)
        return self._packed[1]

    def __getstate__(self) -> dict:
        # oneDNN's blocked tensors cannot be copied or saved: a copy packs its own on first use
        return {**super().__getstate__(), "_packed": None}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.features_first and onednn_applies(x, self.weight):
            weight = self.packed_weight()
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, self.bias, "add")
            if self.gelu is not None:
                return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "gelu", [], self.gelu)
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        out_features = self.weight.shape[0]
        if self.features_first:
            left, right = self.weight, x.reshape(x.shape[0], -1)
            shape, bias = (out_features, *x.shape[1:]), None if self.bias is None else self.bias[:, None]
        else:
            left, right = x.reshape(-1, x.shape[-1]), self.weight.t()
            shape, bias = (*x.shape[:-1], out_features), self.bias
        if residual is not None:  # accumulate into residual + bias in place: the output is written once
            start = residual.reshape(left.shape[0], right.shape[1])
            start = start.clone() if bias is None else start + bias
            return start.addmm_(left, right).view(shape)
        out = torch.mm(left, right) if bias is None else torch.addmm(bias, left, right)
        if self.gelu is not None:
            torch.ops.aten.gelu_(out, approximate=self.gelu)
        return out.view(shape)


class FusedMlp(nn.Module):
    """An `Mlp` as two fused linears: fc1 with its GELU, fc2 with the residual add (dropout is off at inference)."""

    def __init__(self, mlp: Mlp, scale: float = 1.0, features_first: bool = False):
        super().__init__()
        self.fc1 = FusedLinear(mlp.fc1.weight, mlp.fc1.bias, mlp.act.approximate, features_first=features_first)
        self.fc2 = FusedLinear(mlp.fc2.weight, mlp.fc2.bias, scale=scale, features_first=features_first)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x), residual)


class FusedCycleFC(nn.Module):
    """Cycle FC: the model's cycle shift, then its weights as a fused linear."""

    def __init__(self, layer: CycleFC):
        super().__init__()
        self.kernel_size, self.channels = layer.kernel_size, layer.in_channels
        self.linear = FusedLinear(layer.weight.flatten(1), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.shift(x))

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        return cycle_shift(x, self.kernel_size, self.channels)


class FusedTokenMixer(nn.Module):
    """ViP's or CycleMLP's token mixer with the residual add inside its projection.

    `mixer` is the model's module (its forward, its reweight) with fused linears in place of its branch maps and
    an Identity in place of `proj`, which runs here with the residual instead.
    """

    def __init__(self, mixer: WeightedPermuteMLP | CycleTokenMixer, scale: float):
        super().__init__()
        self.proj = FusedLinear(mixer.proj.weight, mixer.proj.bias, scale=scale)
        mixer.proj = nn.Identity()
        for name in ("mlp_h", "mlp_w", "mlp_c"):
            if isinstance(getattr(mixer, name, None), nn.Linear):
                layer = getattr(mixer, name)
                setattr(mixer, name, FusedLinear(layer.weight, layer.bias))
        for name in ("sfc_h", "sfc_w"):
            if hasattr(mixer, name):
                setattr(mixer, name, FusedCycleFC(getattr(mixer, name)))
        self.mixer = mixer
        self.cyclic = isinstance(mixer, CycleTokenMixer)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.cyclic and x.shape[1] * x.shape[2] >= FOLD_MIN_TOKENS_PER_CHANNEL * x.shape[3]:
            return fold_cycle_mixer(self.mixer, self.proj, x, residual)
        return self.proj(self.mixer(x), residual)


def fold_cycle_mixer(
    mixer: CycleTokenMixer, proj: FusedLinear, x: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """CycleMLP's token mixer plus `residual`, with split attention folded into the projection.

    Everything after the shifts is linear in the branches' inputs but for the per-(image, channel) split
    attention weights a_j, so the three maps, the weighting and the projection fold into one map per image and
    branch: `proj(sum_j a_j * (X_j W_j^T + b_j)) = sum_j X_j (W_j^T diag(a_j) Wp^T) + const`, where X_j is x
    shifted for branch j. On large token grids (early stages) this does 3 instead of 4 matrix products per token
    and writes no branch outputs; folding costs 3 C^3 per image, so small grids (fewer than
    FOLD_MIN_TOKENS_PER_CHANNEL tokens per channel) take the direct path.
    """
    batch, height, width, dim = x.shape
    branches = [  # (input, weight, bias) in the reweight's branch order: h, w, c
        (mixer.sfc_h.shift(x), mixer.sfc_h.linear.weight, mixer.sfc_h.linear.bias),
        (mixer.sfc_w.shift(x), mixer.sfc_w.linear.weight, mixer.sfc_w.linear.bias),
        (x, mixer.mlp_c.weight, mixer.mlp_c.bias),
    ]
    # Split attention reads the branches' means, which are the maps of the inputs' means.
    means = sum(F.linear(inputs.mean((1, 2)), weight, bias) for inputs, weight, bias in branches)
    attention = mixer.reweight(means).view(batch, dim, 3).softmax(dim=-1)  # (B, C, branch)
    proj_t = proj.weight.t()
    const = proj.bias.expand(batch, -1)
    folded = []
    for j, (_, weight, bias) in enumerate(branches):
        scale = attention[..., j]
        folded.append((weight.t() * scale[:, None, :]) @ proj_t)  # (B, C_in, C_out)
        if bias is not None:
            const = const + (bias * scale) @ proj_t
    # Row-major whatever the residual's layout: baddbmm_ into a transposed output takes a slow path (100x slower
    # in bfloat16 on CPU).
    out = residual.new_empty(batch, height * width, proj.weight.shape[0])
    torch.add(residual.reshape(batch, height * width, -1), const[:, None, :], out=out)
    for (inputs, _, _), maps in zip(branches, folded, strict=True):
        out.baddbmm_(inputs.reshape(batch, height * width, dim), maps)
    return out.view(batch, height, width, -1)


class PairedGroupConv(nn.Module):
    """Wave-MLP's `tfc_h` / `tfc_w`, a convolution 2C -> C with two input channels per group (output c reads inputs
    2c and 2c + 1), as a depthwise convolution over the 2C inputs followed by the sum of each pair of its outputs:
    the same products and sums. oneDNN's CPU kernel for two channels per group is slow (4-8x a depthwise
    convolution of the same inputs in channels_last bfloat16). In bfloat16 each depthwise output is rounded before
    the pair sum: one rounding more than the grouped kernel's."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = frozen(conv.weight.reshape(conv.in_channels, 1, *conv.kernel_size))
        self.padding = conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depthwise = F.conv2d(x, self.weight, None, 1, self.padding, 1, self.weight.shape[0])
        return depthwise[:, 0::2] + depthwise[:, 1::2]


class FusedBlock(nn.Module):
    """Pre-norm block of every family: x = mixer(norm1(x), residual=x), then x = mlp(norm2(x), residual=x)."""

    def __init__(self, norm1: nn.Module, mixer: nn.Module, norm2: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm1, self.mixer, self.norm2, self.mlp = norm1, mixer, norm2, mlp

    @classmethod
    def of(cls, block: MixerBlock | PermutatorBlock) -> FusedBlock:
        if isinstance(block, MixerBlock):  # token-major: the token MLP maps the first dimension
            mixer, mlp = FusedMlp(block.mlp_tokens, features_first=True), FusedMlp(block.mlp_channels)
        else:  # the authors divide both branches by skip_lam: fold it into the last maps
            scale = 1.0 / block.skip_lam
            mixer, mlp = FusedTokenMixer(block.attn, scale), FusedMlp(block.mlp, scale)
        return cls(block.norm1, mixer, block.norm2, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(self.norm1(x), x)
        return self.mlp(self.norm2(x), x)


class Embed(nn.Module):
    """The model's patch-embedding convolution `proj`, writing tokens in the layout the fused blocks read fastest:
    token-major (S, B, C) for Mixer; row-major (B, H, W, C) otherwise, which the convolution writes directly from a
    channels_last image (the plain model's permuted NCHW map makes every later product read a transposed operand)."""

    def __init__(self, proj: nn.Conv2d, token_major: bool):
        super().__init__()
        self.proj, self.token_major = proj, token_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_major:
            return self.proj(x).flatten(2).permute(2, 0, 1).contiguous()
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class InferenceModel(nn.Module):
    """What `optimize_for_inference` returns: `forward(x)` gives the model's output (logits, or the
    fork_feat maps) and `forward_features(x)` its features, both under `torch.no_grad()` with autocast off.

    `layers` run in order on the tokens (token-major (S, B, C) for Mixer, (B, H, W, C) otherwise); `stage_norms`
    (fork_feat of CycleMLP and Wave-MLP) maps a layer index to the norm whose NCHW output is a feature map.
    """

    def __init__(
        self,
        model: nn.Module,
        embed: nn.Module,
        layers: list[nn.Module],
        token_major: bool,
        stage_norms: dict[int, nn.Module] | None = None,
    ):
        super().__init__()
        self.accepts, self.global_pool = model.accepts, model.global_pool
        self.embed, self.layers, self.norm, self.head = embed, nn.ModuleList(layers), model.norm, model.head
        self.token_major = token_major
        self.stage_norms = nn.ModuleDict({str(i): norm for i, norm in (stage_norms or {}).items()})
        self.eval().requires_grad_(False)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, *self.accepts)
        x = self.embed(x)
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if str(i) in self.stage_norms:
                maps.append(self.stage_norms[str(i)](x).permute(0, 3, 1, 2).contiguous())
        return maps if self.stage_norms else self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            tokens = self._tokens(x)
            return tokens.transpose(0, 1).contiguous() if self.token_major and not self.stage_norms else tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            tokens = self._tokens(x)
            if self.stage_norms:
                return tokens
            if self.global_pool == "avg":
                return self.head(tokens.mean(0 if self.token_major else (1, 2)))
            return self.head(tokens.transpose(0, 1).contiguous() if self.token_major else tokens)


def qualified_name(cls: type) -> str:
    """Module and name: LoRA's and quantised layers are also called `Linear`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def check_plain(model: nn.Module) -> None:
    """Refuse, naming the module and the reason, a model the fused modules would silently compute wrong: one that
    is not exactly a family's model, has hooks (also torch.nn.utils.prune's), parametrisations, or any module,
    parameter or buffer other than those its constructor builds from `model.config` (LoRA layers, quantised or
    subclassed Linear, wrappers)."""
    if type(model) not in FAMILIES:
        names = ", ".join(family.__name__ for family in FAMILIES)
        raise TypeError(f"optimize_for_inference takes an allmlp model ({names}), got {type(model).__name__}")
    for name, module in model.named_modules():
        where = f"{type(model).__name__}.{name}" if name else type(model).__name__
        hooks = [
            kind
            for kind in ("forward_pre_hooks", "forward_hooks", "backward_pre_hooks", "backward_hooks")
            if getattr(module, f"_{kind}", None)
        ]
        if hooks:
            raise ValueError(
                f"optimize_for_inference: {where} has {' and '.join(hooks)} (torch.nn.utils.prune also adds one); "
                f"the fused inference module would not call them. Remove them (or prune.remove) first"
            )
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"optimize_for_inference: {where} is parametrised (torch.nn.utils.parametrize); the fused module "
                f"would read the raw weights. Use parametrize.remove_parametrizations(..., leave_parametrized=True)"
            )
    with torch.device("meta"):
        reference = type(model)(**model.config)
    expected = {name: type(module) for name, module in reference.named_modules()}
    for name, module in model.named_modules():
        want = expected.pop(name, None)
        if type(module) is not want:
            what = "no module" if want is None else qualified_name(want)
            raise ValueError(
                f"optimize_for_inference: {type(model).__name__}.{name} is a {qualified_name(type(module))} where the "
                f"model's constructor builds {what} (a wrapper, LoRA, quantised or subclassed layer?); the fused "
                f"module would compute the plain layer instead. Merge or remove it first"
            )
    if expected:
        raise ValueError(f"optimize_for_inference: {type(model).__name__} lacks {sorted(expected)[:3]}, which its "
                         f"config builds (a pruned or edited model?)")  # fmt: skip
    want = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    have = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if want != have:
        differ = sorted(name for name in want.keys() | have.keys() if want.get(name) != have.get(name))
        raise ValueError(
            f"optimize_for_inference: {type(model).__name__}'s parameters and buffers differ from those its "
            f"config builds: {', '.join(f'{n} {have.get(n)} (expected {want.get(n)})' for n in differ[:3])}"
        )


def optimize_for_inference(model: nn.Module) -> InferenceModel:
    """A new inference module computing `model.eval()`'s function (logits, or the fork_feat maps) from a
    copy of its current weights, in its dtype and on its device; `model` itself is left untouched.

    The result is in eval mode whatever mode `model` is in, its parameters are frozen and its `forward` and
    `forward_features` run under `torch.no_grad()`: it is for inference only (train the model, then optimize).
    It computes in the model's dtype with autocast off: `model.to(torch.bfloat16)` first for bfloat16.
    Refuses (TypeError / ValueError naming the module) a model with hooks, parametrisations or modules other than
    those its family builds, since the fused module would compute the plain layers and not what those change.
    """
    check_plain(model)
    model = copy.deepcopy(model).eval().requires_grad_(False)
    if isinstance(model, MlpMixer):
        blocks = [FusedBlock.of(block) for block in model.blocks]
        return InferenceModel(model, Embed(model.stem.proj, token_major=True), blocks, token_major=True)
    stage_norms = None
    if getattr(model, "fork_feat", False):
        stage_norms = {i: getattr(model, f"norm{i}") for i in model._stage_positions()}
    if isinstance(model, WaveMLP):
        for mixer in model.modules():
            if isinstance(mixer, PATM):
                mixer.tfc_h, mixer.tfc_w = PairedGroupConv(mixer.tfc_h), PairedGroupConv(mixer.tfc_w)
        return InferenceModel(model, model.patch_embed, list(model.network), token_major=False, stage_norms=stage_norms)
    layers = [nn.Sequential(*map(FusedBlock.of, layer)) if isinstance(layer, nn.Sequential) else layer
              for layer in model.network]  # fmt: skip
    embed = Embed(model.patch_embed.proj, token_major=False)
    return InferenceModel(model, embed, layers, token_major=False, stage_norms=stage_norms)
