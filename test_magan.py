"""Tests for magan.py: its executable specification. Run: python -m pytest -q test_magan.py

The sections follow magan.py, which follows the papers: normalisation, attention, generator,
discriminator, losses (and the other papers' ideas), data, training (and several processes),
translation, KID, command line; then a user's first hour, robustness, and CUDA (skipped without a
GPU). Each test checks a property the papers fix against an independent computation (a naive loop,
a closed form, numbers worked by hand, a PIL or torch.nn.functional reference), never against a
second call of the same code. Everything runs on CPU at 32-64 px with narrow networks and a
randomly initialised VGG: no download, no GPU."""

import dataclasses
import doctest
import json
import math
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils import parametrize

import magan
from magan import (LIN, MAGAN, AdaLIN, Config, Discriminator, Generator, MaganError, MultiAngleAttention,
                   adversarial_loss, cam_loss, content_loss, gram_matrix, style_loss)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


def tiny_config(tmp_path, **overrides) -> Config:
    """A config that trains in a fraction of a second per iteration on CPU."""
    base = dict(a=str(DATA / "trainA"), b=str(DATA / "trainB"), out=str(tmp_path / "run"),
                size=32, ch=8, n_res=1, iters=4, vgg_weights="random", device="cpu", workers=0,
                log_every=2, sample_every=2, save_every=2, snapshot_every=4, n_samples=2)
    return Config(**{**base, **overrides})


def make_step_objects(cfg: Config, seed: int = 0, fast: bool = False):
    torch.manual_seed(seed)
    nets = MAGAN(cfg)
    vgg = magan.load_vgg(cfg.vgg_weights)
    nets, vgg, autocast = magan.place_networks(nets, vgg, torch.device("cpu"), fast, bf16=fast)  # bf16 even if emulated
    opt_G, opt_D = magan.make_optimizers(nets, cfg, fast)
    return nets, vgg, opt_G, opt_D, autocast


def random_images(n, size, seed):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


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
    """MAGAN eq. 1-2 by loops: logits (ξ_gap, ξ_gmp, ξ_sam) and a = act(Conv1x1([ω_β θ, ω_α θ, ω_γ θ])).
    γ = Σ_n |θ_n|^p, scaled to unit root-mean-square over the h·w positions."""
    B, C, h, w = theta.shape
    logits = []
    for b in range(B):
        xi_gap = sum(w_gap[n].item() * theta[b, n].mean().item() for n in range(C))
        xi_gmp = sum(w_gmp[n].item() * theta[b, n].max().item() for n in range(C))
        gamma = [[sum(abs(theta[b, n, i, j].item()) ** p for n in range(C)) for j in range(w)] for i in range(h)]
        rms = math.sqrt(sum(g * g for row in gamma for g in row) / (h * w))
        xi_sam = sum(w_sam[i * w + j].item() * gamma[i][j] / rms for i in range(h) for j in range(w))
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
            rows.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                         m.bias is not None, "SN" if sn else ""))
        elif isinstance(m, nn.Linear):
            rows.append(("linear", m.in_features, m.out_features, m.bias is not None, "SN" if sn else ""))
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
        lin.gamma.copy_(g.view(1, 4, 1, 1))
        lin.beta.copy_(b.view(1, 4, 1, 1))
    expected = naive_instance_layer_mix(x, rho) * g.view(1, 4, 1, 1) + b.view(1, 4, 1, 1)
    assert torch.allclose(lin(x), expected, atol=1e-5)


def test_adalin_limits_are_torch_instance_and_layer_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    gamma, beta = torch.randn(2, 6), torch.randn(2, 6)
    norm = AdaLIN(6)
    with torch.no_grad():
        norm.rho.fill_(1.0)
        expected = F.instance_norm(x, eps=1e-5) * gamma[:, :, None, None] + beta[:, :, None, None]
        assert torch.allclose(norm(x, gamma, beta), expected, atol=1e-5)
        norm.rho.fill_(0.0)
        expected = F.layer_norm(x, x.shape[1:], eps=1e-5) * gamma[:, :, None, None] + beta[:, :, None, None]
        assert torch.allclose(norm(x, gamma, beta), expected, atol=1e-5)


def test_rho_starts_at_one_in_adalin_and_zero_in_lin():
    # U-GAT-IT §2.1.1: ρ is 1 in the decoder's residual blocks and 0 in its up-sampling blocks.
    G = Generator(ch=4, n_res=2, size=32)
    adalins = [m for m in G.modules() if isinstance(m, AdaLIN)]
    lins = [m for m in G.modules() if isinstance(m, LIN)]
    assert len(adalins) == 4 and len(lins) == 2  # two per residual block; one per up-sampling block
    assert all(torch.all(m.rho == 1) for m in adalins)
    assert all(torch.all(m.rho == 0) and torch.all(m.gamma == 1) and torch.all(m.beta == 0) for m in lins)


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
    out = module(theta)
    w = {name: module.fc[name].weight[0].detach() for name in ("gap", "gmp", "sam")}
    logits, a = naive_attention(theta, w["gap"], w["gmp"], w["sam"], p, module.conv1x1, slope=0.0)
    assert torch.allclose(out.logits, logits.float(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(out.features, a, atol=1e-6)
    assert torch.allclose(out.heatmap, a.sum(1, keepdim=True), atol=1e-5)


def test_discriminator_attention_in_training_mode_uses_the_normalised_weight():
    """Under spectral norm each read of `fc.weight` runs a power iteration: the logit and the
    feature map must both use the normalised weight of this forward, W / (uᵀWv)."""
    torch.manual_seed(0)
    D = Discriminator(ch=2, n_down=3, size=64, p=1.0)  # grid 7, C = 16
    att = D.attention.train()
    theta = torch.randn(2, 16, 7, 7)
    out = att(theta)
    w = {name: spectral_normalised(att.fc[name])[0] for name in ("gap", "gmp", "sam")}
    for name in w:  # not the raw parameter: the mistake U-GAT-IT's code makes
        assert not torch.allclose(w[name], att.fc[name].parametrizations.weight.original[0], atol=1e-3)
    logits, a = naive_attention(theta, w["gap"], w["gmp"], w["sam"], 1.0, att.conv1x1, slope=0.2)
    assert torch.allclose(out.logits, logits.float(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.features, a, atol=1e-5)


@pytest.mark.parametrize("angles,n_logits", [("ma", 3), ("cam", 2), ("sam", 1), ("none", 0)])
def test_attention_ablations(angles, n_logits):
    torch.manual_seed(0)
    module = MultiAngleAttention(6, 4, angles, p=2.0)
    theta = torch.randn(3, 6, 4, 4)
    out = module(theta)
    assert out.logits.shape == (3, n_logits) and out.features.shape == (3, 6, 4, 4)
    assert sorted(module.fc) == sorted({"ma": ["gap", "gmp", "sam"], "cam": ["gap", "gmp"], "sam": ["sam"],
                                        "none": []}[angles])
    if angles == "none":  # θ goes straight to the 1x1 conv
        assert torch.allclose(out.features, F.relu(module.conv1x1(theta)))


def test_p_is_set_per_network():
    cfg = Config(size=32, ch=4, n_res=1, p_gen=3.0, p_dis=1.5)
    nets = MAGAN(cfg)
    assert [G.attention.p for G in nets.generators()] == [3.0, 3.0]
    assert [D.attention.p for D in nets.discriminators()] == [1.5] * 4


def test_sam_map_is_resized_in_eval_mode_only():
    torch.manual_seed(0)
    module = MultiAngleAttention(4, 8, "sam").eval()
    out = module(torch.randn(1, 4, 16, 16))  # translating at twice the training size
    assert out.features.shape == (1, 4, 16, 16) and out.logits.shape == (1, 1)
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
    out = module(theta)
    w = {name: module.fc[name].weight[0].detach() for name in ("gap", "gmp")}
    logits, a = naive_attention(theta, w["gap"], w["gmp"], by_hand.flatten(), 2.0, module.conv1x1, slope=0.0)
    assert torch.allclose(out.logits, logits.float(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.features, a, atol=1e-6)


# =================================================================================================
# Generator (MAGAN §2.1; U-GAT-IT appendix Table 4)
# =================================================================================================

def expected_generator_tables(ch, n_res, grid, light):
    C = 4 * ch
    encoder = [("reflect-pad", 3), ("conv", 3, ch, 7, 1, 0, False, ""), ("instance-norm", False), ("relu",),
               ("reflect-pad", 1), ("conv", ch, 2 * ch, 3, 2, 0, False, ""), ("instance-norm", False), ("relu",),
               ("reflect-pad", 1), ("conv", 2 * ch, C, 3, 2, 0, False, ""), ("instance-norm", False), ("relu",)]
    encoder += [("reflect-pad", 1), ("conv", C, C, 3, 1, 0, False, ""), ("instance-norm", False), ("relu",),
                ("reflect-pad", 1), ("conv", C, C, 3, 1, 0, False, ""), ("instance-norm", False)] * n_res
    mlp = [("linear", C if light else C * grid * grid, C, False, ""), ("relu",), ("linear", C, C, False, ""), ("relu",)]
    res = [("reflect-pad", 1), ("conv", C, C, 3, 1, 0, False, ""), ("AdaLIN",),
           ("reflect-pad", 1), ("conv", C, C, 3, 1, 0, False, ""), ("AdaLIN",)] * n_res
    decoder = [("upsample", 2.0, "nearest"), ("reflect-pad", 1), ("conv", C, C // 2, 3, 1, 0, False, ""), ("LIN",), ("relu",),
               ("upsample", 2.0, "nearest"), ("reflect-pad", 1), ("conv", C // 2, ch, 3, 1, 0, False, ""), ("LIN",), ("relu",),
               ("reflect-pad", 3), ("conv", ch, 3, 7, 1, 0, False, "")]  # then tanh (see the wiring test)
    return encoder, mlp, res, decoder


@pytest.mark.parametrize("light", [True, False])
def test_generator_layer_table(light):
    ch, n_res, size = 4, 2, 32
    G = Generator(ch=ch, n_res=n_res, size=size, light=light)
    encoder, mlp, res, decoder = expected_generator_tables(ch, n_res, size // 4, light)
    assert layer_table(G.encoder) == encoder
    assert layer_table(G.mlp) == mlp
    assert layer_table(G.to_gamma) == layer_table(G.to_beta) == [("linear", 4 * ch, 4 * ch, False, "")]
    assert layer_table(G.res_blocks) == res
    assert layer_table(G.decoder) == decoder
    C = 4 * ch
    assert {name: layer_table(fc) for name, fc in G.attention.fc.items()} == {
        "gap": [("linear", C, 1, False, "")], "gmp": [("linear", C, 1, False, "")],
        "sam": [("linear", (size // 4) ** 2, 1, False, "")]}
    assert layer_table(G.attention.conv1x1) == [("conv", 3 * C, C, 1, 1, 0, True, "")]
    assert layer_table(G.attention.act) == [("relu",)]


def test_full_mode_mlp_size_matches_the_paper():
    # U-GAT-IT full mode at 256 px, ch 64: the first MLP layer maps C·(S/4)² = 256·64·64 inputs to 256.
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
    expected = naive_resblock(block, x, lambda t, i: F.instance_norm(t, eps=1e-5))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_decoder_residual_block_has_its_skip_connection_and_adalin():
    torch.manual_seed(0)
    block = magan.AdaLINResBlock(6)
    rhos = [torch.rand(6), torch.rand(6)]
    for norm, rho in zip((block.norm1, block.norm2), rhos):
        with torch.no_grad():
            norm.rho.copy_(rho.view(1, 6, 1, 1))
    x, gamma, beta = torch.randn(2, 6, 5, 5), torch.randn(2, 6), torch.randn(2, 6)
    adalin = lambda t, i: naive_instance_layer_mix(t, rhos[i]) * gamma[:, :, None, None] + beta[:, :, None, None]
    assert torch.allclose(block(x, gamma, beta), naive_resblock(block, x, adalin), atol=1e-5)


def record_forward(modules: dict):
    """Forward hooks that keep each named module's input and output, call by call."""
    calls = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(m, args, output, name=name):
            calls[name].append((args, output))
        handles.append(module.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("light", [True, False])
def test_generator_wiring(light):
    """θ = E(x) feeds the attention; a(x), not θ, feeds the AdaLIN blocks; the MLP reads a(x)'s
    global average (light) or the whole flattened map (full); γ, β reach every block."""
    torch.manual_seed(0)
    G = Generator(ch=4, n_res=2, size=32, light=light)
    parts = dict(encoder=G.encoder, attention=G.attention, mlp=G.mlp, to_gamma=G.to_gamma, to_beta=G.to_beta,
                 block0=G.res_blocks[0], block1=G.res_blocks[1], decoder=G.decoder)
    calls, handles = record_forward(parts)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = G(x)
    for h in handles:
        h.remove()
    one = {name: c[0] for name, c in calls.items()}
    assert all(len(c) == 1 for c in calls.values())
    theta = one["encoder"][1]
    assert torch.equal(one["encoder"][0][0], x)
    assert torch.equal(one["attention"][0][0], theta)
    a = one["attention"][1].features
    style = a.mean(dim=(2, 3)) if light else a.flatten(1)
    assert torch.allclose(one["mlp"][0][0], style)
    assert torch.equal(one["to_gamma"][0][0], one["mlp"][1]) and torch.equal(one["to_beta"][0][0], one["mlp"][1])
    gamma, beta = one["to_gamma"][1], one["to_beta"][1]
    for block in ("block0", "block1"):
        assert torch.equal(one[block][0][1], gamma) and torch.equal(one[block][0][2], beta)
    assert torch.equal(one["block0"][0][0], a)
    assert torch.equal(one["block1"][0][0], one["block0"][1])
    assert torch.equal(one["decoder"][0][0], one["block1"][1])
    assert torch.equal(out.image, torch.tanh(one["decoder"][1]))
    assert torch.equal(out.logits, one["attention"][1].logits)
    assert torch.allclose(out.heatmap, a.sum(1, keepdim=True))
    assert out.image.shape == (2, 3, 32, 32) and out.image.abs().max() <= 1


def test_generator_size_errors():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        Generator(ch=4, n_res=1, size=32)(torch.zeros(1, 3, 30, 30))
    full = Generator(ch=4, n_res=1, size=32, light=False).eval()
    with pytest.raises(ValueError, match="runs at 32 px only"):
        full(torch.zeros(1, 3, 64, 64))
    light = Generator(ch=4, n_res=1, size=32).eval()  # light mode translates at another size
    out = light(torch.zeros(1, 3, 64, 64))
    assert out.image.shape == (1, 3, 64, 64) and out.heatmap.shape == (1, 1, 16, 16)


# =================================================================================================
# Discriminator (MAGAN §2.2, eq. 3; U-GAT-IT appendix Tables 5-6)
# =================================================================================================

def expected_discriminator_table(ch, n_down, grid):
    rows = [("reflect-pad", 1), ("conv", 3, ch, 4, 2, 0, True, "SN"), ("leaky-relu", 0.2)]
    for i in range(1, n_down):
        rows += [("reflect-pad", 1), ("conv", ch * 2 ** (i - 1), ch * 2 ** i, 4, 2, 0, True, "SN"), ("leaky-relu", 0.2)]
    C = ch * 2 ** n_down
    rows += [("reflect-pad", 1), ("conv", C // 2, C, 4, 1, 0, True, "SN"), ("leaky-relu", 0.2)]
    attention = [("linear", C, 1, False, "SN"), ("linear", C, 1, False, "SN"), ("linear", grid * grid, 1, False, "SN"),
                 ("conv", 3 * C, C, 1, 1, 0, True, ""), ("leaky-relu", 0.2)]  # no SN on the 1x1 conv (Table 5)
    classifier = [("reflect-pad", 1), ("conv", C, 1, 4, 1, 0, False, "SN")]
    return rows, attention, classifier


@pytest.mark.parametrize("n_down,size", [(3, 64), (4, 64), (5, 128)])
def test_discriminator_layer_table(n_down, size):
    ch = 2
    D = Discriminator(ch=ch, n_down=n_down, size=size)
    grid = size // 2 ** n_down - 1
    encoder, attention, classifier = expected_discriminator_table(ch, n_down, grid)
    assert layer_table(D.encoder) == encoder
    assert [layer_table(D.attention.fc[k])[0] for k in ("gap", "gmp", "sam")] + \
        layer_table(D.attention.conv1x1) + layer_table(D.attention.act) == attention
    assert layer_table(D.classifier) == classifier


def test_two_discriminator_scales_per_domain():
    # U-GAT-IT: a global D down to S/32 (286x286 receptive field at 256 px) and a local one down
    # to S/8 (70x70), one pair per domain; below 128 px the global one stops at a 4x4 grid.
    assert [magan.global_depth(s) for s in (32, 64, 128, 256, 512)] == [3, 4, 5, 5, 5]
    nets = MAGAN(Config(size=64, ch=2, n_res=1))
    downs = {name: sum(1 for row in layer_table(D.encoder) if row[0] == "conv" and row[4] == 2)
             for name, D in zip(("D_ga", "D_gb", "D_la", "D_lb"), nets.discriminators())}
    assert downs == {"D_ga": 4, "D_gb": 4, "D_la": 3, "D_lb": 3}
    out = nets.D_ga(torch.zeros(2, 3, 64, 64))
    assert out.patch.shape == (2, 1, 2, 2) and out.logits.shape == (2, 3) and out.heatmap.shape == (2, 1, 3, 3)


def test_discriminator_wiring():
    """Φ(z) = Conv(a_D(z)) (eq. 3): the classifier reads the attention features, not θ."""
    torch.manual_seed(0)
    D = Discriminator(ch=2, n_down=3, size=64)
    calls, handles = record_forward(dict(encoder=D.encoder, attention=D.attention, classifier=D.classifier))
    out = D(torch.rand(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert torch.equal(calls["attention"][0][0][0], calls["encoder"][0][1])
    assert torch.equal(calls["classifier"][0][0][0], calls["attention"][0][1].features)
    assert torch.equal(out.patch, calls["classifier"][0][1])
    assert torch.equal(out.logits, calls["attention"][0][1].logits)


def test_real_and_fake_in_one_discriminator_batch_equal_two_passes():
    """d_step judges real and fake images in one batch (U-GAT-IT's code makes two passes). That is
    the same maths only if no layer of D mixes samples: no batch statistics, SAM's γ scaled per
    sample. In eval mode (σ of spectral norm fixed) the two ways must agree."""
    torch.manual_seed(0)
    D = Discriminator(ch=4, n_down=3, size=64).eval()
    real, fake = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        both = D(torch.cat([real, fake]))
        alone = [D(real), D(fake)]
    for field in ("patch", "logits", "heatmap"):
        joined = torch.cat([getattr(out, field) for out in alone])
        torch.testing.assert_close(getattr(both, field), joined, rtol=1e-5, atol=1e-6)


# =================================================================================================
# Losses (MAGAN §2.3, eq. 4-8; U-GAT-IT §2.2, eq. 2-7)
# =================================================================================================

def test_lsgan_and_bce_by_hand():
    logits = torch.tensor([0.5, 2.0])
    assert adversarial_loss(logits, True).item() == pytest.approx(((0.5 - 1) ** 2 + (2 - 1) ** 2) / 2)
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
    # Σ|[[5, 11], [11, 25]] / 4 − I / 4| = (4 + 11 + 11 + 24) / 4, relative to Σ|M_f| + Σ|M_g| = (52 + 2) / 4
    assert style_loss(f, g).item() == pytest.approx(50 / 54)
    # per sample, then the batch mean: a sample with 10x the activations weighs the same; scale-free
    assert style_loss(torch.cat([f, 10 * f]), torch.cat([g, 10 * g])).item() == pytest.approx(50 / 54)
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
    # the size only scales the gradient: d/da Σ|a − b| / (Σ|a| + Σ|b|) with the sum held = sign(a − b) / size
    a = torch.tensor([[1.0, -2.0]], requires_grad=True)
    loss = magan.relative_l1(a, torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 1.0 and torch.allclose(a.grad, torch.tensor([[1 / 3, -1 / 3]]))


def test_vgg_layers_are_the_relus_the_losses_name():
    vgg = magan.load_vgg("random")
    # torchvision's VGG19 indices: relu1_2 = 3, relu2_2 = 8, relu3_4 = 17, relu4_4 = 26, relu5_4 = 35
    ends = [sum(len(stage) for stage in vgg.stages[:i + 1]) - 1 for i in range(5)]
    assert ends == [3, 8, 17, 26, 35] and all(isinstance(stage[-1], nn.ReLU) for stage in vgg.stages)
    out = vgg(torch.zeros(1, 3, 64, 64))
    assert [tuple(t.shape) for t in out] == [(1, 64, 64, 64), (1, 128, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8),
                                             (1, 512, 4, 4)]
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training  # it only scores images: always eval


def test_vgg_inputs_are_mapped_from_minus_one_one_to_imagenet_statistics():
    vgg = magan.load_vgg("random")
    seen = []
    vgg.stages[0][0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    vgg(x)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's ImageNet statistics
    expected = [((v + 1) / 2 - m) / s for v, m, s in zip([-1.0, 0.0, 1.0], mean, std)]
    assert seen[0][0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)


def test_vgg_weights_from_a_torchvision_state_dict_and_clear_error_when_missing(tmp_path):
    torch.manual_seed(0)
    features = magan.vgg19_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}  # torchvision's key names
    state["classifier.0.weight"] = torch.zeros(1)  # a whole VGG19 file also holds its classifier
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    vgg = magan.load_vgg(str(path))
    assert torch.equal(vgg.stages[4][-2].weight, features[34].weight)  # conv5_4
    with pytest.raises(MaganError) as error:
        magan.train(tiny_config(tmp_path, vgg_weights=str(tmp_path / "missing.pth")))
    for fix in ("--vgg-weights PATH", "--vgg-weights none", "--vgg-weights random", "NOT the paper"):
        assert fix in str(error.value)
    assert not (tmp_path / "run").exists()  # failed before training started
    assert magan.load_vgg("none") is None


# --- one training step, term by term ----------------------------------------------------------

class StepRecorder:
    """Records, in order, every forward of the six networks and the VGG (input and output), the
    moment opt_D steps, and every gradient that reaches a G or D parameter."""

    def __init__(self, nets, opt_D):
        self.events, self.handles = [], []
        for name, net in nets.named_children():
            self.handles.append(net.register_forward_hook(
                lambda m, args, out, name=name: self.events.append(("forward", name, args[0].detach(), out))))
            for p in net.parameters():
                frozen = not p.requires_grad  # D is left frozen after a G step: hooks need requires_grad
                p.requires_grad_(True)
                self.handles.append(p.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.events.append(("grad", name))))
                p.requires_grad_(not frozen)
        step = opt_D.step

        def recorded_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.d_after_step = {k: v.detach().clone() for k, v in nets.state_dict().items() if k.startswith("D_")}
            self.events.append(("opt_D.step",))
            return result
        opt_D.step = recorded_step

    def phase(self, before_d_step: bool):
        cut = self.events.index(("opt_D.step",))
        return self.events[:cut] if before_d_step else self.events[cut + 1:]

    def rows(self, events, name, inputs):
        """The output rows of `name` for the input rows `inputs`, from the first forward that saw them all."""
        for event in events:
            if event[0] != "forward" or event[1] != name:
                continue
            seen = event[2]
            index = []
            for row in inputs:
                match = [i for i in range(len(seen)) if torch.equal(seen[i].float(), row.float())]
                if not match:
                    break
                index.append(match[0])
            else:
                return type(event[3])(*(None if field is None else field[index] for field in event[3]))
        raise AssertionError(f"{name} never saw these inputs in this phase")


def lsgan(t, target):  # U-GAT-IT eq. 2 and 6: E[(D(·) − target)²]
    return ((t.float() - target) ** 2).mean()


def bce(t, target):  # −E[log σ(t)] or −E[log(1 − σ(t))]
    return -(F.logsigmoid(t.float()) if target == 1 else F.logsigmoid(-t.float())).mean()


def gram_by_hand(f):
    B, C, H, W = f.shape
    return torch.einsum("bci,bdi->bcd", f.reshape(B, C, H * W), f.reshape(B, C, H * W)) / (C * H * W)


@pytest.mark.parametrize("gan_loss", ["lsgan", "bce"])
def test_training_step_losses_by_hand(tmp_path, gan_loss):
    """Every term of one training step, recomputed from the tensors the step produced, with its
    weight: L_D and L_G of MAGAN eq. 8 (U-GAT-IT eq. 7 plus style and content). Also: which D
    judges which images, and what each reconstruction is compared with."""
    weights = dict(adv=1.5, cycle=7.0, identity=3.0, cam=11.0, style=2.0, content=5.0)
    cfg = tiny_config(tmp_path, gan_loss=gan_loss, **{f"w_{k}": v for k, v in weights.items()})
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
    rec = StepRecorder(nets, opt_D)
    x_a, x_b = random_images(2, 32, 1), random_images(2, 32, 2)
    losses = magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg.loss_weights(), cfg.gan_loss, autocast)
    adv = lsgan if gan_loss == "lsgan" else bce
    before, after = rec.phase(True), rec.phase(False)

    fake_ab = rec.rows(before, "G_ab", x_a).image        # G_ab(x_a)
    fake_ba = rec.rows(before, "G_ba", x_b).image        # G_ba(x_b)
    # --- D step: each domain's two Ds see that domain's real images and the fakes made for it
    d_total = 0
    for D, real, fake in (("D_ga", x_a, fake_ba), ("D_la", x_a, fake_ba), ("D_gb", x_b, fake_ab), ("D_lb", x_b, fake_ab)):
        r, f = rec.rows(before, D, real), rec.rows(before, D, fake)
        d_total = d_total + adv(r.patch, 1) + adv(f.patch, 0) + adv(r.logits, 1) + adv(f.logits, 0)
    assert losses["D"].item() == pytest.approx(weights["adv"] * d_total.item(), rel=1e-5)

    # --- G step (D after its update): fakes should score "real" on patch and class logits
    g_adv = 0
    for D, fake in (("D_gb", fake_ab), ("D_lb", fake_ab), ("D_ga", fake_ba), ("D_la", fake_ba)):
        out = rec.rows(after, D, fake)
        g_adv = g_adv + adv(out.patch, 1) + adv(out.logits, 1)
    rec_a = rec.rows(rec.events, "G_ba", fake_ab).image  # G_ba(G_ab(x_a))
    rec_b = rec.rows(rec.events, "G_ab", fake_ba).image  # G_ab(G_ba(x_b))
    cycle = (rec_a - x_a).abs().mean() + (rec_b - x_b).abs().mean()                      # U-GAT-IT eq. 3
    same_b, same_a = rec.rows(before, "G_ab", x_b), rec.rows(before, "G_ba", x_a)
    identity = (same_b.image - x_b).abs().mean() + (same_a.image - x_a).abs().mean()     # U-GAT-IT eq. 4
    cam = (bce(rec.rows(before, "G_ab", x_a).logits, 1) + bce(same_b.logits, 0)          # U-GAT-IT eq. 5
           + bce(rec.rows(before, "G_ba", x_b).logits, 1) + bce(same_a.logits, 0))
    with torch.no_grad():
        phi = {name: vgg(t) for name, t in dict(fake_ab=fake_ab, fake_ba=fake_ba, x_a=x_a, x_b=x_b,
                                                 rec_a=rec_a, rec_b=rec_b).items()}
    def relative(a, b):  # Σ|a − b| / (Σ|a| + Σ|b|) per sample, averaged over the batch
        return sum((a[i] - b[i]).abs().sum() / (a[i].abs().sum() + b[i].abs().sum()) for i in range(len(a))) / len(a)
    style = (relative(gram_by_hand(phi["fake_ab"].relu4_4), gram_by_hand(phi["x_b"].relu4_4))     # MAGAN eq. 5
             + relative(gram_by_hand(phi["fake_ba"].relu4_4), gram_by_hand(phi["x_a"].relu4_4)))
    content = (relative(phi["rec_a"].relu5_4, phi["x_a"].relu5_4)                                  # MAGAN eq. 6
               + relative(phi["rec_b"].relu5_4, phi["x_b"].relu5_4))
    terms = dict(adv=g_adv, cycle=cycle, identity=identity, cam=cam, style=style, content=content)
    for name, value in terms.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-7), name
    g_total = sum(weights[k] * v for k, v in terms.items())
    assert losses["G"].item() == pytest.approx(g_total.item(), rel=1e-5)


def test_d_step_sends_no_gradient_to_the_generators_and_g_step_leaves_d_alone(tmp_path):
    cfg = tiny_config(tmp_path)
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
    x_a, x_b = random_images(1, 32, 3), random_images(1, 32, 4)
    magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg.loss_weights(), cfg.gan_loss, autocast)  # a second step, with stale grads about
    rec = StepRecorder(nets, opt_D)
    magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg.loss_weights(), cfg.gan_loss, autocast)
    grads_before = {e[1] for e in rec.phase(True) if e[0] == "grad"}
    grads_after = {e[1] for e in rec.phase(False) if e[0] == "grad"}
    assert grads_before == {"D_ga", "D_gb", "D_la", "D_lb"}  # the fakes were detached
    assert grads_after == {"G_ab", "G_ba"}                    # D frozen: no wasted parameter gradients
    for key, value in nets.named_parameters():
        if key.startswith("D_"):
            assert torch.equal(value, rec.d_after_step[key]), f"the G step changed {key}"


def test_rho_is_clipped_after_a_training_step(tmp_path):
    cfg = tiny_config(tmp_path)
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
    norms = [m for G in nets.generators() for m in G.modules() if isinstance(m, (AdaLIN, LIN))]
    with torch.no_grad():
        for i, m in enumerate(norms):
            m.rho.fill_(1.7 if i % 2 else -0.4)
    x = random_images(1, 32, 5)
    magan.train_step(nets, vgg, opt_G, opt_D, x, x.flip(-1), cfg.loss_weights(), cfg.gan_loss, autocast)
    values = torch.cat([m.rho.flatten() for m in norms])
    assert values.min() >= 0 and values.max() <= 1
    assert (values == 1).any() and (values == 0).any()


@pytest.mark.parametrize("attention,light", [("ma", True), ("ma", False), ("cam", True), ("sam", True), ("none", True)])
def test_one_iteration_updates_every_network(tmp_path, attention, light):
    cfg = tiny_config(tmp_path, attention=attention, light=light, p_gen=3.0, p_dis=2.0)
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    losses = magan.train_step(nets, vgg, opt_G, opt_D, random_images(2, 32, 6), random_images(2, 32, 7), cfg.loss_weights(), cfg.gan_loss, autocast)
    assert all(torch.isfinite(v) for v in losses.values())
    for name in ("adv", "cycle", "identity", "style", "content"):
        assert losses[name] > 0
    assert (losses["cam"] > 0) == (attention != "none")
    for net_name, net in nets.named_children():
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[f"{net_name}.{k}"])]
        assert changed, f"{net_name} did not change"


def test_zero_weight_switches_a_term_off(tmp_path):
    cfg = tiny_config(tmp_path, w_style=0, w_content=0, w_cam=0, w_identity=0, w_cycle=0)
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
    x = random_images(1, 32, 8)
    losses = magan.train_step(nets, vgg, opt_G, opt_D, x, x.flip(-1), cfg.loss_weights(), cfg.gan_loss, autocast)
    assert losses["style"] == 0 and losses["content"] == 0  # VGG not even run
    assert losses["G"].item() == pytest.approx(losses["adv"].item())  # only adversarial remains


def test_adam_follows_the_paper():
    """U-GAT-IT appendix B.2, for the generators and the discriminators alike: Adam with lr 1e-4,
    β = (0.5, 0.999) and weight decay 1e-4, each step as computed by hand with those numbers."""
    torch.manual_seed(0)
    cfg = Config(size=32, ch=4, n_res=1)
    nets = MAGAN(cfg)
    opt_G, opt_D = magan.make_optimizers(nets, cfg)
    for opt, networks in ((opt_G, nets.generators()), (opt_D, nets.discriminators())):
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for n in networks for p in n.parameters()}
        p, others = opt.param_groups[0]["params"][0], [q for g in opt.param_groups for q in g["params"]][1:]
        x, m, v = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)
        for t in (1, 2):  # two steps: the first is ±lr whatever β is (the bias corrections cancel)
            p.grad = torch.randn_like(p)
            for q in others:
                q.grad = None
            opt.step()
            g = p.grad + 1e-4 * x                                # L2 weight decay, as torch.optim.Adam
            m, v = 0.5 * m + 0.5 * g, 0.999 * v + 0.001 * g * g
            x = x - 1e-4 * (m / (1 - 0.5 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            assert torch.allclose(p.detach(), x, rtol=1e-5, atol=1e-8), t


def test_learning_rate_schedule():
    cfg = Config(iters=100, lr=1.0)
    # constant for the first half, then linear to 0 (U-GAT-IT appendix B.2)
    assert [magan.learning_rate(i, cfg) for i in (0, 49, 50)] == [1.0, 1.0, 1.0]
    assert magan.learning_rate(75, cfg) == pytest.approx(0.5)
    assert magan.learning_rate(99, cfg) == pytest.approx(0.02)


def test_time_budget_fits_the_iterations_to_the_clock_by_hand():
    now = [0.0]
    budget = magan.TimeBudget(10, began=0.0, most=100_000, clock=lambda: now[0], say=lambda *a, **k: None)
    now[0] = 100.0                   # the first iteration ends after 100 s of start-up: nothing to measure yet
    assert budget.iterations(1, 100_000) == 100_000
    now[0] = 125.0                   # 50 more at 0.5 s: 1 + 1,000 iterations fill the 600 s (100 + 1,000 x 0.5)
    assert budget.iterations(51, 100_000) == 1001
    now[0] = 175.0                   # 50 more at 1 s: 0.75 s each since the first, 425 s left: 566 more
    assert budget.iterations(101, 1001) == 101 + 566
    now[0] = 500.0                   # past half of 667 the decay has begun: fixed, whatever the clock says
    assert budget.iterations(400, 667) == 667
    now[0] = 600.0                   # time is up: the iteration just done is the last
    assert budget.iterations(450, 667) == 450
    capped = magan.TimeBudget(10, began=0.0, most=300, clock=lambda: now[0], say=lambda *a, **k: None)
    now[0] = 100.0
    capped.iterations(1, 300)
    now[0] = 125.0
    assert capped.iterations(51, 300) == 300  # never more than --iters


def test_a_budgeted_run_ends_at_the_number_that_fits_with_the_rate_decayed(tmp_path, monkeypatch, capsys):
    """A real run under a fake clock: 20 s of start-up, then 5 s an iteration, in a 1-minute budget:
    9 iterations fit (20 + 8 x 5 = 60). If the clock then slows, the run ends when time is up."""
    seconds_each = {}

    class FakeClock(magan.TimeBudget):
        def __init__(self, minutes, began, most, say=print):
            super().__init__(minutes, 0.0, most, say=say)

        def iterations(self, iteration, iters):
            slow = 30.0 * max(0, iteration - 4) if seconds_each.get("slows") else 0.0
            self.clock = lambda: 20.0 + 5.0 * (iteration - 1) + slow
            return super().iterations(iteration, iters)

    monkeypatch.setattr(magan, "TimeBudget", FakeClock)
    cfg = tiny_config(tmp_path, iters=1000, minutes=1, log_every=2, sample_every=1000, save_every=1000)
    magan.train(cfg)
    assert "time budget: 9 iterations fit in 1 minutes" in capsys.readouterr().out
    ckpt = magan.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 9 and ckpt["config"]["iters"] == 9
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iters"] == 9
    assert (tmp_path / "run" / "samples" / "a2b_0000009.png").is_file()
    last = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()[-1].split(",")
    assert int(last[0]) == 9 and float(last[3]) == pytest.approx(cfg.lr * (9 - 8) / (9 - 4))  # step 8 of 9
    # resumed, the budget is not applied again: --iters 11 trains to 11
    magan.train(tiny_config(tmp_path, iters=11, minutes=1, log_every=2, sample_every=1000, save_every=1000,
                            resume=True))
    assert "applies to a new run only" in capsys.readouterr().out
    assert magan.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["iteration"] == 11
    # a machine that slows to 35 s an iteration after iteration 4 (9 fixed): out of time at iteration 6
    seconds_each["slows"] = True
    magan.train(dataclasses.replace(cfg, out=str(tmp_path / "slow")))
    assert "the run ends at iteration 6 of 9" in capsys.readouterr().out
    assert magan.load_checkpoint(tmp_path / "slow" / "checkpoints" / "latest.pt")["iteration"] == 6


# =================================================================================================
# The other papers' attention ideas: AGGAN's mask fusion, SAT's self-regularisation, presets
# =================================================================================================

def test_mask_fusion_by_hand():
    """AGGAN (1): G(x) = R ⊙ M + x ⊙ (1 − M)."""
    x, R = torch.full((1, 3, 2, 2), 0.25), torch.full((1, 3, 2, 2), -0.5)
    assert torch.equal(magan.fuse(R, torch.zeros(1, 1, 2, 2), x), x)        # M ≡ 0: the input passes
    assert torch.equal(magan.fuse(R, torch.ones(1, 1, 2, 2), x), R)         # M ≡ 1: the content replaces it
    half = magan.fuse(R, torch.tensor([[[[0.5, 0.0], [1.0, 0.25]]]]), x)
    assert half[0, 0].tolist() == [[0.5 * -0.5 + 0.5 * 0.25, 0.25], [-0.5, 0.25 * -0.5 + 0.75 * 0.25]]


def test_generator_with_mask_fusion_fuses_its_content_and_mask_with_the_input():
    torch.manual_seed(0)
    G = Generator(ch=4, n_res=1, size=32, mask_fusion=True)
    assert layer_table(G.decoder)[-1] == ("conv", 4, 4, 7, 1, 0, False, "")  # 3 content channels + 1 mask
    calls, handles = record_forward(dict(decoder=G.decoder))
    x = random_images(2, 32, 1)
    out = G(x)
    raw = calls["decoder"][0][1]                                             # (2, 4, 32, 32)
    R, M = torch.tanh(raw[:, :3]), torch.sigmoid(raw[:, 3:])
    assert torch.allclose(out.mask, M) and torch.allclose(out.image, R * M + x * (1 - M), atol=1e-6)
    assert Generator(ch=4, n_res=1, size=32)(x).mask is None


def test_fine_detail_by_hand():
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(magan.fine_detail(flat), torch.zeros_like(flat))             # no detail at all
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1     # ±1, period 2
    checker = checker.expand(1, 3, 8, 8)
    assert torch.allclose(magan.fine_detail(checker), checker)           # every 4x4 cell averages to 0
    # one white 4x4 cell in a black 8x8 image: 4x4 averages [[1, −1], [−1, −1]]. Resized back
    # bilinearly (pixel i samples the 2x2 grid at (i + 0.5)/4 − 0.5, clamped to [0, 1]), row 0 of the
    # blur runs 1, 1, 0.75, 0.25, −0.25, −0.75, −1, −1 across the cell's edge; x − blur:
    cell = torch.full((1, 3, 8, 8), -1.0)
    cell[..., :4, :4] = 1.0
    detail = magan.fine_detail(cell)
    assert torch.allclose(detail[0, :, 0], torch.tensor([0, 0, 0.25, 0.75, -0.75, -0.25, 0, 0]).expand(3, 8))
    assert torch.allclose(detail[0, :, 7], torch.zeros(3, 8))            # far from the cell: nothing


def test_detail_skip_adds_the_inputs_fine_detail_to_the_same_generator():
    torch.manual_seed(0)
    plain = Generator(ch=4, n_res=1, size=32)
    skip = Generator(ch=4, n_res=1, size=32, detail_skip=True)
    skip.load_state_dict(plain.state_dict())                             # the same weights
    x = random_images(2, 32, 1)
    assert torch.allclose(skip(x).image, plain(x).image + magan.fine_detail(x), atol=1e-6)
    nn.init.zeros_(skip.decoder[-1].weight)                              # a network that draws grey (0)
    assert torch.allclose(skip(x).image, x - F.interpolate(F.avg_pool2d(x, 4), scale_factor=4,
                                                            mode="bilinear", align_corners=False), atol=1e-6)
    with pytest.raises(ValueError, match="choose one"):
        Generator(ch=4, n_res=1, size=32, detail_skip=True, mask_fusion=True)


def test_total_variation_of_a_hand_made_mask():
    mask = torch.tensor([[0.0, 1.0, 0.0],
                         [0.0, 0.0, 0.0],
                         [1.0, 1.0, 1.0]]).view(1, 1, 3, 3)
    # vertical neighbours: |0−0|+|1−0| (column 0), |0−1|+|1−0| (column 1), |0−0|+|1−0| (column 2) = 4 over 6 pairs
    # horizontal neighbours: |1−0|+|0−1| (row 0), 0 (row 1), 0 (row 2) = 2 over 6 pairs
    assert magan.total_variation(mask).item() == pytest.approx(4 / 6 + 2 / 6)
    assert magan.total_variation(torch.ones(2, 1, 5, 5)).item() == 0  # a saturated mask has no variation


def test_self_regularisation_by_hand_and_zero_for_the_identity():
    f1, f2, f3 = torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1), torch.zeros(1, 3, 1, 2)
    g1, g2, g3 = f1.clone(), f2 + 2.0, f3.clone()
    g1[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # squared distance 25 at one of 4 positions -> mean 6.25
    g3[0, :, 0, 1] = 1.0                       # squared distance 3 at one of 2 positions -> mean 1.5
    expected = 6.25 / 32 + 4.0 / 16 + 1.5 / 8  # SAT's weights 1/32, 1/16, 1/8
    assert magan.self_regularisation((g1, g2, g3), (f1, f2, f3)).item() == pytest.approx(expected)
    vgg = magan.load_vgg("random")
    x = random_images(2, 32, 4)
    features = magan.early_layers(vgg(x))
    assert magan.self_regularisation(features, magan.early_layers(vgg(x.clone()))).item() == 0


def test_training_step_with_every_extra_term_by_hand(tmp_path):
    """Mask fusion with attention-guided Ds, TV, pixel and self-regularisation, recomputed by hand."""
    weights = dict(adv=1.0, cycle=10.0, identity=10.0, cam=1000.0, style=1.0, content=1.0, tv=3.0, pixel=2.0, selfreg=5.0)
    cfg = tiny_config(tmp_path, mask_fusion=True, mask_to_d=True, **{f"w_{k}": v for k, v in weights.items()})
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
    rec = StepRecorder(nets, opt_D)
    x_a, x_b = random_images(2, 32, 1), random_images(2, 32, 2)
    losses = magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg.loss_weights(), cfg.gan_loss, autocast)
    before = rec.phase(True)
    ab, ba = rec.rows(before, "G_ab", x_a), rec.rows(before, "G_ba", x_b)
    # AGGAN's attention-guided D: the same mask beside the real and the fake image
    for D, real, fake in (("D_gb", x_b, ab), ("D_la", x_a, ba)):
        rec.rows(before, D, torch.cat([real, fake.mask], 1))
        rec.rows(before, D, torch.cat([fake.image, fake.mask], 1))
    tv = sum((m[:, :, 1:] - m[:, :, :-1]).abs().mean() + (m[..., 1:] - m[..., :-1]).abs().mean() for m in (ab.mask, ba.mask))
    pixel = (ab.image - x_a).abs().mean() + (ba.image - x_b).abs().mean()
    with torch.no_grad():
        feats = {name: vgg(t) for name, t in dict(ab=ab.image, ba=ba.image, a=x_a, b=x_b).items()}
    def selfreg(out, inp):
        layers = zip((1 / 32, 1 / 16, 1 / 8), (out.relu1_2, out.relu2_2, out.relu3_4), (inp.relu1_2, inp.relu2_2, inp.relu3_4))
        return sum(w * (o - i).square().sum(dim=1).mean() for w, o, i in layers)
    expected = dict(tv=tv, pixel=pixel, selfreg=selfreg(feats["ab"], feats["a"]) + selfreg(feats["ba"], feats["b"]))
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-4), name
    assert losses["G"].item() == pytest.approx(sum(weights[k] * losses[k].item() for k in weights), rel=1e-5)


@pytest.mark.parametrize("term", ["tv", "pixel", "selfreg"])
def test_a_new_weight_at_zero_switches_its_term_off(tmp_path, monkeypatch, term):
    """Weight 0: the term is not even computed and L_G is the sum of the others; weight 1: it is in."""
    function = {"tv": "total_variation", "pixel": None, "selfreg": "self_regularisation"}[term]
    results = {}
    for w in (0.0, 1.0):
        cfg = tiny_config(tmp_path, mask_fusion=True, **{f"w_{term}": w})
        nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg)
        with monkeypatch.context() as m:
            if w == 0 and function:
                m.setattr(magan, function, lambda *a: (_ for _ in ()).throw(AssertionError("computed")))
            results[w] = magan.train_step(nets, vgg, opt_G, opt_D, random_images(1, 32, 5), random_images(1, 32, 6),
                                          cfg.loss_weights(), cfg.gan_loss, autocast)
        others = sum(getattr(cfg, f"w_{k}") * results[w][k].item() for k in magan.LOSS_TERMS if k != term)
        assert results[w]["G"].item() == pytest.approx(others + w * results[w][term].item(), rel=1e-5)
    assert results[0.0][term] == 0 and results[1.0][term] > 0
    for name in ("D", "adv", "cycle", "identity", "cam", "style", "content"):  # nothing else changed
        assert results[0.0][name].item() == pytest.approx(results[1.0][name].item(), rel=1e-6), name


def test_adaptive_self_regularisation_weight_by_hand():
    """SAT: λ is 0 during the warm-up, then rises (a thousandth of the maximum per step) while the
    smoothed *mean* adversarial term is below the target, and is held from the step it passes it.
    The inputs are on the scale L_adv really has: 8 least-squares terms of about 1 each before D
    has learnt anything (L_adv ≈ 9), about 0.35 each once it has (README: --selfreg-target 0.5)."""
    weight = magan.AdaptiveWeight(maximum=2.0, target=0.5, n_terms=8, device=torch.device("cpu"), warmup=200)
    w = Config().loss_weights()
    smooth, lam, held, seen = 0.0, 0.0, False, []
    for iteration, adv in enumerate([9.0] * 20 + [2.8] * 300 + [6.0] * 200 + [1.0] * 10, start=1):
        seen.append(weight.weights(w).selfreg.item())
        weight.update(torch.tensor(adv), iteration)
        smooth = adv / 8 if smooth == 0 else 0.99 * smooth + 0.01 * adv / 8
        if iteration > 200:
            held = held or smooth > 0.5
            lam = lam if held else min(lam + 2.0 / 1000, 2.0)
        assert weight.state[0].item() == pytest.approx(lam, abs=1e-5), iteration
    assert seen[:201] == [0.0] * 201         # nothing during the warm-up, though L_adv ≈ 9 > 0.5 at first
    assert seen[300] > 0 and held and seen[-1] == pytest.approx(lam, abs=1e-5) and 0.1 < lam < 2.0


def test_adaptive_weight_rises_in_a_real_run_and_is_logged(tmp_path, monkeypatch):
    """With the README's flags, λ leaves 0 after the warm-up and log.csv shows it."""
    monkeypatch.setattr(magan.AdaptiveWeight, "WARMUP", 2)
    run = magan.train(tiny_config(tmp_path, iters=6, log_every=1, sample_every=100, save_every=100,
                                  w_selfreg=1.0, selfreg_target=5.0))
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].endswith(",w_selfreg")
    lam = [float(row.split(",")[-1]) for row in rows[1:]]
    assert lam == pytest.approx([0, 0, 0, 0.001, 0.002, 0.003], abs=1e-6)  # the weight each iteration used


def test_ugatit_preset_resolves_to_its_flags_and_explicit_flags_win(tmp_path):
    cfg, _ = magan.make_config({"preset": "ugatit", "data": str(DATA)})
    assert (cfg.attention, cfg.w_style, cfg.w_content, cfg.vgg_weights) == ("cam", 0.0, 0.0, "none")
    assert (cfg.w_adv, cfg.w_cycle, cfg.w_identity, cfg.w_cam) == (1.0, 10.0, 10.0, 1000.0)
    assert not magan.needs_vgg(cfg)
    cfg, _ = magan.make_config({"preset": "ugatit", "data": str(DATA), "attention": "ma", "w_cam": 5.0})
    assert (cfg.attention, cfg.w_cam, cfg.w_style) == ("ma", 5.0, 0.0)
    cfg, _ = magan.make_config({"preset": "ugatit", "data": str(DATA), "out": str(tmp_path / "run"), "size": 32,
                                "ch": 8, "n_res": 1, "iters": 1, "device": "cpu", "workers": 0, "n_samples": 2})
    run = magan.train(cfg)
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "ugatit" and saved["attention"] == "cam" and saved["w_style"] == 0.0
    for option in (dict(mask_to_d=True), dict(w_tv=1.0), dict(selfreg_target=1.0)):
        with pytest.raises(MaganError, match="needs --"):
            magan.train(tiny_config(tmp_path / "invalid", **option))


def test_laptop_preset_is_the_readmes_recipe_and_flags_still_win(tmp_path):
    """--preset laptop: 128 px, width 16, 4 residual blocks, no VGG, compiled, MAGAN's attention
    with the detail skip, cycle weight 1, CycleGAN's learning rate, and a 40-minute budget; a flag
    after it changes one value."""
    cfg, _ = magan.make_config({"preset": "laptop", "data": str(DATA)})
    assert (cfg.size, cfg.ch, cfg.n_res, cfg.light, cfg.compile) == (128, 16, 4, True, True)
    assert (cfg.attention, cfg.vgg_weights, cfg.w_style, cfg.w_content) == ("ma", "none", 0.0, 0.0)
    assert (cfg.w_cycle, cfg.w_identity, cfg.w_cam, cfg.lr) == (1.0, 10.0, 1000.0, 2e-4)
    assert cfg.detail_skip and not magan.needs_vgg(cfg)
    assert (cfg.minutes, cfg.iters) == (magan.LAPTOP_MINUTES, magan.LAPTOP_MOST) == (40, 20_000)
    assert magan.global_depth(128) == 5  # U-GAT-IT's five halvings, to a 4x4 grid
    readme = (Path(magan.__file__).parent / "README.md").read_text()
    assert "python magan.py train --preset laptop --data horse2zebra" in readme
    assert f"| `--minutes` | {magan.LAPTOP_MINUTES} |" in readme  # the README's table says what runs
    cfg, _ = magan.make_config({"preset": "laptop", "data": str(DATA), "size": 96, "compile": False})
    assert (cfg.size, cfg.compile, cfg.ch) == (96, False, 16)


def test_a_mask_fusion_checkpoint_translates_and_resumes(tmp_path):
    run = magan.train(tiny_config(tmp_path, mask_fusion=True, mask_to_d=True, w_tv=1.0, iters=2))
    grid = Image.open(run / "samples" / "a2b_0000002.png")
    assert grid.size == (5 * 32 + 6 * 2, 2 * 32 + 3 * 2)  # five columns: the mask is one
    written = magan.translate(run / "checkpoints" / "latest.pt", DATA / "testA", tmp_path / "out", heatmaps=True,
                              device="cpu")
    assert len(written) == 20 and all((tmp_path / "out" / "masks" / (p.stem + ".png")).is_file() for p in written)
    resumed = magan.train(tiny_config(tmp_path, mask_fusion=True, mask_to_d=True, w_tv=1.0, iters=3, resume=True))
    assert magan.load_checkpoint(resumed / "checkpoints" / "latest.pt")["iteration"] == 3


# =================================================================================================
# Data: unpaired folders and U-GAT-IT's augmentation (appendix B.2)
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
    S = 32
    folder = tmp_path / "one"
    folder.mkdir()
    source = gradient_image(90, 70)  # not square: the resize makes it square
    source.save(folder / "image.png")
    crops = {}
    for flipped, im in ((False, source), (True, source.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        big = im.resize((S + 30, S + 30), Image.Resampling.BILINEAR)
        for top in range(31):
            for left in range(31):
                crops.setdefault(big.crop((left, top, left + S, top + S)).tobytes(), (flipped, top, left))
    data = magan.UnpairedImages(folder, folder, S, seed=0)
    found = []
    for k in range(800):
        x = data[k][0]
        key = magan.to_pil(x).tobytes()
        assert key in crops, f"sample {k} is not a crop of the resized image"
        found.append(crops[key])
    flips = sum(f for f, _, _ in found) / len(found)
    assert 0.4 < flips < 0.6  # p = 0.5: 800 draws put the rate within 0.5 ± 0.07 at 4 sigma
    assert {top for _, top, _ in found} == set(range(31))
    assert {left for _, _, left in found} == set(range(31))


def solid_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (30 * i, 255 - 30 * i, 100)).save(root / f"{i}.png")
    return root


def test_each_epoch_visits_every_image_once_in_a_fresh_order(tmp_path):
    n = 7
    folder = solid_folder(tmp_path / "solid", n)
    data = magan.UnpairedImages(folder, folder, 32, seed=0)
    which = lambda x: round(magan.to_pil(x).getpixel((5, 5))[0] / 30)  # a solid colour survives flip and crop
    orders = {domain: [[which(data[e * n + i][domain]) for i in range(n)] for e in range(3)] for domain in (0, 1)}
    for domain in (0, 1):
        for epoch in orders[domain]:
            assert sorted(epoch) == list(range(n))  # each image once per epoch
        assert len({tuple(o) for o in orders[domain]}) == 3  # a new order every epoch
    assert orders[0] != orders[1]  # the two domains are shuffled independently: unpaired


def test_the_seed_sets_the_image_order_and_the_domains_draw_their_own_augmentation(tmp_path, monkeypatch):
    """The order in which each domain's images come depends on the seed; and domain A's flip and
    crop are drawn independently of domain B's, even for the same image (else they are paired)."""
    n = 7
    folder = solid_folder(tmp_path / "solid", n)
    which = lambda x: round(magan.to_pil(x).getpixel((5, 5))[0] / 30)  # a solid colour survives flip and crop
    orders = [[which(magan.UnpairedImages(folder, folder, 32, seed)[k][0]) for k in range(2 * n)] for seed in (0, 1)]
    assert orders[0] != orders[1]
    one = tmp_path / "one"
    one.mkdir()
    gradient_image(90, 70).save(one / "image.png")
    data = magan.UnpairedImages(one, one, 32, seed=0)
    pairs = [(magan.to_pil(data[k][0]).tobytes(), magan.to_pil(data[k][1]).tobytes()) for k in range(100)]
    assert sum(a == b for a, b in pairs) < 10  # 961 offsets x 2 flips: the same draw twice is rare
    seeds = []  # and train() builds its data with --seed
    original = magan.UnpairedImages.__init__
    monkeypatch.setattr(magan.UnpairedImages, "__init__",
                        lambda self, a, b, size, seed: (seeds.append(seed), original(self, a, b, size, seed))[1])
    magan.train(tiny_config(tmp_path, iters=1, seed=7, sample_every=100))
    assert seeds == [7]


def test_samples_are_a_pure_function_of_seed_and_index():
    a = magan.UnpairedImages(DATA / "trainA", DATA / "trainB", 32, seed=0)
    again = magan.UnpairedImages(DATA / "trainA", DATA / "trainB", 32, seed=0)
    other = magan.UnpairedImages(DATA / "trainA", DATA / "trainB", 32, seed=1)
    for k in (0, 5, 401):
        assert torch.equal(a[k][0], again[k][0]) and torch.equal(a[k][1], again[k][1])
    assert any(not torch.equal(a[k][0], other[k][0]) for k in range(4))  # the seed matters
    assert not torch.equal(a[0][0], a[1][0])
    # worker processes give the same samples as the main process
    loader = torch.utils.data.DataLoader(a, batch_size=2, sampler=range(6), num_workers=2,
                                         collate_fn=magan.collate_pairs)
    batches = [x_a for x_a, _, _ in loader]
    assert torch.equal(torch.cat(batches), torch.stack([a[k][0] for k in range(6)]))


def test_transparent_pixels_are_composited_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(0, 255, 0, 0), (255, 0, 0, 100), (10, 20, 30, 255)])  # hidden green, 100/255 red, opaque
    im.save(tmp_path / "rgba.png")
    rgb = magan.load_rgb(tmp_path / "rgba.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    # α·c + (1 − α)·255 with α = 100/255: red stays 255, green and blue become 155
    assert rgb.getpixel((1, 0)) == pytest.approx((255, 155, 155), abs=1)
    assert rgb.getpixel((2, 0)) == (10, 20, 30)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    loaded = magan.load_rgb(tmp_path / "palette.png")
    assert [loaded.getpixel((0, 0)), loaded.getpixel((1, 0))] == [(255, 255, 255), (200, 0, 0)]


def test_samples_come_from_test_folders_beside_train(tmp_path):
    assert magan.sample_folder(str(DATA / "trainA")) == DATA / "testA"
    lonely = tmp_path / "trainA"
    lonely.mkdir()
    assert magan.sample_folder(str(lonely)) == lonely  # no testA beside it: samples from train


# =================================================================================================
# Training: the fast path, checkpoints and resume (MAGAN §3.3)
# =================================================================================================

def test_fast_path_forced_on_cpu_matches_fp32(tmp_path):
    """The CUDA fast path (bf16 autocast, channels_last, fused Adam), run on CPU for three
    iterations with every loss on, against the plain fp32 path from the same weights.
    Tolerances: each loss within 1% (bf16 keeps 8 bits of mantissa, ~0.4% per rounding; statistics,
    Gram matrices and losses stay fp32), and the first step's gradients point the same way: cosine
    over all of G's parameters > 0.9, over D's > 0.95 (measured: 0.973 and 0.996). The fused Adam
    update itself is checked by hand in the next test.
    What CPU cannot cover: CPU autocast casts fewer ops to bf16 than CUDA's (e.g. CUDA also
    autocasts the spectral-norm power iteration's matrix-vector products), cuDNN's channels_last
    kernels and the fused CUDA Adam kernel are not exercised; those need the CUDA tests."""
    cfg = tiny_config(tmp_path)
    runs = {}
    for fast in (False, True):
        nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg, seed=0, fast=fast)
        if fast:
            assert opt_G.param_groups[0]["fused"] and opt_D.param_groups[0]["fused"]
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nets.parameters() if p.dim() == 4)
        losses, grads = [], None
        for i in range(3):
            x_a, x_b = (magan.to_device(random_images(1, 32, seed), torch.device("cpu"), fast) for seed in (10 + i, 20 + i))
            losses.append(magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg.loss_weights(), cfg.gan_loss, autocast))
            grads = grads or {k: p.grad.detach().clone() for k, p in nets.named_parameters() if p.grad is not None}
        runs[fast] = losses, grads
    for plain, fast in zip(runs[False][0], runs[True][0]):
        for name in plain:
            assert fast[name].dtype == torch.float32
            assert fast[name].item() == pytest.approx(plain[name].item(), rel=0.01), name
    for prefix, threshold in (("G_", 0.9), ("D_", 0.95)):
        a, b = (torch.cat([g.flatten() for k, g in runs[f][1].items() if k.startswith(prefix)]) for f in (False, True))
        assert F.cosine_similarity(a, b, dim=0) > threshold, prefix


def adam_by_hand(p, grad, exp_avg, exp_avg_sq, step, lr, betas, weight_decay, eps=1e-8):
    """One Adam step (Kingma & Ba, with L2 weight decay added to the gradient as torch.optim.Adam)."""
    g = grad + weight_decay * p
    m = betas[0] * exp_avg + (1 - betas[0]) * g
    v = betas[1] * exp_avg_sq + (1 - betas[1]) * g * g
    t = step + 1
    return p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


@pytest.mark.parametrize("saved_fast,loaded_fast", [(True, False), (False, True)])
def test_optimizer_state_carries_over_between_paths(tmp_path, saved_fast, loaded_fast):
    """A checkpoint of the fast path (fused Adam, channels_last moments) resumes on the plain
    path, and the reverse: this run keeps its own kernel, every moment takes its parameter's
    layout, and the next update is Adam's, computed by hand from the saved moments."""
    cfg = tiny_config(tmp_path)
    nets, vgg, opt_G, opt_D, autocast = make_step_objects(cfg, fast=saved_fast)
    for i in range(2):
        magan.train_step(nets, vgg, opt_G, opt_D, random_images(1, 32, i), random_images(1, 32, 9 + i), cfg.loss_weights(), cfg.gan_loss, autocast)
    path = tmp_path / "ckpt.pt"
    magan.save_checkpoint(path, nets, opt_G, opt_D, 2, cfg)
    ckpt = magan.load_checkpoint(path)
    nets2, _, opt_G2, opt_D2, _ = make_step_objects(cfg, seed=1, fast=loaded_fast)
    magan.load_networks(dict(nets2.named_children()), ckpt)
    magan.load_optimizer_state(opt_G2, ckpt["opt_G"])
    magan.load_optimizer_state(opt_D2, ckpt["opt_D"])
    for opt in (opt_G2, opt_D2):
        assert all(bool(group.get("fused")) == loaded_fast for group in opt.param_groups)
    saved = {id_: s for id_, s in ckpt["opt_G"]["state"].items()}
    params = [p for group in opt_G2.param_groups for p in group["params"]]
    expected = {}
    for index, p in enumerate(params):
        state = opt_G2.state[p]
        assert state["exp_avg"].stride() == p.stride() and state["exp_avg_sq"].stride() == p.stride()
        assert torch.equal(state["exp_avg"].contiguous(), saved[index]["exp_avg"])
        assert state["step"].device.type == "cpu" or loaded_fast
        p.grad = torch.randn_like(p)
        expected[index] = adam_by_hand(p.detach(), p.grad, saved[index]["exp_avg"], saved[index]["exp_avg_sq"],
                                       int(saved[index]["step"]), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    opt_G2.step()
    for index, p in enumerate(params):
        assert torch.allclose(p.detach(), expected[index], rtol=1e-5, atol=1e-7)


def state_of(run: Path):
    return magan.load_checkpoint(run / "checkpoints" / "latest.pt")


def test_resume_gives_identical_weights(tmp_path):
    straight = magan.train(tiny_config(tmp_path / "a", iters=4, save_every=4))
    magan.train(tiny_config(tmp_path / "b", iters=2, save_every=2))
    with open(tmp_path / "b" / "run" / "log.csv", "a") as log:  # a row logged after the last save,
        log.write("3,1.0,1.0,0.0001,1,1,1,1,1,1,1,1\n")          # as an interrupted run leaves behind
    # continue the stopped run for 2 more iterations (the schedule must know the total is 4)
    resumed = magan.train(tiny_config(tmp_path / "b", iters=4, save_every=4, resume=True))
    one, two = state_of(straight), state_of(resumed)
    assert one["iteration"] == two["iteration"] == 4
    for net in one["nets"]:
        for key, value in one["nets"][net].items():
            assert torch.equal(value, two["nets"][net][key]), f"{net}.{key} differs after resume"
    for opt in ("opt_G", "opt_D"):
        for pid, state in one[opt]["state"].items():
            assert torch.equal(state["exp_avg"], two[opt]["state"][pid]["exp_avg"])
    logged = [int(row.split(",")[0]) for row in (tmp_path / "b" / "run" / "log.csv").read_text().splitlines()[1:]]
    assert logged == [2, 4]  # the stale row 3 was dropped on resume; nothing is logged twice


def test_resume_keeps_sats_adaptive_weight(tmp_path, monkeypatch):
    monkeypatch.setattr(magan.AdaptiveWeight, "WARMUP", 1)
    options = dict(w_selfreg=1.0, selfreg_target=100.0, save_every=2, snapshot_every=100, sample_every=100)
    straight = magan.train(tiny_config(tmp_path / "a", iters=4, **options))
    magan.train(tiny_config(tmp_path / "b", iters=2, **options))
    resumed = magan.train(tiny_config(tmp_path / "b", iters=4, resume=True, **options))
    one, two = state_of(straight), state_of(resumed)
    assert one["selfreg"][0] == pytest.approx(3 * 1.0 / 1000)  # λ rose by w/1000 after the warm-up, never held
    assert torch.equal(one["selfreg"], two["selfreg"])
    assert all(torch.equal(v, two["nets"]["G_ab"][k]) for k, v in one["nets"]["G_ab"].items())


def test_sample_grid_runs_in_eval_mode_without_gradients_and_restores_the_mode():
    torch.manual_seed(0)
    G_ab, G_ba = Generator(ch=4, n_res=1, size=32), Generator(ch=4, n_res=1, size=32)
    seen = []
    for G in (G_ab, G_ba):
        G.register_forward_hook(lambda m, args, out: seen.append((m.training, torch.is_grad_enabled())))
    x = random_images(2, 32, 3)
    for training in (True, False):
        G_ab.train(training), G_ba.train(training)
        grid = magan.sample_grid(G_ab, G_ba, x)
        assert G_ab.training == G_ba.training == training
    assert seen and all(mode == (False, False) for mode in seen)
    with torch.no_grad():
        fake = G_ab.eval()(x).image
        cycle = G_ba.eval()(fake).image
    assert grid.shape == (8, 3, 32, 32)  # rows: images; columns: input, heatmap overlay, translation, cycle
    assert torch.equal(grid[0::4], x) and torch.allclose(grid[2::4], fake) and torch.allclose(grid[3::4], cycle)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-iteration run at 32 px: enough to have a real checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    return magan.train(tiny_config(tmp, iters=2))


def test_train_command_line_writes_run_folder(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "train", "--size", "32", "--ch", "8", "--n-res", "1",
         "--iters", "3", "--log-every", "1", "--sample-every", "3", "--save-every", "3",
         "--vgg-weights", "random", "--workers", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "it/s" in result.stdout and "ETA" in result.stdout and "cam" in result.stdout
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "config.json").is_file()
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("iteration,") and len(rows) == 4
    for direction in ("a2b", "b2a"):
        grid = Image.open(out / "samples" / f"{direction}_0000003.png")
        # n_samples (4) rows x 4 columns (input, heatmap, translation, cycle) of 32-px images
        assert grid.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)
    ckpt = magan.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 3 and set(ckpt["nets"]) == {"G_ab", "G_ba", "D_ga", "D_gb", "D_la", "D_lb"}
    assert ckpt["config"]["size"] == 32


# =================================================================================================
# Several processes (torchrun): data parallel on CPU with gloo
# =================================================================================================

def test_each_process_reads_its_own_samples_of_each_iteration():
    two = [list(magan.IterationSamples(3, 5, 2, world=2, rank=rank)) for rank in (0, 1)]
    one = list(magan.IterationSamples(3, 5, 4, world=1, rank=0))
    # iteration k, rank r of W, batch B: samples (k·W + r)·B ... (k·W + r)·B + B − 1
    assert two == [[12, 13, 16, 17], [14, 15, 18, 19]]
    assert one == [12, 13, 14, 15, 16, 17, 18, 19]  # one process with the global batch reads the same


# In fp32 with the plain memory layout (--no-fast): with channels_last, oneDNN runs other kernels
# for a batch of 1 and of 2, whose rounding differs far more (measured: a mean weight gap of 2.4e-5
# after 4 iterations, against below 1e-8 in this layout).
DIST_FLAGS = ["--data", str(DATA), "--size", "32", "--ch", "8", "--n-res", "1", "--vgg-weights", "random", "--device", "cpu",
              "--workers", "0", "--log-every", "2", "--sample-every", "100", "--n-samples", "2", "--no-fast"]


def torchrun(n: int, args: list[str], timeout=240) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node n magan.py train ARGS` (torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(HERE / "magan.py"), "train", *DIST_FLAGS, *args], capture_output=True, text=True,
                          cwd=HERE, timeout=timeout, env=env)


def weights_of(run: Path) -> dict:
    ckpt = magan.load_checkpoint(run / "checkpoints" / "latest.pt")
    return {f"{net}.{k}": v for net, state in ckpt["nets"].items() for k, v in state.items()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """2 processes x batch 1 for 4 iterations, launched by torchrun."""
    out = tmp_path_factory.mktemp("dist") / "two"
    result = torchrun(2, ["--batch", "1", "--iters", "4", "--save-every", "4", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_two_processes_train_like_one_with_the_global_batch(two_process_run, tmp_path):
    """Gradients averaged over 2 processes x batch 1 = the gradient of 1 process x batch 2 (every
    loss is a mean over the batch), so the weights agree to float rounding. Float rounding is this
    CPU's: Adam divides each gradient by its own size, so an element whose two samples' gradients
    nearly cancel (|g| near Adam's ε) can take a differently sized step after rounding, and over 4
    iterations of a GAN that spreads. How far is measured here, as the gap between two one-process
    runs that differ only in their thread count (the same maths, summed in another order). On the
    Intel CPUs this test was written on, the two-process run differed from the one-process run by
    more than 1e-6 in 6 of 353,416 weights; on a 2-core AMD EPYC the thread count alone moves
    35,000 of them that far (mean gap 4.5e-7, largest 2.1e-4). The two-process run must stay
    within 4 times that floor, and within 1e-8 (mean) and 1e-4 (largest, one Adam step at lr 1e-4)
    where the floor is smaller. Measured on that AMD CPU: the two-process run's mean gap is 6.2e-7
    (1.4 times the floor); with the gradients not averaged (each process following its own
    sample) it is 1.0e-4, 230 times."""
    out, result = two_process_run
    config = dict(batch=2, iters=4, save_every=4, log_every=2, sample_every=100, fast=False)
    one = weights_of(magan.train(tiny_config(tmp_path / "one", **config)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other_threads = weights_of(magan.train(tiny_config(tmp_path / "other", **config)))
    finally:
        torch.set_num_threads(threads)
    two = weights_of(out)
    assert two.keys() == one.keys()
    gap = lambda w: torch.cat([(w[k].float() - one[k].float()).abs().flatten() for k in one])
    floor, gaps = gap(other_threads), gap(two)
    assert gaps.mean() < max(1e-8, 4 * floor.mean()) and gaps.max() < max(1e-4, 4 * floor.max())
    assert "2 processes on cpu" in result.stdout and result.stdout.count("done: 4 iterations") == 1


def test_resume_under_two_processes_is_exact(two_process_run, tmp_path):
    out = tmp_path / "resumed"
    first = torchrun(2, ["--batch", "1", "--iters", "2", "--save-every", "2", "--out", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, ["--iters", "4", "--save-every", "4", "--out", str(out), "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    straight, resumed = weights_of(two_process_run[0]), weights_of(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(two_process_run[0], run)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "5", "--batch", "2"]) == 0
    assert "trained by 2 process(es) and continues with 1" in capsys.readouterr().out
    assert magan.load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == 5


def test_only_rank_0_writes_to_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a process that is not rank 0 (alone in its world: no peers needed)
    run = magan.train(tiny_config(tmp_path, iters=2))
    assert not run.exists() or not any(run.rglob("*"))  # no config, log, samples, page or checkpoint


@pytest.mark.parametrize("target", ["group", "rank 1"])
def test_sigterm_to_a_two_process_run_saves_once(tmp_path, target):
    """SIGTERM to the whole group (both ranks and their data workers), as SLURM does, or to one
    rank only: every rank stops on the same iteration, rank 0 saves once, every process exits 0."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, processes = tmp_path / "run", []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(  # one new process group holding both ranks (and their workers)
            [sys.executable, str(HERE / "magan.py"), "train", *DIST_FLAGS, "--iters", "100000", "--log-every", "1",
             "--save-every", "100000", "--workers", "1", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, env=env,
            process_group=processes[0].pid if rank else 0))
    wait_for_progress(processes[0])
    if target == "group":
        os.killpg(processes[0].pid, signal.SIGTERM)
    else:
        processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    stdout = outputs[0][0]
    assert stdout.count("saving iteration") == 1 and outputs[1][0].count("saving") == 0
    ckpt = magan.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["processes"] == 2 and f"stopped at iteration {ckpt['iteration']}" in stdout


# =================================================================================================
# Translation
# =================================================================================================

def test_translate_writes_one_file_per_input(trained_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (50, 30), 128).save(inputs / "grey.png")                 # grayscale, non-square
    Image.new("RGBA", (40, 70), (255, 0, 0, 100)).save(inputs / "alpha.png")  # transparency
    Image.new("P", (33, 33)).save(inputs / "palette.gif")
    Image.open(DATA / "testA" / "0000.jpg").save(inputs / "photo.jpg")
    Image.open(DATA / "testA" / "0001.jpg").save(inputs / "photo.png")      # the same stem as photo.jpg
    out = tmp_path / "out"
    written = magan.translate(trained_run / "checkpoints" / "latest.pt", inputs, out, "b2a", heatmaps=True,
                              batch=3, device="cpu", keep_size=False)
    names = sorted(p.name for p in written)  # lossless PNG under each input's stem; a shared stem keeps its suffix
    assert names == sorted(["grey.png", "alpha.png", "palette.png", "photo_jpg.png", "photo_png.png"])
    for name in names:
        im = Image.open(out / name)
        assert im.size == (32, 32) and im.format == "PNG" and im.mode == "RGB"
        assert (out / "heatmaps" / (Path(name).stem + ".png")).is_file()
    # the translation is the generator's output, pixel for pixel (up to 8-bit rounding), for a JPEG too
    G, _ = magan.load_generator(trained_run / "checkpoints" / "latest.pt", "b2a", torch.device("cpu"))
    for source, written_as in (("grey.png", "grey.png"), ("photo.jpg", "photo_jpg.png")):
        im = magan.load_rgb(inputs / source, 32).resize((32, 32), Image.Resampling.BILINEAR)  # as translate reads it
        with torch.no_grad():
            expected = G(magan.to_tensor(im)[None]).image[0].clamp(-1, 1).add(1).mul(127.5)
        got = magan.to_tensor(Image.open(out / written_as)).add(1).mul(127.5)
        assert (got - expected).abs().max() <= 1.0, source
    kept = magan.translate(trained_run / "checkpoints" / "latest.pt", inputs, tmp_path / "kept", "b2a",
                           device="cpu", keep_format=True)
    assert sorted(p.name for p in kept) == sorted(p.name for p in inputs.iterdir())
    assert Image.open(tmp_path / "kept" / "photo.jpg").format == "JPEG"


def test_translate_writes_a_large_jpeg_at_its_full_size(trained_run, tmp_path):
    """A large JPEG is decoded at a reduced scale (draft mode), yet its translation has its size."""
    big = gradient_image(1024, 768)
    big.save(tmp_path / "big.jpg", quality=90)
    rotated = Image.new("RGB", (600, 200), (90, 120, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90°": a phone photo, upright 200 wide and 600 high
    rotated.save(tmp_path / "phone.jpg", exif=exif)
    for name, size in (("big", (1024, 768)), ("phone", (200, 600))):
        written = magan.translate(trained_run / "checkpoints" / "latest.pt", tmp_path / f"{name}.jpg",
                                  tmp_path / "out", device="cpu")
        assert [p.name for p in written] == [f"{name}.png"] and Image.open(written[0]).size == size


def test_a_detail_skip_model_changes_the_photo_at_its_own_size(tmp_path):
    """With the detail skip, translate adds the generator's change G(x) − x, drawn at 32 px and
    resized, to the 64x48 photo itself: its fine detail stays sharp instead of being resized."""
    run = magan.train(tiny_config(tmp_path, iters=2, detail_skip=True))
    photo = gradient_image(64, 48)
    photo.save(tmp_path / "photo.png")
    written = magan.translate(run / "checkpoints" / "latest.pt", tmp_path / "photo.png", tmp_path / "out",
                              device="cpu")
    G, _ = magan.load_generator(run / "checkpoints" / "latest.pt", "a2b", torch.device("cpu"))
    x = magan.to_tensor(photo.resize((32, 32), Image.Resampling.BILINEAR))[None]       # (1, 3, 32, 32)
    with torch.no_grad():
        change = G(x).image - x
    expected = magan.to_tensor(photo) + F.interpolate(change, size=(48, 64), mode="bilinear")[0]
    got = magan.to_tensor(Image.open(written[0]).convert("RGB"))                       # (3, 48, 64)
    assert got.shape == (3, 48, 64)
    assert (got - expected.clamp(-1, 1)).abs().max() <= 1.01 / 127.5                   # 8-bit rounding


def test_translate_says_what_is_wrong_with_input_and_out(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "latest.pt"
    a_file = tmp_path / "taken.png"
    Image.new("RGB", (8, 8)).save(a_file)
    photo = tmp_path / "photo.jpg"
    Image.open(DATA / "testA" / "0000.jpg").save(photo)
    cases = [(DATA / "testA", a_file, "is an existing file, not a folder"),     # a folder into a file
             (DATA / "testA", tmp_path / "zebras.png", "must be a folder too"),  # a folder into an image name
             (tmp_path / "missing", tmp_path / "o", "does not exist"),
             (photo, photo, "would overwrite it"),
             (DATA, tmp_path / "o", "is a dataset root"),
             (photo, a_file / "sub" / "x.png", "cannot write")]                 # a file where a folder must be
    for input_path, out, message in cases:
        with pytest.raises(MaganError, match=message):
            magan.translate(ckpt, input_path, out, device="cpu")
    code = magan.main(["translate", "--ckpt", str(ckpt), "--input", str(DATA / "testA"), "--out", str(a_file)])
    assert code == 2  # a clear error, not a traceback (FileExistsError from mkdir, before)


def test_translate_single_image_and_bad_checkpoint(trained_run, tmp_path):
    written = magan.translate(trained_run / "checkpoints" / "latest.pt", DATA / "testA" / "0001.jpg",
                              tmp_path / "one", device="cpu")
    assert [p.name for p in written] == ["0001.png"]
    with pytest.raises(MaganError, match="no checkpoint"):
        magan.translate(tmp_path / "missing.pt", DATA / "testA", tmp_path / "x", device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(MaganError, match="not a MAGAN checkpoint"):
        magan.translate(foreign, DATA / "testA", tmp_path / "x", device="cpu")


def test_translate_at_another_size(trained_run, tmp_path):
    written = magan.translate(trained_run / "checkpoints" / "latest.pt", DATA / "testA" / "0001.jpg",
                              tmp_path / "big", device="cpu", size=64)  # light mode: SAM's map is resized
    assert Image.open(written[0]).size == Image.open(DATA / "testA" / "0001.jpg").size  # the input's own size
    with pytest.raises(MaganError, match="multiple of 32"):
        magan.translate(trained_run / "checkpoints" / "latest.pt", DATA / "testA", tmp_path / "x", device="cpu", size=48)


# =================================================================================================
# KID (MAGAN §3.5.1)
# =================================================================================================

def naive_mmd2(x, y):
    k = lambda u, v: (sum(a * b for a, b in zip(u, v)) / len(u) + 1) ** 3
    x, y = x.tolist(), y.tolist()
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_blocks_against_naive_loop_unequal_sizes():
    torch.manual_seed(0)
    real, fake = torch.randn(23, 6), torch.randn(17, 6) + 0.3
    mean, std = magan.kid_from_features(real, fake, "blocks", block_size=10)
    # ceil(23 / 10) = 3 blocks: real 7, 8, 8 rows; fake 5, 6, 6 rows (smaller blocks first, as TF-GAN)
    values, r0, f0 = [], 0, 0
    for nr, nf in [(7, 5), (8, 6), (8, 6)]:
        values.append(naive_mmd2(real[r0:r0 + nr], fake[f0:f0 + nf]))
        r0, f0 = r0 + nr, f0 + nf
    naive_mean = sum(values) / 3
    naive_var = sum((v - naive_mean) ** 2 for v in values) / 2  # unbiased
    assert mean == pytest.approx(naive_mean, rel=1e-9)
    assert std == pytest.approx(math.sqrt(naive_var / 3), rel=1e-9)


def test_kid_block_standard_error_by_hand():
    # 1-d features: with d = 1, k(x, y) = (xy + 1)^3. Two blocks of two rows each.
    real = torch.tensor([[0.0], [1.0], [0.0], [2.0]])
    fake = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
    # block 1: real {0, 1}, fake {1, 1}: k_rr off-diagonal = (0+1)^3 = 1; k_ff = (1+1)^3 = 8;
    #          k_rf: (0·1+1)^3 = 1 twice, (1·1+1)^3 = 8 twice -> mean 4.5.  MMD² = 1 + 8 − 9 = 0
    # block 2: real {0, 2}, fake {1, 0}: k_rr = 1; k_ff = 1; k_rf = [1, 1, 27, 1] -> mean 7.5. MMD² = 2 − 15 = −13
    mean, std = magan.kid_from_features(real, fake, "blocks", block_size=2)
    assert mean == pytest.approx(-6.5)
    assert std == pytest.approx(math.sqrt(((0 + 6.5) ** 2 + (-13 + 6.5) ** 2) / 1 / 2))


def test_kid_subsets_against_naive_loop():
    torch.manual_seed(1)
    real, fake = torch.randn(12, 4), torch.randn(9, 4)
    mean, std = magan.kid_from_features(real, fake, "subsets", subsets=5, subset_size=6, seed=3)
    g = torch.Generator().manual_seed(3)
    values = []
    for _ in range(5):
        r = real[torch.randperm(12, generator=g)[:6]]
        f = fake[torch.randperm(9, generator=g)[:6]]
        values.append(naive_mmd2(r, f))
    naive_mean = sum(values) / 5
    assert mean == pytest.approx(naive_mean, rel=1e-9)
    assert std == pytest.approx(math.sqrt(sum((v - naive_mean) ** 2 for v in values) / 5), rel=1e-9)
    assert magan.kid_from_features(real, fake, "subsets", subsets=5, subset_size=6, seed=3) == (mean, std)
    # subsets as large as the smaller set are all that set: a "± 0" that means nothing
    for size in (9, 10):
        with pytest.raises(ValueError, match="±"):
            magan.kid_from_features(real, fake, "subsets", subset_size=size)
    with pytest.raises(ValueError, match="at least 2"):
        magan.kid_from_features(real, torch.zeros(0, 4))


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2048, generator=g)
    same = torch.randn(400, 2048, generator=g)
    shifted = torch.randn(400, 2048, generator=g) + 0.5
    m_same, s_same = magan.kid_from_features(real, same, "blocks", block_size=100)
    m_shift, s_shift = magan.kid_from_features(real, shifted, "blocks", block_size=100)
    assert abs(m_same) < 3 * s_same + 1e-3
    assert m_shift > 10 * s_shift and m_shift > 100 * abs(m_same)
    m_sub, _ = magan.kid_from_features(real, shifted, "subsets", subsets=10, subset_size=200)
    assert m_sub == pytest.approx(m_shift, rel=0.1)


def test_fid_inception_builds_and_loads_saved_weights(tmp_path):
    torch.manual_seed(0)
    net = magan.fid_inception_v3()
    assert isinstance(net.Mixed_7c, magan.FIDInceptionE) and net.Mixed_7c.pool == "max"
    assert net.fc.out_features == 1008
    path = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    loaded = magan.load_inception("fid", str(path))
    features = loaded(torch.rand(3, 3, 40, 60))
    assert features.shape == (3, 2048)
    assert torch.equal(loaded.net.Conv2d_1a_3x3.conv.weight, net.Conv2d_1a_3x3.conv.weight)
    # the max-pool branch of Mixed_7c differs from torchvision's average pool
    x = torch.randn(1, 2048, 8, 8)
    stock = magan.InceptionE(2048)
    stock.load_state_dict(net.Mixed_7c.state_dict())
    assert not torch.allclose(net.Mixed_7c.eval()(x), stock.eval()(x))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(MaganError, match="--inception-weights"):
        magan.load_inception("fid", str(bad))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(magan.fid_inception_v3().state_dict(), path)
    return path


def first_images(folder: Path, n: int, into: Path) -> Path:
    """A folder with the first n images of `folder`: enough for the command line, quicker on CPU."""
    into.mkdir()
    for path in sorted(folder.iterdir())[:n]:
        (into / path.name).write_bytes(path.read_bytes())
    return into


def test_kid_command_line(tmp_path, inception_weights):
    real, fake = first_images(DATA / "testA", 6, tmp_path / "real"), first_images(DATA / "testB", 6, tmp_path / "fake")
    result = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "kid", "--real", str(real), "--fake", str(fake),
         "--inception-weights", str(inception_weights), "--block-size", "3", "--device", "cpu"],
        capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "KID×100 = " in result.stdout and "6 real, 6 fake" in result.stdout and "Inception features: 6/6" in result.stdout
    missing = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "kid", "--real", str(DATA / "testA"),
         "--fake", str(DATA / "testB"), "--inception-weights", str(tmp_path / "nope.pth")],
        capture_output=True, text=True, cwd=HERE, timeout=300)
    assert missing.returncode == 2 and "--inception-weights PATH" in missing.stderr and "Traceback" not in missing.stderr


def test_translate_command_line_with_kid(trained_run, tmp_path, inception_weights):
    out = tmp_path / "translated"
    inputs, real = first_images(DATA / "testA", 8, tmp_path / "in"), first_images(DATA / "testB", 8, tmp_path / "real")
    command = [sys.executable, str(HERE / "magan.py"), "translate", "--ckpt", str(trained_run / "checkpoints" / "latest.pt"),
               "--input", str(inputs), "--out", str(out), "--device", "cpu",
               "--kid-against", str(real), "--inception-weights", str(inception_weights),
               "--protocol", "subsets", "--subsets", "3"]
    result = subprocess.run(command + ["--subset-size", "4"], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.stem + ".png" for p in inputs.iterdir())
    assert "translated 8/8" in result.stdout and "KID×100 = " in result.stdout and "3 subsets of 4" in result.stdout
    whole = subprocess.run(command + ["--subset-size", "8"], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert whole.returncode == 2 and "±" in whole.stderr and "--subset-size 4" in whole.stderr
    assert "Inception features" not in whole.stdout  # refused before the slow Inception pass
    bad = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "translate", "--ckpt", str(tmp_path / "nothing.pt"),
         "--input", str(DATA / "testA"), "--out", str(out)], capture_output=True, text=True, cwd=HERE)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def truncated_jpegs(folder: Path) -> Path:
    """A folder of three JPEGs cut to a third: their headers read, their pixels do not decode."""
    folder.mkdir()
    data = (DATA / "testA" / "0000.jpg").read_bytes()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(data[: len(data) // 3])
    return folder


def test_kid_of_a_folder_with_nothing_decodable_is_a_clear_error(tmp_path, inception_weights):
    broken = truncated_jpegs(tmp_path / "broken")
    with pytest.raises(MaganError, match="could be decoded"):
        magan.kid_between_folders(DATA / "testA", broken, inception_weights=str(inception_weights), device="cpu")


# =================================================================================================
# Command line
# =================================================================================================

def test_the_docstring_examples_run_and_show_the_promised_shapes():
    """The >>> examples of MultiAngleAttention, Generator, Discriminator and kid_from_features."""
    results = doctest.testmod(magan, verbose=False)
    examples = {name for name, test in ((t.name, t) for t in doctest.DocTestFinder().find(magan)) if test.examples}
    assert {"magan.MultiAngleAttention", "magan.Generator", "magan.Discriminator", "magan.kid_from_features"} <= examples
    assert results.failed == 0 and results.attempted >= 12


def test_no_arguments_prints_help():
    result = subprocess.run([sys.executable, str(HERE / "magan.py")], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0 and "train" in result.stdout and "usage" in result.stdout


@pytest.mark.parametrize("argv,message", [
    (["train", "--size", "100"], "not a multiple of 32"),
    (["train", "--size", "0"], "not a multiple of 32"),
    (["train", "--iters", "0"], "must be a positive integer"),
    (["train", "--iters", "-5"], "must be a positive integer"),
    (["train", "--w-style", "-1"], "must be a finite number >= 0"),
    (["train", "--w-cam", "nan"], "must be a finite number >= 0"),
    (["train", "--device", "tpu"], "is not a device"),
    (["train", "--attention", "foo"], "invalid choice"),
    (["train", "--p-gen", "0.5"], "must be at least 1"),
    (["train", "--p-dis", "0"], "must be at least 1"),
    (["translate", "--ckpt", "c", "--input", "i", "--out", "o", "--size", "100"], "not a multiple of 32"),
])
def test_bad_arguments_are_parse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        magan.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_requirements_exclude_torch_with_the_spectral_norm_autocast_crash():
    # pytorch/pytorch#125544: spectral norm under CUDA autocast crashes in torch 2.3 (fixed in 2.4)
    floors = dict(line.split(">=") for line in (HERE / "requirements.txt").read_text().split() if ">=" in line)
    assert tuple(int(v) for v in floors["torch"].split(".")[:2]) >= (2, 4)
    assert tuple(int(v) for v in floors["torchvision"].split(".")[:2]) >= (0, 19)


def test_bench_runs_and_counts_parameters(capsys):
    cfg = Config(size=32, ch=8, n_res=1, device="cpu", w_style=0.0, w_content=0.0)  # no VGG terms: quicker
    rows = magan.bench(cfg, iters=2, warmup=1)
    bf16 = "+bf16" if magan.native_bf16(torch.device("cpu")) else "+bf16 (emulated)"
    train_row = ["fast path"] if sys.platform.startswith("linux") else []  # training's own, memory kept
    assert [row["mode"] for row in rows] == ["fp32", "+channels_last", "+fused Adam", bf16] + train_row
    for row in rows:
        assert row["ms_per_iter"] > 0 and row["it_per_s"] == pytest.approx(1000 / row["ms_per_iter"])
    out = capsys.readouterr().out
    assert "data loading:" in out and "ms per batch" in out
    G = Generator(ch=8, n_res=1, size=32)
    assert f"generator {sum(p.numel() for p in G.parameters()) / 1e6:.2f}M" in out
    assert "1M iterations" in out and "fp32" in out


FAULT_ROUNDS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import magan
assert magan.keep_freed_memory(), "glibc refused a setting"
def iteration():  # an iteration's pattern: a dozen 4-16 MB tensors made, then freed
    tensors = [torch.ones(1 << (20 + i % 3)) for i in range(12)]
    del tensors
iteration(); iteration()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    iteration()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[5])  # the median round: a heap that grows once is not a round that faults
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings (Linux)")
def test_freed_memory_is_kept_so_iterations_stop_faulting_pages(tmp_path, monkeypatch):
    """8.5: with freed memory kept, the same large tensors made and freed again take no new pages
    from the kernel (minor page faults, counted by getrusage). glibc's defaults hand some or all of
    them back and fault them in again (measured: 0 to 28,640 a round, varying from one process to
    the next; in a real 96 px iteration 5,000-10,000, against about 100 kept). Raising only the
    trim threshold faults every page every round (it freezes the mmap threshold at 128 KB). In a fresh
    process: the setting is process-wide and for good. Then: training's fast path on a CPU asks for
    it, --no-fast does not."""
    run = subprocess.run([sys.executable, "-c", FAULT_ROUNDS, str(HERE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) < 5
    calls = []
    monkeypatch.setattr(magan, "keep_freed_memory", lambda: calls.append(1) or True)
    for fast in (False, True):
        cfg = tiny_config(tmp_path, fast=fast, w_style=0.0, w_content=0.0)  # no VGG: quicker
        magan.build_networks(cfg, torch.device("cpu"), say=lambda *a, **k: None)
        assert len(calls) == fast


def test_device_auto_prefers_cuda_then_apples_mps_then_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert magan.pick_device("auto") == magan.pick_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert magan.pick_device("auto") == torch.device("cpu")
    with pytest.raises(MaganError, match="no Apple GPU"):
        magan.pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert magan.pick_device("auto", local_rank=1) == torch.device("cuda:1")


def test_compile_that_cannot_work_here_is_said_and_skipped(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(torch, "compile", broken)
    magan.train(tiny_config(tmp_path, iters=1, compile=True, sample_every=100))
    assert "--compile is off: torch.compile does not work here (RuntimeError: no C++ compiler" in capsys.readouterr().out


def test_bench_takes_the_preset_then_explicit_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(magan, "bench", lambda cfg, iters, warmup, threads: seen.update(cfg=cfg, iters=iters))
    assert magan.main(["bench", "--preset", "ugatit", "--attention", "ma", "--size", "32", "--iters", "3"]) == 0
    cfg = seen["cfg"]
    assert (cfg.attention, cfg.size, seen["iters"]) == ("ma", 32, 3)      # the explicit flags win
    assert (cfg.w_style, cfg.w_content, cfg.vgg_weights) == (0.0, 0.0, "none")  # the rest is the preset's


def test_fp32_is_fp32_on_cuda_and_bf16_only_where_native(monkeypatch):
    """No TF32 (cuDNN's default on Ampere and newer) in fp32 convolutions; bf16 autocast only on
    devices with native bf16: CUDA from compute capability 8.0, CPUs with AMX or AVX-512 BF16."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        for fast in (True, False):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            magan.cuda_numerics(fast)
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert torch.backends.cudnn.benchmark == fast
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags
    for capability, native in (((8, 0), True), ((9, 0), True), ((7, 5), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert magan.native_bf16(torch.device("cuda")) == native, capability
    assert not magan.native_bf16(torch.device("mps"))
    cpu_has_it = any(f in Path("/proc/cpuinfo").read_text() for f in ("amx_bf16", "avx512_bf16")) \
        if Path("/proc/cpuinfo").exists() else False
    assert magan.native_bf16(torch.device("cpu")) == cpu_has_it
    cfg = Config(size=32, ch=4, n_res=1)
    for fast, bf16 in ((False, None), (True, False), (True, True)):
        _, _, autocast = magan.place_networks(MAGAN(cfg), None, torch.device("cpu"), fast, bf16)
        assert isinstance(autocast, torch.autocast) == bool(bf16)


# =================================================================================================
# A user's first hour: the demo, progress, --data, the run page, rough edges
# =================================================================================================

def test_bare_train_command_is_a_demo_on_the_bundled_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo picks runs/demo, runs/demo1, ... under the current folder
    cfg, note = magan.make_config({})
    assert (cfg.size, cfg.ch, cfg.n_res, cfg.vgg_weights, cfg.iters) == (64, 16, 2, "none", 3000)
    assert Path(cfg.a).resolve() == (DATA / "trainA").resolve() or cfg.a == "data/trainA"
    assert "demo" in note and "python magan.py train --data DATASET" in note
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert magan.make_config({})[0].out == "runs/demo1"  # never mixes with an earlier demo
    cfg, _ = magan.make_config({"size": 32, "iters": 7})  # every demo value stays a flag
    assert (cfg.size, cfg.iters, cfg.ch) == (32, 7, 16)
    paper, note = magan.make_config({"data": str(DATA)})
    assert note is None and (paper.size, paper.ch, paper.vgg_weights, paper.iters) == (256, 64, "imagenet", 1_000_000)


def test_demo_command_trains_without_downloading(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "magan.py"), "train", "--size", "32", "--ch", "4",
                             "--n-res", "1", "--iters", "2", "--sample-every", "2", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "demo:" in result.stdout and "UserWarning" not in result.stderr  # no data-loader worker warning
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["vgg_weights"] == "none"


def test_data_root_and_the_mistakes_around_it(tmp_path):
    cfg, _ = magan.make_config({"data": str(DATA)})
    assert (cfg.a, cfg.b) == (str(DATA / "trainA"), str(DATA / "trainB"))
    horses = solid_folder(tmp_path / "horses", 2)
    for given, expected in (({"a": str(horses)}, (str(horses), str(DATA / "trainB"))),   # B from ROOT
                            ({"b": str(horses)}, (str(DATA / "trainA"), str(horses)))):  # A from ROOT
        cfg, _ = magan.make_config({"data": str(DATA), **given})
        assert (cfg.a, cfg.b) == expected
    with pytest.raises(MaganError, match="pass --data"):
        magan.list_images(DATA)                       # a root passed where a domain folder is expected
    with pytest.raises(MaganError, match="expected the CycleGAN layout"):
        magan.make_config({"data": str(DATA / "trainA")})
    nested = tmp_path / "nested"
    (nested / "horses").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "horses" / "0.png")
    with pytest.raises(MaganError, match="subfolders hold 1"):
        magan.list_images(nested)


@pytest.mark.parametrize("seconds,expected", [(1e9, ["[1/3", "[3/3"]), (0.0, ["[1/3", "[2/3", "[3/3"])])
def test_progress_from_the_first_iteration_then_by_time(tmp_path, capsys, monkeypatch, seconds, expected):
    """A line after the first iteration and the last; between them every --log-every iterations
    (100 here) or every 30 s (made never, then always)."""
    monkeypatch.setattr(magan.Progress, "SECONDS", seconds)
    magan.train(tiny_config(tmp_path, iters=3, log_every=100, sample_every=100, save_every=100))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert [l.split("]")[0] for l in lines] == expected
    assert "first iteration:" in lines[0] and all("it/s" in l and "ETA" in l for l in lines)
    assert "ETA --" in lines[0] and "ETA --" not in lines[-1]  # the start-up is not in the ETA


def test_workers_default_to_the_machine(monkeypatch):
    monkeypatch.setattr(magan.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert magan.resolve_workers(-1) == 1 and magan.resolve_workers(-1, processes_per_machine=2) == 0
    assert magan.resolve_workers(3) == 3
    monkeypatch.setattr(magan.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert magan.resolve_workers(-1) == 4


def test_more_workers_than_cores_is_said_once_in_our_words(tmp_path, capsys, monkeypatch):
    import warnings
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one core, for PyTorch too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        magan.train(tiny_config(tmp_path, iters=1, workers=2))
    assert capsys.readouterr().out.count("note: 2 data workers on 1 CPU core(s)") == 1
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]


def test_a_second_ctrl_c_exits_without_a_traceback(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(magan, "train", interrupted)
    try:
        code = magan.main(["train", "--data", str(DATA)])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main(): the user would see a traceback")
    assert code == 130
    assert "aborted" in capsys.readouterr().err


class PageParser(__import__("html.parser").parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.curves, self.widths = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
            self.widths.append(attrs.get("style", ""))
        if tag == "polyline" and "data-term" in attrs and len(attrs.get("points", "").split()) >= 2:
            self.curves.append(attrs["data-term"])


def test_run_page_shows_the_latest_grids_and_every_loss_curve(tmp_path):
    run = magan.train(tiny_config(tmp_path, iters=4, log_every=1, sample_every=2, w_pixel=1.0))
    page = PageParser()
    page.feed((run / "index.html").read_text())
    # the latest grids first, then the earlier ones, newest first
    assert page.images == ["samples/a2b_0000004.png", "samples/b2a_0000004.png",
                           "samples/a2b_0000002.png", "samples/b2a_0000002.png"]
    assert all((run / src).is_file() for src in page.images)
    weighted = [t for t in magan.LOSS_TERMS if getattr(run_config(run), f"w_{t}") > 0]
    assert sorted(page.curves) == sorted(["D", "G"] + weighted) and "pixel" in page.curves
    assert "iteration 4 of 4" in (run / "index.html").read_text()
    assert "width:768px" in page.widths[0]  # 4 columns of 32-px tiles, each shown at 192 px


def test_charts_have_axes_and_a_log_scale_where_a_term_spans_decades():
    falling = [(i * 100, 4000 / (1 + i) ** 2) for i in range(30)]       # from 4,000 to about 5: log scale
    chart = magan.svg_chart("G", falling)
    labels = [t.split(">")[1].split("<")[0] for t in chart.split("<text")[1:]]
    assert "G (log scale)" in labels and {"10", "100", "1,000"} <= set(labels)
    assert {"0", "1,000", "2,000"} <= set(labels) and "iteration" in labels  # iteration ticks
    long_run = magan.svg_chart("D", [(i, 1.0 + i % 2) for i in range(0, 1_000_001, 50_000)])
    assert ">500k<" in long_run and ">1M<" in long_run                           # not 500000 or 1e+06
    flat = magan.svg_chart("cycle", [(i, 0.5 + 0.01 * (i % 3)) for i in range(10)])
    assert "(log scale)" not in flat and "0.5" in flat


def run_config(run: Path) -> Config:
    return Config(**json.loads((run / "config.json").read_text()))


def test_tensorboard_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
        has_tensorboard = True
    except ImportError:
        has_tensorboard = False
    if has_tensorboard:
        run = magan.train(tiny_config(tmp_path, iters=2, tensorboard=True))
        assert any((run / "tensorboard").iterdir())
    else:
        with pytest.raises(MaganError, match="pip install tensorboard"):
            magan.train(tiny_config(tmp_path, iters=2, tensorboard=True))


def test_resume_from_another_folder_uses_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(HERE)
    cfg = tiny_config(tmp_path, iters=2, a="data/trainA", b="data/trainB")  # relative to where it started
    run = magan.train(cfg)
    saved = run_config(run)
    assert Path(saved.a).is_absolute() and Path(saved.out).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3"]) == 0


def test_resume_with_more_iterations_says_the_schedule_changes(tmp_path, capsys):
    magan.train(tiny_config(tmp_path, iters=4, save_every=2))
    capsys.readouterr()
    magan.train(tiny_config(tmp_path, iters=8, save_every=2, resume=True))
    out = capsys.readouterr().out
    # at iteration 4 of 4 the rate had decayed to 0; of 8 it is still the constant 1e-4
    assert "learning-rate schedule" in out and "now 0.0001 (it was 0)" in out


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


def test_translate_writes_at_the_input_size_and_never_over_the_inputs(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "latest.pt"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (90, 50), (20, 200, 40)).save(inputs / "wide.png")
    written = magan.translate(ckpt, inputs, tmp_path / "out", device="cpu")
    assert Image.open(written[0]).size == (90, 50)
    assert Image.open(magan.translate(ckpt, inputs, tmp_path / "sq", device="cpu", keep_size=False)[0]).size == (32, 32)
    with pytest.raises(MaganError, match="overwrite the originals"):
        magan.translate(ckpt, inputs, inputs, device="cpu")
    one = magan.translate(ckpt, inputs / "wide.png", tmp_path / "result.jpg", device="cpu")
    assert one == [tmp_path / "result.jpg"] and (tmp_path / "result.jpg").is_file()


def test_export_is_small_translates_and_cannot_resume(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "latest.pt"
    exported = magan.export_generators(ckpt, tmp_path / "model.pt")
    assert exported.stat().st_size < ckpt.stat().st_size / 3
    written = magan.translate(exported, DATA / "testA" / "0001.jpg", tmp_path / "x", device="cpu")
    G_export, _ = magan.load_generator(exported, "a2b", torch.device("cpu"))
    G_ckpt, _ = magan.load_generator(ckpt, "a2b", torch.device("cpu"))
    for (k, v), (_, w) in zip(G_export.state_dict().items(), G_ckpt.state_dict().items()):
        assert torch.equal(v, w), k
    assert written and magan.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "m2.pt")]) == 0
    with pytest.raises(MaganError, match="only translates"):
        magan.load_checkpoint(exported)


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(magan, "cam_loss", lambda s, t: torch.tensor(float("nan")))
    with pytest.raises(MaganError) as error:
        magan.train(tiny_config(tmp_path, iters=4))
    assert "no checkpoint had been saved yet" in str(error.value) and "--resume" not in str(error.value)


def test_offline_imagenet_inception_error_names_its_own_weights(tmp_path):
    with pytest.raises(MaganError) as error:
        magan.load_inception("imagenet", str(tmp_path / "missing.pth"))
    assert "inception_v3_google" in str(error.value) and "pt_inception" not in str(error.value)


@pytest.mark.parametrize("argv,hint", [(["train", "--light", "True"], "take no value"),
                                       (["train", "--img_size", "256"], "--img_size -> --size"),
                                       (["train", "--iteration", "10"], "--iteration -> --iters")])
def test_ugatit_flags_get_the_magan_spelling(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        magan.main(argv)
    assert exit_info.value.code == 2 and hint in capsys.readouterr().err


# #################################################################################################
# Robustness: bad input, interrupted runs, untrusted files. Nothing here is the paper.
# #################################################################################################

# --- bad data -------------------------------------------------------------------------------------

def messy_folder(root: Path) -> Path:
    """Good images in every odd mode, plus files that are not (readable) images."""
    root.mkdir(parents=True)
    good = Image.open(DATA / "trainA" / "0000.jpg")
    good.save(root / "good.jpg")
    good.convert("L").save(root / "grey.png")
    good.convert("RGBA").save(root / "rgba.png")
    good.convert("P").save(root / "palette.png")
    Image.new("I;16", (40, 30), 40000).save(root / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(root / "huge.jpg", quality=70)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def test_list_images_reports_and_skips_non_images(tmp_path, capsys):
    folder = messy_folder(tmp_path / "messy")
    files = [p.name for p in magan.list_images(folder)]
    assert "notes.txt" not in files and "zero_bytes.jpg" not in files
    assert "truncated.jpg" in files  # its header is fine: it fails only when decoded
    out = capsys.readouterr().out
    assert "notes.txt" in out and "zero_bytes.jpg" in out and "skipping 2" in out


def test_dataset_converts_odd_modes_and_skips_truncated(tmp_path):
    folder = messy_folder(tmp_path / "messy")
    data = magan.UnpairedImages(folder, folder, 32, seed=0)
    n = len(data.files[0])
    skipped = set()
    for k in range(n):
        x_a, x_b, bad = data[k]
        assert x_a.shape == x_b.shape == (3, 32, 32)
        assert x_a.min() >= -1 and x_a.max() <= 1
        skipped.update(bad)
    assert len(skipped) == 1 and "truncated.jpg" in next(iter(skipped))
    sixteen = magan.load_rgb(folder / "sixteen_bit.png")
    assert sixteen.mode == "RGB" and sixteen.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256
    rgba = magan.load_rgb(folder / "rgba.png")
    assert rgba.mode == "RGB"


def test_training_reports_a_bad_file_once(tmp_path, capsys):
    folder = messy_folder(tmp_path / "messy")
    n = len(magan.list_images(folder))
    capsys.readouterr()
    magan.train(tiny_config(tmp_path, a=str(folder), b=str(folder), iters=2 * n, log_every=100,
                            sample_every=100, save_every=100, w_style=0, w_content=0))
    out = capsys.readouterr().out
    assert out.count("skipping unreadable image") == 1 and "truncated.jpg" in out


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no readable image"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x"), (p / "b.jpg").write_bytes(b"")), "no readable image"),
])
def test_unusable_folders_are_clear_errors(tmp_path, make, message):
    folder = tmp_path / "folder"
    make(folder)
    with pytest.raises(MaganError, match=message):
        magan.train(tiny_config(tmp_path, a=str(folder)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_folder_of_only_undecodable_images_fails_before_training(tmp_path):
    folder = truncated_jpegs(tmp_path / "broken")
    with pytest.raises(MaganError, match="can be decoded"):
        magan.train(tiny_config(tmp_path, b=str(folder)))


# --- robustness: interruption, crashes, non-finite losses ---------------------------------------

def start_training(out: Path, workers: int, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "magan.py"), "train", "--size", "32", "--ch", "8", "--n-res", "1",
         "--iters", "100000", "--log-every", "1", "--save-every", "100000", "--sample-every", "100000",
         "--vgg-weights", "none", "--workers", str(workers), "--device", "cpu", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, start_new_session=new_session)


def wait_for_progress(process: subprocess.Popen):
    """Block until the run prints its first progress line: a condition, not a sleep."""
    for line in process.stdout:
        if line.startswith("[") and "/100000]" in line:
            return
    raise AssertionError(f"training ended before its first iteration: {process.stderr.read()}")


def assert_saved_once(process: subprocess.Popen, out: Path):
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and stdout.count("saving iteration") == 1 and "--resume" in stdout
    ckpt = magan.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] >= 1 and f"stopped at iteration {ckpt['iteration']}" in stdout


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    process = start_training(tmp_path / "run", workers=0)
    wait_for_progress(process)
    process.send_signal(getattr(signal, sig))
    assert_saved_once(process, tmp_path / "run")


def test_sigterm_to_the_whole_process_group_saves_once(tmp_path):
    """`timeout`, SLURM and systemd signal every process of the group, data workers included."""
    process = start_training(tmp_path / "run", workers=2, new_session=True)
    wait_for_progress(process)
    os.killpg(process.pid, signal.SIGTERM)
    assert_saved_once(process, tmp_path / "run")


def test_a_stop_signal_during_sampling_is_saved(tmp_path, monkeypatch):
    real_save = magan.save_image_grid
    sent = []

    def save_then_signal(*args, **kwargs):  # one signal, arriving while the first grid is written
        real_save(*args, **kwargs)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))

    monkeypatch.setattr(magan, "save_image_grid", save_then_signal)
    run = magan.train(tiny_config(tmp_path, iters=10, sample_every=3, save_every=100, snapshot_every=100))
    assert magan.load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == 3


def test_the_signal_handler_only_sets_a_flag(monkeypatch):
    """Printing from a signal handler crashes when the signal lands during another print."""
    def no_print(*args, **kwargs):
        raise AssertionError("the handler printed")

    with magan.StopOnSignal() as stop:
        monkeypatch.setattr("builtins.print", no_print)
        stop._handle(signal.SIGTERM, None)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal aborts at once
            stop._handle(signal.SIGINT, None)
        monkeypatch.undo()


def test_crash_while_writing_keeps_latest_readable(tmp_path, monkeypatch):
    run = magan.train(tiny_config(tmp_path, iters=2))
    latest = run / "checkpoints" / "latest.pt"
    before = latest.read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(magan.torch, "save", dying_save)
    with pytest.raises(MaganError, match="previous latest.pt is intact"):
        magan.train(tiny_config(tmp_path, iters=4, resume=True))
    assert latest.read_bytes() == before
    assert magan.load_checkpoint(latest)["iteration"] == 2
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_style_loss = magan.style_loss
    calls = []

    def style_loss_going_nan(a, b):  # called twice per iteration: NaN from iteration 3 on
        calls.append(1)
        return real_style_loss(a, b) * (float("nan") if len(calls) > 4 else 1.0)

    monkeypatch.setattr(magan, "style_loss", style_loss_going_nan)
    with pytest.raises(MaganError, match=r"style.*iteration 3") as error:
        magan.train(tiny_config(tmp_path, iters=6, save_every=2))
    assert "iteration 2" in str(error.value) and "--lr" in str(error.value)
    ckpt = magan.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for net in ckpt["nets"].values() for v in net.values() if v.is_floating_point())


# --- robustness: checkpoints --------------------------------------------------------------------

def test_truncated_random_and_foreign_checkpoints(trained_run, tmp_path):
    good = (trained_run / "checkpoints" / "latest.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(MaganError, match="cannot be read"):
        magan.load_checkpoint(truncated)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(MaganError, match="cannot be read"):
        magan.load_checkpoint(noise)
    # a checkpoint whose weights do not fit its config (another model configuration)
    ckpt = magan.load_checkpoint(trained_run / "checkpoints" / "latest.pt")
    ckpt["config"]["ch"] = 16
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(MaganError, match="does not fit"):
        magan.load_generator(other, "a2b", torch.device("cpu"))


class Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse it."""
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": magan.CHECKPOINT_FORMAT, "payload": Payload()}, evil)
    with pytest.raises(MaganError, match="cannot be read"):
        magan.load_checkpoint(evil)
    assert "this must never run" not in capsys.readouterr().out


def test_resume_with_other_architecture_names_the_flag(trained_run, capsys):
    code = magan.main(["train", "--out", str(trained_run), "--resume", "--ch", "16", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ch is 16" in err and "trained with 8" in err


def test_command_line_resume_takes_unrepeated_flags_from_the_checkpoint(trained_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3"]) == 0
    ckpt = magan.load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 3
    assert (ckpt["config"]["size"], ckpt["config"]["ch"], ckpt["config"]["vgg_weights"]) == (32, 8, "random")
    assert "resuming" in capsys.readouterr().out


def test_resume_applies_new_adam_settings_and_refuses_another_preset(trained_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3", "--preset", "ugatit"]) == 2
    assert "--preset ugatit at --resume" in capsys.readouterr().err
    assert magan.main(["train", "--out", str(run), "--resume", "--iters", "3", "--beta1", "0.9", "--beta2", "0.99",
                       "--weight-decay", "0"]) == 0
    assert "--beta1 0.5 -> 0.9" in capsys.readouterr().out
    ckpt = magan.load_checkpoint(run / "checkpoints" / "latest.pt")
    for opt in ("opt_G", "opt_D"):  # what ran: the optimizers' own settings, saved with their state
        group = ckpt[opt]["param_groups"][0]
        assert tuple(group["betas"]) == (0.9, 0.99) and group["weight_decay"] == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["beta1"], config["beta2"], config["weight_decay"]) == (0.9, 0.99, 0)


def test_resume_of_a_finished_run_asks_for_more_iterations(trained_run):
    with pytest.raises(MaganError, match="larger --iters"):
        magan.train(tiny_config(trained_run.parent, out=str(trained_run), iters=2, resume=True))


def test_new_run_refuses_to_overwrite(trained_run):
    with pytest.raises(MaganError, match="--resume"):
        magan.train(tiny_config(trained_run.parent, out=str(trained_run)))


# --- robustness: arguments ----------------------------------------------------------------------


def test_full_mode_checkpoint_translates_only_at_its_size(tmp_path):
    run = magan.train(tiny_config(tmp_path, iters=1, light=False, save_every=1, sample_every=1))
    with pytest.raises(MaganError, match="training size 32"):
        magan.translate(run / "checkpoints" / "latest.pt", DATA / "testA", tmp_path / "x", device="cpu", size=64)


# #################################################################################################
# CUDA: run only where a GPU is present (skipped in CI). The fast path against fp32, compile,
# checkpoints that move between CUDA and CPU, translate and KID on the GPU.
# #################################################################################################

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_cuda_fast_path_matches_fp32_on_one_step(tmp_path):
    """bf16 autocast, channels_last and fused Adam on the GPU against fp32 from the same weights.
    Tolerance: each loss within 2% (bf16 keeps 8 bits of mantissa; CUDA autocast casts more ops
    than CPU's, e.g. spectral norm's power iteration)."""
    cfg = tiny_config(tmp_path, size=64, device="cuda")
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        nets, vgg, autocast = magan.place_networks(MAGAN(cfg), magan.load_vgg("random"), torch.device("cuda"), fast)
        opt_G, opt_D = magan.make_optimizers(nets, cfg, fast)
        x_a, x_b = (random_images(1, 64, seed).cuda() for seed in (1, 2))
        results.append(magan.train_step(nets, vgg, opt_G, opt_D, magan.to_device(x_a, torch.device("cuda"), fast),
                                        magan.to_device(x_b, torch.device("cuda"), fast), cfg.loss_weights(), cfg.gan_loss, autocast))
    for name in results[0]:
        assert results[1][name].item() == pytest.approx(results[0][name].item(), rel=0.02, abs=1e-6), name


@requires_cuda
def test_cuda_training_with_compile_and_resume_across_devices(tmp_path):
    run = magan.train(tiny_config(tmp_path, size=64, device="cuda", compile=True, iters=3, save_every=3))
    assert magan.load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == 3
    magan.train(tiny_config(tmp_path, size=64, device="cpu", iters=4, save_every=4, resume=True))
    magan.train(tiny_config(tmp_path, size=64, device="cuda", iters=5, save_every=5, resume=True))
    ckpt = magan.load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 5
    assert all(torch.isfinite(v).all() for net in ckpt["nets"].values() for v in net.values() if v.is_floating_point())


@requires_cuda
def test_cuda_translate_and_kid(trained_run, tmp_path, inception_weights):
    written = magan.translate(trained_run / "checkpoints" / "latest.pt", DATA / "testA", tmp_path / "out", device="cuda")
    assert len(written) == 20
    on_gpu = magan.kid_between_folders(DATA / "testB", tmp_path / "out", block_size=5,
                                       inception_weights=str(inception_weights), device="cuda")
    on_cpu = magan.kid_between_folders(DATA / "testB", tmp_path / "out", block_size=5,
                                       inception_weights=str(inception_weights), device="cpu")
    assert on_gpu[0] == pytest.approx(on_cpu[0], rel=1e-3, abs=1e-6)  # TF32 must not leak into KID
