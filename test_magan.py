"""Tests for magan.py, its executable specification. Run: python -m pytest -q test_magan.py

The sections follow magan.py, which follows the papers: normalisation, attention, generator,
discriminator, losses, one training step, the loop and what it calls, several processes,
translation, KID, the command line; then robustness and CUDA (skipped without a GPU). Each test
checks a property the papers fix against an independent computation (a naive loop, a closed form,
numbers worked by hand, a PIL or torch.nn.functional reference), never against a second call of
the same code. Everything runs on the CPU at 32-64 px with narrow networks and a randomly
initialised VGG: no download, no GPU."""

import copy
import csv
import dataclasses
import doctest
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.utils import parametrize

import magan
from magan import (LIN, MAGAN, AdaLIN, Config, Discriminator, Generator, MaganError,
                   MultiAngleAttention, adversarial_loss, cam_loss, content_loss, gram_matrix,
                   style_loss)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
VGG19 = torchvision.models.vgg19()  # built once: torchvision's VGG19 takes seconds to initialise

@pytest.fixture(autouse=True)
def random_vgg_built_once(monkeypatch):
    """magan builds a random VGG19 with torchvision's vgg19(); each test gets a copy of one."""
    monkeypatch.setattr(magan, "vgg19", lambda weights=None: copy.deepcopy(VGG19) if weights is None
                        else torchvision.models.vgg19(weights=weights))

def tiny_config(tmp_path, **overrides) -> Config:
    """A config that trains in a fraction of a second per iteration on the CPU."""
    base = dict(a=str(DATA / "trainA"), b=str(DATA / "trainB"), out=str(tmp_path / "run"),
                size=32, ch=8, n_res=1, iters=4, vgg_weights="random", device="cpu", workers=0,
                log_every=2, sample_every=2, save_every=2)
    return Config(**{**base, **overrides})

def step_objects(cfg: Config, seed: int = 0, fast: bool = False):
    """The networks, VGG, optimizers and autocast of one step, on the CPU; `fast`: channels_last and
    bf16 autocast, even where the CPU would emulate bf16."""
    torch.manual_seed(seed)
    nets, vgg = MAGAN(cfg), magan.load_vgg("random")
    if fast:
        layout = torch.channels_last
        nets, vgg = nets.to(memory_format=layout), vgg.to(memory_format=layout)
    opt_G, opt_D = magan.make_optimizers(nets, cfg)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast)
    return nets, vgg, opt_G, opt_D, autocast

def random_images(n, size, seed):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

def run_magan(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """`python magan.py ARGS` in a fresh process, in the project folder."""
    return subprocess.run([sys.executable, str(HERE / "magan.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, timeout=timeout, **kwargs)

def checkpoint_of(run: Path) -> dict:
    return magan.load_checkpoint(run / "checkpoints" / "latest.pt")

# --- naive references, written from the papers' formulas --------------------------------------

def naive_instance_layer_mix(x, rho, eps=1e-5):
    """ρ·â_I + (1−ρ)·â_L (U-GAT-IT eq. 1) one sample and channel at a time, biased variances."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        mu_l = x[b].mean()
        var_l = ((x[b] - mu_l) ** 2).mean()
        for c in range(x.shape[1]):
            mu_i = x[b, c].mean()
            var_i = ((x[b, c] - mu_i) ** 2).mean()
            a_i = (x[b, c] - mu_i) / torch.sqrt(var_i + eps)
            a_l = (x[b, c] - mu_l) / torch.sqrt(var_l + eps)
            out[b, c] = rho[c] * a_i + (1 - rho[c]) * a_l
    return out

def spectral_normalised(linear):
    """W / σ with σ = uᵀWv from the layer's current power-iteration vectors (what a forward in
    training mode used, after its one power iteration)."""
    p = linear.parametrizations.weight
    W = p.original.detach()
    sigma = torch.dot(p[0]._u, W @ p[0]._v)
    return W / sigma

def naive_attention(theta, w_gap, w_gmp, w_sam, p, conv1x1, slope):
    """MAGAN eq. 1-2 by loops: logits (ξ_gap, ξ_gmp, ξ_sam) and the features
    a = act(Conv1x1([ω_β θ, ω_α θ, ω_γ θ])).
    γ = Σ_n |θ_n|^p, scaled to unit root-mean-square over the h·w positions."""
    B, C, h, w = theta.shape
    logits = []
    for b in range(B):
        xi_gap = sum(w_gap[n].item() * theta[b, n].mean().item() for n in range(C))
        xi_gmp = sum(w_gmp[n].item() * theta[b, n].max().item() for n in range(C))
        gamma = [[sum(abs(theta[b, n, i, j].item()) ** p for n in range(C)) for j in range(w)]
                 for i in range(h)]
        rms = math.sqrt(sum(g * g for row in gamma for g in row) / (h * w))
        xi_sam = sum(w_sam[i * w + j].item() * gamma[i][j] / rms
                     for i in range(h) for j in range(w))
        logits.append([xi_gap, xi_gmp, xi_sam])
    a_sam = torch.empty_like(theta)
    for i in range(h):
        for j in range(w):
            a_sam[:, :, i, j] = theta[:, :, i, j] * w_sam[i * w + j]
    stacked = torch.cat([theta * w_gap.view(1, C, 1, 1), theta * w_gmp.view(1, C, 1, 1), a_sam], 1)
    a = F.leaky_relu(F.conv2d(stacked, conv1x1.weight, conv1x1.bias), slope)
    return torch.tensor(logits), a

def layer_table(module):
    """The layers of `module` in registration order, one tuple each: type, shape and options.
    Convolutions and linear layers say whether they are spectrally normalised."""
    rows = []
    for m in module.modules():
        sn = parametrize.is_parametrized(m, "weight")
        if isinstance(m, nn.ReflectionPad2d):
            rows.append(("reflect-pad", m.padding[0]))
        elif isinstance(m, nn.Conv2d):
            rows.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                         m.padding[0], m.bias is not None, "SN" if sn else ""))
        elif isinstance(m, nn.Linear):
            rows.append(("linear", m.in_features, m.out_features, m.bias is not None,
                         "SN" if sn else ""))
        elif isinstance(m, nn.InstanceNorm2d):
            rows.append(("instance-norm", m.affine))
        elif isinstance(m, (AdaLIN, LIN)):
            rows.append((type(m).__name__,))
        elif isinstance(m, nn.LeakyReLU):
            rows.append(("leaky-relu", m.negative_slope))
        elif isinstance(m, (nn.ReLU, nn.Tanh)):
            rows.append((type(m).__name__.lower(),))
        elif isinstance(m, nn.Upsample):
            rows.append(("upsample", m.scale_factor, m.mode))
    return rows


# =================================================================================================
# Normalisation: AdaLIN and LIN (U-GAT-IT §2.1.1, eq. 1)
# =================================================================================================

def test_adalin_at_interior_per_channel_rho_against_naive_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 6) * 3 + 1
    gamma, beta = torch.randn(2, 5), torch.randn(2, 5)
    norm = AdaLIN(5)
    rho = torch.tensor([0.1, 0.35, 0.5, 0.8, 0.97])
    with torch.no_grad():
        norm.rho.copy_(rho.view(1, 5, 1, 1))
    expected = naive_instance_layer_mix(x, rho) * gamma[:, :, None, None] + beta[:, :, None, None]
    assert torch.allclose(norm(x, gamma, beta), expected, atol=1e-5)

def test_lin_at_interior_rho_with_its_own_gamma_and_beta():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 5) - 2
    lin = LIN(4)
    rho, g, b = torch.tensor([0.05, 0.4, 0.6, 0.9]), torch.randn(4), torch.randn(4)
    with torch.no_grad():
        lin.rho.copy_(rho.view(1, 4, 1, 1))
        lin.gamma.copy_(g.view(lin.gamma.shape))
        lin.beta.copy_(b.view(lin.beta.shape))
    expected = naive_instance_layer_mix(x, rho) * g.view(1, 4, 1, 1) + b.view(1, 4, 1, 1)
    assert torch.allclose(lin(x), expected, atol=1e-5)

def test_rho_starts_at_one_in_adalin_and_zero_in_lin():
    # U-GAT-IT §2.1.1: ρ is 1 in the decoder's residual blocks and 0 in its up-sampling blocks.
    G = Generator(ch=4, n_res=2, size=32)
    adalins = [m for m in G.modules() if type(m) is AdaLIN]
    lins = [m for m in G.modules() if type(m) is LIN]
    assert len(adalins) == 4 and len(lins) == 2  # two per residual block; one per up-sampling block
    assert all(torch.all(m.rho == 1) for m in adalins)
    assert all(torch.all(m.rho == 0) and torch.all(m.gamma == 1) and torch.all(m.beta == 0)
               for m in lins)

def test_norm_statistics_stay_fp32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(6, 3, 3, 3))
        assert h.dtype == torch.bfloat16
        assert AdaLIN(6)(h, torch.ones(1, 6), torch.zeros(1, 6)).dtype == torch.float32
        assert LIN(6)(h).dtype == torch.float32
        assert magan.InstanceNorm(6)(h).dtype == torch.float32


# =================================================================================================
# Multi-angle attention (MAGAN §2.1, eq. 1-2)
# =================================================================================================

@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_logits_and_maps_against_naive_loop(p):
    torch.manual_seed(0)
    module = MultiAngleAttention(5, 4, "ma", p=p)
    theta = torch.randn(2, 5, 4, 4)
    a, logits, heatmap = module(theta)
    w = {name: module.fc[name].weight[0].detach() for name in ("gap", "gmp", "sam")}
    expected_logits, expected_a = naive_attention(theta, w["gap"], w["gmp"], w["sam"], p,
                                                  module.conv1x1, 0.0)
    assert torch.allclose(logits, expected_logits.float(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(a, expected_a, atol=1e-6)
    assert torch.allclose(heatmap, expected_a.sum(1, keepdim=True), atol=1e-5)

def test_discriminator_attention_in_training_mode_uses_the_normalised_weight():
    """Under spectral norm each read of `fc.weight` runs a power iteration: the logit and the
    feature map must both use the normalised weight of this forward, W / (uᵀWv)."""
    torch.manual_seed(0)
    D = Discriminator(ch=2, n_down=3, size=64, p=1.0)  # grid 7, C = 16
    att = D.attention.train()
    theta = torch.randn(2, 16, 7, 7)
    a, logits, _ = att(theta)
    w = {name: spectral_normalised(att.fc[name])[0] for name in ("gap", "gmp", "sam")}
    for name in w:  # not the raw parameter: the mistake U-GAT-IT's code makes
        raw = att.fc[name].parametrizations.weight.original[0]
        assert not torch.allclose(w[name], raw, atol=1e-3)
    expected_logits, expected_a = naive_attention(theta, w["gap"], w["gmp"], w["sam"], 1.0,
                                                  att.conv1x1, 0.2)
    assert torch.allclose(logits, expected_logits.float(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(a, expected_a, atol=1e-5)

@pytest.mark.parametrize("angles,n_logits", [("ma", 3), ("cam", 2), ("sam", 1), ("none", 0)])
def test_attention_ablations(angles, n_logits):
    torch.manual_seed(0)
    module = MultiAngleAttention(6, 4, angles, p=2.0)
    theta = torch.randn(3, 6, 4, 4)
    a, logits, _ = module(theta)
    assert logits.shape == (3, n_logits) and a.shape == (3, 6, 4, 4)
    assert list(module.fc) == {"ma": ["gap", "gmp", "sam"], "cam": ["gap", "gmp"], "sam": ["sam"],
                               "none": []}[angles]
    if angles == "none":  # θ goes straight to the 1x1 conv
        assert torch.allclose(a, F.relu(module.conv1x1(theta)))

def test_p_is_set_per_network():
    nets = MAGAN(Config(size=32, ch=4, n_res=1, p_gen=3.0, p_dis=1.5))
    assert [G.attention.p for G in nets.generators] == [3.0, 3.0]
    assert [D.attention.p for D in nets.discriminators] == [1.5] * 4
    with pytest.raises(ValueError, match="< 1"):
        MultiAngleAttention(4, 4, p=0.5)

def test_sam_map_is_resized_in_eval_mode_only():
    torch.manual_seed(0)
    module = MultiAngleAttention(4, 8, "sam").eval()
    a, logits, _ = module(torch.randn(1, 4, 16, 16))  # translating at twice the training size
    assert a.shape == (1, 4, 16, 16) and logits.shape == (1, 1)
    weight = module.fc["sam"].weight.detach().view(1, 1, 8, 8)
    expected = F.interpolate(weight, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(module.sam_weight_map(16, 16), expected.view(16, 16))
    with pytest.raises(ValueError, match="8x8 grid got 16x16 in training"):
        module.train()(torch.randn(1, 4, 16, 16))  # training a resized copy would be silent damage

def test_sam_map_resize_values_by_hand_and_the_forward_that_uses_them():
    """A 2x2 SAM weight map [[0, 1], [2, 3]] on a 4x4 grid, bilinear with half-pixel centres
    (each output pixel reads the input at (i + 0.5)/2 − 0.5, clamped to the edge), worked by hand;
    then the attention's logit and maps at that size against the naive loop with that map."""
    torch.manual_seed(0)
    module = MultiAngleAttention(3, 2, "ma").eval()
    with torch.no_grad():
        module.fc["sam"].weight.copy_(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    by_hand = torch.tensor([[0.0, 0.25, 0.75, 1.0],
                            [0.5, 0.75, 1.25, 1.5],
                            [1.5, 1.75, 2.25, 2.5],
                            [2.0, 2.25, 2.75, 3.0]])
    assert torch.allclose(module.sam_weight_map(4, 4), by_hand)
    theta = torch.randn(2, 3, 4, 4)
    a, logits, _ = module(theta)
    w = {name: module.fc[name].weight[0].detach() for name in ("gap", "gmp")}
    expected_logits, expected_a = naive_attention(theta, w["gap"], w["gmp"], by_hand.flatten(), 2.0,
                                                  module.conv1x1, 0.0)
    assert torch.allclose(logits, expected_logits.float(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(a, expected_a, atol=1e-6)


# =================================================================================================
# Generator (MAGAN §2.1; U-GAT-IT appendix Table 4)
# =================================================================================================

def expected_generator_tables(ch, n_res, grid, light):
    C, IN = 4 * ch, ("instance-norm", False)
    conv = lambda c_in, c_out, k, stride=1: ("conv", c_in, c_out, k, stride, 0, False, "")
    pad = lambda n: ("reflect-pad", n)
    encoder = [pad(3), conv(3, ch, 7), IN, ("relu",), pad(1), conv(ch, 2 * ch, 3, 2), IN, ("relu",),
               pad(1), conv(2 * ch, C, 3, 2), IN, ("relu",)]
    encoder += [pad(1), conv(C, C, 3), IN, ("relu",), pad(1), conv(C, C, 3), IN] * n_res
    mlp = [("linear", C if light else C * grid * grid, C, False, ""), ("relu",),
           ("linear", C, C, False, ""), ("relu",)]
    res = [pad(1), conv(C, C, 3), ("AdaLIN",), pad(1), conv(C, C, 3), ("AdaLIN",)] * n_res
    up = ("upsample", 2.0, "nearest")
    decoder = [up, pad(1), conv(C, C // 2, 3), ("LIN",), ("relu",),
               up, pad(1), conv(C // 2, ch, 3), ("LIN",), ("relu",), pad(3), conv(ch, 3, 7)]  # tanh
    return encoder, mlp, res, decoder

@pytest.mark.parametrize("light", [True, False])
def test_generator_layer_table(light):
    ch, n_res, size = 4, 2, 32
    G = Generator(ch=ch, n_res=n_res, size=size, light=light)
    encoder, mlp, res, decoder = expected_generator_tables(ch, n_res, size // 4, light)
    assert layer_table(G.encoder) == encoder
    assert layer_table(G.mlp) == mlp
    head = [("linear", 4 * ch, 4 * ch, False, "")]
    assert layer_table(G.to_gamma) == layer_table(G.to_beta) == head
    assert layer_table(G.res_blocks) == res
    assert layer_table(G.decoder) == decoder
    C = 4 * ch
    assert {name: layer_table(fc) for name, fc in G.attention.fc.items()} == {
        "gap": [("linear", C, 1, False, "")], "gmp": [("linear", C, 1, False, "")],
        "sam": [("linear", (size // 4) ** 2, 1, False, "")]}
    assert layer_table(G.attention.conv1x1) == [("conv", 3 * C, C, 1, 1, 0, True, "")]
    assert layer_table(G.attention.act) == [("relu",)]

def test_full_mode_mlp_size_matches_the_paper():
    # U-GAT-IT's full mode at 256 px, ch 64: the first MLP layer maps C·(S/4)² = 256·64·64 inputs
    # to 256.
    with torch.device("meta"):  # shapes only: no gigabyte of weights
        G = Generator(ch=64, n_res=1, size=256, light=False)
    assert G.mlp[0].weight.numel() == 256 * 64 * 64 * 256  # 268,435,456

def naive_resblock(block, x, norm):
    """x + norm(conv(pad(relu(norm(conv(pad(x))))))) with the block's two conv weights."""
    conv1, conv2 = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    pad = lambda t: F.pad(t, (1, 1, 1, 1), mode="reflect")
    h = F.relu(norm(F.conv2d(pad(x), conv1.weight), 0))
    return x + norm(F.conv2d(pad(h), conv2.weight), 1)

def test_encoder_residual_block_has_its_skip_connection():
    torch.manual_seed(0)
    block = magan.ResBlock(6)
    x = torch.randn(2, 6, 5, 5)
    expected = naive_resblock(block, x, lambda t, i: naive_instance_layer_mix(t, torch.ones(6)))
    assert torch.allclose(block(x), expected, atol=1e-5)

def test_decoder_residual_block_has_its_skip_connection_and_adalin():
    torch.manual_seed(0)
    block = magan.AdaLINResBlock(6)
    rhos = [torch.rand(6), torch.rand(6)]
    for norm, rho in zip((block.norm1, block.norm2), rhos):
        with torch.no_grad():
            norm.rho.copy_(rho.view(1, 6, 1, 1))
    x, gamma, beta = torch.randn(2, 6, 5, 5), torch.randn(2, 6), torch.randn(2, 6)
    def adalin(t, i):
        mixed = naive_instance_layer_mix(t, rhos[i])
        return mixed * gamma[:, :, None, None] + beta[:, :, None, None]
    assert torch.allclose(block(x, gamma, beta), naive_resblock(block, x, adalin), atol=1e-5)

def record_forward(modules: dict):
    """Forward hooks that keep each named module's input and output, call by call."""
    calls = {name: [] for name in modules}
    def keep(name):
        return lambda module, args, out: calls[name].append((args, out))
    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    return calls, handles

@pytest.mark.parametrize("light", [True, False])
def test_generator_wiring(light):
    """θ = E(x) feeds the attention; a(x), not θ, feeds the AdaLIN blocks; the MLP reads a(x)'s
    global average (light) or the whole flattened map (full); γ, β reach every block."""
    torch.manual_seed(0)
    G = Generator(ch=4, n_res=2, size=32, light=light)
    parts = dict(encoder=G.encoder, attention=G.attention, mlp=G.mlp, to_gamma=G.to_gamma,
                 to_beta=G.to_beta, block0=G.res_blocks[0], block1=G.res_blocks[1],
                 decoder=G.decoder)
    calls, handles = record_forward(parts)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    image, logits, heatmap = G(x)
    for h in handles:
        h.remove()
    one = {name: c[0] for name, c in calls.items()}
    assert all(len(c) == 1 for c in calls.values())
    theta = one["encoder"][1]
    assert torch.equal(one["encoder"][0][0], x) and torch.equal(one["attention"][0][0], theta)
    a = one["attention"][1][0]
    assert torch.allclose(one["mlp"][0][0], a.mean(dim=(2, 3)) if light else a.flatten(1))
    assert torch.equal(one["to_gamma"][0][0], one["mlp"][1])
    assert torch.equal(one["to_beta"][0][0], one["mlp"][1])
    for block in ("block0", "block1"):
        assert torch.equal(one[block][0][1], one["to_gamma"][1])
        assert torch.equal(one[block][0][2], one["to_beta"][1])
    assert torch.equal(one["block0"][0][0], a)
    assert torch.equal(one["block1"][0][0], one["block0"][1])
    assert torch.equal(one["decoder"][0][0], one["block1"][1])
    assert torch.equal(image, torch.tanh(one["decoder"][1]))
    assert torch.equal(logits, one["attention"][1][1])
    assert torch.allclose(heatmap, a.sum(1, keepdim=True))
    assert image.shape == (2, 3, 32, 32) and image.abs().max() <= 1

def test_generator_size_errors():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        Generator(ch=4, n_res=1, size=32)(torch.zeros(1, 3, 30, 30))
    full = Generator(ch=4, n_res=1, size=32, light=False).eval()
    with pytest.raises(ValueError, match="runs at 32 px only"):
        full(torch.zeros(1, 3, 64, 64))
    light = Generator(ch=4, n_res=1, size=32).eval()
    image, _, heatmap = light(torch.zeros(1, 3, 64, 64))  # a light G runs at any size
    assert image.shape == (1, 3, 64, 64) and heatmap.shape == (1, 1, 16, 16)


# =================================================================================================
# Discriminator (MAGAN §2.2, eq. 3; U-GAT-IT appendix Tables 5-6)
# =================================================================================================

def expected_discriminator_table(ch, n_down, grid):
    rows = [("reflect-pad", 1), ("conv", 3, ch, 4, 2, 0, True, "SN"), ("leaky-relu", 0.2)]
    for i in range(1, n_down):
        rows += [("reflect-pad", 1), ("conv", ch * 2 ** (i - 1), ch * 2 ** i, 4, 2, 0, True, "SN"),
                 ("leaky-relu", 0.2)]
    C = ch * 2 ** n_down
    rows += [("reflect-pad", 1), ("conv", C // 2, C, 4, 1, 0, True, "SN"), ("leaky-relu", 0.2)]
    attention = [("linear", C, 1, False, "SN"), ("linear", C, 1, False, "SN"),
                 ("linear", grid * grid, 1, False, "SN"),
                 ("conv", 3 * C, C, 1, 1, 0, True, ""),  # no SN on the 1x1 conv (U-GAT-IT Table 5)
                 ("leaky-relu", 0.2)]
    return rows, attention, [("reflect-pad", 1), ("conv", C, 1, 4, 1, 0, False, "SN")]

@pytest.mark.parametrize("n_down,size", [(3, 64), (4, 64), (5, 128)])
def test_discriminator_layer_table(n_down, size):
    D = Discriminator(ch=2, n_down=n_down, size=size)
    grid = size // 2 ** n_down - 1
    encoder, attention, classifier = expected_discriminator_table(2, n_down, grid)
    assert layer_table(D.encoder) == encoder
    assert [layer_table(D.attention.fc[k])[0] for k in ("gap", "gmp", "sam")] + \
        layer_table(D.attention.conv1x1) + layer_table(D.attention.act) == attention
    assert layer_table(D.classifier) == classifier

def test_two_discriminator_scales_per_domain():
    # U-GAT-IT: a global D down to S/32 (286x286 receptive field at 256 px) and a local one down
    # to S/8 (70x70), one pair per domain; below 96 px the global one halves fewer times.
    assert [magan.global_depth(s) for s in (32, 64, 128, 256, 512)] == [3, 4, 5, 5, 5]
    nets = MAGAN(Config(size=64, ch=2, n_res=1))
    downs = {name: sum(1 for row in layer_table(D.encoder) if row[0] == "conv" and row[4] == 2)
             for name, D in zip(("D_ga", "D_gb", "D_la", "D_lb"), nets.discriminators)}
    assert downs == {"D_ga": 4, "D_gb": 4, "D_la": 3, "D_lb": 3}
    patch, logits, heatmap = nets.D_ga(torch.zeros(2, 3, 64, 64))
    assert patch.shape == (2, 1, 2, 2) and logits.shape == (2, 3) and heatmap.shape == (2, 1, 3, 3)

def test_discriminator_wiring():
    """Φ(z) = Conv(a_D(z)) (eq. 3): the classifier reads the attention features, not θ."""
    torch.manual_seed(0)
    D = Discriminator(ch=2, n_down=3, size=64)
    calls, handles = record_forward(dict(encoder=D.encoder, attention=D.attention,
                                         classifier=D.classifier))
    patch, logits, _ = D(torch.rand(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert torch.equal(calls["attention"][0][0][0], calls["encoder"][0][1])
    assert torch.equal(calls["classifier"][0][0][0], calls["attention"][0][1][0])
    assert torch.equal(patch, calls["classifier"][0][1])
    assert torch.equal(logits, calls["attention"][0][1][1])

def test_real_and_fake_in_one_discriminator_batch_equal_two_passes():
    """The D step judges real and fake images in one batch (U-GAT-IT's code makes two passes).
    That is the same maths only if no layer of D mixes samples: no batch statistics, SAM's γ
    scaled per sample. In eval mode (σ of spectral norm fixed) the two ways must agree."""
    torch.manual_seed(0)
    D = Discriminator(ch=4, n_down=3, size=64).eval()
    real, fake = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        both, alone = D(torch.cat([real, fake])), [D(real), D(fake)]
    for i in range(3):
        torch.testing.assert_close(both[i], torch.cat([alone[0][i], alone[1][i]]), rtol=1e-5,
                                   atol=1e-6)

# =================================================================================================
# Losses (MAGAN §2.3, eq. 4-7; U-GAT-IT §2.2, eq. 2-6)
# =================================================================================================

def test_lsgan_and_bce_by_hand():
    logits = torch.tensor([0.5, 2.0])
    by_hand = ((0.5 - 1) ** 2 + (2 - 1) ** 2) / 2
    assert adversarial_loss(logits, True).item() == pytest.approx(by_hand)
    assert adversarial_loss(logits, False).item() == pytest.approx((0.5 ** 2 + 2 ** 2) / 2)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    assert adversarial_loss(logits, True, "bce").item() == pytest.approx(
        -(math.log(sigmoid(0.5)) + math.log(sigmoid(2.0))) / 2, rel=1e-5)
    assert adversarial_loss(logits, False, "bce").item() == pytest.approx(
        -(math.log(1 - sigmoid(0.5)) + math.log(1 - sigmoid(2.0))) / 2, rel=1e-5)
    assert adversarial_loss(torch.zeros(2, 0), True).item() == 0  # attention "none": no logits

def test_cam_loss_by_hand():
    source, target = torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 2.0]])
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    expected = (-(math.log(sigmoid(0.0)) + math.log(sigmoid(1.0))) / 2
                - (math.log(1 - sigmoid(-1.0)) + math.log(1 - sigmoid(2.0))) / 2)
    assert cam_loss(source, target).item() == pytest.approx(expected, rel=1e-5)

def test_gram_and_style_loss_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    # M = F Fᵀ / (C·H·W) = [[1+4, 3+8], [3+8, 9+16]] / 4
    assert torch.allclose(gram_matrix(f), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # M = I / 4
    # Σ|[[5, 11], [11, 25]] / 4 − I / 4| = (4 + 11 + 11 + 24) / 4, relative to
    # Σ|M_f| + Σ|M_g| = (52 + 2) / 4
    assert style_loss(f, g).item() == pytest.approx(50 / 54)
    # per sample, then the batch mean: a sample with 10x the activations weighs the same; scale-free
    batch = style_loss(torch.cat([f, 10 * f]), torch.cat([g, 10 * g]))
    assert batch.item() == pytest.approx(50 / 54)
    assert style_loss(3 * f, 3 * g).item() == pytest.approx(style_loss(f, g).item())
    torch.manual_seed(1)
    h = torch.randn(2, 3, 4, 5)
    m = gram_matrix(h)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                expected = sum(h[b, i].flatten()[k] * h[b, j].flatten()[k] for k in range(20)) / 60
                assert m[b, i, j].item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(torch.randn(1, 8, 4, 4)).dtype == torch.float32

def test_content_loss_is_an_l1_relative_to_the_features_size():
    x = torch.randn(2, 8, 3, 3)
    assert content_loss(x, x.clone()).item() == 0
    by_hand = sum(0.5 * 72 / (x[b].abs().sum() + (x[b] + 0.5).abs().sum()) for b in range(2)) / 2
    assert content_loss(x, x + 0.5).item() == pytest.approx(by_hand.item())
    # the size only scales the gradient: d/da Σ|a − b| / (Σ|a| + Σ|b|), with the sum held,
    # = sign(a − b) / size
    a = torch.tensor([[1.0, -2.0]], requires_grad=True)
    loss = magan.relative_l1(a, torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 1.0 and torch.allclose(a.grad, torch.tensor([[1 / 3, -1 / 3]]))

def test_vgg_gives_relu4_4_and_relu5_4_of_imagenet_normalised_inputs():
    vgg = magan.load_vgg("random")
    # torchvision's VGG19 indices: relu4_4 = 26, relu5_4 = 35
    assert len(vgg.to_relu4_4) == 27 and len(vgg.to_relu4_4) + len(vgg.to_relu5_4) == 36
    assert isinstance(vgg.to_relu4_4[-1], nn.ReLU) and isinstance(vgg.to_relu5_4[-1], nn.ReLU)
    shapes = [tuple(t.shape) for t in vgg(torch.zeros(1, 3, 64, 64))]
    assert shapes == [(1, 512, 8, 8), (1, 512, 4, 4)]
    assert not any(p.requires_grad for p in vgg.parameters())
    seen = []
    vgg.to_relu4_4[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    vgg(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's ImageNet statistics
    expected = [((v + 1) / 2 - m) / s for v, m, s in zip([-1.0, 0.0, 1.0], mean, std)]
    assert seen[0][0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)

def test_vgg_weights_from_a_torchvision_state_dict_and_clear_error_when_missing(tmp_path):
    torch.manual_seed(0)
    state = {f"features.{k}": torch.randn_like(v) for k, v in VGG19.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1)  # a whole VGG19 file also holds its classifier
    torch.save(state, tmp_path / "vgg19.pth")
    vgg = magan.load_vgg(str(tmp_path / "vgg19.pth"))
    assert torch.equal(vgg.to_relu5_4[-2].weight, state["features.34.weight"])  # conv5_4
    with pytest.raises(MaganError) as error:
        magan.train(tiny_config(tmp_path, vgg_weights=str(tmp_path / "missing.pth")))
    fixes = ("--vgg-weights PATH", "--w-style 0 --w-content 0", "--vgg-weights random",
             "NOT the paper")
    for fix in fixes:
        assert fix in str(error.value)
    assert not (tmp_path / "run").exists()  # failed before training started

# --- one training step, term by term ----------------------------------------------------------

class StepRecorder:
    """Records, in order, every forward of the six networks (input and output), the moment opt_D
    steps, and every gradient that reaches a G or D parameter."""

    def __init__(self, nets, opt_D):
        self.events = []
        for name, net in nets.named_children():
            net.register_forward_hook(lambda m, args, out, name=name: self.events.append(
                ("forward", name, args[0].detach(), out)))
            for p in net.parameters():
                frozen = not p.requires_grad  # D stays frozen after a G step; hooks need the grad
                p.requires_grad_(True)
                p.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.events.append(("grad", name)))
                p.requires_grad_(not frozen)
        step = opt_D.step

        def recorded_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.d_after_step = {k: v.detach().clone() for k, v in nets.state_dict().items()
                                 if k.startswith("D_")}
            self.events.append(("opt_D.step",))
            return result
        opt_D.step = recorded_step

    def phase(self, before_d_step: bool):
        cut = self.events.index(("opt_D.step",))
        return self.events[:cut] if before_d_step else self.events[cut + 1:]

    def rows(self, events, name, inputs):
        """The output rows of `name` for the input rows `inputs`, from the first forward that saw
        them all."""
        for event in (e for e in events if e[0] == "forward" and e[1] == name):
            seen = event[2]
            def where(row):
                same = (i for i in range(len(seen)) if torch.equal(seen[i].float(), row.float()))
                return next(same, None)
            index = [where(row) for row in inputs]
            if None not in index:
                return tuple(field[index] for field in event[3])
        raise AssertionError(f"{name} never saw these inputs in this phase")

def lsgan(t, target):  # U-GAT-IT eq. 2 and 6: E[(D(·) − target)²]
    return ((t.float() - target) ** 2).mean()

def bce(t, target):  # −E[log σ(t)] or −E[log(1 − σ(t))]
    return -(F.logsigmoid(t.float()) if target == 1 else F.logsigmoid(-t.float())).mean()

def gram_by_hand(f):
    B, C, H, W = f.shape
    flat = f.reshape(B, C, H * W)
    return torch.einsum("bci,bdi->bcd", flat, flat) / (C * H * W)

def relative_by_hand(a, b):  # Σ|a − b| / (Σ|a| + Σ|b|) per sample, averaged over the batch
    return sum((a[i] - b[i]).abs().sum() / (a[i].abs().sum() + b[i].abs().sum())
               for i in range(len(a))) / len(a)

@pytest.mark.parametrize("gan_loss", ["lsgan", "bce"])
def test_training_step_losses_by_hand(tmp_path, gan_loss):
    """Every term of one training step, recomputed from the tensors the step produced, with its
    weight: L_D and L_G of MAGAN eq. 8 (U-GAT-IT eq. 7 plus style and content). Also: which D
    judges which images, and what each reconstruction is compared with."""
    weights = dict(adv=1.5, cycle=7.0, identity=3.0, cam=11.0, style=2.0, content=5.0)
    cfg = tiny_config(tmp_path, gan_loss=gan_loss, **{f"w_{k}": v for k, v in weights.items()})
    nets, vgg, opt_G, opt_D, autocast = step_objects(cfg)
    rec = StepRecorder(nets, opt_D)
    x_a, x_b = random_images(2, 32, 1), random_images(2, 32, 2)
    losses = magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast)
    adv = lsgan if gan_loss == "lsgan" else bce
    before, after = rec.phase(True), rec.phase(False)

    fake_ab, fake_ba = rec.rows(before, "G_ab", x_a)[0], rec.rows(before, "G_ba", x_b)[0]
    # --- D step: each domain's two Ds see that domain's real images and the fakes made for it
    d_total = 0
    judges = (("D_ga", x_a, fake_ba), ("D_la", x_a, fake_ba), ("D_gb", x_b, fake_ab),
              ("D_lb", x_b, fake_ab))
    for D, real, fake in judges:
        (r_patch, r_class, _), (f_patch, f_class, _) = (rec.rows(before, D, real),
                                                        rec.rows(before, D, fake))
        d_total = d_total + adv(r_patch, 1) + adv(f_patch, 0) + adv(r_class, 1) + adv(f_class, 0)
    assert losses["D"].item() == pytest.approx(weights["adv"] * d_total.item(), rel=1e-5)

    # --- G step (D after its update): fakes should score "real" on patch and class logits
    g_adv = 0
    for D, _, fake in judges:
        patch, logits, _ = rec.rows(after, D, fake)
        g_adv = g_adv + adv(patch, 1) + adv(logits, 1)
    rec_a = rec.rows(rec.events, "G_ba", fake_ab)[0]  # G_ba(G_ab(x_a))
    rec_b = rec.rows(rec.events, "G_ab", fake_ba)[0]  # G_ab(G_ba(x_b))
    cycle = (rec_a - x_a).abs().mean() + (rec_b - x_b).abs().mean()              # U-GAT-IT eq. 3
    same_b, same_a = rec.rows(before, "G_ab", x_b), rec.rows(before, "G_ba", x_a)
    identity = (same_b[0] - x_b).abs().mean() + (same_a[0] - x_a).abs().mean()  # U-GAT-IT eq. 4
    cam = (bce(rec.rows(before, "G_ab", x_a)[1], 1) + bce(same_b[1], 0)          # U-GAT-IT eq. 5
           + bce(rec.rows(before, "G_ba", x_b)[1], 1) + bce(same_a[1], 0))
    with torch.no_grad():  # (relu4_4, relu5_4) of each
        phi = {name: vgg(t) for name, t in dict(fake_ab=fake_ab, fake_ba=fake_ba, x_a=x_a, x_b=x_b,
                                                 rec_a=rec_a, rec_b=rec_b).items()}
    gram = {name: gram_by_hand(features[0]) for name, features in phi.items()}
    style = (relative_by_hand(gram["fake_ab"], gram["x_b"])                       # MAGAN eq. 5
             + relative_by_hand(gram["fake_ba"], gram["x_a"]))
    content = (relative_by_hand(phi["rec_a"][1], phi["x_a"][1])                   # MAGAN eq. 6
               + relative_by_hand(phi["rec_b"][1], phi["x_b"][1]))
    terms = dict(adv=g_adv, cycle=cycle, identity=identity, cam=cam, style=style, content=content)
    for name, value in terms.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-7), name
    total = sum(weights[k] * v for k, v in terms.items()).item()
    assert losses["G"].item() == pytest.approx(total, rel=1e-5)

def test_d_step_sends_no_gradient_to_the_generators_and_g_step_leaves_d_alone(tmp_path):
    cfg = tiny_config(tmp_path)
    nets, vgg, opt_G, opt_D, autocast = step_objects(cfg)
    x_a, x_b = random_images(1, 32, 3), random_images(1, 32, 4)
    magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast)  # stale grads about
    rec = StepRecorder(nets, opt_D)
    magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast)
    graded = [{e[1] for e in rec.phase(before) if e[0] == "grad"} for before in (True, False)]
    assert graded[0] == {"D_ga", "D_gb", "D_la", "D_lb"}  # the fakes are detached
    assert graded[1] == {"G_ab", "G_ba"}                  # D frozen: no D gradients
    for key, value in nets.named_parameters():
        if key.startswith("D_"):
            assert torch.equal(value, rec.d_after_step[key]), f"the G step changed {key}"

def test_rho_is_clipped_after_a_training_step(tmp_path):
    cfg = tiny_config(tmp_path)
    nets, vgg, opt_G, opt_D, autocast = step_objects(cfg)
    norms = [m for G in nets.generators for m in G.modules() if isinstance(m, AdaLIN)]
    with torch.no_grad():
        for i, m in enumerate(norms):
            m.rho.fill_(1.7 if i % 2 else -0.4)
    x = random_images(1, 32, 5)
    magan.train_step(nets, vgg, opt_G, opt_D, x, x.flip(-1), cfg, autocast)
    values = torch.cat([m.rho.flatten() for m in norms])
    assert values.min() >= 0 and values.max() <= 1 and (values == 1).any() and (values == 0).any()

@pytest.mark.parametrize("attention,light", [("ma", True), ("ma", False), ("cam", True),
                                             ("sam", True), ("none", True)])
def test_one_iteration_updates_every_network(tmp_path, attention, light):
    cfg = tiny_config(tmp_path, attention=attention, light=light, p_gen=3.0, p_dis=2.0)
    nets, vgg, opt_G, opt_D, autocast = step_objects(cfg)
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    losses = magan.train_step(nets, vgg, opt_G, opt_D, random_images(2, 32, 6),
                              random_images(2, 32, 7), cfg, autocast)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[name] > 0 for name in ("adv", "cycle", "identity", "style", "content"))
    assert (losses["cam"] > 0) == (attention != "none")
    for net_name, net in nets.named_children():
        assert any(not torch.equal(v, before[f"{net_name}.{k}"])
                   for k, v in net.state_dict().items()), net_name

def test_zero_weight_switches_a_term_off(tmp_path):
    cfg = tiny_config(tmp_path, w_style=0, w_content=0, w_cam=0, w_identity=0, w_cycle=0)
    nets, _, opt_G, opt_D, autocast = step_objects(cfg)
    x = random_images(1, 32, 8)
    losses = magan.train_step(nets, None, opt_G, opt_D, x, x.flip(-1), cfg, autocast)  # no VGG
    assert losses["style"] == 0 and losses["content"] == 0
    assert losses["G"].item() == pytest.approx(losses["adv"].item())  # only adversarial remains

def test_adam_follows_the_paper():
    """U-GAT-IT appendix B.2, for the generators and the discriminators alike: Adam with lr 1e-4,
    β = (0.5, 0.999) and weight decay 1e-4, each step as computed by hand with those numbers."""
    torch.manual_seed(0)
    cfg = Config(size=32, ch=4, n_res=1)
    nets = MAGAN(cfg)
    opt_G, opt_D = magan.make_optimizers(nets, cfg)
    for opt, networks in ((opt_G, nets.generators), (opt_D, nets.discriminators)):
        params = [p for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in params} == {id(p) for n in networks for p in n.parameters()}
        p, others = params[0], params[1:]
        x, m, v = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)
        for t in (1, 2):  # two steps: the first is ±lr whatever β is (the bias corrections cancel)
            p.grad = torch.randn_like(p)
            for q in others:
                q.grad = None
            opt.step()
            g = p.grad + 1e-4 * x                        # L2 weight decay, as torch.optim.Adam
            m, v = 0.5 * m + 0.5 * g, 0.999 * v + 0.001 * g * g
            x = x - 1e-4 * (m / (1 - 0.5 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            assert torch.allclose(p.detach(), x, rtol=1e-5, atol=1e-8), t

def test_learning_rate_schedule():
    cfg = Config(iters=100, lr=1.0)
    # constant for the first half, then linear to 0 (U-GAT-IT appendix B.2)
    assert [magan.learning_rate(i, cfg) for i in (0, 49, 50)] == [1.0, 1.0, 1.0]
    assert magan.learning_rate(75, cfg) == pytest.approx(0.5)
    assert magan.learning_rate(99, cfg) == pytest.approx(0.02)


# --- the length of a run: --iters, or a --minutes budget (8.4) --------------------------------

class Machine:
    """magan's clock (`time.monotonic`), made to move as a given machine's would: building the
    networks takes `start_up` seconds, and training step k takes step(k) seconds. Real time does
    not matter to anything the budget decides."""

    def __init__(self, monkeypatch, start_up: float, step):
        self.now, self.start_up, self.step, self.steps = 0.0, start_up, step, 0
        clock = SimpleNamespace(monotonic=lambda: self.now, time=lambda: self.now,
                                strftime=time.strftime)
        monkeypatch.setattr(magan, "time", clock)
        build, train_step = magan.build, magan.train_step

        def slow_build(*args, **kwargs):
            self.now += self.start_up
            return build(*args, **kwargs)

        def slow_step(*args, **kwargs):
            self.steps += 1
            self.now += self.step(self.steps)
            return train_step(*args, **kwargs)
        monkeypatch.setattr(magan, "build", slow_build)
        monkeypatch.setattr(magan, "train_step", slow_step)

ALONE = magan.Processes(rank=0, world=1, device=torch.device("cpu"), is_main=True)

def test_a_budget_fixes_the_length_once_after_the_warm_up_by_hand(monkeypatch):
    """A 10-minute budget; the first iteration ends 100 s after the start; then 0.5 s each. Once,
    WARMUP = 4 iterations later (at 102 s, iteration 5): 90% of the 498 s left at 0.5 s each fits
    896 more. Never before or after; never more than --iters, never fewer than twice the
    iterations done (else the decay would have begun: the rate would jump)."""
    monkeypatch.setattr(magan.RunLength, "WARMUP", 4)

    def lengths(most, seconds_each=0.5):
        """{iteration: the run's length after it}, up to the run's last iteration."""
        clock = SimpleNamespace(now=0.0)
        monkeypatch.setattr(magan, "time", SimpleNamespace(monotonic=lambda: clock.now))
        cfg = Config(iters=most, minutes=10)
        length, after = magan.RunLength(cfg, None, began=0.0, processes=ALONE), {}
        for i in range(1, 12):
            clock.now = 100.0 + seconds_each * (i - 1)
            last = length.is_last(i, None)
            after[i] = cfg.iters
            if last:
                break
        return after
    assert lengths(100_000) == {**dict.fromkeys(range(1, 5), 100_000),
                                **dict.fromkeys(range(5, 12), 5 + 896)}
    assert set(lengths(300).values()) == {300}                          # at most --iters
    # 100 s each: at iteration 5 (500 s) none fits in 90% of the 100 s left, so twice 5; the
    # deadline (600 s) then ends the run after iteration 7 (700 s)
    assert lengths(100_000, seconds_each=100.0) == {**dict.fromkeys(range(1, 5), 100_000),
                                                    5: 10, 6: 10, 7: 10}
    assert lengths(9) == dict.fromkeys(range(1, 10), 9)                 # decay begun: no change

def test_a_budget_counts_the_start_up_and_never_jumps_the_rate(tmp_path, monkeypatch, capsys):
    """A 2-minute budget on a machine whose start-up takes 35 s and each iteration 5 s; decided
    2 iterations after the first (iteration 3, at 50 s): 90% of the 70 s left fits 12 more, so
    15 in all (a clock started after the start-up would fit 21). The rate at every iteration is
    the schedule of 15: it never jumps. Until then, the ETA is what the budget leaves."""
    monkeypatch.setattr(magan.RunLength, "WARMUP", 2)
    Machine(monkeypatch, start_up=35, step=lambda k: 5)
    run = magan.train(tiny_config(tmp_path, iters=1000, minutes=2, log_every=1, sample_every=1000,
                                  save_every=1000, w_style=0, w_content=0))
    assert checkpoint_of(run)["iteration"] == checkpoint_of(run)["config"]["iters"] == 15
    assert json.loads((run / "config.json").read_text())["iters"] == 15
    rates = [float(row["lr"]) for row in csv.DictReader(open(run / "log.csv"))]
    schedule = Config(iters=15, lr=1e-4)
    assert rates == pytest.approx([magan.learning_rate(step, schedule) for step in range(15)])
    assert checkpoint_of(run)["seconds_used"] == pytest.approx(35 + 15 * 5)  # the run's time
    lines = capsys.readouterr().out.splitlines()
    second = next(line for line in lines if line.startswith("[   2/"))
    assert "ETA 0h01m15s" in second  # 998 more at 5 s would take 83 minutes; 75 s are left

def test_the_deadline_ends_the_run_at_any_iteration_and_the_stop_writes_everything(
        tmp_path, monkeypatch, capsys):
    """The same machine slows down to 30 s an iteration after the length is fixed (15): iteration
    6 ends at 140 s, past the 2 minutes. The run stops there, though no log, sample or save point
    is near, and writes its log.csv row, sample grids, page and checkpoint at 6."""
    monkeypatch.setattr(magan.RunLength, "WARMUP", 2)
    Machine(monkeypatch, start_up=35, step=lambda k: 5 if k <= 3 else 30)
    run = magan.train(tiny_config(tmp_path, iters=1000, minutes=2, log_every=1000,
                                  sample_every=1000, save_every=1000, w_style=0, w_content=0))
    assert_the_run_stopped_whole_at(run, 6)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("time is up: stopped at iteration 6 of 15")
    assert last.endswith(f"train --out {run} --resume --minutes 12")

def test_a_budget_run_stopped_resumes_with_the_time_left(tmp_path, monkeypatch, capsys):
    """A 3-minute budget (start-up 35 s, 5 s an iteration) stopped by Ctrl-C at iteration 4: the
    checkpoint holds the 55 s used. The resumed run (another 35 s of start-up) has 125 s left:
    fixed at its iteration 7 (50 s in), 90% of 75 s fits 13 more: 20."""
    monkeypatch.setattr(magan.RunLength, "WARMUP", 100)
    machine = Machine(monkeypatch, start_up=35, step=lambda k: 5)
    step = magan.train_step

    def ctrl_c_at_4(*args, **kwargs):
        if machine.steps == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, in the middle of iteration 4
        return step(*args, **kwargs)
    monkeypatch.setattr(magan, "train_step", ctrl_c_at_4)
    run = magan.train(tiny_config(tmp_path, iters=40, minutes=3, save_every=1000, w_style=0,
                                  w_content=0))
    assert checkpoint_of(run)["iteration"] == 4
    assert checkpoint_of(run)["seconds_used"] == pytest.approx(55)
    monkeypatch.setattr(magan.RunLength, "WARMUP", 2)
    machine.now, machine.steps = 0.0, 100
    assert magan.main(["train", "--out", str(run), "--resume"]) == 0
    assert checkpoint_of(run)["iteration"] == checkpoint_of(run)["config"]["iters"] == 20
    assert "within 0h01m30s" in capsys.readouterr().out  # 125 s, less the second start-up
    rows = list(csv.DictReader(open(run / "log.csv")))  # the run's time, across its two sessions
    assert [(row["iteration"], float(row["elapsed_s"])) for row in (rows[0], rows[-1])] == [
        ("2", 35 + 2 * 5), ("20", 55 + 35 + 16 * 5)]

def test_a_budget_used_up_asks_for_more_minutes_and_a_new_total_goes_on(tmp_path, monkeypatch,
                                                                          capsys):
    """A 1-minute budget whose start-up takes 70 s ends after one iteration. Resuming it as it is
    says how to give it more time; with --minutes 3 it goes on with 3 minutes in all, and with
    --minutes 9 --iters 50 further still."""
    monkeypatch.setattr(magan.RunLength, "WARMUP", 2)
    machine = Machine(monkeypatch, start_up=70, step=lambda k: 5)
    run = magan.train(tiny_config(tmp_path, iters=40, minutes=1, w_style=0, w_content=0))
    assert checkpoint_of(run)["iteration"] == 1
    machine.now = 0.0
    assert magan.main(["train", "--out", str(run), "--resume"]) == 2
    assert "--resume --minutes" in capsys.readouterr().err
    assert magan.main(["train", "--out", str(run), "--resume", "--minutes", "3"]) == 0
    assert 1 < checkpoint_of(run)["iteration"] == checkpoint_of(run)["config"]["iters"] < 40
    done = checkpoint_of(run)["iteration"]  # a new --minutes is the run's new time in all
    more = ["--minutes", "9", "--iters", "50"]
    assert magan.main(["train", "--out", str(run), "--resume", *more]) == 0
    assert done < checkpoint_of(run)["iteration"] == checkpoint_of(run)["config"]["iters"] <= 50


# =================================================================================================
# Presets and the config (sections 7 and 11)
# =================================================================================================

def test_presets_resolve_to_their_flags_and_typed_flags_win(tmp_path):
    cfg = magan.make_config({"data": str(DATA)}, "ugatit")
    assert (cfg.attention, cfg.w_style, cfg.w_content) == ("cam", 0.0, 0.0)
    assert (cfg.w_adv, cfg.w_cycle, cfg.w_identity, cfg.w_cam) == (1.0, 10.0, 10.0, 1000.0)
    cfg = magan.make_config({"data": str(DATA), "attention": "ma", "w_cam": 5.0}, "ugatit")
    assert (cfg.attention, cfg.w_cam, cfg.w_style) == ("ma", 5.0, 0.0)
    cfg = magan.make_config({"data": str(DATA)}, "eq8")  # MAGAN eq. 8 as printed: every weight 1
    assert (cfg.w_adv, cfg.w_cam, cfg.w_style, cfg.w_content, cfg.w_cycle, cfg.w_identity) == (
        1, 1, 1, 1, 0, 0)
    cfg = magan.make_config({"data": str(DATA)}, "laptop")
    assert (cfg.size, cfg.ch, cfg.n_res, cfg.light, cfg.compile, cfg.lr) == (128, 16, 4, True, True,
                                                                            2e-4)
    assert (cfg.w_style, cfg.w_content, cfg.w_cycle, cfg.w_identity, cfg.w_cam) == (
        0, 0, 1.0, 10.0, 1000.0)
    assert cfg.detail_skip and (cfg.minutes, cfg.iters) == (40, 20_000)
    cfg = magan.make_config({"data": str(DATA), "size": 96, "compile": False}, "laptop")
    assert (cfg.size, cfg.compile, cfg.ch) == (96, False, 16)

def test_a_style_weight_typed_after_the_laptop_preset_is_honoured(tmp_path):
    """--preset laptop --w-style 1: the style term is on, so VGG19 is needed; without its weights
    the run stops at once, with the fixes, rather than training without the term asked for."""
    cfg = magan.make_config({"data": str(DATA), "w_style": 1.0}, "laptop")
    assert cfg.w_style == 1.0 and cfg.vgg_weights == "imagenet"
    small = dict(size=32, ch=4, n_res=1, compile=False, minutes=0, iters=1)
    with pytest.raises(MaganError, match="--vgg-weights PATH"):
        magan.train(dataclasses.replace(cfg, out=str(tmp_path / "no"), vgg_weights="/no/such/file",
                                        **small))
    run = magan.train(dataclasses.replace(cfg, out=str(tmp_path / "ok"), vgg_weights="random",
                                          **small))
    row = next(csv.DictReader(open(run / "log.csv")))
    assert float(row["style"]) > 0 and float(row["content"]) == 0

def test_one_domain_without_the_other_is_refused(tmp_path, capsys):
    """--a alone must not pair with whatever data/trainB the current folder holds (or say that
    a folder is missing without naming the flag)."""
    for flag in ("--a", "--b"):
        assert magan.main(["train", flag, str(DATA / "trainA"), "--out", str(tmp_path / "r")]) == 2
        other = "--b" if flag == "--a" else "--a"
        error = capsys.readouterr().err
        assert f"{flag} names one domain: pass {other} too, or --data ROOT" in error
    assert not (tmp_path / "r").exists()
    cfg = magan.make_config({"data": str(DATA), "a": str(DATA / "testA")})  # --data fills the other
    assert (cfg.a, cfg.b) == (str(DATA / "testA"), str(DATA / "trainB"))


# =================================================================================================
# Data: unpaired folders and U-GAT-IT's augmentation (U-GAT-IT appendix B.2)
# =================================================================================================

def gradient_image(width, height):
    """An image whose every 32x32 window differs: R follows x, G follows y, B mixes both."""
    im = Image.new("RGB", (width, height))
    im.putdata([(x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256)
                for y in range(height) for x in range(width)])
    return im

def test_augmentation_is_flip_resize_to_s_plus_30_and_a_crop_anywhere(tmp_path):
    """Each training image is a crop of PIL's bilinear resize to (S+30)² of the (maybe flipped)
    original, at any of the 31x31 offsets, flipped about half of the time."""
    S, folder = 32, tmp_path / "one"
    folder.mkdir()
    source = gradient_image(90, 70)  # not square: the resize makes it square
    source.save(folder / "image.png")
    crops = {}
    for flipped, im in ((False, source), (True, source.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        big = im.resize((S + 30, S + 30), Image.Resampling.BILINEAR)
        for top in range(31):
            for left in range(31):
                crop = big.crop((left, top, left + S, top + S)).tobytes()
                crops.setdefault(crop, (flipped, top, left))
    data = magan.UnpairedImages(folder, folder, S, seed=0)
    found = []
    for k in range(800):
        key = magan.to_pil(data[k][0]).tobytes()
        assert key in crops, f"sample {k} is not a crop of the resized image"
        found.append(crops[key])
    # p = 0.5: 800 draws fall within ± 0.07 at 4 sigma
    assert 0.4 < sum(f for f, _, _ in found) / len(found) < 0.6
    assert {top for _, top, _ in found} == {left for _, _, left in found} == set(range(31))

def solid_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (30 * i, 255 - 30 * i, 100)).save(root / f"{i}.png")
    return root

def test_each_epoch_visits_every_image_once_in_a_fresh_order_per_domain_and_seed(tmp_path):
    n = 7
    folder = solid_folder(tmp_path / "solid", n)
    def which(x):  # a solid colour survives flip and crop
        return round(magan.to_pil(x).getpixel((5, 5))[0] / 30)
    data = magan.UnpairedImages(folder, folder, 32, seed=0)
    orders = {domain: [[which(data[e * n + i][domain]) for i in range(n)] for e in range(3)]
              for domain in (0, 1)}
    for domain in (0, 1):
        assert all(sorted(epoch) == list(range(n)) for epoch in orders[domain])  # each once
        assert len({tuple(o) for o in orders[domain]}) == 3  # a new order every epoch
    assert orders[0] != orders[1]  # the two domains are shuffled independently: unpaired
    other_seed = magan.UnpairedImages(folder, folder, 32, seed=1)
    assert [which(other_seed[k][0]) for k in range(n)] != orders[0][0]
    one = tmp_path / "one"
    one.mkdir()
    gradient_image(90, 70).save(one / "image.png")
    same = magan.UnpairedImages(one, one, 32, seed=0)  # the same image in both domains: own draws
    assert sum(torch.equal(same[k][0], same[k][1]) for k in range(100)) < 10

def test_samples_are_a_pure_function_of_seed_and_index_in_any_worker():
    a = magan.UnpairedImages(DATA / "trainA", DATA / "trainB", 32, seed=0)
    again = magan.UnpairedImages(DATA / "trainA", DATA / "trainB", 32, seed=0)
    for k in (0, 5, 401):
        assert torch.equal(a[k][0], again[k][0]) and torch.equal(a[k][1], again[k][1])
    loader = torch.utils.data.DataLoader(a, batch_size=2, sampler=range(6), num_workers=2,
                                         collate_fn=magan.collate_pairs)
    in_workers = torch.cat([x_a for x_a, _, _ in loader])
    assert torch.equal(in_workers, torch.stack([a[k][0] for k in range(6)]))

def test_each_process_reads_its_own_samples_of_each_iteration():
    two = [list(magan.iteration_samples(3, 5, 2, world=2, rank=rank)) for rank in (0, 1)]
    # iteration k, rank r of W, batch B: samples (k·W + r)·B ... (k·W + r)·B + B − 1
    assert two == [[12, 13, 16, 17], [14, 15, 18, 19]]
    one = list(magan.iteration_samples(3, 5, 4))  # one process, batch 4
    assert one == [12, 13, 14, 15, 16, 17, 18, 19]

def test_samples_come_from_test_folders_beside_train(tmp_path):
    rows = magan.sample_images(str(DATA / "trainA"), 32)
    first = magan.load_rgb(DATA / "testA" / "0000.jpg", 32)
    first = first.resize((32, 32), Image.Resampling.BILINEAR)
    assert rows.shape == (4, 3, 32, 32) and torch.equal(rows[0], magan.to_tensor(first))
    lonely = solid_folder(tmp_path / "trainA", 2)  # no testA beside it: samples from train
    expected = magan.to_tensor(Image.open(lonely / "0.png").resize((32, 32)))
    assert torch.equal(magan.sample_images(str(lonely), 32)[0], expected)

def test_transparent_pixels_are_laid_on_white_and_float_images_read_as_0_to_1(tmp_path):
    """A transparent pixel's stored colour is arbitrary (black here): it becomes white, and a
    half-transparent red pixel the mix of red and white. A float TIFF holds values in [0, 1]."""
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 128))
    im.save(tmp_path / "alpha.png")
    rgb = magan.load_rgb(tmp_path / "alpha.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 127, 127)  # 255·128/255 + 255·127/255, 0 + 255·127/255
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0  # palette entry 0 (black) is transparent
    palette.save(tmp_path / "palette.png")
    assert magan.load_rgb(tmp_path / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("F", (3, 3), 0.5).save(tmp_path / "float.tif")
    assert magan.load_rgb(tmp_path / "float.tif").getpixel((1, 1)) == (127, 127, 127)


# =================================================================================================
# The loop: the fast path, checkpoints and resume, the run folder (MAGAN §3.3)
# =================================================================================================

def test_fast_path_forced_on_cpu_matches_fp32(tmp_path):
    """The fast path (bf16 autocast, channels_last), run on the CPU for three iterations with every
    loss on, against the plain fp32 path from the same weights. Tolerances: each loss within 1%
    (bf16 keeps 8 bits of mantissa, ~0.4% per rounding; statistics, Gram matrices and losses stay
    fp32), and the first step's gradients point the same way: cosine over all of G's parameters
    > 0.9, over D's > 0.95 (measured: 0.973 and 0.996)."""
    cfg = tiny_config(tmp_path)
    runs = {}
    for fast in (False, True):
        nets, vgg, opt_G, opt_D, autocast = step_objects(cfg, seed=0, fast=fast)
        losses, grads = [], None
        for i in range(3):
            x_a, x_b = (magan.to_device(random_images(1, 32, s), torch.device("cpu"), fast)
                        for s in (10 + i, 20 + i))
            losses.append(magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast))
            grads = grads or {k: p.grad.detach().clone() for k, p in nets.named_parameters()
                              if p.grad is not None}
        runs[fast] = losses, grads
    for plain, fast in zip(runs[False][0], runs[True][0]):
        for name in plain:
            assert fast[name].dtype == torch.float32
            assert fast[name].item() == pytest.approx(plain[name].item(), rel=0.01), name
    for prefix, threshold in (("G_", 0.9), ("D_", 0.95)):
        a, b = (torch.cat([g.flatten() for k, g in runs[f][1].items() if k.startswith(prefix)])
                for f in (False, True))
        assert F.cosine_similarity(a, b, dim=0) > threshold, prefix

def test_bf16_only_where_the_hardware_computes_it(tmp_path, monkeypatch):
    """bf16 autocast only where bf16 is native: CUDA from compute capability 8.0, a CPU whose
    flags (as Linux lists them) include AMX or AVX-512 BF16; channels_last with --fast; plain
    fp32 with --no-fast."""
    for capability, native in (((8, 0), True), ((9, 0), True), ((7, 5), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert magan.native_bf16(torch.device("cuda")) == native, capability
    assert not magan.native_bf16(torch.device("mps"))
    flags = {"avx2 avx512f avx512_bf16 fma": True, "avx2 amx_bf16 amx_tile": True,
             "avx2 avx512f avx512_vnni fma": False, "": False}
    for line, native in flags.items():
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {line}\n")
        assert magan.native_bf16(torch.device("cpu"), tmp_path / "cpuinfo") == native, line
    assert not magan.native_bf16(torch.device("cpu"), tmp_path / "no-such-file")  # not Linux
    for native in (True, False):
        monkeypatch.setattr(magan, "native_bf16", lambda device, native=native: native)
        for fast in (True, False):
            cfg = tiny_config(tmp_path, fast=fast, w_style=0, w_content=0)
            nets, _, _, _, autocast = magan.build(cfg, torch.device("cpu"))
            assert isinstance(autocast, torch.autocast) == (fast and native)
            layout = nets.G_ab.encoder[1].weight.is_contiguous(memory_format=torch.channels_last)
            assert layout == fast

def test_resume_gives_identical_weights_and_drops_stale_log_rows(tmp_path):
    straight = magan.train(tiny_config(tmp_path / "a", iters=4, save_every=4))
    magan.train(tiny_config(tmp_path / "b", iters=2, save_every=2))
    with open(tmp_path / "b" / "run" / "log.csv", "a") as log:  # a row logged after the last save,
        log.write("3,1.0,1.0,0.0001,1,1,1,1,1,1,1,1\n")          # as an interrupted run leaves it
    resumed = magan.train(tiny_config(tmp_path / "b", iters=4, save_every=4, resume=True))
    one, two = checkpoint_of(straight), checkpoint_of(resumed)
    assert one["iteration"] == two["iteration"] == 4
    for net in one["nets"]:
        for key, value in one["nets"][net].items():
            assert torch.equal(value, two["nets"][net][key]), f"{net}.{key} differs after resume"
    for opt in ("opt_G", "opt_D"):
        for pid, state in one[opt]["state"].items():
            assert torch.equal(state["exp_avg"], two[opt]["state"][pid]["exp_avg"])
    log = (tmp_path / "b" / "run" / "log.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in log] == [2, 4]  # row 3 dropped; none logged twice

def test_sample_grid_runs_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    G_ab, G_ba = Generator(ch=4, n_res=1, size=32), Generator(ch=4, n_res=1, size=32)
    seen = []
    for G in (G_ab, G_ba):
        G.register_forward_hook(lambda m, args, out: seen.append((m.training,
                                                                  torch.is_grad_enabled())))
    x = random_images(2, 32, 3)
    grid = magan.sample_grid(G_ab, G_ba, x)
    assert seen == [(False, False)] * 2 and G_ab.training and G_ba.training  # back to training
    with torch.no_grad():
        fake = G_ab.eval()(x)[0]
        cycle = G_ba.eval()(fake)[0]
    # rows: images; columns: input, heatmap overlay, translation, cycle
    assert grid.shape == (8, 3, 32, 32) and torch.equal(grid[0::4], x)
    assert torch.allclose(grid[2::4], fake) and torch.allclose(grid[3::4], cycle)

def test_a_bare_train_command_is_a_demo_that_writes_its_run_folder(tmp_path):
    """No data named: the bundled data, no VGG, nothing downloaded. The run folder holds
    config.json, log.csv, the sample grids and the checkpoint; the terminal shows progress."""
    out = tmp_path / "demo"
    result = run_magan("train", "--size", 32, "--ch", 8, "--n-res", 1, "--iters", 3, "--log-every",
                       1, "--sample-every", 3, "--save-every", 3, "--workers", 1, "--device", "cpu",
                       "--out", out)
    assert result.returncode == 0, result.stderr
    assert "demo:" in result.stdout and "Warning" not in result.stderr
    assert "it/s" in result.stdout and "ETA" in result.stdout and "cam" in result.stdout
    assert json.loads((out / "config.json").read_text())["w_style"] == 0  # no VGG, no download
    assert len((out / "log.csv").read_text().strip().splitlines()) == 4
    assert (out / "index.html").is_file()
    for direction in ("a2b", "b2a"):  # 4 rows (test images) x 4 columns of 32 px, 2-px gutters
        grid = Image.open(out / "samples" / f"{direction}_0000003.png")
        assert grid.size == (4 * 32 + 5 * 2,) * 2
    ckpt = checkpoint_of(out)
    assert ckpt["iteration"] == 3
    assert set(ckpt["nets"]) == {"G_ab", "G_ba", "D_ga", "D_gb", "D_la", "D_lb"}
    assert magan.make_config({}).a == str(DATA / "trainA")  # a demo from any folder: bundled data

def test_data_root_and_the_mistakes_around_it(tmp_path):
    cfg = magan.make_config({"data": str(DATA)})
    assert (cfg.a, cfg.b) == (str(DATA / "trainA"), str(DATA / "trainB"))
    assert (cfg.size, cfg.ch, cfg.iters) == (256, 64, 1_000_000)
    horses = solid_folder(tmp_path / "horses", 2)
    mixed = magan.make_config({"data": str(DATA), "a": str(horses)})  # B from ROOT
    assert mixed.b == str(DATA / "trainB")
    with pytest.raises(MaganError, match="pass --data"):
        magan.list_images(DATA)                       # a root where a domain folder is expected
    with pytest.raises(MaganError, match="expected the CycleGAN layout"):
        magan.make_config({"data": str(DATA / "trainA")})
    with pytest.raises(MaganError, match="is a file: pass a folder of images"):
        magan.list_images(DATA / "trainA" / "0000.jpg")   # --b FILE exists, as a file

def test_progress_lines_after_the_first_iteration_at_log_points_and_the_last(tmp_path, capsys):
    magan.train(tiny_config(tmp_path, iters=5, log_every=2, sample_every=100, save_every=100))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/5", "[2/5", "[4/5", "[5/5"]
    # the first iteration carries the start-up: its time, no speed or ETA made of it
    assert re.search(r"first iteration \d+\.\d s, start-up included", lines[0])
    assert "it/s" not in lines[0] and "ETA" not in lines[0]
    assert all("it/s" in line and "ETA" in line for line in lines[1:])

def test_workers_default_to_one_fewer_than_the_cores_at_most_4(tmp_path, monkeypatch):
    seen = []
    def loader(*args, num_workers, **kwargs):
        seen.append(num_workers)
        return []
    monkeypatch.setattr(magan.torch.utils.data, "DataLoader", loader)
    data = magan.UnpairedImages(DATA / "trainA", DATA / "trainB", 32, 0)
    for cores, world, workers, expected in ((2, 1, -1, 1), (2, 2, -1, 0), (64, 1, -1, 4),
                                            (2, 1, 3, 3)):
        monkeypatch.setattr(magan.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        processes = magan.Processes(rank=0, world=world, device=torch.device("cpu"), is_main=True)
        batches = magan.training_batches(data, tiny_config(tmp_path, workers=workers), 0, processes)
        assert list(batches) == [] and seen[-1] == expected, (cores, world, workers)

def assert_the_run_stopped_whole_at(run: Path, iteration: int):
    """A run's last iteration, whatever ended it, left the checkpoint, a log.csv row, both sample
    grids and a run page that shows them, all at that iteration; no half-written file."""
    assert checkpoint_of(run)["iteration"] == iteration
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert int(rows[-1]["iteration"]) == iteration
    page = (run / "index.html").read_text()
    grids = re.findall(r'<img src="([^"]+)"', page)
    assert grids == [f"samples/a2b_{iteration:07d}.png", f"samples/b2a_{iteration:07d}.png"]
    assert all(Image.open(run / grid).size == (4 * 32 + 5 * 2,) * 2 for grid in grids)
    assert f"iteration {iteration} of" in page and not list(run.rglob("*.tmp"))

@pytest.mark.parametrize("log,sample,save", [(4, 1, 3), (2, 3, 5), (5, 2, 1), (3, 4, 2),
                                             (1, 6, 6)])
def test_any_intervals_finish_with_every_file_at_its_points_and_the_last(tmp_path, log, sample,
                                                                           save):
    """Samples and saves before, between and after the log points (a sample at iteration 1 comes
    before any log row): each run finishes, with a log.csv row at every log point and checkpoint,
    grids at every sample point, and everything at the last iteration."""
    run = magan.train(tiny_config(tmp_path, iters=5, log_every=log, sample_every=sample,
                                  save_every=save, w_style=0, w_content=0))
    assert_the_run_stopped_whole_at(run, 5)
    logged = [int(row["iteration"]) for row in csv.DictReader(open(run / "log.csv"))]
    assert logged == [k for k in range(1, 6) if k % log == 0 or k % save == 0 or k == 5]
    drawn = sorted(int(p.stem[4:]) for p in (run / "samples").glob("a2b_*.png"))
    assert drawn == [k for k in range(1, 6) if k % sample == 0 or k == 5]

def test_a_stop_signal_writes_everything_at_the_iteration_it_saves(tmp_path, monkeypatch):
    """Ctrl-C at iteration 3 of 100, far from any log, sample or save point: the run stops at 3
    and leaves everything at 3. The run page was there from the start."""
    step, pages = magan.train_step, []

    def ctrl_c_at_3(*args, **kwargs):
        pages.append((tmp_path / "run" / "index.html").is_file())
        if len(pages) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)
    monkeypatch.setattr(magan, "train_step", ctrl_c_at_3)
    run = magan.train(tiny_config(tmp_path, iters=100, log_every=50, sample_every=50,
                                  save_every=50, w_style=0, w_content=0))
    assert_the_run_stopped_whole_at(run, 3)
    assert pages == [True] * 3  # written before the first iteration

def test_run_page_shows_the_latest_grids_every_loss_curve_and_where_the_run_is(tmp_path):
    run = magan.train(tiny_config(tmp_path, iters=4, log_every=1, sample_every=2, w_identity=0))
    page = (run / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)" alt="([^"]+)"', page)
    assert images == [("samples/a2b_0000004.png", "A → B sample grid"),
                      ("samples/b2a_0000004.png", "B → A sample grid")]
    assert all((run / src).is_file() for src, _ in images) and "iteration 4 of 4" in page
    curves = re.findall(r'<polyline points="([^"]+)"[^>]* data-term="(\w+)"', page)
    assert [term for _, term in curves] == ["D", "G", "adv", "cycle", "cam", "style", "content"]
    assert all(len(points.split()) == 4 for points, _ in curves)  # a point per logged iteration

def test_charts_have_axes_and_a_log_scale_where_a_term_spans_decades():
    def labels(svg):
        return re.findall(r">([^<>]+)</text>", svg)
    falling = labels(magan.svg_chart("G", [(i * 100, 4000 / (1 + i) ** 2) for i in range(30)]))
    assert "G (log scale)" in falling and {"10", "100", "1,000"} <= set(falling)  # 4,000 to 5
    assert {"0", "1,000", "2,000"} <= set(falling) and "iteration" in falling  # iteration ticks
    long = [(i, 1.0 + i % 2) for i in range(0, 1_000_001, 50_000)]
    assert ">500k<" in magan.svg_chart("D", long)
    flat = labels(magan.svg_chart("cycle", [(i, 0.5 + 0.01 * (i % 3)) for i in range(10)]))
    assert "cycle" in flat and "0.5" in flat and "0.51" in flat  # a linear axis

def test_resume_from_another_folder_uses_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(HERE)
    run = magan.train(tiny_config(tmp_path, iters=2, a="data/trainA", b="data/trainB"))  # relative
    saved = json.loads((run / "config.json").read_text())
    assert Path(saved["a"]).is_absolute() and Path(saved["out"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3"]) == 0

def test_a_resume_without_out_continues_in_the_folder_it_read(tmp_path, monkeypatch):
    """A project copied elsewhere and resumed there, with the default --out: the copy reads and
    writes its own runs/magan; the original run is left as it was."""
    flags = ["--a", str(DATA / "trainA"), "--b", str(DATA / "trainB"), "--size", "32", "--ch", "8",
             "--n-res", "1", "--w-style", "0", "--w-content", "0", "--device", "cpu", "--workers",
             "0", "--log-every", "1", "--sample-every", "100", "--save-every", "2"]
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert magan.main(["train", *flags, "--iters", "2"]) == 0
    original = tmp_path / "first" / "runs" / "magan"
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    assert magan.main(["train", "--resume", "--iters", "3"]) == 0
    assert checkpoint_of(tmp_path / "copy" / "runs" / "magan")["iteration"] == 3
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
    saved = json.loads((tmp_path / "copy" / "runs" / "magan" / "config.json").read_text())
    assert saved["out"] == str(tmp_path / "copy" / "runs" / "magan")

def test_an_out_that_cannot_hold_a_run_is_refused_before_anything_else(tmp_path, monkeypatch,
                                                                       capsys):
    """--out a file, or inside one, or a folder that cannot be written: one line, before the
    data are even listed (the data folder here does not exist either)."""
    (tmp_path / "file").write_text("not a folder")
    missing = str(tmp_path / "no-such-data")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert magan.main(["train", "--a", missing, "--b", missing, "--out", str(out)]) == 2
        assert f"--out {out}: {tmp_path / 'file'} is a file" in capsys.readouterr().err
    monkeypatch.setattr(magan.os, "access", lambda path, mode: False)  # as a non-root user sees it
    assert magan.main(["train", "--a", missing, "--b", missing, "--out", str(tmp_path / "r")]) == 2
    assert "cannot be written to" in capsys.readouterr().err

def test_a_second_ctrl_c_exits_without_a_traceback(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(magan, "train", interrupted)
    assert magan.main(["train", "--data", str(DATA)]) == 130
    assert "aborted" in capsys.readouterr().err


# =================================================================================================
# Several processes (torchrun): data parallel on the CPU with gloo (section 12)
# =================================================================================================

# In fp32 with the plain memory layout (--no-fast): with channels_last, oneDNN runs other kernels
# for a batch of 1 and of 2, whose rounding differs far more (data/experiments.md, "torchrun").
DIST_FLAGS = ["--data", DATA, "--size", 32, "--ch", 8, "--n-res", 1, "--w-style", 0, "--w-content",
              0, "--device", "cpu", "--workers", 0, "--log-every", 2, "--sample-every", 100,
              "--no-fast"]

def weights_of(run: Path) -> dict:
    nets = checkpoint_of(run)["nets"]
    return {f"{net}.{k}": v for net, state in nets.items() for k, v in state.items()}

@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """2 processes x batch 1 for 4 iterations, launched by torchrun."""
    out = tmp_path_factory.mktemp("dist") / "two"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "magan.py"), "train", *map(str, DIST_FLAGS), "--iters", "4", "--save-every",
         "4", "--out", str(out)], capture_output=True, text=True, cwd=HERE, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result

def test_two_processes_train_like_one_with_the_global_batch(two_process_run, tmp_path):
    """Gradients averaged over 2 processes x batch 1 = the gradient of 1 process x batch 2 (every
    loss is a mean over the batch), so the weights agree to float rounding: within 4 times the gap
    between two one-process runs that differ only in their thread count (the same maths summed in
    another order), or 1e-8 (mean) and 1e-4 (largest: one Adam step) where that floor is smaller.
    Without the averaging the gap is about 230 times that floor (data/experiments.md)."""
    out, result = two_process_run
    config = dict(batch=2, iters=4, save_every=4, log_every=2, sample_every=100, fast=False,
                  w_style=0, w_content=0)
    one = weights_of(magan.train(tiny_config(tmp_path / "one", **config)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other_threads = weights_of(magan.train(tiny_config(tmp_path / "other", **config)))
    finally:
        torch.set_num_threads(threads)
    two = weights_of(out)
    def gap(weights):
        return torch.cat([(weights[k].float() - one[k].float()).abs().flatten() for k in one])
    floor, gaps = gap(other_threads), gap(two)
    assert gaps.mean() < max(1e-8, 4 * floor.mean()) and gaps.max() < max(1e-4, 4 * floor.max())
    assert result.stdout.count("done at iteration 4") == 1  # rank 0 alone speaks

def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(two_process_run[0], run)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "5", "--batch", "2"]) == 0
    assert checkpoint_of(run)["iteration"] == 5

def test_only_rank_0_writes_to_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # not rank 0 (alone in its world: no peers needed)
    run = magan.train(tiny_config(tmp_path, iters=2))
    assert not run.exists() or not any(run.rglob("*"))  # no config, log, grids, page, checkpoint

def test_a_gpu_index_is_refused_under_torchrun_and_beyond_the_machines_gpus(monkeypatch):
    """Under torchrun each process takes the GPU of its LOCAL_RANK: --device cuda:1 would put
    every process on GPU 1. A GPU the machine does not have is refused at once too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert magan.pick_device("cuda:1") == torch.device("cuda:1")
    assert magan.pick_device("cuda", local_rank=1, world=2) == torch.device("cuda:1")
    with pytest.raises(MaganError, match="each process takes its own GPU"):
        magan.pick_device("cuda:1", local_rank=0, world=2)
    with pytest.raises(MaganError, match="has 2 GPU"):
        magan.pick_device("cuda:2")

def wait_for_progress(process: subprocess.Popen, line_start="["):
    """Block until the run prints its first progress line: a condition, not a sleep."""
    for line in process.stdout:
        if line.startswith(line_start):
            return
    raise AssertionError(f"training ended before its first iteration: {process.stderr.read()}")

def test_sigterm_to_one_of_two_processes_stops_both_and_saves_once(tmp_path):
    """SIGTERM to rank 1 only (a scheduler may signal any): every rank stops on the same iteration,
    rank 0 saves once, every process exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, processes = tmp_path / "run", []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, str(HERE / "magan.py"), "train", *map(str, DIST_FLAGS), "--iters",
             "100000", "--log-every", "1", "--save-every", "100000", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, env=env))
    wait_for_progress(processes[0])
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in processes]
    errors = outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert [p.returncode for p in processes] == [0, 0], errors
    iteration = checkpoint_of(out)["iteration"]
    assert f"stopped at iteration {iteration} of" in outputs[0][0] and outputs[1][0] == ""


# =================================================================================================
# Translation and export (section 9)
# =================================================================================================

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-iteration run at 32 px: enough to have a real checkpoint."""
    return magan.train(tiny_config(tmp_path_factory.mktemp("trained"), iters=2, w_style=0,
                                   w_content=0))

def test_translate_writes_one_png_per_input_at_its_size_and_never_two_on_one(trained_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (50, 30), 128).save(inputs / "grey.png")                 # grey, not square
    Image.new("RGBA", (40, 70), (255, 0, 0, 100)).save(inputs / "alpha.png")  # transparency
    Image.new("P", (33, 33)).save(inputs / "palette.gif")
    Image.open(DATA / "testA" / "0000.jpg").save(inputs / "photo.jpg")
    for name in ("photo.png", "photo_jpg.png"):                # shared stems, and a name that
        Image.open(DATA / "testA" / "0001.jpg").save(inputs / name)  # the first rule would make
    ckpt = trained_run / "checkpoints" / "latest.pt"
    written = magan.translate(ckpt, inputs, tmp_path / "out", "b2a", "cpu")
    source_of = {"grey.png": "grey.png", "alpha.png": "alpha.png", "palette.png": "palette.gif",
                 "photo_jpg.png": "photo.jpg", "photo_png.png": "photo.png",
                 "photo_jpg_2.png": "photo_jpg.png"}
    assert sorted(p.name for p in written) == sorted(source_of)
    for path in written:
        assert Image.open(path).size == Image.open(inputs / source_of[path.name]).size
        assert Image.open(path).format == "PNG" and Image.open(path).mode == "RGB"
    # the translation is the generator's output, resized to the input's size (up to 8-bit rounding)
    G, _ = magan.load_generator(ckpt, "b2a", torch.device("cpu"))
    im = magan.load_rgb(inputs / "photo.jpg")
    with torch.no_grad():
        image = G(magan.to_tensor(im.resize((32, 32), Image.Resampling.BILINEAR))[None])[0][0]
    expected = magan.to_tensor(magan.to_pil(image).resize(im.size, Image.Resampling.BICUBIC))
    assert torch.equal(magan.to_tensor(Image.open(tmp_path / "out" / "photo_jpg.png")), expected)
    assert not (tmp_path / "out" / "heatmaps").exists()  # only when asked for

def test_translate_writes_the_attention_over_each_input_at_its_size(trained_run, tmp_path):
    """--heatmaps: OUT/heatmaps/STEM.png beside each translation, the input's size: half the
    photo, half the generator's heatmap in 'jet' colours (blue least attended, red most)."""
    (tmp_path / "in").mkdir()
    gradient_image(64, 48).save(tmp_path / "in" / "wide.png")
    Image.open(DATA / "testA" / "0000.jpg").save(tmp_path / "in" / "photo.jpg")
    ckpt = trained_run / "checkpoints" / "latest.pt"
    assert magan.main(["translate", "--ckpt", str(ckpt), "--input", str(tmp_path / "in"), "--out",
                       str(tmp_path / "out"), "--heatmaps", "--device", "cpu"]) == 0
    G, _ = magan.load_generator(ckpt, "a2b", torch.device("cpu"))
    for name, source in (("wide.png", "wide.png"), ("photo.png", "photo.jpg")):
        photo = magan.load_rgb(tmp_path / "in" / source)
        overlay = Image.open(tmp_path / "out" / "heatmaps" / name)
        assert overlay.size == photo.size and (tmp_path / "out" / name).is_file()
        with torch.no_grad():
            small = photo.resize((32, 32), Image.Resampling.BILINEAR)
            heatmap = G(magan.to_tensor(small)[None])[2]                      # (1, 1, 8, 8)
        t = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
        t = F.interpolate(t, size=photo.size[::-1], mode="bilinear", align_corners=False)
        t = t[0, 0]                                                           # (H, W) in [0, 1]
        jet = torch.stack([(1.5 - (4 * t - c).abs()).clamp(0, 1) for c in (3, 2, 1)])  # RGB
        expected = (magan.to_tensor(photo) + 1) / 4 + jet / 2                # in [0, 1]
        got = magan.to_tensor(overlay).add(1).div(2)
        assert (got - expected).abs().max() <= 1.01 / 255                  # 8-bit rounding

def test_translate_writes_a_large_jpeg_and_a_phone_photo_at_their_upright_size(trained_run,
                                                                             tmp_path):
    gradient_image(1024, 768).save(tmp_path / "big.jpg", quality=90)
    rotated = Image.new("RGB", (600, 200), (90, 120, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90°": a phone photo, upright 200 wide and 600 high
    rotated.save(tmp_path / "phone.jpg", exif=exif)
    for name, size in (("big", (1024, 768)), ("phone", (200, 600))):
        written = magan.translate(trained_run / "checkpoints" / "latest.pt",
                                  tmp_path / f"{name}.jpg", tmp_path / "out", device="cpu")
        assert [p.name for p in written] == [f"{name}.png"] and Image.open(written[0]).size == size

def test_translate_says_what_is_wrong_with_input_out_and_checkpoint(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "latest.pt"
    a_file = tmp_path / "taken.png"
    Image.new("RGB", (8, 8)).save(a_file)
    cases = [(DATA / "testA", a_file, "pass a folder"),                   # a folder into a file
             (tmp_path / "missing", tmp_path / "o", "does not exist"),
             (DATA / "testA", DATA / "testA", "not the input's"),           # over the originals
             (a_file, tmp_path, "not the input's"),                         # beside the input
             (DATA, tmp_path / "o", "dataset root"),
             (DATA / "testA" / "0000.jpg", a_file / "sub", "could not write")]  # a file for a dir
    for input_path, out, message in cases:
        with pytest.raises(MaganError, match=message):
            magan.translate(ckpt, input_path, out, device="cpu")
    with pytest.raises(MaganError, match="cannot read a checkpoint"):
        magan.translate(tmp_path / "missing.pt", DATA / "testA", tmp_path / "x", device="cpu")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(MaganError, match="not a magan checkpoint"):
        magan.translate(tmp_path / "foreign.pt", DATA / "testA", tmp_path / "x", device="cpu")
    result = run_magan("translate", "--ckpt", ckpt, "--input", DATA / "testA", "--out", a_file)
    assert result.returncode == 2 and result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr

def test_export_is_small_translates_alike_and_cannot_resume(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "latest.pt"
    assert magan.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "model.pt")]) == 0
    exported = tmp_path / "model.pt"
    assert exported.stat().st_size < ckpt.stat().st_size / 3
    cpu = torch.device("cpu")
    for (k, v), (_, w) in zip(magan.load_generator(exported, "a2b", cpu)[0].state_dict().items(),
                              magan.load_generator(ckpt, "a2b", cpu)[0].state_dict().items()):
        assert torch.equal(v, w), k
    assert magan.translate(exported, DATA / "testA" / "0001.jpg", tmp_path / "x", device="cpu")
    with pytest.raises(MaganError, match="an export only translates"):
        magan.load_checkpoint(exported)

def test_an_export_never_replaces_its_training_checkpoint(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "latest.pt"
    before = ckpt.read_bytes()
    for out in (ckpt, run / "checkpoints" / ".." / "checkpoints" / "latest.pt"):
        assert magan.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 2
        assert "is the checkpoint itself" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


# =================================================================================================
# KID (MAGAN §3.5.1, section 10)
# =================================================================================================

def naive_mmd2(x, y):
    def k(u, v):
        return (sum(a * b for a, b in zip(u, v)) / len(u) + 1) ** 3
    x, y = x.tolist(), y.tolist()
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy

def test_kid_blocks_against_naive_loop_unequal_sizes():
    torch.manual_seed(0)
    real, fake = torch.randn(23, 6), torch.randn(17, 6) + 0.3
    mean, std = magan.kid_from_features(real, fake, block_size=10)
    # ceil(23 / 10) = 3 blocks: real 7, 8, 8 rows; fake 5, 6, 6 (smaller blocks first, as TF-GAN)
    values, r0, f0 = [], 0, 0
    for nr, nf in [(7, 5), (8, 6), (8, 6)]:
        values.append(naive_mmd2(real[r0:r0 + nr], fake[f0:f0 + nf]))
        r0, f0 = r0 + nr, f0 + nf
    assert mean == pytest.approx(sum(values) / 3, rel=1e-9)
    variance = sum((v - sum(values) / 3) ** 2 for v in values) / 2  # unbiased over the 3 blocks
    assert std == pytest.approx(math.sqrt(variance / 3), rel=1e-9)  # the mean's standard error
    with pytest.raises(MaganError, match="at least 2 of each"):
        magan.kid_from_features(real, torch.zeros(3, 6))

def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    g = torch.Generator().manual_seed(0)
    real, same = torch.randn(400, 2048, generator=g), torch.randn(400, 2048, generator=g)
    shifted = torch.randn(400, 2048, generator=g) + 0.5
    m_same, s_same = magan.kid_from_features(real, same, block_size=100)
    m_shift, s_shift = magan.kid_from_features(real, shifted, block_size=100)
    assert abs(m_same) < 3 * s_same + 1e-3 and m_shift > 10 * s_shift
    assert m_shift > 100 * abs(m_same)

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(magan.fid_inception_v3().state_dict(), path)
    return path

def test_fid_inception_loads_saved_weights_and_gives_2048_features(tmp_path, inception_weights):
    net = magan.load_inception(str(inception_weights))
    saved = torch.load(inception_weights)["Conv2d_1a_3x3.conv.weight"]
    assert torch.equal(net.Conv2d_1a_3x3.conv.weight, saved)
    with torch.no_grad():  # the pool before the classifier
        assert net(torch.rand(2, 3, 299, 299) * 2 - 1).shape == (2, 2048)
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(MaganError, match="--inception-weights"):
        magan.load_inception(str(tmp_path / "bad.pth"))

@pytest.mark.parametrize("block,channels,pool", [
    ("Mixed_5b", 192, "average"), ("Mixed_6b", 768, "average"), ("Mixed_7b", 1280, "average"),
    ("Mixed_7c", 2048, "max")])
def test_fid_inception_pools_as_the_tf_graph_kid_was_defined_on(inception_weights, block,
                                                                 channels, pool):
    """pytorch-fid's port of the 2015 TF graph: each Mixed block's pooling branch averages without
    counting the padding, except Mixed_7c's, a 3x3 max-pool. The branch is the block's last
    channels; torchvision's own Inception would average with the padding counted."""
    torch.manual_seed(0)
    mixed = getattr(magan.load_inception(str(inception_weights)), block)
    x = torch.randn(1, channels, 9, 9)
    def windows(t, fill):  # every 3x3 window, stride 1, of t padded by one pixel of `fill`
        return F.pad(t, (1, 1, 1, 1), value=fill).unfold(2, 3, 1).unfold(3, 3, 1)  # (…, 9, 9, 3, 3)
    if pool == "max":
        pooled = windows(x, -math.inf).amax(dim=(-2, -1))
    else:  # the sum over each window's pixels inside the image, over their number
        inside = windows(torch.ones(1, 1, 9, 9), 0.0).sum(dim=(-2, -1))
        pooled = windows(x, 0.0).sum(dim=(-2, -1)) / inside
    with torch.no_grad():
        out, branch = mixed(x), mixed.branch_pool(pooled)
    assert torch.allclose(out[:, -branch.shape[1]:], branch, atol=1e-5)

def truncated_jpegs(folder: Path) -> Path:
    """A folder of three JPEGs cut to a third: their headers read, their pixels do not decode."""
    folder.mkdir()
    data = (DATA / "testA" / "0000.jpg").read_bytes()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(data[: len(data) // 3])
    return folder

def test_kid_command_line_and_its_errors(tmp_path, inception_weights):
    result = run_magan("kid", "--real", DATA / "testA", "--fake", DATA / "testB",
                       "--inception-weights", inception_weights, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "KID×100 = " in result.stdout and "20 real, 20 fake" in result.stdout
    missing = run_magan("kid", "--real", DATA / "testA", "--fake", DATA / "testB",
                        "--inception-weights", tmp_path / "nope.pth")
    assert missing.returncode == 2 and "--inception-weights" in missing.stderr
    assert "Traceback" not in missing.stderr
    with pytest.raises(MaganError, match="could be decoded"):
        magan.kid_between_folders(DATA / "testA", truncated_jpegs(tmp_path / "broken"),
                                  str(inception_weights), "cpu")

def test_kid_of_one_block_says_it_has_no_spread(tmp_path, inception_weights, capsys):
    for name in ("real", "fake"):
        (tmp_path / name).mkdir()
        for i in range(3):
            shutil.copy(DATA / "testA" / f"000{i}.jpg", tmp_path / name / f"{i}.jpg")
    magan.kid_between_folders(tmp_path / "real", tmp_path / "fake", str(inception_weights), "cpu")
    out = capsys.readouterr().out
    assert "KID×100 = " in out and "one block" in out and "nan" not in out


# =================================================================================================
# The command line, bench, the README and CI (section 11)
# =================================================================================================

def test_the_docstring_examples_run_and_show_the_promised_shapes():
    """The >>> examples of MultiAngleAttention, Generator, Discriminator and kid_from_features."""
    results = doctest.testmod(magan, verbose=False)
    examples = {t.name for t in doctest.DocTestFinder().find(magan) if t.examples}
    assert {"magan.MultiAngleAttention", "magan.Generator", "magan.Discriminator",
            "magan.kid_from_features"} <= examples
    assert results.failed == 0 and results.attempted >= 12

@pytest.mark.parametrize("argv,message", [
    (["train", "--size", "100"], "not a multiple of 32"),
    (["train", "--iters", "0"], "must be a positive integer"),
    (["train", "--w-style", "-1"], "must be a finite number >= 0"),
    (["train", "--w-cam", "nan"], "must be a finite number >= 0"),
    (["train", "--device", "tpu"], "is not a device"),
    (["train", "--attention", "foo"], "invalid choice"),
    (["train", "--p-gen", "0.5"], "must be at least 1"),
    (["train", "--preset", "fast"], "invalid choice"),
    (["translate", "--ckpt", "c", "--input", "i"], "required: --out"),
    (["train", "--img_size", "256"], "unrecognized arguments"),
])
def test_bad_arguments_are_parse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        magan.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

def test_every_flag_has_help_and_no_empty_default_is_shown():
    commands = magan.build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings}"
        assert "(default: )" not in parser.format_help(), name

def test_no_arguments_prints_help_and_requirements_exclude_old_torch(capsys):
    assert magan.main([]) == 0 and "train" in capsys.readouterr().out
    # torch 2.3: spectral norm under CUDA autocast crashes (pytorch#125544); torch 2.4:
    # torch.autocast("mps", enabled=False) raises, and gram_matrix needs it on Apple's GPUs
    lines = (HERE / "requirements.txt").read_text().split()
    floors = dict(line.split(">=") for line in lines if ">=" in line)
    assert tuple(int(v) for v in floors["torch"].split(".")[:2]) >= (2, 5)
    assert tuple(int(v) for v in floors["torchvision"].split(".")[:2]) >= (0, 20)

def test_bench_times_training_iterations_and_takes_the_preset_then_typed_flags(monkeypatch,
                                                                                capsys):
    result = magan.bench(Config(size=32, ch=8, n_res=1, device="cpu"), iters=2, warmup=1)
    assert result["ms_per_iter"] > 0 and result["peak_gib"] > 0
    out = capsys.readouterr().out
    assert "ms per iteration" in out and "1,000,000 iterations:" in out
    seen = {}
    def bench(cfg, iters, warmup):
        seen.update(cfg=cfg, iters=iters)
    monkeypatch.setattr(magan, "bench", bench)
    assert magan.main(["bench", "--preset", "laptop", "--size", "32", "--iters", "3"]) == 0
    cfg = seen["cfg"]
    assert (cfg.size, cfg.ch, cfg.detail_skip, seen["iters"]) == (32, 16, True, 3)

def test_device_auto_prefers_cuda_then_apples_mps_then_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert magan.pick_device("auto") == magan.pick_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert magan.pick_device("auto") == torch.device("cpu")
    with pytest.raises(MaganError, match="no such GPU"):
        magan.pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert magan.pick_device("auto", local_rank=1) == torch.device("cuda:1")

def test_compile_that_cannot_work_here_is_said_and_skipped(tmp_path, monkeypatch, capsys):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", no_compiler)
    magan.train(tiny_config(tmp_path, iters=1, compile=True, sample_every=100, w_style=0,
                            w_content=0))
    out = capsys.readouterr().out
    assert "--compile is off: torch.compile fails here (RuntimeError: no C++ compiler" in out

def readme_commands(prefix: str) -> list[str]:
    """The lines of the README's code blocks that start with `prefix`, comments cut off."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith(prefix)]

def test_every_python_magan_command_in_the_readme_parses():
    """Each `python magan.py ...` line of the README's code blocks parses: its command and flags."""
    commands = [line.split("python magan.py", 1)[1].split()
                for line in readme_commands("python magan.py")]
    assert len(commands) >= 6
    for argv in commands:
        try:
            magan.build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: python magan.py {' '.join(argv)}")

def test_ci_runs_exactly_the_readmes_install_and_test_commands():
    """What a newcomer types is what CI proves: every command .ci/run runs is a line of the
    README, and the README's install and test lines are all there."""
    ci = [line.strip() for line in (HERE / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    readme = readme_commands("python -m ")
    assert ci == [line for line in readme if "pip install" in line or "pytest" in line]
    assert ci[-1] == "python -m pytest -q test_magan.py" and len(ci) >= 3


# #################################################################################################
# Robustness: bad input, interrupted runs, full disks, untrusted files. Nothing here is the paper.
# #################################################################################################

def messy_folder(root: Path) -> Path:
    """Good images in every odd mode, plus files that are not (readable) images."""
    root.mkdir(parents=True)
    good = Image.open(DATA / "trainA" / "0000.jpg")
    good.save(root / "good.jpg")
    good.convert("L").save(root / "grey.png")
    good.convert("P").save(root / "palette.png")
    Image.new("I;16", (40, 30), 40000).save(root / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(root / "huge.jpg", quality=70)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root

def test_odd_images_are_converted_and_broken_ones_skipped(tmp_path):
    folder = messy_folder(tmp_path / "messy")
    assert "notes.txt" not in [p.name for p in magan.list_images(folder)]
    data = magan.UnpairedImages(folder, folder, 32, seed=0)
    skipped = set()
    for k in range(len(data.files[0])):
        x_a, x_b, bad = data[k]
        assert x_a.shape == x_b.shape == (3, 32, 32) and x_a.min() >= -1 and x_a.max() <= 1
        skipped.update(name.split(" (")[0] for name in bad)
    assert skipped == {str(folder / "truncated.jpg"), str(folder / "zero_bytes.jpg")}
    sixteen = magan.load_rgb(folder / "sixteen_bit.png")
    assert sixteen.mode == "RGB" and sixteen.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256

def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))          # blue on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6                               # "rotate 90° clockwise to display"
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = magan.load_rgb(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)                # portrait, as the phone showed it
    r, g, b = upright.getpixel((10, 5))            # the left edge is now the top
    assert b > 200 and r < 60

def test_training_reports_a_bad_file_once(tmp_path, capsys):
    folder = messy_folder(tmp_path / "messy")
    n = len(magan.list_images(folder))
    magan.train(tiny_config(tmp_path, a=str(folder), b=str(folder), iters=2 * n, log_every=100,
                            sample_every=100, save_every=100, w_style=0, w_content=0))
    out = capsys.readouterr().out
    assert out.count("skipping unreadable image") == 2 and out.count("truncated.jpg") == 1

@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no image in"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "no image in"),
    (lambda p: truncated_jpegs(p), "can be decoded"),
    (lambda p: p.write_text("a file"), "is a file"),
])
def test_unusable_folders_are_clear_errors_before_training(tmp_path, make, message):
    folder = tmp_path / "folder"
    make(folder)
    with pytest.raises(MaganError, match=message):
        magan.train(tiny_config(tmp_path, a=str(folder)))
    assert not (tmp_path / "run").exists()

def start_training(out: Path, workers: int, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "magan.py"), "train", "--size", "32", "--ch", "8", "--n-res",
         "1", "--iters", "100000", "--log-every", "1", "--save-every", "100000", "--sample-every",
         "100000", "--workers", str(workers), "--device", "cpu", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
        start_new_session=new_session)

@pytest.mark.parametrize("sig,workers", [("SIGINT", 0), ("SIGTERM", 0),
                                         ("SIGTERM to the group", 2)])
def test_a_stop_signal_saves_and_exits_cleanly(tmp_path, sig, workers):
    """Ctrl-C, or SIGTERM as a scheduler sends it; `timeout`, SLURM and systemd signal the whole
    process group, data workers included: one save, exit code 0, no traceback."""
    process = start_training(tmp_path / "run", workers, new_session=workers > 0)
    wait_for_progress(process)
    if workers:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(getattr(signal, sig))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    iteration = checkpoint_of(tmp_path / "run")["iteration"]
    assert stdout.count(f"stopped at iteration {iteration} of") == 1 and "--resume" in stdout

def test_a_stop_signal_during_sampling_stops_the_run_saved(tmp_path, monkeypatch):
    """A Ctrl-C that lands while the grids of iteration 3 are drawn: the run stops after the next
    iteration, everything written there, instead of going on to 10."""
    draw, signalled = magan.sample_grid, []

    def draw_then_ctrl_c(*args):
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return draw(*args)
    monkeypatch.setattr(magan, "sample_grid", draw_then_ctrl_c)
    run = magan.train(tiny_config(tmp_path, iters=10, sample_every=3, save_every=100))
    assert_the_run_stopped_whole_at(run, 4)

def test_the_signal_handler_only_sets_a_flag(monkeypatch):
    """Printing from a signal handler crashes when the signal lands during another print."""
    def no_print(*args, **kwargs):
        pytest.fail("the handler printed")
    with magan.StopOnSignal() as stop:
        monkeypatch.setattr("builtins.print", no_print)
        stop.handle(signal.SIGTERM, None)
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            stop.handle(signal.SIGINT, None)
        monkeypatch.undo()

def test_an_unexpected_error_ends_the_process_in_seconds_with_its_workers_stopped(tmp_path):
    """A bug, a GPU out of memory, anything but a MaganError, raised inside the loop of a run
    with a data worker (the default on 2 cores): the traceback, a non-zero exit within the
    time limit (not a process that waits for its workers for ever), and no worker left behind."""
    out = tmp_path / "run"
    script = ("import sys, magan\n"
              "def step(*args, **kwargs):\n"
              "    raise RuntimeError('a bug in the step')\n"
              "magan.train_step = step\n"
              "sys.exit(magan.main(sys.argv[1:]))\n")
    result = subprocess.run(
        [sys.executable, "-c", script, "train", "--size", "32", "--ch", "8", "--n-res", "1",
         "--workers", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=HERE, timeout=90)
    assert result.returncode == 1 and "RuntimeError: a bug in the step" in result.stderr
    left = [pid for pid in os.listdir("/proc") if pid.isdigit()
            and str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert left == []

def test_a_full_disk_ends_the_run_in_one_line_with_the_last_checkpoint_whole(tmp_path):
    """A real full filesystem (a 6 MB tmpfs in a private mount namespace), with a data worker:
    the first checkpoint (4.3 MB) fits, the second cannot (its temporary copy needs as much
    again). torch.save fails there with a RuntimeError, not an OSError. The run ends with one
    line that says so and how to go on; latest.pt holds iteration 2, and no .tmp is left."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("needs `unshare -rm` (a private mount namespace) for a real full filesystem")
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    train = (f"{sys.executable} {HERE / 'magan.py'} train --size 32 --ch 8 --n-res 1 --iters 6 "
             f"--log-every 1 --sample-every 2 --save-every 2 --device cpu --out {small}/run")
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=6m tmpfs {small} && {train}; "
         f"status=$?; cp -a {small}/run {kept}; exit $status"],
        capture_output=True, text=True, cwd=HERE, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith(f"error: could not write {small}/run/checkpoints")
    assert "if the disk is full, free some space" in error[0]
    assert "holds iteration 2, intact: continue with" in error[0] and "--resume" in error[0]
    assert magan.load_checkpoint(kept / "checkpoints" / "latest.pt")["iteration"] == 2
    assert not list(kept.rglob("*.tmp"))

def test_a_crash_while_writing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The same, for an OSError half way through (a disk, a network filesystem)."""
    run = magan.train(tiny_config(tmp_path, iters=2))
    latest = run / "checkpoints" / "latest.pt"
    before = latest.read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(magan.torch, "save", dying_save)
    with pytest.raises(MaganError, match="holds iteration 2, intact"):
        magan.train(tiny_config(tmp_path, iters=4, resume=True))
    assert latest.read_bytes() == before and not list((run / "checkpoints").glob("*.tmp"))

def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                             monkeypatch):
    style_loss, calls = magan.style_loss, []

    def style_loss_going_nan(a, b):  # called twice per iteration: NaN from iteration 3 on
        calls.append(1)
        return style_loss(a, b) * (float("nan") if len(calls) > 4 else 1.0)
    monkeypatch.setattr(magan, "style_loss", style_loss_going_nan)
    with pytest.raises(MaganError, match=r"style.* became NaN or infinite by iteration 4; "
                                         r".* holds iteration 2"):
        magan.train(tiny_config(tmp_path, iters=6, save_every=2, log_every=2))
    ckpt = checkpoint_of(tmp_path / "run")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for net in ckpt["nets"].values() for v in net.values()
               if v.is_floating_point())
    monkeypatch.setattr(magan, "cam_loss", lambda s, t: torch.tensor(float("nan")))
    with pytest.raises(MaganError, match="no checkpoint was saved yet: start again, with a lower"):
        magan.train(tiny_config(tmp_path, out=str(tmp_path / "new"), iters=4))

class Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse it."""
    def __reduce__(self):
        return (print, ("this must never run",))

def test_truncated_random_foreign_old_and_malicious_checkpoints(trained_run, tmp_path, capsys):
    good = (trained_run / "checkpoints" / "latest.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 20)
    torch.save({"format": magan.CHECKPOINT_FORMAT, "payload": Payload()}, tmp_path / "evil.pt")
    for name in ("truncated.pt", "noise.pt", "evil.pt"):
        with pytest.raises(MaganError, match="cannot read a checkpoint"):
            magan.load_checkpoint(tmp_path / name)
    assert "this must never run" not in capsys.readouterr().out
    ckpt = magan.load_checkpoint(trained_run / "checkpoints" / "latest.pt")
    torch.save({**ckpt, "format": "magan-checkpoint-v2"}, tmp_path / "old.pt")
    with pytest.raises(MaganError, match="magan-checkpoint-v2, from an earlier magan.py"):
        magan.load_checkpoint(tmp_path / "old.pt")

@pytest.mark.parametrize("change,message", [
    (dict(ch=16), "weights do not fit its config"),            # a config the weights do not fit
    (dict(size=100), "size = 100, which --size refuses"),      # no flag allows it
    (dict(attention="all"), "attention = 'all', which --attention refuses"),
    (dict(ch="8"), "ch = '8', which --ch refuses"),            # a string where a number goes
    (dict(light=1), "light = 1, which --light refuses"),
    (dict(lr=float("nan")), "lr = nan, which --lr refuses"),
    (dict(w_cam=None), "its config lacks w_cam"),              # a key gone
])
def test_a_checkpoints_config_is_checked_like_the_command_line(trained_run, tmp_path, change,
                                                                message):
    ckpt = magan.load_checkpoint(trained_run / "checkpoints" / "latest.pt")
    config = {k: v for k, v in {**ckpt["config"], **change}.items() if v is not None}
    for kind in (magan.CHECKPOINT_FORMAT, magan.EXPORT_FORMAT):
        torch.save({**ckpt, "format": kind, "config": config}, tmp_path / "bad.pt")
        with pytest.raises(MaganError, match=re.escape(message)):
            magan.load_generator(tmp_path / "bad.pt", "a2b", torch.device("cpu"))

@pytest.mark.parametrize("change", [dict(iteration="7"), dict(iteration=-1),
                                    dict(seconds_used="1")])
def test_a_checkpoints_iteration_and_time_used_are_checked(trained_run, tmp_path, change):
    ckpt = magan.load_checkpoint(trained_run / "checkpoints" / "latest.pt")
    torch.save({**ckpt, **change}, tmp_path / "bad.pt")
    with pytest.raises(MaganError, match="is not one a run could have saved"):
        magan.load_checkpoint(tmp_path / "bad.pt")

def test_a_crafted_export_is_refused_before_its_networks_take_any_memory(trained_run, tmp_path):
    """An export whose config asks for full-mode networks of width 512 (1.7 GB for the one
    generator translate builds) around the tiny run's weights: refused, with the process's peak
    memory where it was (in a fresh process: the peak is a high-water mark)."""
    ckpt = magan.load_checkpoint(trained_run / "checkpoints" / "latest.pt")
    crafted = {"format": magan.EXPORT_FORMAT, "iteration": 2,
               "config": {**ckpt["config"], "ch": 512, "light": False},
               "nets": {name: ckpt["nets"][name] for name in ("G_ab", "G_ba")}}
    torch.save(crafted, tmp_path / "crafted.pt")
    script = ("import resource, sys, magan\n"
              "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
              "before = peak()\n"
              "try:\n"
              "    magan.translate(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu')\n"
              "except magan.MaganError as e:\n"
              "    print(e)\n"
              "print(peak() - before)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "crafted.pt"),
                             str(DATA / "testA"), str(tmp_path / "out")], capture_output=True,
                            text=True, cwd=HERE, timeout=120)
    message, grown_mib = result.stdout.splitlines()
    assert "the weights do not fit its config" in message and int(grown_mib) < 300

def changed(value):
    """Another value of a Config field's type, to try it with."""
    return {bool: lambda v: not v, int: lambda v: 2 * v, float: lambda v: v + 1.0,
            str: lambda v: {"ma": "cam", "lsgan": "bce"}.get(v, v + "x")}[type(value)](value)

def test_every_setting_that_changes_the_networks_is_kept_at_resume(trained_run, tmp_path,
                                                                   capsys):
    """Found by trying each Config field, not by reading a list: the ones whose change gives
    other weight shapes, or other outputs from the same weights, define the networks; a resume
    that changes one is refused (the weights would be used in networks they were not trained in).
    Among them the detail skip, a step that changes the output with the same weights."""
    base, x = Config(size=32, ch=8, n_res=1), random_images(2, 32, 0)
    def outputs(cfg, weights):
        torch.manual_seed(0)
        nets = MAGAN(cfg).eval()
        shapes = {k: v.shape for k, v in nets.state_dict().items()}
        if weights is None or shapes != {k: v.shape for k, v in weights.items()}:
            return shapes, None
        nets.load_state_dict(weights)
        with torch.no_grad():
            return shapes, [t for G in nets.generators for t in G(x)] + [
                t for D in nets.discriminators for t in D(x)]
    torch.manual_seed(0)
    weights = MAGAN(base).state_dict()
    shapes, reference = outputs(base, weights)
    defining = []
    for f in dataclasses.fields(Config):
        other = dataclasses.replace(base, **{f.name: changed(getattr(base, f.name))})
        other_shapes, other_out = outputs(other, weights)
        same = other_shapes == shapes and all(map(torch.equal, reference, other_out))
        if not same:
            defining.append(f.name)
    assert "detail_skip" in defining and "p_gen" in defining and "lr" not in defining
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    saved = checkpoint_of(run)["config"]
    for name in defining:
        value = changed(saved[name])
        flag = f"--{name.replace('_', '-')}"
        on_off = [flag if value else f"--no-{flag[2:]}"]
        typed = on_off if type(value) is bool else [flag, str(value)]
        argv = ["train", "--out", str(run), "--resume", "--iters", "5", *typed]
        assert magan.main(argv) == 2, name
        assert f"the run was trained with {saved[name]!r}" in capsys.readouterr().err, name

def test_resume_takes_the_checkpoints_config_and_only_the_flags_typed_now(trained_run, tmp_path,
                                                                          capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert magan.main(["train", "--out", str(run), "--resume", "--ch", "16"]) == 2
    assert "--ch 16: the run was trained with 8" in capsys.readouterr().err
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3", "--preset",
                       "ugatit"]) == 2
    assert "--preset applies to a new run" in capsys.readouterr().err
    assert magan.main(["train", "--out", str(run), "--resume"]) == 2
    assert "pass a larger --iters" in capsys.readouterr().err
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3", "--weight-decay",
                       "0"]) == 0
    ckpt = checkpoint_of(run)
    assert ckpt["iteration"] == 3 and (ckpt["config"]["size"], ckpt["config"]["ch"]) == (32, 8)
    assert all(group["weight_decay"] == 0 for group in ckpt["opt_G"]["param_groups"])  # what ran
    with pytest.raises(MaganError, match="pass --resume"):
        magan.train(tiny_config(trained_run.parent, out=str(trained_run)))  # never over a run

def test_resume_with_new_data_trains_on_the_new_folders(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    root = tmp_path / "other"
    for domain in ("trainA", "trainB"):
        solid_folder(root / domain, 3)
    seen, read = [], magan.UnpairedImages.__init__

    def reading(self, a, b, size, seed):
        seen.append((a, b))
        read(self, a, b, size, seed)
    monkeypatch.setattr(magan.UnpairedImages, "__init__", reading)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3", "--data",
                       str(root)]) == 0
    assert seen == [(str(root / "trainA"), str(root / "trainB"))]
    assert json.loads((run / "config.json").read_text())["a"] == str(root / "trainA")


# =================================================================================================
# The laptop recipe: the detail skip (section 15; not the paper)
# =================================================================================================

def test_fine_detail_by_hand():
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(magan.fine_detail(flat), torch.zeros_like(flat))     # no detail at all
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1  # ±1, period 2
    checker = checker.expand(1, 3, 8, 8)
    assert torch.allclose(magan.fine_detail(checker), checker)  # every 4x4 cell averages to 0
    # one white 4x4 cell in a black 8x8 image: 4x4 averages [[1, −1], [−1, −1]]. Resized back
    # bilinearly (pixel i samples the 2x2 grid at (i + 0.5)/4 − 0.5, clamped to [0, 1]), row 0
    # of the blur runs 1, 1, 0.75, 0.25, −0.25, −0.75, −1, −1 across the cell's edge; x − blur:
    cell = torch.full((1, 3, 8, 8), -1.0)
    cell[..., :4, :4] = 1.0
    detail = magan.fine_detail(cell)
    row = torch.tensor([0, 0, 0.25, 0.75, -0.75, -0.25, 0, 0]).expand(3, 8)
    assert torch.allclose(detail[0, :, 0], row)
    assert torch.allclose(detail[0, :, 7], torch.zeros(3, 8))  # far from the cell: nothing

def test_detail_skip_adds_the_inputs_fine_detail_and_stays_in_range():
    """G(x) = clamp(tanh(network(x)) + x − blur(x), −1, 1): with the same weights, the paper's
    generator's image plus the detail, clamped; a network that draws grey gives x − blur(x); and
    no value leaves [-1, 1], where the unclamped sum reaches beyond on high-contrast inputs."""
    torch.manual_seed(0)
    plain = Generator(ch=4, n_res=1, size=32)
    skip = magan.DetailSkipGenerator(ch=4, n_res=1, size=32)
    skip.load_state_dict(plain.state_dict())  # the same keys: a checkpoint fits either
    x = random_images(2, 32, 1).sign()                            # every pixel at ±1: much detail
    unclamped = plain(x)[0] + magan.fine_detail(x)
    assert unclamped.abs().max() > 1.2                            # the sum alone leaves the range
    assert torch.allclose(skip(x)[0], unclamped.clamp(-1, 1), atol=1e-6)
    nn.init.zeros_(skip.decoder[-1].weight)                       # a network that draws grey (0)
    blur = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(skip(x)[0], (x - blur).clamp(-1, 1), atol=1e-6)
    assert type(MAGAN(Config(size=32, ch=4, n_res=1, detail_skip=True)).G_ab) is type(skip)

def test_a_detail_skip_model_changes_the_photo_at_its_own_size(tmp_path):
    """With the detail skip, translate adds the generator's change G(x) − x, drawn at 32 px and
    resized, to the 64x48 photo itself: its fine detail stays sharp instead of being resized."""
    run = magan.train(tiny_config(tmp_path, iters=2, detail_skip=True, w_style=0, w_content=0))
    photo = gradient_image(64, 48)
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "photo.png")
    ckpt = run / "checkpoints" / "latest.pt"
    written = magan.translate(ckpt, tmp_path / "in" / "photo.png", tmp_path / "out", device="cpu")
    G, _ = magan.load_generator(ckpt, "a2b", torch.device("cpu"))
    x = magan.to_tensor(photo.resize((32, 32), Image.Resampling.BILINEAR))[None]  # (1, 3, 32, 32)
    with torch.no_grad():
        change = G(x)[0] - x
    resized = F.interpolate(change, size=(48, 64), mode="bilinear", align_corners=False)[0]
    expected = magan.to_tensor(photo) + resized
    got = magan.to_tensor(Image.open(written[0]))                                 # (3, 48, 64)
    assert (got - expected.clamp(-1, 1)).abs().max() <= 1.01 / 127.5              # 8-bit rounding


# #################################################################################################
# CUDA: run only where a GPU is present (skipped in CI)
# #################################################################################################

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

@requires_cuda
def test_cuda_fast_path_matches_fp32_on_one_step(tmp_path):
    """bf16 autocast and channels_last on the GPU against fp32 from the same weights. Tolerance:
    each loss within 2% (bf16 keeps 8 bits of mantissa; CUDA autocast casts more ops than CPU's)."""
    results = []
    for fast in (False, True):
        cfg = tiny_config(tmp_path, size=64, device="cuda", fast=fast)
        nets, vgg, opt_G, opt_D, autocast = magan.build(cfg, torch.device("cuda"))
        x_a, x_b = (magan.to_device(random_images(1, 64, s), torch.device("cuda"), fast)
                    for s in (1, 2))
        results.append(magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast))
    for name in results[0]:
        assert results[1][name].item() == pytest.approx(results[0][name].item(), rel=0.02,
                                                        abs=1e-6), name

@requires_cuda
def test_cuda_training_with_compile_resumes_across_devices_and_translates(tmp_path,
                                                                         inception_weights):
    run = magan.train(tiny_config(tmp_path, size=64, device="cuda", compile=True, iters=3,
                                  save_every=3))
    magan.train(tiny_config(tmp_path, size=64, device="cpu", iters=4, save_every=4, resume=True))
    magan.train(tiny_config(tmp_path, size=64, device="cuda", iters=5, save_every=5, resume=True))
    ckpt = checkpoint_of(run)
    assert ckpt["iteration"] == 5
    assert all(torch.isfinite(v).all() for net in ckpt["nets"].values() for v in net.values()
               if v.is_floating_point())
    written = magan.translate(run / "checkpoints" / "latest.pt", DATA / "testA", tmp_path / "out",
                              device="cuda")
    assert len(written) == 20
    on_gpu = magan.kid_between_folders(DATA / "testB", tmp_path / "out", str(inception_weights),
                                       "cuda")
    on_cpu = magan.kid_between_folders(DATA / "testB", tmp_path / "out", str(inception_weights),
                                       "cpu")
    assert on_gpu[0] == pytest.approx(on_cpu[0], rel=1e-3, abs=1e-6)  # TF32 must not leak into KID
