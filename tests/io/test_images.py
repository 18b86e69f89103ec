"""PNG writing (8/16-bit, metadata chunks) and labelled grids."""
import numpy as np
import pytest
from PIL import Image

from cxr_ldm.io.images import make_grid, save_png


def test_png_16bit_grayscale_round_trip_with_metadata(tmp_path):
    image = np.linspace(0, 1, 32 * 24, dtype=np.float32).reshape(32, 24, 1)
    save_png(tmp_path / "a.png", image, bits=16, metadata={"prompt": "Small left effusion.", "seed": 7})
    with Image.open(tmp_path / "a.png") as f:
        pixels = np.asarray(f)
        assert f.text == {"prompt": "Small left effusion.", "seed": "7"}
    np.testing.assert_array_equal(pixels.astype(np.int64), np.round(image[..., 0] * 65535).astype(np.int64))
    assert not (tmp_path / "a.png.tmp").exists()


def test_png_8bit_clips_out_of_range_values(tmp_path):
    image = np.array([[[-0.5], [0.5], [1.5]]], dtype=np.float32)
    save_png(tmp_path / "b.png", image)
    with Image.open(tmp_path / "b.png") as f:
        np.testing.assert_array_equal(np.asarray(f), [[0, 128, 255]])


def test_16bit_rgb_is_refused(tmp_path):
    with pytest.raises(ValueError, match="1-channel"):
        save_png(tmp_path / "c.png", np.zeros((4, 4, 3)), bits=16)


def test_grid_places_tiles_row_major_below_label_strips():
    images = np.stack([np.full((8, 10, 1), v, np.float32) for v in (0.2, 0.4, 0.6, 0.8, 1.0)])
    grid = make_grid(images, ["a", "b", "c", "d", "e"], ncols=2, label_height=12, pad=2)
    assert grid.shape == (3 * (8 + 12 + 2), 2 * (10 + 2), 3)
    for i, value in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
        row, col = divmod(i, 2)
        y, x = row * 22 + 12, col * 12
        np.testing.assert_allclose(grid[y:y + 8, x:x + 10], round(value * 255) / 255, atol=1e-6)


def test_grid_scale_repeats_pixels():
    image = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1) / 4
    grid = make_grid(image, scale=3, pad=0)
    assert grid.shape == (6, 6, 3)
    np.testing.assert_allclose(grid[:3, :3], round(0 * 255) / 255)
    np.testing.assert_allclose(grid[3:, 3:, 0], round(0.75 * 255) / 255, atol=1e-6)
