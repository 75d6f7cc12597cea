"""
MAGAN: unsupervised image-to-image translation with multi-angle attention, in one file.

Read top to bottom, this file is a tutorial of the paper. It follows the paper's order:

    1. data                      (CycleGAN folder layout, augmentation of U-GAT-IT appendix B.2)
    2. normalisation layers      (U-GAT-IT §2.1.1: AdaLIN and LIN)
    3. multi-angle attention     (MAGAN §2.1, eq. 1-2: GMP + GAP + SAM)
    4. generator                 (MAGAN §2.1, U-GAT-IT appendix Table 4)
    5. discriminator             (MAGAN §2.2, eq. 3, U-GAT-IT Tables 5-6)
    6. losses                    (MAGAN §2.3, eq. 4-8, U-GAT-IT §2.2)
    7. training                  (MAGAN §3.3, U-GAT-IT appendix B.2)
    8. translation               (apply a trained generator to a folder)
    9. KID                       (MAGAN §3.5.1: the papers' evaluation metric)
   10. benchmark and command line

Where the paper is ambiguous we follow the project's reading (SPEC.md); each such choice is
stated in a comment beside the code that makes it. Images live in [-1, 1] everywhere.

    python magan.py train                         # trains on the small bundled dataset in data/
    python magan.py train --a trainA --b trainB   # trains on your own folders
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.models import Inception_V3_Weights, inception_v3
from torchvision.models.inception import InceptionA, InceptionC, InceptionE
from torchvision.utils import make_grid


class MaganError(Exception):
    """A problem the user can fix (bad folder, missing weights, wrong checkpoint...).
    The command line prints its message without a traceback."""


# -------------------------------------------------------------------------------------------------
# Configuration. Every default is the paper's (except `light`, see SPEC.md), and the command line
# is generated from this dataclass: each field becomes a flag, `n_res` becomes `--n-res`.
# -------------------------------------------------------------------------------------------------

def opt(default, help, **argparse_kwargs):
    """A config field with its help text (and optionally a `type=` validator or `choices=`)."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class Config:
    # data and run folder
    a: str = opt("data/trainA", "folder of domain-A training images (testA beside it is used for samples)")
    b: str = opt("data/trainB", "folder of domain-B training images (testB beside it is used for samples)")
    out: str = opt("runs/magan", "run folder: config.json, log.csv, samples/, checkpoints/")
    size: int = opt(256, "image size S, a multiple of 32 (the paper: 256)", type="image_size")
    # model (U-GAT-IT appendix Tables 4-6; MAGAN §2.1-2.2)
    ch: int = opt(64, "base width of every network (the paper: 64)", type="positive_int")
    n_res: int = opt(4, "residual blocks in the generator's encoder and decoder (the paper: 4)",
                     type="positive_int")
    light: bool = opt(True, "light mode: the gamma/beta MLP reads the global-average-pooled attention "
                            "map (so that a 12 GB GPU can train at 256 px). --full is the paper's setting "
                            "(flattened map, ~268M weights per generator at 256 px)")
    attention: str = opt("ma", "attention: ma = GMP+GAP+SAM (MAGAN), cam = GMP+GAP (U-GAT-IT), "
                               "sam = SAM only, none (MAGAN Table 4)", choices=("ma", "cam", "sam", "none"))
    p_gen: float = opt(2.0, "SAM exponent p >= 1 in the generators (MAGAN: 2; Table 5)", type="sam_exponent")
    p_dis: float = opt(1.0, "SAM exponent p >= 1 in the discriminators (MAGAN: 1; Table 5)", type="sam_exponent")
    gan_loss: str = opt("lsgan", "adversarial loss: lsgan (U-GAT-IT's code) or bce (MAGAN's printed eq. 4)",
                        choices=("lsgan", "bce"))
    # loss weights (0 switches a term off). Adversarial, cycle, identity and CAM are U-GAT-IT's.
    # MAGAN gives no weights for style and content; 1 is our default, not tuned (tuning needs the
    # ImageNet VGG, which the machines this was written on cannot download).
    w_adv: float = opt(1.0, "weight of the adversarial loss, eq. 4", type="weight")
    w_cycle: float = opt(10.0, "weight of the pixel cycle L1 loss (U-GAT-IT)", type="weight")
    w_identity: float = opt(10.0, "weight of the identity L1 loss (U-GAT-IT)", type="weight")
    w_cam: float = opt(1000.0, "weight of the generator's category (CAM) loss, eq. 7", type="weight")
    w_style: float = opt(1.0, "weight of the Gram style loss on VGG19 relu4_4, eq. 5", type="weight")
    w_content: float = opt(1.0, "weight of the content loss on VGG19 relu5_4, eq. 6", type="weight")
    vgg_weights: str = opt("imagenet", "VGG19 for the style/content losses: imagenet (torchvision, "
                                       "downloaded once to the torch cache), PATH to a torchvision VGG19 "
                                       "state dict, none (no perceptual losses), or random (offline smoke "
                                       "runs only: NOT the paper)")
    # optimisation (MAGAN §3.3)
    iters: int = opt(1_000_000, "training iterations; the learning rate decays linearly to 0 over the "
                                "second half", type="positive_int")
    batch: int = opt(1, "batch size (the paper: 1)", type="positive_int")
    lr: float = opt(1e-4, "Adam learning rate", type="positive_float")
    beta1: float = opt(0.5, "Adam beta1", type="fraction")
    beta2: float = opt(0.999, "Adam beta2", type="fraction")
    weight_decay: float = opt(1e-4, "Adam weight decay", type="weight")
    # machinery
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N", type="device_name")
    seed: int = opt(0, "random seed: weights, data order and augmentation all follow from it", type=int)
    fast: bool = opt(True, "on CUDA: bf16 autocast (norm statistics and losses in fp32), channels_last, "
                           "fused Adam. Ignored on CPU")
    compile: bool = opt(False, "torch.compile the six networks (slow start, see `bench`)")
    workers: int = opt(4, "data-loading worker processes (0 = load in the main process)",
                       type="nonneg_int")
    log_every: int = opt(100, "print and log the losses every N iterations", type="positive_int")
    sample_every: int = opt(1000, "write sample grids every N iterations", type="positive_int")
    save_every: int = opt(1000, "write checkpoints/latest.pt every N iterations", type="positive_int")
    snapshot_every: int = opt(100_000, "keep a copy checkpoints/iter_N.pt every N iterations",
                              type="positive_int")
    n_samples: int = opt(4, "test images per sample grid", type="positive_int")
    resume: bool = opt(False, "continue the run in --out from checkpoints/latest.pt")


# The fields that define the networks: a checkpoint only continues under the same values.
ARCHITECTURE_FIELDS = ("size", "ch", "n_res", "light", "attention", "p_gen", "p_dis")


# =================================================================================================
# 1. Data: two unpaired folders (CycleGAN layout trainA/ trainB/ testA/ testB/)
# =================================================================================================

def load_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """Open any image Pillow reads and return it as 8-bit RGB. Raises OSError/ValueError if the
    file is not a readable image (the caller decides whether to skip it)."""
    with Image.open(path) as im:
        if draft_size:
            im.draft("RGB", (draft_size, draft_size))  # JPEG: decode a 4000x3000 photo at 1/8 scale
        im.load()  # a truncated file fails here, not later inside a worker
        if im.mode.startswith("I;16") or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey: keep the top 8 bits
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            # Composite transparent pixels on white instead of keeping whatever colour they hide.
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        return im.convert("RGB")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float tensor in [-1, 1]."""
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> PIL RGB (the inverse of to_tensor, rounding to 8 bits)."""
    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy())


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of a folder. Files Pillow cannot identify (text, zero bytes, ...) are
    reported once by name and skipped; a folder with no image at all is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MaganError(f"image folder {folder} does not exist (expected the CycleGAN layout "
                         f"trainA/ trainB/ testA/ testB/; see data/README.md)")
    good, bad = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path) as im:  # reads the header only: cheap even for 100k files
                im.size
            good.append(path)
        except Exception as e:  # Pillow raises several types for non-images
            bad.append(f"{path.name} ({type(e).__name__})")
    if bad:
        print(f"skipping {len(bad)} unreadable file(s) in {folder}: {', '.join(bad)}", flush=True)
    if not good:
        raise MaganError(f"no readable image in {folder}: put .jpg/.png images there")
    return good


def keyed_generator(*key) -> torch.Generator:
    """A torch.Generator seeded by a hash of `key`: the randomness of iteration k is a pure
    function of (seed, k), so a resumed run draws exactly what an uninterrupted one would."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class UnpairedImages(torch.utils.data.Dataset):
    """Item k is the k-th training sample (x_a, x_b): each domain is walked in a fresh random
    order every epoch, and each image gets a random horizontal flip (p=0.5), a resize to S+30
    and a random SxS crop (U-GAT-IT appendix B.2). Files that fail to decode (a truncated JPEG,
    say) are skipped: the next file is used and the name is returned so the trainer reports it."""

    def __init__(self, folder_a, folder_b, size: int, seed: int):
        self.files = (list_images(folder_a), list_images(folder_b))
        self.size, self.seed = size, seed
        for files in self.files:  # fail before training if no file of a domain decodes at all
            self._first_readable(files)

    def _first_readable(self, files, start=0):
        skipped = []
        for i in range(len(files)):
            path = files[(start + i) % len(files)]
            try:
                return load_rgb(path, self.size + 30), skipped
            except Exception as e:
                skipped.append(f"{path} ({type(e).__name__}: {e})")
        raise MaganError(f"no image in {files[0].parent} can be decoded:\n  " + "\n  ".join(skipped))

    def _augment(self, im: Image.Image, g: torch.Generator) -> torch.Tensor:
        big, S = self.size + 30, self.size
        if torch.rand((), generator=g) < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((big, big), Image.Resampling.BILINEAR)
        top, left = torch.randint(0, big - S + 1, (2,), generator=g).tolist()
        return to_tensor(im.crop((left, top, left + S, top + S)))  # (3, S, S)

    def __getitem__(self, k: int):
        images, skipped = [], []
        for domain, files in enumerate(self.files):
            epoch, position = divmod(k, len(files))
            order = torch.randperm(len(files), generator=keyed_generator(self.seed, domain, epoch))
            im, bad = self._first_readable(files, int(order[position]))
            images.append(self._augment(im, keyed_generator(self.seed, domain, "augment", k)))
            skipped += bad
        return images[0], images[1], skipped


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


def fixed_images(folder: str | Path, n: int, size: int) -> torch.Tensor:
    """The first n readable images of a folder, resized to SxS: the inputs of every sample grid."""
    images = []
    for path in list_images(folder):
        try:
            images.append(to_tensor(load_rgb(path, size).resize((size, size), Image.Resampling.BILINEAR)))
        except Exception:
            continue  # list_images already reported non-images; a truncated one is just passed over
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
# 2. Normalisation layers (U-GAT-IT §2.1.1, eq. 1)
#
#   AdaLIN(a, γ, β) = γ · (ρ · â_I + (1 − ρ) · â_L) + β
#   â_I = (a − μ_I) / sqrt(σ_I² + ε)      per sample and channel, over (H, W)      (instance norm)
#   â_L = (a − μ_L) / sqrt(σ_L² + ε)      per sample, over (C, H, W)               (layer norm)
#
# ρ, learnt per channel and clipped to [0, 1], chooses between the two. Instance norm keeps the
# content's local statistics, layer norm lets the style change globally; letting the network mix
# them is what lets U-GAT-IT change shapes (selfie -> anime) and not only textures.
# Statistics are computed in fp32 even when the rest of the network runs in bf16.
# =================================================================================================

def layer_instance_norm(x: torch.Tensor, rho: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ρ · â_I + (1 − ρ) · â_L with biased variances (as nn.InstanceNorm2d / nn.LayerNorm use)."""
    x = x.float()
    var_i, mean_i = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)     # (B, C, 1, 1)
    var_l, mean_l = torch.var_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)  # (B, 1, 1, 1)
    x_i = (x - mean_i) * torch.rsqrt(var_i + eps)
    x_l = (x - mean_l) * torch.rsqrt(var_l + eps)
    return rho * x_i + (1 - rho) * x_l


class AdaLIN(nn.Module):
    """Adaptive layer-instance norm: γ and β come from the attention features (one per sample).
    ρ starts at 1 (pure instance norm), as U-GAT-IT's text says. Its TensorFlow code also stores 1
    but mixes with clip(ρ − 0.1), so 0.9 in effect and never more; its PyTorch port starts at 0.9."""

    def __init__(self, channels: int, rho_init: float = 1.0):
        super().__init__()
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), rho_init))

    def forward(self, x, gamma, beta):  # x: (B, C, H, W); gamma, beta: (B, C)
        return layer_instance_norm(x, self.rho) * gamma[:, :, None, None] + beta[:, :, None, None]


class LIN(nn.Module):
    """Layer-instance norm of the up-sampling blocks: the same mix with learnt γ, β.
    ρ starts at 0 (layer norm), as U-GAT-IT's code does."""

    def __init__(self, channels: int):
        super().__init__()
        self.rho = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return layer_instance_norm(x, self.rho) * self.gamma + self.beta


@torch.no_grad()
def clip_rho(network: nn.Module):
    """Keep every ρ in [0, 1] after each optimizer step: outside it AdaLIN would extrapolate past
    pure instance or pure layer norm, and the mix would stop meaning anything."""
    for m in network.modules():
        if isinstance(m, (AdaLIN, LIN)):
            m.rho.clamp_(0.0, 1.0)


class InstanceNorm(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (no affine, like U-GAT-IT's encoder) with fp32 statistics under autocast."""

    def forward(self, x):
        return super().forward(x.float())


# =================================================================================================
# 3. Multi-angle attention Γ (MAGAN §2.1, Fig. 3, eq. 1-2)
#
# Three "angles" look at the encoder's feature map θ: (B, C, h, w) and each trains a one-unit
# classifier "is this the source domain?". The classifier's weights then say which channels
# (GAP, GMP) or which positions (SAM) matter, and re-weight θ:
#
#   GAP:  β_n = mean_ij θ_n^ij      ξ_β = Σ_n ω_β^n · β_n        a_β = ω_β ⊙ θ   (per channel)
#   GMP:  α_n = max_ij θ_n^ij       ξ_α = Σ_n ω_α^n · α_n        a_α = ω_α ⊙ θ   (per channel)
#   SAM:  γ   = Σ_n |θ_n|^p         ξ_γ = Σ_m ω_γ^m · γ_m        a_γ = ω_γ ⊙ θ   (per position m)
#
#   Γ(x) = Concat(ξ_β, ξ_α, ξ_γ)                        eq. (1): three class logits, (B, 3)
#   a(x) = ReLU(Conv1x1(Concat(a_β, a_α, a_γ)))         eq. (2): attention feature map, (B, C, h, w)
#
# GAP + GMP is U-GAT-IT's CAM; SAM is MAGAN's addition: γ sums the channels' activation energy at
# each position (p=2 in G favours the most active regions; p=1 in D spreads attention, §2.2).
# =================================================================================================

class AttentionOutput(NamedTuple):
    features: torch.Tensor  # a(x): (B, C, h, w), eq. (2)
    logits: torch.Tensor    # Γ(x): (B, n_angles), eq. (1)
    heatmap: torch.Tensor   # Σ_c a(x): (B, 1, h, w), for pictures


class MultiAngleAttention(nn.Module):
    """Returns AttentionOutput(features a (B, C, h, w), class logits (B, n_angles), heatmap (B, 1, h, w)).

    `grid` is the training-time side h = w of θ: SAM's classifier has one weight per position.
    `angles`: "ma" (GAP, GMP, SAM), "cam" (GAP, GMP), "sam", or "none" (θ passes straight to the
    1x1 conv and there are no class logits): the ablations of MAGAN Table 4."""

    ANGLES = {"ma": ("gap", "gmp", "sam"), "cam": ("gap", "gmp"), "sam": ("sam",), "none": ()}

    def __init__(self, channels: int, grid: int, angles: str = "ma", p: float = 2.0,
                 spectral: bool = False, leaky: bool = False):
        super().__init__()
        if p < 1:
            raise ValueError(f"SAM exponent p = {p}: use p >= 1 (|θ|^p has an infinite gradient at 0 for p < 1)")
        maybe_sn = spectral_norm if spectral else (lambda m: m)
        n_inputs = {"gap": channels, "gmp": channels, "sam": grid * grid}
        self.fc = nn.ModuleDict({name: maybe_sn(nn.Linear(n_inputs[name], 1, bias=False))
                                 for name in self.ANGLES[angles]})
        self.grid, self.p = grid, p
        n_maps = max(1, len(self.fc))
        # The 1x1 conv is not spectrally normalised, in G or D: U-GAT-IT's Tables 5-6 list SN on
        # every conv of D except this one (and its code leaves it out too).
        self.conv1x1 = nn.Conv2d(n_maps * channels, channels, 1)
        self.act = nn.LeakyReLU(0.2) if leaky else nn.ReLU()

    def sam_weight_map(self, h: int, w: int) -> torch.Tensor:
        """SAM's classifier weights ω_γ as a (h, w) map. Its classifier is tied to the training
        grid; on another grid (translating at another size, eval mode only) the map is resized
        bilinearly. In training that would silently train a resized copy, so it is an error."""
        weight = self.fc["sam"].weight.view(1, 1, self.grid, self.grid)
        if (h, w) != (self.grid, self.grid):
            if self.training:
                raise ValueError(f"SAM was built for a {self.grid}x{self.grid} feature grid and got {h}x{w}: "
                                 f"train at the size the network was built for (only eval mode resizes)")
            weight = F.interpolate(weight, size=(h, w), mode="bilinear", align_corners=False)
        return weight.view(h, w)

    def forward(self, theta):  # theta: (B, C, h, w)
        B, C, h, w = theta.shape
        logits, maps = [], []
        # Read each `fc.weight` once: under spectral norm that is the *normalised* weight, the one
        # that produced the logit, and every read runs a power iteration.
        if "gap" in self.fc:
            weight = self.fc["gap"].weight                         # ω_β: (1, C)
            logits.append(theta.mean(dim=(2, 3)) @ weight.t())     # ξ_β: (B, C) @ (C, 1) -> (B, 1)
            maps.append(theta * weight.view(1, C, 1, 1))           # a_β: (B, C, h, w)
        if "gmp" in self.fc:
            weight = self.fc["gmp"].weight                         # ω_α: (1, C)
            logits.append(theta.amax(dim=(2, 3)) @ weight.t())     # ξ_α: (B, 1)
            maps.append(theta * weight.view(1, C, 1, 1))           # a_α: (B, C, h, w)
        if "sam" in self.fc:
            gamma = theta.float().abs().pow(self.p).sum(dim=1)     # γ = Σ_n |θ_n|^p: (B, h, w)
            # Choice: γ is scaled to unit root-mean-square per sample. Raw γ grows like C·|θ|^p and
            # would swamp the other two logits. Unit *L2 norm* (as in activation-based attention
            # transfer) is too small: under spectral norm |ω_γ| = 1, so ξ_γ = ω_γ·γ would be stuck
            # in [-1, 1] and D could not reach the LSGAN targets (measured: a D trained alone kept
            # its SAM loss at 0.47, real and fake logits 0.46 vs 0.42; with unit RMS 0.22, 0.74
            # vs 0.27). Unit RMS is unit L2 norm times sqrt(h·w).
            gamma = gamma.flatten(1)                               # (B, h*w)
            gamma = gamma * torch.rsqrt(gamma.square().mean(dim=1, keepdim=True) + 1e-12)
            weight = self.sam_weight_map(h, w)                     # ω_γ: (h, w)
            logits.append(gamma @ weight.reshape(-1, 1).to(gamma.dtype))  # ξ_γ: (B, 1)
            maps.append(theta * weight.to(theta.dtype))            # a_γ: (B, C, h, w)
        if not maps:
            maps = [theta]                                         # attention "none"
        a = self.act(self.conv1x1(torch.cat(maps, dim=1)))         # (B, n*C, h, w) -> (B, C, h, w)
        heatmap = a.sum(dim=1, keepdim=True)                       # (B, 1, h, w)
        logits = torch.cat(logits, dim=1) if logits else theta.new_zeros(B, 0)  # Γ(x): (B, n_angles)
        return AttentionOutput(a, logits, heatmap)


# =================================================================================================
# 4. Generator (MAGAN §2.1 and Fig. 2(b); layer table: U-GAT-IT appendix Table 4)
#
#   x -> encoder E -> θ -> multi-angle attention -> a(x) -> MLP -> (γ, β)
#                                                  a(x) -> AdaLIN residual blocks(γ, β) -> up-sampling -> y
# =================================================================================================

class ResBlock(nn.Module):
    """Encoder residual block: (pad, 3x3 conv, instance norm, ReLU) x 2 with a skip connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), InstanceNorm(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), InstanceNorm(channels))

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


class GeneratorOutput(NamedTuple):
    image: torch.Tensor     # the translation: (B, 3, S, S) in [-1, 1]
    logits: torch.Tensor    # the attention's class logits Γ_G(x): (B, n_angles)
    heatmap: torch.Tensor   # (B, 1, S/4, S/4)


class Generator(nn.Module):
    """G: (B, 3, S, S) -> GeneratorOutput(image (B, 3, S, S), logits (B, n_angles), heatmap (B, 1, S/4, S/4))."""

    def __init__(self, ch: int = 64, n_res: int = 4, size: int = 256, light: bool = True,
                 attention: str = "ma", p: float = 2.0):
        super().__init__()
        C, grid = 4 * ch, size // 4
        # Encoder E: 7x7 conv, two stride-2 3x3 convs, n_res residual blocks.
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ch, 7, bias=False), InstanceNorm(ch), nn.ReLU()]
        for i in range(2):
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(ch * 2**i, ch * 2**(i + 1), 3, stride=2, bias=False),
                       InstanceNorm(ch * 2**(i + 1)), nn.ReLU()]
        layers += [ResBlock(C) for _ in range(n_res)]
        self.encoder = nn.Sequential(*layers)
        self.attention = MultiAngleAttention(C, grid, attention, p)
        # γ, β MLP. Full mode reads the whole (C, S/4, S/4) map: C·(S/4)²·C weights in its first
        # layer (268M at S=256, ch=64). Light mode reads its global average: C·C weights.
        self.light, self.grid = light, grid
        self.mlp = nn.Sequential(nn.Linear(C if light else C * grid * grid, C, bias=False), nn.ReLU(),
                                 nn.Linear(C, C, bias=False), nn.ReLU())
        self.to_gamma = nn.Linear(C, C, bias=False)
        self.to_beta = nn.Linear(C, C, bias=False)
        self.res_blocks = nn.ModuleList(AdaLINResBlock(C) for _ in range(n_res))
        # Up-sampling: nearest x2, 3x3 conv, LIN, ReLU (twice), then 7x7 conv and tanh to [-1, 1].
        layers = []
        for i in range(2):
            c = C // 2**i
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                       nn.Conv2d(c, c // 2, 3, bias=False), LIN(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, 3, 7, bias=False), nn.Tanh()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x):                                # x: (B, 3, S, S)
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of 4: the generator "
                             f"halves it twice and doubles it twice")
        theta = self.encoder(x)                          # θ: (B, C, S/4, S/4)
        if not self.light and theta.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"full mode reads the whole attention map, so it only runs at the size it was "
                             f"built for ({4 * self.grid} px), not {x.shape[-2]}x{x.shape[-1]}")
        a, logits, heatmap = self.attention(theta)       # a: (B, C, S/4, S/4), logits: (B, n_angles)
        style = a.mean(dim=(2, 3)) if self.light else a.flatten(1)  # (B, C) or (B, C·(S/4)²)
        style = self.mlp(style)                          # (B, C)
        gamma, beta = self.to_gamma(style), self.to_beta(style)  # (B, C) each
        h = a
        for block in self.res_blocks:
            h = block(h, gamma, beta)                    # (B, C, S/4, S/4)
        return GeneratorOutput(self.decoder(h), logits, heatmap)  # image: (B, 3, S, S)


# =================================================================================================
# 5. Discriminator (MAGAN §2.2, eq. 3; U-GAT-IT appendix Tables 5-6)
#
#   Φ(z) = Conv(a_D(z))                                  eq. (3): a patch map of real/fake logits
#
# Per domain a global discriminator (down to S/32, widths ch..32ch) and a local one (down to S/8,
# widths ch..8ch), as U-GAT-IT; each with the same multi-angle attention (p = 1). Every weight is
# spectrally normalised, which bounds D's Lipschitz constant and keeps the LSGAN game stable.
# The sigmoid σ of eq. 3 is left to the loss (LSGAN uses the raw logits, as U-GAT-IT's code).
# =================================================================================================

def global_depth(size: int) -> int:
    """Stride-2 convs of the global discriminator: 5 (to S/32) as in U-GAT-IT, but never below a
    4x4 grid, so that S = 32 and 64 still leave room for the two stride-1 4x4 convs."""
    return min(5, int(math.log2(size)) - 2)


class DiscriminatorOutput(NamedTuple):
    patch: torch.Tensor     # Φ(z): real/fake logits per patch, (B, 1, h-1, w-1)
    logits: torch.Tensor    # the attention's class logits Γ_D(z): (B, n_angles)
    heatmap: torch.Tensor   # (B, 1, h, w)


class Discriminator(nn.Module):
    """D: (B, 3, S, S) -> DiscriminatorOutput(patch logits (B, 1, h-1, w-1), class logits (B, n_angles), heatmap (B, 1, h, w)),
    with h = S / 2^n_down - 1 the attention grid."""

    def __init__(self, ch: int = 64, n_down: int = 5, size: int = 256, attention: str = "ma", p: float = 1.0):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(3, ch, 4, stride=2)), nn.LeakyReLU(0.2)]
        for i in range(1, n_down):
            layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(ch * 2**(i - 1), ch * 2**i, 4, stride=2)),
                       nn.LeakyReLU(0.2)]
        C = ch * 2**n_down
        layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(C // 2, C, 4, stride=1)), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers)
        grid = size // 2**n_down - 1
        self.attention = MultiAngleAttention(C, grid, attention, p, spectral=True, leaky=True)
        self.classifier = nn.Sequential(nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(C, 1, 4, bias=False)))

    def forward(self, x):                                # x: (B, 3, S, S)
        theta = self.encoder(x)                          # (B, C, S/2^n - 1, S/2^n - 1)
        a, logits, heatmap = self.attention(theta)
        return DiscriminatorOutput(self.classifier(a), logits, heatmap)  # Φ(z): (B, 1, S/2^n - 2, S/2^n - 2)


class MAGAN(nn.Module):
    """The six networks of one run: two generators and, per domain, a global and a local D.
    Initialisation: PyTorch's defaults (Kaiming-uniform), as U-GAT-IT's PyTorch code uses, rather
    than N(0, 0.02); spectral norm rescales every D weight anyway."""

    def __init__(self, cfg: Config):
        super().__init__()
        def G():
            return Generator(cfg.ch, cfg.n_res, cfg.size, cfg.light, cfg.attention, cfg.p_gen)
        def D(n_down):
            return Discriminator(cfg.ch, n_down, cfg.size, cfg.attention, cfg.p_dis)
        self.G_ab, self.G_ba = G(), G()
        self.D_ga, self.D_gb = D(global_depth(cfg.size)), D(global_depth(cfg.size))  # global, domains A/B
        self.D_la, self.D_lb = D(3), D(3)                                            # local, domains A/B

    def generators(self):
        return [self.G_ab, self.G_ba]

    def discriminators(self):
        return [self.D_ga, self.D_gb, self.D_la, self.D_lb]


# =================================================================================================
# 6. Losses (MAGAN §2.3, eq. 4-8; U-GAT-IT §2.2)
# =================================================================================================

def adversarial_loss(logits: torch.Tensor, is_real: bool, kind: str = "lsgan") -> torch.Tensor:
    """Eq. (4). MAGAN prints the log-likelihood (BCE) form; U-GAT-IT's code, which MAGAN builds on,
    uses least squares: E[(D(y) − 1)²] + E[D(G(x))²]. LSGAN's gradient does not vanish for fakes
    that D already rejects confidently, which keeps the generator learning: it is our default."""
    if logits.numel() == 0:  # attention "none" has no class logits
        return logits.new_zeros(())
    logits = logits.float()
    target = torch.ones_like(logits) if is_real else torch.zeros_like(logits)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def cam_loss(logits_source: torch.Tensor, logits_target: torch.Tensor) -> torch.Tensor:
    """Eq. (7), generator side, read as U-GAT-IT eq. 5: G_ab's attention classifier must say
    "source domain" (1) on the images it translates (x_a) and "not source" (0) on the target-domain
    images it only has to reproduce (x_b in the identity pass). BCE on the logits."""
    if logits_source.numel() == 0:
        return logits_source.new_zeros(())
    return (F.binary_cross_entropy_with_logits(logits_source.float(), torch.ones_like(logits_source.float()))
            + F.binary_cross_entropy_with_logits(logits_target.float(), torch.zeros_like(logits_target.float())))


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """M = F Fᵀ / (C·H·W) for features F: (B, C, H·W). Always in fp32: a bf16 Gram loses the
    small differences the style loss measures."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        B, C, H, W = features.shape
        f = features.float().reshape(B, C, H * W)              # (B, C, H·W)
        return f @ f.transpose(1, 2) / (C * H * W)             # (B, C, C)


def style_loss(features_fake: torch.Tensor, features_real: torch.Tensor) -> torch.Tensor:
    """Eq. (5): L_style = || M(φ4(G(x))) − M(φ4(y)) ||_1 with φ4 = VGG19 relu4_4 and y a real image
    of the target domain (we use the x_b of the same iteration). Mean absolute difference."""
    return F.l1_loss(gram_matrix(features_fake), gram_matrix(features_real))


def content_loss(features_reconstruction: torch.Tensor, features_input: torch.Tensor) -> torch.Tensor:
    """Eq. (6): L_rec = || φ5(G_ba(G_ab(x))) − φ5(x) ||_1 with φ5 = VGG19 relu5_4. Mean absolute difference."""
    return F.l1_loss(features_reconstruction.float(), features_input.float())


VGG19_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


def vgg19_features() -> nn.Sequential:
    """VGG19's convolutional part up to relu5_4, with torchvision's layer indices (so torchvision's
    `features.N.*` weights load into it): relu4_4 is layer 26, relu5_4 layer 35."""
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


class VGGFeatures(nn.Module):
    """Frozen VGG19 that maps images in [-1, 1] to (relu4_4, relu5_4) features. It only scores
    images: its parameters never get gradients and it always stays in eval mode."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.to_relu4_4 = features[:27]    # (B, 512, S/8, S/8)
        self.to_relu5_4 = features[27:36]  # (B, 512, S/16, S/16)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        relu4_4 = self.to_relu4_4(x)
        return relu4_4, self.to_relu5_4(relu4_4)


VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"  # torchvision's VGG19_Weights.IMAGENET1K_V1

VGG_HELP = """The style and content losses (eq. 5-6) need VGG19 ImageNet weights, and they could not be
loaded ({reason}). Fixes:
  * with internet, run once: torchvision downloads them to {cache}
    (or copy vgg19-dcbb9e9d.pth from another machine into that folder)
  * --vgg-weights PATH    a torchvision VGG19 state dict (vgg19-dcbb9e9d.pth) you copied here
  * --vgg-weights none    train without the perceptual losses (U-GAT-IT's objective)
  * --vgg-weights random  random VGG features: offline smoke runs only, NOT the paper"""


def fetch_state_dict(url: str, path: str | None = None) -> dict:
    """A state dict from a local file, or else from `url` through the torch cache (downloaded once).
    Loaded with weights_only=True: a weights file is untrusted input."""
    if path:
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)


def load_vgg(spec: str) -> VGGFeatures | None:
    """`spec`: imagenet | PATH | none | random (see the --vgg-weights help)."""
    if spec == "none":
        return None
    features = vgg19_features()
    if spec == "random":
        return VGGFeatures(features)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state = fetch_state_dict(VGG19_URL, None if spec == "imagenet" else spec)
        if any(k.startswith("features.") for k in state):  # a whole torchvision VGG19
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        features.load_state_dict(state)
    except Exception as e:
        raise MaganError(VGG_HELP.format(reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                         cache=cache)) from None
    return VGGFeatures(features)


# =================================================================================================
# 7. Training (MAGAN §3.3; U-GAT-IT appendix B.2)
#
#   L_G = λ_adv L_adv + λ_cycle L_cycle + λ_id L_identity + λ_cam L_cam + λ_style L_style + λ_content L_rec
#   L_D = λ_adv L_adv (real -> 1, fake -> 0, on patch and class logits of both Ds)   eq. (8)
#
# Why λ_cam = 1000: the attention classifiers decide *where* the generator translates, and the
# adversarial gradient that reaches the encoder is weak and noisy. U-GAT-IT weights the CAM BCE so
# heavily that the classifiers become accurate in the first few thousand iterations, so the weight
# maps (and the heatmaps) mean something early. Consequence: the generator loss starts around 1e3
# (the CAM BCE is ~1.4 per direction at initialisation). That is expected, not divergence.
# =================================================================================================

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaganError(f"--device {name}: this PyTorch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)


def make_optimizers(nets: MAGAN, cfg: Config, fast: bool):
    """Adam(lr, betas=(0.5, 0.999), weight_decay=1e-4) for the two generators and the four Ds.
    On the fast path the fused kernel updates all parameters in a few launches instead of one per tensor."""
    fused = fast
    def adam(networks):
        params = [p for net in networks for p in net.parameters()]
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=fused or None)
    return adam(nets.generators()), adam(nets.discriminators())


def place_networks(nets: MAGAN, vgg: VGGFeatures | None, device: torch.device, fast: bool):
    """Move the networks to the device. With `fast` (training uses it on CUDA; the tests also
    force it on CPU), also:
    - channels_last: cuDNN's fastest tensor-core convolutions work on NHWC; with NCHW tensors every
      convolution would pay for two layout transposes;
    - cudnn.benchmark: our input size never changes, so timing the algorithms once pays off;
    - bf16 autocast: convolutions and matmuls in bfloat16 (twice the tensor-core rate, half the
      activation memory). bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike
      fp16); norm statistics (`layer_instance_norm`, `InstanceNorm`), the Gram matrix and the
      losses stay in fp32 (see their `.float()` calls).
    Returns (nets, vgg, autocast context)."""
    nets = nets.to(device)
    vgg = vgg.to(device) if vgg is not None else None
    if not fast:
        return nets, vgg, nullcontext()
    nets = nets.to(memory_format=torch.channels_last)
    vgg = vgg.to(memory_format=torch.channels_last) if vgg is not None else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return nets, vgg, torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(x: torch.Tensor, device: torch.device, fast: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)  # non_blocking: the copy from pinned memory overlaps compute
    return x.contiguous(memory_format=torch.channels_last) if fast else x


def learning_rate(iteration: int, cfg: Config) -> float:
    """Constant for the first half, then linear decay to 0, computed from the iteration number
    (not by repeated subtraction, so a resumed run gets exactly the same value)."""
    half = cfg.iters // 2
    if iteration < half:
        return cfg.lr
    return cfg.lr * (cfg.iters - iteration) / (cfg.iters - half)


def train_step(nets: MAGAN, vgg: VGGFeatures | None, opt_G, opt_D, x_a, x_b, cfg: Config,
               autocast=nullcontext()) -> dict[str, torch.Tensor]:
    """One iteration: a discriminator step on detached fakes, a generator step, then ρ clipping.
    Returns each loss term as a 0-d tensor (no .item(): the GPU is never made to wait)."""
    B = x_a.shape[0]
    G_ab, G_ba = nets.G_ab, nets.G_ba
    with autocast:
        # Each generator sees its source image and, for the identity loss, a target-domain image
        # in one batch (instance/layer norm are per sample, so batching changes nothing).
        out_ab, cam_ab, _ = G_ab(torch.cat([x_a, x_b]))       # (2B, 3, S, S), (2B, n_angles)
        out_ba, cam_ba, _ = G_ba(torch.cat([x_b, x_a]))
    fake_ab, identity_b = out_ab[:B], out_ab[B:]
    fake_ba, identity_a = out_ba[:B], out_ba[B:]

    # --- Discriminator step. The fakes are detached: D's loss must not push gradients into G
    # (that would train G to help D), and it saves the backward pass through both generators.
    for D in nets.discriminators():
        D.requires_grad_(True)
    d_loss = torch.zeros((), device=x_a.device)
    with autocast:
        for D, real, fake in ((nets.D_ga, x_a, fake_ba), (nets.D_la, x_a, fake_ba),
                              (nets.D_gb, x_b, fake_ab), (nets.D_lb, x_b, fake_ab)):
            patch, cls, _ = D(torch.cat([real, fake.detach()]))  # one pass for real and fake
            d_loss = d_loss + (adversarial_loss(patch[:B], True, cfg.gan_loss)
                               + adversarial_loss(patch[B:], False, cfg.gan_loss)
                               + adversarial_loss(cls[:B], True, cfg.gan_loss)
                               + adversarial_loss(cls[B:], False, cfg.gan_loss))
    d_loss = cfg.w_adv * d_loss
    opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_D.step()

    # --- Generator step. D's weights are frozen (no parameter gradients to compute), but the
    # gradient still flows through D into the fakes.
    for D in nets.discriminators():
        D.requires_grad_(False)
    zero = torch.zeros((), device=x_a.device)
    terms = dict(adv=zero, cycle=zero, identity=zero, cam=zero, style=zero, content=zero)
    with autocast:
        reconstruction_a = G_ba(fake_ab)[0]                   # x_a -> b -> a
        reconstruction_b = G_ab(fake_ba)[0]
        for D, fake in ((nets.D_gb, fake_ab), (nets.D_lb, fake_ab), (nets.D_ga, fake_ba), (nets.D_la, fake_ba)):
            patch, cls, _ = D(fake)                           # eq. (4), G's side: fakes should score "real"
            terms["adv"] = terms["adv"] + adversarial_loss(patch, True, cfg.gan_loss) + adversarial_loss(cls, True, cfg.gan_loss)
        # U-GAT-IT's cycle ||G_ba(G_ab(x_a)) − x_a||_1 and identity ||G_ab(x_b) − x_b||_1 losses
        terms["cycle"] = F.l1_loss(reconstruction_a.float(), x_a) + F.l1_loss(reconstruction_b.float(), x_b)
        terms["identity"] = F.l1_loss(identity_a.float(), x_a) + F.l1_loss(identity_b.float(), x_b)
        terms["cam"] = cam_loss(cam_ab[:B], cam_ab[B:]) + cam_loss(cam_ba[:B], cam_ba[B:])  # eq. (7)
        if vgg is not None and (cfg.w_style > 0 or cfg.w_content > 0):
            # One VGG pass for the four generated images, one (without gradients) for their targets:
            # [G_ab(x_a), G_ba(G_ab(x_a)), G_ba(x_b), G_ab(G_ba(x_b))] against [x_b, x_a, x_a, x_b].
            fake4, fake5 = vgg(torch.cat([fake_ab, reconstruction_a, fake_ba, reconstruction_b]))
            with torch.no_grad():
                real4, real5 = vgg(torch.cat([x_b, x_a, x_a, x_b]))
            # eq. (5) on the translations, eq. (6) on the cycle reconstructions
            terms["style"] = (style_loss(fake4[:B], real4[:B]) + style_loss(fake4[2 * B:3 * B], real4[2 * B:3 * B]))
            terms["content"] = (content_loss(fake5[B:2 * B], real5[B:2 * B]) + content_loss(fake5[3 * B:], real5[3 * B:]))
    weights = dict(adv=cfg.w_adv, cycle=cfg.w_cycle, identity=cfg.w_identity, cam=cfg.w_cam,
                   style=cfg.w_style, content=cfg.w_content)
    g_loss = sum(weights[name] * term for name, term in terms.items() if weights[name] > 0)
    opt_G.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_G.step()
    clip_rho(G_ab)
    clip_rho(G_ba)
    return dict(D=d_loss.detach(), G=g_loss.detach(), **{k: v.detach() for k, v in terms.items()})


# --- Checkpoints --------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "magan-checkpoint-v1"
KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how Adam runs, not what it knows


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
    """Load a state saved by any run (either path, any device) into this run's optimizer: this
    run's kernel flags stay, and each moment takes its parameter's device, dtype and memory
    layout. (`load_state_dict` alone would restore the saved run's flags and layouts.)"""
    own_flags = [{flag: group[flag] for flag in KERNEL_FLAGS if flag in group} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, own_flags):
        for flag in KERNEL_FLAGS:
            group.pop(flag, None)
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key == "step":  # fused/capturable kernels keep it on the device, the others on the CPU
                    opt.state[p][key] = value.float().to(p.device if on_device else "cpu")
                elif torch.is_tensor(value) and value.shape == p.shape:
                    opt.state[p][key] = torch.empty_like(p).copy_(value)  # p's device, dtype, layout


def save_checkpoint(path: Path, nets: MAGAN, opt_G, opt_D, iteration: int, cfg: Config):
    """Write to a temporary file, flush it to disk, then rename over `path`: a crash or a full disk
    mid-write leaves the previous checkpoint intact (rename is atomic on POSIX and Windows)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "config": dataclasses.asdict(cfg),
        "nets": {name: net.state_dict() for name, net in nets.named_children()},
        "opt_G": optimizer_state(opt_G),
        "opt_D": optimizer_state(opt_D),
        "torch_rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise MaganError(f"could not write checkpoint {path} ({e}); {previous}. Free some disk space "
                         f"or choose another --out, then --resume.") from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint as untrusted input: `weights_only=True` refuses anything but tensors and
    plain containers, so a malicious file cannot run code. Any failure is a MaganError."""
    path = Path(path)
    if not path.is_file():
        raise MaganError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MaganError(f"{path} cannot be read as a MAGAN checkpoint ({reason}). It may be truncated "
                         f"(an interrupted copy?) or another kind of file.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MaganError(f"{path} is not a MAGAN checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
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
                             f"({str(e).splitlines()[0]})") from None


def check_architecture(cfg: Config, ckpt_cfg: dict):
    """--resume with a different architecture flag cannot load the weights: say which flag."""
    for name in ARCHITECTURE_FIELDS:
        if name in ckpt_cfg and getattr(cfg, name) != ckpt_cfg[name]:
            flag = "--" + name.replace("_", "-")
            raise MaganError(f"{flag} is {getattr(cfg, name)!r} but the checkpoint was trained with "
                             f"{ckpt_cfg[name]!r}: drop the flag or start a new run with another --out")


# --- Pictures -----------------------------------------------------------------------------------

def colorize(heatmap: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, h, w) attention heatmap -> (B, 3, size, size) 'jet' colours in [-1, 1], each map
    scaled to its own min..max (blue = least attended, red = most)."""
    lo = heatmap.amin(dim=(2, 3), keepdim=True)
    hi = heatmap.amax(dim=(2, 3), keepdim=True)
    t = (heatmap.float() - lo) / (hi - lo).clamp_min(1e-8)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    rgb = torch.cat([1.5 - (4 * t - c).abs() for c in (3, 2, 1)], dim=1).clamp(0, 1)  # (B, 3, S, S)
    return rgb * 2 - 1


@torch.no_grad()
def sample_grid(G_forward: Generator, G_backward: Generator, x: torch.Tensor) -> torch.Tensor:
    """Rows: one per test image. Columns: input, attention heatmap over the input, translation,
    cycle reconstruction. Under no_grad and eval(): no graph is kept, so sampling costs no memory."""
    modes = [G_forward.training, G_backward.training]
    G_forward.eval()
    G_backward.eval()
    fake, _, heatmap = G_forward(x)
    reconstruction = G_backward(fake)[0]
    overlay = 0.5 * x + 0.5 * colorize(heatmap, x.shape[-1])
    G_forward.train(modes[0])
    G_backward.train(modes[1])
    return torch.stack([x, overlay, fake.float(), reconstruction.float()], dim=1).flatten(0, 1)  # (4n, 3, S, S)


def save_image_grid(images: torch.Tensor, path: Path, ncol: int):
    """Save (N, 3, S, S) images in [-1, 1] as one PNG with `ncol` columns and 2-px gutters."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=ncol, padding=2, pad_value=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid).save(path)


# --- The loop -----------------------------------------------------------------------------------

class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current iteration and save.
    A second Ctrl-C aborts at once (the last saved checkpoint is still intact)."""

    def __enter__(self):
        self.requested = None  # the name of the first signal received
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        # No print here: a signal that lands while the loop is printing would make print re-enter
        # itself ("reentrant call") and crash. The loop announces the stop when it sees the flag.
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    d, h, m, s = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60, seconds % 60
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m{s:02d}s"


LOG_COLUMNS = ["iteration", "elapsed_s", "it_per_s", "lr", "D", "G", "adv", "cycle", "identity", "cam", "style", "content"]


def progress_line(iteration: int, iters: int, speed: float, lr: float, values: dict[str, float]) -> str:
    """[  1200/1000000]   3.10 it/s  ETA 3d17h..  lr 1.00e-04  D 1.9  G 1043 = adv 3.1  cycle 0.8  ..."""
    eta = format_seconds((iters - iteration) / max(speed, 1e-9))
    terms = "  ".join(f"{k} {values[k]:.4g}" for k in ("adv", "cycle", "identity", "cam", "style", "content"))
    return (f"[{iteration:>{len(str(iters))}}/{iters}] {speed:6.2f} it/s  ETA {eta}  lr {lr:.2e}  "
            f"D {values['D']:.4g}  G {values['G']:.4g} = {terms}")


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


def train(cfg: Config, checkpoint: dict | None = None) -> Path:
    """Train (or, with cfg.resume, continue) a run in cfg.out. Returns the run folder."""
    run = Path(cfg.out)
    latest = run / "checkpoints" / "latest.pt"
    if cfg.resume:
        checkpoint = checkpoint or load_checkpoint(latest)
        check_architecture(cfg, checkpoint["config"])
    elif latest.exists():
        raise MaganError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    if not any(w > 0 for w in (cfg.w_adv, cfg.w_cycle, cfg.w_identity, cfg.w_cam, cfg.w_style, cfg.w_content)):
        raise MaganError("every loss weight is 0: the generators would have nothing to learn")
    device = pick_device(cfg.device)
    fast = cfg.fast and device.type == "cuda"
    torch.manual_seed(cfg.seed)  # random VGG (smoke runs) and the networks' initial weights
    # Everything that can fail on the user's input fails here, before the first iteration.
    vgg = load_vgg(cfg.vgg_weights) if (cfg.w_style > 0 or cfg.w_content > 0) else None
    data = UnpairedImages(cfg.a, cfg.b, cfg.size, cfg.seed)
    samples = {"a2b": fixed_images(sample_folder(cfg.a), cfg.n_samples, cfg.size).to(device),
               "b2a": fixed_images(sample_folder(cfg.b), cfg.n_samples, cfg.size).to(device)}

    nets, vgg, autocast = place_networks(MAGAN(cfg), vgg, device, fast)
    opt_G, opt_D = make_optimizers(nets, cfg, fast)
    start = 0
    if cfg.resume:
        load_networks(dict(nets.named_children()), checkpoint)
        load_optimizer_state(opt_G, checkpoint["opt_G"])
        load_optimizer_state(opt_D, checkpoint["opt_D"])
        torch.set_rng_state(checkpoint["torch_rng"])
        start = checkpoint["iteration"]
        if start >= cfg.iters:
            raise MaganError(f"the checkpoint is already at iteration {start} and --iters is {cfg.iters}: "
                             f"pass a larger --iters to train further")
        print(f"resuming {run} from iteration {start}", flush=True)
    if cfg.compile:
        for net in list(nets.children()) + ([vgg] if vgg is not None else []):
            net.compile()  # in place: state_dict keys stay the same

    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch, sampler=range(start * cfg.batch, cfg.iters * cfg.batch),
        num_workers=cfg.workers, collate_fn=collate_pairs, pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals if cfg.workers else None, persistent_workers=False)
    log_file, log = open_log(run / "log.csv", start)

    print(f"training {cfg.iters} iterations on {device} ({'bf16 fast path' if fast else 'fp32'}); "
          f"{len(data.files[0])} + {len(data.files[1])} images; run folder {run}\n"
          f"(the G loss starts near 1e3 because the CAM term is weighted {cfg.w_cam:g})", flush=True)
    if device.type == "cpu" and cfg.size >= 128:
        print("note: on a CPU an iteration at this size takes many seconds; for a quick look try "
              "--size 64 --ch 16 --n-res 2 --iters 2000", flush=True)
    reported_bad = set()
    nonfinite = None  # per loss term: has it been non-finite since the last check?
    last_saved = start
    window_start, window_iter, t0 = time.time(), start, time.time()
    iteration = start
    try:
        with StopOnSignal() as stop:
            for iteration, (x_a, x_b, skipped) in enumerate(loader, start + 1):
                for name in set(skipped) - reported_bad:
                    print(f"skipping unreadable image {name}", flush=True)
                    reported_bad.add(name)
                x_a, x_b = to_device(x_a, device, fast), to_device(x_b, device, fast)
                lr = learning_rate(iteration - 1, cfg)
                for group in opt_G.param_groups + opt_D.param_groups:
                    group["lr"] = lr
                losses = train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast)

                # Non-finite check: accumulated on the device, read back only when we print or save
                # (on CPU reading is free, so every iteration) to keep the GPU free of sync points.
                bad = ~torch.isfinite(torch.stack(list(losses.values())))
                nonfinite = bad if nonfinite is None else nonfinite | bad
                logging = iteration % cfg.log_every == 0 or iteration == cfg.iters
                snapshot = iteration % cfg.snapshot_every == 0
                saving = iteration % cfg.save_every == 0 or iteration == cfg.iters or snapshot or stop.requested
                if device.type == "cpu" or logging or saving:
                    if nonfinite.any():
                        names = [n for n, b in zip(losses, nonfinite.tolist()) if b]
                        raise MaganError(
                            f"loss term(s) {', '.join(names)} became non-finite (NaN or inf) at iteration "
                            f"{iteration}{'' if device.type == 'cpu' else ' or shortly before'}. "
                            f"{latest} still holds the last good state (iteration {last_saved}). "
                            f"Try a lower --lr, --no-fast, or a smaller weight for that term, then --resume.")
                if logging:
                    now = time.time()
                    speed = (iteration - window_iter) / max(now - window_start, 1e-9)
                    window_start, window_iter = now, iteration
                    values = {k: v.item() for k, v in losses.items()}  # the only GPU sync
                    print(progress_line(iteration, cfg.iters, speed, lr, values), flush=True)
                    log.writerow([iteration, round(now - t0, 2), round(speed, 4), lr] + [values[k] for k in LOG_COLUMNS[4:]])
                    log_file.flush()
                if iteration % cfg.sample_every == 0 or iteration == cfg.iters:
                    for direction, (G_fwd, G_bwd) in (("a2b", (nets.G_ab, nets.G_ba)), ("b2a", (nets.G_ba, nets.G_ab))):
                        grid = sample_grid(G_fwd, G_bwd, samples[direction])
                        save_image_grid(grid, run / "samples" / f"{direction}_{iteration:07d}.png", ncol=4)
                if saving or stop.requested:  # a signal may have come while sampling or logging
                    if stop.requested:
                        print(f"\n{stop.requested} received: saving iteration {iteration} "
                              f"(press Ctrl-C again to abort without saving)", flush=True)
                    save_checkpoint(latest, nets, opt_G, opt_D, iteration, cfg)
                    last_saved = iteration
                    if snapshot:
                        save_checkpoint(run / "checkpoints" / f"iter_{iteration:07d}.pt", nets, opt_G, opt_D, iteration, cfg)
                if stop.requested:
                    print(f"stopped at iteration {iteration}; saved {latest}.\n"
                          f"continue with: python magan.py train --out {run} --resume", flush=True)
                    return run
    finally:
        log_file.close()
    print(f"done: {iteration} iterations; checkpoint {latest}", flush=True)
    return run


# =================================================================================================
# 8. Translation: apply one trained generator to a folder (or one image)
# =================================================================================================

def load_generator(ckpt_path: str | Path, direction: str, device: torch.device) -> tuple[Generator, Config]:
    """The generator of `direction` (a2b or b2a) from a training checkpoint, in eval mode."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(ckpt)
    name = {"a2b": "G_ab", "b2a": "G_ba"}[direction]
    G = Generator(cfg.ch, cfg.n_res, cfg.size, cfg.light, cfg.attention, cfg.p_gen)
    load_networks({name: G}, ckpt)
    return G.to(device).eval(), cfg


def input_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return list_images(path)


@torch.no_grad()
def translate(ckpt: str | Path, input_path: str | Path, out: str | Path, direction: str = "a2b",
              heatmaps: bool = False, batch: int = 8, device: str = "auto", size: int | None = None) -> list[Path]:
    """Translate every image under `input_path` and write each under its own file name in `out`
    (what a KID tool expects); with `heatmaps`, the attention heatmap goes to out/heatmaps/.
    Inputs of any size and mode are converted to RGB and resized to the training size S: the
    generator runs where it was trained. Returns the written paths."""
    device = pick_device(device)
    G, cfg = load_generator(ckpt, direction, device)
    size = size or cfg.size
    if size % 32:
        raise MaganError(f"--size {size} is not a multiple of 32")
    if size != cfg.size and not cfg.light:
        raise MaganError(f"this checkpoint is a full-mode model: it only translates at its training size "
                         f"{cfg.size} (its MLP reads the whole {cfg.size // 4}x{cfg.size // 4} attention map)")
    files = input_files(input_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, start = [], time.time()
    for first in range(0, len(files), batch):
        names, images = [], []
        for path in files[first:first + batch]:
            try:
                im = load_rgb(path, size).resize((size, size), Image.Resampling.BILINEAR)
            except Exception as e:
                print(f"skipping unreadable image {path} ({type(e).__name__})", flush=True)
                continue
            names.append(path.name)
            images.append(to_tensor(im))
        if not images:
            continue
        fake, _, heatmap = G(torch.stack(images).to(device))  # (n, 3, S, S), _, (n, 1, S/4, S/4)
        colours = colorize(heatmap, size)                      # (n, 3, S, S)
        for name, image, colour in zip(names, fake, colours):
            to_pil(image).save(out / name, quality=95)         # quality: only read for JPEG
            written.append(out / name)
            if heatmaps:
                (out / "heatmaps").mkdir(exist_ok=True)
                to_pil(colour).save(out / "heatmaps" / (Path(name).stem + ".png"))
        done = min(first + batch, len(files))
        print(f"translated {done}/{len(files)} images ({done / max(time.time() - start, 1e-9):.1f} img/s)", flush=True)
    return written


# =================================================================================================
# 9. KID: kernel inception distance (MAGAN §3.5.1, U-GAT-IT §3.3.4)
#
#   KID = MMD²(real, fake) with the kernel k(x, y) = (xᵀy / d + 1)³ on d = 2048 Inception features.
#   Unbiased estimate for sets X (m rows) and Y (n rows):
#     MMD² = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)
#
# Unlike FID it is unbiased, so small test sets (100 images) give comparable numbers. Two ways to
# average it are in use, and their numbers differ:
#   blocks  (TF-GAN, the papers' tables): disjoint blocks of at most 10 images; mean ± standard error
#   subsets (torch-fidelity, torchmetrics): 100 random subsets of 1000; mean ± population std
# =================================================================================================

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


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, protocol: str = "blocks", block_size: int = 10,
                      subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets (N, d), in raw units: (mean, std). Computed in float64.

    blocks:  TF-GAN's estimator. n_blocks = ceil(max(n_real, n_fake) / block_size); both sets are
             cut, in the order given, into n_blocks consecutive blocks; std = sqrt(var_unbiased / n_blocks),
             the standard error of the mean. `seed` is not used (shuffle the rows beforehand if needed).
    subsets: torch-fidelity's estimator. `subsets` times, draw `subset_size` rows of each set without
             replacement (torch.Generator seeded with `seed`); std = population std over the subsets."""
    real, fake = real.double(), fake.double()
    n_real, n_fake = len(real), len(fake)
    if min(n_real, n_fake) < 2:
        raise ValueError(f"KID needs at least 2 images in each set; got {n_real} real and {n_fake} fake")
    if protocol == "blocks":
        n_blocks = math.ceil(max(n_real, n_fake) / block_size)
        if min(n_real, n_fake) < 2 * n_blocks:
            raise ValueError(f"blocks of {n_real}/{n_blocks} real and {n_fake}/{n_blocks} fake rows: "
                             f"every block needs at least 2 rows of each set")
        values = torch.stack([mmd2_unbiased(r, f) for r, f in zip(real.split(block_sizes(n_real, n_blocks)),
                                                                   fake.split(block_sizes(n_fake, n_blocks)))])
        std = (values.var(correction=1) / n_blocks).sqrt() if n_blocks > 1 else torch.tensor(float("nan"))
        return values.mean().item(), std.item()
    if protocol == "subsets":
        if not 2 <= subset_size < min(n_real, n_fake):
            raise ValueError(
                f"subset size {subset_size} must be at least 2 and smaller than the smaller set "
                f"({min(n_real, n_fake)} images): subsets as large as the set are all the whole set, and "
                f"their spread (the ±) would be 0. Pass a smaller --subset-size, or use --protocol blocks "
                f"(the papers' estimator, made for test sets of ~100 images)")
        g = torch.Generator().manual_seed(seed)
        values = torch.stack([mmd2_unbiased(real[torch.randperm(n_real, generator=g)[:subset_size]],
                                            fake[torch.randperm(n_fake, generator=g)[:subset_size]])
                              for _ in range(subsets)])
        return values.mean().item(), values.std(correction=0).item()
    raise ValueError(f"unknown KID protocol {protocol!r}: use blocks or subsets")


# --- The FID Inception: TF's 2015-12-05 Inception graph, as ported by pytorch-fid ------------------
# torchvision's Inception-v3 classes with 1008 outputs, except that the average-pooling branch of
# the Mixed blocks ignores padding, and Mixed_7c pools with a 3x3 max-pool. The features are the
# 2048-d global average pool. Only these features give numbers comparable with the papers' tables.

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
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
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


FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")

INCEPTION_HELP = """KID needs the FID Inception weights, and they could not be loaded ({reason}). Fixes:
  * with internet, run once: they are downloaded to {cache}
    (or copy pt_inception-2015-12-05-6726825d.pth from another machine into that folder)
  * --inception-weights PATH   pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) copied here
  * --inception imagenet       torchvision's ImageNet Inception (numbers NOT comparable with the papers')"""


def load_inception(kind: str = "fid", weights: str | None = None) -> InceptionFeatures:
    """kind: fid (the papers' features) or imagenet (torchvision's weights, not comparable)."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if kind == "imagenet":
        print("warning: torchvision's ImageNet Inception gives KID values that are NOT comparable "
              "with the papers' tables (they used the FID Inception)", flush=True)
        net, url = inception_v3(weights=None, aux_logits=True, init_weights=False), Inception_V3_Weights.IMAGENET1K_V1.url
    else:
        net, url = fid_inception_v3(), FID_INCEPTION_URL
    try:
        net.load_state_dict(fetch_state_dict(url, weights))
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise MaganError(INCEPTION_HELP.format(reason=reason, cache=cache)) from None
    return InceptionFeatures(net)


@torch.no_grad()
def inception_features(files: list[Path], net: InceptionFeatures, device: torch.device, batch: int = 50) -> torch.Tensor:
    """(N, 2048) features of image files, batched; unreadable files are reported and skipped."""
    net = net.to(device)
    features = []
    for first in range(0, len(files), batch):
        images = []
        for path in files[first:first + batch]:
            try:
                x = to_tensor(load_rgb(path)).add(1).div(2)      # (3, H, W) in [0, 1]
            except Exception as e:
                print(f"skipping unreadable image {path} ({type(e).__name__})", flush=True)
                continue
            images.append(F.interpolate(x[None], size=(299, 299), mode="bilinear", align_corners=False)[0])
        if images:
            features.append(net(torch.stack(images).to(device)).double().cpu())
    if not features:
        raise MaganError(f"no image in {files[0].parent if files else 'the folder'} could be decoded")
    return torch.cat(features)


def kid_between_folders(real: str | Path, fake: str | Path, protocol: str = "blocks", block_size: int = 10,
                        subsets: int = 100, subset_size: int = 1000, seed: int = 0, inception: str = "fid",
                        inception_weights: str | None = None, device: str = "auto", batch: int = 50) -> tuple[float, float]:
    """KID×1 between two image folders, printed ×100 as the papers do. The file lists are shuffled
    with `seed` first, so the blocks do not follow a sorted listing. Returns (mean, std)."""
    dev = pick_device(device)
    lists = []
    for folder in (real, fake):
        files = list_images(folder)
        lists.append([files[i] for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))])
    smaller = min(len(files) for files in lists)
    if protocol == "subsets" and subset_size >= smaller:
        raise MaganError(f"--subset-size {subset_size} is not smaller than the smaller folder ({smaller} images): "
                         f"every subset would be the whole set and the ± would be 0. Pass --subset-size "
                         f"{max(2, smaller // 2)}, or use --protocol blocks (the papers' estimator)")
    net = load_inception(inception, inception_weights)
    real_features, fake_features = (inception_features(files, net, dev, batch) for files in lists)
    try:
        mean, std = kid_from_features(real_features, fake_features, protocol, block_size, subsets, subset_size, seed)
    except ValueError as e:
        raise MaganError(str(e)) from None
    detail = (f"blocks of at most {block_size}" if protocol == "blocks" else f"{subsets} subsets of {subset_size}")
    print(f"KID×100 = {100 * mean:.2f} ± {100 * std:.2f}   ({protocol}: {detail}; {len(real_features)} real, "
          f"{len(fake_features)} fake images; {inception} Inception)", flush=True)
    return mean, std


# =================================================================================================
# Benchmark: how fast is one full training iteration (D step + G step, every loss, VGG included)?
# =================================================================================================

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


def bench(cfg: Config, iters: int = 20, warmup: int = 5) -> list[dict]:
    """Time `iters` training iterations after `warmup` ones, for the plain fp32 path and (on CUDA)
    the fast path, plus the fast path under torch.compile with cfg.compile. Random images stand in
    for data (the loader runs in worker processes, in parallel with the GPU) and a random VGG19 for
    the ImageNet one (the same computation). Prints a table and returns its rows."""
    device = pick_device(cfg.device)
    host_baseline = peak_memory_gib(device) if device.type == "cpu" else 0.0
    modes = ["fp32"] + (["fast"] if device.type == "cuda" else [])
    if cfg.compile:
        modes.append(modes[-1] + "+compile")
    model = MAGAN(cfg)  # only counted here, and freed before the timed runs build their own
    print(f"MAGAN at {cfg.size}px, {'light' if cfg.light else 'full'}, ch {cfg.ch}, n_res {cfg.n_res}, "
          f"attention {cfg.attention}, batch {cfg.batch} on {device}"
          + (f" ({torch.cuda.get_device_name(device)}, torch {torch.__version__})" if device.type == "cuda" else
             f" (torch {torch.__version__}, {torch.get_num_threads()} threads)"))
    print(f"parameters: generator {count_parameters(model.G_ab) / 1e6:.2f}M (x2), global D "
          f"{count_parameters(model.D_ga) / 1e6:.2f}M (x2), local D {count_parameters(model.D_la) / 1e6:.2f}M (x2), "
          f"total {count_parameters(model) / 1e6:.2f}M; VGG19 to relu5_4 {count_parameters(vgg19_features()) / 1e6:.2f}M (frozen)")
    del model
    rows = []
    for mode in modes:
        fast = mode.startswith("fast")
        run_cfg = dataclasses.replace(cfg, fast=fast)
        torch.manual_seed(cfg.seed)
        vgg = VGGFeatures(vgg19_features()) if (cfg.w_style > 0 or cfg.w_content > 0) else None
        nets, vgg, autocast = place_networks(MAGAN(cfg), vgg, device, fast)
        opt_G, opt_D = make_optimizers(nets, run_cfg, fast)
        if mode.endswith("+compile"):
            for net in list(nets.children()) + ([vgg] if vgg is not None else []):
                net.compile()
        x_a = to_device(torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1, device, fast)
        x_b = to_device(torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1, device, fast)
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(warmup):  # cuDNN autotuning, compilation, allocator warm-up
            train_step(nets, vgg, opt_G, opt_D, x_a, x_b, run_cfg, autocast)
        synchronize()
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(iters):
            train_step(nets, vgg, opt_G, opt_D, x_a, x_b, run_cfg, autocast)
        synchronize()
        seconds = (time.perf_counter() - start) / iters
        peak = peak_memory_gib(device) - host_baseline
        rows.append(dict(mode=mode, it_per_s=1 / seconds, ms_per_iter=1000 * seconds, peak_gib=peak, warmup_s=warmup_s))
        del nets, vgg, opt_G, opt_D
    print(f"\n{'path':<18}{'it/s':>8}{'ms/iter':>10}{'peak GiB':>14}{'warm-up s':>11}{'1M iterations':>16}{'speed-up':>10}")
    for row in rows:
        print(f"{row['mode']:<18}{row['it_per_s']:>8.2f}{row['ms_per_iter']:>10.1f}{row['peak_gib']:>14.2f}"
              f"{row['warmup_s']:>11.1f}{format_seconds(1e6 / row['it_per_s']):>16}"
              f"{rows[0]['ms_per_iter'] / row['ms_per_iter']:>9.2f}x")
    if device.type != "cuda":
        print("(the fast path is CUDA-only: on CPU training always runs the fp32 path. Peak GiB on CPU is\n"
              " the growth of the process's peak resident memory since the start of the bench, cumulative\n"
              " over rows: a rough upper bound on what the fp32 path would need on a GPU)")
    return rows


# =================================================================================================
# 10. Command line: `python magan.py train|translate|kid|bench`; train's flags come from Config.
# =================================================================================================

def image_size(text: str) -> int:
    value = int(text)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(
            f"{value} is not a multiple of 32 (at least 32): the generator halves the image twice and "
            f"the global discriminator up to five times")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def weight(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 switches the term off)")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def sam_exponent(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(
            f"{text}: the SAM exponent p must be at least 1 (|θ|^p with p < 1 has an infinite gradient "
            f"where θ = 0, and ReLU features are exactly 0 often)")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def device_name(text: str) -> str:
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")


VALIDATORS = dict(image_size=image_size, positive_int=positive_int, nonneg_int=nonneg_int, weight=weight,
                  positive_float=positive_float, fraction=fraction, device_name=device_name,
                  sam_exponent=sam_exponent)


def add_config_flags(parser: argparse.ArgumentParser, defaults: Config):
    """One flag per Config field. Unset flags are left out of the parsed namespace (SUPPRESS), so
    --resume can tell what the user asked for from what the checkpoint already says."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = f.metadata.get("type", type(f.default))
            parser.add_argument(flag, type=VALIDATORS.get(kind, kind), choices=f.metadata.get("choices"),
                                default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--full", dest="light", action="store_false", default=argparse.SUPPRESS,
                        help="full mode, the paper's setting (same as --no-light)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magan.py", description="MAGAN: unsupervised image-to-image translation with multi-angle attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_parser = commands.add_parser("train", help="train a model (on data/ when no folder is given)")
    add_config_flags(train_parser, Config())

    t = commands.add_parser("translate", help="translate images with a trained checkpoint",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--ckpt", required=True, help="a training checkpoint, e.g. runs/NAME/checkpoints/latest.pt")
    t.add_argument("--input", required=True, help="an image or a folder of images (any size or mode)")
    t.add_argument("--out", required=True, help="output folder: one image per input, same file name")
    t.add_argument("--direction", choices=("a2b", "b2a"), default="a2b")
    t.add_argument("--heatmaps", action="store_true", help="also write the attention heatmaps to OUT/heatmaps/")
    t.add_argument("--batch", type=positive_int, default=8, help="images per forward pass")
    t.add_argument("--device", type=device_name, default="auto")
    t.add_argument("--size", type=image_size, help="run the generator at this size (default: the training "
                                                   "size; light mode only)")
    t.add_argument("--kid-against", metavar="DIR", help="then score the translations against the real "
                                                        "target-domain images in DIR (e.g. testB)")
    add_kid_flags(t)

    k = commands.add_parser("kid", help="kernel inception distance between two image folders",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--real", required=True, help="folder of real target-domain images")
    k.add_argument("--fake", required=True, help="folder of translated images")
    k.add_argument("--device", type=device_name, default="auto")
    add_kid_flags(k)

    b = commands.add_parser("bench", help="time full training iterations: fp32 and fast path, peak memory",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--size", type=image_size, default=256)
    b.add_argument("--light", action=argparse.BooleanOptionalAction, default=True, help="light or --no-light")
    b.add_argument("--full", dest="light", action="store_false", help="full mode (the paper's setting)")
    b.add_argument("--ch", type=positive_int, default=64)
    b.add_argument("--n-res", type=positive_int, default=4)
    b.add_argument("--attention", choices=("ma", "cam", "sam", "none"), default="ma")
    b.add_argument("--batch", type=positive_int, default=1)
    b.add_argument("--device", type=device_name, default="auto")
    b.add_argument("--iters", type=positive_int, default=20, help="timed iterations")
    b.add_argument("--warmup", type=positive_int, default=5, help="untimed iterations first")
    b.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    return parser


def add_kid_flags(parser: argparse.ArgumentParser):
    parser.add_argument("--protocol", choices=("blocks", "subsets"), default="blocks",
                        help="blocks: TF-GAN's estimator, the papers' numbers; subsets: torch-fidelity/torchmetrics'")
    parser.add_argument("--block-size", type=positive_int, default=10, help="largest block (blocks protocol)")
    parser.add_argument("--subsets", type=positive_int, default=100, help="number of subsets (subsets protocol)")
    parser.add_argument("--subset-size", type=positive_int, default=1000, help="subset size (subsets protocol)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the file lists and draws the subsets")
    parser.add_argument("--inception", choices=("fid", "imagenet"), default="fid",
                        help="fid: the papers' features; imagenet: torchvision's, not comparable")
    parser.add_argument("--inception-weights", metavar="PATH", help="a local copy of the Inception weights")
    parser.add_argument("--kid-batch", type=positive_int, default=50, help="images per Inception pass")


def kid_args(args: argparse.Namespace) -> dict:
    return dict(protocol=args.protocol, block_size=args.block_size, subsets=args.subsets,
                subset_size=args.subset_size, seed=args.seed, inception=args.inception,
                inception_weights=args.inception_weights, device=args.device, batch=args.kid_batch)


def given_flags(args: argparse.Namespace) -> dict:
    """The Config fields set on the command line (unset flags are absent, see add_config_flags)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            given = given_flags(args)
            cfg, checkpoint = Config(**given), None
            if cfg.resume:  # flags not given on the command line come from the checkpoint
                checkpoint = load_checkpoint(Path(cfg.out) / "checkpoints" / "latest.pt")
                cfg = config_from_checkpoint(checkpoint, **given)
            train(cfg, checkpoint)
        elif args.command == "translate":
            translate(args.ckpt, args.input, args.out, args.direction, args.heatmaps, args.batch, args.device,
                      args.size)
            if args.kid_against:
                kid_between_folders(args.kid_against, args.out, **kid_args(args))
        elif args.command == "bench":
            cfg = Config(size=args.size, light=args.light, ch=args.ch, n_res=args.n_res, attention=args.attention,
                         batch=args.batch, device=args.device, compile=args.compile)
            bench(cfg, args.iters, args.warmup)
        elif args.command == "kid":
            kid_between_folders(args.real, args.fake, **kid_args(args))
    except MaganError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
