# Copyright (c) 2026 the magan authors
# SPDX-License-Identifier: MIT   (the licence's text ends the docstring: keep it in a copy)
"""
MAGAN: unsupervised image-to-image translation with multi-angle attention, in one file.

    MAGAN     Yang Bai-Bing, Chen Min-Rong, Ye Yong-Sen. Image-to-image Translation Model
              Combining GAN and Multi-angle Attention. Computer Systems & Applications, 2023,
              32(4): 283-292. The paper this file implements: "MAGAN (n)" is its equation n.
    U-GAT-IT  J. Kim, M. Kim, H. Kang, K. Lee. Unsupervised Generative Attentional Networks with
              Adaptive Layer-Instance Normalization for Image-to-Image Translation. ICLR 2020.
              MAGAN builds on it: "U-GAT-IT (n)".

Two generators translate between unpaired domains A and B (G_ab: A -> B, G_ba: B -> A). Each
looks at its encoder's features from three "angles" (global max pooling, global average pooling
and a spatial activation map), learns which channels and positions tell the domains apart, and
re-weights the features there before decoding. Per domain, a global and a local discriminator
use the same attention. Read top to bottom, the file is a tutorial of the paper:

    Part I, the model     1 normalisation  2 attention  3 generator  4 discriminator  5 losses
    Part II, training     6 one iteration  7 the config and the loop  8 what the loop calls
    Part III, using it    9 translate and export  10 KID  11 the command line
    Part IV, extras       12 several GPUs  13 the run page  14 bench  15 the laptop recipe

    python magan.py train                         # a demo on the bundled data in data/
    python magan.py train --data horse2zebra      # the paper's setting, CycleGAN folder layout
    python magan.py translate --ckpt runs/NAME/checkpoints/latest.pt --input photos --out out

Where we depart from the papers in ways that change the results (each argued where it is made):
  * the objective: MAGAN's eq. 8 plus U-GAT-IT's cycle and identity terms (weight 10 each) and its
    weight 1000 on G's attention loss (section 6); --preset eq8 is eq. 8 as printed;
  * least-squares adversarial loss, as U-GAT-IT's code (MAGAN prints the log loss: --gan-loss bce);
  * the style and content losses are L1 distances relative to the features' own size (section 5);
  * a global and a local discriminator per domain, as U-GAT-IT (MAGAN draws one);
  * light mode by default, U-GAT-IT's --light (section 3); the paper's full mode is --full;
  * --preset laptop only (short CPU runs): the detail skip and a cycle weight of 1 (section 15).

Not covered here, to keep one path through the file:
  * AGGAN (Tang et al., IJCNN 2019): mask fusion G(x) = R·M + x·(1 − M), attention-guided
    discriminators, total-variation and pixel losses;
  * Show, Attend and Translate (Yang et al., 2018): self-regularisation and its adaptive weight;
  * TensorBoard and other trackers (RUN/log.csv and RUN/index.html show the curves);
  * FID, and KID's random-subset protocol (torch-fidelity, torchmetrics);
  * DistributedDataParallel (section 12 says why) and fp16 mixed precision (bf16 needs no scaler).
Images are tensors in [-1, 1] everywhere.

MIT License. Copyright (c) 2026 the magan authors.
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import html
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.models import VGG19_Weights, inception_v3, vgg19
from torchvision.models.inception import InceptionA, InceptionC, InceptionE
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import save_image

class MaganError(Exception):
    """A problem the user can fix (a bad folder, missing weights, a wrong checkpoint). The command
    line prints its message without a traceback. The model itself raises plain ValueErrors."""

def first_line(error: BaseException) -> str:
    """The first line of an exception's message, with its type: enough to say what went wrong."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__

# #################################################################################################
#                                       PART I: THE MODEL
# #################################################################################################
# =================================================================================================
# 1. Normalisation (U-GAT-IT §2.1.1, eq. 1)
# =================================================================================================
# Instance norm (IN) removes each channel's own mean and variance: it keeps the content's layout
# and erases its local style. Layer norm (LN) normalises the whole feature map at once: it leaves
# the channels' relative statistics, that is the style, free to change globally. U-GAT-IT lets
# the network choose the mix per channel with a learnt ρ; that choice is what lets it change
# shapes (selfie -> anime) and not only textures.
# The statistics are computed in fp32 even where the rest of the network runs in bf16: a bf16
# variance of a large feature map loses its low bits.

def layer_instance_norm(x: torch.Tensor, rho: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ρ · â_I + (1 − ρ) · â_L for x: (B, C, H, W) and ρ: (1, C, 1, 1), in fp32.

    Biased variances, as nn.InstanceNorm2d and U-GAT-IT's TensorFlow code; its PyTorch port
    uses the unbiased torch.var, which differs by a factor HW / (HW − 1)."""
    x = x.float()
    # U-GAT-IT (1):  â_I = (a − μ_I) / √(σ_I² + ε),   â_L = (a − μ_L) / √(σ_L² + ε)
    x_i = F.instance_norm(x, eps=eps)             # μ_I, σ_I per sample and channel, over (H, W)
    x_l = F.layer_norm(x, x.shape[1:], eps=eps)   # μ_L, σ_L per sample, over (C, H, W)
    return rho * x_i + (1 - rho) * x_l

class AdaLIN(nn.Module):
    """Adaptive layer-instance norm, U-GAT-IT (1):
        AdaLIN(a, γ, β) = γ · (ρ · â_I + (1 − ρ) · â_L) + β

    γ and β are not parameters of this layer: the generator computes them from its attention
    features, one pair per sample (that is what makes it "adaptive"). ρ starts at 1, pure
    instance norm, as U-GAT-IT's text says (its PyTorch code starts at 0.9)."""

    def __init__(self, channels: int, rho_init: float = 1.0):
        super().__init__()
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), rho_init))

    def forward(self, x, gamma, beta):  # x: (B, C, H, W); gamma, beta: (B, C)
        return layer_instance_norm(x, self.rho) * gamma[:, :, None, None] + beta[:, :, None, None]

class LIN(AdaLIN):
    """Layer-instance norm of the up-sampling blocks: the same mix, with learnt γ and β. ρ starts
    at 0, pure layer norm, as U-GAT-IT says: the up-sampling layers draw the target domain's global
    style, which layer norm leaves free."""

    def __init__(self, channels: int):
        super().__init__(channels, rho_init=0.0)
        self.gamma = nn.Parameter(torch.ones(1, channels))
        self.beta = nn.Parameter(torch.zeros(1, channels))

    def forward(self, x):
        return super().forward(x, self.gamma, self.beta)  # γ, β: (1, C), the same for every sample

@torch.no_grad()
def clip_rho(network: nn.Module):
    """U-GAT-IT (1), the update of ρ:  ρ ← clip[0, 1](ρ − τΔρ). Called after every optimizer step:
    outside [0, 1] the mix would extrapolate past pure instance or pure layer norm."""
    for name, parameter in network.named_parameters():
        if name.endswith("rho"):
            parameter.clamp_(0.0, 1.0)

class InstanceNorm(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (no affine parameters, as U-GAT-IT's encoder) with fp32 statistics."""

    def forward(self, x):
        return super().forward(x.float())

# =================================================================================================
# 2. Multi-angle attention Γ (MAGAN §2.1, Fig. 3, eq. 1-2)
# =================================================================================================
# Three "angles" look at the encoder's feature map θ: (B, C, h, w). Each feeds a one-unit linear
# classifier that must tell the source domain from the target domain (a class activation map,
# CAM). The weights ω of a trained classifier then say which channels (GAP, GMP) or which
# positions (SAM) matter for that decision, and re-weight θ with them:
#
#   GMP  α_n = max_ij θ_n^ij     ξ_α = Σ_n ω_α^n · α_n    a_α = ω_α ⊙ θ   (per channel)
#   GAP  β_n = mean_ij θ_n^ij    ξ_β = Σ_n ω_β^n · β_n    a_β = ω_β ⊙ θ   (per channel)
#   SAM  γ   = Σ_n |θ_n|^p       ξ_γ = Σ_m ω_γ^m · γ_m    a_γ = ω_γ ⊙ θ   (per position m)
#
# GMP finds the object's strongest parts, GAP its extent (U-GAT-IT's CAM uses both). SAM is
# MAGAN's addition: γ sums the channels' activation energy at each position, so its classifier
# learns *where* the domains differ rather than in which channels. A larger p favours the most
# active positions: p = 2 in G, which must find the region to translate; p = 1 in D, which must
# judge the whole image (MAGAN §2.2, MAGAN Table 5).
# The logits are sums of products in fp32, written as the equations above: they stay fp32 under
# bf16 autocast, which would round a matrix product (and its gradient) to 8 bits of mantissa.

class MultiAngleAttention(nn.Module):
    """θ: (B, C, h, w) -> a(x): (B, C, h, w), Γ(x): (B, n_angles) and the heatmap Σ_c a(x):
    (B, 1, h, w), for pictures only (MAGAN eq. 1-2).

    `grid`: the side h = w of θ at the training size (SAM's classifier has a weight per position).
    `angles`: "ma" (GAP, GMP, SAM), "cam" (GAP, GMP: U-GAT-IT), "sam", or "none" (θ goes straight
    to the 1x1 conv, and there are no class logits): the ablations of MAGAN Table 4.
    `spectral`: spectral norm on the classifiers (in D). `leaky`: LeakyReLU(0.2) after the 1x1
    conv (D) instead of ReLU (G).

    >>> attention = MultiAngleAttention(channels=64, grid=16)   # θ of a 64-px image in G: S/4 = 16
    >>> a, logits, heatmap = attention(torch.randn(2, 64, 16, 16))   # θ: (B, C, h, w)
    >>> tuple(a.shape), tuple(logits.shape), tuple(heatmap.shape)
    ((2, 64, 16, 16), (2, 3), (2, 1, 16, 16))
    """

    ANGLES = {"ma": ("gap", "gmp", "sam"), "cam": ("gap", "gmp"), "sam": ("sam",), "none": ()}

    def __init__(self, channels: int, grid: int, angles: str = "ma", p: float = 2.0,
                 spectral: bool = False, leaky: bool = False):
        super().__init__()
        if p < 1:  # |θ|^p, p < 1, has an infinite gradient at θ = 0 (and ReLU features often are)
            raise ValueError(f"SAM exponent p = {p} < 1")
        maybe_sn = spectral_norm if spectral else (lambda m: m)
        n_inputs = {"gap": channels, "gmp": channels, "sam": grid * grid}
        self.fc = nn.ModuleDict({name: maybe_sn(nn.Linear(n_inputs[name], 1, bias=False))
                                 for name in self.ANGLES[angles]})
        self.grid, self.p = grid, p
        # The angles' re-weighted copies of θ are stacked (n·C channels) and a 1x1 conv mixes them
        # back to C: each output channel may combine channel-wise (GAP, GMP) and position-wise
        # (SAM) emphasis. No spectral norm on it, in G or D: U-GAT-IT's Tables 5-6 list one on
        # every conv of D but this one, and its code leaves it out too.
        self.conv1x1 = nn.Conv2d(max(1, len(self.fc)) * channels, channels, 1)
        self.act = nn.LeakyReLU(0.2) if leaky else nn.ReLU()

    def sam_weight_map(self, h: int, w: int) -> torch.Tensor:
        """SAM's classifier weights ω_γ as an (h, w) map. The classifier is tied to the training
        grid: on another grid (translating at another size, eval mode only) the map is resized
        bilinearly. In training that would silently train a resized copy, so it is an error."""
        weight = self.fc["sam"].weight.view(1, 1, self.grid, self.grid)
        if (h, w) != (self.grid, self.grid):
            if self.training:
                raise ValueError(f"SAM of a {self.grid}x{self.grid} grid got {h}x{w} in training")
            weight = F.interpolate(weight, size=(h, w), mode="bilinear", align_corners=False)
        return weight.view(h, w)

    def forward(self, theta: torch.Tensor):                                    # θ: (B, C, h, w)
        B, C, h, w = theta.shape
        pooled = theta.float()  # the logits' inputs in fp32, whatever autocast made of θ
        logits, maps = [], []
        # Each `fc.weight` is read once, never through fc(...). Under the spectral norm imported
        # above (torch.nn.utils.parametrizations) the read *computes* the normalised weight, with
        # its gradient, and runs one power iteration. Beware the older torch.nn.utils.spectral_norm
        # of U-GAT-IT's code and most tutorials: it refreshes .weight only when fc(...) is called,
        # so this read would give D's attention classifiers no gradient at all.
        for name, pool in (("gap", torch.mean), ("gmp", torch.amax)):            # β, α: (B, C)
            if name in self.fc:
                weight = self.fc[name].weight.view(C)                          # ω_β or ω_α: (C,)
                logits.append((pool(pooled, dim=(2, 3)) * weight).sum(1, keepdim=True))  # (B, 1)
                maps.append(theta * weight.view(1, C, 1, 1))            # a_β, a_α: (B, C, h, w)
        if "sam" in self.fc:
            # SAM's map γ = Σ_n |θ_n|^p, the activation energy at each position (named `energy`
            # here, to keep the name γ for AdaLIN's scale).
            energy = pooled.abs().pow(self.p).sum(dim=1).flatten(1)            # γ: (B, h·w)
            # Choice: γ is scaled to unit root-mean-square per sample. Raw γ grows like C·|θ|^p
            # and would swamp the other logits. Unit *L2 norm* (as activation-based attention
            # transfer) is too small: under D's spectral norm |ω_γ| = 1 would keep ξ_γ in
            # [-1, 1], short of the LSGAN targets (data/experiments.md, "SAM's scale").
            energy = energy * torch.rsqrt(energy.square().mean(dim=1, keepdim=True) + 1e-12)
            weight = self.sam_weight_map(h, w)                                 # ω_γ: (h, w)
            logits.append((energy * weight.flatten()).sum(1, keepdim=True))    # ξ_γ: (B, 1)
            maps.append(theta * weight)                                        # a_γ: (B, C, h, w)
        # MAGAN (1):  Γ(x) = Concat(ξ_α, ξ_β, ξ_γ). We keep U-GAT-IT's order, GAP before GMP:
        # (ξ_β, ξ_α, ξ_γ). Each logit gets the same loss, so the order changes nothing.
        logits = torch.cat(logits, dim=1) if logits else theta.new_zeros(B, 0, dtype=torch.float32)
        # MAGAN (2) prints a_G(x) = Conv(a_α, a_β), two inputs; its text weights θ with SAM's map
        # too, so we read three:  a(x) = act(Conv1x1(Concat(a_β, a_α, a_γ))).
        stacked = torch.cat(maps, dim=1) if maps else theta                    # (B, n·C, h, w)
        a = self.act(self.conv1x1(stacked))                                    # (B, C, h, w)
        return a, logits, a.sum(dim=1, keepdim=True)                   # heatmap: (B, 1, h, w)

# =================================================================================================
# 3. Generator (MAGAN §2.1, Fig. 2(b); its layers: U-GAT-IT Table 4, in its appendix)
# =================================================================================================
#
#   x ─ encoder E ─ θ ─ attention ─ a(x) ─ MLP ─ (γ, β)
#                                    └──── AdaLIN residual blocks (γ, β) ─ up-sampling ─ G(x)
#
# Three choices recur in the layer tables below:
#   * bias=False before a normalisation layer: the norm subtracts each channel's mean, which
#     cancels any bias the convolution adds; it would be a parameter that never learns anything.
#   * Reflection padding: zero padding makes the border look like a dark frame, which a
#     translator then learns to paint; mirroring keeps the border's statistics like the interior's.
#   * Up-sampling by nearest neighbour, then a 3x3 convolution, rather than a transposed
#     convolution, whose uneven kernel overlap draws checkerboard artifacts (Odena et al., 2016).

class ResBlock(nn.Module):
    """Encoder residual block: x + IN(conv(pad(ReLU(IN(conv(pad(x))))))). The skip lets each block
    learn a correction to its input, which keeps the gradient path short in a deep encoder."""

    def __init__(self, C: int):  # C channels in and out
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3, bias=False), InstanceNorm(C), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3, bias=False), InstanceNorm(C))

    def forward(self, x):
        return x + self.body(x)

class AdaLINResBlock(nn.Module):
    """Decoder residual block: the same, with AdaLIN(γ, β) in place of instance norm."""

    def __init__(self, C: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3, bias=False))
        self.norm1 = AdaLIN(C)
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3, bias=False))
        self.norm2 = AdaLIN(C)

    def forward(self, x, gamma, beta):
        h = F.relu(self.norm1(self.conv1(x), gamma, beta))
        return x + self.norm2(self.conv2(h), gamma, beta)

class Generator(nn.Module):
    """x: (B, 3, S, S) -> the translation G(x): (B, 3, S, S) in [-1, 1], the attention's class
    logits Γ_G(x): (B, n_angles) and its heatmap: (B, 1, S/4, S/4). S is a multiple of 4; a
    full-mode G runs at its `size` only, a light one at any (SAM's weights are then resized).

    `light`: the γ, β MLP reads the global average of a(x) (U-GAT-IT's --light) instead of the
    whole flattened map (the paper's full mode: C·(S/4)²·C weights, 268M at S = 256, ch = 64).

    >>> G = Generator(ch=8, n_res=2, size=64)                  # C = 4·ch = 32 channels at S/4
    >>> image, logits, heatmap = G(torch.rand(2, 3, 64, 64) * 2 - 1)   # images in [-1, 1]
    >>> tuple(image.shape), tuple(logits.shape), tuple(heatmap.shape)
    ((2, 3, 64, 64), (2, 3), (2, 1, 16, 16))
    """

    def __init__(self, ch: int = 64, n_res: int = 4, size: int = 256, light: bool = True,
                 attention: str = "ma", p: float = 2.0):
        super().__init__()
        C, grid = 4 * ch, size // 4
        # Encoder E: a 7x7 conv to ch, two stride-2 3x3 convs to 2ch and 4ch = C, n_res res blocks.
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ch, 7, bias=False), InstanceNorm(ch),
                  nn.ReLU()]
        for i in range(2):
            c = ch * 2**i
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(c, 2 * c, 3, stride=2, bias=False),
                       InstanceNorm(2 * c), nn.ReLU()]
        layers += [ResBlock(C) for _ in range(n_res)]
        self.encoder = nn.Sequential(*layers)
        self.attention = MultiAngleAttention(C, grid, attention, p)
        self.light, self.grid = light, grid
        # γ, β: two FC + ReLU layers of width C, then one linear head each (U-GAT-IT Table 4).
        self.mlp = nn.Sequential(nn.Linear(C if light else C * grid * grid, C, bias=False),
                                 nn.ReLU(), nn.Linear(C, C, bias=False), nn.ReLU())
        self.to_gamma = nn.Linear(C, C, bias=False)
        self.to_beta = nn.Linear(C, C, bias=False)
        self.res_blocks = nn.ModuleList(AdaLINResBlock(C) for _ in range(n_res))
        # Decoder: nearest x2, 3x3 conv, LIN, ReLU (twice: C -> C/2 -> C/4 = ch), a 7x7 conv to RGB.
        layers = []
        for i in range(2):
            c = C // 2**i
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                       nn.Conv2d(c, c // 2, 3, bias=False), LIN(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, 3, 7, bias=False)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):                             # x: (B, 3, S, S)
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of 4")
        theta = self.encoder(x)                                     # θ: (B, C, S/4, S/4)
        if not self.light and theta.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"full mode runs at {4 * self.grid} px only, not {x.shape[-1]}")
        a, logits, heatmap = self.attention(theta)                  # a(x): (B, C, S/4, S/4)
        style = a.mean(dim=(2, 3)) if self.light else a.flatten(1)  # (B, C) or (B, C·(S/4)²)
        style = self.mlp(style)                                     # (B, C)
        gamma, beta = self.to_gamma(style), self.to_beta(style)     # (B, C) each
        h = a                                                       # the decoder starts from a(x)
        for block in self.res_blocks:
            h = block(h, gamma, beta)                               # (B, C, S/4, S/4)
        return torch.tanh(self.decoder(h)), logits, heatmap         # G(x): (B, 3, S, S)

# =================================================================================================
# 4. Discriminator (MAGAN §2.2, eq. 3; its layers: U-GAT-IT Tables 5-6)
# =================================================================================================
# Per domain, two PatchGAN discriminators judge every patch of an image: a local one down to S/8
# (a 70x70 receptive field at 256 px: textures, stripes) and a global one down to S/32 (286x286:
# the whole object and its shape). Each has the same multi-angle attention, with p = 1.
#   * Spectral norm on every convolution and classifier (all but the 1x1 conv after the attention,
#     as U-GAT-IT) bounds D's Lipschitz constant, so its logits cannot grow without limit and the
#     least-squares game stays stable.
#   * LeakyReLU(0.2): G learns only through the gradient that flows back through D; a ReLU would
#     block it wherever a unit is negative.

def global_depth(size: int) -> int:
    """Stride-2 convs of the global discriminator: 5 (to S/32) as U-GAT-IT, wherever that leaves a
    grid of 3x3 or more for the two stride-1 4x4 convs after it (S >= 96); below, fewer (S = 64:
    4, S = 32: 3), where U-GAT-IT's own code fails (its padding is larger than a 2x2 map)."""
    depth = 5
    while size // 2**depth < 3:
        depth -= 1
    return depth

class Discriminator(nn.Module):
    """z: (B, 3, S, S) -> Φ(z), one real/fake logit per patch: (B, 1, h−1, h−1), the attention's
    class logits Γ_D(z): (B, n_angles) and its heatmap: (B, 1, h, h), where h = S / 2^n_down − 1.

    >>> D = Discriminator(ch=8, n_down=3, size=64)             # a local D: down to S/8, h = 8 − 1
    >>> patch, logits, heatmap = D(torch.rand(2, 3, 64, 64) * 2 - 1)
    >>> tuple(patch.shape), tuple(logits.shape), tuple(heatmap.shape)
    ((2, 1, 6, 6), (2, 3), (2, 1, 7, 7))
    """

    def __init__(self, ch: int = 64, n_down: int = 5, size: int = 256, attention: str = "ma",
                 p: float = 1.0):
        super().__init__()
        # n_down stride-2 4x4 convs (widths ch, 2ch, ... ch·2^(n_down−1)), then one stride-1 4x4
        # conv to C = ch·2^n_down: U-GAT-IT Table 5 (local, n_down = 3) and 6 (global, 5).
        widths = [3] + [ch * 2**i for i in range(n_down)]                      # 3, ch, 2ch, ...
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2)),
                       nn.LeakyReLU(0.2)]
        C = ch * 2**n_down
        layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(C // 2, C, 4)), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers)
        self.attention = MultiAngleAttention(C, size // 2**n_down - 1, attention, p, spectral=True,
                                             leaky=True)
        self.classifier = nn.Sequential(nn.ReflectionPad2d(1),
                                        spectral_norm(nn.Conv2d(C, 1, 4, bias=False)))

    def forward(self, z: torch.Tensor):                            # z: (B, 3, S, S)
        theta = self.encoder(z)                                      # θ: (B, C, h, h)
        a, logits, heatmap = self.attention(theta)
        # MAGAN (3):  Φ(z) = σ(Conv(a_D(z))). The sigmoid σ is left to the loss: the least-squares
        # loss reads the raw logits, as U-GAT-IT's code does.
        return self.classifier(a), logits, heatmap                  # Φ: (B, 1, h−1, h−1)

# =================================================================================================
# 5. Losses (MAGAN §2.3, eq. 4-7; U-GAT-IT §2.2, eq. 2-6)
# =================================================================================================
# For the direction a -> b (b -> a is symmetric): x_a and x_b are real images, fake_ab = G_ab(x_a),
# and the reconstruction is G_ba(fake_ab). The training step (section 6) adds the terms up.

def adversarial_loss(logits: torch.Tensor, is_real: bool, kind: str = "lsgan") -> torch.Tensor:
    """MAGAN (4):  L_adv = E_y[log D(y)] + E_x[log(1 − D(G(x)))]   (kind="bce", as MAGAN prints it)
    U-GAT-IT (2):  L_lsgan = E_y[D(y)²] + E_x[(1 − D(G(x)))²]      (kind="lsgan", our default)

    Both are printed as one expression that D maximises and G minimises. Like U-GAT-IT's code, we
    train D towards real -> 1 and fake -> 0 and G towards fake -> 1. Why least squares: its error
    keeps pulling a fake towards "real" even where D rejects it confidently, where the log loss
    saturates and its gradient vanishes. Each call scores one side: every logit against target 1
    (is_real) or 0, in fp32."""
    logits = logits.float()
    if logits.numel() == 0:  # attention "none" has no class logits
        return logits.new_zeros(())
    loss = F.mse_loss if kind == "lsgan" else F.binary_cross_entropy_with_logits
    return loss(logits, torch.full_like(logits, float(is_real)))

def cam_loss(logits_source: torch.Tensor, logits_target: torch.Tensor) -> torch.Tensor:
    """U-GAT-IT (5):  L_cam = −(E_{x∼X_s}[log η_s(x)] + E_{x∼X_t}[log(1 − η_s(x))]).

    MAGAN (7) prints L_cate^G = E||Γ_G(x) − Γ_G(y)||₁, garbled in extraction; we read it as
    U-GAT-IT's CAM loss: G_ab's attention classifiers must say "source domain" (1) on the images
    they translate (x_a) and "not source" (0) on target-domain images (x_b, seen in the identity
    pass). This is what makes the attention weights point at what differs between the domains.
    Both terms are binary cross-entropies, as in adversarial_loss(kind="bce")."""
    return (adversarial_loss(logits_source, True, "bce")
            + adversarial_loss(logits_target, False, "bce"))

def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """M = F Fᵀ / (C·H·W) for features F: (B, C, H·W): how strongly each pair of channels fires
    together, wherever that happens. Always fp32: a bf16 Gram loses the small differences the
    style loss measures, so autocast is switched off here."""
    with torch.autocast(features.device.type, enabled=False):
        B, C, H, W = features.shape
        f = features.float().reshape(B, C, H * W)              # (B, C, H·W)
        return f @ f.transpose(1, 2) / (C * H * W)             # (B, C, C)

# Why relative: MAGAN (5) and (6) print a plain ‖·‖₁, but the size of VGG's activations, and so of
# an L1 between them and of its gradient, depends on which VGG weights are loaded, by orders of
# magnitude: beside a cycle term of about 1 weighted 10, the plain style term was 1e-5 to 1e-3 and
# inert at any default weight. As a fraction of the features' own size both terms lie between
# 0 and 1 whatever VGG is loaded, and their weights mean the same on every machine.
def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ|a − b| / (Σ|a| + Σ|b|) per sample, averaged over the batch: an L1 distance as a fraction
    of the two tensors' size, from 0 (equal) to 1 (nothing in common). The denominator is held
    constant for the gradient: it only sets the scale, so the gradient points where plain L1's
    does. a, b: (B, ...); computed in fp32."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    size = (a.abs().sum(dim=1) + b.abs().sum(dim=1)).detach().clamp_min(1e-12)   # (B,)
    return ((a - b).abs().sum(dim=1) / size).mean()

def style_loss(features_fake: torch.Tensor, features_real: torch.Tensor) -> torch.Tensor:
    """MAGAN (5):  L_style = E||M(φ4(G(x))) − M(φ4(y))||₁, φ4 = VGG19 relu4_4 and y a real image
    of the target domain (the x_b of the same iteration); the L1 relative to the Grams' size."""
    return relative_l1(gram_matrix(features_fake), gram_matrix(features_real))

def content_loss(features_cycle: torch.Tensor, features_input: torch.Tensor) -> torch.Tensor:
    """MAGAN (6):  L_rec = E||φ5(G_ba(G_ab(x))) − φ5(x)||₁, φ5 = VGG19 relu5_4: the cycle, compared
    in VGG's semantic features rather than in pixels; the L1 relative to the features' size."""
    return relative_l1(features_cycle, features_input)

class VGGFeatures(nn.Module):
    """Frozen VGG19 that maps images in [-1, 1] to the features the two losses compare: relu4_4
    (style) and relu5_4 (content), torchvision's `features[:27]` and `features[:36]`. It only
    scores images: its parameters never get gradients."""

    def __init__(self, vgg: nn.Module):  # a torchvision VGG19
        super().__init__()
        self.to_relu4_4, self.to_relu5_4 = vgg.features[:27], vgg.features[27:36]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()  # (no layer of it depends on the mode)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std          # [-1, 1] -> [0, 1] -> ImageNet's scale
        relu4_4 = self.to_relu4_4(x)                       # (B, 512, S/8, S/8)
        return relu4_4, self.to_relu5_4(relu4_4)           # and (B, 512, S/16, S/16)

VGG_HELP = """the style and content losses need VGG19's ImageNet weights ({reason}). Fixes:
  * run once with internet (they go to {cache}), or copy vgg19-dcbb9e9d.pth there
  * --vgg-weights PATH: that file, elsewhere;  --w-style 0 --w-content 0: no VGG losses
  * --vgg-weights random: random VGG features, for offline smoke runs only (NOT the paper)"""

def load_vgg(spec: str) -> VGGFeatures:
    """torchvision's VGG19 for the two losses: imagenet | PATH | random. Offline, the first fails
    with the fixes above (a MaganError: the command line prints it as one line)."""
    try:
        if spec == "imagenet":
            return VGGFeatures(vgg19(weights=VGG19_Weights.IMAGENET1K_V1))
        net = vgg19()  # torchvision's initialisation: a random VGG is for smoke runs only
        if spec != "random":
            state = torch.load(spec, map_location="cpu", weights_only=True)
            state = {k[9:]: v for k, v in state.items() if k.startswith("features.")}
            net.features.load_state_dict(state)
        return VGGFeatures(net)
    except Exception as e:
        cache = f"{torch.hub.get_dir()}/checkpoints"
        raise MaganError(VGG_HELP.format(reason=first_line(e), cache=cache)) from None

# #################################################################################################
#                                      PART II: TRAINING
# #################################################################################################
# =================================================================================================
# 6. One iteration (MAGAN §2.3, eq. 8; U-GAT-IT §2.2, eq. 7 and U-GAT-IT appendix B.2)
# =================================================================================================

class MAGAN(nn.Module):
    """The six networks of a run: two generators and, per domain, a global and a local
    discriminator. D_ga and D_la judge domain A (real x_a against G_ba's fakes), D_gb and D_lb
    domain B. MAGAN's Fig. 2 draws one D per domain; it builds on U-GAT-IT, which keeps both
    scales, and so do we. Initialisation: PyTorch's defaults, as U-GAT-IT's PyTorch code (its text
    gives N(0, 0.02)); spectral norm rescales every D weight anyway."""

    def __init__(self, cfg):  # any object with the Config fields (section 7) the networks read
        super().__init__()
        def D(n_down):
            return Discriminator(cfg.ch, n_down, cfg.size, cfg.attention, cfg.p_dis)
        self.G_ab, self.G_ba = make_generator(cfg), make_generator(cfg)
        self.D_ga, self.D_gb = D(global_depth(cfg.size)), D(global_depth(cfg.size))  # to S/32
        self.D_la, self.D_lb = D(3), D(3)                                            # to S/8
        self.generators = [self.G_ab, self.G_ba]
        self.discriminators = [self.D_ga, self.D_gb, self.D_la, self.D_lb]

def make_generator(cfg) -> Generator:
    """The paper's Generator; with --detail-skip, the laptop recipe's DetailSkipGenerator
    (section 15: not the paper), which adds one step after the same network."""
    kind = DetailSkipGenerator if cfg.detail_skip else Generator
    return kind(cfg.ch, cfg.n_res, cfg.size, cfg.light, cfg.attention, cfg.p_gen)

# MAGAN (8) defines one objective per player:
#   L_{G,Γ_G} = L_adv + L_style + L_rec + L_cate^G      minimised by the generators
#   L_{D,Γ_D} = −L_adv − L_cate^D                        minimised by the discriminators
# (With least squares each player instead minimises its own squared distance to its targets, as
# U-GAT-IT's code does.) With U-GAT-IT's terms and weights, summed over both directions:
#
#   L_G = λ_adv L_adv + λ_cycle L_cycle + λ_identity L_identity + λ_cam L_cam      (U-GAT-IT (7))
#         + λ_style L_style + λ_content L_rec                                      (MAGAN (5), (6))
#   L_D = λ_adv (L_adv + L_cam^D): the adversarial loss on the patch and class logits of each D
#
# Why λ_cam = 1000: the attention classifiers decide *where* the generator translates, and the
# adversarial gradient that reaches the encoder is weak and noisy. U-GAT-IT weights the CAM loss
# so heavily that the classifiers are accurate within the first thousand iterations. So the G loss
# starts at several thousand, almost all of it the CAM term: expected, not a divergence.
#
# One iteration, in the order of U-GAT-IT's code (and of CycleGAN's before it):
#   1. translate: G_ab(x_a) and G_ba(x_b), with the identity passes G_ab(x_b) and G_ba(x_a) in
#      the same batches (instance and layer norm work per sample: batching changes only the speed);
#   2. a D step: each D sees its domain's real images and the *detached* fakes made for it;
#   3. a G step: D frozen and just updated, the generators learn to fool it, to come back (cycle),
#      to leave the target domain's images alone (identity), and to tell the domains apart in their
#      attention (CAM);
#   4. every ρ is clipped into [0, 1].
# The fakes of step 1 serve both steps: computed once (U-GAT-IT's code computes them twice; the
# generators have not changed in between, so the numbers are the same).

def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, networks, sync=None):
    """Backward, then (with several processes) average the gradients, then one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync(networks)
    optimizer.step()

def train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast=nullcontext(), sync=None) -> dict:
    """One iteration on x_a, x_b: (B, 3, S, S) in [-1, 1]. `nets`: the six networks (MAGAN above);
    `vgg`: a VGGFeatures, or None when the style and content weights are 0; `cfg`: the weights
    w_adv ... w_content and gan_loss (section 7); `sync`: averages gradients over processes
    (section 12). Returns L_D, L_G and each term of L_G before its weight, as 0-d tensors (no
    .item(): a GPU is never made to wait)."""
    adv = lambda logits, real: adversarial_loss(logits, real, cfg.gan_loss)
    # 1. Translate: [G_ab(x_a); G_ab(x_b)] and [G_ba(x_b); G_ba(x_a)], (2B, 3, S, S) each.
    with autocast:
        image_ab, class_ab, _ = nets.G_ab(torch.cat([x_a, x_b]))
        image_ba, class_ba, _ = nets.G_ba(torch.cat([x_b, x_a]))
    fake_ab, same_b = image_ab.chunk(2)                    # G_ab(x_a), G_ab(x_b): (B, 3, S, S)
    fake_ba, same_a = image_ba.chunk(2)                    # G_ba(x_b), G_ba(x_a)
    judges = [(nets.D_ga, x_a, fake_ba), (nets.D_la, x_a, fake_ba),       # domain A's two Ds
              (nets.D_gb, x_b, fake_ab), (nets.D_lb, x_b, fake_ab)]       # domain B's two Ds

    # 2. The D step: U-GAT-IT (2) on the patch logits and (6) on the class logits, real -> 1 and
    #    fake -> 0. MAGAN (7) prints the class term as L_cate^D = E||Γ_D(y) − Γ_D(G(x))||₂, garbled;
    #    we read it as U-GAT-IT's. The fakes are detached: D's loss must not train the generators.
    #    Real and fake go through D in one batch: no layer of D mixes samples.
    for D in nets.discriminators:
        D.requires_grad_(True)
    l_d = 0
    with autocast:
        for D, real, fake in judges:
            patch, logits, _ = D(torch.cat([real, fake.detach()]))
            patch_real, patch_fake = patch.chunk(2)                   # (B, 1, h−1, h−1) each
            class_real, class_fake = logits.chunk(2)                  # (B, n_angles) each
            l_d = (l_d + adv(patch_real, True) + adv(patch_fake, False)
                   + adv(class_real, True) + adv(class_fake, False))
    l_d = cfg.w_adv * l_d
    update(opt_D, l_d, nets.discriminators, sync)

    # 3. The G step. D is frozen: the gradient flows through it into the fakes, but no gradient
    #    of D's own parameters is computed.
    for D in nets.discriminators:
        D.requires_grad_(False)
    zero = x_a.new_zeros((), dtype=torch.float32)
    with autocast:
        rec_a, _, _ = nets.G_ba(fake_ab)                          # G_ba(G_ab(x_a)): (B, 3, S, S)
        rec_b, _, _ = nets.G_ab(fake_ba)                          # G_ab(G_ba(x_b))
        l_adv = zero                                              # MAGAN (4), G's side: the fakes
        for D, _, fake in judges:                                 # should score "real" on the
            patch, logits, _ = D(fake)                            # patch and class logits
            l_adv = l_adv + adv(patch, True) + adv(logits, True)
        # U-GAT-IT (3):  L_cycle = E_{x∼X_s}[|x − G_t→s(G_s→t(x))|₁]
        l_cycle = F.l1_loss(rec_a.float(), x_a) + F.l1_loss(rec_b.float(), x_b)
        # U-GAT-IT (4):  L_identity = E_{x∼X_t}[|x − G_s→t(x)|₁]
        l_identity = F.l1_loss(same_b.float(), x_b) + F.l1_loss(same_a.float(), x_a)
        # U-GAT-IT (5), our reading of MAGAN (7): each G's classifiers on (its source, its target)
        l_cam = cam_loss(*class_ab.chunk(2)) + cam_loss(*class_ba.chunk(2))
        l_style = l_content = zero
        if cfg.w_style > 0 or cfg.w_content > 0:  # VGG19 runs only for a term that is on
            f4, f5 = vgg(torch.cat([fake_ab, fake_ba, rec_a, rec_b]))   # relu4_4, relu5_4 of 4B
            with torch.no_grad():
                r4, r5 = vgg(torch.cat([x_a, x_b]))                    # their targets: 2B images
            (f4_ab, f4_ba, _, _), (_, _, f5_a, f5_b) = f4.chunk(4), f5.chunk(4)
            (r4_a, r4_b), (r5_a, r5_b) = r4.chunk(2), r5.chunk(2)
            if cfg.w_style > 0:    # MAGAN (5): a translation has the target domain's Gram matrices
                l_style = style_loss(f4_ab, r4_b) + style_loss(f4_ba, r4_a)
            if cfg.w_content > 0:  # MAGAN (6): the cycle gives back the input's relu5_4 features
                l_content = content_loss(f5_a, r5_a) + content_loss(f5_b, r5_b)
    l_g = (cfg.w_adv * l_adv + cfg.w_cycle * l_cycle + cfg.w_identity * l_identity
           + cfg.w_cam * l_cam + cfg.w_style * l_style + cfg.w_content * l_content)
    update(opt_G, l_g, nets.generators, sync)

    # 4. Keep every ρ in [0, 1].
    for G in nets.generators:
        clip_rho(G)
    terms = dict(D=l_d, G=l_g, adv=l_adv, cycle=l_cycle, identity=l_identity, cam=l_cam,
                 style=l_style, content=l_content)
    return {name: value.detach() for name, value in terms.items()}

# =================================================================================================
# 7. The configuration and the loop
# =================================================================================================
# One dataclass holds every setting; each default is the paper's, or says where the paper is
# silent. Each field is a flag (`n_res` -> `--n-res`) whose help is the text beside it; the
# rule each value keeps, the presets and the demo are in the command line's section 11.

def option(default, help: str, **argparse_kwargs):
    """A Config field with its help text (and `choices=` where the values are a few names)."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))

@dataclass
class Config:
    # the data, --data ROOT (the CycleGAN layout; --a or --b replaces a domain) or --a and --b
    data: str = option("", "a dataset root: ROOT/trainA, trainB (testA, testB for the samples)")
    a: str = option("", "folder of domain-A training images")
    b: str = option("", "folder of domain-B training images")
    out: str = option("runs/magan", "the run folder")
    size: int = option(256, "image size S, a multiple of 32 (the paper: 256)")
    # the model (U-GAT-IT Tables 4-6; MAGAN §2.1-2.2). Light mode: the γ, β MLP reads the pooled
    # attention map; --full is the paper's setting, with ~268M weights per G at 256 px.
    ch: int = option(64, "base width of every network (the paper: 64)")
    n_res: int = option(4, "residual blocks in G's encoder and decoder (the paper: 4)")
    light: bool = option(True, "light mode; --full: the paper's full mode")
    attention: str = option("ma", "MAGAN's, U-GAT-IT's, SAM only, none",
                            choices=("ma", "cam", "sam", "none"))
    p_gen: float = option(2.0, "SAM's exponent p in the generators (MAGAN: 2)")
    p_dis: float = option(1.0, "SAM's exponent p in the discriminators (MAGAN: 1)")
    detail_skip: bool = option(False, "section 15's detail skip; off for pairs that change shape")
    gan_loss: str = option("lsgan", "U-GAT-IT's, or MAGAN's eq. 4", choices=("lsgan", "bce"))
    # the loss weights, 0 to switch a term off: U-GAT-IT's, and 1 for MAGAN's own two (untuned)
    w_adv: float = option(1.0, "adversarial loss (MAGAN eq. 4)")
    w_cycle: float = option(10.0, "pixel cycle loss (U-GAT-IT eq. 3)")
    w_identity: float = option(10.0, "identity loss (U-GAT-IT eq. 4)")
    w_cam: float = option(1000.0, "G's CAM loss (MAGAN eq. 7, U-GAT-IT eq. 5)")
    w_style: float = option(1.0, "Gram style loss on VGG19 relu4_4 (MAGAN eq. 5)")
    w_content: float = option(1.0, "content loss on VGG19 relu5_4 (MAGAN eq. 6)")
    vgg_weights: str = option("imagenet", "VGG19: imagenet, PATH, or random (NOT the paper)")
    # optimisation (MAGAN §3.3; U-GAT-IT appendix B.2)
    iters: int = option(1_000_000, "iterations; the rate decays over the second half")
    minutes: float = option(0.0, "the run's time in all, start-up included: it sets --iters (8.4)")
    batch: int = option(1, "images per domain, iteration and process")
    lr: float = option(1e-4, "Adam's learning rate, for G and D alike")
    weight_decay: float = option(1e-4, "Adam's weight decay")
    # machinery
    device: str = option("auto", "auto (CUDA, mps, CPU), cpu, cuda, cuda:N, mps")
    seed: int = option(0, "random seed: the weights, the data order and the augmentation")
    fast: bool = option(True, "channels_last, and bf16 where native (8.3); else fp32")
    compile: bool = option(False, "torch.compile the networks (minutes of start-up)")
    workers: int = option(-1, "data-loading processes (-1: one fewer than the cores, at most 4)")
    log_every: int = option(100, "a progress line and a log.csv row every N iterations")
    sample_every: int = option(1000, "sample grids and the run page every N iterations")
    save_every: int = option(1000, "write checkpoints/latest.pt every N iterations")
    resume: bool = option(False, "continue the run in --out from its checkpoints/latest.pt")

# The whole run in one screen, nanoGPT-style. The set-up fails fastest first: the run folder and
# config, the data, then the slow parts (networks, VGG, compiling). The loop: the learning rate,
# one step, watch, save; its last iteration (the end, a stop signal, the time) writes everything.

def train(cfg: Config, checkpoint: dict | None = None) -> Path:
    """Train (or, with cfg.resume, continue) the run in cfg.out. Returns the run folder."""
    began = time.monotonic()                               # a --minutes budget counts from here
    cfg, checkpoint = check_run(cfg, checkpoint)                                # 8.1
    data = UnpairedImages(cfg.a, cfg.b, cfg.size, cfg.seed)                     # 8.2
    processes = start_processes(cfg.device)                # section 12; alone: process 0 of 1
    start = checkpoint["iteration"] if checkpoint else 0
    batches = training_batches(data, cfg, start, processes)  # its workers start with the loop
    try:
        nets, vgg, opt_G, opt_D, autocast = build(cfg, processes.device)        # 8.3
        if checkpoint:
            restore(checkpoint, nets, opt_G, opt_D, cfg)
        length = RunLength(cfg, checkpoint, began, processes)                   # 8.4
        folder = RunFolder(cfg, start, processes.is_main)        # 8.5: the files on disk
        progress = Progress(cfg, start, length, folder, data, autocast)  # 8.6: terminal, log.csv
        pictures = SamplePage(cfg, progress, folder, processes.device)  # the grids and the page
        with StopOnSignal() as signals:                                         # 8.7
            for iteration, (x_a, x_b, skipped) in enumerate(batches, start + 1):
                # 1. The learning rate, from the number of steps already taken.
                lr = learning_rate(iteration - 1, cfg)
                for group in opt_G.param_groups + opt_D.param_groups:
                    group["lr"] = lr
                # 2. One iteration: translate, a D step, a G step (section 6).
                x_a, x_b = (to_device(x, processes.device, cfg.fast) for x in (x_a, x_b))
                losses = train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast,
                                    processes.sync)
                # 3. Watch it: the progress line and log.csv; the sample grids and the page.
                last = length.is_last(iteration, signals.received)
                saving = last or iteration % cfg.save_every == 0
                progress.report(iteration, lr, losses, skipped,
                                log=saving or iteration % cfg.log_every == 0)
                if last or iteration % cfg.sample_every == 0:
                    pictures.draw(iteration, nets)
                # 4. Save when due, and at the last iteration.
                if saving:
                    folder.save(iteration, nets, opt_G, opt_D, length.seconds_used())
                if last:
                    break
    finally:  # whatever happened: stop the data workers, leave the process group
        batches.close()
        processes.end()
    progress.finished(iteration, length.reason)
    return folder.path

# =================================================================================================
# 8. What the loop calls, in the order it calls it
# =================================================================================================

# --- 8.1 The run and its checkpoint ---------------------------------------------------------------
# A run that lasts days will be interrupted: a cluster's time limit, a laptop's lid, a full disk.
# Its checkpoint holds what an exact resume needs: the six networks (spectral norm's power-
# iteration vectors included), both optimizers' moments (Adam without them takes large first
# steps again and can undo days of training), the iteration (which fixes the learning rate and,
# with the seed, the next images: 8.2), the config, and the time the run has used (8.4). It is
# loaded as untrusted input: weights only, never code, and its config checked like flags.

CHECKPOINT_FORMAT = "magan-checkpoint-v3"
EXPORT_FORMAT = "magan-generators-v3"  # the two generators and the config: `magan.py export`
# The fields that define the networks: a checkpoint only continues under the same values.
ARCHITECTURE = ("size", "ch", "n_res", "light", "attention", "p_gen", "p_dis", "detail_skip")

def check_run(cfg: Config, checkpoint: dict | None) -> tuple[Config, dict | None]:
    """What can be wrong with the run folder and the config, found before anything slow: a typo in
    --out should not cost a data scan, VGG and compiling first. Paths are stored resolved, so
    that --resume works from any folder."""
    if not cfg.a or not cfg.b:
        raise MaganError("no training images: pass --data ROOT, or --a and --b (two folders)")
    cfg = dataclasses.replace(cfg, **{k: str(Path(getattr(cfg, k)).resolve())
                                      for k in ("data", "a", "b", "out") if getattr(cfg, k)})
    out = Path(cfg.out)
    there = next(p for p in (out, *out.parents) if p.exists())  # the folder, or where it will be
    if not there.is_dir() or not os.access(there, os.W_OK):
        problem = "is a file" if not there.is_dir() else "cannot be written to"
        raise MaganError(f"--out {out}: {there} {problem}; pass another --out")
    latest = out / "checkpoints" / "latest.pt"
    if not cfg.resume and latest.exists():
        raise MaganError(f"{out} holds a run: pass --resume to continue it, or another --out")
    if not cfg.resume:
        return cfg, None
    checkpoint = checkpoint or load_checkpoint(latest)
    saved, done = checkpoint["config"], checkpoint["iteration"]
    for name in ARCHITECTURE:  # the weights fit only the networks they were trained in
        if saved[name] != getattr(cfg, name):
            raise MaganError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: the run was "
                             f"trained with {saved[name]!r}; drop the flag")
    if done >= cfg.iters:  # e.g. a finished run: nothing left to train
        raise MaganError(f"the run is at iteration {done} already: pass a larger --iters")
    if cfg.minutes and (checkpoint.get("seconds_used") or 0) >= 60 * cfg.minutes:  # 8.4
        raise MaganError(f"the run used its {cfg.minutes:g} minutes (iteration {done} of "
                         f"{cfg.iters}): give it more in all, e.g. --resume --minutes "
                         f"{cfg.minutes + 10:g}, or none: --minutes 0")
    return cfg, checkpoint

def load_checkpoint(path: str | Path, kinds=(CHECKPOINT_FORMAT,)) -> dict:
    """Load a checkpoint as untrusted input: `weights_only=True` refuses anything but tensors and
    plain containers, so a malicious file cannot run code; its config must pass the command
    line's rules, and its generators' weights the shapes that config gives (compared on
    PyTorch's "meta" device, which allocates no memory; the discriminators' follow from the same
    values), before any network is built. Any failure is a MaganError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MaganError(f"cannot read a checkpoint at {path} ({first_line(e)})") from None
    found = ckpt.get("format", "") if isinstance(ckpt, dict) else ""
    if found not in kinds:
        explain = {EXPORT_FORMAT: ": an export only translates", "": ""}.get(
            found, f": {found}, from an earlier magan.py with other networks")
        raise MaganError(f"{path} is not a magan checkpoint of the kind needed here{explain}")
    # The iteration fixes the learning rate and the next images, the time used a budget's end:
    # a value of another type would fail later, deep inside the loop, with a traceback.
    done, used = ckpt.get("iteration"), ckpt.get("seconds_used")
    if type(done) is not int or done < 0 or not (used is None or type(used) in (int, float)):
        raise MaganError(f"{path}: its iteration {done!r} or time used {used!r} is not one a run "
                         f"could have saved")
    # Built for real, a crafted config (a width of 4,096, full mode) would allocate gigabytes
    # before load_state_dict noticed that the weights do not fit; on "meta" nothing is allocated.
    with torch.device("meta"):  # a generator's shapes, without its memory
        G = make_generator(checked_config(ckpt.get("config"), path))                # section 11
    shapes = {k: v.shape for k, v in G.state_dict().items()}
    try:
        fits = all({k: v.shape for k, v in ckpt["nets"][name].items()} == shapes
                   for name in ("G_ab", "G_ba"))
    except (KeyError, AttributeError, TypeError):
        fits = False
    if not fits:
        raise MaganError(f"{path}: the weights do not fit its config (other names or shapes)")
    return ckpt

# --- 8.2 Data: two unpaired folders ---------------------------------------------------------------
# The domains are *unpaired*: no horse has its zebra. Training sample k is one image of each
# domain, drawn independently, each with U-GAT-IT's augmentation. Everything random about sample k
# is a pure function of (seed, domain, k): with worker processes, a random stream's state after
# iteration k would depend on which worker drew what; a key does not. So a resumed run draws
# exactly the samples an uninterrupted one would have. Each domain walks in its own order:
# pairing the i-th horse with the i-th zebra in every epoch would show the networks the same pairs
# again and again, a relation the data do not have.

def keyed_generator(*key) -> torch.Generator:
    """A torch.Generator seeded by a hash of `key` (Python's own hash() of a string changes
    from one process to the next; SHA-256 does not)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

# Reading images safely. A training set scraped from the web holds every kind of file: CMYK and
# palette JPEGs, 16-bit PNGs, phone photos rotated by an EXIF tag, a text file named .jpg, a
# download cut off half way. The networks want 8-bit RGB the right way up, so every image goes
# through load_rgb. One bad file in thousands costs the user one line in the log, not a crashed
# run at iteration 40,000; a folder with no readable image is an error before training starts.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

def load_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """Open any image Pillow reads, as 8-bit RGB, upright. Raises if it is not a readable image.
    `draft_size`: a large JPEG may be decoded at a reduced scale, still at least that size."""
    with Image.open(path) as im:
        if draft_size:
            im.draft("RGB", (draft_size, draft_size))  # a 4000x3000 JPEG decoded at 1/8 scale
        im.load()                          # a truncated file fails here, not later in a worker
        im = ImageOps.exif_transpose(im)   # phone photos store "rotate me" in EXIF, not in pixels
        if im.mode.startswith("I;16") or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey: keep the top 8 bits
        if im.mode == "F":
            im = im.point(lambda v: v * 255).convert("L")  # float grey: [0, 1], by convention
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            # Transparent pixels hold whatever colour was left there (often black): lay them on
            # white, as a browser shows them on a page.
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("RGB")

def readable_images(files, draft_size: int | None = None):
    """Yield (path, RGB image) for each file that decodes; name the others and go on: one broken
    file must not end a translation of thousands."""
    for path in files:
        try:
            yield path, load_rgb(path, draft_size)
        except Exception as e:
            print(f"skipping unreadable image {path} ({first_line(e)})", flush=True)

def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [-1, 1]."""
    return pil_to_tensor(im).float().div(127.5).sub(1.0)

def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB, rounded to 8 bits (the inverse of to_tensor)."""
    return to_pil_image(x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu())

def list_images(folder: str | Path) -> list[Path]:
    """The sorted image files (by their suffix) of one flat folder; a folder with none is an error
    that says what to pass instead. A file that is not an image after all is skipped when read."""
    folder = Path(folder)
    if folder.is_file():
        raise MaganError(f"{folder} is a file: pass a folder of images (or --data ROOT)")
    if not folder.is_dir():
        raise MaganError(f"image folder {folder} does not exist (expected the CycleGAN layout "
                         f"ROOT/trainA, trainB, testA, testB: pass --data ROOT, or --a and --b)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MaganError(f"no image in {folder}: " + (
            f"it is a dataset root, so pass --data {folder}" if (folder / "trainA").is_dir() else
            "put .jpg or .png images there (not in subfolders)"))
    return files

class UnpairedImages(torch.utils.data.Dataset):
    """Item k is the k-th training sample (x_a, x_b, skipped) for any k >= 0: each domain is walked
    in a fresh random order every epoch, independently, and each image gets U-GAT-IT's augmentation
    (U-GAT-IT appendix B.2): a horizontal flip with p = 0.5, a resize to (S+30)², a random SxS
    crop. A file that fails to decode (a truncated JPEG, say) is replaced by the next one, and
    named in `skipped` for the run to report."""

    def __init__(self, folder_a, folder_b, size: int, seed: int):
        self.files = [list_images(folder_a), list_images(folder_b)]
        self.size, self.seed = size, seed
        for files in self.files:  # fail before training if no file of a domain decodes at all
            self.first_readable(files, 0, [])

    def __getitem__(self, k: int):
        images, skipped = [], []
        for domain, files in enumerate(self.files):
            epoch, position = divmod(k, len(files))
            order = torch.randperm(len(files), generator=keyed_generator(self.seed, domain, epoch))
            im = self.first_readable(files, int(order[position]), skipped)
            # Each domain draws its own flip and crop: the same draw for both would pair them.
            g = keyed_generator(self.seed, domain, "augment", k)
            if torch.rand((), generator=g) < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            S = self.size
            im = im.resize((S + 30, S + 30), Image.Resampling.BILINEAR)
            top, left = torch.randint(0, 31, (2,), generator=g).tolist()   # one of 31x31 offsets
            images.append(to_tensor(im.crop((left, top, left + S, top + S))))  # (3, S, S)
        return images[0], images[1], skipped

    def first_readable(self, files, start: int, skipped: list) -> Image.Image:
        for i in range(len(files)):
            path = files[(start + i) % len(files)]
            try:
                return load_rgb(path, self.size + 30)
            except Exception as e:  # Pillow raises several types for broken files
                skipped.append(f"{path} ({first_line(e)})")
        raise MaganError(f"no image in {files[0].parent} can be decoded:\n  "
                         + "\n  ".join(skipped[-len(files):]))

def iteration_samples(start: int, iters: int, batch: int, world: int = 1, rank: int = 0):
    """The sample indices one process reads from iteration `start` on: iteration k on rank r of
    `world` processes reads samples (k·world + r)·B ... (k·world + r)·B + B − 1. One process with
    the batch world·B reads the same samples in the same iteration (section 12)."""
    for k in range(start, iters):
        yield from range((k * world + rank) * batch, (k * world + rank + 1) * batch)

def collate_pairs(samples):
    """A list of (x_a, x_b, skipped) -> (B, 3, S, S) batches and one list of skipped files. (A
    function at module level, so that worker processes started by `spawn`, macOS's and Windows'
    default, can import it.)"""
    return (torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]),
            [name for s in samples for name in s[2]])

def ignore_stop_signals(_worker_id):
    """Data workers leave Ctrl-C and SIGTERM to the main process, which saves and then stops them.
    `timeout`, SLURM and systemd signal the whole process group: a worker that died of the signal
    would crash the main process before it could save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def training_batches(data: UnpairedImages, cfg: Config, start: int, processes):
    """The (x_a, x_b, skipped) batches of iterations start+1 ... cfg.iters. Worker processes decode
    and augment the next batches while the networks train on this one. --workers -1: one fewer
    than this process's share of the cores, at most 4 (reading an image takes a few ms, far less
    than a step: more workers would only take cores from torch). A generator: its workers start
    with the first batch, and closing it, as train() does whatever happened, stops them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cores or 1) // processes.world                # this process's share of the cores
    workers = cfg.workers if cfg.workers >= 0 else max(0, min(4, share - 1))
    sampler = iteration_samples(start, cfg.iters, cfg.batch, processes.world, processes.rank)
    loader = iter(torch.utils.data.DataLoader(
        data, cfg.batch, sampler=sampler, num_workers=workers, collate_fn=collate_pairs,
        pin_memory=processes.device.type == "cuda",
        worker_init_fn=ignore_stop_signals if workers else None))
    try:
        yield from loader
    finally:
        # The workers ignore SIGTERM (above), and Python's exit stops leftover workers with that
        # signal, then waits for them: for ever. So they are stopped here, by PyTorch's own
        # clean-up, the one a finished loader runs: at the end, on an error, on Ctrl-C.
        if hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()

# --- 8.3 The networks on a device -----------------------------------------------------------------
# The maths of a step never depends on the device; only how it runs does. The fast path (--fast,
# on by default) changes nothing beyond float rounding:
#   * channels_last: convolutions read (B, H, W, C) memory, the layout cuDNN's tensor-core kernels
#     and oneDNN on a CPU prefer, so no copy into it is made at every layer;
#   * bf16 autocast, only where the hardware computes bf16: convolutions and matrix products in
#     bfloat16 (twice the tensor-core rate, half the memory), while norm statistics, Gram matrices,
#     SAM's map, the class logits and the losses stay fp32 (Part I). bf16 keeps fp32's exponent
#     range, so no loss scaling is needed (unlike fp16). Where bf16 is emulated it is slower.
# Apple's mps stays fp32. torch.compile (--compile) fuses the small element-wise ops between the
# convolutions, at the price of minutes of start-up.

def pick_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """auto: CUDA if there is one (GPU `local_rank` under torchrun), else Apple's mps, else CPU."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if not {"cuda": cuda, "mps": mps}.get(name.split(":")[0], True):
        raise MaganError(f"--device {name}: this PyTorch sees no such GPU (use cpu or auto)")
    # A GPU that cannot be used is refused now, not minutes later at the first tensor sent there.
    if name.startswith("cuda:") and world > 1:
        raise MaganError(f"--device {name}: under torchrun each process takes its own GPU (its "
                         f"LOCAL_RANK); pass --device cuda")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise MaganError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)

def native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Does this device compute bf16 natively? CUDA: compute capability 8.0 (Ampere) and newer.
    CPU: AMX or AVX-512 BF16, read from the CPU's flags (Linux). mps: no (fp32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    flags = cpuinfo.read_text() if device.type == "cpu" and cpuinfo.exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags

def make_optimizers(nets: MAGAN, cfg: Config):
    """Adam(lr, betas = (0.5, 0.999), weight decay 1e-4) for the two generators and for the four
    discriminators (U-GAT-IT appendix B.2)."""
    def adam(networks):
        params = [p for net in networks for p in net.parameters()]
        return torch.optim.Adam(params, cfg.lr, betas=(0.5, 0.999), weight_decay=cfg.weight_decay)
    return adam(nets.generators), adam(nets.discriminators)

def build(cfg: Config, device: torch.device):
    """The six networks (their initial weights follow --seed), the VGG of the style and content
    losses when a weight needs it, both optimizers and the step's autocast, on the device."""
    torch.manual_seed(cfg.seed)
    nets = MAGAN(cfg)
    vgg = load_vgg(cfg.vgg_weights) if cfg.w_style > 0 or cfg.w_content > 0 else None
    fast = cfg.fast and device.type != "mps"
    layout = torch.channels_last if fast else torch.contiguous_format
    nets = nets.to(device, memory_format=layout)
    vgg = vgg.to(device, memory_format=layout) if vgg else None
    if device.type == "cuda":  # fp32 stays fp32 (not TF32); one input size: time the kernels once
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = False, True
    opt_G, opt_D = make_optimizers(nets, cfg)
    if cfg.compile:
        try:  # on a CPU it writes and compiles C++: a Mac needs Xcode's command-line tools
            torch.compile(lambda x: x.sin() + 1)(torch.ones(4, device=device))
            for net in [*nets.children(), *([vgg] if vgg else [])]:
                net.compile()  # in place: the state_dict keys stay the same
        except Exception as e:
            print(f"note: --compile is off: torch.compile fails here ({first_line(e)})", flush=True)
    bf16 = fast and native_bf16(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return nets, vgg, opt_G, opt_D, autocast

def restore(ckpt: dict, nets: MAGAN, opt_G, opt_D, cfg: Config):
    """Continue from a checkpoint: the weights, and Adam's moments and step counts."""
    try:
        for name, net in nets.named_children():
            net.load_state_dict(ckpt["nets"][name])
        for opt, state in ((opt_G, ckpt["opt_G"]), (opt_D, ckpt["opt_D"])):
            opt.load_state_dict(state)    # the moments go onto each parameter's device
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise MaganError(f"the checkpoint does not fit its networks ({first_line(e)})") from None
    for group in opt_G.param_groups + opt_D.param_groups:  # a --weight-decay typed now applies
        group["weight_decay"] = cfg.weight_decay

def to_device(x: torch.Tensor, device: torch.device, fast: bool) -> torch.Tensor:
    """A batch onto the device, in the networks' memory layout."""
    x = x.to(device, non_blocking=True)  # from pinned memory, the copy overlaps compute
    return x.contiguous(memory_format=torch.channels_last) if fast and device.type != "mps" else x

# --- 8.4 The learning rate and the length of a run ------------------------------------------------
# Why decay at all: a GAN never converges to a fixed point at a constant rate; G and D keep
# chasing each other. Lowering the rate in the second half damps that chase, so the last
# iterations polish the translations instead of oscillating around them (CycleGAN and U-GAT-IT
# both decay linearly to 0). G and D share one rate: U-GAT-IT tuned their balance at 1e-4.
def learning_rate(step: int, cfg: Config) -> float:
    """Constant for the first half, then linear decay to 0 (U-GAT-IT appendix B.2), computed from
    the number of steps taken, not by repeated subtraction, so a resumed run gets the same rate."""
    half = cfg.iters // 2
    return cfg.lr if step < half else cfg.lr * (cfg.iters - step) / (cfg.iters - half)

class RunLength:
    """Where the run ends: at --iters; on a stop signal (to any process); or once --minutes M have
    passed in all, start-up and earlier sessions included (the checkpoint keeps the time used).
    In each session, WARMUP iterations after its first (which carries the start-up), a budget
    sets cfg.iters to what fits in 90% of the time left at the speed measured, at most --iters
    and at least twice those done: the decay has not begun, so the rate never jumps. (90%, not
    all: a VM's speed wanders by 10%, and samples and checkpoints take time unseen so far.)"""
    WARMUP = 300

    def __init__(self, cfg: Config, checkpoint: dict | None, began: float, processes):
        self.cfg, self.processes, self.first, self.reason = cfg, processes, None, None
        self.began = began - ((checkpoint or {}).get("seconds_used") or 0.0)  # the run's start
        self.deadline = self.began + 60 * cfg.minutes if cfg.minutes else math.inf

    def is_last(self, iteration: int, signal: str | None) -> bool:
        now = time.monotonic()
        self.first = self.first or (iteration, now)
        done = iteration - self.first[0]
        if self.deadline < math.inf and done == self.WARMUP:
            fits = iteration + int(0.9 * (self.deadline - now) / ((now - self.first[1]) / done))
            fits = min(self.cfg.iters, max(2 * iteration, fits))
            self.cfg.iters = int(self.processes.reduce(fits, "min"))
        late = now > self.deadline
        if self.processes.reduce(signal is not None or late, "max"):
            self.reason = signal or ("time is up" if late else "another process stopped")
        return self.reason is not None or iteration == self.cfg.iters

    def eta(self, iteration: int, speed: float) -> str:
        """The time left at `speed` (iterations a second), or what the budget leaves if less:
        until a budget sets the length, cfg.iters is only a ceiling (the laptop recipe's 20,000)."""
        seconds = min((self.cfg.iters - iteration) / speed if speed else math.inf,
                      self.deadline - time.monotonic())
        return format_seconds(max(0.0, seconds)) if math.isfinite(seconds) else "--"

    def seconds_used(self) -> float:
        """The run's time so far, start-up and earlier sessions included (checkpoint, log.csv)."""
        return time.monotonic() - self.began

# --- 8.5 The run folder on disk -------------------------------------------------------------------
# Every file of a run is written whole or not at all: to a temporary file, flushed to the disk,
# then renamed over the old one. A crash, a second Ctrl-C or a full disk mid-write leaves the
# previous version, never half of a new one, and the temporary file goes. A full disk ends the
# run with one line: what could not be written, what is intact, how to go on.

def write_atomically(path: Path, write, then: str = ""):
    """Call write(file) on PATH.tmp, flush it to disk, then rename it to `path`. Whatever fails (an
    OSError; torch.save raises a RuntimeError on a full disk), PATH.tmp goes, and a MaganError
    says what could not be written and, `then`, what to do. (So make the data first: a bug in
    making them is not a disk's.)"""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            # Flushed to the disk before the rename: after a power cut, the file system may
            # otherwise hold the new name with an empty file behind it.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # one step: the name points at the old file or at the new one
    except BaseException as e:
        if tmp.exists():
            tmp.unlink()
        if not isinstance(e, Exception):  # Ctrl-C: not a write that failed
            raise
        raise MaganError(f"could not write {path} ({first_line(e)}); if the disk is full, free "
                         f"some space. {then}".rstrip()) from None

class RunFolder:
    """RUN/config.json, log.csv, samples/, index.html and checkpoints/latest.pt. Only the main
    process (rank 0 under torchrun) writes; the others' writes do nothing."""

    def __init__(self, cfg: Config, start: int, is_main: bool = True):
        self.cfg, self.is_main, self.saved = cfg, is_main, start or None
        self.path, self.latest = Path(cfg.out), Path(cfg.out) / "checkpoints" / "latest.pt"
        self.write("config.json", self.config_json())

    def intact(self) -> str:
        """What an interruption leaves: the last checkpoint, and the command that continues it."""
        if not self.saved:
            return "no checkpoint was saved yet: start again"
        return (f"{self.latest} holds iteration {self.saved}, intact: continue with python "
                f"magan.py train --out {self.path} --resume")

    def write(self, name: str, data):
        """RUN/name, atomically (8.5); a failure ends the run, saying what is intact."""
        if self.is_main:
            write = data if callable(data) else lambda f: f.write(data)  # a function, or bytes
            write_atomically(self.path / name, write, self.intact())

    def config_json(self) -> bytes:
        """config.json: the values that run (a time budget fixes --iters), paths absolute."""
        return (json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n").encode()

    def save(self, iteration: int, nets: MAGAN, opt_G, opt_D, seconds_used: float):
        """checkpoints/latest.pt: everything the run needs to continue exactly (8.1)."""
        state = {"format": CHECKPOINT_FORMAT, "iteration": iteration, "seconds_used": seconds_used,
                 "config": dataclasses.asdict(self.cfg), "opt_G": opt_G.state_dict(),
                 "opt_D": opt_D.state_dict(),
                 "nets": {name: net.state_dict() for name, net in nets.named_children()}}
        self.write("checkpoints/latest.pt", lambda f: torch.save(state, f))
        self.saved = iteration
        # config.json follows: a time budget may have fixed --iters since the start (8.4).
        self.write("config.json", self.config_json())

# --- 8.6 What the user sees: the progress line, log.csv, the sample grids, the run page -----------
# A GAN's losses say little about how good its translations are: L_D and L_G oscillate by design,
# and a falling G loss can mean mode collapse. So a run shows three things: a progress line (is it
# alive, how fast, when will it end), log.csv (every term, for plotting), and sample grids of the
# same test images every time (the only honest measure while training). The run page (section 13)
# puts the three together in a browser.

LOSS_TERMS = ("adv", "cycle", "identity", "cam", "style", "content")  # L_G's terms (train_step)
COLUMNS = ("iteration", "elapsed_s", "it_per_s", "lr", "D", "G", *LOSS_TERMS)   # of log.csv

class Progress:
    """The terminal and log.csv. A progress line after the first iteration, at every log point and
    at least every 30 s; a log.csv row at every log point and checkpoint. Reading the losses
    there stops the run on a NaN, before it reaches a checkpoint."""

    def __init__(self, cfg: Config, start: int, length: RunLength, folder: RunFolder,
                 data: UnpairedImages, autocast):
        self.cfg, self.start, self.length, self.folder = cfg, start, length, folder
        self.rows, self.reported = read_log(folder.path / "log.csv", start), set()
        # Durations from the monotonic clock: the wall clock can jump (a time server's correction,
        # a laptop woken from sleep) and would make a speed negative or an ETA absurd.
        self.last_time, self.last_iteration, self.speed = time.monotonic(), start, 0.0
        left, device = length.deadline - time.monotonic(), length.processes.device
        goal = (f"within {format_seconds(left)}, to iteration {cfg.iters} at most"
                if math.isfinite(left) else f"to iteration {cfg.iters}")
        precision = "bf16" if isinstance(autocast, torch.autocast) else "fp32"
        self.say(f"{'resumed: ' if start else ''}training {goal} on "
                 f"{device} ({precision}), {len(data.files[0])} + {len(data.files[1])} images; "
                 f"watch {folder.path / 'index.html'}")

    def say(self, text: str):
        if self.folder.is_main:  # the main process speaks for all
            print(text, flush=True)

    def report(self, iteration: int, lr: float, losses: dict, skipped: list[str], log: bool):
        for name in set(skipped) - self.reported:  # each process names its unreadable files once
            print(f"skipping unreadable image {name}", flush=True)
            self.reported.add(name)
        # A row at every checkpoint too (train() asks for it): log.csv then always reaches the
        # iteration a resume starts from, and a stop leaves its last row.
        first = iteration == self.start + 1
        if not (log or first or time.monotonic() - self.last_time >= 30):
            return
        values, now = finite(losses, iteration, self.folder), time.monotonic()  # waits for a GPU
        seconds, self.last_time = now - self.last_time, now
        self.speed = (iteration - self.last_iteration) / max(seconds, 1e-9)
        self.last_iteration = iteration
        if log:
            self.rows.append(dict(iteration=iteration, elapsed_s=round(self.length.seconds_used()),
                                  it_per_s=round(self.speed, 4), lr=lr, **values))
            # The whole file, rewritten atomically (8.5), rather than a row appended: an append
            # cut short by a crash or a full disk would leave a broken last row.
            lines = [",".join(str(row[c]) for c in COLUMNS) for row in self.rows]
            self.folder.write("log.csv", "\n".join([",".join(COLUMNS), *lines, ""]).encode())
        terms = "  ".join(f"{k} {values[k]:.4g}" for k in LOSS_TERMS if getattr(self.cfg, "w_" + k))
        # the first iteration carries the start-up (compiling, for one): its time, no speed
        timing = (f"first iteration {seconds:.1f} s, start-up included" if first else
                  f"{self.speed:.2f} it/s  ETA {self.length.eta(iteration, self.speed)}")
        self.say(f"[{iteration:>{len(str(self.cfg.iters))}}/{self.cfg.iters}] {timing}  lr {lr:.2e}"
                 f"  D {values['D']:.4g}  G {values['G']:.4g} = {terms}")

    def finished(self, iteration: int, reason: str | None):
        """The last line: done, or stopped (by a signal, or the time budget) and how to go on."""
        if iteration == self.cfg.iters:
            self.say(f"done at iteration {iteration}; checkpoint {self.folder.latest}")
        else:  # out of time, a resume needs more: the total a little larger
            more = f" --minutes {self.cfg.minutes + 10:g}" if reason == "time is up" else ""
            self.say(f"{reason}: stopped at iteration {iteration} of {self.cfg.iters}; "
                     f"{self.folder.intact()}{more}")

def finite(losses: dict, iteration: int, folder: RunFolder) -> dict[str, float]:
    """The losses as numbers; a NaN or an inf ends the run (it would stay in the weights)."""
    values = {name: value.item() for name, value in losses.items()}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise MaganError(f"{', '.join(bad)} became NaN or infinite by iteration {iteration}; "
                         f"{folder.intact()}, with a lower --lr, --no-fast or a smaller weight")
    return values

def read_log(path: Path, start: int) -> list[dict]:
    """log.csv's rows up to the checkpoint's iteration (those after it were lost with the
    interruption and are trained again)."""
    try:
        rows = list(csv.DictReader(path.open(newline=""))) if start and path.exists() else []
        rows = [{k: (int if k == "iteration" else float)(row[k]) for k in COLUMNS} for row in rows]
        return [row for row in rows if row["iteration"] <= start]
    except (KeyError, TypeError, ValueError) as e:
        raise MaganError(f"cannot read {path} ({first_line(e)}): move it away and resume") from None

def format_seconds(seconds: float) -> str:
    """12345.6 -> 3h25m45s"""
    return f"{int(seconds) // 3600}h{int(seconds) // 60 % 60:02d}m{int(seconds) % 60:02d}s"

class SamplePage:
    """Sample grids of the same 4 test images in both directions (RUN/samples/), and the run page
    that shows the latest beside the loss curves (RUN/index.html, section 13): written at the
    start, so that the first line's "watch RUN/index.html" holds at once."""

    def __init__(self, cfg: Config, progress: Progress, folder: RunFolder, device: torch.device):
        self.cfg, self.progress, self.folder = cfg, progress, folder
        if folder.is_main:  # 4 test images a domain: enough to judge, and cheap to translate
            self.samples = [sample_images(d, cfg.size).to(device) for d in (cfg.a, cfg.b)]
            folder.write("index.html", run_page(cfg, progress, None).encode())

    def draw(self, iteration: int, nets: MAGAN):
        if not self.folder.is_main:
            return
        for x, name, G, G_back in zip(self.samples, ("a2b", "b2a"), nets.generators,
                                      nets.generators[::-1]):
            grid = sample_grid(G, G_back, x).add(1).div(2)            # 4 rows of 4 (3, S, S)
            self.folder.write(f"samples/{name}_{iteration:07d}.png", lambda f: save_image(
                grid, f, format="png", nrow=4, padding=2, pad_value=1))
        self.folder.write("index.html", run_page(self.cfg, self.progress, iteration).encode())

def sample_images(train_folder: str, size: int) -> torch.Tensor:
    """The rows of every sample grid: the first 4 readable images of testA beside trainA (the
    CycleGAN layout), or else of the training folder itself, resized to SxS: (4, 3, S, S)."""
    test = Path(train_folder).with_name(Path(train_folder).name.replace("train", "test", 1))
    folder = test if test.is_dir() else Path(train_folder)
    images = [im for _, (_, im) in zip(range(4), readable_images(list_images(folder), size))]
    if not images:
        raise MaganError(f"no image in {folder} can be decoded")
    return torch.stack([to_tensor(im.resize((size, size), Image.Resampling.BILINEAR))
                        for im in images])

def attention_overlay(x: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
    """Images x: (B, 3, H, W) with their heatmaps (B, 1, h, w) laid over them, half and half, in
    'jet' colours, each map scaled to its own range (blue: least attended, red: most)."""
    lo, hi = heatmap.amin(dim=(2, 3), keepdim=True), heatmap.amax(dim=(2, 3), keepdim=True)
    t = (heatmap.float() - lo) / (hi - lo).clamp_min(1e-8)
    t = F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)
    jet = torch.cat([1.5 - (4 * t - c).abs() for c in (3, 2, 1)], dim=1).clamp(0, 1) * 2 - 1
    return 0.5 * x + 0.5 * jet

@torch.no_grad()
def sample_grid(G_forward: Generator, G_backward: Generator, x: torch.Tensor) -> torch.Tensor:
    """One row per test image: the input, its attention heatmap over it, the translation and the
    cycle's reconstruction. Under no_grad and eval(): no graph is kept, so sampling costs no
    memory (U-GAT-IT's code runs out of memory here)."""
    image, _, heatmap = G_forward.eval()(x)
    cycle, _, _ = G_backward.eval()(image)
    G_forward.train(), G_backward.train()  # (sampling happens during training)
    columns = [x, attention_overlay(x, heatmap), image.float(), cycle.float()]
    return torch.stack(columns, dim=1).flatten(0, 1).cpu()   # (n·4, 3, S, S), row by row

# --- 8.7 Signals: stop cleanly, saving first ------------------------------------------------------
# A job scheduler ends a job with SIGTERM (SLURM a few minutes before its time limit, with
# --signal), a user with Ctrl-C. Both should end in a checkpoint, not in the loss of everything
# since the last one. The handler only sets a flag: the loop finishes the iteration, saves and
# returns, so a checkpoint never holds a half-applied optimizer step.
class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after this iteration and save. A second
    Ctrl-C aborts at once (the last checkpoint is still whole)."""

    def __enter__(self):
        self.received = None  # the name of the first signal received
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        # No print here: a signal that lands while the loop prints would make print re-enter
        # itself and crash. The loop reports the stop when it sees the flag.
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

# #################################################################################################
#                                      PART III: USING IT
# #################################################################################################
# =================================================================================================
# 9. Translate and export
# =================================================================================================
# After training one generator is all that is needed: G_ab for A -> B. Each image is resized to
# the training size S, translated, and resized back to its own size and aspect ratio (with the
# laptop recipe's detail skip, section 15, what the generator changed is resized instead and added
# to the photo). The output is PNG, lossless, so that KID scores the translation itself rather
# than a re-encoded copy (U-GAT-IT's code writes PNG too). --heatmaps also writes where the
# generator's attention looked, over each photo, as the sample grids show it.

def load_generator(path: str | Path, direction: str, device: torch.device):
    """The generator of `direction` (a2b or b2a) from a checkpoint or an export, in eval mode,
    and the run's Config."""
    ckpt = load_checkpoint(path, kinds=(CHECKPOINT_FORMAT, EXPORT_FORMAT))   # checked (8.1)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in CONFIG_FIELDS})
    G = make_generator(cfg)
    G.load_state_dict(ckpt["nets"]["G_ab" if direction == "a2b" else "G_ba"])
    return G.to(device).eval(), cfg

def destinations(input_path: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """The input files, and where each translation goes: OUT/STEM.png. A stem that two inputs
    share keeps its suffix (a.jpg: a_jpg.png), and a name taken all the same gets a number: no
    translation overwrites another, nor an input. (Names compare without case, as on Windows.)"""
    if not input_path.exists():
        raise MaganError(f"--input {input_path} does not exist: pass an image or a folder")
    inside = input_path if input_path.is_dir() else input_path.parent
    if out.is_file() or out.resolve() == inside.resolve():
        raise MaganError(f"--out {out}: pass a folder for the translations, not the input's")
    files = [input_path] if input_path.is_file() else list_images(input_path)
    stems, taken, targets = [f.stem.lower() for f in files], set(), []
    for f in files:
        name = unique = f.stem if stems.count(f.stem.lower()) == 1 else f"{f.stem}_{f.suffix[1:]}"
        n = 1
        while unique.lower() in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique.lower())
        targets.append(out / f"{unique}.png")
    return files, targets

@torch.no_grad()
def translate(ckpt: str | Path, input_path: str | Path, out: str | Path, direction: str = "a2b",
              device: str = "auto", heatmaps: bool = False) -> list[Path]:
    """Translate an image, or every image of a folder (any size and mode), into OUT/STEM.png at
    its input's size; with `heatmaps`, the attention over each input too, in OUT/heatmaps/STEM.png
    at the same size. Returns the translations' paths."""
    G, cfg = load_generator(ckpt, direction, pick_device(device))
    files, targets = destinations(Path(input_path), Path(out))
    written, target_of = [], dict(zip(files, targets))
    for path, im in readable_images(files):                                    # at its full size
        photo = to_tensor(im)                                                  # (3, H, W)
        x = to_tensor(im.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR))  # (3, S, S)
        image, _, heatmap = G(x[None].to(next(G.parameters()).device))        # (1, 3, S, S)
        image, heatmap = image[0].float().cpu(), heatmap.float().cpu()
        if cfg.detail_skip:   # the photo + resized(G(x) − x): its own detail stays sharp
            change = F.interpolate((image - x)[None], size=(im.height, im.width), mode="bilinear",
                                   align_corners=False)[0]                   # (3, H, W)
            picture = to_pil(photo + change)
        else:
            picture = to_pil(image).resize(im.size, Image.Resampling.BICUBIC)
        write_atomically(target_of[path], lambda f: picture.save(f, format="PNG"))
        if heatmaps:
            overlay = to_pil(attention_overlay(photo[None], heatmap)[0])      # (3, H, W)
            write_atomically(Path(out) / "heatmaps" / target_of[path].name,
                             lambda f: overlay.save(f, format="PNG"))
        written.append(target_of[path])
        if len(written) % 50 == 0 or path == files[-1]:
            print(f"translated {len(written)} of {len(files)} images", flush=True)
    if not written:
        raise MaganError(f"no image of {input_path} could be decoded, so nothing was translated")
    return written

def export_generators(ckpt_path: str | Path, out: str | Path) -> Path:
    """The two generators and the config of a training checkpoint, for sharing and translating:
    no discriminators and no optimizer moments, a fraction of the checkpoint's size."""
    # Written over its own training checkpoint, an export would take the discriminators and Adam's
    # moments with it, and the run could not continue.
    if Path(out).resolve() == Path(ckpt_path).resolve():
        raise MaganError(f"--out {out} is the checkpoint itself: an export keeps only the "
                         f"generators, so the run could not continue; pass another --out")
    ckpt = load_checkpoint(ckpt_path)
    state = {"format": EXPORT_FORMAT, "iteration": ckpt["iteration"], "config": ckpt["config"],
             "nets": {name: ckpt["nets"][name] for name in ("G_ab", "G_ba")}}
    write_atomically(Path(out), lambda f: torch.save(state, f))
    print(f"wrote {out}: {Path(out).stat().st_size / 2**20:.1f} MiB", flush=True)
    return Path(out)

# =================================================================================================
# 10. KID: kernel inception distance (MAGAN §3.5.1, U-GAT-IT §3.3.4)
# =================================================================================================
#
#   KID = MMD²(real, fake) with the kernel k(x, y) = (xᵀy / d + 1)³ on d = 2048 Inception features.
#   Unbiased estimate for sets X (m rows) and Y (n rows):
#     MMD² = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1))
#            − 2 Σ_{i,j} k(x_i, y_j) / (mn)
#
# Unlike FID it is unbiased, so small test sets (100 images) give comparable numbers. The papers'
# tables use TF-GAN's estimator: both sets cut into disjoint blocks of at most 10 images, KID
# their mean and "±" its standard error (the blocks' spread divided by √(number of blocks)).
# MAGAN's text says "10 subsets of size 10" (the same, for a 100-image test set) and "degree 9",
# likely a typo: KID's kernel is cubic, and so is U-GAT-IT's. Compare numbers only with the same
# estimator and the same Inception (the FID Inception below). Images reach it as in pytorch-fid:
# resized to 299x299 bilinearly by torch, not by TensorFlow's resize (a small difference).
def kid_from_features(real: torch.Tensor, fake: torch.Tensor, block_size: int = 10):
    """KID between two feature sets (N, d) by TF-GAN's block estimator, in float64: (mean, std).
    n_blocks = ceil(max(n_real, n_fake) / block_size); both sets, in the order given, are cut into
    n_blocks consecutive blocks (sizes as equal as possible, smaller first); std = sqrt(unbiased
    variance / n_blocks), the standard error of the mean.

    >>> g = torch.Generator().manual_seed(0)
    >>> real, same = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g)
    >>> mean, std = kid_from_features(real, same)              # one distribution: 0, within its ±
    >>> abs(mean) < 2 * std
    True
    >>> mean, std = kid_from_features(real, same + 1)          # shifted by 1 along every feature
    >>> mean > 5 * std
    True
    """
    k = lambda u, v: (u @ v.t() / u.shape[1] + 1) ** 3   # k(x, y) for all pairs: (m, n)
    def mmd2(x, y):  # the unbiased MMD² above: i ≠ j leaves the diagonals out
        m, n, k_xx, k_yy = len(x), len(y), k(x, x), k(y, y)
        return ((k_xx.sum() - k_xx.trace()) / (m * (m - 1)) + (k_yy.sum() - k_yy.trace())
                / (n * (n - 1)) - 2 * k(x, y).mean())
    real, fake = real.double(), fake.double()
    n_blocks = math.ceil(max(len(real), len(fake)) / block_size)
    if min(len(real), len(fake)) < 2 * n_blocks:
        raise MaganError(f"{len(real)} real and {len(fake)} fake images: KID's blocks of at most "
                         f"{block_size} need at least 2 of each")
    def sizes(n):  # n rows in n_blocks blocks, smaller blocks first (as TF-GAN)
        return [n // n_blocks + (i >= n_blocks - n % n_blocks) for i in range(n_blocks)]
    blocks = zip(real.split(sizes(len(real))), fake.split(sizes(len(fake))))
    values = torch.stack([mmd2(r, f) for r, f in blocks])                      # (n_blocks,)
    std = (values.var() / n_blocks).sqrt() if n_blocks > 1 else values.new_tensor(math.nan)
    return values.mean().item(), std.item()

# The FID Inception: the TF Inception graph of 2015-12-05 that FID and KID were defined on, as
# ported by pytorch-fid. It is torchvision's Inception-v3 with 1008 classes, except that the Mixed
# blocks' average-pooling branch ignores the padding and Mixed_7c pools with a 3x3 max-pool.
# Only its features give numbers comparable with the papers' tables: torchvision's own ImageNet
# Inception, the same architecture trained anew, gives other features and other distances.
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")

class TFPooling:
    """Listed before a torchvision Inception block among a class's bases (so that super() is the
    block): the block's branches run as torchvision wrote them, then its last, the pooling branch
    (a 1x1 conv, cheap), runs again on the TF graph's pool."""
    max_pool = False  # True in Mixed_7c

    def _forward(self, x):
        branches = super()._forward(x)   # torchvision's, the last pooled with the padding counted
        pooled = (F.max_pool2d(x, 3, 1, padding=1) if self.max_pool else
                  F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return branches[:-1] + [self.branch_pool(pooled)]

class FIDInceptionA(TFPooling, InceptionA):
    """Mixed_5b-5d."""

class FIDInceptionC(TFPooling, InceptionC):
    """Mixed_6b-6e."""

class FIDInceptionE(TFPooling, InceptionE):
    """Mixed_7b, and Mixed_7c with max_pool."""

def fid_inception_v3() -> nn.Module:
    """The FID Inception's architecture, with random weights (load pt_inception-2015-12-05)."""
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for name, c, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        setattr(net, name, FIDInceptionA(c, pool_features=pool))
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        setattr(net, name, FIDInceptionC(768, channels_7x7=c7))
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE(1280), FIDInceptionE(2048)
    net.Mixed_7c.max_pool = True
    return net

def load_inception(weights: str | None = None) -> nn.Module:
    """The FID Inception with its weights (a local PATH, or downloaded once), mapping images in
    [-1, 1] at 299x299 to the 2048-d average pool before its classifier."""
    net = fid_inception_v3()
    try:
        state = (torch.load(weights, map_location="cpu", weights_only=True) if weights else
                 torch.hub.load_state_dict_from_url(FID_INCEPTION_URL, weights_only=True))
        net.load_state_dict(state)
    except Exception as e:
        raise MaganError(f"KID needs the FID Inception's weights ({first_line(e)}): run once with "
                         f"internet (they go to {torch.hub.get_dir()}/checkpoints), or pass "
                         f"--inception-weights {FID_INCEPTION_URL.rsplit('/', 1)[1]}") from None
    net.fc = nn.Identity()  # the features: the pool before the classifier, (B, 2048)
    return net.eval().requires_grad_(False)

@torch.no_grad()
def kid_between_folders(real: str | Path, fake: str | Path, weights: str | None = None,
                        device: str = "auto") -> tuple[float, float]:
    """KID between two image folders, printed ×100 as the papers do; returns (mean, std) ×1. The
    file lists are shuffled with a fixed seed, so the blocks do not follow a sorted listing."""
    dev = pick_device(device)
    net, features = load_inception(weights).to(dev), []
    for folder in (real, fake):
        files = list_images(folder)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
        files = [files[i] for i in order]
        feats = [net(F.interpolate(to_tensor(im)[None].to(dev), size=(299, 299), mode="bilinear",
                                   align_corners=False)) for _, im in readable_images(files)]
        if not feats:
            raise MaganError(f"no image in {folder} could be decoded")
        features.append(torch.cat(feats).double().cpu())                     # (N, 2048)
        print(f"  Inception features of {len(feats)} images in {folder}", flush=True)
    mean, std = kid_from_features(*features)
    spread = f" ± {100 * std:.2f}" if math.isfinite(std) else " (one block: no ± below 11 images)"
    print(f"KID×100 = {100 * mean:.2f}{spread}   (blocks of at most 10; {len(features[0])} real, "
          f"{len(features[1])} fake images; FID Inception)", flush=True)
    return mean, std

# =================================================================================================
# 11. The command line: python magan.py train | translate | kid | export | bench
# =================================================================================================
# The train flags are generated from Config (section 7): each field is one flag, with its help
# text and its rule, so a default or a rule is written once; the same rules check the config that
# a checkpoint brings (8.1). Flags left unset stay out of the parsed namespace: that is how `train
# --resume` tells what the user asks for now from what the checkpoint says. Every MaganError
# reaches the user as one line without a traceback: it is a problem the user can fix, and the
# message says how. Any other exception is a bug and keeps its traceback.

def checked(convert, rule, explain: str):
    """An argparse `type`: convert the text, then refuse a value that breaks `rule`, saying why."""
    def parse(text: str):
        value = convert(text)
        if not rule(value):
            raise argparse.ArgumentTypeError(f"{text} {explain}")
        return value
    return parse

positive = checked(int, lambda v: v > 0, "must be a positive integer")
non_negative = checked(float, lambda v: 0 <= v < math.inf, "must be a finite number >= 0 (0: off)")
device_name = checked(str, lambda v: v in ("auto", "cpu", "cuda", "mps") or v[:5] == "cuda:" and
                      v[5:].isdigit(), "is not a device: use auto, cpu, cuda, cuda:N or mps")
RULES = {  # the rule of each Config field that has one (the others: their type, or choices)
    "size": checked(int, lambda v: v >= 32 and v % 32 == 0, "is not a multiple of 32: G halves "
                    "the image twice, the global D up to five times"),
    **dict.fromkeys(("p_gen", "p_dis"), checked(float, lambda v: 1 <= v < math.inf,
                                                "must be at least 1 (section 2)")),
    "workers": checked(int, lambda v: v >= -1, "must be -1 or more"),
    "device": device_name,
    **dict.fromkeys(("ch", "n_res", "iters", "batch", "log_every", "sample_every", "save_every"),
                    positive),
    **dict.fromkeys(("w_adv", "w_cycle", "w_identity", "w_cam", "w_style", "w_content", "minutes",
                     "lr", "weight_decay"), non_negative),
}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
BENCH_FIELDS = ("size", "ch", "n_res", "light", "batch", "device", "fast", "compile")

def flag_options(f: dataclasses.Field) -> dict:
    """argparse's options for the flag of Config field f: on/off, or its rule and choices."""
    if type(f.default) is bool:
        return dict(action=argparse.BooleanOptionalAction)
    return dict(type=RULES.get(f.name, type(f.default)), choices=f.metadata.get("choices"))

def checked_config(values, source) -> Config:
    """A checkpoint's config, each value checked as its flag would be: every field there, of its
    type, within its rule. No network is built from values that no flag allows."""
    values = values if isinstance(values, dict) else {}
    missing = [name for name in CONFIG_FIELDS if name not in values]
    if missing:
        raise MaganError(f"{source}: its config lacks {', '.join(missing)}")
    for f in dataclasses.fields(Config):
        value, options = values[f.name], flag_options(f)
        try:
            if "action" in options:        # an on/off flag holds a bool
                ok = type(value) is bool
            else:                          # typed as text, the value must come back unchanged
                ok = type(value) is not bool and options["type"](str(value)) == value
                ok = ok and value in (options["choices"] or [value])
        except (ValueError, argparse.ArgumentTypeError):
            ok = False
        if not ok:
            raise MaganError(f"{source}: its config has {f.name} = {value!r}, which "
                             f"--{f.name.replace('_', '-')} refuses")
    return Config(**{name: values[name] for name in CONFIG_FIELDS})

def add_config_flags(parser: argparse.ArgumentParser, names=CONFIG_FIELDS):
    """One flag per Config field in `names`, with its help and check; then --full and --preset."""
    for f in (f for f in dataclasses.fields(Config) if f.name in names):
        default = f" (default: {f.default})" if f.default != "" else ""
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f.metadata["help"] + default, **flag_options(f))
    parser.add_argument("--full", dest="light", action="store_false", default=argparse.SUPPRESS,
                        help="full mode, the paper's setting (the same as --no-light)")
    parser.add_argument("--preset", choices=PRESETS, help="a named set of flag values (PRESETS, "
                        "section 11); the flags you type win over it")

def build_parser() -> argparse.ArgumentParser:
    """train, translate, kid, export, bench: `python magan.py COMMAND --help` lists each's flags."""
    parser = argparse.ArgumentParser(prog="magan.py", description=__doc__.split("\n")[1])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_config_flags(commands.add_parser("train", help="train (with no data: a demo on data/)"))
    t = commands.add_parser("translate", help="translate an image or a folder, as PNG at each size")
    t.add_argument("--ckpt", required=True, help="RUN/checkpoints/latest.pt, or an export")
    t.add_argument("--input", required=True, help="an image, or a folder of images")
    t.add_argument("--out", required=True, help="the folder for the translations (STEM.png)")
    t.add_argument("--direction", choices=("a2b", "b2a"), default="a2b",
                   help="a2b: A -> B with G_ab (default); b2a: B -> A with G_ba")
    t.add_argument("--heatmaps", action="store_true",
                   help="also the attention over each input, in OUT/heatmaps/STEM.png")
    device = dict(type=device_name, default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    t.add_argument("--device", **device)
    k = commands.add_parser("kid", help="kernel inception distance between two image folders")
    k.add_argument("--real", required=True, help="folder of real target-domain images")
    k.add_argument("--fake", required=True, help="folder of translated images")
    k.add_argument("--inception-weights", metavar="PATH", help="a copy of the FID Inception's")
    k.add_argument("--device", **device)
    e = commands.add_parser("export", help="a checkpoint's generators and config, for sharing")
    e.add_argument("--ckpt", required=True, help="a training checkpoint")
    e.add_argument("--out", required=True, help="the file to write, e.g. horse2zebra.pt")
    b = commands.add_parser("bench", help="time full training iterations (section 14)")
    add_config_flags(b, BENCH_FIELDS)
    b.add_argument("--iters", type=positive, default=20, help="timed iterations (default: 20)")
    b.add_argument("--warmup", type=positive, default=5, help="untimed ones first (default: 5)")
    return parser

# Presets: named sets of flag values, applied over the defaults; the flags the user types win.
PRESETS = {
    # U-GAT-IT's objective: CAM attention (GAP and GMP), no VGG losses.
    "ugatit": dict(attention="cam", w_style=0.0, w_content=0.0),
    # MAGAN (8) as printed: L_adv + L_style + L_rec + L_cate^G, each weight 1, no cycle or identity.
    "eq8": dict(w_cam=1.0, w_cycle=0.0, w_identity=0.0),
    # Real photos on a 2-core laptop in 40 minutes (section 15; each value: data/experiments.md).
    "laptop": dict(size=128, ch=16, lr=2e-4, w_style=0.0, w_content=0.0, detail_skip=True,
                   w_cycle=1.0, compile=True, minutes=40.0, iters=20_000, log_every=50,
                   sample_every=500, save_every=500),
}

# `python magan.py train` with no data: a demo on the bundled data that downloads nothing.
BUNDLED = Path(__file__).resolve().parent / "data"
DEMO = dict(a=str(BUNDLED / "trainA"), b=str(BUNDLED / "trainB"), out="runs/demo", size=64,
            ch=16, n_res=2, w_style=0.0, w_content=0.0, iters=3000, log_every=50, sample_every=250,
            save_every=500)

def make_config(given: dict, preset: str | None = None, saved: dict | None = None) -> Config:
    """The config from the flags given. A new run: the defaults < the demo (when no data is given)
    < the preset < the flags. A resumed run: its checkpoint's config (`saved`) < the flags. Either
    way --data ROOT gives each domain that --a or --b does not name."""
    base = dict(saved or {})
    if saved is None and not {"data", "a", "b"} & given.keys():   # the demo
        base = dict(DEMO)
        print("demo: no --data, so a small model on the bundled data", flush=True)
    values = {**base, **PRESETS.get(preset, {}), **given}
    if "data" in given:  # ROOT/trainA and ROOT/trainB
        root = Path(given["data"])
        if not ((root / "trainA").is_dir() and (root / "trainB").is_dir()):
            raise MaganError(f"--data {root}: expected the CycleGAN layout {root}/trainA, "
                             f"{root}/trainB (and testA, testB): or pass --a and --b")
        values["a"] = given.get("a", str(root / "trainA"))
        values["b"] = given.get("b", str(root / "trainB"))
    elif saved is None and len({"a", "b"} & given.keys()) == 1:
        one, other = ("a", "b") if "a" in given else ("b", "a")
        raise MaganError(f"--{one} names one domain: pass --{other} too, or --data ROOT")
    return Config(**{k: v for k, v in values.items() if k in CONFIG_FIELDS})

def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code: 0, or 2 for a mistake the message explains (as
    argparse's own), or 130 for a second Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the Config fields the user typed (an unset flag is absent from `args`: add_config_flags)
    given = {name: getattr(args, name) for name in CONFIG_FIELDS if hasattr(args, name)}
    try:
        if args.command == "train" and not given.get("resume"):
            train(make_config(given, args.preset))
        elif args.command == "train":  # the checkpoint's config, and the flags typed now
            if args.preset:  # a resumed run keeps its recipe
                raise MaganError("--preset applies to a new run: at --resume, pass single flags "
                                 "(--iters, --lr), or start a new --out")
            # The folder read is the folder written: the checkpoint's own `out` may be the path
            # of another machine, or of the folder this copy of a project was copied from.
            out = Path(given.get("out", Config.out))
            ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
            train(make_config({**given, "out": str(out)}, saved=ckpt["config"]), ckpt)
        elif args.command == "translate":
            translate(args.ckpt, args.input, args.out, args.direction, args.device, args.heatmaps)
        elif args.command == "kid":
            kid_between_folders(args.real, args.fake, args.inception_weights, args.device)
        elif args.command == "export":
            export_generators(args.ckpt, args.out)
        elif args.command == "bench":
            bench(Config(**{**PRESETS.get(args.preset, {}), **given}), args.iters, args.warmup)
        else:
            parser.print_help()
    except MaganError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began: stop now
        print("\naborted: any checkpoint written before is intact", file=sys.stderr)
        return 130
    return 0

# #################################################################################################
#                             PART IV: EXTRAS, OUT OF THE PAPER'S WAY
# #################################################################################################
# =================================================================================================
# 12. Several GPUs: data parallel under torchrun
# =================================================================================================
# `torchrun --nproc_per_node N magan.py train ...` starts N copies of this script and tells each its
# RANK, its LOCAL_RANK (its GPU on this machine) and the WORLD_SIZE N. Each process trains on its
# own --batch images per iteration: iteration k on rank r reads samples (k·N + r)·B onwards (8.2),
# so one process with batch N·B would read the same ones. Every rank builds the same networks from
# the same seed (or loads the same checkpoint) and applies the same averaged gradients, so the
# weights, spectral norm's vectors included, stay equal without being sent. Rank 0 alone writes
# and prints (its own losses, as nanoGPT does). Why not DistributedDataParallel: it assumes one
# forward and one backward per step, with a gradient for every parameter. A GAN step breaks both:
# each generator runs twice before its backward, and D is frozen during the G step, so a wrapped
# D would wait for gradients that never come. Averaging after each backward gives up only DDP's
# overlap of communication with the backward pass.

@dataclass
class Processes:
    """This process's place among the run's processes; without torchrun, rank 0 of 1."""
    rank: int
    world: int
    device: torch.device
    is_main: bool  # rank 0: it writes the run folder and speaks for all

    def sync(self, networks):
        """train_step's `sync`: one all-reduce per network over its flattened gradients, / N."""
        # One message of all of a network's gradients, not one per tensor: each all-reduce has a
        # fixed cost, and a network has dozens of small tensors (biases, ρ, SAM's classifier).
        if self.world == 1:
            return
        for net in networks:
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])                 # (n_parameters,)
            dist.all_reduce(flat)
            for g, chunk in zip(grads, (flat / self.world).split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))

    def reduce(self, value: float, op: str) -> float:
        """The "max" or "min" of the processes' values, on every one: a stop signal may reach one
        process only, and each has its own clock for a time budget."""
        if self.world == 1:
            return value
        t = torch.tensor(float(value), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return t.item()

    def end(self):
        if dist.is_initialized():
            dist.destroy_process_group()

def start_processes(device_name: str) -> Processes:
    """This process's rank, world size and device, from torchrun's environment; the process
    group joined when there are several."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)), world)
    if world > 1 and not dist.is_initialized():  # NCCL between GPUs; gloo between CPU processes
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, device, is_main=rank == 0)

# =================================================================================================
# 13. The run page: RUN/index.html
# =================================================================================================
# Plain HTML with inline SVG, rewritten at every sample: no server, no JavaScript, nothing to
# install; it opens from a laptop's disk or a cluster's shared folder alike and reloads itself
# every minute. A term whose values span more than two decades (L_G starts in the thousands) is
# drawn on a log scale.

def ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About n round numbers (1, 2 or 5 times a power of ten apart) from lo to hi."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step = next(m * step for m in (1, 2, 5, 10) if m * step >= (hi - lo) / n)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]

def svg_chart(name: str, points: list[tuple[int, float]], w: int = 360, h: int = 180) -> str:
    """One loss term against the iteration, with axes, ticks and their labels."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    log = min(ys) > 0 and max(ys) / min(ys) > 100
    at = math.log10 if log else float                         # a value -> its place on the axis
    x0, x1, y0, y1 = xs[0], max(xs[-1], xs[0] + 1), at(min(ys)), at(max(ys))
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - 0.5, y1 + 0.5)
    px = lambda x: round(50 + (x - x0) / (x1 - x0) * (w - 60), 1)
    py = lambda y: round(h - 30 - (y - y0) / (y1 - y0) * (h - 50), 1)
    text = '<text x="{}" y="{}" text-anchor="{}">{}</text>'.format
    title = f"{name} (log scale)" if log else name
    parts = [f'<path d="M50 20V{h - 30}H{w - 10}" fill="none" stroke="#888"/>',
             text(50, 13, "start", title), text(w - 10, h - 2, "end", "iteration")]
    for t in range(math.ceil(y0), math.floor(y1) + 1) if log else ticks(y0, y1):
        v = 10 ** t if log else t
        parts += [f'<path d="M50 {py(t)}H{w - 10}" stroke="#eee"/>',
                  text(46, py(t) + 4, "end", f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")]
    for t in ticks(x0, x1):
        parts += [f'<path d="M{px(t)} {h - 30}v4" stroke="#888"/>',
                  text(px(t), h - 14, "middle", f"{t / 1e3:g}k" if t >= 1e4 else f"{t:,.0f}")]
    line = " ".join(f"{px(x)},{py(at(y))}" for x, y in zip(xs, ys))
    parts.append(f'<polyline points="{line}" fill="none" stroke="#c33" data-term="{name}"/>')
    return f'<svg width="{w}" height="{h}" font-size="11">{"".join(parts)}</svg>'

def run_page(cfg: Config, progress, latest: int | None) -> str:
    """RUN/index.html: where the run is, the latest sample grids (if any yet), a chart of each loss
    term logged (if any yet)."""
    terms = ["D", "G"] + [t for t in LOSS_TERMS if getattr(cfg, f"w_{t}") > 0]
    rows, done = progress.rows, progress.last_iteration
    eta = progress.length.eta(done, progress.speed)
    charts = "".join(svg_chart(t, [(r["iteration"], r[t]) for r in rows]) for t in terms if rows)
    width = 4 * max(cfg.size, 192)  # tiles of 192 px or more: a 64-px sample is too small to judge
    # The latest grids only: samples/ keeps every one, to page through how the run got there.
    grids = f"<p>Sample grids come every {cfg.sample_every} iterations.</p>"
    if latest:
        grids = "".join(f'<figure><img src="samples/{d}_{latest:07d}.png" alt="{label} sample '
                        f'grid" style="width:{width}px;max-width:100%;image-rendering:pixelated">'
                        f'<figcaption>{label} at iteration {latest}: input | attention | '
                        f'translation | cycle</figcaption></figure>'
                        for d, label in (("a2b", "A → B"), ("b2a", "B → A")))
    name = html.escape(Path(cfg.out).name)
    return (f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="60"><title>'
            f'magan {name}</title><body style="font-family:sans-serif"><h1>magan run {name}</h1>'
            f'<p>iteration {done} of {cfg.iters} · {progress.speed:.2f} it/s · ETA {eta} · updated '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}</p>{grids}<h2>Losses (log.csv)</h2>'
            f'{charts or f"<p>Logged every {cfg.log_every} iterations.</p>"}')

# =================================================================================================
# 14. bench: how fast is one full training iteration?
# =================================================================================================
# `bench` times training's own iteration (a D step and a G step with every loss that is on; the
# fast path unless --no-fast; compiled with --compile) on random images, with a random VGG19 in
# place of ImageNet's: the same computation. The first --warmup iterations (memory allocation,
# the choice of kernels, compiling) are timed apart. On a shared machine a number can be 10-20%
# off: run it twice.
def bench(cfg: Config, iters: int = 20, warmup: int = 5) -> dict:
    """Print and return the milliseconds per iteration after the warm-up, the peak memory and the
    time 1,000,000 iterations would take at that speed."""
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, vgg_weights="random")  # the same computation, no download
    nets, vgg, opt_G, opt_D, autocast = build(cfg, device)
    x = to_device(torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1, device, cfg.fast)
    seconds = []
    for n in (warmup, iters):
        began = time.perf_counter()
        for _ in range(n):
            train_step(nets, vgg, opt_G, opt_D, x, x.flip(-1), cfg, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    ms = 1000 * seconds[1] / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    if device.type == "cpu" and sys.platform == "linux":  # the process's peak resident set (KiB),
        import resource                                    # a stand-in, Python included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    path = "bf16" if isinstance(autocast, torch.autocast) else "fp32"
    print(f"{cfg.size} px, ch {cfg.ch}, n_res {cfg.n_res}, {'light' if cfg.light else 'full'}, "
          f"batch {cfg.batch}, {device}, {path}, torch {torch.__version__}: {ms:.1f} ms per "
          f"iteration after {warmup} warm-up iterations ({seconds[0]:.1f} s); peak memory "
          f"{peak:.2f} GiB; 1,000,000 iterations: {format_seconds(1000 * ms)}", flush=True)
    return dict(ms_per_iter=ms, peak_gib=peak, warmup_s=seconds[0])

# =================================================================================================
# 15. The laptop recipe: the detail skip (--preset laptop; not the paper)
# =================================================================================================
# --preset laptop (section 11) trains on real photos in 40 minutes on a 2-core CPU: 128 px, a
# narrow network, no VGG losses, a pixel cycle weight of 1, a time budget, and one change to the
# model. A generator without skip connections must carry every edge of its input through its S/4
# grid and draw it again, and it learns that slowly: in a short run its translations are blurred,
# and D tells them from photos by the blur alone. The detail skip hands the detail finer than that
# grid, what averaging over 4x4 pixels removes, straight to the output:
#     G(x) = clamp(tanh(network(x)) + x − blur(x), −1, 1)
# The network draws the coarse image (colours, light, stripes); the photo keeps its own edges.
# The clamp keeps every image in [-1, 1]: values beyond would tell D which images are fakes.
# The photo's edges draw its shapes too, so the skip holds them: right for a change of texture
# (horse → zebra), wrong for a change of shape (selfie → anime), where --no-detail-skip lets the
# network draw the new outline. Why each value of the recipe, and the selfies: data/experiments.md.

def fine_detail(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """x − blur(x): what averaging over factor x factor cells, resized back, removes.
    (B, 3, S, S) -> (B, 3, S, S), S a multiple of factor."""
    coarse = F.avg_pool2d(x, factor)                                           # (B, 3, S/4, S/4)
    return x - F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)

class DetailSkipGenerator(Generator):
    """The paper's Generator (section 3), with the input's fine detail added to its output. The
    same weights and the same state_dict keys; only the last step differs."""

    def forward(self, x: torch.Tensor):                                   # x: (B, 3, S, S)
        image, logits, heatmap = super().forward(x)
        return (image.float() + fine_detail(x.float())).clamp(-1, 1), logits, heatmap

if __name__ == "__main__":
    sys.exit(main())
