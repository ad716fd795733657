"""The look of the built-in classes: shape, colour and texture, and a rasteriser for them.

The built-in long-tailed dataset (``trainer/datasets/builtin.py``) draws its real objects with
these looks, and the built-in procedural generator (the embedded stand-in for Stable Diffusion)
draws generated objects with the same looks, so a well-generated object resembles the real class
and a failed one does not. Pure numpy: no model, no torch.

A look is plain data (stored in each category of the built-in set's JSON under ``"look"``)::

    {"shape": "star", "color": [220, 40, 40], "texture": "stripes", "accent": [120, 10, 10]}
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
    "diamond",
    "crescent",
    "ellipse",
    "pentagon",
    "arrow",
)
TEXTURES = ("solid", "stripes", "dots", "checker")


@dataclass(frozen=True)
class ObjectLook:
    """How objects of one class look.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: base colour, RGB uint8 values in [0, 255].
        texture: one of :data:`TEXTURES`, painted in ``accent`` over ``color``.
        accent: second colour of the texture, RGB in [0, 255].
    """

    shape: str
    color: tuple[int, int, int]
    texture: str
    accent: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"look.shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"look.texture {self.texture!r} is not one of {', '.join(TEXTURES)}")

    @classmethod
    def from_dict(cls, data: dict) -> "ObjectLook":
        return cls(
            shape=str(data["shape"]),
            color=tuple(int(c) for c in data["color"]),
            texture=str(data["texture"]),
            accent=tuple(int(c) for c in data["accent"]),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["color"] = list(self.color)
        d["accent"] = list(self.accent)
        return d

    def describe(self) -> str:
        """A short English definition, used as the class definition in prompts."""
        texture = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checker": "checked"}
        return f"a {texture[self.texture]} {color_name(self.color)} {self.shape}-shaped object"


def color_name(rgb: tuple[int, int, int]) -> str:
    """Coarse English name of an RGB colour (by hue; for names and prompts only)."""
    h, l, s = colorsys.rgb_to_hls(*(c / 255.0 for c in rgb))
    if s < 0.2:
        return "grey" if 0.25 < l < 0.75 else ("black" if l <= 0.25 else "white")
    names = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue",
             "violet", "purple", "magenta", "red"]
    return names[int(round(h * 12))]


def make_looks(num_classes: int) -> list[ObjectLook]:
    """``num_classes`` distinct looks: shapes cycle, hues spread, textures vary.

    Deterministic. Classes that share a shape differ in hue and texture, so every class is
    learnable from its appearance.
    """
    looks = []
    for k in range(num_classes):
        shape = SHAPES[k % len(SHAPES)]
        # Golden-ratio hue spacing keeps consecutive classes far apart on the colour wheel.
        hue = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hls_to_rgb(hue, 0.5, 0.75)
        ar, ag, ab = colorsys.hls_to_rgb(hue, 0.25, 0.6)
        texture = TEXTURES[(k // len(SHAPES) + k) % len(TEXTURES)]
        looks.append(
            ObjectLook(
                shape=shape,
                color=(int(r * 255), int(g * 255), int(b * 255)),
                texture=texture,
                accent=(int(ar * 255), int(ag * 255), int(ab * 255)),
            )
        )
    return looks


def _polygon(n: int, radius: float = 0.9, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, outer: float = 0.95, inner: float = 0.4) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_ARROW = np.array(
    [[-0.9, -0.25], [0.2, -0.25], [0.2, -0.65], [0.95, 0.0], [0.2, 0.65], [0.2, 0.25],
     [-0.9, 0.25]]
)

_POLYGONS = {
    "triangle": _polygon(3, 0.95, -math.pi / 2),
    "hexagon": _polygon(6, 0.9, 0.0),
    "pentagon": _polygon(5, 0.9),
    "star": _star(),
    "arrow": _ARROW,
}


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule: is each point (x, y) inside the closed polygon ``poly`` (V x 2)?"""
    inside = np.zeros(x.shape, dtype=bool)
    xs, ys = poly[:, 0], poly[:, 1]
    for i in range(len(poly)):
        x1, y1, x2, y2 = xs[i - 1], ys[i - 1], xs[i], ys[i]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Is each point of the unit frame (x, y in [-1, 1]) inside ``shape``? Bool, like ``x``."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 0.9**2
    if shape == "ring":
        return (r2 <= 0.92**2) & (r2 >= 0.5**2)
    if shape == "square":
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 0.95
    if shape == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.92)) | (
            (np.abs(y) <= 0.3) & (np.abs(x) <= 0.92)
        )
    if shape == "ellipse":
        return (x / 0.95) ** 2 + (y / 0.55) ** 2 <= 1.0
    if shape == "crescent":
        return (r2 <= 0.9**2) & ((x - 0.4) ** 2 + (y + 0.1) ** 2 >= 0.7**2)
    if shape in _POLYGONS:
        return _inside_polygon(x, y, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def texture_mask(texture: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Where the accent colour goes, in object coordinates; ``period`` in unit-frame lengths."""
    if texture == "solid":
        return np.zeros(x.shape, dtype=bool)
    if texture == "stripes":
        return np.floor((x + y) / period) % 2 == 0
    if texture == "checker":
        return (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    if texture == "dots":
        cx = (np.mod(x, period) - period / 2) / period
        cy = (np.mod(y, period) - period / 2) / period
        return cx * cx + cy * cy <= 0.09
    raise ValueError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}")


def render_object(
    look: ObjectLook,
    height: int,
    width: int,
    rng: np.random.Generator,
    rotation: float | None = None,
    shade_jitter: float = 0.12,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object of ``look`` filling a ``height`` x ``width`` box.

    Args:
        look: the class appearance.
        height, width: size of the box in pixels (the shape is stretched to fill it).
        rng: source of the per-instance variation (rotation, shade, texture phase).
        rotation: angle in radians; random in [0, 2π) when None.
        shade_jitter: relative brightness variation between instances.

    Returns:
        ``rgb``: H x W x 3 uint8 in [0, 255] (meaningful where ``mask`` is set);
        ``mask``: H x W bool, the object's pixels.
    """
    if height < 2 or width < 2:
        raise ValueError(f"object box must be at least 2x2 px, got {height}x{width}")
    theta = rng.uniform(0, 2 * math.pi) if rotation is None else rotation
    # Pixel centres mapped to [-1, 1], then rotated into the object's own frame.
    ys = (np.arange(height) + 0.5) / height * 2 - 1
    xs = (np.arange(width) + 0.5) / width * 2 - 1
    gx, gy = np.meshgrid(xs, ys)
    c, s = math.cos(theta), math.sin(theta)
    ox, oy = c * gx + s * gy, -s * gx + c * gy
    mask = shape_mask(look.shape, ox, oy)
    period = rng.uniform(0.28, 0.4)
    phase = rng.uniform(0, period, size=2)
    accent = texture_mask(look.texture, ox + phase[0], oy + phase[1], period)
    shade = 1.0 + rng.uniform(-shade_jitter, shade_jitter)
    base = np.clip(np.array(look.color, dtype=np.float32) * shade, 0, 255)
    second = np.clip(np.array(look.accent, dtype=np.float32) * shade, 0, 255)
    rgb = np.where(accent[..., None], second, base)
    # A soft vertical light gradient so objects are not perfectly flat.
    light = 1.0 + 0.08 * gy[..., None]
    rgb = np.clip(rgb * light, 0, 255).astype(np.uint8)
    return rgb, mask


# The built-in set's class catalogue (trainer/datasets/builtin.py writes the same into its JSON):
# class id k + 1 has look ``make_looks(K)[k]``, this name, and frequency group ``"fcr"[k % 3]``.
BUILTIN_GROUPS = ("f", "c", "r")


def builtin_class_name(index: int, look: ObjectLook) -> str:
    """Name of the built-in class with 0-based ``index`` and ``look``, e.g. ``"red_star_03"``."""
    return f"{color_name(look.color)}_{look.shape}_{index:02d}"
