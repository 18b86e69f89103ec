"""Image files: PNGs with metadata in text chunks, and labelled contact sheets (grids)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin


def to_pil(image: np.ndarray, bits: int = 8) -> Image.Image:
    """float (H, W, C) in [0, 1] with C in {1, 3} -> PIL image; 1 channel may be 8- or 16-bit grayscale."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1|3) image, got shape {image.shape}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if bits == 16 and image.shape[-1] != 1:
        raise ValueError("16-bit PNGs are written for 1-channel (grayscale) images only")
    image = np.clip(np.nan_to_num(image), 0.0, 1.0)
    if bits == 16:
        return Image.fromarray(np.round(image[..., 0] * 65535).astype(np.uint16))
    pixels = np.round(image * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if image.shape[-1] == 1 else pixels)


def save_png(path: str | os.PathLike, image: np.ndarray, *, bits: int = 8,
             metadata: Mapping[str, object] | None = None) -> None:
    """Writes `image` (H, W, C) in [0, 1] as PNG with `metadata` as tEXt chunks, atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image, bits).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def make_grid(images: np.ndarray, labels: Sequence[str] | None = None, *, ncols: int | None = None,
              label_height: int = 28, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tiles images (N, H, W, C) in [0, 1] into one (rows*(H+label), cols*W, 3) float image.

    `labels` (one per image, or None) are drawn on a dark strip above each tile, wrapped to the tile
    width. `scale` enlarges each image by pixel repetition first (small images, readable labels).
    """
    images = np.asarray(images, dtype=np.float32)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    strip = label_height if labels is not None else 0
    cell_h, cell_w = h + strip + pad, w + pad
    canvas = Image.new("RGB", (ncols * cell_w, nrows * cell_h), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    chars_per_line = max(8, w // 6)
    for i in range(n):
        row, col = divmod(i, ncols)
        x, y = col * cell_w, row * cell_h
        tile = Image.fromarray(np.round(np.clip(images[i], 0, 1) * 255).astype(np.uint8))
        canvas.paste(tile, (x, y + strip))
        if labels is not None:
            lines = textwrap.wrap(str(labels[i]), chars_per_line)[: max(1, strip // 11)]
            draw.multiline_text((x + 2, y + 1), "\n".join(lines), fill=(235, 235, 235), font=font,
                                spacing=1)
    return np.asarray(canvas, dtype=np.float32) / 255.0


_GRAY_SCALES = {"1": 1.0, "L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A grayscale (1-bit, 8-bit or 16-bit) or RGB image file -> float32 (H, W, 1 or 3) in [0, 1].

    Raises:
      ValueError naming the file: it is not an image file, or its pixels are neither grayscale nor RGB
        (palette, alpha, CMYK, ...).
    """
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path} is not an image file that can be read ({e})") from None
    if image.mode == "RGB":
        return np.asarray(image, np.float32) / 255.0
    if image.mode not in _GRAY_SCALES:
        raise ValueError(f"{path} has {image.mode} pixels: expected a grayscale or RGB image")
    return (np.asarray(image).astype(np.float32) / _GRAY_SCALES[image.mode])[..., None]
