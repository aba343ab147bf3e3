"""A seeded benchmark image set in which raw pixels say little and shape says everything.

Ten classes of flat shapes (disc, ring, square, triangle, hexagon, plus, X, star, crescent, T), one
shape per image, drawn at a random position (part of it may be cut off), size and small rotation, in
one colour of a bright palette, over a dark two-colour gradient under a checker texture at a random
shift, with small distractor dots and a line segment, and mild pixel noise. Class is the shape only;
everything else is drawn independently of the class. A pure function of ``(seed, label, index)``:
:func:`render_shape`. ``hardbatch generate shapes DIR`` writes a set; ``bench/shapes_floor.py``
measures its floor (raw pixels), its ceiling (the encoder trained with labels) and a plain SimCLR loop.

Why so (what a contrastive benchmark needs, issue 15):

* *Raw pixels near chance.* Position, size, colour and the texture's shift vary per image, so two
  images of one class share few pixels: a logistic probe on raw pixels is right for about 0.14 of
  held-out images (chance 0.10); a cosine kNN for 0.29 with 10 000 training images (it gains with
  more images: 0.18 at 2 000). The encoders trained on it reach 0.44-0.49 kNN and a probe of
  0.70-0.75 in 10 epochs, supervised 0.89 (bench/RESULTS.md).
* *No per-image shortcut that survives the views.* A contrastive loss learns whatever tells two views
  of one image from all others. Every drawn attribute that outlives a random crop and colour jitter
  is discrete and shared by many images (8 object colours, 2 gradient orders); the continuous draws
  (position, size, the texture's shift, distractors, noise) change under crops or are too small to
  survive resizing. A richer background is such a shortcut: see ``_BACKGROUND``.
* *Hard negatives exist.* Some classes differ in details a small encoder must learn to see (a disc, a
  hexagon and a square; a plus and an X, at most 15 degrees from their upright pose so that they
  never coincide; a disc and a crescent), which is where batches of near neighbours can help.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("disc", "ring", "square", "triangle", "hexagon", "plus", "x", "star", "crescent", "tee")
MAX_ROTATION = np.pi / 12  # 15 degrees: a plus never turns into an X
SUPERSAMPLE = 3  # drawn at 3x and averaged down: smooth edges, no aliasing shortcut
RADIUS = (0.15, 0.3)  # the object's radius, as a fraction of the image side
INSIDE = 0.3  # the object's centre lies at least this many radii inside the frame (part may be cut off)
TEXTURE = 0.35  # the amplitude of the background's checker texture
PERIOD = 5.0  # the checker's period in pixels at 32 px

# bright object colours and dark background colours (RGB in [0, 1]): the object always stands out
_OBJECT = np.array([[0.95, 0.3, 0.25], [0.98, 0.75, 0.2], [0.95, 0.95, 0.4], [0.4, 0.9, 0.35],
                    [0.35, 0.9, 0.9], [0.45, 0.6, 1.0], [0.85, 0.45, 0.95], [0.95, 0.95, 0.95]], np.float32)
# the background: a horizontal gradient between two dark colours (either way round) under a checker
# texture at a random shift. Only that: with 6 colours, 4 gradient directions and 4 textures to draw
# from, a plain SimCLR loop told instances apart by their backgrounds and its kNN accuracy stayed at
# 0.15 after 6 epochs of 6000 images; with this one background it reached 0.33 (bench/RESULTS.md).
_BACKGROUND = np.array([[0.08, 0.1, 0.25], [0.25, 0.08, 0.1]], np.float32)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, turn: float = 0.0, radius: float = 1.0) -> np.ndarray:
    """Inside the regular ``sides``-gon inscribed in the circle of ``radius`` (one vertex at angle ``turn``)."""
    inside = np.ones(u.shape, bool)
    apothem = radius * np.cos(np.pi / sides)
    for k in range(sides):
        normal = turn + np.pi / sides + 2 * np.pi * k / sides  # the normal of edge k
        inside &= u * np.cos(normal) + v * np.sin(normal) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Inside a ``points``-pointed star (outer radius 1, inner ``inner``), one point straight up:
    the star is the union of the kites spanned by each point and its two neighbouring inner corners."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    step = 2 * np.pi / points
    # the angle to the nearest point (the first points up: v is negative upwards), in [0, step / 2]
    rel = step / 2 - np.abs((phi + np.pi / 2) % step - step / 2)
    # the edge from the point (1, angle 0) to the inner corner (inner, angle step / 2), in polar form
    tip = np.array([1.0, 0.0])
    corner = inner * np.array([np.cos(step / 2), np.sin(step / 2)])
    edge = corner - tip
    normal = np.array([-edge[1], edge[0]])
    normal /= np.linalg.norm(normal)
    offset = tip @ normal
    x, y = rho * np.cos(rel), rho * np.sin(rel)
    return (x * normal[0] + y * normal[1]) * np.sign(offset) <= abs(offset)


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``name`` at object coordinates ``(u, v)`` (the shape fits the unit disc;
    ``v`` points down, as image rows do)."""
    rho = np.hypot(u, v)
    if name == "disc":
        return rho <= 0.9
    if name == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if name == "square":
        return (np.abs(u) <= 0.72) & (np.abs(v) <= 0.72)
    if name == "triangle":
        return _polygon(u, v, 3, turn=-np.pi / 2)
    if name == "hexagon":
        return _polygon(u, v, 6, radius=0.95)
    if name in ("plus", "x"):
        if name == "x":
            c = s = np.float32(np.sqrt(0.5))
            u, v = c * u - s * v, s * u + c * v
        return ((np.abs(u) <= 0.25) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.25) & (np.abs(u) <= 0.95))
    if name == "star":
        return _star(u, v)
    if name == "crescent":
        return (rho <= 1.0) & (np.hypot(u - 0.5, v) > 0.78)
    if name == "tee":
        return (((np.abs(v + 0.65) <= 0.25) & (np.abs(u) <= 0.9))
                | ((np.abs(u) <= 0.24) & (v >= -0.65) & (v <= 0.9)))
    raise ValueError(f"shape {name!r} is not one of {', '.join(SHAPES)}")


def render_shape(seed: int, label: int, index: int, num_classes: int, height: int, width: int,
                 noise: float = 0.03) -> np.ndarray:
    """One image of class ``label`` (``SHAPES[label % 10]``); see the module docstring.

    A pure function of its arguments. ``num_classes`` (at most 10) is accepted for the generators'
    common signature; it does not change the image. O(height * width * SUPERSAMPLE**2).

    Shape:
        returns ``uint8 [height, width, 3]``.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes = {num_classes}: the shapes benchmark has 1 to {len(SHAPES)} classes")
    rng = np.random.default_rng([seed, label, index, 17])
    side = min(height, width)
    # the object: radius RADIUS of the side, its centre at least INSIDE radii inside the frame
    radius = rng.uniform(*RADIUS) * side
    cx = rng.uniform(INSIDE * radius, width - INSIDE * radius)
    cy = rng.uniform(INSIDE * radius, height - INSIDE * radius)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    colour = _OBJECT[rng.integers(len(_OBJECT))]
    low, high = rng.permutation(len(_BACKGROUND))[:2]

    ss = SUPERSAMPLE
    yy, xx = np.mgrid[0:height * ss, 0:width * ss].astype(np.float32)
    xx, yy = (xx + 0.5) / ss, (yy + 0.5) / ss  # pixel units
    # background: a horizontal gradient between two dark colours
    t = np.clip((xx / width - 0.5) * np.float32(1.2) + 0.5, 0.0, 1.0)[..., None]
    img = (1 - t) * _BACKGROUND[low] + t * _BACKGROUND[high]
    # its texture, at a random shift (what a crop moves anyway): it drowns raw pixels, not shapes
    period = PERIOD * side / 32
    px, py = 2 * np.pi * (xx + rng.uniform(0, period)) / period, 2 * np.pi * (yy + rng.uniform(0, period)) / period
    img = img + np.float32(TEXTURE) * (np.sin(px) * np.sin(py))[..., None].astype(np.float32)
    # distractors: three dots and a short line, in object colours, mostly small
    for _ in range(3):
        dx, dy, dr = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.6, 1.4) * side / 32
        img[np.hypot(xx - dx, yy - dy) <= dr] = _OBJECT[rng.integers(len(_OBJECT))]
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    theta, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.3) * side
    along = (xx - x0) * np.cos(theta) + (yy - y0) * np.sin(theta)
    across = -(xx - x0) * np.sin(theta) + (yy - y0) * np.cos(theta)
    img[(np.abs(across) <= 0.5 * side / 32) & (along >= 0) & (along <= length)] = _OBJECT[rng.integers(len(_OBJECT))]
    # the object, on top
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / radius
    v = (-(xx - cx) * s + (yy - cy) * c) / radius
    img[shape_mask(SHAPES[label % len(SHAPES)], u, v)] = colour

    img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
