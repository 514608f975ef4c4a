"""FastViTHD (MCi3) image encoder in plain PyTorch, with Apple's module and parameter names.

Two forms of the same network:
* the *fused* (re-parameterised) inference form that every released checkpoint stores
  (`reparam_conv`, `lkb_reparam`), built when `VisionConfig.inference_mode` is True;
* the *train-time* multi-branch form (conv+BN branches, scale and skip branches) for fine-tuning,
  which `reparameterize()` folds into the fused form exactly (branch kernels are BN-folded,
  zero-padded to the big kernel and summed; see FASTVLM_REFERENCE §1.4).
Names follow Apple's `mci.py` so Apple checkpoints load by prefix stripping; the transformers
(timm) names are handled by one rename table in `weights.py`.

Input (B, 3, S, S) in [0, 1] → output (B, 3072, S/64, S/64) from `conv_exp`. The forward is
device-blind; how it runs on a CPU (channels_last, micro-batches) is `fastvlm/device.py`'s
`CPUFastViTHD`, which splits it with `tail_start()` / `run_stages()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def conv_bn(cin: int, cout: int, k: int, stride: int, pad: int, groups: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding (bias-free) conv kernel."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """Conv kernel (C, C/groups, k, k) that copies each channel: 1 at its own centre tap."""
    in_per_group = channels // groups
    ker = torch.zeros(channels, in_per_group, k, k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels)
    ker[idx, idx % in_per_group, k // 2, k // 2] = 1.0
    return ker


def fused_conv(kernel: torch.Tensor, bias: torch.Tensor, stride: int, groups: int) -> nn.Conv2d:
    """A conv holding a folded (kernel, bias): the single conv of a re-parameterised block."""
    cout, cin_per_group, k, _ = kernel.shape
    conv = nn.Conv2d(cin_per_group * groups, cout, k, stride, k // 2, groups=groups)
    conv = conv.to(device=kernel.device, dtype=kernel.dtype)
    conv.weight.copy_(kernel)
    conv.bias.copy_(bias)
    return conv


class SEBlock(nn.Module):
    """Squeeze-excite over the full H×W (only in `conv_exp`)."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # true global mean, any resolution
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class MobileOneBlock(nn.Module):
    """conv (k×k) [+ 1×1 scale branch + BN skip at train time] → SE → activation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        inference_mode: bool = True,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = (
            cin,
            cout,
            kernel_size,
            stride,
            groups,
        )
        pad = kernel_size // 2
        self.se = SEBlock(cout) if use_se else nn.Identity()
        self.activation = nn.GELU() if use_act else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, kernel_size, stride, pad, groups=groups)
            return
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [conv_bn(cin, cout, kernel_size, stride, pad, groups) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = (
            conv_bn(cin, cout, 1, stride, 0, groups)
            if kernel_size > 1 and use_scale_branch
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.activation(self.se(self.reparam_conv(x)))
        out = 0
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(self.se(out))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv.weight, self.reparam_conv.bias
        ref = next(self.parameters())
        shape = (self.cout, self.cin // self.groups, self.k, self.k)
        kernel = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        bias = torch.zeros(self.cout, dtype=ref.dtype, device=ref.device)
        if self.rbr_scale is not None:
            w, b = fuse_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            p = self.k // 2
            kernel, bias = kernel + F.pad(w, [p, p, p, p]), bias + b
        if self.rbr_skip is not None:
            w, b = fuse_bn(identity_kernel(self.cin, self.groups, self.k, ref), self.rbr_skip)
            kernel, bias = kernel + w, bias + b
        for branch in self.rbr_conv:
            w, b = fuse_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + w, bias + b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if hasattr(self, "reparam_conv"):
            return
        kernel, bias = self.fused_kernel_bias()
        conv = fused_conv(kernel, bias, self.stride, self.groups)
        for name in ("rbr_conv", "rbr_scale", "rbr_skip"):
            delattr(self, name)
        self.reparam_conv = conv


class ReparamLargeKernelConv(nn.Module):
    """Grouped 7×7 stride-2 conv (+ 3×3 branch at train time), then GELU (MCi3 uses the act)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: int = 3,
        inference_mode: bool = True,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = (
            cin,
            cout,
            kernel_size,
            stride,
            groups,
        )
        self.small_k = small_kernel
        self.activation = nn.GELU()
        if inference_mode:
            self.lkb_reparam = nn.Conv2d(
                cin, cout, kernel_size, stride, kernel_size // 2, groups=groups
            )
            return
        self.lkb_origin = conv_bn(cin, cout, kernel_size, stride, kernel_size // 2, groups)
        self.small_conv = conv_bn(cin, cout, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.activation(self.lkb_reparam(x))
        return self.activation(self.lkb_origin(x) + self.small_conv(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if hasattr(self, "lkb_reparam"):
            return
        w, b = fuse_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        ws, bs = fuse_bn(self.small_conv.conv.weight, self.small_conv.bn)
        p = (self.k - self.small_k) // 2
        w, b = w + F.pad(ws, [p, p, p, p]), b + bs
        conv = fused_conv(w, b, self.stride, self.groups)
        del self.lkb_origin, self.small_conv
        self.lkb_reparam = conv


class PatchEmbed(nn.Module):
    """Down-sampling between stages: grouped 7×7/2 conv (1 → 2 channels per group) + 1×1 block."""

    def __init__(self, cin: int, cout: int, patch: int, stride: int, inference_mode: bool) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(cin, cout, patch, stride, cin, 3, inference_mode),
            MobileOneBlock(cout, cout, 1, 1, 1, inference_mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RepMixer(nn.Module):
    """Depthwise 3×3 token mixer. Fused: one conv that already contains the residual."""

    def __init__(
        self, dim: int, kernel_size: int, layer_scale_init: float, inference_mode: bool
    ) -> None:
        super().__init__()
        self.dim, self.k = dim, kernel_size
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
            return
        self.norm = MobileOneBlock(
            dim,
            dim,
            kernel_size,
            1,
            dim,
            False,
            use_act=False,
            use_scale_branch=False,
            num_conv_branches=0,
        )
        self.mixer = MobileOneBlock(dim, dim, kernel_size, 1, dim, False, use_act=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if hasattr(self, "reparam_conv"):
            return
        wm, bm = self.mixer.fused_kernel_bias()
        wn, bn = self.norm.fused_kernel_bias()
        ident = identity_kernel(self.dim, self.dim, self.k, wm)
        w = ident + self.layer_scale.unsqueeze(-1) * (wm - wn)
        b = self.layer_scale.reshape(-1) * (bm - bn)
        conv = fused_conv(w, b, 1, self.dim)
        del self.mixer, self.norm, self.layer_scale
        self.reparam_conv = conv


class ConvFFN(nn.Module):
    """dw 7×7 conv + eval BN (never fused in checkpoints) → 1×1 → GELU → 1×1."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = conv_bn(dim, dim, 7, 1, 3, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepCPE(nn.Module):
    """Conditional positional encoding: dw 7×7 conv + identity (fused into one conv)."""

    def __init__(self, dim: int, inference_mode: bool) -> None:
        super().__init__()
        self.dim = dim
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        else:
            self.pe = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return self.pe(x) + x

    @torch.no_grad()
    def reparameterize(self) -> None:
        if hasattr(self, "reparam_conv"):
            return
        w = self.pe.weight + identity_kernel(self.dim, self.dim, 7, self.pe.weight)
        conv = fused_conv(w, self.pe.bias, 1, self.dim)
        del self.pe
        self.reparam_conv = conv


class LayerNormChannel(nn.Module):
    """LayerNorm over C of an NCHW map (biased variance, eps 1e-5), Apple's formula."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MHSA(nn.Module):
    """Multi-head self-attention over the H·W pixels (no mask, no positional bias)."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C), row-major pixels
        qkv = self.qkv(t).reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, hd)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, cfg: VisionConfig, mlp_ratio: float) -> None:
        super().__init__()
        self.token_mixer = RepMixer(
            dim, cfg.repmixer_kernel_size, cfg.layer_scale_init_value, cfg.inference_mode
        )
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(cfg.layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, cfg: VisionConfig, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = LayerNormChannel(dim, cfg.layer_norm_eps)
        self.token_mixer = MHSA(dim, cfg.head_dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(cfg.layer_scale_init_value * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(cfg.layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


class FastViTHD(nn.Module):
    """Stem (`patch_embed`) → flat `network` list of stages / PatchEmbeds / RepCPEs → `conv_exp`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        im, d0 = cfg.inference_mode, cfg.embed_dims[0]
        self.patch_embed = nn.Sequential(
            MobileOneBlock(3, d0, 3, 2, 1, im, use_scale_branch=False),
            MobileOneBlock(d0, d0, 3, 2, d0, im, use_scale_branch=False),
            MobileOneBlock(d0, d0, 1, 1, 1, im),
        )
        network: list[nn.Module] = []
        for i, depth in enumerate(cfg.layers):
            dim = cfg.embed_dims[i]
            if i > 0:
                prev = cfg.embed_dims[i - 1]
                network.append(PatchEmbed(prev, dim, cfg.down_patch_size, cfg.down_stride, im))
            if cfg.pos_embs[i]:
                network.append(RepCPE(dim, im))
            block = RepMixerBlock if cfg.token_mixers[i] == "repmixer" else AttentionBlock
            network.append(
                nn.Sequential(*[block(dim, cfg, cfg.mlp_ratios[i]) for _ in range(depth)])
            )
        self.network = nn.ModuleList(network)
        d = cfg.embed_dims[-1]
        self.conv_exp = MobileOneBlock(d, cfg.hidden_size, 3, 1, d, im, use_se=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        return self.conv_exp(self.run_stages(x, 0, len(self.network)))  # (B, C, S/64, S/64)

    def tail_start(self) -> int:
        """Index in `network` where the first attention stage's resolution begins (its
        PatchEmbed / RepCPE), or the end when every stage is a RepMixer."""
        for i, m in enumerate(self.network):
            if isinstance(m, nn.Sequential) and len(m) and isinstance(m[0], AttentionBlock):
                while i > 0 and isinstance(self.network[i - 1], (PatchEmbed, RepCPE)):
                    i -= 1
                return i
        return len(self.network)

    def run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """`network[start:stop]` in order (lets a device policy split the tower)."""
        for stage in self.network[start:stop]:
            x = stage(x)
        return x

    def reparameterize(self) -> None:
        """Fold every train-time branch into the fused inference form (exact up to fp rounding)."""
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()
        self.config.inference_mode = True
