"""Drawing phantom findings into the attenuation layers of `anatomy` (patient coordinates).

Opacities replace lung air (`air *= 1 - opacity`) and hide the lung markings behind them, so that
they silhouette the heart border or hemidiaphragm they touch; a pneumothorax adds air and removes the
markings lateral to the visceral pleural line; lesions add soft tissue; devices add metal. Sizes are
chosen so that every finding, at its mildest grade, is still plain at 64 px.
"""
from __future__ import annotations

import math

import numpy as np

from cxr_ldm.data.phantom.anatomy import (
    SIDE_SIGN,
    Canvas,
    Layers,
    Patient,
    Thorax,
    radial_lines,
    ramp,
    segment_distance,
    smooth_curve,
    smooth_noise,
)
from cxr_ldm.data.phantom.cases import Finding

CARDIOTHORACIC_RATIO = {"mild": (0.53, 0.56), "moderate": (0.58, 0.62), "severe": (0.64, 0.69)}
UNCERTAIN_CARDIOTHORACIC_RATIO = (0.5, 0.52)
EFFUSION_HEIGHT = {"small": (0.18, 0.24), "moderate": (0.32, 0.42), "large": (0.6, 0.72)}
# Pleural fluid's own water thickness at full depth, beyond the lung air it replaces: without it an effusion
# under an opacified lower lobe (consolidation) left the film unchanged, though the report stated it.
FLUID_ATTENUATION = 0.3
COLLAPSED_LUNG_SCALE = {"small": (0.78, 0.82), "moderate": (0.64, 0.7), "large": (0.46, 0.52)}
EDEMA_OPACITY = {"mild": 0.55, "moderate": 0.72, "severe": 0.9}
LESION_RADIUS = {"small": (0.065, 0.085), "large": (0.12, 0.17)}


def sides(finding: Finding) -> tuple[float, ...]:
    """Side signs of a finding: bilateral -> both hemithoraces."""
    return (-1.0, 1.0) if finding.side == "bilateral" else (SIDE_SIGN[finding.side],)


def thorax_with_findings(patient: Patient, findings: tuple[Finding, ...], rngs: dict) -> Thorax:
    """The patient's thorax after structural findings: heart size (Cardiomegaly), volume loss (Atelectasis)."""
    heart_ctr, dome_raise = None, {}
    for finding in findings:
        if finding.name == "Cardiomegaly":
            low, high = (UNCERTAIN_CARDIOTHORACIC_RATIO if finding.certainty == -1
                         else CARDIOTHORACIC_RATIO[finding.severity])
            heart_ctr = rngs[finding.name].uniform(low, high)
        if finding.name == "Atelectasis" and finding.severity == "moderate":
            dome_raise = {side: 0.05 for side in ("left", "right") if finding.side in (side, "bilateral")}
    return Thorax(patient, heart_ctr, dome_raise)


def _opacify(layers: Layers, canvas: Canvas, opacity: np.ndarray, strength: float = 0.97) -> None:
    """Replace lung air by fluid/tissue where `opacity` (on canvas' window) is 1."""
    window = (canvas.rows, canvas.cols)
    layers.air[window] *= 1.0 - strength * opacity
    layers.markings[window] *= 1.0 - opacity


def _hemithorax(canvas: Canvas, thorax: Thorax, layers: Layers, sign: float) -> tuple[Canvas, np.ndarray]:
    """Sub-canvas around one hemithorax and the lung mask there."""
    sub = canvas.crop(*canvas.window(thorax.hemithorax_box(sign), 0.03))
    return sub, layers.lungs[sign][sub.rows, sub.cols]


def effusion(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding, rng: np.random.Generator) -> None:
    """Basal fluid with a meniscus rising along the lateral wall; blunts the costophrenic angle and, being
    denser than consolidated lung, still shows under a lower-lobe consolidation."""
    for sign in sides(finding):
        sub, lung = _hemithorax(canvas, thorax, layers, sign)
        height = rng.uniform(*EFFUSION_HEIGHT[finding.severity])
        lateral = np.clip((sign * sub.x - 0.1) / (thorax.lateral_u - 0.1), 0.0, 1.0)
        surface = thorax.dome_y(sign, thorax.lateral_u) - height - (0.06 + 0.25 * height) * lateral ** 2
        depth = np.clip((sub.y - surface) / 0.25, 0.0, 1.0)
        fluid = ramp(surface - sub.y, 0.05) * lung
        _opacify(layers, sub, fluid * (0.85 + 0.15 * depth))
        layers.tissue[sub.rows, sub.cols] += FLUID_ATTENUATION * fluid * depth


def pneumothorax(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding, rng: np.random.Generator) -> None:
    """Lung collapsed towards its hilum-base; pleural air without markings apically/laterally, pleural line."""
    sign = SIDE_SIGN[finding.side]
    sub, lung = _hemithorax(canvas, thorax, layers, sign)
    scale = rng.uniform(*COLLAPSED_LUNG_SCALE[finding.severity])
    anchor_x, anchor_y = sign * 0.2, thorax.dome[sign] - 0.05
    collapsed = thorax.cavity(sign, anchor_x + (sub.x - anchor_x) / scale, anchor_y + (sub.y - anchor_y) / scale,
                              2 * sub.pixel / scale)
    pleural_gas = lung * (1.0 - collapsed)
    window = (sub.rows, sub.cols)
    full = thorax.patient.lung_air * 1.1
    layers.air[window] = layers.air[window] * (1.0 - pleural_gas) * (1.0 - 0.15 * collapsed) + full * pleural_gas
    layers.markings[window] *= 1.0 - pleural_gas
    layers.tissue[window] += 0.3 * lung * 4.0 * collapsed * (1.0 - collapsed)


def consolidation(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding, rng: np.random.Generator) -> None:
    """Patchy-to-dense lobar airspace opacity with air bronchograms, bounded by a fissure where one exists."""
    density = 0.8 if finding.certainty == -1 else rng.uniform(0.92, 1.0)
    for sign in sides(finding):
        sub, lung = _hemithorax(canvas, thorax, layers, sign)
        u, y = sign * sub.x, sub.y
        hilum_y = thorax.hilum[sign][1]
        if finding.kind == "upper":
            lobe = ramp(y - hilum_y - 0.02, sub.pixel if sign < 0 else 0.1)
        elif finding.kind == "middle":   # right middle lobe / lingula: against the heart border
            lobe = ramp(hilum_y + 0.02 - y, sub.pixel if sign < 0 else 0.1) * ramp(u - 0.55, 0.12)
        else:
            lobe = ramp(hilum_y + 0.04 - y, 0.15)
        patchy = np.clip(1.1 + 0.3 * smooth_noise(rng, sub.x.shape, 7), 0.5, 1.0)
        opacity = density * lobe * patchy * lung
        bronchi = radial_lines(sub, thorax.hilum[sign], sign, rng, 10, 0.012, 0.6)
        _opacify(layers, sub, opacity)
        layers.air[sub.rows, sub.cols] += 0.15 * thorax.patient.lung_air * opacity * bronchi


def atelectasis(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding, rng: np.random.Generator) -> None:
    """Plate-like band(s) in the lower zone; moderate: thicker, two bands, raised hemidiaphragm."""
    thickness = (0.065, 0.08) if finding.severity == "mild" else (0.08, 0.1)
    for sign in sides(finding):
        sub, lung = _hemithorax(canvas, thorax, layers, sign)
        for _ in range(1 if finding.severity == "mild" else 2):
            for _ in range(30):
                u, half_length = rng.uniform(0.38, 0.6), rng.uniform(0.18, 0.25)
                low_y = float(thorax.dome_y(sign, u)) - 0.08
                y = rng.uniform(min(thorax.hilum[sign][1] + 0.16, low_y - 0.04), low_y)
                angle = rng.uniform(-0.25, 0.35)
                du, dy = half_length * math.cos(angle), half_length * math.sin(angle)
                ends = [(sign * (u - du), y - dy), (sign * (u + du), y + dy)]
                if all(thorax.inside_lung(sign, *end) for end in ends):
                    break
            (x0, y0), (x1, y1) = ends
            along = ((sub.x - x0) * (x1 - x0) + (sub.y - y0) * (y1 - y0)) / (4 * half_length ** 2)
            half_width = rng.uniform(*thickness) / 2 * np.sqrt(np.clip(1 - (2 * along - 1) ** 2, 0.05, 1))
            distance = segment_distance(sub.x, sub.y, *ends)
            _opacify(layers, sub, ramp(distance - half_width, 0.025) * lung, 0.9)


def edema(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding, rng: np.random.Generator) -> None:
    """Bilateral perihilar haze (bat wing), engorged indistinct vessels, Kerley B lines at the bases."""
    level = EDEMA_OPACITY[finding.severity]
    for sign in (-1.0, 1.0):
        sub, lung = _hemithorax(canvas, thorax, layers, sign)
        hx, hy = thorax.hilum[sign]
        haze = np.exp(-(np.hypot((sub.x - hx) / 1.2, sub.y - hy) / (0.4 + 0.2 * level)) ** 2)
        patchy = 0.8 + 0.2 * smooth_noise(rng, sub.x.shape, 6)
        window = (sub.rows, sub.cols)
        layers.markings[window] *= 1.0 + level
        _opacify(layers, sub, np.clip(level * (0.3 + 0.9 * haze) * patchy, 0, 1) * lung, 0.9)
        u = sign * sub.x
        base = thorax.dome_y(sign, thorax.lateral_u)
        lines = (sub.y / 0.05 + 0.3 * smooth_noise(rng, sub.x.shape, 9)) % 1.0 < 0.35
        septal = lines * ramp(thorax.lateral_u - 0.09 - u, 0.02)
        septal = septal * ramp(base - 0.35 - sub.y, 0.05)
        layers.tissue[window] += 0.3 * level * septal * lung


def lung_lesion(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding, rng: np.random.Generator) -> None:
    """Round, slightly lobulated nodule (small) or mass (large) inside the lung zone named by `kind`."""
    sign = SIDE_SIGN[finding.side]
    radius = rng.uniform(*LESION_RADIUS[finding.severity])
    apex_y, dome_y = thorax.patient.apex_y, thorax.dome[sign]
    top, bottom = {"upper": (0.15, 0.42), "mid": (0.42, 0.62), "lower": (0.62, 0.88)}[finding.kind]
    zone = (apex_y + top * (dome_y - apex_y), apex_y + bottom * (dome_y - apex_y))
    centre = (sign * 0.5, sum(zone) / 2)
    for _ in range(50):
        x, y = sign * rng.uniform(0.3, thorax.lateral_u - 0.08 - radius), rng.uniform(*zone)
        rim = [(x + dx, y + dy) for dx, dy in ((radius, 0), (-radius, 0), (0, radius), (0, -radius))]
        if all(thorax.inside_lung(sign, px, py) for px, py in [(x, y)] + rim):
            centre = (x, y)
            break
    sub = canvas.crop(*canvas.window([centre], 1.4 * radius))
    dx, dy = sub.x - centre[0], sub.y - centre[1]
    angle = np.arctan2(dy, dx)
    lobulation = 1.0 + 0.1 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.06 * np.sin(5 * angle + rng.uniform(0, 6.3))
    distance = np.hypot(dx, dy) / lobulation
    opacity = ramp(distance - radius, 0.015)
    _opacify(layers, sub, opacity, 0.95)
    layers.tissue[sub.rows, sub.cols] += 0.1 * opacity * np.sqrt(np.clip(1 - (distance / radius) ** 2, 0, 1))


def support_devices(canvas: Canvas, thorax: Thorax, layers: Layers, finding: Finding,
                    rng: np.random.Generator) -> None:
    """Metal/radiopaque devices: ET tube, NG tube, central line, pacemaker with leads, sternotomy wires."""
    metal, mx, carina = layers.metal, thorax.mediastinum_x, thorax.carina_y
    apex, sign = thorax.patient.apex_y, SIDE_SIGN.get(finding.side, 1.0)
    heart_x, heart_y = thorax.heart_centre
    svc = [(mx - 0.06, carina - 0.05), (mx - 0.07, carina + 0.1)]
    if "et_tube" in finding.devices:
        tip = carina - rng.uniform(0.08, 0.16)
        canvas.stroke(metal, [(mx, -1.2), (mx, tip)], 0.026, 0.6)
        canvas.stroke(metal, [(mx + 0.012, -1.2), (mx + 0.012, tip)], 0.012, 2.0)
    if "ng_tube" in finding.devices:
        stomach_y = thorax.dome[1.0] + 0.2
        path = [(mx - 0.01, -1.2), (mx, -0.3), (mx + 0.04, thorax.dome[1.0] + 0.1), (0.25, stomach_y), (0.4, stomach_y)]
        canvas.stroke(metal, smooth_curve(path), 0.012, 1.6)
    if "central_line" in finding.devices:
        if finding.kind == "jugular":
            path = [(sign * 0.3, -1.2), (sign * 0.2, -0.8), (sign * 0.1, carina - 0.25)] + svc
        else:
            path = [(sign * 0.95, apex + 0.05), (sign * 0.55, apex + 0.18), (sign * 0.2, apex + 0.26),
                    (mx - 0.04, carina - 0.22)] + svc
        canvas.stroke(metal, smooth_curve(path), 0.012, 1.8)
    if "pacemaker" in finding.devices:
        gx, gy = sign * rng.uniform(0.5, 0.6), apex + rng.uniform(0.18, 0.26)
        sub = canvas.crop(*canvas.window([(gx, gy)], 0.12))
        box = np.maximum(np.abs(sub.x - gx) / 0.085, np.abs(sub.y - gy) / 0.06)
        rounded = (np.abs(sub.x - gx) / 0.085) ** 4 + (np.abs(sub.y - gy) / 0.06) ** 4
        generator = 2.2 * ramp(rounded ** 0.25 - 1.0, 0.1) * (box < 1.2)
        metal[sub.rows, sub.cols] = np.maximum(metal[sub.rows, sub.cols], generator)
        lead = [(gx - sign * 0.06, gy), (sign * 0.3, gy + 0.04), (sign * 0.12, gy + 0.1), (mx - 0.04, carina - 0.1)]
        lead += svc
        atrium = (heart_x - 0.55 * thorax.heart_a, heart_y - 0.12)
        apex_point = (heart_x + 0.55 * thorax.heart_a * math.cos(thorax.patient.heart_tilt),
                      heart_y + 0.55 * thorax.heart_a * math.sin(thorax.patient.heart_tilt))
        canvas.stroke(metal, smooth_curve(lead + [atrium, (atrium[0] + 0.06, atrium[1] - 0.06)]), 0.008, 1.5)
        canvas.stroke(metal, smooth_curve(lead + [(heart_x - 0.05, heart_y + 0.05), apex_point]), 0.008, 1.5)
    if "sternotomy" in finding.devices:
        for wire_y in np.linspace(carina - 0.3, heart_y + 0.1, 5):
            sub = canvas.crop(*canvas.window([(mx, wire_y)], 0.05))
            ring = np.abs(np.hypot((sub.x - mx) / 1.4, (sub.y - wire_y) / 0.8) - 0.025)
            metal[sub.rows, sub.cols] = np.maximum(metal[sub.rows, sub.cols], 1.6 * ramp(ring - 0.006, sub.pixel))


DRAW = {"Pleural Effusion": effusion, "Pneumothorax": pneumothorax, "Consolidation": consolidation,
        "Atelectasis": atelectasis, "Edema": edema, "Lung Lesion": lung_lesion, "Support Devices": support_devices}
# Cardiomegaly and Fracture change the anatomy itself (thorax_with_findings, anatomy._ribs/_clavicles).
# Lesions after the pleural processes, so that pleural air does not erase them; devices on top.
DRAW_ORDER = ("Edema", "Consolidation", "Atelectasis", "Pleural Effusion", "Pneumothorax", "Lung Lesion",
              "Support Devices")


def draw_findings(canvas: Canvas, thorax: Thorax, layers: Layers, findings: tuple[Finding, ...], rngs: dict) -> None:
    """Apply the findings to the layers in place, in DRAW_ORDER."""
    by_name = {finding.name: finding for finding in findings}
    for name in DRAW_ORDER:
        if name in by_name:
            DRAW[name](canvas, thorax, layers, by_name[name], rngs[name])
