"""Make the small bundled dataset `data/` (CycleGAN layout) deterministically.

    python data/make_data.py          # rewrites data/trainA data/trainB data/testA data/testB

Domain A ("plain"):   a smooth, single-coloured blob on a landscape.
Domain B ("striped"): the same kind of blob, covered with zebra stripes, on the same kind of landscape.

Only the object's texture changes between the domains; the background (sky, ground, horizon,
lighting) is drawn from the same distribution in both. A translator therefore has to find the
object and change it there only: that is what the attention maps should learn to highlight.
Every picture is a pure function of (domain, index), drawn with a seeded torch.Generator.
"""

import math
import shutil
from pathlib import Path

import torch
from PIL import Image

SIZE = 128
COUNTS = {"trainA": 200, "trainB": 200, "testA": 20, "testB": 20}


def smooth_noise(g: torch.Generator, size: int, cells: int) -> torch.Tensor:
    """Value noise in [0, 1]: a random (cells x cells) grid upsampled bicubically to (size, size)."""
    coarse = torch.rand(1, 1, cells, cells, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1)


def background(g: torch.Generator, size: int) -> torch.Tensor:
    """Sky gradient over grassy or sandy ground with a wavy horizon. Returns (3, size, size) in [0, 1]."""
    y = torch.linspace(0, 1, size).view(size, 1).expand(size, size)
    x = torch.linspace(0, 1, size).view(1, size).expand(size, size)
    horizon = 0.35 + 0.2 * torch.rand((), generator=g) + 0.04 * torch.sin(2 * math.pi * (x * (1 + 2 * torch.rand((), generator=g)) + torch.rand((), generator=g)))
    sky_top = torch.tensor([0.25, 0.45, 0.85]) + 0.1 * torch.rand(3, generator=g)
    sky_low = torch.tensor([0.75, 0.85, 0.95]) - 0.1 * torch.rand(3, generator=g)
    t = (y / horizon).clamp(0, 1)
    sky = sky_top.view(3, 1, 1) * (1 - t) + sky_low.view(3, 1, 1) * t
    ground_colour = torch.tensor([0.30, 0.55, 0.20]) if torch.rand((), generator=g) < 0.6 else torch.tensor([0.70, 0.60, 0.40])
    ground_colour = ground_colour + 0.08 * (torch.rand(3, generator=g) - 0.5)
    texture = 0.75 + 0.25 * smooth_noise(g, size, 24) + 0.08 * torch.rand(size, size, generator=g)
    depth_shade = 0.8 + 0.2 * ((y - horizon) / (1 - horizon)).clamp(0, 1)
    ground = ground_colour.view(3, 1, 1) * texture * depth_shade
    is_ground = (y > horizon).float()
    return sky * (1 - is_ground) + ground * is_ground


def blob(g: torch.Generator, size: int):
    """A random rotated ellipse standing on the ground: (mask (size, size) in [0, 1], local coords u, v)."""
    y = torch.linspace(-1, 1, size).view(size, 1).expand(size, size)
    x = torch.linspace(-1, 1, size).view(1, size).expand(size, size)
    cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.7 + torch.tensor([0.0, 0.2])
    rx = 0.25 + 0.25 * torch.rand((), generator=g)
    ry = 0.18 + 0.15 * torch.rand((), generator=g)
    angle = (torch.rand((), generator=g) - 0.5) * 0.8
    u = ((x - cx) * torch.cos(angle) + (y - cy) * torch.sin(angle)) / rx
    v = (-(x - cx) * torch.sin(angle) + (y - cy) * torch.cos(angle)) / ry
    r = torch.sqrt(u ** 2 + v ** 2)
    mask = (1 - r).mul(size * rx / 2).clamp(0, 1)  # about a one-pixel soft edge
    return mask, u, v


def picture(domain: str, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((0 if domain == "A" else 1_000_000) + index)
    image = background(g, SIZE)
    mask, u, v = blob(g, SIZE)
    shading = (1.1 - 0.35 * (u * 0.5 + v * 0.8).clamp(-1, 1)).clamp(0.6, 1.2)  # light from the top left
    if domain == "A":
        colour = torch.tensor([0.45, 0.30, 0.18]) + 0.25 * torch.rand(3, generator=g)  # browns and greys
        body = colour.view(3, 1, 1) * shading
    else:
        frequency = 3 + 3 * torch.rand((), generator=g)
        wobble = 0.35 * torch.sin(3 * v + 6.28 * torch.rand((), generator=g))
        stripes = (torch.sin(math.pi * frequency * (u + wobble)) > 0).float()
        body = (0.08 + 0.85 * stripes).expand(3, SIZE, SIZE) * shading
    image = image * (1 - mask) + body.clamp(0, 1) * mask
    return image.clamp(0, 1)


def main():
    root = Path(__file__).resolve().parent
    for split, count in COUNTS.items():
        folder = root / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        domain = split[-1]
        first = 0 if split.startswith("train") else 100_000  # test pictures never repeat train ones
        for i in range(count):
            x = picture(domain, first + i).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
            Image.fromarray(x.numpy()).save(folder / f"{i:04d}.jpg", quality=90)
    print(f"wrote {sum(COUNTS.values())} images to {root}")


if __name__ == "__main__":
    main()
