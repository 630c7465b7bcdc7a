"""The physical view: cells cut to the micrometres a model learned, and maps placed back."""

import numpy as np
from PIL import Image

from leuko.analysis import on_box
from leuko.data import from_physical_view, physical_side, physical_view, square_about


def test_a_crop_is_cut_to_the_physical_view_and_its_map_placed_back_on_the_same_pixels():
    crop = np.zeros((100, 120, 3), np.uint8)
    crop[40:60, 50:70] = 255
    assert physical_side(0.2, 10.0, 1.0) == 50 and physical_side(None, 10.0, 1.0) is None
    view = np.asarray(physical_view(Image.fromarray(crop), 0.2, 10.0, 1.0))
    assert view.shape == (50, 50, 3) and view[15:35, 15:35].all() and not view[:10].any()
    placed = from_physical_view(view[..., 0].astype(np.float32), 100, 120)
    assert placed.shape == (100, 120) and np.array_equal(placed > 0, crop[..., 0] > 0)


def test_a_small_crop_is_padded_by_mirroring_and_its_map_cut_back():
    crop = np.full((40, 40, 3), 100, np.uint8)
    view = physical_view(Image.fromarray(crop), 0.1, 6.0, 1.0)
    assert view.size == (60, 60)
    placed = from_physical_view(np.ones((60, 60), np.float32), 40, 40)
    assert placed.shape == (40, 40) and placed.all()
    assert physical_view(Image.fromarray(crop), None, 6.0, 1.0).size == (40, 40)


def test_a_field_cell_is_cut_from_the_field_and_its_map_lands_on_its_box():
    field = np.zeros((200, 300, 3), np.uint8)
    field[90:110, 140:160] = 255
    square = square_about(field, (150, 100), 80)
    assert square.shape == (80, 80, 3) and square[30:50, 30:50].all() and square.sum() == field.sum()
    corner = square_about(field, (5, 5), 40)
    assert corner.shape == (40, 40, 3)
    cell_map = on_box(square[..., 0].astype(np.float32), (150, 100), (130, 80, 40, 40))
    assert cell_map.shape == (40, 40) and cell_map[10:30, 10:30].all() and cell_map.sum() == 20 * 20 * 255
    beyond = on_box(np.ones((20, 20), np.float32), (150, 100), (130, 80, 40, 40))
    assert beyond[10:30, 10:30].all() and not beyond[:10].any() and not beyond[:, :10].any()
