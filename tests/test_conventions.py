"""umr.conventions: the three pixel grids, known values and round trips."""
import numpy as np
import pytest
import torch

from umr.conventions import PIXEL_GRIDS, pixel_index, pixel_positions, raster_size, to_normalised, to_pixels


def test_known_values_of_each_grid():
    # 4-pixel axis: edge puts pixel 0 at -1 and 4 at +1; corners puts 0 at -1 and 3 at +1;
    # centre puts pixel 0 at -3/4 (its centre) and 3 at +3/4
    np.testing.assert_allclose(to_normalised(np.arange(5.0), 4, "edge"), [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(to_normalised(np.arange(4.0), 4, "corners"), [-1, -1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(to_normalised(np.arange(4.0), 4, "centre"), [-0.75, -0.25, 0.25, 0.75])
    assert to_normalised(0.0, 1, "corners") == -1  # a one-pixel axis does not divide by zero


@pytest.mark.parametrize("grid", PIXEL_GRIDS)
def test_to_pixels_inverts_to_normalised(grid):
    pixels = torch.linspace(-2, 70, 37, dtype=torch.float64)
    torch.testing.assert_close(to_pixels(to_normalised(pixels, 64, grid), 64, grid), pixels)
    torch.testing.assert_close(pixel_positions(64, grid, dtype=torch.float64),
                               to_normalised(torch.arange(64, dtype=torch.float64), 64, grid))


def test_pixel_index_is_the_nearest_pixel_centre_clamped_to_the_image():
    centres = pixel_positions(8, "centre")
    assert torch.equal(pixel_index(centres + 0.05, 8), torch.arange(8))
    assert pixel_index(torch.tensor([-5.0, 5.0]), 8).tolist() == [0, 7]


def test_unknown_grid_and_raster_size():
    with pytest.raises(ValueError, match="pixel grid"):
        to_normalised(1.0, 4, "middle")
    assert raster_size(256) == 512 and raster_size(256, anti_aliasing=False) == 256
