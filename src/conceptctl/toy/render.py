"""Procedural pictures of the toy world: an object, painted in a colour, in a style.

Shapes are drawn at twice the size and downsampled (anti-aliasing), then the style treats the
whole picture. Each style is built to survive a 4x-downsampling autoencoder and to be told apart
by a small classifier: plain painting = flat colours; Van Gogh = swirling blue/yellow strokes
and striped brushwork; Monet = soft, light, pastel dabs; Picasso = faceted cells with thick black
edges. The object's hue is kept in every style, so colour stays a separate axis.

Everything is a pure function of (concept, seed): the same inputs give the same pixels.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from conceptctl.toy.world import Concept

SIZE = 64
_SS = 2  # supersampling factor for drawing
HUES = {"red": 0.0, "yellow": 0.14, "green": 0.33, "blue": 0.61, "purple": 0.79}
GROUND_Y = 48  # where the ground or water starts, in output pixels
SKY_OBJECTS = ("airplane", "parachute")


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def _object_colour(color: str, rng: np.random.Generator) -> tuple[float, float, float]:
    return (HUES[color] + rng.uniform(-0.02, 0.02), rng.uniform(0.75, 0.95),
            rng.uniform(0.72, 0.95))


def _background(concept: Concept, rng: np.random.Generator) -> Image.Image:
    """Sky gradient, plus ground (house, church, tree) or water (boat)."""
    big = SIZE * _SS
    y = np.linspace(0, 1, big)[:, None, None]
    top = np.array(_rgb(0.58 + rng.uniform(-0.03, 0.03), rng.uniform(0.15, 0.3), 0.97))
    bottom = np.array(_rgb(0.58, rng.uniform(0.03, 0.1), 1.0))
    sky = top * (1 - y) + bottom * y
    img = np.broadcast_to(sky, (big, big, 3)).copy()
    horizon = int((GROUND_Y + rng.integers(-2, 3)) * _SS)
    if concept.object == "boat":
        water = np.array(_rgb(0.57, rng.uniform(0.25, 0.4), rng.uniform(0.55, 0.7)), float)
        waves = 0.06 * np.sin(np.arange(big)[None, :] * 0.35 + np.arange(big)[:, None] * 1.7)
        img[horizon:] = water * (1 + waves[horizon:, :, None])
    elif concept.object not in SKY_OBJECTS:
        ground = np.array(_rgb(0.22 + rng.uniform(-0.04, 0.04), rng.uniform(0.2, 0.35),
                               rng.uniform(0.45, 0.6)), float)
        img[horizon:] = ground
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 3)):  # a few clouds
        cx, cy = rng.uniform(0, big), rng.uniform(4, big * 0.35)
        w, h = rng.uniform(14, 30), rng.uniform(5, 9)
        draw.ellipse((cx - w, cy - h, cx + w, cy + h), fill=(250, 250, 252))
    return pil


def _draw_object(draw: ImageDraw.ImageDraw, concept: Concept, hsv, rng, mask_draw) -> None:
    """Draw the object in ``hsv`` onto ``draw`` and its silhouette onto ``mask_draw``."""
    h, s, v = hsv
    main, dark, light = _rgb(h, s, v), _rgb(h, s, v * 0.55), _rgb(h, s * 0.5, min(1, v * 1.15))
    k = _SS * rng.uniform(0.85, 1.1)
    cx = (SIZE / 2 + rng.uniform(-6, 6)) * _SS
    ground = GROUND_Y * _SS

    def poly(points, fill, mask=True):
        draw.polygon(points, fill=fill)
        if mask:
            mask_draw.polygon(points, fill=255)

    def rect(x0, y0, x1, y1, fill, mask=True):
        poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill, mask)

    kind = concept.object
    if kind in ("house", "church"):
        w, hgt = (26 if kind == "house" else 22) * k, (18 if kind == "house" else 16) * k
        x0, x1, top = cx - w / 2, cx + w / 2, ground - hgt
        rect(x0, top, x1, ground, main)
        poly([(x0 - 3 * k, top), (x1 + 3 * k, top), (cx, top - 12 * k)], dark)
        rect(cx - 3 * k, ground - 9 * k, cx + 3 * k, ground, (60, 40, 30))
        if kind == "house":
            rect(x0 + 3 * k, top + 4 * k, x0 + 8 * k, top + 9 * k, (235, 235, 200), mask=False)
        else:
            side = 1 if rng.random() < 0.5 else -1
            tx = cx + side * (w / 2 - 2 * k)
            tower_top = ground - 34 * k
            rect(tx - 4 * k, tower_top, tx + 4 * k, ground, main)
            poly([(tx - 5 * k, tower_top), (tx + 5 * k, tower_top), (tx, tower_top - 10 * k)],
                 dark)
            cross = (245, 245, 245)
            ctop = tower_top - 10 * k
            rect(tx - 0.8 * k, ctop - 8 * k, tx + 0.8 * k, ctop, cross)
            rect(tx - 3 * k, ctop - 6 * k, tx + 3 * k, ctop - 4.5 * k, cross)
    elif kind == "tree":
        rect(cx - 2.5 * k, ground - 16 * k, cx + 2.5 * k, ground, (95, 60, 35))
        for dx, dy, r in ((0, -26, 11), (-8, -20, 8), (8, -20, 8), (0, -33, 8)):
            x, y, rr = cx + dx * k, ground + dy * k, r * k
            shade = main if dy != -20 else _rgb(h, s, v * 0.85)
            draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=shade)
            mask_draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
    elif kind == "boat":
        water = ground + 2 * _SS
        w = 32 * k
        poly([(cx - w / 2, water - 7 * k), (cx + w / 2, water - 7 * k),
              (cx + w / 2 - 6 * k, water + 2 * k), (cx - w / 2 + 6 * k, water + 2 * k)], main)
        rect(cx - 0.8 * k, water - 30 * k, cx + 0.8 * k, water - 7 * k, (70, 50, 40))
        poly([(cx + 1.5 * k, water - 29 * k), (cx + 1.5 * k, water - 9 * k),
              (cx + 14 * k, water - 9 * k)], (245, 240, 220))
    elif kind == "airplane":
        cy = (22 + rng.uniform(-5, 5)) * _SS
        d = 1 if rng.random() < 0.5 else -1  # which way it flies
        draw.ellipse((cx - 17 * k, cy - 4 * k, cx + 17 * k, cy + 4 * k), fill=main)
        mask_draw.ellipse((cx - 17 * k, cy - 4 * k, cx + 17 * k, cy + 4 * k), fill=255)
        poly([(cx - 2 * d * k, cy), (cx + 6 * d * k, cy), (cx - 6 * d * k, cy + 14 * k),
              (cx - 11 * d * k, cy + 14 * k)], dark)
        poly([(cx - 2 * d * k, cy), (cx + 6 * d * k, cy), (cx - 4 * d * k, cy - 11 * k),
              (cx - 8 * d * k, cy - 11 * k)], dark)
        poly([(cx - 13 * d * k, cy - 2 * k), (cx - 17 * d * k, cy - 2 * k),
              (cx - 19 * d * k, cy - 11 * k), (cx - 16 * d * k, cy - 11 * k)], main)
        for i in range(4):
            wx = cx + d * (6 + 2.6 * i) * k
            draw.ellipse((wx - k, cy - 1.6 * k, wx + k, cy), fill=light)
    elif kind == "parachute":
        cy = (20 + rng.uniform(-4, 4)) * _SS
        w, hh = 30 * k, 15 * k
        box = (cx - w / 2, cy - hh, cx + w / 2, cy + hh)
        draw.pieslice(box, 180, 360, fill=main)
        mask_draw.pieslice(box, 180, 360, fill=255)
        for i in range(1, 5, 2):  # darker gores
            draw.pieslice(box, 180 + i * 36, 180 + (i + 1) * 36, fill=dark)
        body_y = cy + 17 * k
        for x in (cx - w / 2, cx - w / 6, cx + w / 6, cx + w / 2):
            draw.line([(x, cy), (cx, body_y - 3 * k)], fill=(60, 60, 60), width=max(1, _SS // 2))
        draw.ellipse((cx - 2 * k, body_y - 4 * k, cx + 2 * k, body_y), fill=(50, 40, 40))
        draw.rectangle((cx - 1.5 * k, body_y, cx + 1.5 * k, body_y + 6 * k), fill=(50, 40, 40))


def _van_gogh(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    cx, cy = rng.uniform(10, 54), rng.uniform(6, 30)
    r, theta = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    swirl = np.sin(0.9 * r + 3 * theta + rng.uniform(0, 2 * math.pi))
    navy, gold = np.array([35, 60, 135.0]), np.array([225, 200, 95.0])
    t = np.clip(swirl * 0.8 + 0.5, 0, 1)[..., None]
    background = navy * (1 - t) + gold * t
    # Keep some of the scene (ground, water) under the strokes.
    out = 0.35 * img + 0.65 * background
    angle = rng.uniform(0, math.pi)
    strokes = np.sin(1.6 * (xx * math.cos(angle) + yy * math.sin(angle)) + 2 * np.sin(0.4 * yy))
    obj = img * (0.78 + 0.22 * strokes[..., None])
    out = np.where(mask[..., None], obj, out)
    edge = _edges(mask)
    out[edge] = out[edge] * 0.35 + np.array([20, 30, 80.0]) * 0.65
    return out


def _monet(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.1))
    out = np.asarray(pil, float)
    out = out * 0.75 + 255 * 0.25  # light, airy
    pastels = np.array([[245, 190, 210], [200, 230, 190], [190, 215, 245], [235, 220, 250],
                        [250, 240, 190]], float)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for _ in range(90):
        x, y, rad = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(1.2, 2.6)
        colour = pastels[rng.integers(len(pastels))]
        d = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * rad**2))[..., None]
        alpha = d * np.where(mask[..., None], 0.25, 0.6)
        out = out * (1 - alpha) + colour * alpha
    return out


def _picasso(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(5, 9))
    sites = rng.uniform(0, SIZE, size=(n, 2))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dist = (xx[..., None] - sites[:, 0]) ** 2 + (yy[..., None] - sites[:, 1]) ** 2
    cell = dist.argmin(-1)
    palette = np.array([[200, 160, 100], [150, 140, 130], [110, 90, 70], [220, 200, 160],
                        [90, 100, 110]], float)
    out = np.empty_like(img)
    for i in range(n):
        sel = cell == i
        dx, dy = rng.integers(-3, 4, size=2)
        shifted = np.roll(np.roll(img, dy, axis=0), dx, axis=1)
        shifted_mask = np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
        flat = palette[rng.integers(len(palette))]
        gain = rng.uniform(0.75, 1.15)
        facet = np.where(shifted_mask[..., None], shifted * gain, flat * 0.7 + shifted * 0.3)
        out[sel] = facet[sel]
    boundaries = (np.diff(cell, axis=0, prepend=cell[:1]) != 0) | (
        np.diff(cell, axis=1, prepend=cell[:, :1]) != 0)
    out[boundaries | _edges(mask)] = (20, 20, 20)
    return out


def _edges(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis=axis)
    return mask & ~inner


def _plain(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    canvas = rng.normal(0, 3.0, size=(SIZE, SIZE, 1))  # faint canvas grain
    return img + canvas


STYLERS = {"painting": _plain, "van-gogh": _van_gogh, "monet": _monet, "picasso": _picasso}


def render(concept: Concept, seed: int) -> Image.Image:
    """The picture of ``concept`` for ``seed``: a 64x64 RGB image, identical for equal inputs."""
    rng = np.random.default_rng([seed, *(hash_text(x) for x in
                                         (concept.object, concept.style, concept.color))])
    canvas = _background(concept, rng)
    mask_big = Image.new("L", canvas.size, 0)
    _draw_object(ImageDraw.Draw(canvas), concept, _object_colour(concept.color, rng), rng,
                 ImageDraw.Draw(mask_big))
    img = np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS), float)
    mask = np.asarray(mask_big.resize((SIZE, SIZE), Image.Resampling.BILINEAR)) > 127
    styled = STYLERS[concept.style](img, mask, rng)
    return Image.fromarray(np.clip(styled, 0, 255).astype(np.uint8))


def hash_text(text: str) -> int:
    """A stable (unlike ``hash()``) small integer for a string, to seed per-concept streams."""
    value = 0
    for ch in text.encode():
        value = (value * 131 + ch) % 2_147_483_647
    return value


def render_array(concepts: list[Concept], seeds: list[int]) -> np.ndarray:
    """Render many pictures into one uint8 array of shape (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(c, s)) for c, s in zip(concepts, seeds, strict=True)])
