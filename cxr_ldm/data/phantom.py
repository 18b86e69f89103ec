"""Procedural PA chest radiographs with radiology reports and CheXpert labels (the phantom data set).

`generate(seed, resolution, findings)` returns one study: image, report, prompt (the impression),
labels, side and severity of every finding. Everything is a deterministic function of the seed; the
patient, the pixel noise and each finding's details use independent random streams, so forcing a
finding on a seed changes only that finding's pixels.

CLI:
  python -m cxr_ldm.data.phantom --grid out.png [--resolution 128]   labelled contact sheet
  python -m cxr_ldm.data.phantom --reports 5 [--seed 0]              print reports
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np
from PIL import Image

from cxr_ldm.data import phantom_anatomy as anatomy
from cxr_ldm.data import phantom_findings
from cxr_ldm.data.phantom_reports import FINDING_NAMES, Finding, draw_findings, parse_findings, random_stream


def render_image(seed: int, findings: tuple[Finding, ...], resolution: int) -> np.ndarray:
    """The radiograph of a case: uint8 (resolution, resolution, 1).

    Below anatomy.RENDER_MIN px the film is rendered at RENDER_MIN and box-downsampled (antialiasing).
    """
    patient = anatomy.draw_patient(random_stream(seed, 0))
    rngs = {f.name: random_stream(seed, 30 + FINDING_NAMES.index(f.name)) for f in findings}
    thorax = phantom_findings.thorax_with_findings(patient, findings, rngs)
    size = max(resolution, anatomy.RENDER_MIN)
    canvas = anatomy.Canvas(size, patient)
    fractures = [f for f in findings if f.name == "Fracture"]
    layers = anatomy.normal_layers(canvas, thorax, random_stream(seed, 2), fractures, rngs.get("Fracture"))
    phantom_findings.draw_findings(canvas, thorax, layers, findings, rngs)
    intensity = anatomy.film(layers, patient, canvas, random_stream(seed, 3))
    if size != resolution:
        if size % resolution == 0:
            k = size // resolution
            intensity = intensity.reshape(resolution, k, resolution, k).mean((1, 3))
        else:
            intensity = np.asarray(Image.fromarray(intensity).resize((resolution, resolution), Image.BOX))
    return np.round(intensity * 255.0).astype(np.uint8)[:, :, None]
