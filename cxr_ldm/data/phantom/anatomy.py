"""Procedural PA chest radiograph: patient anatomy, findings, film processing (vectorised numpy).

Geometry lives in patient coordinates: x in about [-1, 1] from image left (patient's right) to image
right (patient's left), y in about [-1, 1] from top to bottom. For one hemithorax, `u = side_sign * x`
is the lateral coordinate (side_sign -1 = patient's right = image left, +1 = patient's left).
The picture is built as an attenuation map A (soft tissue + mediastinum + bone + metal - lung air), and
film intensity is 1 - exp(-exposure * A), then blurred, noised and quantised.

Findings act on the layers: opacities (effusion, consolidation, atelectasis, edema) replace lung air,
a pneumothorax adds air and removes lung markings, lesions and callus add density, devices add metal.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math

import numpy as np
from scipy import ndimage

from cxr_ldm.data.phantom.cases import Finding

RENDER_MIN = 128          # images below this resolution are rendered at 128 px and box-downsampled
SIDE_SIGN = {"right": -1.0, "left": 1.0}


@dataclasses.dataclass(frozen=True)
class Patient:
    """Per-patient anatomy and acquisition parameters (normalised units, see module docstring)."""
    scale: float            # body size on the film
    rotation: float         # radians, positive = clockwise on the image
    shift: tuple[float, float]
    apex_y: float           # top of the lung apices
    dome_y: float           # right hemidiaphragm dome (inspiration depth); the left one is lower
    left_dome_drop: float
    lung_half_width: float
    body_half_width: float
    heart_ctr: float        # cardiothoracic ratio of this patient's normal heart
    heart_tilt: float       # radians
    mediastinum_half_width: float
    soft_tissue: float      # soft-tissue attenuation at the body centre
    lung_air: float         # attenuation removed by aerated lung
    bone: float
    rib_phase: float        # vertical offset of the rib cage (inspiration)
    gastric_bubble: float   # radius, 0 = none
    exposure: float
    gamma: float
    noise: float            # additive noise std on [0, 1] intensity
    blur: float             # gaussian blur std, normalised units


def draw_patient(rng: np.random.Generator) -> Patient:
    """A random normal patient and acquisition."""
    u = rng.uniform
    return Patient(
        scale=u(0.9, 1.02), rotation=u(-0.04, 0.04), shift=(u(-0.03, 0.03), u(-0.02, 0.04)),
        apex_y=u(-0.78, -0.68), dome_y=u(0.3, 0.44), left_dome_drop=u(0.02, 0.07),
        lung_half_width=u(0.39, 0.44), body_half_width=u(0.9, 1.0), heart_ctr=u(0.39, 0.47),
        heart_tilt=u(0.55, 0.8), mediastinum_half_width=u(0.1, 0.13), soft_tissue=u(0.95, 1.15),
        lung_air=u(0.74, 0.84), bone=u(0.1, 0.14), rib_phase=u(-0.03, 0.03),
        gastric_bubble=u(0.05, 0.09) if rng.random() < 0.7 else 0.0, exposure=u(0.85, 1.05),
        gamma=u(0.85, 1.15), noise=u(0.006, 0.02), blur=u(0.006, 0.014))


# ----------------------------------------------------------------------------------------------------------
# Helpers


def ramp(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Soft inside mask: 1 where signed_distance < -width/2, 0 where > width/2, linear between."""
    out = signed_distance * np.float32(-1.0 / width)
    out += 0.5
    np.minimum(out, 1.0, out=out)
    return np.maximum(out, 0.0, out=out)


@functools.lru_cache(maxsize=512)
def _noise_basis(size: int, cells: int) -> np.ndarray:
    """(size, cells) gaussian interpolation weights, rows sum to 1: smooth upsampling of a cell grid."""
    centres = (np.arange(cells) + 0.5) / cells
    pixels = (np.arange(size) + 0.5) / size
    weights = np.exp(-0.5 * ((pixels[:, None] - centres[None, :]) * cells / 0.6) ** 2)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field of `shape`, about zero mean and unit std, `cells` features across each side."""
    field = (_noise_basis(shape[0], cells) @ rng.standard_normal((cells, cells)).astype(np.float32)
             @ _noise_basis(shape[1], cells).T)
    return field / (field.std() + 1e-6)


def segment_distance(x: np.ndarray, y: np.ndarray, start, end) -> np.ndarray:
    """Distance from points (x, y) to the segment start-end."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


@dataclasses.dataclass
class Layers:
    """Attenuation layers, each (N, N) float32, combined by `film`."""
    tissue: np.ndarray      # soft tissue + mediastinum + extra densities
    air: np.ndarray         # lung air (subtracted)
    markings: np.ndarray    # lung vessels (added, only where aerated)
    bone: np.ndarray
    metal: np.ndarray
    lungs: dict[float, np.ndarray]   # soft lung masks per side sign (not attenuation)


class Canvas:
    """Pixel grid in patient coordinates (rotation, scale and shift of the patient applied)."""

    def __init__(self, size: int, patient: Patient):
        self.size = size
        centres = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        image_x, image_y = np.meshgrid(centres, centres)
        cos, sin = math.cos(patient.rotation), math.sin(patient.rotation)
        dx = (image_x - patient.shift[0]) / patient.scale
        dy = (image_y - patient.shift[1]) / patient.scale
        self.x = cos * dx + sin * dy
        self.y = -sin * dx + cos * dy
        self.pixel = 2.0 / size / patient.scale   # one pixel in patient units
        self.patient = patient
        self.rows, self.cols = slice(0, size), slice(0, size)

    def crop(self, rows: slice, cols: slice) -> "Canvas":
        """The sub-canvas of pixels [rows, cols] (same patient, same pixel size)."""
        sub = copy.copy(self)
        sub.x, sub.y, sub.rows, sub.cols = self.x[rows, cols], self.y[rows, cols], rows, cols
        return sub

    def to_image_pixels(self, x: float, y: float) -> tuple[float, float]:
        """Patient coordinates -> (column, row) in pixels."""
        p = self.patient
        cos, sin = math.cos(p.rotation), math.sin(p.rotation)
        ix = (cos * x - sin * y) * p.scale + p.shift[0]
        iy = (sin * x + cos * y) * p.scale + p.shift[1]
        return (ix + 1.0) / 2.0 * self.size - 0.5, (iy + 1.0) / 2.0 * self.size - 0.5

    def window(self, points: np.ndarray, margin: float) -> tuple[slice, slice]:
        """Row/column slices of the pixels within `margin` (patient units) of the points' bounding box."""
        pixels = np.array([self.to_image_pixels(px, py) for px, py in points])
        pad = margin / self.pixel + 2
        lo = np.clip(np.floor(pixels.min(0) - pad).astype(int), 0, self.size)
        hi = np.clip(np.ceil(pixels.max(0) + pad).astype(int), 0, self.size)
        return slice(lo[1], hi[1]), slice(lo[0], hi[0])

    def stroke(self, layer: np.ndarray, points, radius: float, value: float) -> None:
        """Add a tube of `radius` along the polyline `points` [(x, y), ...] to `layer` (max-combined)."""
        points = np.asarray(points, np.float32)
        rows, cols = self.window(points, radius)
        x, y = self.x[rows, cols], self.y[rows, cols]
        if x.size == 0:
            return
        distance = np.min([segment_distance(x, y, a, b) for a, b in zip(points[:-1], points[1:])], axis=0)
        np.maximum(layer[rows, cols], value * ramp(distance - radius, self.pixel), out=layer[rows, cols])


def _box(x0: float, x1: float, y0: float, y1: float) -> list[tuple[float, float]]:
    """The four corners of an axis-aligned box in patient coordinates."""
    return [(x0, y0), (x0, y1), (x1, y0), (x1, y1)]


def smooth_curve(points, samples_per_segment: int = 6) -> np.ndarray:
    """Catmull-Rom spline through the control points -> (M, 2) polyline."""
    p = np.asarray(points, np.float32)
    p = np.concatenate([p[:1], p, p[-1:]])
    t = np.linspace(0, 1, samples_per_segment, endpoint=False, dtype=np.float32)[:, None]
    pieces = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        pieces.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                             + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    pieces.append(p[-2:-1])
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------------------------------------
# Normal anatomy


class Thorax:
    """Geometry of one patient's chest after structural findings (heart size, hemidiaphragm elevation)."""

    def __init__(self, patient: Patient, heart_ctr: float | None = None, dome_raise: dict | None = None):
        p = patient
        self.patient = p
        self.lung_centre_u = 0.36
        self.lung_radius_u = p.lung_half_width
        self.lateral_u = self.lung_centre_u + self.lung_radius_u      # inner rib margin
        self.lung_centre_y = p.dome_y + 0.05
        self.lung_radius_y = self.lung_centre_y - p.apex_y
        raise_ = dome_raise or {}
        self.dome = {-1.0: p.dome_y - raise_.get("right", 0.0),
                     1.0: p.dome_y + p.left_dome_drop - raise_.get("left", 0.0)}
        self.mediastinum_x = 0.01
        self.hilum = {-1.0: (-(p.mediastinum_half_width + 0.09), p.dome_y - 0.36),
                      1.0: (p.mediastinum_half_width + 0.09, p.dome_y - 0.40)}
        self.carina_y = p.dome_y - 0.5
        # Heart: rotated ellipse (long axis a = 1.45 b) whose width is ctr * thoracic width (2 * lateral_u);
        # an enlarged heart grows mostly to the patient's left and sits on the diaphragm.
        ctr = p.heart_ctr if heart_ctr is None else heart_ctr
        half_width = ctr * self.lateral_u
        cos, sin = math.cos(p.heart_tilt), math.sin(p.heart_tilt)
        self.heart_b = half_width / math.sqrt((1.45 * cos) ** 2 + sin ** 2)
        self.heart_a = 1.45 * self.heart_b
        normal_half_width = p.heart_ctr * self.lateral_u
        right_border = -0.24 - 0.3 * (half_width - normal_half_width)
        half_height = math.sqrt((self.heart_a * sin) ** 2 + (self.heart_b * cos) ** 2)
        self.heart_centre = (right_border + half_width, p.dome_y + 0.1 - 0.8 * half_height)

    def hemithorax_box(self, sign: float) -> list[tuple[float, float]]:
        """Corners (patient coordinates) of a box around one hemithorax."""
        bottom = self.dome_y(sign, self.lateral_u) + 0.02
        return [(0.0, self.patient.apex_y - 0.02), (sign * (self.lateral_u + 0.02), bottom)]

    def dome_y(self, sign: float, u: np.ndarray) -> np.ndarray:
        """Hemidiaphragm height under lateral coordinate u (domes peak at u = 0.4)."""
        return self.dome[sign] + 1.3 * (u - 0.42) ** 2

    def envelope_distance(self, u: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (approx.) to the hemithorax outline without diaphragm and mediastinum."""
        eu = (u - self.lung_centre_u) / self.lung_radius_u
        ey = (y - self.lung_centre_y) / self.lung_radius_y
        return (np.sqrt(eu * eu + ey * ey) - 1.0) * self.lung_radius_u

    def cavity(self, sign: float, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
        """Soft mask of one hemithorax above its hemidiaphragm (mediastinum not removed)."""
        u = sign * x
        return (ramp(self.envelope_distance(u, y), edge) * ramp(y - self.dome_y(sign, u), edge)
                * ramp(0.04 - u, edge))

    def inside_lung(self, sign: float, x: float, y: float) -> bool:
        """Whether the point (x, y) lies well inside the lung of side `sign`."""
        x, y = np.array([x], np.float32), np.array([y], np.float32)
        return bool(self.cavity(sign, x, y, 0.01)[0] * (1.0 - self.mediastinum(x, y, 0.01)[0]) > 0.99)

    def mediastinum(self, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
        """Soft mask of mediastinum, aortic knob and heart."""
        p = self.patient
        right_edge = self.mediastinum_x - p.mediastinum_half_width * (
            1 + 0.3 * np.clip((y - self.carina_y + 0.3) / 0.3, 0, 1))
        left_edge = self.mediastinum_x + p.mediastinum_half_width * (
            1 + 0.7 * np.clip((y - self.carina_y + 0.02) / 0.25, 0, 1))
        band = ramp(np.maximum(right_edge - x, x - left_edge), edge) * ramp(y - self.dome[1.0] - 0.2, 0.2)
        knob_x = self.mediastinum_x + p.mediastinum_half_width + 0.015
        knob = ramp(np.hypot(x - knob_x, y - (self.carina_y - 0.06)) - 0.07, edge)
        cx, cy = self.heart_centre
        cos, sin = math.cos(self.patient.heart_tilt), math.sin(self.patient.heart_tilt)
        along, across = (x - cx) * cos + (y - cy) * sin, -(x - cx) * sin + (y - cy) * cos
        heart = ramp((np.hypot(along / self.heart_a, across / self.heart_b) - 1.0) * self.heart_b, edge)
        return np.maximum(np.maximum(band, knob), heart)


def radial_lines(canvas: Canvas, centre, sign: float, rng: np.random.Generator, count: int,
                  width: float, reach: float, start: float = 0.0) -> np.ndarray:
    """Tortuous tapering lines radiating laterally from `centre` (vessels, air bronchograms): (N, N) in [0, 1].

    Lines are `count` per half-turn; each has a random start in [start, start + 0.25) and length <= reach.
    """
    dx, dy = sign * (canvas.x - centre[0]), canvas.y - centre[1]
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) + 0.3 * r * smooth_noise(rng, canvas.x.shape, 5)
    per_radian = count / np.pi
    phi = theta * per_radian
    cell = np.floor(phi + 0.5)
    index = cell.astype(np.int64) % (2 * count)
    jitter = rng.uniform(-0.25, 0.25, 2 * count).astype(np.float32)
    first = (rng.uniform(start, start + 0.25, 2 * count) if start else np.zeros(2 * count)).astype(np.float32)
    length = (reach * rng.uniform(0.45, 1.0, 2 * count)).astype(np.float32)
    strength = rng.uniform(0.4, 1.0, 2 * count).astype(np.float32)
    offset = (phi - cell - jitter[index]) / per_radian * r
    line_width = width * (1.0 - 0.6 * np.clip(r / reach, 0, 1)) + 0.25 * canvas.pixel
    along = np.clip(1.0 - r / length[index], 0, 1) * np.clip((r - first[index]) / 0.05, 0, 1)
    return strength[index] * np.exp(-(offset / line_width) ** 2) * np.sqrt(along)


def _ribs(canvas: Canvas, thorax: Thorax, fractures: list[Finding], rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs (curved bands from the spine, spacing growing downwards), faint anterior ribs.

    Rib j of a side lies at r = spacing * (j + 0.04 j^2) in the rib coordinate r (height above the rib
    curve); rib fractures on that side shift, break and thicken some ribs.
    """
    p, edge = thorax.patient, canvas.pixel
    ribs = np.zeros_like(canvas.x)
    spacing, growth, thickness = 0.105, 0.04, 0.055
    for sign in (-1.0, 1.0):
        sub = canvas.crop(*canvas.window(_box(0.0, sign * (thorax.lateral_u + 0.08), p.apex_y - 0.05, 1.2), 0.0))
        x, y, side_ribs = sub.x, sub.y, ribs[sub.rows, sub.cols]
        s = (sign * x - 0.07) / (thorax.lateral_u - 0.07)      # 0 at the spine, 1 at the lateral wall
        r = y - 0.55 * ((s - 0.25) ** 2 - 0.0625) - (p.apex_y - 0.02 + p.rib_phase)
        phase = (np.sqrt(np.maximum(1.0 + 4 * growth * r / spacing, 0.0)) - 1.0) / (2 * growth)
        index = np.floor(phase)
        local = (phase - index - 0.5) * spacing * (1 + 2 * growth * phase)
        gap = 1.0
        for fracture in fractures:
            if fracture.kind == "rib" and SIDE_SIGN[fracture.side] == sign:
                step, gap, callus = _rib_fracture(s, index, local, edge, fracture, rng)
                local = local - step
                side_ribs += callus
        band = ramp(np.abs(local) - thickness / 2, edge) * (0.75 + 0.25 * (2 * local / thickness) ** 2)
        extent = ramp(-s, 0.04) * ramp(s - 1.02, 0.05) * (index >= 0) * (index < 10)
        side_ribs += band * extent * gap
        r_front = y + 0.3 * s - (p.apex_y + 0.12 + p.rib_phase)
        local_front = (r_front / 0.14 - np.floor(r_front / 0.14) - 0.5) * 0.14
        front = ramp(np.abs(local_front) - 0.022, edge) * ramp(0.4 - s, 0.15) * ramp(s - 1.0, 0.05)
        side_ribs += 0.35 * front * (r_front > 0) * (r_front < 0.14 * 6)
    return ribs


def _rib_fracture(s, index, local, edge, fracture: Finding, rng: np.random.Generator):
    """Fracture of 2-3 adjacent lateral ribs (1 if uncertain): (step offset, cortical gap mask, callus)."""
    first = int(rng.integers(4, 7))
    count = 1 if fracture.certainty == -1 else int(rng.integers(2, 4))
    break_s = rng.uniform(0.7, 0.82)
    step = 0.015 if fracture.certainty == -1 else rng.uniform(0.035, 0.045)
    broken = (index >= first) & (index < first + count)
    offset = step * (broken & (s > break_s))
    gap = 1.0 - broken * ramp(np.abs(s - break_s) - 0.015, edge)
    callus = 5.0 * np.exp(-((s - break_s) / 0.09) ** 2 - ((local - step / 2) / 0.055) ** 2) * broken
    return offset, gap, callus


def _clavicles(canvas: Canvas, thorax: Thorax, fractures: list[Finding], rng: np.random.Generator) -> np.ndarray:
    """Clavicles rising from the sternal notch to the shoulders; a fracture breaks one and drops its lateral part."""
    top = thorax.patient.apex_y + 0.13
    bones = np.zeros_like(canvas.x)
    sub = canvas.crop(*canvas.window(_box(-0.75, 0.75, top - 0.25, top + 0.3), 0.0))
    x, y, edge = sub.x, sub.y, sub.pixel
    for sign in (-1.0, 1.0):
        u = sign * x
        centre = top - 0.22 * (u - 0.06) + 0.25 * (u - 0.3) ** 2
        gap = np.ones_like(x)
        for fracture in fractures:
            if fracture.kind == "clavicle" and SIDE_SIGN[fracture.side] == sign:
                break_u = rng.uniform(0.3, 0.4)
                drop = rng.uniform(0.08, 0.1) * (u > break_u) + 0.3 * np.clip(u - break_u, 0, None)
                centre = centre + drop
                gap = 1.0 - ramp(np.abs(u - break_u) - 0.03, edge)
        half = 0.034 + 0.012 * np.clip(0.25 - u, 0, 1)
        clavicle = ramp(np.abs(y - centre) - half, edge) * ramp(0.06 - u, 0.02) * ramp(u - 0.66, 0.03)
        bones[sub.rows, sub.cols] += clavicle * gap
    return bones


def _spine(canvas: Canvas, thorax: Thorax) -> np.ndarray:
    """Vertebral column with endplates and pedicles (mostly seen through the mediastinum)."""
    spine = np.zeros_like(canvas.x)
    sub = canvas.crop(*canvas.window([(thorax.mediastinum_x, -1.2), (thorax.mediastinum_x, 1.2)], 0.1))
    x, y, edge = sub.x - thorax.mediastinum_x, sub.y, sub.pixel
    level = (y / 0.1) % 1.0
    body = ramp(np.abs(x) - 0.07, edge) * (0.55 + 0.45 * np.abs(2 * level - 1) ** 3)
    pedicles = ramp(np.hypot((np.abs(x) - 0.05) / 0.6, (level - 0.35) * 0.1) - 0.012, edge)
    spine[sub.rows, sub.cols] = 0.6 * body + 0.4 * pedicles
    return spine


def _body(canvas: Canvas, patient: Patient) -> np.ndarray:
    """Soft-tissue attenuation of neck, shoulders and trunk."""
    x, y = canvas.x, canvas.y
    t = np.clip((y + 1.05) / 0.4, 0, 1)
    shoulder = t * t * (3 - 2 * t)
    waist = 0.1 * np.clip((y + 0.5) / 1.5, 0, 1)
    half_width = 0.24 + (patient.body_half_width + 0.05 - 0.24) * shoulder - waist
    thickness = np.sqrt(np.clip(1 - (x / half_width) ** 2, 0, 1))
    return patient.soft_tissue * (0.35 + 0.65 * thickness) * ramp(np.abs(x) - half_width, 2 * canvas.pixel)


def normal_layers(canvas: Canvas, thorax: Thorax, rng: np.random.Generator, fractures: list[Finding] = (),
                  fracture_rng: np.random.Generator | None = None) -> Layers:
    """Layers of the patient's chest; `fractures` (drawn with `fracture_rng`) belong to the skeleton."""
    p, x, y, edge = thorax.patient, canvas.x, canvas.y, canvas.pixel
    mediastinum = thorax.mediastinum(x, y, edge)
    tissue = _body(canvas, p) + 0.2 * mediastinum
    air, markings = np.zeros_like(x), np.zeros_like(x)
    lungs = {}
    for sign in (-1.0, 1.0):
        sub = canvas.crop(*canvas.window(thorax.hemithorax_box(sign), 0.03))
        u = sign * sub.x
        lung = thorax.cavity(sign, sub.x, sub.y, edge) * (1.0 - mediastinum[sub.rows, sub.cols])
        depth = 0.6 + 0.4 * np.clip(-thorax.envelope_distance(u, sub.y) / 0.18, 0, 1)
        depth *= 0.82 + 0.18 * np.clip((sub.y - p.apex_y) / 0.45, 0, 1)
        air[sub.rows, sub.cols] += p.lung_air * lung * depth
        hx, hy = thorax.hilum[sign]
        vessels = np.maximum(radial_lines(sub, (hx, hy), sign, rng, 16, 0.028, 0.8),
                             0.7 * radial_lines(sub, (hx, hy), sign, rng, 30, 0.016, 0.95, start=0.1))
        hilum_distance = np.hypot(sub.x - hx, sub.y - hy)
        markings[sub.rows, sub.cols] += lung * 0.38 * vessels * np.exp(-hilum_distance / 0.7)
        tissue[sub.rows, sub.cols] += 0.22 * ramp(np.hypot((sub.x - hx) / 0.7, sub.y - hy) - 0.06, 0.06)
        lungs[sign] = np.zeros_like(x)
        lungs[sign][sub.rows, sub.cols] = lung
    airways = np.zeros_like(x)
    canvas.stroke(airways, [(thorax.mediastinum_x, -1.2), (thorax.mediastinum_x, thorax.carina_y)], 0.028, 0.3)
    for sign in (-1.0, 1.0):
        hilum_x, hilum_y = thorax.hilum[sign]
        canvas.stroke(airways, [(thorax.mediastinum_x, thorax.carina_y), (0.8 * hilum_x, hilum_y + 0.02)], 0.02, 0.2)
    air += airways
    if p.gastric_bubble:
        centre_y = thorax.dome[1.0] + 0.05 + p.gastric_bubble
        sub = canvas.crop(*canvas.window([(0.38, centre_y)], 1.5 * p.gastric_bubble))
        flat_top = np.maximum(sub.y - centre_y, (centre_y - sub.y) * 2.2)
        air[sub.rows, sub.cols] += 0.45 * ramp(np.hypot((sub.x - 0.38) / 1.4, flat_top) - p.gastric_bubble, edge)
    bone = p.bone * (_ribs(canvas, thorax, fractures, fracture_rng) + _spine(canvas, thorax)
                     + 3.5 * _clavicles(canvas, thorax, fractures, fracture_rng))
    return Layers(tissue, air, markings, bone, np.zeros_like(x), lungs)


def film(layers: Layers, patient: Patient, canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Attenuation layers -> film intensity (N, N) float32 in [0, 1]: exposure, gamma, blur, noise."""
    attenuation = layers.tissue + layers.bone + layers.metal + layers.markings - layers.air
    intensity = 1.0 - np.exp(-patient.exposure * np.maximum(attenuation, 0.0))
    intensity = intensity ** patient.gamma
    intensity = ndimage.gaussian_filter(intensity, patient.blur * canvas.size / 2, truncate=2.5)
    intensity += 0.03 * smooth_noise(rng, canvas.x.shape, 3) - 0.04 * (canvas.y + 1.0) / 2
    intensity += patient.noise * rng.standard_normal(intensity.shape, dtype=np.float32)
    return np.clip(intensity, 0.0, 1.0)

