import math

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leuko.cli import main
from leuko.images import ImageError, load_image
from leuko.morphometrics import chromatin_texture, count_lobes, measure_cell, shape_measures
from leuko.segment import (NUCLEUS, FieldConfig, LearnedSegmenter, SegmentationError, classical_segment,
                           find_nuclei_groups, keep_central_cell, segment_image)
from leuko.segtrain import dice_iou, mask_to_classes


def disc_mask(size=200, cell_r=80, nucleus_r=40):
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), cell_r, 128, -1)
    cv2.circle(mask, (size // 2, size // 2), nucleus_r, 255, -1)
    return mask


def stained_cell(size=160, cell_r=55, nucleus_r=32, centre=None):
    centre = centre or (size // 2, size // 2)
    rgb = np.full((size, size, 3), (236, 214, 220), np.uint8)
    cv2.circle(rgb, (30, 30), 22, (226, 150, 160), -1)
    cv2.circle(rgb, centre, cell_r, (196, 188, 228), -1)
    cv2.circle(rgb, centre, nucleus_r, (105, 45, 150), -1)
    return rgb


def test_disc_measures_match_geometry():
    mask = disc_mask()
    m = measure_cell(mask, np.full((200, 200, 3), 128, np.uint8), pixel_size_um=0.5)
    assert m.nucleus_area_px == pytest.approx(math.pi * 40 ** 2, rel=0.02)
    assert m.cell_area_px == pytest.approx(math.pi * 80 ** 2, rel=0.02)
    assert m.nc_ratio == pytest.approx(40 ** 2 / (80 ** 2 - 40 ** 2), rel=0.03)
    assert m.nucleus_area_um2 == pytest.approx(m.nucleus_area_px * 0.25)
    assert m.nucleus_circularity == pytest.approx(1.0, abs=0.02)
    assert m.nucleus_perimeter_px == pytest.approx(2 * math.pi * 40, rel=0.02)
    assert m.nucleus_solidity == pytest.approx(1.0, abs=0.02) and m.contour_irregularity < 0.02
    assert m.nuclear_lobes == 1


def test_irregular_and_lobed_nuclei_score_accordingly():
    ellipse = np.zeros((200, 200), np.uint8)
    cv2.ellipse(ellipse, (100, 100), (60, 30), 30, 0, 360, 1, -1)
    ramanujan = math.pi * (3 * 90 - math.sqrt((3 * 60 + 30) * (60 + 3 * 30)))
    expected = 4 * math.pi * (math.pi * 60 * 30) / ramanujan ** 2
    assert shape_measures(ellipse.astype(bool))["circularity"] == pytest.approx(expected, abs=0.03)
    lobed = np.zeros((200, 200), np.uint8)
    for x in (60, 100, 140):
        cv2.circle(lobed, (x, 100), 18, 1, -1)
    cv2.line(lobed, (60, 100), (140, 100), 1, 3)
    assert count_lobes(lobed.astype(bool)) == 3
    shape = shape_measures(lobed.astype(bool))
    assert shape["solidity"] < 0.8 and shape["irregularity"] > 0.2
    crescent = np.zeros((200, 200), np.uint8)
    cv2.circle(crescent, (100, 100), 60, 1, -1)
    cv2.circle(crescent, (130, 100), 50, 0, -1)
    assert shape_measures(crescent.astype(bool))["convexity"] < 0.9


def test_chromatin_texture_separates_smooth_and_coarse_chromatin():
    nucleus = np.ones((64, 64), bool)
    smooth = np.tile(np.linspace(50, 60, 64), (64, 1))
    coarse = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(float)
    assert chromatin_texture(coarse, nucleus)["contrast"] > 10 * chromatin_texture(smooth, nucleus)["contrast"]
    assert chromatin_texture(smooth, nucleus)["homogeneity"] > chromatin_texture(coarse, nucleus)["homogeneity"]


def test_classical_segmenter_finds_nucleus_and_cytoplasm_of_a_stained_cell():
    rgb = stained_cell()
    truth = np.zeros((160, 160), np.uint8)
    cv2.circle(truth, (80, 80), 55, 128, -1)
    cv2.circle(truth, (80, 80), 32, 255, -1)
    mask = classical_segment(rgb)
    assert mask.shape == (160, 160) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 128, 255}
    scores = dice_iou(mask, truth)
    assert scores["nucleus_dice"] > 0.9 and scores["cell_dice"] > 0.85


def test_blank_tiny_and_wrong_images():
    assert not classical_segment(np.full((64, 64, 3), 230, np.uint8)).any()
    with pytest.raises(SegmentationError, match="too small"):
        classical_segment(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(SegmentationError, match="RGB"):
        segment_image(np.zeros((40, 40), np.uint8), classical_segment)
    blank = segment_image(np.full((64, 64, 3), 230, np.uint8), classical_segment)
    assert blank.cells == [] and not blank.mask.any()
    with pytest.raises(SegmentationError, match="5000x1 pixels is too small"):
        segment_image(np.zeros((1, 5000, 3), np.uint8), classical_segment)


def test_a_nucleus_coloured_frame_around_the_whole_crop_is_segmented_without_error():
    """When the filled 'nucleus' covers every pixel there is no cell to outline and no
    cytoplasm left to threshold (the classical segmenter used to fail there with numpy's
    zero-size error): no nucleus is invented, so the result goes to review."""
    frame = np.full((100, 100, 3), 235, np.uint8)
    cv2.rectangle(frame, (0, 0), (99, 99), (105, 45, 150), 12)
    mask = classical_segment(frame)
    assert mask.shape == (100, 100) and not mask.any()
    assert segment_image(frame, classical_segment).cells == []


def test_huge_images_are_refused_at_load_and_handled_as_arrays():
    import io
    buffer = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buffer, "PNG")
    with pytest.raises(ImageError, match="megapixels|too large"):
        load_image(buffer.getvalue())
    huge = np.full((10000, 10000, 3), 232, np.uint8)
    assert segment_image(huge, classical_segment).cells == []


def synthetic_field():
    rng = np.random.default_rng(0)
    field = np.full((900, 1200, 3), (236, 214, 220), np.uint8)
    for _ in range(90):
        cv2.circle(field, tuple(int(v) for v in rng.integers(0, [1200, 900])), 26, (226, 150, 160), -1)
    centres = [(300, 300), (800, 520), (1185, 200)]
    for x, y in centres:
        cv2.circle(field, (x, y), 60, (196, 188, 228), -1)
        cv2.circle(field, (x, y), 36, (105, 45, 150), -1)
    cv2.circle(field, (600, 760), 5, (120, 60, 150), -1)
    return field, centres


def test_field_image_yields_each_leukocyte_and_marks_border_cells():
    field, centres = synthetic_field()
    result = segment_image(field, classical_segment)
    assert result.kind == "field" and len(result.cells) == 3
    found = sorted(((x + w / 2, y + h / 2), cell.touches_border) for cell in result.cells
                   for x, y, w, h in [cell.box])
    for (centre, touches), expected in zip(found, sorted(centres)):
        assert abs(centre[0] - expected[0]) < 40 or touches
        assert abs(centre[1] - expected[1]) < 40
        assert touches == (expected[0] == 1185)
    assert result.mask.shape == field.shape[:2] and (result.mask == 255).sum() > 2 * math.pi * 30 ** 2
    no_cells = np.full((700, 900, 3), (236, 214, 220), np.uint8)
    cv2.circle(no_cells, (300, 300), 26, (226, 150, 160), -1)
    assert find_nuclei_groups(no_cells, FieldConfig()) == []


def test_keep_central_cell_drops_neighbours():
    mask = np.zeros((100, 100), np.uint8)
    cv2.circle(mask, (50, 50), 20, 128, -1)
    cv2.circle(mask, (50, 50), 10, 255, -1)
    cv2.circle(mask, (5, 5), 8, 255, -1)
    kept = keep_central_cell(mask)
    assert kept[5, 5] == 0 and kept[50, 50] == 255 and kept[50, 65] == 128


def test_keep_central_cell_fills_holes_in_the_cell_but_not_the_gap_to_the_border():
    mask = np.zeros((100, 100), np.uint8)
    cv2.circle(mask, (50, 50), 30, 128, -1)
    cv2.circle(mask, (50, 50), 12, 255, -1)
    cv2.circle(mask, (62, 38), 4, 0, -1)
    cv2.circle(mask, (50, 70), 3, 0, -1)
    mask[48:53, 0:60] = 0
    kept = keep_central_cell(mask)
    assert kept[38, 62] == 128 and kept[70, 50] == 128 and kept[50, 50] == 0 and kept[50, 25] == 0
    assert kept[40, 50] == 255 and set(np.unique(kept)) == {0, 128, 255}


def test_mask_levels_round_trip():
    assert mask_to_classes(np.array([[0, 120, 130, 250]], np.uint8)).tolist() == [[0, 1, 1, 2]]


def test_segment_command_writes_the_mask_contract_and_morphometrics(tmp_path):
    field, _ = synthetic_field()
    Image.fromarray(field).save(tmp_path / "field.png")
    Image.fromarray(stained_cell()).save(tmp_path / "crop.png")
    (tmp_path / "bad.png").write_text("no")
    out = tmp_path / "out"
    assert main(["segment", "--method", "classical", "--out-dir", str(out), "--pixel-size", "0.25",
                 str(tmp_path / "field.png"), str(tmp_path / "crop.png"), str(tmp_path / "bad.png")]) == 0
    mask = np.asarray(Image.open(out / "field_mask.png"))
    assert mask.shape == (900, 1200) and set(np.unique(mask)) <= {0, 128, 255}
    assert np.asarray(Image.open(out / "crop_mask.png")).shape == (160, 160)
    table = pd.read_csv(out / "morphometrics.csv")
    assert len(table) == 4 and table["touches_border"].sum() == 1
    assert {"nc_ratio", "nucleus_circularity", "nuclear_lobes", "chromatin_contrast", "nucleus_area_um2"} <= set(table)


@pytest.mark.parametrize(("centre_x", "cut"), [(55, True), (40, True), (100, False)])
def test_a_cell_is_marked_cut_exactly_when_the_image_border_crosses_it(centre_x, cut):
    field = np.full((700, 900, 3), (236, 214, 220), np.uint8)
    cv2.circle(field, (centre_x, 350), 60 if cut else 50, (196, 188, 228), -1)
    cv2.circle(field, (centre_x, 350), 36, (105, 45, 150), -1)
    cells = segment_image(field, classical_segment, "field").cells
    assert len(cells) == 1 and cells[0].touches_border is cut


def test_classical_segmenter_finds_no_cell_in_greyscale_or_noise_only_crops():
    rng = np.random.default_rng(1)
    blank = np.clip(rng.normal((236, 214, 220), 2, (120, 120, 3)), 0, 255).astype(np.uint8)
    assert not classical_segment(blank).any()
    assert classical_segment(stained_cell()).any()
    grey_cell = cv2.cvtColor(cv2.cvtColor(stained_cell(), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    assert not classical_segment(grey_cell).any()


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_learned_segmenter_gives_the_same_masks_in_an_exported_runtime_and_pytorch(backend):
    onnx, plain = LearnedSegmenter(backend=backend), LearnedSegmenter(backend="torch")
    assert onnx.onnx.runtime == backend and plain.onnx is None
    crops = [stained_cell(), stained_cell(257, 70, 40, (120, 140)), cv2.resize(stained_cell(), (100, 80))]
    for crop in crops:
        a, b = onnx.segment(crop), plain.segment(crop)
        assert a.shape == crop.shape[:2] and (a == NUCLEUS).any()
        assert (a == b).mean() > 0.999
    with pytest.raises(ValueError, match="backend must be"):
        LearnedSegmenter(backend="tensorrt")
