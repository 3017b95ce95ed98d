"""The toy world: procedural pictures of one colored shape on a background, with template captions.

Pure torch, batched, deterministic from a seed: scenes are drawn on the CPU with a seeded
generator, then rasterized on any device (supersampled, so edges are anti-aliased). Every caption
word is in `tokenizer_files.WORDS`, so each word is one token of the project's tokenizer.

The same renderer also draws outlines and patterned backgrounds: `sample_varied_scenes` uses them
to teach the autoencoder a general codec, and `samples/make_samples.py` uses them for the sample
style. `style_distance` measures how close pictures are to a reference set (e.g. that style).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from sdlora.errors import SdloraError

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross")

# Shape colors, 0-255 RGB. Far apart, so the nearest one names a drawn color without doubt.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (35, 80, 225),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
}

# Plain backgrounds; the caption names them "<name> background".
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "dark blue": (25, 35, 85),
    "light blue": (170, 205, 240),
}

POSITIONS = ("center", "left", "right", "top", "bottom")
# (x, y) of the shape's center as fractions of width and height.
POSITION_XY = {
    "center": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}
POSITION_WORDS = {
    "center": ("in the center", "in the middle"),
    "left": ("at the left", "on the left"),
    "right": ("at the right", "on the right"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
SIZES = ("small", "big")
RADIUS = {"small": (0.12, 0.17), "big": (0.24, 0.3)}  # fraction of the shorter side
MIN_CONTRAST = 90.0  # RGB distance a shape color keeps from its background
PATTERNS = ("plain", "checker", "stripes", "gradient")


@dataclass
class Scenes:
    """A batch of scenes: one shape each, every field a tensor with the batch as first dim."""

    shape: torch.Tensor  # (B,) index into SHAPES
    color: torch.Tensor  # (B,) index into COLORS, or -1 for a free color (shape_rgb holds it)
    background: torch.Tensor  # (B,) index into BACKGROUNDS, or -1 for a free color
    position: torch.Tensor  # (B,) index into POSITIONS
    size: torch.Tensor  # (B,) index into SIZES
    shape_rgb: torch.Tensor  # (B, 3) in [0, 1], jitter included
    background_rgb: torch.Tensor  # (B, 3) in [0, 1]
    center: torch.Tensor  # (B, 2) x, y as fractions of width, height
    radius: torch.Tensor  # (B,) fraction of the shorter side
    angle: torch.Tensor  # (B,) radians
    pattern: torch.Tensor  # (B,) index into PATTERNS
    pattern_rgb: torch.Tensor  # (B, 3) second background color of a pattern
    pattern_period: torch.Tensor  # (B,) pattern cell in output pixels at 64 px (scaled with size)
    outline: torch.Tensor  # (B,) outline width in output pixels at 64 px, 0 for none
    outline_rgb: torch.Tensor  # (B, 3)

    def __len__(self) -> int:
        return self.shape.shape[0]

    def select(self, index: torch.Tensor | slice) -> Scenes:
        """The scenes at `index`."""
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _rgb(table: dict[str, tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(list(table.values()), dtype=torch.float32) / 255.0


def sample_scenes(n: int, seed: int) -> Scenes:
    """Draw `n` toy-world scenes (plain background, no outline) from `seed`."""
    if n < 1:
        raise SdloraError(f"toy world: n must be at least 1 (got {n})")
    g = torch.Generator().manual_seed(seed)
    colors, backgrounds = _rgb(COLORS), _rgb(BACKGROUNDS)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    color = torch.randint(len(COLORS), (n,), generator=g)
    # Backgrounds far enough from the shape color: (colors, backgrounds) allowed matrix.
    allowed = torch.cdist(colors * 255, backgrounds * 255) > MIN_CONTRAST
    background = torch.multinomial(allowed[color].float(), 1, generator=g).squeeze(1)
    position = torch.randint(len(POSITIONS), (n,), generator=g)
    size = torch.randint(len(SIZES), (n,), generator=g)
    lo = torch.tensor([RADIUS[s][0] for s in SIZES])[size]
    hi = torch.tensor([RADIUS[s][1] for s in SIZES])[size]
    radius = lo + (hi - lo) * torch.rand(n, generator=g)
    xy = torch.tensor([POSITION_XY[p] for p in POSITIONS])[position]
    center = xy + (torch.rand(n, 2, generator=g) - 0.5) * 0.08
    center = torch.maximum(
        torch.minimum(center, 1 - radius[:, None] - 0.02), radius[:, None] + 0.02
    )
    jitter = (torch.rand(n, 2, 3, generator=g) - 0.5) * (24 / 255)
    return Scenes(
        shape=shape,
        color=color,
        background=background,
        position=position,
        size=size,
        shape_rgb=(colors[color] + jitter[:, 0]).clamp(0, 1),
        background_rgb=(backgrounds[background] + jitter[:, 1]).clamp(0, 1),
        center=center,
        radius=radius,
        angle=(torch.rand(n, generator=g) - 0.5) * math.radians(30),
        pattern=torch.zeros(n, dtype=torch.long),
        pattern_rgb=torch.zeros(n, 3),
        pattern_period=torch.full((n,), 8.0),
        outline=torch.zeros(n),
        outline_rgb=torch.zeros(n, 3),
    )


def sample_varied_scenes(n: int, seed: int) -> Scenes:
    """Toy scenes with free colors, patterned backgrounds and outlines: autoencoder training data."""
    base = sample_scenes(n, seed)
    g = torch.Generator().manual_seed(seed + 1_000_003)
    free_shape = torch.rand(n, generator=g) < 0.5
    free_background = torch.rand(n, generator=g) < 0.5
    has_outline = torch.rand(n, generator=g) < 0.5
    shape_rgb = torch.where(free_shape[:, None], torch.rand(n, 3, generator=g), base.shape_rgb)
    background_rgb = torch.where(
        free_background[:, None], torch.rand(n, 3, generator=g), base.background_rgb
    )
    return replace(
        base,
        color=torch.where(free_shape, -1, base.color),
        background=torch.where(free_background, -1, base.background),
        shape_rgb=shape_rgb,
        background_rgb=background_rgb,
        radius=base.radius * (0.7 + 0.6 * torch.rand(n, generator=g)),
        pattern=torch.randint(len(PATTERNS), (n,), generator=g),
        pattern_rgb=torch.rand(n, 3, generator=g),
        pattern_period=torch.randint(2, 17, (n,), generator=g).float(),
        outline=torch.where(has_outline, torch.randint(1, 4, (n,), generator=g), 0).float(),
        outline_rgb=torch.where(
            torch.rand(n, 1, generator=g) < 0.5, torch.zeros(n, 3), torch.rand(n, 3, generator=g)
        ),
    )


def _inside(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: is local point (u, v) (v up, unit = radius) inside the shape."""
    rho = torch.sqrt(u * u + v * v)
    inside = torch.zeros_like(u, dtype=torch.bool)
    s3 = math.sqrt(3.0)
    theta = torch.atan2(u, v) % (2 * math.pi / 5)  # angle from "up", folded to one star arm
    arm = (theta / (math.pi / 5) - 1).abs()  # 1 at a tip, 0 between tips
    x, y = u * 1.15, v * 1.15 + 0.12
    tests = {
        "circle": lambda: rho <= 1,
        "square": lambda: (u.abs() <= 0.82) & (v.abs() <= 0.82),
        "triangle": lambda: (v >= -0.5) & (s3 * u + v <= 1) & (-s3 * u + v <= 1),
        "star": lambda: rho <= 0.45 + 0.55 * arm**2,
        "heart": lambda: (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0,
        "ring": lambda: (rho <= 1) & (rho >= 0.58),
        "cross": lambda: (
            ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
        ),
    }
    for k, name in enumerate(SHAPES):
        pick = shape == k
        if bool(pick.any()):
            inside = torch.where(pick[:, None, None], tests[name](), inside)
    return inside


def render(
    scenes: Scenes,
    height: int = 64,
    width: int = 64,
    device: str | torch.device = "cpu",
    supersample: int = 4,
) -> torch.Tensor:
    """Rasterize scenes to (B, 3, height, width) float images in [0, 1]."""
    if height < 8 or width < 8:
        raise SdloraError(f"toy world: image size must be at least 8x8 (got {height}x{width})")
    s = scenes.select(slice(None))
    s = Scenes(**{f.name: getattr(s, f.name).to(device) for f in fields(s)})
    n, hs, ws = len(s), height * supersample, width * supersample
    side = min(height, width)
    px = 64.0 / side  # pattern/outline sizes are given at 64 px; scale with the picture
    ys = (torch.arange(hs, device=device) + 0.5) / hs  # fractions of the height
    xs = (torch.arange(ws, device=device) + 0.5) / ws
    X, Y = xs[None, None, :], ys[None, :, None]  # broadcast to (B, H, W)
    r = s.radius[:, None, None]
    dx = (X - s.center[:, 0, None, None]) * (width / side) / r
    dy = (s.center[:, 1, None, None] - Y) * (height / side) / r  # v up
    cos, sin = torch.cos(s.angle)[:, None, None], torch.sin(s.angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = _inside(s.shape, u, v).float()[:, None]  # (B, 1, H, W)

    # Background: plain, checker, diagonal stripes or a vertical gradient to pattern_rgb.
    bg, bg2 = s.background_rgb[:, :, None, None], s.pattern_rgb[:, :, None, None]
    image = bg.expand(n, 3, hs, ws)
    if bool((s.pattern != 0).any()):
        period = (s.pattern_period / px)[:, None, None]  # output pixels
        cx, cy = X * width / period, Y * height / period
        mix = torch.zeros(n, 1, hs, ws, device=device)
        for k, name in enumerate(PATTERNS[1:], start=1):
            pick = s.pattern == k
            if not bool(pick.any()):
                continue
            if name == "checker":
                m = (cx.floor() + cy.floor()) % 2
            elif name == "stripes":
                m = (cx + cy).floor() % 2
            else:  # gradient, top to bottom
                m = Y.expand(n, hs, ws)
            mix = torch.where(pick[:, None, None, None], m[:, None].expand(n, 1, hs, ws), mix)
        image = bg + (bg2 - bg) * mix

    # Outline: the shape dilated by its outline width (disk-like: square then plus steps).
    ring = torch.zeros_like(mask)
    widths = (s.outline / px * supersample).round().long()
    for w in widths.unique().tolist():
        if w <= 0:
            continue
        pick = widths == w
        grown = mask[pick]
        for step in range(w):
            if step % 2 == 0:
                grown = F.max_pool2d(grown, 3, stride=1, padding=1)
            else:  # plus-shaped step; zero padding, so nothing wraps around the edges
                p = F.pad(grown, (1, 1, 1, 1))
                grown = torch.stack(
                    [
                        grown,
                        p[..., :-2, 1:-1],
                        p[..., 2:, 1:-1],
                        p[..., 1:-1, :-2],
                        p[..., 1:-1, 2:],
                    ]
                ).amax(0)
        ring[pick] = grown - mask[pick]
    image = image + (s.outline_rgb[:, :, None, None] - image) * ring
    image = image + (s.shape_rgb[:, :, None, None] - image) * mask
    return F.avg_pool2d(image, supersample).clamp(0, 1)


def caption(scenes: Scenes, i: int, rng: random.Random | None = None) -> str:
    """A template caption for scene `i`: every attribute when `rng` is None, else some left out."""
    color = list(COLORS)[int(scenes.color[i])] if int(scenes.color[i]) >= 0 else None
    shape = SHAPES[int(scenes.shape[i])]
    size = SIZES[int(scenes.size[i])]
    wordings = POSITION_WORDS[POSITIONS[int(scenes.position[i])]]
    where: str | None = wordings[0] if rng is None else rng.choice(wordings)
    bg_index = int(scenes.background[i])
    bg = list(BACKGROUNDS)[bg_index] if bg_index >= 0 else None

    def keep(p: float) -> bool:
        return rng is None or rng.random() >= p

    thing = " ".join(w for w in (size if keep(0.3) else None, color, shape) if w)
    where = where if keep(0.3) else None
    ground = f"{bg} background" if bg and keep(0.3) else None
    if ground and rng is not None and rng.random() < 0.2:
        return " ".join(w for w in (ground, "with a", thing, where) if w)
    return " ".join(w for w in ("a", thing, where, f"on a {ground}" if ground else None) if w)


def toy_batch(
    n: int, seed: int, device: str | torch.device = "cpu", full_captions: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """`n` toy-world images (B, 3, 64, 64) in [0, 1] and their captions, deterministic from `seed`."""
    scenes = sample_scenes(n, seed)
    rng = None if full_captions else random.Random(seed)
    return render(scenes, device=device), [caption(scenes, i, rng) for i in range(n)]


def dominant_shape_color(images: torch.Tensor, threshold: float = 0.25) -> list[str | None]:
    """Name the color in COLORS nearest to each image's shape; None where no shape stands out.

    The background is the median of the 2-pixel border; the shape is every pixel farther than
    `threshold` (RGB distance, images in [0, 1]) from it, and its color is their median.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise SdloraError(
            f"dominant_shape_color: expected (B, 3, H, W) images, got {tuple(images.shape)}"
        )
    palette = _rgb(COLORS)
    names: list[str | None] = []
    for image in images.float().cpu():
        border = torch.cat(
            [
                image[:, :2].reshape(3, -1),
                image[:, -2:].reshape(3, -1),
                image[:, :, :2].reshape(3, -1),
                image[:, :, -2:].reshape(3, -1),
            ],
            dim=1,
        )
        bg = border.median(dim=1).values
        pixels = image.reshape(3, -1)
        far = (pixels - bg[:, None]).norm(dim=0) > threshold
        if int(far.sum()) < 4:
            names.append(None)
            continue
        rgb = pixels[:, far].median(dim=1).values
        names.append(list(COLORS)[int((palette - rgb).norm(dim=1).argmin())])
    return names


def color_histogram(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """(B, bins**3) joint RGB histograms of (B, 3, H, W) images in [0, 1], each summing to 1."""
    q = (images.float().clamp(0, 1) * bins).long().clamp(max=bins - 1)  # (B, 3, H, W)
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]  # (B, H, W)
    hist = torch.zeros(images.shape[0], bins**3, device=images.device)
    hist.scatter_add_(1, index.flatten(1), torch.ones_like(index.flatten(1), dtype=hist.dtype))
    return hist / hist.sum(dim=1, keepdim=True)


def style_distance(images: torch.Tensor, reference: torch.Tensor, bins: int = 8) -> float:
    """Total-variation distance (0 = same, 1 = disjoint) between the mean color histograms.

    A "closeness to a style" statistic: `reference` holds pictures of the style (e.g. the samples
    resized to the same size), `images` the pictures to judge. Lower is closer.
    """
    a = color_histogram(images, bins).mean(dim=0)
    b = color_histogram(reference.to(images.device), bins).mean(dim=0)
    return float(0.5 * (a - b).abs().sum())
