"""The analysis core behind the Analyze page, on synthetic crops and fields with the shipped models."""

import io
from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from leuko.analysis import (AnalysisSettings, Analyzer, CaseAnalysis, CellResult, ImageAnalysis, boxes_overlay,
                            mask_overlay, png_bytes)
from leuko.bench import sample_field
from leuko.clinical import ClinicalValueError, ClinicalValues
from leuko.concordance import findings
from leuko.images import ImageError
from leuko.predict import Prediction
from leuko.store import CaseStore
from leuko.store.export import case_pdf, measures_line
from leuko.tasks import get_task
from tests.test_segment import stained_cell


@pytest.fixture(scope="module")
def analyzer():
    with Analyzer(AnalysisSettings("all_binary", segmenter="classical")) as shared:
        yield shared


def test_crop_gives_one_explained_measured_cell(analyzer):
    result = analyzer.analyze(stained_cell(), "cell.png")
    assert result.kind == "crop" and len(result.cells) == 1
    cell = result.cells[0]
    assert cell.prediction.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert cell.cam.shape == (160, 160) and 0.0 <= cell.cam.min() and cell.cam.max() <= 1.0
    assert 0.0 <= cell.cam_inside_cell <= 1.0
    assert cell.morphometrics["nucleus_area_px"] == pytest.approx(np.pi * 32 ** 2, rel=0.15)
    summary = result.summary()
    assert result.task.info(cell.prediction.label).display in summary and "not a diagnosis" in summary
    assert ("unsure" in summary) == (cell.prediction.needs_review and not cell.prediction.unfamiliar)
    assert cell.prediction.unfamiliar and "has not seen images like these" in summary and cell.prediction.needs_review
    assert mask_overlay(cell.crop, cell.mask).shape == (160, 160, 3)


def test_field_gives_a_cell_table_and_differential(analyzer):
    result = analyzer.analyze(sample_field(cells=4), "field.png", kind="auto")
    assert result.kind == "field" and len(result.cells) == 4
    differential = result.differential()
    assert sum(r["cells"] for r in differential) == 4
    assert sum(r["percent"] for r in differential) == pytest.approx(100.0)
    blasts = sum(c.prediction.label == "ALL" for c in result.cells)
    assert result.blast_percent() == pytest.approx(25.0 * blasts)
    assert "4 white cell(s) found" in result.summary()
    assert boxes_overlay(result).shape == result.rgb.shape


def test_an_analysis_saves_as_a_case_with_every_cell(analyzer, leuko_home):
    field = analyzer.analyze(sample_field(cells=3), "field.png")
    crop = analyzer.analyze(stained_cell(), "crop.png")
    store = CaseStore(home=leuko_home)
    case_id = store.save_case("CASE-1", "ana", [field.to_entry(png_bytes(field.rgb)), crop.to_entry(png_bytes(crop.rgb))])
    saved = store.case(case_id)
    field_record, crop_record = saved.images
    assert field_record.kind == "field" and len(field_record.cells) == 3
    assert len(field_record.predictions) == 3 and all(p.cell_id for p in field_record.predictions)
    assert crop_record.predictions[0].label == crop.cells[0].prediction.label
    assert crop_record.morphometrics == pytest.approx(crop.cells[0].morphometrics)
    assert all(c.morphometrics for c in field_record.cells) and field_record.morphometrics is None
    report = case_pdf(store, case_id, leuko_home / "case.pdf")
    assert report.read_bytes().startswith(b"%PDF") and "N:C ratio" in measures_line(crop_record.morphometrics)
    assert store.check().ok
    store.close()


def test_the_analyzer_names_the_weights_its_results_depend_on(analyzer):
    from leuko.modelstore import ModelStore

    assert analyzer.weights == f"{analyzer.predictor.card.weights_sha256}:classical"
    with Analyzer(AnalysisSettings("all_binary", segmenter="learned", backend="torch")) as learned:
        unet = ModelStore().locate(ModelStore().default_id("segmentation"))[0]
        assert learned.weights == f"{learned.predictor.card.weights_sha256}:{unet.weights_sha256}"


def test_a_blank_crop_is_refused_and_one_without_an_outline_is_classified_for_review(analyzer):
    with pytest.raises(ImageError, match="blank.png: the image is blank"):
        analyzer.analyze(np.full((120, 120, 3), 230, np.uint8), "blank.png")
    smear = np.clip(np.random.default_rng(0).normal((236, 214, 220), 12, (120, 120, 3)), 0, 255).astype(np.uint8)
    result = analyzer.analyze(smear, "no-outline.png")
    assert len(result.cells) == 1 and result.cells[0].morphometrics is None
    assert result.cells[0].needs_review and result.needs_review
    assert "no cell outline" in result.summary() and "Marked for review" in result.summary()
    assert "no outline" in [w.kind for w in result.cells[0].warnings]


def test_an_outline_covering_most_of_a_crop_is_called_a_merged_region(analyzer):
    result = analyzer.analyze(stained_cell(), "cell.png")
    assert "several cells" not in result.summary()
    covering = np.full_like(result.cells[0].mask, 128)
    covering[:20] = 0
    merged = replace(result, cells=[replace(result.cells[0], mask=covering)])
    assert "covers 88% of the image" in merged.summary() and "several cells" in merged.summary()
    two_cells = np.zeros_like(covering)
    height, width = two_cells.shape
    for centre_x in (width // 4, 3 * width // 4):
        cv2.circle(two_cells, (centre_x, height // 2), width // 6, 128, -1)
    cv2.line(two_cells, (width // 4, height // 2), (3 * width // 4, height // 2), 128, 3)
    joined = replace(result, cells=[replace(result.cells[0], mask=two_cells)])
    assert (two_cells > 0).mean() < 0.7
    assert "far from a single cell's convex shape" in joined.summary() and "several cells" in joined.summary()


def test_multi_cell_aria_views_are_called_merged_regions(shared_data):
    import csv

    rows = [r for r in csv.DictReader((shared_data / "manifest.csv").open())
            if r["dataset"] == "aria_ball" and r["split"] == "test"]
    views = rows[::len(rows) // 6][:6]
    with Analyzer(AnalysisSettings("ball_subtype")) as ball:
        results = [ball.analyze(shared_data / row["path"], "aria.jpg") for row in views]
    assert all(result.kind == "crop" for result in results)
    assert sum("several cells" in result.summary() for result in results) >= 5


def test_field_without_leukocytes_says_so_and_still_gives_the_blood_count_flags(analyzer):
    result = analyzer.analyze(np.full((700, 900, 3), (236, 214, 220), np.uint8), "empty.png",
                              ClinicalValues(wbc=1.2, platelets=30.0, hemoglobin=7.5))
    assert result.kind == "field" and result.cells == [] and result.needs_review
    summary = result.summary()
    assert "No white blood cell was found" in summary and "CBC: leukopenia" in summary
    assert "not a diagnosis" in summary


def test_clinical_values_add_flags_and_impossible_ones_are_refused(analyzer):
    result = analyzer.analyze(stained_cell(), "c.png", ClinicalValues(wbc=45.0, platelets=30.0, hemoglobin=7.5))
    assert {f.name for f in result.flags} >= {"leukocytosis", "thrombocytopenia", "anemia", "bicytopenia"}
    assert "CBC: leukocytosis" in result.summary()
    with pytest.raises(ClinicalValueError, match="hemoglobin"):
        analyzer.analyze(stained_cell(), "c.png", ClinicalValues(hemoglobin=80.0))


def test_unreadable_image_is_refused_with_a_message(analyzer):
    with pytest.raises(ImageError):
        analyzer.analyze(b"this is not an image", "bad.png")


def test_an_image_too_small_to_segment_is_refused_as_an_image_error(analyzer):
    with pytest.raises(ImageError, match="too small"):
        analyzer.analyze(np.full((20, 20, 3), 200, np.uint8), "tiny.png")


def test_fusion_model_explains_both_classes_with_a_non_empty_map():
    with Analyzer(AnalysisSettings("all_binary", model_id="all_binary-fusion_lite0-simulated",
                                   segmenter="classical")) as fusion:
        for class_id in ("ALL", "normal"):
            explanation = fusion.explainer.explain(stained_cell(), class_id)
            assert explanation.class_id == class_id and explanation.cam.max() > 0


@pytest.mark.parametrize(("backend", "runtime"), [("openvino", "OpenVINO"), ("onnx", "ONNX Runtime")])
def test_the_exported_and_pytorch_backends_give_the_same_analysis(backend, runtime):
    crop = stained_cell(200, 60, 34)
    with Analyzer(AnalysisSettings("wbc_type", backend="torch")) as plain:
        assert plain.runtime == "cpu, PyTorch"
        expected = plain.analyze(crop).cells[0]
    with Analyzer(AnalysisSettings("wbc_type", backend=backend)) as fast:
        assert fast.explainer.on_onnx and fast.runtime == f"cpu, {runtime}"
        cell = fast.analyze(crop).cells[0]
    assert np.allclose(cell.prediction.probabilities, expected.prediction.probabilities, atol=1e-5)
    assert np.abs(cell.cam - expected.cam).max() < 1e-4
    assert (cell.mask == expected.mask).mean() > 0.999
    assert cell.morphometrics["nucleus_area_px"] == pytest.approx(expected.morphometrics["nucleus_area_px"], rel=0.01)


def test_a_saved_mask_is_shown_over_its_crop_for_reviewers(tmp_path):
    """The Cases page showed the raw 0/128/255 mask (black, grey and white); reviewers now
    see it over the crop as on the Analyze page."""
    from leuko.analysis import saved_mask_overlay

    rgb = stained_cell()
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[40:120, 40:120], mask[60:100, 60:100] = 128, 255
    Image.fromarray(rgb).save(tmp_path / "crop.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    shown = np.asarray(Image.open(io.BytesIO(saved_mask_overlay(tmp_path / "crop.png", tmp_path / "mask.png"))))
    assert np.array_equal(shown, mask_overlay(rgb, mask))
    Image.fromarray(mask[:50]).save(tmp_path / "other.png")
    assert saved_mask_overlay(tmp_path / "crop.png", tmp_path / "other.png") is None
    assert saved_mask_overlay(tmp_path / "crop.png", tmp_path / "missing.png") is None


def _prediction(label: str = "normal", confidence: float = 0.97, **fields) -> Prediction:
    """An all_binary prediction built by hand, as the Predictor would give it."""
    probabilities = np.array([1 - confidence, confidence]) if label == "normal" else np.array([confidence, 1 - confidence])
    return Prediction(["ALL", "normal"], probabilities, fields.pop("needs_review", False), **fields)


def _cell(prediction: Prediction, index: int = 1, mask: np.ndarray | None = None, inside: float | None = 0.9,
          outlined: bool = True, in_field: bool = False) -> CellResult:
    """A 100 px crop holding one round cell (or the given mask) with that prediction."""
    if mask is None:
        mask = np.zeros((100, 100), np.uint8)
        cv2.circle(mask, (50, 50), 25, 128, -1)
        cv2.circle(mask, (50, 50), 14, 255, -1)
    crop = np.full((100, 100, 3), 220, np.uint8)
    return CellResult(index, (0, 0, 100, 100), False, crop, mask if outlined else np.zeros_like(mask), prediction,
                      np.zeros((100, 100), np.float32), inside if outlined else None,
                      {"cell_area_px": 1963.0} if outlined else None, in_field=in_field)


def _image(cells: list[CellResult], name: str = "cell.png", kind: str = "crop") -> ImageAnalysis:
    return ImageAnalysis(name=name, rgb=np.full((100, 100, 3), 220, np.uint8), kind=kind, task=get_task("all_binary"),
                         model_id="m", weights_sha256="0" * 64, cam_method="gradcam",
                         mask=np.zeros((100, 100), np.uint8), cells=cells, review_threshold=0.9)


def _merged_mask() -> np.ndarray:
    mask = np.full((100, 100), 128, np.uint8)
    mask[:10] = 0
    return mask


WARNING_KINDS = {
    "not applicable": dict(prediction=_prediction(needs_review=True, not_applicable="not a lymphocyte")),
    "unfamiliar": dict(prediction=_prediction(needs_review=True, shift_score=7.25, unfamiliar=True)),
    "low confidence": dict(prediction=_prediction(confidence=0.62, needs_review=True)),
    "no outline": dict(prediction=_prediction(), outlined=False),
    "several cells": dict(prediction=_prediction(), mask=_merged_mask()),
    "empty attention map": dict(prediction=_prediction(), inside=float("nan")),
    "attention off the cell": dict(prediction=_prediction(), inside=0.3),
}


@pytest.mark.parametrize("kind", WARNING_KINDS)
def test_every_warning_takes_confident_away_and_marks_the_result_for_review(kind):
    """The 'Confident' badge sat beside the page's own warning that a crop held several
    cells: the cell's warnings now decide its review state, its summary, its table row, its
    box colour and what is saved."""
    cell = _cell(**WARNING_KINDS[kind])
    analysis = _image([cell])
    assert [w.kind for w in cell.warnings] == [kind]
    assert cell.needs_review and analysis.needs_review
    assert cell.warnings[0].text in analysis.summary() and "Marked for review" in analysis.summary()
    assert analysis.rows()[0]["review"] == "needs review" and analysis.rows()[0]["warnings"] == kind
    assert analysis.to_entry(b"png").prediction.needs_review
    field = _image([replace(cell, in_field=kind != "several cells")], kind="field")
    assert tuple(boxes_overlay(field)[0, 50]) == (220, 30, 30)


def test_a_cell_without_warnings_is_confident():
    cell = _cell(_prediction())
    analysis = _image([cell])
    assert cell.warnings == [] and not cell.needs_review and not analysis.needs_review
    assert "Marked for review" not in analysis.summary() and analysis.rows()[0]["review"] == "confident"
    assert analysis.rows()[0]["shift score"] == "not measured"
    assert not analysis.to_entry(b"png").prediction.needs_review
    assert tuple(boxes_overlay(_image([replace(cell, in_field=True)], kind="field"))[0, 50]) == (20, 160, 60)


def test_a_field_cell_is_not_called_several_cells_for_its_neighbours():
    cell = _cell(_prediction(), mask=_merged_mask(), in_field=True)
    assert cell.warnings == []


def test_an_unfamiliar_field_says_so_with_its_highest_score():
    cells = [_cell(_prediction(), 1, in_field=True),
             _cell(_prediction(needs_review=True, shift_score=6.5, unfamiliar=True), 2, in_field=True),
             _cell(_prediction(needs_review=True, shift_score=9.125, unfamiliar=True), 3, in_field=True),
             _cell(_prediction(needs_review=True, not_applicable="not a lymphocyte"), 4, in_field=True)]
    summary = _image(cells, "field.png", "field").summary()
    assert ("2 of 4 cells look unlike the model's training images**: this model has not seen images like these: "
            "check every result (highest shift score 9.12)") in summary
    assert "1 of 4 cells: not a lymphocyte**: this question does not apply" in summary
    assert "3 cell(s) need review** by a hematologist: #2 (unfamiliar), #3 (unfamiliar), #4 (not applicable)" in summary
    assert len(_image(cells, "field.png", "field").labels) == 3  # the cell the question does not fit is not counted


def test_to_entry_carries_the_shift_fields():
    measured = _image([_cell(_prediction(needs_review=True, shift_score=7.25, unfamiliar=True,
                                         not_applicable="not a lymphocyte"))])
    entry = measured.to_entry(b"png").prediction
    assert (entry.shift_score, entry.unfamiliar, entry.not_applicable) == (7.25, True, "not a lymphocyte")
    field = _image([_cell(_prediction(shift_score=1.5), in_field=True)], kind="field").to_entry(b"png")
    assert (field.cells[0].prediction.shift_score, field.cells[0].prediction.unfamiliar) == (1.5, False)
    unmeasured = _image([_cell(_prediction())]).to_entry(b"png").prediction
    assert unmeasured.shift_score is None and unmeasured.not_applicable is None


def test_the_case_differential_sums_over_all_its_images():
    first = _image([_cell(_prediction("ALL"), 1, in_field=True), _cell(_prediction("normal"), 2, in_field=True),
                    _cell(_prediction("normal"), 3, in_field=True)], "field-1.png", "field")
    second = _image([_cell(_prediction("ALL"), 1, in_field=True)], "field-2.png", "field")
    empty = _image([], "empty.png", "field")
    case = CaseAnalysis([first, second, empty])
    assert [(r["class"], r["cells"], r["percent"]) for r in case.differential()] == [
        ("ALL blast", 2, 50.0), ("Normal lymphocyte", 2, 50.0)]
    assert case.blast_percent() == 50.0
    assert [(r["file"], r["cell"]) for r in case.rows()] == [
        ("field-1.png", 1), ("field-1.png", 2), ("field-1.png", 3), ("field-2.png", 1), ("empty.png", None)]
    summary = case.summary()
    assert "3 image(s), 4 white cell(s) counted" in summary and "Cells read as blasts: 2 of 4 (50.0%)" in summary
    assert "No white blood cell was found in 1 image(s)** (see the table)" in summary
    assert case.needs_review
    assert not CaseAnalysis([first, second]).needs_review


def test_a_case_whose_blood_count_disagrees_with_its_images_needs_review():
    normal = _image([_cell(_prediction("normal"))])
    assert not CaseAnalysis([normal], ClinicalValues(blasts_pct=0.0)).needs_review
    case = CaseAnalysis([normal], ClinicalValues(blasts_pct=60.0))
    assert case.findings() == findings("all_binary", ["normal"], ClinicalValues(blasts_pct=60.0)) != []
    assert case.needs_review and not normal.needs_review
    assert "**The blood count and the images disagree**" in case.summary() and case.findings()[0] in case.summary()


def test_a_field_without_a_given_pixel_size_is_classified_at_the_scale_of_its_red_cells(analyzer):
    field = sample_field(cells=3)
    assert analyzer.predictor.input_config.view_um is None
    assert analyzer.analyze(field, "field.png", kind="field").estimated_pixel_size_um is None
    with Analyzer(AnalysisSettings("wbc_type", segmenter="classical")) as typing:
        estimated = typing.analyze(field, "field.png", kind="field")
        assert estimated.estimated_pixel_size_um is not None and 0.02 < estimated.estimated_pixel_size_um < 1.0
        assert "estimated from this field's red cells" in estimated.summary()
        assert all(c.cam.shape == c.crop.shape[:2] for c in estimated.cells)
        given = typing.analyze(field, "field.png", kind="field", pixel_size_um=0.1)
        assert given.estimated_pixel_size_um is None and "estimated from" not in given.summary()
