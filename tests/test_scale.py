"""The red-cell size estimate behind the physical scale and cell finding."""

import cv2
import numpy as np
import pytest

from leuko.scale import RED_CELL_UM, red_cell_diameter_px


def red_cells(diameter: int, size=(480, 640), count=30, seed=0, pallor=True) -> np.ndarray:
    """Up to ``count`` pink discs of ``diameter`` pixels (with a paler centre) on a jittered grid
    over a pale background, some touching, plus two platelet-sized purple specks."""
    rng = np.random.default_rng(seed)
    image = np.full((*size, 3), (236, 214, 220), np.uint8)
    step = int(diameter * 1.25)
    grid = [(x, y) for y in range(diameter, size[0] - diameter, step)
            for x in range(diameter, size[1] - diameter, step)]
    for k in rng.permutation(len(grid))[:count]:
        centre = tuple(int(v + rng.integers(-diameter // 6, diameter // 6 + 1)) for v in grid[k])
        cv2.circle(image, centre, diameter // 2, (214, 140, 152), -1, cv2.LINE_AA)
        if pallor:
            cv2.circle(image, centre, diameter // 6, (226, 176, 184), -1, cv2.LINE_AA)
    for centre in ((20, 20), (620, 460)):
        cv2.circle(image, centre, max(2, diameter // 8), (120, 60, 150), -1)
    return np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("diameter", [20, 36, 58, 90])
def test_median_red_cell_diameter_is_found_within_ten_percent(diameter):
    estimate = red_cell_diameter_px(red_cells(diameter))
    assert estimate == pytest.approx(diameter, rel=0.10)


def test_large_images_are_measured_at_their_own_scale():
    small = red_cells(30)
    large = cv2.resize(small, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    assert red_cell_diameter_px(large) == pytest.approx(90, rel=0.10)


def test_a_single_cell_crop_with_a_few_red_cells_around_the_leukocyte():
    crop = np.full((257, 257, 3), (236, 214, 220), np.uint8)
    for centre in ((40, 40), (215, 45), (40, 210), (210, 215)):
        cv2.circle(crop, centre, 22, (214, 140, 152), -1, cv2.LINE_AA)
    cv2.circle(crop, (128, 128), 70, (196, 188, 228), -1)
    cv2.circle(crop, (128, 128), 45, (105, 45, 150), -1)
    assert red_cell_diameter_px(crop) == pytest.approx(44, rel=0.10)
    assert RED_CELL_UM / red_cell_diameter_px(crop) == pytest.approx(7.5 / 44, rel=0.10)


def test_too_few_red_cells_give_no_estimate():
    assert red_cell_diameter_px(np.full((300, 300, 3), 230, np.uint8)) is None
    assert red_cell_diameter_px(red_cells(40, count=2)) is None
    lone_leukocyte = np.full((200, 200, 3), (236, 214, 220), np.uint8)
    cv2.circle(lone_leukocyte, (100, 100), 50, (196, 188, 228), -1)
    cv2.circle(lone_leukocyte, (100, 100), 30, (105, 45, 150), -1)
    assert red_cell_diameter_px(lone_leukocyte) is None
