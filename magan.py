"""
MAGAN: unsupervised image-to-image translation with multi-angle attention, in one file.

    MAGAN   Multi-angle attention GAN for unsupervised image-to-image translation (the paper this
            file implements; its equations are numbered "MAGAN (n)" below).
    U-GAT-IT  J. Kim, M. Kim, H. Kang, K. Lee. Unsupervised Generative Attentional Networks with
            Adaptive Layer-Instance Normalization for Image-to-Image Translation. ICLR 2020.
            MAGAN builds on it: "U-GAT-IT (n)".
    AGGAN   H. Tang, D. Xu, N. Sebe, Y. Yan. Attention-Guided Generative Adversarial Networks for
            Unsupervised Image-to-Image Translation. IJCNN 2019 (mask fusion, --mask-fusion).
    SAT     C. Yang, T. Kim, R. Wang, H. Peng, C.-C. J. Kuo. Show, Attend and Translate:
            Unsupervised Image Translation with Self-Regularization and Attention (--w-selfreg).

Two generators translate between unpaired domains A and B (G_ab: A -> B, G_ba: B -> A). Each
looks at its encoder's features from three "angles" (global max pooling, global average pooling,
and a spatial activation map), learns which channels and positions tell the domains apart, and
re-weights the features there before decoding. Per domain, a global and a local discriminator
use the same attention. Read top to bottom, this file is a tutorial of the paper:

    Part I, the model        1 normalisation  2 attention  3 generator  4 discriminator  5 losses
    Part II, running it      6 data  7 config  8 training  9 translation  10 KID  11 command line
    Appendices               A several GPUs  B the run page  C benchmark  D the FID Inception network

    python magan.py train                          # a quick demo on the bundled data in data/
    python magan.py train --data horse2zebra       # the paper's setting on a CycleGAN-layout folder
    python magan.py translate --ckpt runs/NAME/checkpoints/latest.pt --input photos --out out

Where we depart from the papers (each is explained where it is made):
  * the objective: MAGAN's eq. 8 (L_adv + L_style + L_rec + L_cate^G) plus U-GAT-IT's pixel cycle
    (weight 10) and identity (10) terms, with U-GAT-IT's CAM weight 1000 on L_cate^G. Eq. 8 as
    printed, every weight 1 and no cycle or identity term, is --preset eq8;
  * least-squares adversarial loss, as U-GAT-IT's code (MAGAN prints the BCE form: --gan-loss bce);
  * the style and content losses are L1 distances relative to the features' own size (MAGAN
    prints a plain ‖·‖₁, whose scale depends on the VGG weights: at weight 1 its style term was a
    millionth of the cycle term); the style target is the real target-domain image of the same
    iteration;
  * two discriminators per domain, a global and a local one, as U-GAT-IT (MAGAN draws one);
  * eq. 2 prints a(x) = Conv(a_α, a_β), two inputs; we read three, Conv(a_β, a_α, a_γ), as the
    text around it describes (SAM's map re-weights θ too);
  * the spatial activation map γ is scaled to unit root-mean-square before its classifier; at
    another translation size its learned weight map is resized bilinearly (eval mode only);
  * the discriminators' 1x1 conv after the attention is not spectrally normalised (as U-GAT-IT);
  * numerics, not maths: the attention's class logits and SAM's map are computed in fp32 under
    autocast on every device; each network sees its batched inputs (source and identity, real and
    fake) in one forward pass, and the fakes are computed once per iteration;
  * MAGAN's eq. 7 is garbled in print: the generators' class logits get U-GAT-IT's CAM loss, the
    discriminators' the adversarial loss;
  * the discriminators' attention maps use the spectrally *normalised* classifier weight, the one
    that gave the logit, as U-GAT-IT's TensorFlow code since its fix of August 2019 (its PyTorch
    port uses the raw parameter, whose norm is about 0.6);
  * light mode by default (U-GAT-IT's --light; the paper's full mode is --full);
  * --preset laptop only (short CPU runs): the detail skip, G(x) = tanh(network(x)) + x − blur(x)
    (section 3), and a pixel cycle weight of 1 rather than 10;
  * below 96 px the global discriminator halves the image fewer than five times (64 px: four, to a
    4x4 grid; 32 px: three), where U-GAT-IT's code fails;
  * PyTorch's default weight initialisation and AdaLIN's ρ starting at 1: U-GAT-IT's text gives
    N(0, 0.02) and ρ near 1; its PyTorch code, default init and ρ = 0.9. Biased variances in
    AdaLIN/LIN, as nn.InstanceNorm2d and U-GAT-IT's TF code (its PyTorch port: unbiased);
  * --preset ugatit follows U-GAT-IT's PyTorch port (separate GAP and GMP classifiers, a bias-free
    MLP, default init), not the TensorFlow code behind U-GAT-IT's numbers (one classifier weight
    shared by GAP and GMP, N(0, 0.02));
  * KID: a cubic kernel and blocks of at most 10 over the whole test set (TF-GAN's estimator, as
    U-GAT-IT's tables, which MAGAN's Table 2 quotes). MAGAN's text says "10 subsets of size 10"
    and "degree 9": the same only for a 100-image test set, and degree 9 is likely a typo (KID's
    kernel is cubic, and so is U-GAT-IT's).
Images are tensors in [-1, 1] everywhere.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import hashlib
import html
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.models import Inception_V3_Weights, inception_v3
from torchvision.models.inception import InceptionA, InceptionC, InceptionE
from torchvision.utils import make_grid


class MaganError(Exception):
    """A problem the user can fix (bad folder, missing weights, wrong checkpoint...). The command
    line prints its message without a traceback. The model itself raises plain ValueErrors."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type): enough to say what went wrong."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


# #################################################################################################
#
#                                       PART I: THE MODEL
#
# #################################################################################################

# =================================================================================================
# 1. Normalisation layers (U-GAT-IT §2.1.1, eq. 1)
# =================================================================================================
# Instance norm (IN) removes each channel's own mean and variance: it keeps the content's layout
# and erases its local style. Layer norm (LN) normalises the whole feature map at once: it leaves
# the channels' relative statistics, i.e. the style, free to change globally. U-GAT-IT lets the
# network choose the mix per channel with a learnt ρ; that choice is what lets it change shapes
# (selfie -> anime) and not only textures. The statistics are computed in fp32 even when the
# rest of the network runs in bf16: a bf16 variance of a large feature map loses its low bits.

def layer_instance_norm(x: torch.Tensor, rho: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ρ · â_I + (1 − ρ) · â_L for x: (B, C, H, W) and ρ: (1, C, 1, 1).

    Biased variances, as nn.InstanceNorm2d, nn.LayerNorm and U-GAT-IT's TensorFlow code
    (tf.nn.moments); its PyTorch port uses the unbiased torch.var, which differs by a factor
    HW / (HW − 1) and makes ρ = 1 slightly different from the encoder's instance norm."""
    x = x.float()
    # U-GAT-IT (1):  â_I = (a − μ_I) / √(σ_I² + ε),  â_L = (a − μ_L) / √(σ_L² + ε)
    var_i, mean_i = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)     # per channel: (B, C, 1, 1)
    var_l, mean_l = torch.var_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)  # per sample: (B, 1, 1, 1)
    x_i = (x - mean_i) * torch.rsqrt(var_i + eps)
    x_l = (x - mean_l) * torch.rsqrt(var_l + eps)
    return rho * x_i + (1 - rho) * x_l


class AdaLIN(nn.Module):
    """Adaptive layer-instance norm, U-GAT-IT (1):
        AdaLIN(a, γ, β) = γ · (ρ · â_I + (1 − ρ) · â_L) + β

    γ and β are not parameters of this layer: the generator computes them from its attention
    features, one pair per sample (that is what makes it "adaptive"). ρ starts at 1 (pure
    instance norm), as U-GAT-IT's text says. (Its TensorFlow code also stores 1 but mixes with
    clip(ρ − 0.1), so 0.9 in effect and never more; its PyTorch port starts at 0.9.)"""

    def __init__(self, channels: int, rho_init: float = 1.0):
        super().__init__()
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), rho_init))

    def forward(self, x, gamma, beta):  # x: (B, C, H, W); gamma, beta: (B, C)
        return layer_instance_norm(x, self.rho) * gamma[:, :, None, None] + beta[:, :, None, None]


class LIN(nn.Module):
    """Layer-instance norm of the up-sampling blocks: the same mix with learnt γ and β. ρ starts at
    0 (pure layer norm), as U-GAT-IT says: the up-sampling layers draw the target domain's global
    style, which layer norm leaves free."""

    def __init__(self, channels: int):
        super().__init__()
        self.rho = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return layer_instance_norm(x, self.rho) * self.gamma + self.beta


@torch.no_grad()
def clip_rho(network: nn.Module):
    """U-GAT-IT (1), the update of ρ:  ρ ← clip[0, 1](ρ − τΔρ).  Called after every optimizer step:
    outside [0, 1] the mix would extrapolate past pure instance or pure layer norm."""
    for m in network.modules():
        if isinstance(m, (AdaLIN, LIN)):
            m.rho.clamp_(0.0, 1.0)


class InstanceNorm(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (no affine parameters, like U-GAT-IT's encoder) with fp32 statistics."""

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
# judge the whole image (MAGAN §2.2, Table 5).

class AttentionOutput(NamedTuple):
    features: torch.Tensor  # a(x): (B, C, h, w), MAGAN (2)
    logits: torch.Tensor    # Γ(x): (B, n_angles), MAGAN (1)
    heatmap: torch.Tensor   # Σ_c a(x): (B, 1, h, w), for pictures only


class MultiAngleAttention(nn.Module):
    """Γ and a(x) of MAGAN eq. 1-2 over a feature map θ: (B, C, h, w).

    `grid`: the side h = w of θ at the training size (SAM's classifier has a weight per position).
    `angles`: "ma" (GAP, GMP, SAM), "cam" (GAP, GMP: U-GAT-IT), "sam", or "none" (θ goes straight to
    the 1x1 conv and there are no class logits): the ablations of MAGAN Table 4.
    `spectral`: spectral norm on the classifiers (the discriminators). `leaky`: LeakyReLU(0.2)
    after the 1x1 conv (D) instead of ReLU (G).

    >>> attention = MultiAngleAttention(channels=64, grid=16)   # θ of a 64-px image in G: S/4 = 16
    >>> out = attention(torch.randn(2, 64, 16, 16))              # θ: (B, C, h, w)
    >>> tuple(out.features.shape), tuple(out.logits.shape), tuple(out.heatmap.shape)
    ((2, 64, 16, 16), (2, 3), (2, 1, 16, 16))
    """

    ANGLES = {"ma": ("gap", "gmp", "sam"), "cam": ("gap", "gmp"), "sam": ("sam",), "none": ()}

    def __init__(self, channels: int, grid: int, angles: str = "ma", p: float = 2.0,
                 spectral: bool = False, leaky: bool = False):
        super().__init__()
        if p < 1:
            raise ValueError(f"SAM exponent p = {p} < 1")  # why not: see the --p-gen check, section 7
        maybe_sn = spectral_norm if spectral else (lambda m: m)
        n_inputs = {"gap": channels, "gmp": channels, "sam": grid * grid}
        self.fc = nn.ModuleDict({name: maybe_sn(nn.Linear(n_inputs[name], 1, bias=False))
                                 for name in self.ANGLES[angles]})
        self.grid, self.p = grid, p
        # The angles' re-weighted copies of θ are stacked (n·C channels) and a 1x1 conv mixes them
        # back to C: each output channel may combine channel-wise (GAP, GMP) and position-wise
        # (SAM) emphasis, which MAGAN motivates by the correlation between channels. It is not
        # spectrally normalised, in G or D: U-GAT-IT's Tables 5-6 list SN on every conv of D but
        # this one (and its code leaves it out too).
        self.conv1x1 = nn.Conv2d(max(1, len(self.fc)) * channels, channels, 1)
        self.act = nn.LeakyReLU(0.2) if leaky else nn.ReLU()

    def sam_weight_map(self, h: int, w: int) -> torch.Tensor:
        """SAM's classifier weights ω_γ as a (h, w) map. The classifier is tied to the training
        grid. On another grid (translating at another size, eval mode only) the map is resized
        bilinearly; in training that would silently train a resized copy, so it is an error."""
        weight = self.fc["sam"].weight.view(1, 1, self.grid, self.grid)
        if (h, w) != (self.grid, self.grid):
            if self.training:
                raise ValueError(f"SAM built for a {self.grid}x{self.grid} grid got {h}x{w} in training")
            weight = F.interpolate(weight, size=(h, w), mode="bilinear", align_corners=False)
        return weight.view(h, w)

    def forward(self, theta: torch.Tensor) -> AttentionOutput:  # θ: (B, C, h, w)
        B, C, h, w = theta.shape
        logits, maps = [], []
        # Each `fc.weight` is read once. Under spectral norm that is the *normalised* weight, the
        # one that produced the logit (as U-GAT-IT's TensorFlow code; its PyTorch port re-weights θ
        # with the raw parameter), and every read runs a power iteration. The logits are three tiny
        # matrix products, which autocast (CPU and CUDA) would run in bf16: they run in fp32, with
        # autocast off.
        with torch.autocast(theta.device.type, enabled=False):
            pooled = theta.float()
            if "gap" in self.fc:
                weight = self.fc["gap"].weight                         # ω_β: (1, C)
                logits.append(pooled.mean(dim=(2, 3)) @ weight.t())    # ξ_β: (B, C) @ (C, 1) -> (B, 1)
                maps.append(theta * weight.view(1, C, 1, 1))           # a_β: (B, C, h, w)
            if "gmp" in self.fc:
                weight = self.fc["gmp"].weight                         # ω_α: (1, C)
                logits.append(pooled.amax(dim=(2, 3)) @ weight.t())    # ξ_α: (B, 1)
                maps.append(theta * weight.view(1, C, 1, 1))           # a_α: (B, C, h, w)
            if "sam" in self.fc:
                # SAM's map γ, the activation energy at each position (`energy` here, to keep the
                # name γ for AdaLIN's scale): γ = Σ_n |θ_n|^p, in fp32 from the fp32 copy of θ.
                energy = pooled.abs().pow(self.p).sum(dim=1)           # (B, h, w)
                # Choice: γ is scaled to unit root-mean-square per sample. Raw γ grows like C·|θ|^p
                # and would swamp the other logits. Unit *L2 norm* (as activation-based attention
                # transfer) is too small: under spectral norm |ω_γ| = 1, so ξ_γ would be stuck in
                # [-1, 1] and D could not reach the LSGAN targets. Measured with a D trained alone
                # (128 px, grid 15): SAM's LSGAN loss stayed at 0.47 (real 0.46 vs fake 0.42); with
                # unit RMS 0.22 (0.74 vs 0.27). Unit RMS is unit L2 norm times sqrt(h·w). In full
                # training runs (horse2zebra, 128 px, three seeds) unit L2 learnt no faster either.
                energy = energy.flatten(1)                             # (B, h·w)
                energy = energy * torch.rsqrt(energy.square().mean(dim=1, keepdim=True) + 1e-12)
                weight = self.sam_weight_map(h, w)                     # ω_γ: (h, w)
                logits.append(energy @ weight.reshape(-1, 1))          # ξ_γ: (B, h·w) @ (h·w, 1)
                maps.append(theta * weight)                            # a_γ: (B, C, h, w)
        # MAGAN (1):  Γ(x) = Concat(ξ_α, ξ_β, ξ_γ). We keep U-GAT-IT's order, GAP before GMP:
        # (ξ_β, ξ_α, ξ_γ). Each logit gets the same loss, so the order changes nothing.
        logits = torch.cat(logits, dim=1) if logits else theta.new_zeros(B, 0)   # (B, n_angles)
        # MAGAN (2) prints a_G(x) = Conv(a_α, a_β), two inputs; its text weights θ with SAM's map
        # too, so we read three:  a(x) = Conv1x1(Concat(a_β, a_α, a_γ)), then the activation.
        stacked = torch.cat(maps, dim=1) if maps else theta                      # (B, n·C, h, w)
        a = self.act(self.conv1x1(stacked))                                      # (B, C, h, w)
        return AttentionOutput(a, logits, heatmap=a.sum(dim=1, keepdim=True))    # heatmap: (B, 1, h, w)


# =================================================================================================
# 3. Generator (MAGAN §2.1, Fig. 2(b); layer table: U-GAT-IT appendix Table 4; AGGAN eq. 1)
# =================================================================================================
#
#   x ─ encoder E ─ θ ─ attention ─ a(x) ─ MLP ─ (γ, β)
#                                    └──── AdaLIN residual blocks (γ, β) ─ up-sampling ─ G(x)
#
# Three choices recur in every layer table below:
#   * bias=False before a normalisation layer: the norm subtracts each channel's mean, which
#     cancels any bias the convolution adds. It would be a parameter that never learns anything.
#   * Reflection padding: zero padding makes the border look like a dark frame, which a
#     translator then learns to paint; mirroring the image keeps border statistics like the interior.
#   * Up-sampling by nearest neighbour, then a 3x3 convolution, rather than a transposed
#     convolution, whose uneven kernel overlap draws checkerboard artifacts (Odena et al., 2016).

class ResBlock(nn.Module):
    """Encoder residual block: x + IN(conv(pad(ReLU(IN(conv(pad(x))))))). The skip lets each block
    learn a correction to its input, which keeps the gradient path short in a deep encoder."""

    def __init__(self, channels: int):
        super().__init__()
        C = channels
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3, bias=False), InstanceNorm(C), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3, bias=False), InstanceNorm(C))

    def forward(self, x):
        return x + self.body(x)


class AdaLINResBlock(nn.Module):
    """Decoder residual block: the same, with AdaLIN(γ, β) in place of instance norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False))
        self.norm1 = AdaLIN(channels)
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False))
        self.norm2 = AdaLIN(channels)

    def forward(self, x, gamma, beta):
        h = F.relu(self.norm1(self.conv1(x), gamma, beta))
        return x + self.norm2(self.conv2(h), gamma, beta)


def fuse(content: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """AGGAN (1):  G(x) = R ⊙ M + x ⊙ (1 − M). Where the mask M is 0 the input passes unchanged;
    where it is 1 the generated content R replaces it. content, x: (B, 3, S, S); mask: (B, 1, S, S)."""
    return content * mask + x * (1 - mask)


# The detail skip (--detail-skip, the laptop recipe's one change to the model; off by default). A
# generator without skip connections must carry every edge and blade of grass of its input through
# its S/4 grid and draw it again. It learns that slowly: trained to do nothing else than copy
# horse photos (identity loss alone, 128 px, width 16), its copies were still blurred after 1,500
# iterations (mean L1 error 0.26 on [-1, 1]), and as wide again (width 32), no sharper. In a short
# run the translations are then blurred, and a discriminator tells them from photos by the blur
# alone, so the generator learns to add high-frequency noise (the "mesh" of our first laptop runs)
# before it learns stripes. The skip hands the input's fine detail, what averaging over 4x4 pixels
# removes, straight to the output: G(x) = tanh(network(x)) + x − blur(x). The network draws the
# coarse image (colours, light, stripes of any width) and the photo keeps its own edges and
# texture. Where the network leaves the coarse image as it is, G(x) = x.

def fine_detail(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """x − blur(x): what averaging over factor x factor cells (and resizing back) removes, the
    detail finer than the generator's S/4 grid. (B, 3, S, S) -> (B, 3, S, S); S a multiple of factor."""
    coarse = F.avg_pool2d(x, factor)                                               # (B, 3, S/4, S/4)
    return x - F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)


class GeneratorOutput(NamedTuple):
    image: torch.Tensor            # the translation: (B, 3, S, S) in [-1, 1] (detail skip: slightly beyond)
    logits: torch.Tensor           # the attention's class logits Γ_G(x): (B, n_angles)
    heatmap: torch.Tensor          # (B, 1, S/4, S/4)
    mask: torch.Tensor | None      # AGGAN's attention mask M: (B, 1, S, S), with mask fusion only


class Generator(nn.Module):
    """G: (B, 3, S, S) -> GeneratorOutput. S must be a multiple of 4; full mode runs at `size` only.

    `light`: the γ, β MLP reads the global average of a(x) (U-GAT-IT's --light) instead of the
    whole flattened map (the paper's full mode: C·(S/4)²·C weights, 268M at S = 256, ch = 64).
    `mask_fusion`: the last layer also draws a mask M and the output is AGGAN's fusion.
    `detail_skip`: the input's fine detail is added to the output (above); not with mask fusion.

    >>> G = Generator(ch=8, n_res=2, size=64)                  # C = 4·ch = 32 channels at S/4
    >>> out = G(torch.rand(2, 3, 64, 64) * 2 - 1)              # images in [-1, 1]
    >>> tuple(out.image.shape), tuple(out.logits.shape), tuple(out.heatmap.shape), out.mask
    ((2, 3, 64, 64), (2, 3), (2, 1, 16, 16), None)
    """

    def __init__(self, ch: int = 64, n_res: int = 4, size: int = 256, light: bool = True,
                 attention: str = "ma", p: float = 2.0, mask_fusion: bool = False, detail_skip: bool = False):
        super().__init__()
        if mask_fusion and detail_skip:
            raise ValueError("mask fusion and the detail skip both decide the output: choose one")
        C, grid = 4 * ch, size // 4
        # Encoder E: 7x7 conv to ch, two stride-2 3x3 convs to 2ch and 4ch = C, n_res residual blocks.
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ch, 7, bias=False), InstanceNorm(ch), nn.ReLU()]
        for i in range(2):
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(ch * 2**i, ch * 2**(i + 1), 3, stride=2, bias=False),
                       InstanceNorm(ch * 2**(i + 1)), nn.ReLU()]
        layers += [ResBlock(C) for _ in range(n_res)]
        self.encoder = nn.Sequential(*layers)
        self.attention = MultiAngleAttention(C, grid, attention, p)
        self.light, self.grid, self.mask_fusion = light, grid, mask_fusion
        # γ, β: two FC + ReLU layers of width C, then one linear head each (Table 4).
        self.mlp = nn.Sequential(nn.Linear(C if light else C * grid * grid, C, bias=False), nn.ReLU(),
                                 nn.Linear(C, C, bias=False), nn.ReLU())
        self.to_gamma = nn.Linear(C, C, bias=False)
        self.to_beta = nn.Linear(C, C, bias=False)
        self.res_blocks = nn.ModuleList(AdaLINResBlock(C) for _ in range(n_res))
        # Decoder: nearest x2, 3x3 conv, LIN, ReLU (twice, C -> C/2 -> C/4 = ch), then a 7x7 conv to
        # the image, or to the image and AGGAN's mask (3 + 1 channels).
        layers = []
        for i in range(2):
            c = C // 2**i
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                       nn.Conv2d(c, c // 2, 3, bias=False), LIN(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, 4 if mask_fusion else 3, 7, bias=False)]
        self.decoder = nn.Sequential(*layers)
        self.detail_skip = detail_skip

    def forward(self, x: torch.Tensor) -> GeneratorOutput:          # x: (B, 3, S, S)
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of 4")
        theta = self.encoder(x)                                     # θ: (B, C, S/4, S/4)
        if not self.light and theta.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"full mode runs at {4 * self.grid} px only, not {x.shape[-2]}x{x.shape[-1]}")
        attention = self.attention(theta)
        a = attention.features                                      # a(x): (B, C, S/4, S/4)
        style = a.mean(dim=(2, 3)) if self.light else a.flatten(1)  # (B, C) or (B, C·(S/4)²)
        style = self.mlp(style)                                     # (B, C)
        gamma, beta = self.to_gamma(style), self.to_beta(style)     # (B, C) each
        h = a                                                       # the decoder starts from a(x), not θ
        for block in self.res_blocks:
            h = block(h, gamma, beta)                               # (B, C, S/4, S/4)
        out = self.decoder(h)                                       # (B, 3 or 4, S, S)
        if self.detail_skip:  # the network draws the coarse image; the input's own detail is added
            image = torch.tanh(out.float()) + fine_detail(x.float())   # (B, 3, S, S)
            return GeneratorOutput(image, attention.logits, attention.heatmap, None)
        if not self.mask_fusion:
            return GeneratorOutput(torch.tanh(out), attention.logits, attention.heatmap, None)
        content = torch.tanh(out[:, :3])                           # R: (B, 3, S, S) in [-1, 1]
        mask = torch.sigmoid(out[:, 3:])                            # M: (B, 1, S, S) in [0, 1]
        image = fuse(content, mask, x.to(content.dtype))
        return GeneratorOutput(image, attention.logits, attention.heatmap, mask)


# =================================================================================================
# 4. Discriminator (MAGAN §2.2, eq. 3; U-GAT-IT appendix Tables 5-6)
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
    """Stride-2 convs of the global discriminator: 5 (to S/32) as in U-GAT-IT, wherever that leaves
    a grid of 3x3 or more for the two stride-1 4x4 convs after it (S >= 96); below, fewer (S = 64:
    4, S = 32: 3), where U-GAT-IT's own code fails (its padding is larger than a 2x2 map)."""
    depth = 5
    while size // 2**depth < 3:
        depth -= 1
    return depth


class DiscriminatorOutput(NamedTuple):
    patch: torch.Tensor     # Φ(z): one real/fake logit per patch, (B, 1, h-1, w-1)
    logits: torch.Tensor    # the attention's class logits Γ_D(z): (B, n_angles)
    heatmap: torch.Tensor   # (B, 1, h, w)


class Discriminator(nn.Module):
    """D: (B, in_channels, S, S) -> DiscriminatorOutput, with h = S / 2^n_down − 1 the attention grid.
    `in_channels` is 4 for AGGAN's attention-guided D, which sees an image and a mask together.

    >>> D = Discriminator(ch=8, n_down=3, size=64)             # a local D: down to S/8, h = 8 − 1 = 7
    >>> out = D(torch.rand(2, 3, 64, 64) * 2 - 1)
    >>> tuple(out.patch.shape), tuple(out.logits.shape), tuple(out.heatmap.shape)
    ((2, 1, 6, 6), (2, 3), (2, 1, 7, 7))
    """

    def __init__(self, ch: int = 64, n_down: int = 5, size: int = 256, attention: str = "ma",
                 p: float = 1.0, in_channels: int = 3):
        super().__init__()
        # n_down stride-2 4x4 convs (widths ch, 2ch, ... ch·2^(n_down−1)), then one stride-1 4x4
        # conv to C = ch·2^n_down: Table 5 (local, n_down = 3) and Table 6 (global, n_down = 5).
        widths = [in_channels] + [ch * 2**i for i in range(n_down)]            # in, ch, 2ch, ...
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2))
            layers += [nn.ReflectionPad2d(1), conv, nn.LeakyReLU(0.2)]
        C = ch * 2**n_down
        layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(C // 2, C, 4, stride=1)), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers)
        grid = size // 2**n_down - 1
        self.attention = MultiAngleAttention(C, grid, attention, p, spectral=True, leaky=True)
        self.classifier = nn.Sequential(nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(C, 1, 4, bias=False)))

    def forward(self, z: torch.Tensor) -> DiscriminatorOutput:     # z: (B, 3 or 4, S, S)
        theta = self.encoder(z)                                      # θ: (B, C, h, h), h = S/2^n − 1
        attention = self.attention(theta)
        # MAGAN (3):  Φ(z) = σ(Conv(a_D(z))). The sigmoid σ is left to the loss: the least-squares
        # loss reads the raw logits, as U-GAT-IT's code does.
        patch = self.classifier(attention.features)                 # (B, 1, h−1, h−1)
        return DiscriminatorOutput(patch, attention.logits, attention.heatmap)


# =================================================================================================
# 5. Losses (MAGAN §2.3, eq. 4-8; U-GAT-IT §2.2, eq. 2-7; AGGAN; SAT)
# =================================================================================================
# For the direction a -> b (b -> a is symmetric): x_a, x_b real images, fake_ab = G_ab(x_a) and
# the reconstruction G_ba(fake_ab). The training step (section 8) adds the terms up.

def adversarial_loss(logits: torch.Tensor, is_real: bool, kind: str = "lsgan") -> torch.Tensor:
    """MAGAN (4):  L_adv = E_y[log D(y)] + E_x[log(1 − D(G(x)))]   (kind="bce", as MAGAN prints it).
    U-GAT-IT (2):  L_lsgan = E_y[D(y)²] + E_x[(1 − D(G(x)))²]      (kind="lsgan", our default).

    Both are printed as one expression that D maximises and G minimises. Like U-GAT-IT's code,
    which MAGAN builds on, we train D towards real -> 1 and fake -> 0 and G towards fake -> 1, with
    least squares by default. Why least squares: the squared error keeps pulling a fake towards
    "real" even where D rejects it confidently, where the log loss saturates and its gradient
    vanishes. Each call scores one side: all logits against target 1 (is_real) or 0. Autocast
    runs both losses in fp32."""
    if logits.numel() == 0:  # attention "none" has no class logits
        return logits.new_zeros(())
    target = torch.ones_like(logits) if is_real else torch.zeros_like(logits)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def cam_loss(logits_source: torch.Tensor, logits_target: torch.Tensor) -> torch.Tensor:
    """U-GAT-IT (5):  L_cam = −(E_{x∼X_s}[log η_s(x)] + E_{x∼X_t}[log(1 − η_s(x))]).

    MAGAN (7) prints L_cate^G = E||Γ_G(x) − Γ_G(y)||₁, garbled in extraction; we read it as
    U-GAT-IT's CAM loss: G_ab's attention classifiers must say "source domain" (1) on the images
    they translate (x_a) and "not source" (0) on target-domain images (x_b, seen in the identity
    pass). This is what makes the attention weights point at what differs between the domains."""
    if logits_source.numel() == 0:
        return logits_source.new_zeros(())
    return (F.binary_cross_entropy_with_logits(logits_source, torch.ones_like(logits_source))
            + F.binary_cross_entropy_with_logits(logits_target, torch.zeros_like(logits_target)))


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """M = F Fᵀ / (C·H·W) for features F: (B, C, H·W): how strongly each pair of channels fires
    together, wherever that happens. Always fp32: a bf16 Gram loses the small differences the
    style loss measures, so autocast is switched off here."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        B, C, H, W = features.shape
        f = features.float().reshape(B, C, H * W)              # (B, C, H·W)
        return f @ f.transpose(1, 2) / (C * H * W)             # (B, C, C)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ|a − b| / (Σ|a| + Σ|b|) per sample, averaged over the batch: an L1 distance as a fraction
    of the two tensors' size, between 0 (equal) and 1 (nothing in common, e.g. opposite signs).
    The denominator is held constant for the gradient: it only sets the scale, so the gradient
    points where plain L1's does. a, b: (B, ...); computed in fp32."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    size = (a.abs().sum(dim=1) + b.abs().sum(dim=1)).detach().clamp_min(1e-12)   # (B,)
    return ((a - b).abs().sum(dim=1) / size).mean()


# Why relative: MAGAN (5) and (6) print a plain ‖·‖₁, but the size of VGG's activations (and so of
# an L1 between them, and of its gradient) depends on which VGG weights are loaded, by orders of
# magnitude: with a C·H·W-normalised Gram the style term measured ~1e-5 with a random VGG and
# ~1e-4 to 1e-3 is usual with ImageNet's, beside a cycle term of ~1 weighted 10. At any default
# weight it was inert. As a fraction of the features' own size, both terms are between 0 and 1
# whatever VGG is loaded, and their weights mean the same thing on every machine.

def style_loss(features_fake: torch.Tensor, features_real: torch.Tensor) -> torch.Tensor:
    """MAGAN (5):  L_style = E||M(φ4(G(x))) − M(φ4(y))||₁, φ4 = VGG19 relu4_4, y a real image of
    the target domain (we use the x_b of the same iteration), the L1 taken relative to the two
    Gram matrices' size (relative_l1, see above)."""
    return relative_l1(gram_matrix(features_fake), gram_matrix(features_real))


def content_loss(features_reconstruction: torch.Tensor, features_input: torch.Tensor) -> torch.Tensor:
    """MAGAN (6):  L_rec = E||φ5(G_ba(G_ab(x))) − φ5(x)||₁, φ5 = VGG19 relu5_4: the cycle, compared
    in VGG's semantic features rather than in pixels; the L1 relative to the features' size."""
    return relative_l1(features_reconstruction, features_input)


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """AGGAN's attention loss:  L_tv(M) = Σ_{w,h} |M(w+1, h) − M(w, h)| + |M(w, h+1) − M(w, h)|.

    We average each sum instead (mean over the differences), so the weight does not depend on the
    image size. It makes masks smooth, in blobs rather than speckles. AGGAN adds it because masks
    tend to saturate at 1 (citing GANimation); note that a mask of all ones has no variation at
    all: what keeps M from saturating is the pixel, identity and cycle losses. mask: (B, 1, H, W)."""
    mask = mask.float()  # autocast would keep the differences and their means in bf16
    return ((mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().mean()
            + (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().mean())


SELFREG_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8)  # SAT §3: "the first three layers", 1/32, 1/16, 1/8


def self_regularisation(features_output: tuple, features_input: tuple) -> torch.Tensor:
    """SAT's self-regularisation:  l_reg = Σ_l w_l / (H_l W_l) Σ_{h,w} ||F_l(G(x))_hw − F_l(x)_hw||²₂.

    The perceptual distance between a translation and its own input on VGG19's first layers
    (relu1_2, relu2_2, relu3_4: the ends of its first three blocks, as LPIPS, the distance SAT
    cites, takes its layers): G should keep the input's low-level look (colours, edges)."""
    total = 0
    for w, f_out, f_in in zip(SELFREG_LAYER_WEIGHTS, features_output, features_input):
        # fp32 by hand: under autocast the differences and their squares would be bf16 (and on the
        # CPU their sum too; CUDA's autocast runs sums in fp32 itself)
        squared = (f_out.float() - f_in.float()).square().sum(dim=1)   # (B, H_l, W_l)
        total = total + w * squared.mean()                               # mean over positions (and batch)
    return total


# --- VGG19, the perceptual network of the style, content and self-regularisation losses ---------

VGG19_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512]  # conv widths, "M" = 2x2 max-pool


def vgg19_features() -> nn.Sequential:
    """VGG19's convolutional part up to relu5_4, with torchvision's layer indices (so torchvision's
    `features.N.*` weights load into it). ReLU outputs: relu1_2 = 3, relu2_2 = 8, relu3_4 = 17,
    relu4_4 = 26, relu5_4 = 35."""
    layers, c_in = [], 3
    for v in VGG19_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            conv = nn.Conv2d(c_in, v, 3, padding=1)
            # torchvision's VGG initialisation (the ImageNet weights replace it). With PyTorch's
            # default init the deep features of a random VGG hardly depend on the image.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


class VGGOutput(NamedTuple):
    relu1_2: torch.Tensor   # (B, 64, S, S)       } SAT's self-regularisation
    relu2_2: torch.Tensor   # (B, 128, S/2, S/2)  }
    relu3_4: torch.Tensor   # (B, 256, S/4, S/4)  }
    relu4_4: torch.Tensor   # (B, 512, S/8, S/8)    MAGAN's style loss
    relu5_4: torch.Tensor   # (B, 512, S/16, S/16)  MAGAN's content loss


class VGGFeatures(nn.Module):
    """Frozen VGG19 that maps images in [-1, 1] to the features the losses compare. It only scores
    images: its parameters never get gradients and it stays in eval mode."""

    CUTS = (4, 9, 18, 27, 36)  # after relu1_2, relu2_2, relu3_4, relu4_4, relu5_4

    def __init__(self, features: nn.Sequential):
        super().__init__()
        starts = (0,) + self.CUTS[:-1]
        self.stages = nn.ModuleList(features[a:b] for a, b in zip(starts, self.CUTS))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> VGGOutput:
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> [0, 1] -> ImageNet's normalisation
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return VGGOutput(*outputs)


# #################################################################################################
#
#                                      PART II: RUNNING IT
#
# #################################################################################################

# =================================================================================================
# 6. Data: two unpaired folders (CycleGAN layout ROOT/trainA, trainB, testA, testB)
# =================================================================================================
# The two domains are *unpaired*: no horse has its zebra. Training sample k is therefore one image
# of each domain, drawn independently, each with U-GAT-IT's augmentation. Everything random about
# sample k is a pure function of (seed, k), which is what makes a resumed run draw exactly the
# samples an uninterrupted one would have.
# Why each domain walks in its own order: pairing the i-th horse with the i-th zebra in every
# epoch would show the networks the same pairs again and again, a relation between the two
# folders that the data do not have. Why per-sample keys and not one global random stream:
# with worker processes, a stream's state after iteration k depends on which worker drew what;
# a key (seed, domain, k) does not.

def keyed_generator(*key) -> torch.Generator:
    """A torch.Generator seeded by a hash of `key`: the randomness of sample k is a pure function of
    (seed, k), so a resumed run draws exactly what an uninterrupted one would."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class UnpairedImages(torch.utils.data.Dataset):
    """Item k is the k-th training sample (x_a, x_b, skipped): each domain is walked in a fresh
    random order every epoch, independently (the data are unpaired), and each image gets U-GAT-IT's
    augmentation (appendix B.2): a horizontal flip with p = 0.5, a resize to (S+30)², a random SxS
    crop. Files that fail to decode (a truncated JPEG, say) are replaced by the next file, and
    their names returned so that the trainer reports them (section 6.2 reads the files).

    Any k >= 0 is a sample; len() is one epoch of the larger domain, so that a plain
    DataLoader(data, shuffle=True) works too. Training reads k = 0, 1, 2, ... (IterationSamples)."""

    def __init__(self, folder_a, folder_b, size: int, seed: int):
        self.files = (list_images(folder_a), list_images(folder_b))
        self.size, self.seed = size, seed
        for files in self.files:  # fail before training if no file of a domain decodes at all
            self._first_readable(files)

    def __len__(self) -> int:
        return max(len(files) for files in self.files)

    def __getitem__(self, k: int):
        images, skipped = [], []
        for domain, files in enumerate(self.files):
            epoch, position = divmod(k, len(files))
            order = torch.randperm(len(files), generator=keyed_generator(self.seed, domain, epoch))
            im, bad = self._first_readable(files, int(order[position]))
            # Each domain draws its own flip and crop: the same draw for both would pair them.
            images.append(self._augment(im, keyed_generator(self.seed, domain, "augment", k)))
            skipped += bad
        return images[0], images[1], skipped

    def _augment(self, im: Image.Image, g: torch.Generator) -> torch.Tensor:
        big, S = self.size + 30, self.size
        if torch.rand((), generator=g) < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((big, big), Image.Resampling.BILINEAR)
        top, left = torch.randint(0, big - S + 1, (2,), generator=g).tolist()  # any of the 31x31 offsets
        return to_tensor(im.crop((left, top, left + S, top + S)))  # (3, S, S)

    def _first_readable(self, files, start=0):
        skipped = []
        for i in range(len(files)):
            path = files[(start + i) % len(files)]
            try:
                return load_rgb(path, self.size + 30), skipped
            except Exception as e:
                skipped.append(f"{path} ({first_line(e)})")
        raise MaganError(f"no image in {files[0].parent} can be decoded:\n  " + "\n  ".join(skipped))


class IterationSamples(torch.utils.data.Sampler):
    """The sample indices one process reads, iteration after iteration, from `start`: iteration k
    on rank r of `world` processes reads samples (k·world + r)·B ... (k·world + r)·B + B − 1. One
    process with batch world·B reads the same samples in the same iteration (appendix A)."""

    def __init__(self, start: int, iters: int, batch: int, world: int = 1, rank: int = 0):
        self.start, self.iters, self.batch, self.world, self.rank = start, iters, batch, world, rank

    def __iter__(self):
        for k in range(self.start, self.iters):
            first = (k * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self):
        return (self.iters - self.start) * self.batch


def collate_pairs(samples):
    """Stack a list of (x_a, x_b, skipped) into (B, 3, S, S) batches and one list of skipped files."""
    x_a = torch.stack([s[0] for s in samples])
    x_b = torch.stack([s[1] for s in samples])
    return x_a, x_b, [name for s in samples for name in s[2]]


def ignore_stop_signals(_worker_id):
    """Data workers leave Ctrl-C and SIGTERM to the main process, which saves a checkpoint and then
    shuts them down. `timeout`, SLURM (scancel, preemption) and systemd signal the whole process
    group: a worker that died of the signal would crash the main process before it could save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(workers: int, processes_per_machine: int = 1) -> int:
    """-1 (auto): one data worker fewer than this process's share of the CPU cores, at most 4. More
    workers than cores only adds switching (and PyTorch warns about it)."""
    if workers >= 0:
        return workers
    return max(0, min(4, available_cores() // processes_per_machine - 1))


def training_batches(data: UnpairedImages, batch: int, start: int, iters: int, workers: int,
                     world: int = 1, rank: int = 0, pin_memory: bool = False):
    """The (x_a, x_b, skipped) batches of iterations start+1 ... iters, loaded by `workers`
    processes (0: in this one) while the networks compute. The workers start here."""
    with warnings.catch_warnings():  # PyTorch says the same twice, in its own words; train() says it once
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch, sampler=IterationSamples(start, iters, batch, world, rank),
            num_workers=workers, collate_fn=collate_pairs, pin_memory=pin_memory,
            worker_init_fn=ignore_stop_signals if workers else None)
        return iter(loader)


# --- 6.2 Reading images safely: any format, mode and size; broken files are skipped ---------------
# A training set scraped from the web holds every kind of file: CMYK and palette JPEGs, 16-bit
# PNGs, phone photos rotated by an EXIF tag, the odd text file renamed .jpg, a download cut off
# half way. The network wants one thing, 8-bit RGB the right way up, so every image goes through
# load_rgb. What cannot be decoded is skipped and named once (6.1 draws a replacement), because
# one bad file in thousands should cost the user one line in the log, not a crashed run at
# iteration 40,000. A folder with no readable image at all is an error before training starts.

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def load_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """Open any image Pillow reads and return it as 8-bit RGB, upright. Raises OSError/ValueError
    if the file is not a readable image (the caller decides whether to skip it). `draft_size`: a
    large JPEG may be decoded at a reduced scale, still at least that size."""
    with Image.open(path) as im:
        if draft_size:
            im.draft("RGB", (draft_size, draft_size))  # JPEG: decode a 4000x3000 photo at 1/8 scale
        im.load()  # a truncated file fails here, not later inside a worker
        im = ImageOps.exif_transpose(im)  # phone photos store "rotate me" in EXIF, not in the pixels
        if im.mode.startswith("I;16") or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey: keep the top 8 bits
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            # Composite transparent pixels on white instead of keeping whatever colour they hide.
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        return im.convert("RGB")


def readable_images(files, draft_size: int | None = None):
    """Yield (path, RGB image) for each file that decodes; report the others by name and go on."""
    for path in files:
        try:
            image = load_rgb(path, draft_size)
        except Exception as e:  # Pillow raises several types for broken files
            print(f"skipping unreadable image {path} ({first_line(e)})", flush=True)
            continue
        yield path, image


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float tensor in [-1, 1]."""
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> PIL RGB (the inverse of to_tensor, rounding to 8 bits)."""
    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy())


def looks_like_dataset_root(folder: Path) -> bool:
    return (folder / "trainA").is_dir() and (folder / "trainB").is_dir()


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of one flat folder. Files Pillow cannot identify (text, zero bytes...)
    are reported once by name and skipped; a folder with no image at all is an error that says
    what to pass instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MaganError(f"image folder {folder} does not exist (expected the CycleGAN layout "
                         f"ROOT/trainA, trainB, testA, testB: pass --data ROOT, or --a and --b)")
    good, bad = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path) as im:  # reads the header only: cheap even for 100k files
                im.size
            good.append(path)
        except Exception as e:
            bad.append(f"{path.name} ({type(e).__name__})")
    if bad:
        print(f"skipping {len(bad)} unreadable file(s) in {folder}: {', '.join(bad)}", flush=True)
    if good:
        return good
    if looks_like_dataset_root(folder):
        raise MaganError(f"{folder} is a dataset root (it holds trainA/ and trainB/), not a folder of "
                         f"images: pass --data {folder}")
    nested = [p for p in folder.rglob("*") if p.parent != folder and p.suffix.lower() in IMAGE_SUFFIXES]
    if nested:
        raise MaganError(f"no image directly in {folder}, but its subfolders hold {len(nested)} (e.g. "
                         f"{nested[0].relative_to(folder)}). magan reads one flat folder per domain: pass "
                         f"that subfolder, or move the images up")
    raise MaganError(f"no readable image in {folder}: put .jpg/.png images there")


def dataset_folders(root: str | Path) -> tuple[str, str]:
    """--data ROOT: the training folders ROOT/trainA and ROOT/trainB (testA/testB give the samples)."""
    root = Path(root)
    if not looks_like_dataset_root(root):
        hint = (" It holds images itself: pass it as --a or --b." if any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in root.glob("*")) else "")
        raise MaganError(f"--data {root}: expected the CycleGAN layout {root}/trainA, {root}/trainB "
                         f"(and testA, testB for the sample grids).{hint}")
    return str(root / "trainA"), str(root / "trainB")


def fixed_images(folder: str | Path, n: int, size: int) -> torch.Tensor:
    """The first n readable images of a folder, resized to SxS: the inputs of every sample grid."""
    images = []
    for _, im in readable_images(list_images(folder), size):
        images.append(to_tensor(im.resize((size, size), Image.Resampling.BILINEAR)))
        if len(images) == n:
            break
    if not images:
        raise MaganError(f"no image in {folder} can be decoded")
    return torch.stack(images)  # (n, 3, S, S)


def sample_folder(train_folder: str) -> Path:
    """testA beside trainA (CycleGAN layout) if it exists, else the training folder itself."""
    train = Path(train_folder)
    if train.name.startswith("train"):
        test = train.with_name("test" + train.name[len("train"):])
        if test.is_dir():
            return test
    return train

# =================================================================================================
# 7. Configuration: every default is the paper's, and the command line is generated from it
# =================================================================================================
# Each field of Config becomes a flag (`n_res` -> `--n-res`) whose help is the text beside it, and
# whose `type` (one of the checks below) refuses a bad value while the command line is parsed, with
# the reason. This is the one place where the rules are explained: the networks keep only terse
# guards. Where the papers are silent, the default says so.
# Presets (after Config) change several defaults at once, for a named purpose: U-GAT-IT's
# objective, MAGAN's eq. 8 as printed, or real photos on a laptop. The order of precedence is
# written once, in make_config: the defaults, then the demo (only when no data is given), then the
# preset, then the flags the user typed. So `--preset laptop --size 96` is the laptop recipe at
# 96 px, and every run's config.json records the values that actually ran.

def checked(convert, rule, explain: str):
    """An argparse `type`: convert the text, then refuse values that break `rule`, saying why."""
    def parse(text: str):
        value = convert(text)
        if not rule(value):
            raise argparse.ArgumentTypeError(f"{text} {explain}")
        return value
    return parse


SIZE_RULE = ("is not a multiple of 32 (at least 32): the generator halves the image twice and the "
             "global discriminator up to five times")
image_size = checked(int, lambda v: v >= 32 and v % 32 == 0, SIZE_RULE)
positive_int = checked(int, lambda v: v > 0, "must be a positive integer")
worker_count = checked(int, lambda v: v >= -1, "must be 0 or more (or -1: automatic)")
weight = checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0 (0 switches "
                                                                 "the term off)")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
fraction = checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
budget_minutes = checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number of minutes "
                         ">= 0 (0: no time budget)")
sam_exponent = checked(float, lambda v: math.isfinite(v) and v >= 1, "must be at least 1: |θ|^p with p < 1 "
                       "has an infinite gradient where θ = 0, and ReLU features are often 0")
device_name = checked(str, lambda v: v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and
                      v[5:].isdigit()), "is not a device: use auto, cpu, cuda, cuda:N or mps")


def option(default, help: str, **argparse_kwargs):
    """A Config field with its help text (and optionally a `type=` check from above, or `choices=`)."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class Config:
    # data and run folder
    data: str = option("", "a CycleGAN-layout dataset root: ROOT/trainA, ROOT/trainB (testA/testB, beside "
                           "them, give the sample grids). Or name the two folders with --a and --b; with "
                           "--data, --a or --b replaces that one domain")
    a: str = option("data/trainA", "folder of domain-A training images (testA beside it gives the samples)")
    b: str = option("data/trainB", "folder of domain-B training images (testB beside it gives the samples)")
    out: str = option("runs/magan", "run folder: config.json, log.csv, index.html, samples/, checkpoints/")
    preset: str = option("magan", "magan: MAGAN's objective with U-GAT-IT's terms; ugatit: U-GAT-IT's (CAM "
                                  "attention, no VGG losses); eq8: MAGAN's eq. 8 as printed (no pixel cycle, "
                                  "no identity, every weight 1); laptop: real photos on 2 CPU cores in 40 "
                                  "minutes (128 px, width 16, lr 2e-4, detail skip, cycle weight 1, no VGG, "
                                  "compiled). Explicit flags override a preset",
                         choices=("magan", "ugatit", "eq8", "laptop"))
    size: int = option(256, "image size S, a multiple of 32 (the paper: 256)", type=image_size)
    # model (U-GAT-IT appendix Tables 4-6; MAGAN §2.1-2.2; AGGAN)
    ch: int = option(64, "base width of every network (the paper: 64)", type=positive_int)
    n_res: int = option(4, "residual blocks in the generator's encoder and decoder (the paper: 4)",
                        type=positive_int)
    light: bool = option(True, "light mode: the γ/β MLP reads the global-average-pooled attention map. "
                               "--full is the paper's setting (flattened map, ~268M weights per generator "
                               "at 256 px)")
    attention: str = option("ma", "ma = GMP+GAP+SAM (MAGAN), cam = GMP+GAP (U-GAT-IT), sam = SAM only, "
                                  "none: the ablations of MAGAN Table 4",
                            choices=("ma", "cam", "sam", "none"))
    p_gen: float = option(2.0, "SAM exponent p >= 1 in the generators (MAGAN: 2; Table 5)", type=sam_exponent)
    p_dis: float = option(1.0, "SAM exponent p >= 1 in the discriminators (MAGAN: 1; Table 5)",
                          type=sam_exponent)
    detail_skip: bool = option(False, "the input's fine detail (x minus its 4x4 blur) is added to the "
                                      "generator's output, which then draws only the coarse image: sharp "
                                      "translations after few iterations (--preset laptop; not the paper)")
    mask_fusion: bool = option(False, "AGGAN: the generator draws content R and a mask M and outputs "
                                      "R*M + x*(1-M). Try with --w-tv 1 --w-pixel 1")
    mask_to_d: bool = option(False, "AGGAN's attention-guided discriminators: D sees [image, mask] "
                                    "(needs --mask-fusion)")
    gan_loss: str = option("lsgan", "adversarial loss: lsgan (U-GAT-IT's code) or bce (MAGAN's printed "
                                    "eq. 4)", choices=("lsgan", "bce"))
    # loss weights (0 switches a term off). Adversarial, cycle, identity and CAM are U-GAT-IT's.
    # MAGAN gives no weights for style and content: 1 is our default, untuned (tuning needs the
    # ImageNet VGG, which the machines this was written on cannot download).
    w_adv: float = option(1.0, "weight of the adversarial loss, MAGAN eq. 4", type=weight)
    w_cycle: float = option(10.0, "weight of the pixel cycle L1 loss (U-GAT-IT eq. 3)", type=weight)
    w_identity: float = option(10.0, "weight of the identity L1 loss (U-GAT-IT eq. 4)", type=weight)
    w_cam: float = option(1000.0, "weight of the generators' CAM loss (MAGAN eq. 7, U-GAT-IT eq. 5)",
                          type=weight)
    w_style: float = option(1.0, "weight of the Gram style loss on VGG19 relu4_4, MAGAN eq. 5", type=weight)
    w_content: float = option(1.0, "weight of the content loss on VGG19 relu5_4, MAGAN eq. 6", type=weight)
    w_tv: float = option(0.0, "weight of AGGAN's total variation of the masks (with --mask-fusion)",
                         type=weight)
    w_pixel: float = option(0.0, "weight of AGGAN's pixel loss |G(x) - x|", type=weight)
    w_selfreg: float = option(0.0, "weight of SAT's self-regularisation (perceptual distance x to G(x) on "
                                   "VGG19's first layers); the largest weight with --selfreg-target",
                              type=weight)
    selfreg_target: float = option(0.0, "SAT's adaptive weight: after 1000 iterations at 0, raise the "
                                         "self-regularisation weight until the generators' mean adversarial "
                                         "term passes this value (LSGAN: 0.25 when D answers 0.5), then hold "
                                         "it; log.csv shows it (0: a fixed weight)", type=weight)
    vgg_weights: str = option("imagenet", "VGG19 for the style/content losses: imagenet (torchvision, "
                                          "downloaded once to the torch cache), PATH to a torchvision VGG19 "
                                          "state dict, none (no perceptual losses: their weights become 0), "
                                          "or random (offline smoke runs only: NOT the paper)")
    # optimisation (MAGAN §3.3; U-GAT-IT appendix B.2)
    iters: int = option(1_000_000, "training iterations; the learning rate decays linearly to 0 over the "
                                   "second half", type=positive_int)
    minutes: float = option(0.0, "a time budget: the run lasts at most this many minutes, start-up included. "
                                 "While the learning rate is constant (the first half), the number of "
                                 "iterations is fitted to the speed measured so far, at most --iters; then "
                                 "it is fixed. 0: no budget, --iters iterations. A new run only: --resume "
                                 "trains to the number the budget fixed", type=budget_minutes)
    batch: int = option(1, "images per domain per iteration and process (the paper: 1)", type=positive_int)
    lr: float = option(1e-4, "Adam learning rate", type=positive_float)
    beta1: float = option(0.5, "Adam beta1", type=fraction)
    beta2: float = option(0.999, "Adam beta2", type=fraction)
    weight_decay: float = option(1e-4, "Adam weight decay", type=weight)
    # machinery
    device: str = option("auto", "auto (CUDA, else Apple's mps, else the CPU), cpu, cuda, cuda:N or mps",
                         type=device_name)
    seed: int = option(0, "random seed: weights, data order and augmentation all follow from it", type=int)
    fast: bool = option(True, "channels_last, and on CUDA fused Adam; bf16 autocast (norm statistics "
                              "and losses in fp32) where the device has native bf16: CUDA GPUs from "
                              "compute capability 8.0, CPUs with AMX or AVX-512 BF16. fp32 on Apple's mps. "
                              "On a Linux CPU, freed memory is kept for reuse (fewer page faults)")
    compile: bool = option(False, "torch.compile the networks (slow start, see `bench`)")
    workers: int = option(-1, "data-loading worker processes (0: load in the main process; -1: one fewer "
                              "than the CPU cores, at most 4)", type=worker_count)
    log_every: int = option(100, "a progress line and a log.csv row every N iterations (and a progress "
                                 "line at least every 30 s)", type=positive_int)
    sample_every: int = option(1000, "sample grids and the run page every N iterations", type=positive_int)
    save_every: int = option(1000, "write checkpoints/latest.pt every N iterations", type=positive_int)
    snapshot_every: int = option(100_000, "keep a copy checkpoints/iter_N.pt every N iterations",
                                 type=positive_int)
    n_samples: int = option(4, "test images per sample grid", type=positive_int)
    tensorboard: bool = option(False, "also write TensorBoard event files to RUN/tensorboard (needs the "
                                      "tensorboard package)")
    resume: bool = option(False, "continue the run in --out from checkpoints/latest.pt")

    def loss_weights(self) -> LossWeights:
        """The weights of the objective (section 8.2), from the w_* fields."""
        return LossWeights(**{term: getattr(self, "w_" + term) for term in LOSS_TERMS})


# The fields that define the networks: a checkpoint only continues under the same values.
ARCHITECTURE_FIELDS = ("size", "ch", "n_res", "light", "attention", "p_gen", "p_dis", "detail_skip",
                       "mask_fusion", "mask_to_d")
# Fields that are places on disk: stored resolved, so that --resume works from any folder.
PATH_FIELDS = ("data", "a", "b", "out")
PERCEPTUAL = ("w_style", "w_content", "w_selfreg")  # the weights of the terms measured by VGG19


def needs_vgg(cfg: Config) -> bool:
    return any(getattr(cfg, w) > 0 for w in PERCEPTUAL)

LAPTOP_MINUTES = 40      # training and translation within 45 minutes, with some room
LAPTOP_MOST = 20_000     # iterations at most: 40 minutes on a machine several times faster than ours

PRESETS = {
    "magan": {},  # the defaults are MAGAN's
    "ugatit": dict(attention="cam", w_adv=1.0, w_cycle=10.0, w_identity=10.0, w_cam=1000.0,
                   w_style=0.0, w_content=0.0, w_tv=0.0, w_pixel=0.0, w_selfreg=0.0,
                   vgg_weights="none", mask_fusion=False),
    # MAGAN (8) as printed: L_G = L_adv + L_style + L_rec + L_cate^G, each weight 1, and none of
    # U-GAT-IT's pixel cycle (10), identity (10) or CAM weight (1000) that the default adds.
    "eq8": dict(w_adv=1.0, w_style=1.0, w_content=1.0, w_cam=1.0, w_cycle=0.0, w_identity=0.0,
                vgg_weights="imagenet"),
    # Real photos on a two-core laptop within 45 minutes (README, "No GPU?"). Why each value:
    # 128 px: at 96 px, three runs of the first recipe scored 0-16% zebras by our classifier, where
    # 128 px runs of 3,000 iterations scored 40-92%. Width 16 with the paper's 4 residual blocks is
    # the setting we compared with the official code. The time budget (8.4) fits the iterations to
    # the machine: 5,872 in 40 minutes on our 2-core AMX VM from a warm compile cache, about 5,400
    # with the first compile's 2 minutes. CycleGAN's rate 2e-4, twice U-GAT-IT's: a run this short
    # must learn fast (two seeds each, 3,000 iterations: 48% and 36% called zebras against 16% and
    # 16% at 1e-4). No VGG losses: VGG19's passes would halve the iterations that fit. And two
    # departures for short runs (README): the detail skip (section 3), without which every
    # translation was blurred and covered in a fine mesh after 3,000 iterations; and a cycle weight of
    # 1, not 10. The skip already carries the photo's edges through, and at 10 the generators
    # painted the horses in coloured checks (a code that lets G_ba undo G_ab) rather than stripes:
    # with 1, two seeds of 3,000 iterations scored 42% and 38% against 12% and 24% at 10.
    "laptop": dict(size=128, ch=16, n_res=4, lr=2e-4, vgg_weights="none", w_style=0.0, w_content=0.0,
                   detail_skip=True, w_cycle=1.0, compile=True, minutes=LAPTOP_MINUTES, iters=LAPTOP_MOST,
                   log_every=50, sample_every=500, save_every=500),
}

# `python magan.py train` with no data: a demo on the bundled data that downloads nothing. Measured
# on two CPU cores: a first sample grid after ~1 minute, stripes after ~3, done after ~12.
BUNDLED = Path(__file__).resolve().parent / "data"  # the small dataset that comes with this file
DEMO = dict(a=str(BUNDLED / "trainA"), b=str(BUNDLED / "trainB"), size=64, ch=16, n_res=2, vgg_weights="none",
            w_style=0.0, w_content=0.0, iters=3000, log_every=50, sample_every=250, save_every=500)


def make_config(given: dict) -> tuple[Config, str | None]:
    """The config of a new run from the flags given: defaults < the demo (when no data is given)
    < the preset < the flags. Returns it and, for the demo, a line that says so."""
    demo = not any(name in given for name in ("data", "a", "b", "resume"))
    base = dict(DEMO) if demo else {}
    if demo and "out" not in given:
        taken = lambda i: Path(f"runs/demo{i or ''}").exists()  # never mix with an earlier demo
        base["out"] = f"runs/demo{next(i for i in range(10000) if not taken(i)) or ''}"
    values = {**base, **PRESETS[given.get("preset", "magan")], **given}
    if values.get("data"):  # --data ROOT gives each domain that --a or --b does not name
        root_a, root_b = dataset_folders(values["data"])
        values["a"], values["b"] = given.get("a", root_a), given.get("b", root_b)
    cfg = Config(**values)
    note = None
    if demo:
        note = (f"demo: no --data given, so training a small model on the bundled data ({cfg.size} px, ch "
                f"{cfg.ch}, {cfg.n_res} residual blocks, no VGG losses, {cfg.iters} iterations). Watch "
                f"{cfg.out}/index.html. The paper's setting: python magan.py train --data DATASET "
                f"(256 px, VGG losses, 1,000,000 iterations; add --full for the paper's full mode)")
    return cfg, note


# =================================================================================================
# 8. Training (MAGAN §3.3; U-GAT-IT appendix B.2)
# =================================================================================================

# --- 8.1 The six networks of one run ------------------------------------------------------------
# Section 8 follows the order in which a student asks: what is trained (8.1), what one iteration
# does (8.2), how iterations repeat (8.3), and then what the loop calls: the learning rate (8.4),
# networks, optimizers and devices (8.5), checkpoints (8.6), what the user sees (8.7), signals
# (8.8). Several GPUs and the run page are appendices: a first reading can skip them.

class MAGAN(nn.Module):
    """Two generators and, per domain, a global and a local discriminator: D_ga and D_la judge
    domain A (real x_a against G_ba's fakes), D_gb and D_lb domain B. (MAGAN's Fig. 2 draws one D
    per domain; it builds on U-GAT-IT, which keeps both scales, and so do we.)
    Initialisation: PyTorch's defaults (Kaiming-uniform), as U-GAT-IT's PyTorch code, rather than
    the N(0, 0.02) its text gives; spectral norm rescales every D weight anyway."""

    def __init__(self, cfg: Config):
        super().__init__()
        def G():
            return Generator(cfg.ch, cfg.n_res, cfg.size, cfg.light, cfg.attention, cfg.p_gen,
                             cfg.mask_fusion, cfg.detail_skip)
        def D(n_down):
            in_channels = 4 if cfg.mask_to_d else 3  # AGGAN's attention-guided D also sees the mask
            return Discriminator(cfg.ch, n_down, cfg.size, cfg.attention, cfg.p_dis, in_channels)
        self.G_ab, self.G_ba = G(), G()
        self.D_ga, self.D_gb = D(global_depth(cfg.size)), D(global_depth(cfg.size))  # global: down to S/32
        self.D_la, self.D_lb = D(3), D(3)                                            # local: down to S/8
        self.mask_to_d = cfg.mask_to_d

    def generators(self):
        return [self.G_ab, self.G_ba]

    def discriminators(self):
        return [self.D_ga, self.D_gb, self.D_la, self.D_lb]


# --- 8.2 One iteration: translate, a D step, a G step -------------------------------------------
# MAGAN (8) defines two objectives, one per player:
#   L_{G,Γ_G} = L_adv + L_style + L_rec + L_cate^G      minimised by the generators
#   L_{D,Γ_D} = −L_adv − L_cate^D                        minimised by the discriminators
# (D maximises the adversarial terms. With least squares each player instead minimises its own
# squared distance to its targets, as U-GAT-IT's code does.) With U-GAT-IT's terms and weights:
#
#   L_G = λ_adv L_adv + λ_cycle L_cycle + λ_identity L_identity + λ_cam L_cam
#         + λ_style L_style + λ_content L_rec        (MAGAN)
#         + λ_tv L_tv + λ_pixel L_pixel              (AGGAN, off by default)
#         + λ_selfreg l_reg                          (SAT, off by default)
#   L_D = λ_adv (L_adv + L_cam^D), the adversarial loss on the patch and on the class logits of each D
#
# Why λ_cam = 1000: the attention classifiers decide *where* the generator translates, and the
# adversarial gradient that reaches the encoder is weak and noisy. U-GAT-IT weights the CAM loss so
# heavily that the classifiers become accurate in the first few thousand iterations, and the
# attention means something early. Consequence: the generator loss starts at several thousand
# (measured 3.4e3 to 6.0e3 at the first iteration, over 3 seeds at each of 3 sizes and widths),
# almost all of it the CAM term: four BCEs of about 1 each at initialisation, weighted 1000. That
# is expected, not divergence; `bench --balance` shows each term's pull on the generators.
#
# One iteration, in the order of U-GAT-IT's code (and of CycleGAN's before it):
#   1. translate: fake_ab = G_ab(x_a) and fake_ba = G_ba(x_b), with the identity passes G_ab(x_b)
#      and G_ba(x_a) in the same batches;
#   2. a D step: each D sees its domain's real images and the detached fakes made for it;
#   3. a G step: with D frozen and just updated, the generators learn to fool it, to come back
#      (cycle), to leave images of their target domain alone (identity) and to tell the domains
#      apart in their attention (CAM);
#   4. every ρ is clipped into [0, 1].
# The fakes of step 1 serve both steps: they are computed once (U-GAT-IT's code computes them twice;
# the generators have not changed in between, so the numbers are the same).

@dataclass(frozen=True)
class LossWeights:
    """The λ of every term of L_G (and λ_adv of L_D). 0 switches a term off: it is not even
    computed. A weight may also be a 0-d tensor on the device (SAT's adaptive λ), which is on."""
    adv: float
    cycle: float
    identity: float
    cam: float
    style: float
    content: float
    tv: float = 0.0       # AGGAN
    pixel: float = 0.0    # AGGAN
    selfreg: float = 0.0  # SAT

    def on(self, term: str) -> bool:
        w = getattr(self, term)
        return torch.is_tensor(w) or w > 0


def train_step(nets: MAGAN, vgg: VGGFeatures | None, opt_G, opt_D, x_a, x_b, w: LossWeights,
               gan_loss: str = "lsgan", autocast=nullcontext(), sync=None) -> dict[str, torch.Tensor]:
    """One iteration (U-GAT-IT appendix B.2): translate both ways, one D step on the detached fakes,
    one G step, then clip every ρ. x_a, x_b: (B, 3, S, S) in [-1, 1]. Returns L_D, L_G and each
    term as 0-d tensors (no .item(): the GPU is never made to wait). `sync` averages gradients
    over processes (appendix A)."""
    with autocast:
        t = translate_both_ways(nets, x_a, x_b)
    d_loss = d_step(nets, x_a, x_b, t, opt_D, w, gan_loss, autocast, sync)
    g_loss, terms = g_step(nets, vgg, x_a, x_b, t, opt_G, w, gan_loss, autocast, sync)
    for G in nets.generators():
        clip_rho(G)
    return {"D": d_loss, "G": g_loss, **terms._asdict()}


def d_step(nets: MAGAN, x_a, x_b, t: Translations, opt_D, w: LossWeights, gan_loss: str = "lsgan",
           autocast=nullcontext(), sync=None) -> torch.Tensor:
    """MAGAN (8), L_D = −L_adv − L_cate^D: every D learns real -> 1 and fake -> 0, on its patch
    logits (U-GAT-IT (2)) and on its class logits. MAGAN (7) prints the class-logit term as
    L_cate^D = E||Γ_D(y) − Γ_D(G(x))||₂ (garbled in extraction); we read it as U-GAT-IT (6):
        L_cam^D = E_{x∼X_t}[(η_D(x))²] + E_{x∼X_s}[(1 − η_D(G(x)))²]
    with its code's targets, as for (2).
    The fakes are detached: D's loss must not push gradient into the generators (that would train
    them to help D), and the backward pass stops at D's input."""
    for D in nets.discriminators():
        D.requires_grad_(True)
    l_adv = l_cam = 0
    with autocast:
        for D, real, fake, mask in judges(nets, x_a, x_b, t):
            mask = None if mask is None else mask.detach()
            # Real and fake in one pass (U-GAT-IT's code makes two): the same maths, since no layer
            # of D mixes samples (no batch statistics; SAM's γ is scaled per sample). Only spectral
            # norm's power iteration runs once per D step here, twice there.
            out = D(torch.cat([discriminator_input(real, mask), discriminator_input(fake.detach(), mask)]))
            patch_real, patch_fake = out.patch.chunk(2)      # (B, 1, h−1, w−1) each
            # All the class logits, SAM's included, as MAGAN's Γ_D. The official U-GAT-IT D has no
            # SAM; without SAM's logit here and in G's adversarial term (logits[:, :2]) our 128 px
            # runs had crisper texture at 2,000 iterations in four seeds of five, and were level
            # with MAGAN's D at 3,000: no reason to depart from the paper (README, "Learning as fast
            # as the official U-GAT-IT?").
            cls_real, cls_fake = out.logits.chunk(2)         # (B, n_angles) each
            l_adv = l_adv + adversarial_loss(patch_real, True, gan_loss) + adversarial_loss(patch_fake, False,
                                                                                            gan_loss)
            l_cam = l_cam + adversarial_loss(cls_real, True, gan_loss) + adversarial_loss(cls_fake, False,
                                                                                          gan_loss)
    d_loss = w.adv * (l_adv + l_cam)                         # U-GAT-IT (2) + (6), summed over the 4 Ds
    update(opt_D, d_loss, nets.discriminators(), sync)
    return d_loss.detach()


def g_step(nets: MAGAN, vgg, x_a, x_b, t: Translations, opt_G, w: LossWeights, gan_loss: str = "lsgan",
           autocast=nullcontext(), sync=None) -> tuple[torch.Tensor, GeneratorTerms]:
    """MAGAN (8), L_G = L_adv + L_style + L_rec + L_cate^G, with U-GAT-IT's cycle and identity terms,
    weighted as U-GAT-IT (7) (and AGGAN's and SAT's terms when their weights are set). D is frozen:
    the gradient flows through it into the fakes, but no D parameter gradient is computed.
    Returns L_G and its terms, detached."""
    for D in nets.discriminators():
        D.requires_grad_(False)
    with autocast:
        l = generator_terms(nets, vgg, x_a, x_b, t, w, gan_loss)
    # U-GAT-IT (7):  min_G max_D λ1 L_lsgan + λ2 L_cycle + λ3 L_identity + λ4 L_cam, λ = 1, 10, 10, 1000;
    # MAGAN's style and content terms join the sum with their own weights, and so do the others.
    g_loss = (w.adv * l.adv + w.cycle * l.cycle + w.identity * l.identity + w.cam * l.cam   # U-GAT-IT
              + w.style * l.style + w.content * l.content                                  # MAGAN
              + w.tv * l.tv + w.pixel * l.pixel + w.selfreg * l.selfreg)                   # AGGAN, SAT: off
    update(opt_G, g_loss, nets.generators(), sync)
    return g_loss.detach(), GeneratorTerms(*(term.detach() for term in l))


class GeneratorTerms(NamedTuple):
    """The terms of L_G, before their weights: 0-d tensors (0 where the term is off)."""
    adv: torch.Tensor
    cycle: torch.Tensor
    identity: torch.Tensor
    cam: torch.Tensor
    style: torch.Tensor
    content: torch.Tensor
    tv: torch.Tensor
    pixel: torch.Tensor
    selfreg: torch.Tensor


LOSS_TERMS = GeneratorTerms._fields


def generator_terms(nets: MAGAN, vgg, x_a, x_b, t: Translations, w: LossWeights,
                    gan_loss: str = "lsgan") -> GeneratorTerms:
    """Every term of L_G for one batch, each summed over both directions; a term whose weight is
    0 is not computed (it is 0). Runs under the caller's autocast."""
    zero = x_a.new_zeros((), dtype=torch.float32)  # shared: a term is replaced, never updated in place
    rec_a = nets.G_ba(t.fake_ab).image                         # G_ba(G_ab(x_a)): (B, 3, S, S)
    rec_b = nets.G_ab(t.fake_ba).image                         # G_ab(G_ba(x_b))
    l_adv = zero
    for D, _, fake, mask in judges(nets, x_a, x_b, t):        # MAGAN (4), G's side: fakes should
        out = D(discriminator_input(fake, mask))              # score "real", patch and class logits
        l_adv = (l_adv + adversarial_loss(out.patch, True, gan_loss)
                 + adversarial_loss(out.logits, True, gan_loss))
    # U-GAT-IT (3):  L_cycle = E_{x∼X_s}[|x − G_t→s(G_s→t(x))|₁]
    l_cycle = F.l1_loss(rec_a, x_a) + F.l1_loss(rec_b, x_b)
    # U-GAT-IT (4):  L_identity = E_{x∼X_t}[|x − G_s→t(x)|₁]
    l_identity = F.l1_loss(t.same_b, x_b) + F.l1_loss(t.same_a, x_a)
    l_cam = cam_loss(*t.cam_ab) + cam_loss(*t.cam_ba)          # U-GAT-IT (5), our reading of MAGAN (7)
    perceptual = perceptual_terms(vgg, x_a, x_b, t, rec_a, rec_b, w) if vgg is not None else {}
    l_style, l_content = perceptual.get("style", zero), perceptual.get("content", zero)   # MAGAN (5), (6)
    # --- the other papers' terms, off by default (weight 0) ---
    l_pixel = F.l1_loss(t.fake_ab, x_a) + F.l1_loss(t.fake_ba, x_b) if w.on("pixel") else zero  # AGGAN
    l_tv = zero                                                 # AGGAN: smooth masks
    if w.on("tv") and t.mask_ab is not None:
        l_tv = total_variation(t.mask_ab) + total_variation(t.mask_ba)
    l_selfreg = perceptual.get("selfreg", zero)                 # SAT
    return GeneratorTerms(l_adv, l_cycle, l_identity, l_cam, l_style, l_content, l_tv, l_pixel, l_selfreg)


class Translations(NamedTuple):
    """What the two generators make of one batch (B images per domain), before the D step."""
    fake_ab: torch.Tensor           # G_ab(x_a): (B, 3, S, S)
    fake_ba: torch.Tensor           # G_ba(x_b)
    same_b: torch.Tensor            # G_ab(x_b): the identity pass, which should change nothing
    same_a: torch.Tensor            # G_ba(x_a)
    cam_ab: tuple                   # G_ab's class logits on (x_a, x_b): (B, n_angles) each
    cam_ba: tuple                   # G_ba's class logits on (x_b, x_a)
    mask_ab: torch.Tensor | None    # AGGAN's masks of the two translations: (B, 1, S, S)
    mask_ba: torch.Tensor | None


def translate_both_ways(nets: MAGAN, x_a: torch.Tensor, x_b: torch.Tensor) -> Translations:
    # Each generator sees its source images and, for the identity loss, the target domain's in one
    # batch: instance and layer norm work per sample, so batching changes nothing but the speed.
    ab = nets.G_ab(torch.cat([x_a, x_b]))          # (2B, 3, S, S): [G_ab(x_a); G_ab(x_b)]
    ba = nets.G_ba(torch.cat([x_b, x_a]))          # (2B, 3, S, S): [G_ba(x_b); G_ba(x_a)]
    fake_ab, same_b = ab.image.chunk(2)            # (B, 3, S, S) each
    fake_ba, same_a = ba.image.chunk(2)
    mask_ab = ab.mask.chunk(2)[0] if ab.mask is not None else None    # (B, 1, S, S)
    mask_ba = ba.mask.chunk(2)[0] if ba.mask is not None else None
    cam_ab, cam_ba = ab.logits.chunk(2), ba.logits.chunk(2)  # (B, n_angles) each: on source, on target
    return Translations(fake_ab, fake_ba, same_b, same_a, cam_ab, cam_ba, mask_ab, mask_ba)


def judges(nets: MAGAN, x_a, x_b, t: Translations):
    """(D, real images, fake images, the fakes' mask for D or None) for each discriminator: domain
    A's two Ds judge x_a against G_ba's fakes, domain B's judge x_b against G_ab's. The mask is
    there only for AGGAN's attention-guided Ds (--mask-to-d)."""
    mask_ba, mask_ab = (t.mask_ba, t.mask_ab) if nets.mask_to_d else (None, None)
    return ((nets.D_ga, x_a, t.fake_ba, mask_ba), (nets.D_la, x_a, t.fake_ba, mask_ba),
            (nets.D_gb, x_b, t.fake_ab, mask_ab), (nets.D_lb, x_b, t.fake_ab, mask_ab))


def discriminator_input(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """AGGAN's attention-guided D judges the pair [M, image] (the same mask M beside a real and a
    fake image); without --mask-to-d, D sees the image alone."""
    return image if mask is None else torch.cat([image, mask.to(image.dtype)], dim=1)  # (B, 4, S, S)


def perceptual_terms(vgg: VGGFeatures, x_a, x_b, t: Translations, rec_a, rec_b, w: LossWeights) -> dict:
    """The terms measured in VGG19's features, each only when its weight is on."""
    if not (w.on("style") or w.on("content") or w.on("selfreg")):
        return {}
    fake = vgg(torch.cat([t.fake_ab, t.fake_ba, rec_a, rec_b]))   # one pass with gradients: 4B images
    with torch.no_grad():
        real = vgg(torch.cat([x_a, x_b]))                         # their targets, no gradients: 2B
    fake_ab, fake_ba, phi_rec_a, phi_rec_b = split_features(fake, 4)  # a VGGOutput of B images each
    phi_a, phi_b = split_features(real, 2)
    terms = {}
    if w.on("style"):    # MAGAN (5): a translation should have the target domain's Gram statistics
        terms["style"] = (style_loss(fake_ab.relu4_4, phi_b.relu4_4)
                          + style_loss(fake_ba.relu4_4, phi_a.relu4_4))
    if w.on("content"):  # MAGAN (6): the cycle should give the input's relu5_4 features back
        terms["content"] = (content_loss(phi_rec_a.relu5_4, phi_a.relu5_4)
                            + content_loss(phi_rec_b.relu5_4, phi_b.relu5_4))
    if w.on("selfreg"):  # SAT: a translation should keep its input's low-level look
        terms["selfreg"] = (self_regularisation(early_layers(fake_ab), early_layers(phi_a))
                            + self_regularisation(early_layers(fake_ba), early_layers(phi_b)))
    return terms


def split_features(features: VGGOutput, n: int) -> list[VGGOutput]:
    """The VGG features of n equal groups of a batch: (n·B, ...) per layer -> n VGGOutputs of B."""
    return [VGGOutput(*layers) for layers in zip(*(layer.chunk(n) for layer in features))]


def early_layers(features: VGGOutput) -> tuple:
    return features.relu1_2, features.relu2_2, features.relu3_4


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, networks, sync=None):
    """Backward, then (with several processes) average the gradients, then one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync(networks)
    optimizer.step()


# --- 8.3 The loop -------------------------------------------------------------------------------
# train() is the whole run in one screen: set up, then iterate. The setup lines are in the order
# that fails fastest: the folder and config first (check_run reads no image), the data next (every
# folder is listed and checked), and only then the slow parts (networks, VGG, compiling). Whatever
# the user got wrong is reported in the first seconds, not after minutes of start-up.
# The loop body is four stages, as nanoGPT's train.py: set the learning rate, take one step, watch
# it, and save. Everything the loop calls is defined in 8.4-8.8, in the order it calls it.

LOGGED = ("D", "G", *LOSS_TERMS)  # the one list behind the progress line, log.csv and the NaN check


def train(cfg: Config, checkpoint: dict | None = None) -> Path:
    """Train (or, with cfg.resume, continue) the run in cfg.out. Returns the run folder. Everything
    that can fail on the user's input (folders, weights, checkpoint) fails before the first iteration."""
    began = time.monotonic()                                                 # --minutes counts from here
    # --- set up: the run, the processes and device, the networks, a checkpoint, the data, the folder
    cfg, checkpoint = check_run(cfg, checkpoint)                             # 8.6
    data = UnpairedImages(cfg.a, cfg.b, cfg.size, cfg.seed)                 # 6: every image folder checked
    procs = Processes()                                                      # appendix A: one, or torchrun's
    device = pick_device(cfg.device, procs.local_rank)
    procs.start(device)
    say = print if procs.main else (lambda *args, **kwargs: None)           # rank 0 alone speaks and writes
    nets, vgg, opt_G, opt_D, autocast, fast = build_networks(cfg, device, say)   # 8.5
    selfreg = (AdaptiveWeight(cfg.w_selfreg, cfg.selfreg_target, n_terms=8 if cfg.attention != "none" else 4,
                              device=device) if cfg.selfreg_target > 0 else None)
    start = restore(checkpoint, nets, opt_G, opt_D, selfreg, cfg, procs, say) if checkpoint else 0  # 8.6
    procs.broadcast(nets)                                                    # every rank starts equal
    workers = loader_workers(cfg.workers, procs.local_world, say)
    batches = training_batches(data, cfg.batch, start, cfg.iters, workers, procs.world, procs.rank,
                               pin_memory=device.type == "cuda")             # the workers start here
    run = RunFolder(cfg, start, procs, device, say)                          # 8.7: config.json, log.csv, ...
    run.announce(fast, autocast, workers, data)
    weights = cfg.loss_weights()
    # With --minutes the number of iterations follows the clock (8.4); cfg.iters is then the most
    # the loader above may serve, and the loop below ends at whatever number the budget fixes.
    budget = TimeBudget(cfg.minutes, began, cfg.iters, say=say) if cfg.minutes and not cfg.resume else None
    try:
        with StopOnSignal() as stop:                                         # 8.8
            for iteration, (x_a, x_b, skipped) in enumerate(batches, start + 1):
                # 1. The learning rate. Iterations count from 1, as the progress line and log.csv
                #    show them; the schedule counts the steps already taken, from 0.
                lr = learning_rate(iteration - 1, cfg)
                for group in opt_G.param_groups + opt_D.param_groups:
                    group["lr"] = lr
                # 2. One iteration: translate, a D step, a G step (8.2).
                x_a, x_b = to_device(x_a, device, fast), to_device(x_b, device, fast)
                w = selfreg.weights(weights) if selfreg else weights
                losses = train_step(nets, vgg, opt_G, opt_D, x_a, x_b, w, cfg.gan_loss, autocast, procs.sync)
                if selfreg:
                    selfreg.update(procs.mean(losses["adv"]), iteration)
                if budget and (iteration == start + 1 or run.log_due(iteration)):  # decided by rank 0
                    run.set_iterations(procs.from_main(budget.iterations(iteration, cfg.iters)))
                # 3. Watch it: a NaN stops the run before it reaches a checkpoint; then the progress
                #    line, a log.csv row, the sample grids and the run page, each when due.
                run.report_unreadable(skipped)
                stacked = torch.stack([losses[k] for k in LOGGED])              # (len(LOGGED),)
                run.check_finite(iteration, stacked)
                run.report(iteration, lr, stacked, w.selfreg, selfreg)
                if iteration % cfg.sample_every == 0 or iteration == cfg.iters:
                    run.write_samples(iteration, nets)
                # 4. Checkpoint, or stop on a signal (which may also have come while sampling).
                stopping = procs.any(stop.requested is not None)
                if run.save_due(iteration) or stopping:
                    run.save(iteration, nets, opt_G, opt_D, selfreg, stopping, stop.requested)
                if stopping:
                    run.say(f"stopped at iteration {iteration}; saved {run.latest}.\n"
                            f"continue with: python magan.py train --out {run.folder} --resume")
                    return run.folder
                if iteration == cfg.iters:  # the last one (with a time budget, before the loader's end)
                    break
    finally:
        run.close()
        procs.finish()
    run.say(f"done: {cfg.iters} iterations; checkpoint {run.latest}")
    return run.folder


# --- 8.4 Schedules: the learning rate, and SAT's adaptive weight -------------------------------
# Why decay at all: a GAN never converges to a fixed point at a constant rate; G and D keep
# chasing each other. Lowering the rate in the second half damps that chase, so the last
# iterations polish the translations instead of oscillating around them (CycleGAN and U-GAT-IT
# both decay linearly to 0). Both players share one rate, 1e-4: the balance between G and D is
# what U-GAT-IT tuned it for, so raise or lower the two together.

def learning_rate(step: int, cfg: Config) -> float:
    """Constant for the first half, then linear decay to 0 (U-GAT-IT appendix B.2), computed from
    the number of steps taken, not by repeated subtraction, so a resumed run gets the same rate."""
    half = cfg.iters // 2
    if step < half:
        return cfg.lr
    return cfg.lr * (cfg.iters - step) / (cfg.iters - half)


class TimeBudget:
    """--minutes: a run that must end within M minutes of wall-clock time, start-up included (a
    laptop's afternoon, a cluster job's limit) rather than after a fixed number of iterations. The
    speed is unknown until the run has started (it depends on the machine, and on the start-up:
    torch.compile alone can take minutes), but the learning rate above is constant for the first
    half of the iterations, so their number can still be chosen while that half lasts. After
    each decision point of that half, the number becomes what fits the time left at the speed
    measured since the first iteration (sampling and checkpoints included), at most the --iters
    asked for. Once the decay has begun the number is fixed, so the rate never jumps. Should the
    machine slow down after that, the run ends when the time is up, with its samples and
    checkpoint. The same command therefore trains more iterations on a faster machine."""

    def __init__(self, minutes: float, began: float, most: int, clock=time.monotonic, say=print):
        self.minutes, self.deadline, self.most = minutes, began + 60 * minutes, most
        self.clock, self.say = clock, say
        self.first = None          # (time, iteration) at the end of the first iteration
        self.said = set()          # what has been said once: "fits", "fixed"

    def iterations(self, iteration: int, iters: int) -> int:
        """How many iterations the run should have, decided after `iteration`, when it has `iters`."""
        now = self.clock()
        if self.first is None:                 # the first iteration carries the start-up: measure after it
            self.first = (now, iteration)
            return iters
        if now >= self.deadline:               # out of time: this iteration is the last
            if iteration < iters:
                self.say(f"time budget: {self.minutes:g} minutes are up; the run ends at iteration {iteration} "
                         f"of {iters}", flush=True)
            return iteration
        if iteration >= iters // 2:            # the decay has begun: the schedule stays as it is
            self.once("fixed", f"time budget: {iters} iterations, fixed now that the learning rate decays")
            return iters
        seconds_each = (now - self.first[0]) / (iteration - self.first[1])
        fits = max(iteration + 1, min(self.most, iteration + int((self.deadline - now) / seconds_each)))
        self.once("fits", f"time budget: {fits} iterations fit in {self.minutes:g} minutes at {seconds_each:.2f} "
                          f"s each; the number follows the speed until the learning rate starts to decay")
        return fits

    def once(self, key: str, message: str):
        if key not in self.said:
            self.say(message, flush=True)
            self.said.add(key)


class AdaptiveWeight:
    """SAT's adaptive weight induction (§3.2). The self-regularisation weight λ is 0 for the first
    `warmup` iterations: the generators learn under the other terms alone, and D learns to tell
    their fakes apart. Then λ rises by a thousandth of its maximum per iteration. That pulls each
    G(x) towards its input x, away from the target domain, which makes the fakes easier for D to
    spot: the generators' adversarial loss goes up. From the first iteration that loss passes
    `target`, λ is held where it is.

    The loss compared with the target is the *mean* of the generators' adversarial terms: L_adv
    divided by the number of logits it sums (`n_terms`: 8 = 4 Ds × (patch + class), or 4 without
    class logits), smoothed over ~100 iterations. On that scale least squares reads 0 where D is
    fooled, 0.25 where D answers 0.5 for every fake and 1 where D is sure they are fake (BCE: 0.69
    at D(G(x)) = 0.5). At initialisation, before D has learnt anything, it is about 1: that is why
    nothing is compared during the warm-up. Everything stays on the device: no iteration waits
    for the GPU to report it."""

    WARMUP = 1000  # iterations with λ = 0

    def __init__(self, maximum: float, target: float, n_terms: int, device: torch.device,
                 warmup: int | None = None):
        self.maximum, self.target, self.n_terms = maximum, target, n_terms
        self.warmup = self.WARMUP if warmup is None else warmup
        self.state = torch.tensor([0.0, 0.0, 0.0], device=device)  # λ, smoothed mean L_adv, held (0 or 1)
        self.announced = False

    def weights(self, w: LossWeights) -> LossWeights:
        return dataclasses.replace(w, selfreg=self.state[0])

    def update(self, adv_loss: torch.Tensor, iteration: int):
        """After `iteration` (counted from 1), whose adversarial loss L_adv was `adv_loss`."""
        lam, smooth, held = self.state
        mean = adv_loss / self.n_terms
        smooth = torch.where(smooth == 0, mean, 0.99 * smooth + 0.01 * mean)
        if iteration > self.warmup:
            held = torch.maximum(held, (smooth > self.target).float())
            lam = torch.where(held > 0, lam, torch.clamp(lam + self.maximum / 1000, max=self.maximum))
        self.state = torch.stack([lam, smooth, held])

    def report(self, iteration: int, say=print):
        """Say once, when it happens, that λ is now held (this reads the state: call it rarely)."""
        lam, smooth, held = self.state.tolist()
        if held and not self.announced:
            say(f"SAT: the self-regularisation weight is held at {lam:.4g} from iteration {iteration} or "
                f"shortly before (smoothed mean adversarial loss {smooth:.3g} > --selfreg-target "
                f"{self.target:g})", flush=True)
            self.announced = True


# --- 8.5 Networks, optimizers and devices -------------------------------------------------------
# The maths of a step never depends on the device; only how it runs does. The "fast path"
# collects what speeds an iteration up without changing its result beyond float rounding:
#   * channels_last: convolutions read (B, H, W, C) memory, the layout oneDNN (CPU) and cuDNN's
#     tensor-core kernels (CUDA) prefer, so no copy into it is made at every layer;
#   * fused Adam, on CUDA: one kernel updates every parameter, instead of a handful of ops per
#     tensor. On a CPU it gained nothing measurable (bench) and, with channels_last, made a
#     resumed run differ from an uninterrupted one by float rounding, so the CPU keeps plain Adam;
#   * bf16 autocast, only where the hardware has bf16 arithmetic: elsewhere it is emulated and
#     slower than fp32 (measured on CPU in `bench`), so there we stay in fp32;
#   * torch.compile (--compile, off by default): fuses the small element-wise ops between the
#     convolutions, at the price of minutes of start-up;
#   * on a CPU under Linux, freed memory kept for reuse (keep_freed_memory, below): no change to
#     any number, only fewer page faults.
# TF32 stays off everywhere, so that --no-fast is honest fp32 and the two paths can be compared.

def build_networks(cfg: Config, device: torch.device, say=print):
    """The six networks (seeded: their initial weights follow --seed), the VGG of the perceptual
    losses when a weight needs it, and both optimizers, placed on the device. Returns (nets, vgg,
    opt_G, opt_D, the step's autocast context, whether the fast path is on)."""
    torch.manual_seed(cfg.seed)  # the networks' initial weights (and a random VGG's)
    vgg = None
    if needs_vgg(cfg):
        say("loading VGG19 for the perceptual losses ...", flush=True)
        vgg = load_vgg(cfg.vgg_weights)
    say(f"building the networks ({'light' if cfg.light else 'full'} mode, {cfg.size} px) ...", flush=True)
    fast = cfg.fast and device.type != "mps"
    if fast and device.type == "cpu":
        keep_freed_memory()
    nets, vgg, autocast = place_networks(MAGAN(cfg), vgg, device, fast)
    opt_G, opt_D = make_optimizers(nets, cfg, fast and device.type == "cuda")  # fused: CUDA only
    if cfg.compile and compiler_works(device, say):
        compile_in_place(nets, vgg)
    return nets, vgg, opt_G, opt_D, autocast, fast


# Page faults. PyTorch's CPU tensors come from the C library's malloc. glibc (Linux) returns a freed
# block above its "mmap threshold" to the kernel at once, and trims the top of its heap when more
# than 128 KB are free there. An iteration frees and allocates the same few hundred tensors every
# time, so the larger ones (a global D's last weight is 2M floats at width 16) come back as fresh
# pages, which the kernel must map and zero at the first write. Measured at 96 px, width 16, on a
# 2-core VM: 5,000-10,000 page faults and 24-27 ms of kernel time an iteration (of about 500 ms of
# CPU time), against about 100 and 3-4 ms with the two settings below, which keep freed memory in
# the process for the next iteration to reuse. Peak memory stays what an iteration needs (the
# process no longer shrinks between iterations, which it did not need to). Where the C library is
# not glibc (macOS, Windows, musl), nothing changes.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # glibc's mallopt() parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Raise glibc's trim threshold (free memory at the heap's top is kept up to 1 GiB) and its
    mmap threshold (to its maximum, 32 MiB on 64-bit: smaller blocks come from the reusable heap).
    Process-wide and for good. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # no glibc (musl), or no mallopt
        return False


def compile_in_place(nets: MAGAN, vgg: VGGFeatures | None):
    """torch.compile each network in place: the state_dict keys stay the same, and the code is
    generated at the first call, so restoring a checkpoint afterwards is fine."""
    for net in list(nets.children()) + ([vgg] if vgg is not None else []):
        net.compile()


def compiler_works(device: torch.device, say=print) -> bool:
    """Can torch.compile generate code here? On a CPU it writes and compiles C++, which needs a C++
    compiler (Linux has one; a Mac needs Xcode's command-line tools; Windows needs MSVC). A tiny
    function is compiled first: where that fails, training goes on without --compile and says why."""
    try:
        torch.compile(lambda x: x.sin() + 1)(torch.ones(4, device=device))
        return True
    except Exception as e:
        say(f"note: --compile is off: torch.compile does not work here ({first_line(e)}); training runs "
            f"uncompiled", flush=True)
        return False


def make_optimizers(nets: MAGAN, cfg: Config, fast: bool = False):
    """Adam(lr, betas = (0.5, 0.999), weight decay 1e-4) for the two generators and for the four
    Ds (U-GAT-IT appendix B.2). On the fast path the fused kernel updates all parameters in a few
    launches instead of several per tensor."""
    def adam(networks):
        params = [p for net in networks for p in net.parameters()]
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=fast or None)
    return adam(nets.generators()), adam(nets.discriminators())


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when available (GPU `local_rank`, one per process under torchrun), else Apple's
    mps (the GPU of an M-series Mac) when available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaganError(f"--device {name}: this PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MaganError("--device mps: this PyTorch sees no Apple GPU (mps needs an Apple-silicon Mac and "
                         "a PyTorch built for it; use --device cpu or auto)")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def place_networks(nets: nn.Module, vgg: VGGFeatures | None, device: torch.device, fast: bool,
                   bf16: bool | None = None):
    """Move the networks to the device. With `fast`, also:
    - channels_last: cuDNN's fastest tensor-core convolutions, and oneDNN's on a CPU, work on NHWC;
      with NCHW tensors every convolution would pay for layout transposes (measured on a 2-core
      CPU: 5-7% faster);
    - bf16 autocast where the device computes bf16 natively (`bf16` forces it either way):
      convolutions and matmuls in bfloat16 (twice the tensor-core rate, half the activation
      memory). bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16). Norm
      statistics, Gram matrices, SAM's γ, the class logits and the losses stay in fp32 (sections 1-5).
      Where bf16 is emulated it is slower than fp32 (measured on a CPU without it: 1.6-2.5x).
    On CUDA, cuda_numerics sets TF32 and cudnn.benchmark. Returns (nets, vgg, the step's autocast)."""
    nets = nets.to(device)
    vgg = vgg.to(device) if vgg is not None else None
    if device.type == "cuda":
        cuda_numerics(fast)
    if fast:
        nets = nets.to(memory_format=torch.channels_last)
        vgg = vgg.to(memory_format=torch.channels_last) if vgg is not None else None
    if bf16 is None:
        bf16 = fast and native_bf16(device)
    return nets, vgg, torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def cuda_numerics(fast: bool):
    """TF32 off: cuDNN runs fp32 convolutions in TF32 (a 10-bit mantissa) by default on Ampere and
    newer, so --no-fast (and bench's fp32 row) would not be fp32; on the fast path the convolutions
    are bf16 and the Gram matrices stay fp32. cudnn.benchmark on the fast path: the input size
    never changes, so timing the algorithms once pays off."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = fast


def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 natively? CUDA: compute capability 8.0 (Ampere) and newer;
    older GPUs emulate it, though torch.cuda.is_bf16_supported() may say yes, so the fast path
    stays fp32 there (fp16 would need a gradient scaler). CPU: AMX or AVX-512 BF16, read from the
    CPU's flags (Linux). Apple's mps: no, fp32 (its bf16 support depends on the macOS version)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def to_device(x: torch.Tensor, device: torch.device, fast: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)  # non_blocking: the copy from pinned memory overlaps compute
    return x.contiguous(memory_format=torch.channels_last) if fast else x


# Data loading overlaps with compute: DataLoader's worker processes decode and augment the next
# batches while the networks train on this one, so reading costs an iteration nothing as long as
# it is faster than the step. It is, by far: measured on horse2zebra (256 px JPEGs), 6 ms to read,
# decode and augment one image of each domain, against a step of about 500 ms at 96 px on 2 cores
# (`bench` prints both). One worker is enough then; more would only take a core from torch's own
# threads, hence "one fewer than the cores, at most 4".
def loader_workers(workers: int, processes_per_machine: int, say=print) -> int:
    """--workers, resolved (-1: automatic); more than the cores is said once, in our words."""
    workers = resolve_workers(workers, processes_per_machine)
    if workers > available_cores():
        say(f"note: {workers} data workers on {available_cores()} CPU core(s): more workers than cores "
            f"only adds switching (--workers -1 picks for you)", flush=True)
    return workers


VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1

VGG_HELP = """The style and content losses (MAGAN eq. 5-6) need VGG19 ImageNet weights, and they could
not be loaded ({reason}). Fixes:
  * with internet, run once: torchvision downloads them to {cache}
    (or copy vgg19-dcbb9e9d.pth from another machine into that folder)
  * --vgg-weights PATH    a torchvision VGG19 state dict (vgg19-dcbb9e9d.pth) you copied here
  * --vgg-weights none    train without the perceptual losses (U-GAT-IT's objective)
  * --vgg-weights random  random VGG features: offline smoke runs only, NOT the paper"""


def load_vgg(spec: str) -> VGGFeatures | None:
    """`spec`: imagenet | PATH | none | random (see the --vgg-weights help)."""
    if spec == "none":
        return None
    features = vgg19_features()
    if spec == "random":
        return VGGFeatures(features)
    try:
        state = fetch_state_dict(VGG19_URL, None if spec == "imagenet" else spec)
        if any(k.startswith("features.") for k in state):  # a whole torchvision VGG19
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        features.load_state_dict(state)
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise MaganError(VGG_HELP.format(reason=first_line(e), cache=cache)) from None
    return VGGFeatures(features)


def fetch_state_dict(url: str, path: str | None = None) -> dict:
    """A state dict from a local file, or else from `url` through the torch cache (downloaded once).
    Loaded with weights_only=True: a weights file is untrusted input."""
    if path:
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)


# --- 8.6 Checkpoints: check the run, restore, save ----------------------------------------------
# A run that lasts days will be interrupted: a cluster's time limit, a laptop's lid, a full disk.
# What the checkpoint needs for an exact resume: the six networks, both optimizers' moments (Adam
# without its moments takes large first steps again and can undo days of training), the iteration
# (which fixes the learning rate and, with the seed, the next images), the random state, and SAT's
# adaptive weight. It is written to a temporary file and renamed, so a crash mid-write leaves the
# previous checkpoint whole, and it is loaded as untrusted input (weights only, never code).

CHECKPOINT_FORMAT = "magan-checkpoint-v2"
EXPORT_FORMAT = "magan-generators-v1"          # generators and config only: `magan.py export`
OLD_FORMATS = {"magan-checkpoint-v1": "an earlier magan.py, whose discriminators and SAM differ: train "
                                      "a new run (or use that version of magan.py)"}
KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how Adam runs, not what it knows


def check_run(cfg: Config, checkpoint: dict | None) -> tuple[Config, dict | None]:
    """Everything about the run folder and the config that can be wrong, before anything slow.
    Paths are stored resolved, so that --resume works from any folder."""
    resolved = {k: str(Path(getattr(cfg, k)).resolve()) for k in PATH_FIELDS if getattr(cfg, k)}
    if cfg.vgg_weights == "none":  # no VGG, no perceptual terms: the saved config says so
        resolved.update(dict.fromkeys(PERCEPTUAL, 0.0))
    cfg = dataclasses.replace(cfg, **resolved)
    latest = Path(cfg.out) / "checkpoints" / "latest.pt"
    if cfg.resume:
        checkpoint = checkpoint or load_checkpoint(latest)
        check_architecture(cfg, checkpoint["config"])
        if checkpoint["iteration"] >= cfg.iters:
            raise MaganError(f"the checkpoint is already at iteration {checkpoint['iteration']} and --iters "
                             f"is {cfg.iters}: pass a larger --iters to train further")
    elif latest.exists():
        raise MaganError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose "
                         f"another --out")
    if not any(w > 0 for w in dataclasses.astuple(cfg.loss_weights())):
        raise MaganError("every loss weight is 0: the generators would have nothing to learn")
    needs = [("--mask-to-d", cfg.mask_to_d, "--mask-fusion", cfg.mask_fusion),
             ("--w-tv", cfg.w_tv > 0, "--mask-fusion", cfg.mask_fusion),
             ("--selfreg-target", cfg.selfreg_target > 0, "--w-selfreg", cfg.w_selfreg > 0)]
    for option_name, given, needed, present in needs:
        if given and not present:
            raise MaganError(f"{option_name} needs {needed}")
    if cfg.mask_fusion and cfg.detail_skip:
        raise MaganError("--mask-fusion and --detail-skip both decide what the generator outputs: choose one")
    return cfg, checkpoint


def restore(ckpt: dict, nets: MAGAN, opt_G, opt_D, selfreg, cfg: Config, procs, say=print) -> int:
    """Continue from a checkpoint: weights, optimizer moments, the random state, SAT's weight.
    Returns the iteration it was saved at."""
    load_networks(dict(nets.named_children()), ckpt)
    load_optimizer_state(opt_G, ckpt["opt_G"])
    load_optimizer_state(opt_D, ckpt["opt_D"])
    torch.set_rng_state(ckpt["torch_rng"])
    start = ckpt["iteration"]
    if selfreg is not None and ckpt.get("selfreg") is not None:
        selfreg.state = ckpt["selfreg"].to(selfreg.state.device)
    say(f"resuming {cfg.out} from iteration {start}", flush=True)
    adam = ("lr", "beta1", "beta2", "weight_decay")
    saved = {name: ckpt["config"].get(name, getattr(cfg, name)) for name in adam}
    changed = [f"--{name.replace('_', '-')} {value:g} -> {getattr(cfg, name):g}"
               for name, value in saved.items() if value != getattr(cfg, name)]
    if changed:
        say(f"note: Adam's settings change from here on: {', '.join(changed)}", flush=True)
    before = ckpt["config"]["iters"]
    if before != cfg.iters:
        old, new = learning_rate(start, config_from_checkpoint(ckpt)), learning_rate(start, cfg)
        say(f"note: --iters changes from {before} to {cfg.iters}, and so does the learning-rate schedule: "
            f"the rate at iteration {start} is now {new:.3g} (it was {old:.3g}); it stays constant to "
            f"iteration {cfg.iters // 2} and then decays linearly to 0", flush=True)
    if cfg.minutes:
        say(f"note: the time budget (--minutes {cfg.minutes:g}) applies to a new run only: this one trains to "
            f"iteration {cfg.iters}", flush=True)
    processes = ckpt.get("processes", 1)
    if processes != procs.world:
        say(f"note: this checkpoint was trained by {processes} process(es) and continues with "
            f"{procs.world}: from here on each iteration reads other samples than the original run "
            f"would have (the global batch is now {procs.world} × {cfg.batch})", flush=True)
    return start


def write_atomically(path: Path, write):
    """Call write(file) on a temporary file, flush it to disk, then rename it over `path`: a crash
    or a full disk mid-write leaves the previous file intact (rename is atomic on POSIX and
    Windows). Raises OSError, after removing the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict in a form any device and path can load: every tensor contiguous
    on the CPU, and no kernel flags. A fast-path run keeps channels_last moments and a fused
    kernel, whose `step` lives on the GPU; a CPU or --no-fast run must not inherit either."""
    state = opt.state_dict()
    for per_param in state["state"].values():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                per_param[key] = value.detach().to("cpu").contiguous()
    for group in state["param_groups"]:
        for flag in KERNEL_FLAGS:
            group.pop(flag, None)
    return state


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict):
    """Load a state saved by any run (either path, any device) into this run's optimizer: what Adam
    has learnt (its moments and step counts) comes from the checkpoint; how it runs (this run's
    betas, weight decay and kernel flags: --beta1 given at --resume applies) stays, and each moment
    takes its parameter's device, dtype and memory layout. (`load_state_dict` alone would restore
    the saved run's settings, flags and layouts.)"""
    own = [{key: value for key, value in group.items() if key != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, settings in zip(opt.param_groups, own):
        for flag in KERNEL_FLAGS:
            group.pop(flag, None)
        group.update(settings)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key == "step":  # fused/capturable kernels keep it on the device, the others on the CPU
                    opt.state[p][key] = value.float().to(p.device if on_device else "cpu")
                elif torch.is_tensor(value) and value.shape == p.shape:
                    opt.state[p][key] = torch.empty_like(p).copy_(value)  # p's device, dtype, layout


def save_checkpoint(path: Path, nets: MAGAN, opt_G, opt_D, iteration: int, cfg: Config, **extra):
    """Everything a run needs to continue exactly: the six networks, both optimizers, the iteration,
    the config, and `extra` (the number of processes, SAT's adaptive weight). Written atomically."""
    state = {"format": CHECKPOINT_FORMAT, "iteration": iteration, "config": dataclasses.asdict(cfg),
             "nets": {name: net.state_dict() for name, net in nets.named_children()},
             "opt_G": optimizer_state(opt_G), "opt_D": optimizer_state(opt_D),
             "torch_rng": torch.get_rng_state(), **extra}
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as e:
        previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise MaganError(f"could not write checkpoint {path} ({e}); {previous}. Free some disk space "
                         f"or choose another --out, then --resume.") from None


def load_checkpoint(path: str | Path, formats=(CHECKPOINT_FORMAT,)) -> dict:
    """Load a checkpoint as untrusted input: `weights_only=True` refuses anything but tensors and
    plain containers, so a malicious file cannot run code. Any failure is a MaganError."""
    path = Path(path)
    if not path.is_file():
        raise MaganError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MaganError(f"{path} cannot be read as a MAGAN checkpoint ({first_line(e)}). It may be "
                         f"truncated (an interrupted copy?) or another kind of file.") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found in OLD_FORMATS:
        raise MaganError(f"{path} was written by {OLD_FORMATS[found]}")
    if found not in formats:
        kinds = " or ".join(f"'{f}'" for f in formats)
        raise MaganError(f"{path} is not a MAGAN checkpoint of the kind needed here (no {kinds} marker"
                         f"{'; it is an export, which only translates' if found == EXPORT_FORMAT else ''})")
    return ckpt


def config_from_checkpoint(ckpt: dict, **overrides) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{**{k: v for k, v in ckpt["config"].items() if k in known}, **overrides})


def load_networks(modules: dict[str, nn.Module], ckpt: dict):
    """Load each named network's weights from a checkpoint; a mismatch is a MaganError."""
    for name, module in modules.items():
        try:
            module.load_state_dict(ckpt["nets"][name])
        except (RuntimeError, KeyError, TypeError) as e:
            raise MaganError(f"the checkpoint's {name} does not fit the network its config describes "
                             f"({first_line(e)})") from None


def check_architecture(cfg: Config, ckpt_cfg: dict):
    """--resume with a different architecture flag cannot load the weights: say which flag."""
    for name in ARCHITECTURE_FIELDS:
        if name in ckpt_cfg and getattr(cfg, name) != ckpt_cfg[name]:
            flag = "--" + name.replace("_", "-")
            raise MaganError(f"{flag} is {getattr(cfg, name)!r} but the checkpoint was trained with "
                             f"{ckpt_cfg[name]!r}: drop the flag or start a new run with another --out")


def export_generators(ckpt_path: str | Path, out: str | Path) -> Path:
    """The two generators and the config of a training checkpoint, for sharing and translating:
    no discriminators and no optimizer moments, a sixth to a twentieth of the checkpoint's size."""
    ckpt = load_checkpoint(ckpt_path)
    state = {"format": EXPORT_FORMAT, "iteration": ckpt["iteration"], "config": ckpt["config"],
             "nets": {name: ckpt["nets"][name] for name in ("G_ab", "G_ba")}}
    out = Path(out)
    try:
        write_atomically(out, lambda f: torch.save(state, f))
    except OSError as e:
        raise MaganError(f"could not write {out} ({e})") from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; the checkpoint: "
          f"{Path(ckpt_path).stat().st_size / 2**20:.1f} MiB)", flush=True)
    return out


# --- 8.7 What the user sees: the run folder, progress, log, sample grids ------------------------
# A GAN's losses say little about how good its translations are: L_D and L_G oscillate by design,
# and a falling G loss can mean mode collapse. So the run shows three things: a progress line
# (is it alive, how fast, when will it end), log.csv (every term, for plotting later), and sample
# grids of fixed test images (the only honest measure while training). The grids always use the
# same images, so that one grid can be compared with the last. The run page (appendix B) puts
# the three together in a browser.

LOG_COLUMNS = ["iteration", "elapsed_s", "it_per_s", "lr", *LOGGED, "w_selfreg"]  # SAT's λ, when adaptive


class RunFolder:
    """The run folder and the terminal: config.json, log.csv, the progress line, the sample grids,
    the run page (appendix B) and the checkpoints. Only the main process writes; every process
    takes part in the checks that need all of them (a NaN anywhere, the averaged log values)."""

    def __init__(self, cfg: Config, start: int, procs, device: torch.device, say=print):
        self.cfg, self.start, self.procs, self.device, self.say = cfg, start, procs, device, say
        self.folder = Path(cfg.out)
        self.latest = self.folder / "checkpoints" / "latest.pt"
        self.last_saved = start if start else None   # the iteration in latest.pt, once there is one
        self.progress = Progress(cfg, start, say)
        self.nonfinite, self.reported = None, set()
        self.log_file = self.log = self.tensorboard = None
        self.samples = {d: fixed_images(sample_folder(folder), cfg.n_samples, cfg.size).to(device)
                        for d, folder in (("a2b", cfg.a), ("b2a", cfg.b))}
        if not procs.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.log_file, self.log = open_log(self.folder / "log.csv", start)
        self.tensorboard = open_tensorboard(self.folder) if cfg.tensorboard else None

    def write_config(self):
        config = json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n"
        write_atomically(self.folder / "config.json", lambda f: f.write(config.encode()))

    def set_iterations(self, iters: int):
        """A time budget's number of iterations (8.4): the config (shared with the progress line, the
        schedule and the checkpoints) and config.json follow it."""
        if iters != self.cfg.iters:
            self.cfg.iters = iters
            if self.procs.main:
                self.write_config()

    def announce(self, fast: bool, autocast, workers: int, data: UnpairedImages):
        cfg, procs = self.cfg, self.procs
        path = "fp32 fast path" if fast else "fp32"
        path = "bf16 fast path" if isinstance(autocast, torch.autocast) else path
        where = f"{procs.world} processes on {self.device.type}" if procs.world > 1 else str(self.device)
        why_large = (f"the G loss starts at several thousand because the CAM term is weighted {cfg.w_cam:g}; "
                     if cfg.w_cam >= 100 else "")
        length = f"{cfg.iters} iterations"
        if cfg.minutes and not cfg.resume:
            length = f"for {cfg.minutes:g} minutes (at most {cfg.iters} iterations, as many as fit)"
        self.say(f"training {length} on {where} ({path}), {workers} data worker(s); "
                 f"{len(data.files[0])} + {len(data.files[1])} images; run folder {self.folder}\n"
                 f"({why_large}see it all in {self.folder / 'index.html'})", flush=True)
        if self.device.type == "cpu" and (cfg.size >= 256 or cfg.ch >= 64):
            self.say("note: on a CPU an iteration at this size and width takes many seconds (24 s at 256 px, "
                     "ch 64 on 2 cores); for real photos on a laptop, see --preset laptop", flush=True)

    def report_unreadable(self, skipped: list[str]):
        for name in set(skipped) - self.reported:
            (self.say if self.procs.main else print)(f"skipping unreadable image {name}")
            self.reported.add(name)

    def check_finite(self, iteration: int, stacked: torch.Tensor):
        """Stop on a NaN or infinite loss, naming the term, before it reaches a checkpoint. The
        check is noted on the device and read back only when we log or save (on a CPU reading is
        free, so every iteration): the GPU never waits for it."""
        bad = ~torch.isfinite(stacked)
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        if not (self.device.type == "cpu" or self.log_due(iteration) or self.save_due(iteration)):
            return
        nonfinite = self.procs.maximum(self.nonfinite.float()) > 0
        if not nonfinite.any():
            return
        names = [name for name, bad in zip(LOGGED, nonfinite.tolist()) if bad]
        if self.last_saved is None:
            kept, then = "no checkpoint had been saved yet", "."
        else:
            kept = f"{self.latest} still holds the last good state (iteration {self.last_saved})"
            then = ", then --resume."
        when = "" if self.device.type == "cpu" else " or shortly before"
        raise MaganError(f"loss term(s) {', '.join(names)} became non-finite (NaN or inf) at iteration "
                         f"{iteration}{when}. {kept}. Try a lower --lr, --no-fast, or a smaller weight for "
                         f"that term{then}")

    def log_due(self, iteration: int) -> bool:
        return iteration % self.cfg.log_every == 0 or iteration == self.cfg.iters

    def save_due(self, iteration: int) -> bool:
        cfg = self.cfg
        return (iteration % cfg.save_every == 0 or iteration % cfg.snapshot_every == 0
                or iteration == cfg.iters)

    def report(self, iteration: int, lr: float, stacked: torch.Tensor, w_selfreg=0.0, selfreg=None):
        """The progress line (when due) and, every --log-every iterations, a log.csv row of the
        losses (`stacked`, in the order of LOGGED) averaged over the processes, and the weight the
        self-regularisation had in this iteration (SAT's adaptive λ when `selfreg` sets it)."""
        logged = self.log_due(iteration)
        if not (logged or (self.procs.main and self.progress.due(iteration))):
            return
        if selfreg and logged:
            selfreg.report(iteration, self.say)
        if logged:
            stacked = self.procs.mean(stacked)  # every process takes part, at the same iterations
        values = dict(zip(LOGGED, stacked.tolist()))  # the only GPU sync of the iteration
        speed = self.progress.report(iteration, lr, values, w_selfreg)
        if logged and self.procs.main:
            self.log.writerow([iteration, round(time.time() - self.progress.began, 2), round(speed, 4), lr]
                              + [values[k] for k in LOGGED] + [float(w_selfreg)])
            self.log_file.flush()
            if self.tensorboard is not None:
                for name, value in values.items():
                    self.tensorboard.add_scalar(f"loss/{name}", value, iteration)

    def write_samples(self, iteration: int, nets: MAGAN):
        """Sample grids of both directions, and the run page that shows them."""
        if not self.procs.main:
            return
        columns = len(grid_columns(self.cfg.mask_fusion))
        for direction, G_fwd, G_bwd in (("a2b", nets.G_ab, nets.G_ba), ("b2a", nets.G_ba, nets.G_ab)):
            grid = sample_grid(G_fwd, G_bwd, self.samples[direction])
            save_image_grid(grid, self.folder / "samples" / f"{direction}_{iteration:07d}.png", ncol=columns)
            if self.tensorboard is not None:
                images = grid.float().add(1).div(2).clamp(0, 1)  # [-1, 1] -> [0, 1]
                self.tensorboard.add_images(f"samples/{direction}", images, iteration)
        write_run_page(self.folder, self.cfg, iteration, self.progress.speed, self.progress.eta(iteration))
        if iteration == self.start + self.cfg.sample_every or iteration == self.cfg.iters:
            self.say(f"sample grids in {self.folder / 'samples'}; the run page: {self.folder / 'index.html'}")

    def save(self, iteration: int, nets: MAGAN, opt_G, opt_D, selfreg, stopping: bool, signal_name):
        self.procs.check_in_sync(nets)
        if stopping:
            self.say(f"{signal_name or 'a stop signal (to another process)'} received: saving iteration "
                     f"{iteration} (press Ctrl-C again to abort without saving)")
        if self.procs.main:
            extra = dict(processes=self.procs.world, selfreg=selfreg.state.cpu() if selfreg else None)
            save_checkpoint(self.latest, nets, opt_G, opt_D, iteration, self.cfg, **extra)
            if iteration % self.cfg.snapshot_every == 0:
                save_checkpoint(self.folder / "checkpoints" / f"iter_{iteration:07d}.pt", nets, opt_G, opt_D,
                                iteration, self.cfg, **extra)
        self.last_saved = iteration

    def close(self):
        if self.log_file is not None:
            self.log_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    d, h, m, s = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60, seconds % 60
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m{s:02d}s"


class Progress:
    """Progress lines: after the first iteration (with how long it took), then every --log-every
    iterations or every 30 seconds, whichever comes first, each with speed and ETA."""

    SECONDS = 30

    def __init__(self, cfg: Config, start: int, say=print):
        self.cfg, self.start, self.say = cfg, start, say
        self.began = self.last_time = time.time()
        self.last_iteration, self.speed = start, 0.0

    def due(self, iteration: int) -> bool:
        return (iteration == self.start + 1 or iteration % self.cfg.log_every == 0
                or iteration == self.cfg.iters or time.time() - self.last_time >= self.SECONDS)

    def eta(self, iteration: int) -> str:
        # The first iteration carries the start-up (torch.compile alone can take minutes), so an ETA
        # from its speed would say hours where minutes are left: the first one waits for the second line.
        if iteration == self.start + 1:
            return "--"
        return format_seconds((self.cfg.iters - iteration) / max(self.speed, 1e-9))

    def report(self, iteration: int, lr: float, values: dict[str, float], w_selfreg=0.0) -> float:
        """Print the line for this iteration; returns the speed (it/s) since the last report."""
        now = time.time()
        self.speed = (iteration - self.last_iteration) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_iteration = now, iteration
        weights = self.cfg.loss_weights()
        terms = "  ".join(f"{k} {values[k]:.4g}" for k in LOSS_TERMS if weights.on(k))
        first = f" (first iteration: {1 / self.speed:.1f} s)" if iteration == self.start + 1 else ""
        if torch.is_tensor(w_selfreg):  # SAT's adaptive weight
            first = f"  (SAT's weight {float(w_selfreg):.3g})" + first
        self.say(f"[{iteration:>{len(str(self.cfg.iters))}}/{self.cfg.iters}] {self.speed:6.2f} it/s  "
                 f"ETA {self.eta(iteration)}  lr {lr:.2e}  D {values['D']:.4g}  G {values['G']:.4g} = "
                 f"{terms}{first}", flush=True)
        return self.speed


def open_log(path: Path, start: int):
    """Open log.csv for appending after iteration `start`. Rows logged after the checkpoint we
    resume from (the iterations an interruption lost) are dropped, so no iteration appears twice."""
    rows = []
    if start > 0 and path.exists():
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f)][1:]
        rows = [row for row in rows if row and row[0].isdigit() and int(row[0]) <= start]
    log_file = open(path, "w", newline="")
    log = csv.writer(log_file)
    log.writerow(LOG_COLUMNS)
    log.writerows(rows)
    log_file.flush()
    return log_file, log


def colorize(heatmap: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, h, w) attention heatmap -> (B, 3, size, size) 'jet' colours in [-1, 1], each map
    scaled to its own min..max (blue = least attended, red = most)."""
    lo = heatmap.amin(dim=(2, 3), keepdim=True)
    hi = heatmap.amax(dim=(2, 3), keepdim=True)
    t = (heatmap.float() - lo) / (hi - lo).clamp_min(1e-8)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    rgb = torch.cat([1.5 - (4 * t - c).abs() for c in (3, 2, 1)], dim=1).clamp(0, 1)  # (B, 3, S, S)
    return rgb * 2 - 1


def grid_columns(mask_fusion: bool) -> list[str]:
    mask = ["mask"] if mask_fusion else []
    return ["input", "attention over the input"] + mask + ["translation", "cycle"]


@torch.no_grad()
def sample_grid(G_forward: Generator, G_backward: Generator, x: torch.Tensor) -> torch.Tensor:
    """One row per test image, the columns of grid_columns(): the input, its attention heatmap
    over it, AGGAN's mask (with mask fusion), the translation and the cycle reconstruction.
    Under no_grad and eval(): no graph is kept, so sampling costs no memory (U-GAT-IT's code runs
    out of memory here)."""
    modes = [G_forward.training, G_backward.training]
    G_forward.eval()
    G_backward.eval()
    out = G_forward(x)
    reconstruction = G_backward(out.image).image
    G_forward.train(modes[0])
    G_backward.train(modes[1])
    columns = [x, 0.5 * x + 0.5 * colorize(out.heatmap, x.shape[-1])]
    if out.mask is not None:
        columns.append(out.mask.float().expand_as(x) * 2 - 1)
    columns += [out.image.float(), reconstruction.float()]
    return torch.stack(columns, dim=1).flatten(0, 1)  # (n·columns, 3, S, S), row by row


def save_image_grid(images: torch.Tensor, path: Path, ncol: int):
    """Save (N, 3, S, S) images in [-1, 1] as one PNG with `ncol` columns and 2-px gutters."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=ncol, padding=2, pad_value=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid).save(path)


# --- 8.8 Signals: stop cleanly, saving first ----------------------------------------------------
# A job scheduler ends a job with SIGTERM (SLURM a few minutes before the time limit, with
# --signal), a user with Ctrl-C. Both should end in a checkpoint rather than in the loss of
# everything since the last one. The handler only sets a flag: the loop finishes the current
# iteration, saves, and returns, so the checkpoint never holds a half-applied optimizer step.

class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current iteration and save. A
    second Ctrl-C aborts at once (the last checkpoint is still intact). Repeated SIGTERMs are one
    request: SLURM signals every process, and torchrun forwards the signal it gets to its workers."""

    def __enter__(self):
        self.requested = None  # the name of the first signal received
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        # No print here: a signal that lands while the loop is printing would make print re-enter
        # itself ("reentrant call") and crash. The loop announces the stop when it sees the flag.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

# =================================================================================================
# 9. Translation: apply a trained generator to a folder or an image
# =================================================================================================
# After training, one generator is all that is needed: G_ab for A -> B. Two choices a user meets:
#   * size: the generator was trained at S x S, so each image is resized to S x S, translated, and
#     resized back to its own size and aspect ratio (--no-keep-size keeps the square). With the
#     detail skip (section 3), what the generator changed is resized instead, and added to the photo
#     at its own size: a 256-px photo translated by a 128-px model keeps its 256-px sharpness;
#   * format: PNG by default, because KID then scores the translation itself and not a re-encoded
#     JPEG of it (U-GAT-IT's code also writes PNG).
# Light-mode generators also run at another size (the MLP reads a pooled map); SAM's learned
# weight map is then resized bilinearly.

def load_generator(path: str | Path, direction: str, device: torch.device) -> tuple[Generator, Config]:
    """The generator of `direction` (a2b or b2a) from a training checkpoint or an export, in eval mode."""
    ckpt = load_checkpoint(path, formats=(CHECKPOINT_FORMAT, EXPORT_FORMAT))
    cfg = config_from_checkpoint(ckpt)
    name = {"a2b": "G_ab", "b2a": "G_ba"}[direction]
    G = Generator(cfg.ch, cfg.n_res, cfg.size, cfg.light, cfg.attention, cfg.p_gen, cfg.mask_fusion,
                  cfg.detail_skip)
    load_networks({name: G}, ckpt)
    return G.to(device).eval(), cfg


def destinations(input_path: Path, out: Path, keep_format: bool = False) -> tuple[list[Path], list[Path]]:
    """The input files and where each translation goes. For a folder: OUT/STEM.png for each image
    (lossless, so that KID scores the translation itself rather than a re-encoded copy; with
    `keep_format`, OUT/NAME in the input's own format). For one image: OUT itself when OUT names
    an image file, else OUT/STEM.png. Every way of pointing --input or --out at the wrong thing is
    a MaganError that says what to pass."""
    if not input_path.exists():
        raise MaganError(f"--input {input_path} does not exist (pass an image or a folder of images)")
    names_an_image = out.suffix.lower() in IMAGE_SUFFIXES
    if out.exists() and not out.is_dir() and not (input_path.is_file() and names_an_image):
        raise MaganError(f"--out {out} is an existing file, not a folder: pass a folder for the translations"
                         + ("" if input_path.is_dir() else " (or a new image name such as out.png)"))
    def name_of(path: Path, taken: dict) -> str:
        if keep_format:
            return path.name
        return f"{path.stem}.png" if taken[path.stem] == 1 else f"{path.stem}_{path.suffix[1:]}.png"
    if input_path.is_file():
        if names_an_image and not out.is_dir():
            if out.resolve() == input_path.resolve():
                raise MaganError(f"--out {out} is the input image: the translation would overwrite it")
            return [input_path], [out]
        return [input_path], [out / name_of(input_path, {input_path.stem: 1})]
    if names_an_image and not out.exists():
        raise MaganError(f"--input {input_path} is a folder, so --out must be a folder too, not the image "
                         f"name {out.name}")
    if out.resolve() == input_path.resolve():
        raise MaganError(f"--out {out} is the input folder: the translations would overwrite the originals")
    if looks_like_dataset_root(input_path):
        raise MaganError(f"--input {input_path} is a dataset root: pass one of its folders, e.g. "
                         f"{input_path / 'testA'}")
    files = list_images(input_path)
    stems = {}
    for f in files:  # two inputs a.jpg and a.png would both become a.png: those keep their suffix
        stems[f.stem] = stems.get(f.stem, 0) + 1
    return files, [out / name_of(f, stems) for f in files]


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as load_rgb shows it (EXIF orientation applied), read from
    the header: a JPEG decoded at reduced scale (draft mode) keeps its full size here."""
    with Image.open(path) as im:
        width, height = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    return (height, width) if turned else (width, height)


@torch.no_grad()
def translate(ckpt: str | Path, input_path: str | Path, out: str | Path, direction: str = "a2b",
              heatmaps: bool = False, batch: int = 8, device: str = "auto", size: int | None = None,
              keep_size: bool = True, keep_format: bool = False) -> list[Path]:
    """Translate an image or every image of a folder (any size and mode). Each image is resized to
    the training size S (or `size`) where the generator works, and the translation resized back to
    the input's own size and aspect ratio (`keep_size`; else it stays SxS). Written as PNG under the
    input's stem (`keep_format`: the input's name and format). With `heatmaps`, the attention
    heatmaps go to OUT/heatmaps/ and AGGAN's masks to OUT/masks/. Returns the written paths."""
    device = pick_device(device)
    G, cfg = load_generator(ckpt, direction, device)
    size = size or cfg.size
    if size < 32 or size % 32:
        raise MaganError(f"--size {size} {SIZE_RULE}")
    if size != cfg.size and not cfg.light:
        raise MaganError(f"this is a full-mode model: it only translates at its training size {cfg.size} "
                         f"(its MLP reads the whole {cfg.size // 4}x{cfg.size // 4} attention map)")
    files, targets = destinations(Path(input_path), Path(out), keep_format)
    target_of = dict(zip(files, targets))
    on_photo = cfg.detail_skip and keep_size  # the change goes onto the full-size photo: decode it whole
    written, start = [], time.time()
    for first in range(0, len(files), batch):
        chunk = list(readable_images(files[first:first + batch], None if on_photo else size))  # those that decode
        if not chunk:
            continue
        x = torch.stack([to_tensor(im.resize((size, size), Image.Resampling.BILINEAR)) for _, im in chunk])
        result = G(x.to(device))                                 # image: (n, 3, S, S)
        colours = colorize(result.heatmap, size)                 # (n, 3, S, S)
        for i, (path, im) in enumerate(chunk):
            shape = upright_size(path) if keep_size else (size, size)
            translation = result.image[i].cpu()
            if on_photo:
                translation = change_at_full_size(to_tensor(im), translation - x[i])
            pictures = [("", translation)]
            if heatmaps:
                pictures.append(("heatmaps", colours[i]))
                if result.mask is not None:
                    pictures.append(("masks", result.mask[i].expand(3, -1, -1) * 2 - 1))
            written.append(save_translation(target_of[path], shape, pictures))
        done = min(first + batch, len(files))
        speed = done / max(time.time() - start, 1e-9)
        print(f"translated {done}/{len(files)} images ({speed:.1f} img/s)", flush=True)
    if not written:
        raise MaganError(f"no image of {input_path} could be decoded, so nothing was translated")
    return written


def change_at_full_size(photo: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """A detail-skip generator (section 3) changes only the coarse image, so what it drew at S x S
    can go onto the photo at its own size: photo + resized(G(x) − x), where a plain resize of G(x)
    would blur every edge of a larger photo. photo: (3, H, W); change: (3, S, S) -> (3, H, W)."""
    return photo + F.interpolate(change[None], size=photo.shape[-2:], mode="bilinear", align_corners=False)[0]


def save_translation(target: Path, shape: tuple[int, int], pictures: list) -> Path:
    """Write the translation (folder "") at `target` and the other pictures as TARGET's folder /
    FOLDER / STEM.png, each resized to `shape`. An unwritable place is a MaganError."""
    try:
        for folder, picture in pictures:
            path = target if not folder else target.parent / folder / (target.stem + ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            resample = Image.Resampling.BICUBIC if not folder else Image.Resampling.BILINEAR
            to_pil(picture).resize(shape, resample).save(path, quality=95)  # quality: read for JPEG only
    except OSError as e:
        raise MaganError(f"cannot write {target} ({first_line(e)}): pass another --out") from None
    return target


# =================================================================================================
# 10. KID: kernel inception distance (MAGAN §3.5.1, U-GAT-IT §3.3.4)
# =================================================================================================
#
#   KID = MMD²(real, fake) with the kernel k(x, y) = (xᵀy / d + 1)³ on d = 2048 Inception features.
#   Unbiased estimate for sets X (m rows) and Y (n rows):
#     MMD² = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1))
#            − 2 Σ_{i,j} k(x_i, y_j) / (mn)
#
# Unlike FID it is unbiased, so small test sets (100 images) give comparable numbers. Two ways to
# average it are in use, and their numbers differ:
#   blocks  (TF-GAN, the papers' tables): disjoint blocks of at most 10 images; mean ± standard error
#   subsets (torch-fidelity, torchmetrics): 100 random subsets of 1000; mean ± population std
# Why the protocol matters: each block's or subset's estimate is unbiased, but the "±" means two
# different things: over blocks, a standard error (the blocks' spread divided by √(number of
# blocks)); over subsets, the spread itself. The same two folders give a different ± under each.
# Compare numbers only within one protocol, and with the same Inception (appendix D).
# Inputs: images are resized to Inception's 299 x 299 (bilinear) and scaled as its weights expect;
# the features are the 2048-d global average pool before the classifier.

def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (xᵀy / d + 1)³ for all pairs: (m, d), (n, d) -> (m, n)."""
    return (x @ y.t() / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased MMD² above: the diagonal k(x_i, x_i) is left out of the within-set means."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return ((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
            + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
            - 2 * k_xy.mean())


def block_sizes(n: int, n_blocks: int) -> list[int]:
    """Split n rows into n_blocks sizes as equal as possible, smaller blocks first (as TF-GAN)."""
    small, n_big = divmod(n, n_blocks)
    return [small] * (n_blocks - n_big) + [small + 1] * n_big


def subset_size_problem(subset_size: int, smaller: int) -> str | None:
    """Why `subset_size` cannot work for a smaller set of `smaller` images, or None."""
    if 2 <= subset_size < smaller:
        return None
    return (f"--subset-size {subset_size} must be at least 2 and smaller than the smaller set ({smaller} "
            f"images): subsets as large as the set are all the whole set, and their spread (the ±) would "
            f"be 0. Pass --subset-size {max(2, smaller // 2)}, or use --protocol blocks (the papers' "
            f"estimator, made for test sets of ~100 images)")


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, protocol: str = "blocks", block_size: int = 10,
                      subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets (N, d), in raw units: (mean, std). Computed in float64.

    blocks:  TF-GAN's estimator. n_blocks = ceil(max(n_real, n_fake) / block_size); both sets are
             cut, in the order given, into n_blocks consecutive blocks; std = sqrt(var_unbiased /
             n_blocks), the standard error of the mean. `seed` is not used (shuffle beforehand).
    subsets: torch-fidelity's estimator. `subsets` times, draw `subset_size` rows of each set without
             replacement (torch.Generator seeded with `seed`); std = population std over the subsets.

    >>> g = torch.Generator().manual_seed(0)
    >>> real, same = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g)
    >>> mean, std = kid_from_features(real, same)              # one distribution: 0, within its ±
    >>> abs(mean) < 2 * std
    True
    >>> mean, std = kid_from_features(real, same + 1)          # shifted by 1 along every feature
    >>> mean > 5 * std
    True
    """
    real, fake = real.double(), fake.double()
    n_real, n_fake = len(real), len(fake)
    if min(n_real, n_fake) < 2:
        raise ValueError(f"KID needs at least 2 images in each set; got {n_real} real and {n_fake} fake")
    if protocol == "blocks":
        n_blocks = math.ceil(max(n_real, n_fake) / block_size)
        if min(n_real, n_fake) < 2 * n_blocks:
            raise ValueError(f"blocks of {n_real}/{n_blocks} real and {n_fake}/{n_blocks} fake rows: "
                             f"every block needs at least 2 rows of each set")
        blocks = zip(real.split(block_sizes(n_real, n_blocks)), fake.split(block_sizes(n_fake, n_blocks)))
        values = torch.stack([mmd2_unbiased(r, f) for r, f in blocks])
        std = (values.var(correction=1) / n_blocks).sqrt() if n_blocks > 1 else torch.tensor(float("nan"))
        return values.mean().item(), std.item()
    if protocol == "subsets":
        problem = subset_size_problem(subset_size, min(n_real, n_fake))
        if problem:
            raise ValueError(problem)
        g = torch.Generator().manual_seed(seed)
        values = torch.stack([mmd2_unbiased(real[torch.randperm(n_real, generator=g)[:subset_size]],
                                            fake[torch.randperm(n_fake, generator=g)[:subset_size]])
                              for _ in range(subsets)])
        return values.mean().item(), values.std(correction=0).item()
    raise ValueError(f"unknown KID protocol {protocol!r}: use blocks or subsets")


FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")

INCEPTION_HELP = """KID needs the {what} weights, and they could not be loaded ({reason}). Fixes:
  * with internet, run once: they are downloaded to {cache}
    (or copy {file} from another machine into that folder)
  * --inception-weights PATH   {file} copied here
  * {other}"""


def load_inception(kind: str = "fid", weights: str | None = None) -> InceptionFeatures:
    """kind: fid (the papers' features, appendix B) or imagenet (torchvision's, not comparable)."""
    if kind == "imagenet":
        print("warning: torchvision's ImageNet Inception gives KID values that are NOT comparable "
              "with the papers' tables (they used the FID Inception)", flush=True)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        url, what = Inception_V3_Weights.IMAGENET1K_V1.url, "torchvision ImageNet Inception-v3"
        other = "--inception fid        the FID Inception (the papers' numbers)"
    else:
        net, url, what = fid_inception_v3(), FID_INCEPTION_URL, "FID Inception"
        other = "--inception imagenet   torchvision's Inception (numbers NOT comparable with the papers')"
    try:
        net.load_state_dict(fetch_state_dict(url, weights))
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise MaganError(INCEPTION_HELP.format(what=what, reason=first_line(e), file=url.rsplit("/", 1)[1],
                                               cache=cache, other=other)) from None
    return InceptionFeatures(net)


@torch.no_grad()
def inception_features(files: list[Path], net: InceptionFeatures, device: torch.device,
                       batch: int = 50) -> torch.Tensor:
    """(N, 2048) features of image files, batched; unreadable files are reported and skipped."""
    net = net.to(device)
    features, start, done = [], time.time(), 0
    # cuDNN may run fp32 convolutions in TF32 (10-bit mantissa) by default: not for the metric.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for first in range(0, len(files), batch):
            features += inception_batch(files[first:first + batch], net, device)
            done = min(first + batch, len(files))
            print(f"  Inception features: {done}/{len(files)} images of {files[0].parent} "
                  f"({done / max(time.time() - start, 1e-9):.1f} img/s)", flush=True)
    if not features:
        raise MaganError(f"no image in {files[0].parent if files else 'the folder'} could be decoded")
    return torch.cat(features)


def inception_batch(files: list[Path], net: InceptionFeatures, device: torch.device) -> list[torch.Tensor]:
    """[(n, 2048) features] of the files that decode, or [] when none does."""
    images = [to_tensor(im).add(1).div(2) for _, im in readable_images(files)]   # (3, H, W) in [0, 1]
    if not images:
        return []
    x = torch.stack([F.interpolate(im[None], size=(299, 299), mode="bilinear", align_corners=False)[0]
                     for im in images])                                      # (n, 3, 299, 299)
    return [net(x.to(device)).cpu().double()]              # (n, 2048); mps has no float64: on the CPU


def kid_between_folders(real: str | Path, fake: str | Path, protocol: str = "blocks", block_size: int = 10,
                        subsets: int = 100, subset_size: int = 1000, seed: int = 0, inception: str = "fid",
                        inception_weights: str | None = None, device: str = "auto",
                        batch: int = 50) -> tuple[float, float]:
    """KID between two image folders, printed ×100 as the papers do. The file lists are shuffled
    with `seed` first, so the blocks do not follow a sorted listing. Returns (mean, std), ×1."""
    dev = pick_device(device)
    lists = []
    for folder in (real, fake):
        files = list_images(folder)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
        lists.append([files[i] for i in order])
    problem = subset_size_problem(subset_size, min(len(files) for files in lists))
    if protocol == "subsets" and problem:  # before the slow Inception pass
        raise MaganError(problem)
    net = load_inception(inception, inception_weights)
    real_features, fake_features = (inception_features(files, net, dev, batch) for files in lists)
    try:
        mean, std = kid_from_features(real_features, fake_features, protocol, block_size, subsets,
                                      subset_size, seed)
    except ValueError as e:
        raise MaganError(str(e)) from None
    detail = (f"blocks of at most {block_size}" if protocol == "blocks"
              else f"{subsets} subsets of {subset_size}")
    print(f"KID×100 = {100 * mean:.2f} ± {100 * std:.2f}   ({protocol}: {detail}; {len(real_features)} "
          f"real, {len(fake_features)} fake images; {inception} Inception)", flush=True)
    return mean, std


# =================================================================================================
# 11. Command line: python magan.py train | translate | kid | export | bench
# =================================================================================================
# The command line is generated from Config (section 7): each field is one flag, with its help
# text and its check, so a default or a rule is written once and the two can never disagree.
# Flags left unset stay out of the parsed namespace. That is how `train --resume` tells what the
# user asked for now from what the checkpoint says: unset flags come from the checkpoint, set
# ones override it (the architecture and the preset excepted, which a checkpoint fixes).
# Every MaganError reaches the user as one line without a traceback: it is a problem the user can
# fix, and the message says how. Any other exception is a bug, and keeps its traceback.

def add_config_flags(parser: argparse.ArgumentParser, skip: tuple = ()):
    """One flag per Config field (but those in `skip`), its help and check from the field. Unset
    flags are left out of the parsed namespace (SUPPRESS), so --resume can tell what the user
    asked for from what the checkpoint already says."""
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {getattr(defaults, f.name)})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, type=f.metadata.get("type", type(f.default)),
                                choices=f.metadata.get("choices"), default=argparse.SUPPRESS, help=help_text)
    if "light" not in skip:
        parser.add_argument("--full", dest="light", action="store_false", default=argparse.SUPPRESS,
                            help="full mode, the paper's setting (same as --no-light)")


def add_kid_flags(parser: argparse.ArgumentParser):
    parser.add_argument("--protocol", choices=("blocks", "subsets"), default="blocks",
                        help="blocks: TF-GAN's estimator, the papers' numbers; subsets: torch-fidelity's")
    parser.add_argument("--block-size", type=positive_int, default=10, help="largest block (blocks)")
    parser.add_argument("--subsets", type=positive_int, default=100, help="number of subsets (subsets)")
    parser.add_argument("--subset-size", type=positive_int, default=1000, help="subset size (subsets)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the file lists and draws the subsets")
    parser.add_argument("--inception", choices=("fid", "imagenet"), default="fid",
                        help="fid: the papers' features; imagenet: torchvision's, not comparable")
    parser.add_argument("--inception-weights", metavar="PATH", help="a local copy of the Inception weights")
    parser.add_argument("--kid-batch", type=positive_int, default=50, help="images per Inception pass")


# `bench` takes the flags that shape an iteration (and the data, for --balance); a run's folder,
# schedule and outputs do not matter to it.
NOT_BENCH_FIELDS = ("out", "iters", "minutes", "workers", "log_every", "sample_every", "save_every",
                    "snapshot_every", "n_samples", "tensorboard", "resume")


def build_parser() -> argparse.ArgumentParser:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="magan.py", description="MAGAN: unsupervised image-to-image "
                                     "translation with multi-angle attention.", formatter_class=defaults)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_parser = commands.add_parser("train", help="train (a quick demo on data/ when no data is given)")
    add_config_flags(train_parser)
    t = commands.add_parser("translate", help="translate images with a trained model",
                            formatter_class=defaults)
    t.add_argument("--ckpt", required=True, help="a checkpoint (RUN/checkpoints/latest.pt) or an export")
    t.add_argument("--input", required=True, help="an image or a folder of images (any size or mode)")
    t.add_argument("--out", required=True, help="output folder (one image per input, same file name), or a "
                                                "file name when --input is one image")
    t.add_argument("--direction", choices=("a2b", "b2a"), default="a2b")
    t.add_argument("--heatmaps", action="store_true", help="also write attention heatmaps (and masks)")
    t.add_argument("--keep-size", action=argparse.BooleanOptionalAction, default=True,
                   help="write each translation at its input's size and aspect ratio (else SxS)")
    t.add_argument("--keep-format", action="store_true",
                   help="write each translation under its input's name and format (default: STEM.png, "
                        "lossless)")
    t.add_argument("--size", type=image_size,
                   help="run the generator at this size (default: the training size; light mode only)")
    t.add_argument("--batch", type=positive_int, default=8, help="images per forward pass")
    t.add_argument("--device", type=device_name, default="auto")
    t.add_argument("--kid-against", metavar="DIR", help="then score the translations against the real "
                                                        "target-domain images in DIR (e.g. testB)")
    add_kid_flags(t)
    k = commands.add_parser("kid", help="kernel inception distance between two image folders",
                            formatter_class=defaults)
    k.add_argument("--real", required=True, help="folder of real target-domain images")
    k.add_argument("--fake", required=True, help="folder of translated images")
    k.add_argument("--device", type=device_name, default="auto")
    add_kid_flags(k)
    e = commands.add_parser("export", help="the generators and config of a checkpoint, for sharing")
    e.add_argument("--ckpt", required=True, help="a training checkpoint")
    e.add_argument("--out", required=True, help="the file to write, e.g. horse2zebra.pt")
    b = commands.add_parser("bench", help="time full training iterations: fp32, fast path, peak memory; "
                                          "--balance: each loss term's share of the generators' gradient")
    add_config_flags(b, skip=NOT_BENCH_FIELDS)
    b.add_argument("--iters", type=positive_int, default=20, help="timed (or, with --balance, measured) "
                                                                 "iterations (default: 20)")
    b.add_argument("--warmup", type=positive_int, default=5, help="untimed iterations first (default: 5)")
    b.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch (default: its own choice, "
                                                        "one per physical core)")
    b.add_argument("--balance", action="store_true", help="instead of timing: the gradient norm of each "
                   "weighted term over the first iterations of a run on the data (default: the bundled data)")
    return parser


# U-GAT-IT's flags (its README's commands) and their magan spelling, for users who come from it.
UGATIT_FLAGS = {"--img_size": "--size", "--light": "--light or --full (no value)", "--iteration": "--iters",
                "--batch_size": "--batch", "--print_freq": "--log-every", "--save_freq": "--save-every",
                "--dataset": "--data ROOT", "--result_dir": "--out", "--resume": "--resume (no value)",
                "--adv_weight": "--w-adv", "--cycle_weight": "--w-cycle", "--identity_weight": "--w-identity",
                "--cam_weight": "--w-cam", "--weight_decay": "--weight-decay", "--n_res": "--n-res",
                "--decay_flag": "nothing: the rate always decays over the second half",
                "--phase": "the commands train and translate",
                "--benchmark_flag": "nothing: on with the fast path"}


def ugatit_hints(unknown: list[str]) -> str:
    """For arguments argparse did not know: magan's spelling of the U-GAT-IT flags among them."""
    flags = dict.fromkeys(a.split("=")[0] for a in unknown)  # in order, once each
    hints = [f"  {flag} -> {UGATIT_FLAGS[flag]}" for flag in flags if flag in UGATIT_FLAGS]
    if any(a in ("True", "False") for a in unknown):
        hints.append("  on/off flags take no value: --light / --full, --resume, --fast / --no-fast")
    return "\nmagan spells U-GAT-IT's flags differently:\n" + "\n".join(hints) if hints else ""


def given_flags(args: argparse.Namespace) -> dict:
    """The Config fields set on the command line (unset flags are absent, see add_config_flags)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}


def train_command(args: argparse.Namespace):
    # Two ways in. A new run builds its config from defaults, demo, preset and flags (make_config).
    # A resumed run starts from the config its checkpoint recorded and applies only the flags given
    # now: --iters to train longer, --lr or --beta1 to change Adam, never what the weights depend on.
    given = given_flags(args)
    if given.get("resume"):  # flags not given on the command line come from the checkpoint
        checkpoint = load_checkpoint(Path(given.get("out", Config.out)) / "checkpoints" / "latest.pt")
        trained = checkpoint["config"].get("preset", "magan")
        if given.get("preset", trained) != trained:
            raise MaganError(f"--preset {given['preset']} at --resume: this run was trained with --preset "
                             f"{trained}, and a preset sets the objective of a whole run. Drop --preset "
                             f"(single --w-* flags do apply at --resume), or start a new run with another "
                             f"--out")
        train(config_from_checkpoint(checkpoint, **given), checkpoint)
        return
    cfg, note = make_config(given)
    if note and Processes().main:
        print(note, flush=True)
    train(cfg)


def bench_command(args: argparse.Namespace):
    # bench times random images, so it needs no data; it reads real ones only to time the loading
    # and, with --balance, to measure the terms on the images a run would see (the bundled data
    # unless --data, --a or --b name others).
    given = given_flags(args)
    values = {**PRESETS[given.get("preset", "magan")], **given}
    if values.get("data"):
        root_a, root_b = dataset_folders(values["data"])
        values["a"], values["b"] = given.get("a", root_a), given.get("b", root_b)
    else:  # the bundled data, for a domain not named
        values["a"], values["b"] = given.get("a", DEMO["a"]), given.get("b", DEMO["b"])
    if args.balance:
        balance(Config(**values), args.iters)
    else:
        bench(Config(**values), args.iters, args.warmup, args.threads)


def kid_args(args: argparse.Namespace) -> dict:
    return dict(protocol=args.protocol, block_size=args.block_size, subsets=args.subsets,
                subset_size=args.subset_size, seed=args.seed, inception=args.inception,
                inception_weights=args.inception_weights, device=args.device, batch=args.kid_batch)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{ugatit_hints(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    # The user's mistakes (MaganError) end in one line on stderr and exit code 2, as argparse's own
    # errors do; a bug anywhere else keeps its traceback, which is what a bug report needs.
    try:
        if args.command == "train":
            train_command(args)
        elif args.command == "translate":
            translate(args.ckpt, args.input, args.out, args.direction, args.heatmaps, args.batch, args.device,
                      args.size, args.keep_size, args.keep_format)
            if args.kid_against:
                kid_between_folders(args.kid_against, args.out, **kid_args(args))
        elif args.command == "kid":
            kid_between_folders(args.real, args.fake, **kid_args(args))
        elif args.command == "export":
            export_generators(args.ckpt, args.out)
        elif args.command == "bench":
            bench_command(args)
    except MaganError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while training: stop now, without saving
        print("\naborted: nothing saved since the last checkpoint, which is intact", file=sys.stderr)
        return 130
    return 0


# #################################################################################################
# Appendix A. Several GPUs: data parallel under torchrun
# #################################################################################################
# torchrun --nproc_per_node N magan.py train ... starts N copies of this script and tells each its
# RANK (0..N−1), LOCAL_RANK (its GPU on this machine) and WORLD_SIZE (N) in environment variables.
# Each process trains on its own --batch images per iteration, so the global batch is N × batch:
# iteration k on rank r reads samples (k·N + r)·B ... (k·N + r)·B + B − 1, a pure function of
# (seed, k, r) (IterationSamples, section 6). One process with batch N·B reads the same samples.
#
# Why an explicit all-reduce rather than DistributedDataParallel: DDP assumes one forward and one
# backward per step, with every parameter receiving a gradient. A GAN step breaks both: each
# generator runs twice before its backward (translation, then cycle), and D is frozen during the G
# step, so a wrapped D would wait for gradients that never come. Averaging the gradients after each
# backward (one all-reduce per network) is short and keeps the algorithm above unchanged; what it
# gives up is DDP's overlap of communication with the backward pass.
#
# Buffers: spectral norm's power-iteration vectors u, v are buffers updated by every forward. They
# stay equal on all ranks without any communication, because every rank starts from the same
# weights and vectors (broadcast from rank 0 at the start) and applies the same averaged updates,
# so every rank computes the same power iteration. At each checkpoint this is verified (a checksum
# over all parameters and buffers); a difference is reported and repaired from rank 0.

class Processes:
    """The processes of one run. Alone (plain `python magan.py train`) there is one and every method
    is a no-op; under torchrun they communicate over NCCL (CUDA) or gloo (CPU)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.main = self.rank == 0   # rank 0 alone writes the log, the samples and the checkpoints
        self.control = None

    def start(self, device: torch.device):
        if self.world == 1 or dist.is_initialized():
            return
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Host-side decisions (stop now?) go over gloo on the CPU: they never wait for the GPU.
        self.control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD

    def average_gradients(self, networks):
        """One all-reduce per network over its flattened gradients, then divide by the world size."""
        for net in networks:
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])              # (n_parameters,)
            dist.all_reduce(flat)
            flat /= self.world
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))

    @property
    def sync(self):
        return self.average_gradients if self.world > 1 else None

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a stop signal may reach one process only)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(bool(flag))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def from_main(self, value: int) -> int:
        """Rank 0's value on every rank (a decision taken on one clock, followed by all)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, 0, group=self.control)
        return int(t.item())

    def maximum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def broadcast(self, module: nn.Module):
        """Rank 0's parameters and buffers to every rank."""
        if self.world > 1:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, 0)

    def check_in_sync(self, module: nn.Module):
        if self.world == 1:
            return
        total = sum(t.double().sum() for t in module.state_dict().values() if t.is_floating_point())
        spread = self.maximum(total.reshape(1)) - (-self.maximum(-total.reshape(1)))
        if spread.item() != 0:
            if self.main:
                print("warning: the processes' weights drifted apart; continuing from rank 0's", flush=True)
            self.broadcast(module)

    def finish(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# #################################################################################################
# Appendix B. The run page and TensorBoard
# #################################################################################################
# index.html is written by hand as plain HTML and inline SVG: no server, no JavaScript library,
# nothing to install, and it opens from a laptop's disk or a cluster's shared folder alike. It is
# rewritten at every sample (atomically, like a checkpoint) and reloads itself every minute.
# The charts need a little care, because the terms live on very different scales: L_G starts at
# several thousand (the CAM term, weighted 1000) and falls by a factor of ten or more, so a term
# whose values span more than two decades is drawn on a log scale; each chart also shows a moving
# average over the raw values, since a GAN's per-iteration losses are noisy.

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers (1, 2 or 5 times a power of ten apart) from lo to hi, for an axis."""
    raw = (hi - lo) / n if hi > lo else abs(hi) or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"  # 4,000 rather than 4e+03


def iteration_label(i: float) -> str:
    """Short enough to sit under its tick: 2,500, 40k, 1M (not 1e+06)."""
    return f"{i / 1e6:g}M" if i >= 1e6 else f"{i / 1e3:g}k" if i >= 1e4 else f"{i:,.0f}"


def smoothed(values: list[float], span: int) -> list[float]:
    """An exponential moving average over about `span` values, started at the first value."""
    alpha, out = 2 / (span + 1), []
    for v in values:
        out.append(v if not out else out[-1] + alpha * (v - out[-1]))
    return out


def svg(tag: str, text: str = "", **attributes) -> str:
    """One SVG element: svg("text", "hi", x=3, text_anchor="end") gives
    <text x="3" text-anchor="end">hi</text>."""
    attrs = " ".join(f'{key.replace("_", "-")}="{value}"' for key, value in attributes.items())
    return f"<{tag} {attrs}>{html.escape(text)}</{tag}>"


def svg_chart(name: str, points: list[tuple[int, float]], width: int = 360, height: int = 190) -> str:
    """An inline SVG chart of one loss term against the iteration: axes with ticks and value labels,
    the logged values in grey and their moving average in red. A term whose positive values span
    more than two decades (L_G starts at several thousand, then falls) is drawn on a log scale."""
    if not points:
        return f'<p class="empty" data-term="{name}">{name}: no rows in log.csv yet</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    log = min(ys) > 0 and max(ys) / min(ys) > 100
    axis = math.log10 if log else (lambda v: v)             # a value -> its place on the y axis
    x0, x1 = xs[0], max(xs[-1], xs[0] + 1)
    y0, y1 = axis(min(ys)), axis(max(ys))
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - 0.5, y1 + 0.5)
    left, right, top, bottom = 52, 20, 20, 30               # margins, room for the labels
    def px(x):                                              # iteration -> pixel column
        return round(left + (x - x0) / (x1 - x0) * (width - left - right), 1)
    def py(y):                                              # axis value -> pixel row, upwards
        return round(height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom), 1)
    parts = [svg("rect", x=left, y=top, width=width - left - right, height=height - top - bottom,
                 fill="#fcfcfc", stroke="#bbb")]
    y_ticks = [t for t in range(math.ceil(y0), math.floor(y1) + 1)] if log else nice_ticks(y0, y1, 4)
    for t in y_ticks or [y0, y1]:
        parts += [svg("line", x1=left, x2=width - right, y1=py(t), y2=py(t), stroke="#e4e4e4"),
                  svg("text", tick_label(10 ** t if log else t), x=left - 4, y=py(t) + 4, text_anchor="end")]
    for t in nice_ticks(x0, x1, 4):
        parts += [svg("line", x1=px(t), x2=px(t), y1=height - bottom, y2=height - bottom + 4, stroke="#888"),
                  svg("text", iteration_label(t), x=px(t), y=height - bottom + 16, text_anchor="middle")]
    parts += [svg("text", name + (" (log scale)" if log else ""), x=left, y=13, font_weight="bold"),
              svg("text", "iteration", x=width - right, y=height - 2, text_anchor="end", fill="#666")]
    for values, colour, stroke, key in ((ys, "#bbb", 1, "data_raw"),
                                        (smoothed(ys, max(1, len(ys) // 20)), "#c33", 1.8, "data_term")):
        coords = " ".join(f"{px(x)},{py(axis(v))}" for x, v in zip(xs, values))
        parts.append(svg("polyline", fill="none", points=coords, stroke=colour, stroke_width=stroke,
                         **{key: name}))
    return (f'<figure><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'font-size="11" font-family="sans-serif">{"".join(parts)}</svg><figcaption>last {ys[-1]:.4g}; '
            f'range {min(ys):.4g} to {max(ys):.4g}, iterations {xs[0]} to {xs[-1]}</figcaption></figure>')


def write_run_page(run: Path, cfg: Config, iteration: int, speed: float, eta: str):
    """RUN/index.html: where the run is, the latest sample grids (large, newest first, with the
    earlier ones below), a chart of every loss term from log.csv, and the config. A static page
    that any browser opens: no server, nothing to install. It reloads itself every minute."""
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    weights = cfg.loss_weights()
    series = ["D", "G"] + [t for t in LOSS_TERMS if weights.on(t)]
    charts = "".join(svg_chart(name, [(int(r["iteration"]), float(r[name])) for r in rows if r.get(name)])
                     for name in series)
    columns = grid_columns(cfg.mask_fusion)
    # Show each tile at 192 px or more: a 32-64 px sample at its own size is too small to judge.
    shown = len(columns) * max(cfg.size, 192)
    pixelated = "image-rendering:pixelated;" if cfg.size < 192 else ""
    def grid(d, label, at, width):
        return (f'<figure><img src="samples/{d}_{at:07d}.png" alt="{d} samples at iteration {at}" '
                f'style="width:{width}px;max-width:100%;{pixelated}"><figcaption>{label} at iteration {at}: '
                f'one row per test image; columns: {" | ".join(columns)}</figcaption></figure>')
    directions = (("a2b", "A → B"), ("b2a", "B → A"))
    latest = "".join(grid(d, label, iteration, shown) for d, label in directions)
    earlier = sorted({int(p.stem.split("_")[1]) for p in (run / "samples").glob("a2b_*.png")} - {iteration},
                     reverse=True)[:8]
    history = "".join(grid(d, label, at, shown // 2) for at in earlier for d, label in directions)
    if history:
        history = f"<details><summary>earlier samples (newest first)</summary>{history}</details>"
    config = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                     for k, v in dataclasses.asdict(cfg).items())
    style = ("body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:0 1em 1em 0;"
             "vertical-align:top}figcaption{color:#444;font-size:90%}td{padding:0 1em 0 0}"
             ".bar{background:#eee;height:8px;max-width:900px}.bar div{background:#c33;height:8px}")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="60">'
            f'<title>magan: {html.escape(run.name)}</title><style>{style}</style></head><body>'
            f'<h1>magan run {html.escape(run.name)}</h1>'
            f'<p>iteration {iteration} of {cfg.iters} · {speed:.2f} it/s · ETA {eta} · updated '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}</p>'
            f'<div class="bar"><div style="width:{100 * iteration / cfg.iters:.1f}%"></div></div>'
            f'<h2>Latest samples</h2>{latest}{history}<h2>Losses (log.csv)</h2>{charts}'
            f'<h2>Config</h2><table>{config}</table></body></html>')
    write_atomically(run / "index.html", lambda f: f.write(page.encode()))


def open_tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MaganError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(magan itself does not need it; RUN/index.html shows the same curves)") from None
    return SummaryWriter(str(run / "tensorboard"))




# #################################################################################################
# Appendix C. Benchmark: how fast is one full training iteration (D step + G step, every loss)?
# #################################################################################################
# `bench` runs the same iterations in several ways, one change at a time, so each can be judged
# on its own: fp32, then channels_last, fused Adam, bf16 autocast and torch.compile added in turn
# (on CUDA: fp32 against the fast path). The first iterations are warm-up (memory allocation,
# oneDNN's or cuDNN's choice of kernel, compiling) and are timed apart, as "warm-up s", since
# that start-up is what --compile costs. On a shared machine a row can be 10-20% off: run it twice.
# `bench --balance` answers another question: how much does each loss term weigh in what the
# generators learn? It prints each weighted term's share of the gradient's norm.

def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory tensors have held (since the last reset). CPU: the process's peak
    resident memory, a rough stand-in (it also counts Python and libraries). NaN where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class BenchRow(NamedTuple):
    """One way of running the same iterations (the maths never changes, only how it runs)."""
    label: str
    fast: bool             # channels_last (and fused Adam, unless `fused` says otherwise)
    fused: bool
    bf16: bool
    compiled: bool
    kept: bool = False     # freed memory kept in the process (keep_freed_memory; for good, once set)


def bench_rows(device: torch.device, compiled: bool) -> list[BenchRow]:
    """CUDA: fp32, the fast path, and with --compile the fast path compiled. CPU: one change per row,
    each on top of the row before: channels_last, fused Adam, bf16 autocast (marked "emulated" where
    the CPU has no native bf16: training's fast path leaves it off there); then, under Linux, training's
    own fast path (channels_last, bf16 where native, plain Adam) with freed memory kept, and with
    --compile that path compiled."""
    fp32 = BenchRow("fp32", fast=False, fused=False, bf16=False, compiled=False)
    if device.type == "cuda":
        fast = BenchRow("fast", fast=True, fused=True, bf16=native_bf16(device), compiled=False)
        rows = [fp32, fast]
    else:
        rows = [fp32, fp32._replace(label="+channels_last", fast=True),
                fp32._replace(label="+fused Adam", fast=True, fused=True)]
        bf16 = rows[-1]._replace(label="+bf16" if native_bf16(device) else "+bf16 (emulated)", bf16=True)
        fast = rows[1]._replace(bf16=native_bf16(device))  # training's fast path on a CPU: no fused Adam
        rows.append(bf16)
        if sys.platform.startswith("linux"):  # last but compile: once set, it stays set for the process
            fast = fast._replace(label="fast path", kept=True)
            rows.append(fast)
    if compiled:
        rows.append(fast._replace(label="fast path+compile", compiled=True))
    return rows


def time_iterations(cfg: Config, row: BenchRow, device: torch.device, procs: Processes, iters: int,
                    warmup: int) -> dict:
    """Warm up, then time `iters` training steps run the way `row` says."""
    torch.manual_seed(cfg.seed)
    vgg = VGGFeatures(vgg19_features()) if needs_vgg(cfg) else None  # random weights: the same computation
    w = cfg.loss_weights()
    if row.kept:
        keep_freed_memory()
    nets, vgg, autocast = place_networks(MAGAN(cfg), vgg, device, row.fast, bf16=row.bf16)
    opt_G, opt_D = make_optimizers(nets, cfg, row.fused)
    if row.compiled:
        compile_in_place(nets, vgg)
    x_a = to_device(torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1, device, row.fast)
    x_b = to_device(torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1, device, row.fast)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for n in (warmup, iters):  # warm-up: cuDNN autotuning, compilation, allocator
        start = time.perf_counter()
        for _ in range(n):
            train_step(nets, vgg, opt_G, opt_D, x_a, x_b, w, cfg.gan_loss, autocast, procs.sync)
        synchronize()
        timings.append(time.perf_counter() - start)
        if procs.main:
            what = "warm-up" if len(timings) == 1 else "timed"
            print(f"  {row.label}: {what} {n} iterations in {timings[-1]:.1f} s", flush=True)
    warmup_s, timed_s = timings
    return dict(mode=row.label, it_per_s=iters / timed_s, ms_per_iter=1000 * timed_s / iters,
                warmup_s=warmup_s)


def data_loading_ms(cfg: Config, batches: int = 10) -> float:
    """Milliseconds to read, decode and augment one batch in this process (training does it in
    --workers processes beside the networks, so it costs an iteration nothing while it is shorter)."""
    data = UnpairedImages(cfg.a, cfg.b, cfg.size, cfg.seed)
    start = time.perf_counter()
    for k in range(batches):
        collate_pairs([data[k * cfg.batch + i] for i in range(cfg.batch)])
    return 1000 * (time.perf_counter() - start) / batches


def bench(cfg: Config, iters: int = 20, warmup: int = 5, threads: int | None = None) -> list[dict]:
    """Time full training iterations, one row per way of running them (bench_rows). Random images
    stand in for data (loading is timed on its own, on the bundled data unless --data/--a/--b say
    otherwise) and a random VGG19 for the ImageNet one (the same computation). Under torchrun every
    process times its own share. Prints a table; returns its rows."""
    if threads:
        torch.set_num_threads(threads)
    procs = Processes()
    device = pick_device(cfg.device, procs.local_rank)
    procs.start(device)
    host_baseline = peak_memory_gib(device) if device.type == "cpu" else 0.0
    with torch.device("meta"):  # only counted: shapes, no memory
        model = MAGAN(cfg)
        model.vgg = vgg19_features()
    say = print if procs.main else (lambda *args, **kwargs: None)
    say(f"MAGAN at {cfg.size}px, {'light' if cfg.light else 'full'}, ch {cfg.ch}, n_res {cfg.n_res}, "
        f"attention {cfg.attention}, preset {cfg.preset}, batch {cfg.batch} per process, "
        f"{procs.world} process(es) on {device}"
        + (f" ({torch.cuda.get_device_name(device)}, torch {torch.__version__})" if device.type == "cuda" else
           f" (torch {torch.__version__}, {torch.get_num_threads()} threads)"))
    millions = {name: count_parameters(getattr(model, name)) / 1e6
                for name in ("G_ab", "D_ga", "D_la", "vgg")}
    say(f"parameters: generator {millions['G_ab']:.2f}M (x2), global D {millions['D_ga']:.2f}M (x2), "
        f"local D {millions['D_la']:.2f}M (x2), total {count_parameters(model) / 1e6 - millions['vgg']:.2f}M"
        + (f"; VGG19 to relu5_4 {millions['vgg']:.2f}M (frozen)" if needs_vgg(cfg) else ""))
    rows = []
    for row in bench_rows(device, cfg.compile):
        result = time_iterations(cfg, row, device, procs, iters, warmup)
        result["peak_gib"] = peak_memory_gib(device) - host_baseline
        per_process = procs.mean(torch.tensor(result["it_per_s"])).item()
        result["total_img_per_s"] = per_process * procs.world * cfg.batch
        rows.append(result)
    print_bench_table(rows, say)
    try:
        say(f"data loading: {data_loading_ms(cfg):.0f} ms per batch of {cfg.batch} per domain, in one "
            f"process ({Path(cfg.a).parent}); training loads in --workers processes beside the networks")
    except MaganError as e:
        say(f"data loading: not measured ({first_line(e)})")
    if procs.world > 1:
        say(f"(it/s and ms/iter: rank 0's; every process trains on {cfg.batch} image(s) per domain "
            f"and iteration)")
    if device.type == "cpu":
        say("(training's fast path on this CPU: channels_last" +
            (", bf16 autocast)" if native_bf16(device) else "; no bf16: this CPU has no native bf16)") +
            "\n(peak GiB on CPU is the growth of the process's peak resident memory, cumulative over rows)")
    procs.finish()
    return rows


def print_bench_table(rows: list[dict], say=print):
    say(f"\n{'path':<22}{'it/s':>8}{'ms/iter':>10}{'images/s, all':>15}{'peak GiB':>10}{'warm-up s':>11}"
        f"{'1M iterations':>15}{'speed-up':>10}")
    for row in rows:
        say(f"{row['mode']:<22}{row['it_per_s']:>8.2f}{row['ms_per_iter']:>10.1f}"
            f"{row['total_img_per_s']:>15.2f}{row['peak_gib']:>10.2f}{row['warmup_s']:>11.1f}"
            f"{format_seconds(1e6 / row['it_per_s']):>15}"
            f"{rows[0]['ms_per_iter'] / row['ms_per_iter']:>9.2f}x")


def balance(cfg: Config, iters: int = 20) -> dict[str, float]:
    """How much each weighted term λ_k L_k of L_G pulls on the generators, over the first `iters`
    iterations of a run: ||∇_G λ_k L_k||, the norm of its gradient over all generator parameters,
    averaged over the iterations; printed as a share of all the terms' norms and as a multiple of
    the cycle term's. The run is real: its data, its VGG weights (--vgg-weights), D and G learning
    as in `train` (fp32, one process). Returns the mean norm of each term."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vgg = load_vgg(cfg.vgg_weights) if needs_vgg(cfg) else None
    nets, vgg, _ = place_networks(MAGAN(cfg), vgg, device, fast=False)
    opt_G, opt_D = make_optimizers(nets, cfg)
    data, w = UnpairedImages(cfg.a, cfg.b, cfg.size, cfg.seed), cfg.loss_weights()
    params = [p for G in nets.generators() for p in G.parameters()]
    norms = {term: [] for term in LOSS_TERMS if w.on(term)}
    values = {term: [] for term in norms}
    for k in range(iters):
        x_a, x_b, _ = collate_pairs([data[k * cfg.batch + i] for i in range(cfg.batch)])
        x_a, x_b = x_a.to(device), x_b.to(device)
        t = translate_both_ways(nets, x_a, x_b)
        for D in nets.discriminators():
            D.requires_grad_(False)
        terms = generator_terms(nets, vgg, x_a, x_b, t, w, cfg.gan_loss)
        for term in norms:
            weighted = getattr(w, term) * getattr(terms, term)
            grads = torch.autograd.grad(weighted, params, retain_graph=True, allow_unused=True)
            norms[term].append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).item())
            values[term].append(weighted.item())
        train_step(nets, vgg, opt_G, opt_D, x_a, x_b, w, cfg.gan_loss)  # the run goes on
        print(f"  balance: iteration {k + 1}/{iters}", flush=True)
    mean = {term: sum(v) / len(v) for term, v in norms.items()}
    total, cycle = sum(mean.values()), mean.get("cycle")
    print(f"\nL_G's terms over the first {iters} iterations ({cfg.size} px, ch {cfg.ch}, attention "
          f"{cfg.attention}, VGG {cfg.vgg_weights if vgg is not None else 'none'}, {cfg.a}):")
    print(f"{'term':<10}{'weight':>8}{'λ·L (mean)':>13}{'|grad λ·L|':>13}{'share':>8}{'÷ cycle':>9}")
    for term, norm in mean.items():
        ratio = f"{norm / cycle:>8.2f}x" if cycle else f"{'':>9}"
        print(f"{term:<10}{getattr(w, term):>8g}{sum(values[term]) / iters:>13.4g}{norm:>13.4g}"
              f"{100 * norm / total:>7.1f}%{ratio}")
    return mean


# #################################################################################################
# Appendix D. The FID Inception: TF's 2015-12-05 Inception graph, as ported by pytorch-fid
# #################################################################################################
# torchvision's Inception-v3 classes with 1008 outputs, except that the average-pooling branch of
# the Mixed blocks ignores padding, and Mixed_7c pools with a 3x3 max-pool. The features are the
# 2048-d global average pool. Only these features give numbers comparable with the papers' tables.
# Why a second Inception at all: FID and KID were defined on the TF graph, and torchvision's
# ImageNet Inception-v3, although the same architecture, was trained anew: its features differ,
# and so do the distances (by more than the gaps between the methods in MAGAN's Table 2). The
# weights are the TF graph's, converted by pytorch-fid; the classes below change only the layers
# where the TF graph computes differently. `--inception imagenet` skips them, for quick looks only.

class FIDInceptionA(InceptionA):
    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool]


class FIDInceptionE(InceptionE):
    def __init__(self, in_channels: int, pool: str):
        super().__init__(in_channels)
        self.pool = pool  # "avg" (Mixed_7b) or "max" (Mixed_7c)

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "avg":
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


def fid_inception_v3() -> nn.Module:
    """The FID Inception's architecture with random weights (load `pt_inception-2015-12-05-*.pth`)."""
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, pool="avg")
    net.Mixed_7c = FIDInceptionE(2048, pool="max")
    return net


class InceptionFeatures(nn.Module):
    """Images in [0, 1] of any size -> (B, 2048) pool features: bilinear resize to 299x299, map to
    [-1, 1] (what both the FID port and torchvision's transform_input feed the first conv)."""

    BLOCKS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images):                                   # (B, 3, H, W) in [0, 1]
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in self.BLOCKS:
            x = getattr(self.net, name)(x)
        return x.flatten(1)                                      # (B, 2048, 1, 1) -> (B, 2048)


if __name__ == "__main__":
    sys.exit(main())
