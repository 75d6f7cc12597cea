"""Tests for magan.py. Run: python -m pytest -q test_magan.py

Everything runs on CPU at 32-64 px with narrow networks and a randomly initialised VGG:
no test needs a download or a GPU."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import magan
from magan import (AdaLIN, Config, Discriminator, Generator, LIN, MAGAN, MultiAngleAttention,
                   MaganError, adversarial_loss, cam_loss, content_loss, gram_matrix, style_loss)

HERE = Path(__file__).resolve().parent


def tiny_config(tmp_path, **overrides) -> Config:
    """A config that trains in a fraction of a second per iteration on CPU."""
    base = dict(a=str(HERE / "data" / "trainA"), b=str(HERE / "data" / "trainB"), out=str(tmp_path / "run"),
                size=32, ch=8, n_res=1, iters=4, vgg_weights="random", device="cpu", workers=0,
                log_every=2, sample_every=2, save_every=2, snapshot_every=4, n_samples=2)
    return Config(**{**base, **overrides})


def make_step_objects(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    nets = MAGAN(cfg)
    vgg = magan.load_vgg(cfg.vgg_weights)
    opt_G, opt_D = magan.make_optimizers(nets, cfg, torch.device("cpu"))
    return nets, vgg, opt_G, opt_D


# --- shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("light", [True, False])
def test_generator_shapes(size, light):
    G = Generator(ch=8, n_res=2, size=size, light=light)
    y, logits, heatmap = G(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3, size, size)
    assert logits.shape == (2, 3)
    assert heatmap.shape == (2, 1, size // 4, size // 4)
    assert y.abs().max() <= 1  # tanh output


@pytest.mark.parametrize("size", [32, 64, 256])
def test_discriminator_shapes(size):
    n_global = magan.global_depth(size)
    for n_down in (n_global, 3):
        D = Discriminator(ch=4, n_down=n_down, size=size)
        patch, logits, heatmap = D(torch.randn(2, 3, size, size))
        grid = size // 2**n_down - 1
        assert heatmap.shape == (2, 1, grid, grid)
        assert patch.shape == (2, 1, grid - 1, grid - 1)
        assert logits.shape == (2, 3)
    # The paper's 256-px layout: global D down to S/32 (patch 6x6), local to S/8 (patch 30x30).
    if size == 256:
        assert n_global == 5


@pytest.mark.parametrize("attention,n_logits", [("ma", 3), ("cam", 2), ("sam", 1), ("none", 0)])
def test_attention_modes_shapes(attention, n_logits):
    module = MultiAngleAttention(16, 8, attention, p=2.0)
    a, logits, heatmap = module(torch.randn(3, 16, 8, 8))
    assert a.shape == (3, 16, 8, 8) and logits.shape == (3, n_logits) and heatmap.shape == (3, 1, 8, 8)
    assert torch.allclose(heatmap, a.sum(1, keepdim=True))


# --- multi-angle attention against explicit loops -------------------------------------------------

@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_sam_matches_explicit_loop(p):
    torch.manual_seed(0)
    B, C, h = 2, 5, 4
    module = MultiAngleAttention(C, h, "ma", p=p)
    theta = torch.randn(B, C, h, h)
    a, logits, _ = module(theta)
    w_gap = module.fc["gap"].weight[0]
    w_gmp = module.fc["gmp"].weight[0]
    w_sam = module.fc["sam"].weight[0]
    for b in range(B):
        # γ_ij = Σ_n |θ_n,ij|^p, then unit L2 norm over positions, then ξ_γ = Σ_m ω_m γ_m
        gamma = [[sum(abs(theta[b, n, i, j].item()) ** p for n in range(C)) for j in range(h)] for i in range(h)]
        norm = math.sqrt(sum(g * g for row in gamma for g in row))
        xi_sam = sum(w_sam[i * h + j].item() * gamma[i][j] / norm for i in range(h) for j in range(h))
        xi_gap = sum(w_gap[n].item() * theta[b, n].mean().item() for n in range(C))
        xi_gmp = sum(w_gmp[n].item() * theta[b, n].max().item() for n in range(C))
        assert logits[b].tolist() == pytest.approx([xi_gap, xi_gmp, xi_sam], rel=1e-4, abs=1e-6)
    # a(x) = ReLU(Conv1x1([ω_β ⊙ θ, ω_α ⊙ θ, ω_γ ⊙ θ])) with ω_γ weighting positions
    a_sam = torch.empty_like(theta)
    for i in range(h):
        for j in range(h):
            a_sam[:, :, i, j] = theta[:, :, i, j] * w_sam[i * h + j]
    stacked = torch.cat([theta * w_gap.view(1, C, 1, 1), theta * w_gmp.view(1, C, 1, 1), a_sam], 1)
    assert torch.allclose(a, F.relu(module.conv1x1(stacked)), atol=1e-6)


def test_sam_weight_map_is_resized_on_another_grid():
    module = MultiAngleAttention(4, 8, "sam")
    a, logits, heatmap = module(torch.randn(1, 4, 16, 16))  # translating at twice the training size
    assert a.shape == (1, 4, 16, 16) and logits.shape == (1, 1)
    weight = module.fc["sam"].weight.view(1, 1, 8, 8)
    expected = F.interpolate(weight, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(module.sam_weight_map(16, 16), expected.view(16, 16))
    assert torch.allclose(module.sam_weight_map(8, 8), weight.view(8, 8))


def test_spectral_norm_attention_uses_normalised_weight():
    torch.manual_seed(0)
    module = MultiAngleAttention(6, 4, "cam", spectral=True).eval()  # eval: no power iteration
    theta = torch.randn(2, 6, 4, 4)
    _, logits, _ = module(theta)
    w = module.fc["gap"].weight
    assert torch.allclose(logits[:, :1], theta.mean((2, 3)) @ w.t(), atol=1e-6)
    assert torch.linalg.matrix_norm(w.detach(), ord=2).item() == pytest.approx(1.0, rel=1e-2)


# --- normalisation ----------------------------------------------------------------------------

def test_adalin_limits_are_instance_and_layer_norm():
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
        lin = LIN(6)  # rho starts at 0: layer norm, identity affine
        assert torch.allclose(lin(x), F.layer_norm(x, x.shape[1:], eps=1e-5), atol=1e-5)


def test_rho_is_clipped_after_a_training_step(tmp_path):
    cfg = tiny_config(tmp_path)
    nets, vgg, opt_G, opt_D = make_step_objects(cfg)
    norms = [m for G in nets.generators() for m in G.modules() if isinstance(m, (AdaLIN, LIN))]
    with torch.no_grad():
        for i, m in enumerate(norms):
            m.rho.fill_(1.7 if i % 2 else -0.4)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    magan.train_step(nets, vgg, opt_G, opt_D, x, x.flip(-1), cfg)
    values = torch.cat([m.rho.flatten() for m in norms])
    assert values.min() >= 0 and values.max() <= 1
    assert (values == 1).any() and (values == 0).any()


# --- losses against hand computations -----------------------------------------------------------

def test_gram_and_style_loss_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    # M = F Fᵀ / (C·H·W) = [[1+4, 3+8], [3+8, 9+16]] / 4
    assert torch.allclose(gram_matrix(f), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # M = I / 4
    # mean |[[5, 11], [11, 25]] / 4 − I / 4| = (4 + 11 + 11 + 24) / 4 / 4
    assert style_loss(f, g).item() == pytest.approx(50 / 16)
    # a random case against an explicit triple loop
    torch.manual_seed(1)
    h = torch.randn(2, 3, 4, 5)
    m = gram_matrix(h)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                expected = sum(h[b, i].flatten()[k] * h[b, j].flatten()[k] for k in range(20)) / 60
                assert m[b, i, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_content_loss():
    x = torch.randn(2, 8, 3, 3)
    assert content_loss(x, x.clone()).item() == 0
    assert content_loss(x, x + 0.5).item() == pytest.approx(0.5)


def test_lsgan_and_bce_by_hand():
    logits = torch.tensor([0.5, 2.0])
    assert adversarial_loss(logits, True).item() == pytest.approx(((0.5 - 1) ** 2 + (2 - 1) ** 2) / 2)
    assert adversarial_loss(logits, False).item() == pytest.approx((0.5 ** 2 + 2 ** 2) / 2)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    assert adversarial_loss(logits, True, "bce").item() == pytest.approx(
        -(math.log(sigmoid(0.5)) + math.log(sigmoid(2.0))) / 2, rel=1e-5)
    assert adversarial_loss(torch.zeros(2, 0), True).item() == 0  # attention "none": no logits


def test_cam_loss_by_hand():
    source, target = torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 2.0]])
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    expected = (-(math.log(sigmoid(0.0)) + math.log(sigmoid(1.0))) / 2
                - (math.log(1 - sigmoid(-1.0)) + math.log(1 - sigmoid(2.0))) / 2)
    assert cam_loss(source, target).item() == pytest.approx(expected, rel=1e-5)


def test_vgg_layers_are_relu4_4_and_relu5_4():
    vgg = magan.load_vgg("random")
    assert isinstance(vgg.to_relu4_4[-1], torch.nn.ReLU) and len(vgg.to_relu4_4) == 27
    assert isinstance(vgg.to_relu5_4[-1], torch.nn.ReLU) and len(vgg.to_relu5_4) == 9
    f4, f5 = vgg(torch.zeros(1, 3, 64, 64))
    assert f4.shape == (1, 512, 8, 8) and f5.shape == (1, 512, 4, 4)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_vgg_weights_from_a_torchvision_state_dict_and_clear_error_when_missing(tmp_path):
    torch.manual_seed(0)
    features = magan.vgg19_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}  # torchvision's key names
    state["classifier.0.weight"] = torch.zeros(1)  # a whole VGG19 file also holds its classifier
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    vgg = magan.load_vgg(str(path))
    assert torch.equal(vgg.to_relu5_4[-2].weight, features[34].weight)  # conv5_4
    with pytest.raises(MaganError) as error:
        magan.train(tiny_config(tmp_path, vgg_weights=str(tmp_path / "missing.pth")))
    for fix in ("--vgg-weights PATH", "--vgg-weights none", "--vgg-weights random", "NOT the paper"):
        assert fix in str(error.value)
    assert not (tmp_path / "run").exists()  # failed before training started
    assert magan.load_vgg("none") is None


def test_learning_rate_schedule():
    cfg = Config(iters=100, lr=1.0)
    assert magan.learning_rate(0, cfg) == 1.0 and magan.learning_rate(49, cfg) == 1.0
    assert magan.learning_rate(50, cfg) == 1.0
    assert magan.learning_rate(75, cfg) == pytest.approx(0.5)
    assert magan.learning_rate(99, cfg) == pytest.approx(0.02)


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attention,light", [("ma", True), ("ma", False), ("cam", True), ("sam", True), ("none", True)])
def test_one_iteration_updates_everything(tmp_path, attention, light):
    cfg = tiny_config(tmp_path, attention=attention, light=light, p_gen=3.0, p_dis=2.0)
    nets, vgg, opt_G, opt_D = make_step_objects(cfg)
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    losses = magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg)
    assert all(torch.isfinite(v) for v in losses.values())
    for name in ("adv", "cycle", "identity", "style", "content"):
        assert losses[name] > 0
    assert (losses["cam"] > 0) == (attention != "none")
    for net_name, net in nets.named_children():
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[f"{net_name}.{k}"])]
        assert changed, f"{net_name} did not change"
        assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def test_zero_weight_switches_term_off(tmp_path):
    cfg = tiny_config(tmp_path, w_style=0, w_content=0, w_cam=0, w_identity=0, w_cycle=0)
    nets, vgg, opt_G, opt_D = make_step_objects(cfg)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    losses = magan.train_step(nets, vgg, opt_G, opt_D, x, x.flip(-1), cfg)
    assert losses["style"] == 0 and losses["content"] == 0  # VGG not even run
    assert losses["G"].item() == pytest.approx(losses["adv"].item())  # only adversarial remains


def state_of(run: Path):
    ckpt = magan.load_checkpoint(run / "checkpoints" / "latest.pt")
    return ckpt


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


def test_train_command_line_writes_run_folder(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "train", "--size", "32", "--ch", "8", "--n-res", "1",
         "--iters", "3", "--log-every", "1", "--sample-every", "3", "--save-every", "3",
         "--vgg-weights", "random", "--workers", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "it/s" in result.stdout and "ETA" in result.stdout and "cam" in result.stdout
    assert (out / "checkpoints" / "latest.pt").is_file()
    assert (out / "config.json").is_file()
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("iteration,") and len(rows) == 4
    for direction in ("a2b", "b2a"):
        grid = Image.open(out / "samples" / f"{direction}_0000003.png")
        # n_samples (4) rows x 4 columns (input, heatmap, translation, cycle) of 32-px images
        assert grid.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)
    ckpt = magan.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 3 and set(ckpt["nets"]) == {"G_ab", "G_ba", "D_ga", "D_gb", "D_la", "D_lb"}
    assert ckpt["config"]["size"] == 32


def test_samples_come_from_test_folders_beside_train(tmp_path):
    assert magan.sample_folder(str(HERE / "data" / "trainA")) == HERE / "data" / "testA"
    lonely = tmp_path / "trainA"
    lonely.mkdir()
    assert magan.sample_folder(str(lonely)) == lonely  # no testA beside it: samples from train
    assert magan.sample_folder(str(tmp_path)) == tmp_path


def test_no_arguments_prints_help():
    result = subprocess.run([sys.executable, str(HERE / "magan.py")], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0 and "train" in result.stdout and "usage" in result.stdout


# --- translate ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-iteration run at 32 px: enough to have a real checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    return magan.train(tiny_config(tmp, iters=2))


def test_translate_writes_one_file_per_input(trained_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (50, 30), 128).save(inputs / "grey.png")                 # grayscale, non-square
    Image.new("RGBA", (40, 70), (255, 0, 0, 100)).save(inputs / "alpha.png")  # transparency
    Image.new("P", (33, 33)).save(inputs / "palette.gif")
    Image.open(HERE / "data" / "testA" / "0000.jpg").save(inputs / "photo.jpg")
    out = tmp_path / "out"
    written = magan.translate(trained_run / "checkpoints" / "latest.pt", inputs, out, "b2a", heatmaps=True,
                              batch=3, device="cpu")
    names = sorted(p.name for p in written)
    assert names == sorted(["grey.png", "alpha.png", "palette.gif", "photo.jpg"])
    for name in names:
        im = Image.open(out / name)
        assert im.size == (32, 32) and im.mode in ("RGB", "P")
        assert (out / "heatmaps" / (Path(name).stem + ".png")).is_file()
    # the translation is the generator's output, pixel for pixel (up to 8-bit rounding)
    G, _ = magan.load_generator(trained_run / "checkpoints" / "latest.pt", "b2a", torch.device("cpu"))
    x = magan.to_tensor(Image.new("RGB", (32, 32), (128, 128, 128)))
    with torch.no_grad():
        expected = G(x[None])[0][0].clamp(-1, 1).add(1).mul(127.5)
    got = magan.to_tensor(Image.open(out / "grey.png").convert("RGB")).add(1).mul(127.5)
    assert (got - expected).abs().max() <= 1.0


def test_translate_single_image_and_bad_checkpoint(trained_run, tmp_path):
    written = magan.translate(trained_run / "checkpoints" / "latest.pt", HERE / "data" / "testA" / "0001.jpg",
                              tmp_path / "one", device="cpu")
    assert [p.name for p in written] == ["0001.jpg"]
    with pytest.raises(MaganError, match="no checkpoint"):
        magan.translate(tmp_path / "missing.pt", HERE / "data" / "testA", tmp_path / "x", device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(MaganError, match="not a MAGAN checkpoint"):
        magan.translate(foreign, HERE / "data" / "testA", tmp_path / "x", device="cpu")


def test_generator_runs_at_another_size_with_resized_sam(trained_run):
    G, cfg = magan.load_generator(trained_run / "checkpoints" / "latest.pt", "a2b", torch.device("cpu"))
    with torch.no_grad():
        y, logits, heatmap = G(torch.zeros(1, 3, 2 * cfg.size, 2 * cfg.size))
    assert y.shape == (1, 3, 64, 64) and heatmap.shape == (1, 1, 16, 16)


# --- KID --------------------------------------------------------------------------------------

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
    with pytest.raises(ValueError):
        magan.kid_from_features(real, fake, "subsets", subset_size=10)


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


def test_kid_command_line(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(magan.fid_inception_v3().state_dict(), weights)
    result = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "kid", "--real", str(HERE / "data" / "testA"),
         "--fake", str(HERE / "data" / "testB"), "--inception-weights", str(weights), "--block-size", "5",
         "--device", "cpu"], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "KID×100 = " in result.stdout and "20 real, 20 fake" in result.stdout
    missing = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "kid", "--real", str(HERE / "data" / "testA"),
         "--fake", str(HERE / "data" / "testB"), "--inception-weights", str(tmp_path / "nope.pth")],
        capture_output=True, text=True, cwd=HERE, timeout=300)
    assert missing.returncode == 2 and "--inception-weights PATH" in missing.stderr and "Traceback" not in missing.stderr


# --- robustness: data ---------------------------------------------------------------------------

def messy_folder(root: Path) -> Path:
    """Good images in every odd mode, plus files that are not (readable) images."""
    root.mkdir(parents=True)
    good = Image.open(HERE / "data" / "trainA" / "0000.jpg")
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
    folder = tmp_path / "broken"
    folder.mkdir()
    data = (HERE / "data" / "trainA" / "0000.jpg").read_bytes()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(MaganError, match="can be decoded"):
        magan.train(tiny_config(tmp_path, b=str(folder)))


# --- robustness: interruption, crashes, non-finite losses ---------------------------------------

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    import signal as signal_module
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(HERE / "magan.py"), "train", "--size", "32", "--ch", "8", "--n-res", "1",
         "--iters", "100000", "--log-every", "1", "--save-every", "100000", "--sample-every", "100000",
         "--vgg-weights", "none", "--workers", "0", "--device", "cpu", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in process.stdout:
        if line.startswith("[") and "/100000]" in line:
            break
    process.send_signal(getattr(signal_module, sig))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "saving" in stdout and "--resume" in stdout and "Traceback" not in stderr
    ckpt = magan.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] >= 1 and f"stopped at iteration {ckpt['iteration']}" in stdout


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


def test_resume_of_a_finished_run_asks_for_more_iterations(trained_run):
    with pytest.raises(MaganError, match="larger --iters"):
        magan.train(tiny_config(trained_run.parent, out=str(trained_run), iters=2, resume=True))


def test_new_run_refuses_to_overwrite(trained_run):
    with pytest.raises(MaganError, match="--resume"):
        magan.train(tiny_config(trained_run.parent, out=str(trained_run)))


# --- robustness: arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--size", "100"], "not a multiple of 32"),
    (["--size", "0"], "not a multiple of 32"),
    (["--iters", "0"], "must be a positive integer"),
    (["--iters", "-5"], "must be a positive integer"),
    (["--w-style", "-1"], "must be a finite number >= 0"),
    (["--w-cam", "nan"], "must be a finite number >= 0"),
    (["--device", "tpu"], "unknown device"),
    (["--attention", "foo"], "invalid choice"),
])
def test_bad_arguments_are_parse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        magan.main(["train"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- bench --------------------------------------------------------------------------------------

def test_bench_runs_and_counts_parameters(capsys):
    cfg = Config(size=32, ch=8, n_res=1, device="cpu")
    rows = magan.bench(cfg, iters=2, warmup=1)
    assert [row["mode"] for row in rows] == ["fp32"]  # the fast path is CUDA-only
    assert rows[0]["ms_per_iter"] > 0 and rows[0]["it_per_s"] == pytest.approx(1000 / rows[0]["ms_per_iter"])
    out = capsys.readouterr().out
    G = Generator(ch=8, n_res=1, size=32)
    assert f"generator {sum(p.numel() for p in G.parameters()) / 1e6:.2f}M" in out
    assert "1M iterations" in out and "fp32" in out


def test_full_mode_mlp_size_matches_the_paper():
    # U-GAT-IT full mode at 256 px, ch 64: the first MLP layer maps C·(S/4)² = 256·64·64 inputs to 256.
    G = Generator(ch=64, n_res=4, size=256, light=False)
    assert G.mlp[0].weight.numel() == 256 * 64 * 64 * 256  # 268,435,456


def test_bf16_autocast_keeps_statistics_and_losses_in_fp32(tmp_path):
    """The fast path's maths, checked on CPU (CPU autocast applies the same bf16 casts as CUDA's):
    one iteration under bf16 autocast gives the fp32 losses up to bf16 rounding."""
    cfg = tiny_config(tmp_path, size=64)
    x_a, x_b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    results = []
    for autocast in (magan.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        nets, vgg, opt_G, opt_D = make_step_objects(cfg, seed=0)
        results.append(magan.train_step(nets, vgg, opt_G, opt_D, x_a, x_b, cfg, autocast))
    fp32, bf16 = results
    for name in ("D", "adv", "cycle", "identity", "cam"):
        assert bf16[name].dtype == torch.float32
        assert bf16[name].item() == pytest.approx(fp32[name].item(), rel=0.05), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.randn(1, 8, 4, 4)
        assert gram_matrix(features).dtype == torch.float32
        h = torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(6, 3, 3, 3))
        assert h.dtype == torch.bfloat16
        assert AdaLIN(6)(h, torch.ones(1, 6), torch.zeros(1, 6)).dtype == torch.float32
        assert magan.InstanceNorm(6)(h).dtype == torch.float32


def test_translate_command_line_with_kid(trained_run, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(magan.fid_inception_v3().state_dict(), weights)
    out = tmp_path / "translated"
    result = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "translate", "--ckpt", str(trained_run / "checkpoints" / "latest.pt"),
         "--input", str(HERE / "data" / "testA"), "--out", str(out), "--device", "cpu",
         "--kid-against", str(HERE / "data" / "testB"), "--inception-weights", str(weights),
         "--protocol", "subsets", "--subsets", "3", "--subset-size", "50"],
        capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (HERE / "data" / "testA").iterdir())
    assert "translated 20/20" in result.stdout
    assert "subset size reduced to 20" in result.stdout and "KID×100 = " in result.stdout
    bad = subprocess.run(
        [sys.executable, str(HERE / "magan.py"), "translate", "--ckpt", str(tmp_path / "nothing.pt"),
         "--input", str(HERE / "data" / "testA"), "--out", str(out)], capture_output=True, text=True, cwd=HERE)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr
