import gc

import cv2
import numpy as np
import torch
import pytest
from PIL import Image

from leuko.bench import sample_field
from leuko.cli import main
from leuko.data import InputConfig
from leuko.explain import (CAM_METHODS, FEATURE_MAP_METHODS, Explainer, energy_inside, faithfulness,
                           mask_at_cam_resolution, overlay, side_by_side)
from leuko.modelstore import ModelCard, ModelStore
from leuko.nets import ARCHITECTURES, build_model
from leuko.predict import Predictor
from tests.conftest import synthetic_cell


def _predictor(tmp_path, arch="efficientnet_lite0", size=64, backend="auto", view_zoom=1.0) -> Predictor:
    torch.manual_seed(0)
    store = ModelStore([tmp_path / "models"])
    card = ModelCard(id=f"m-{arch}" + (f"-view{view_zoom:g}" if view_zoom != 1 else ""), task="all_binary", classes=["ALL", "normal"], arch=arch,
                     input=InputConfig(input_size=size, view_zoom=view_zoom).to_dict(), temperature=1.5)
    if card.id not in {saved.id for saved in store.cards()}:
        store.save(build_model(arch, 2), card)
    return Predictor(card.id, store=store, backend=backend)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "mseenet", "seed003_alexnet", "seed004_squeezenet"])
def test_cam_has_image_shape_and_unit_range(tmp_path, arch):
    predictor = _predictor(tmp_path, arch, 96)
    image = synthetic_cell(0, 80)
    with Explainer(predictor) as explainer:
        result = explainer.explain(image)
    assert result.cam.shape == (80, 80) and 0.0 <= result.cam.min() and result.cam.max() <= 1.0
    assert result.class_id == predictor.predict_one(image).label
    assert result.probability == pytest.approx(predictor.predict_one(image).confidence, abs=1e-5)


def test_cam_is_zero_outside_the_networks_view(tmp_path):
    predictor = _predictor(tmp_path, size=64, view_zoom=2.0)
    with Explainer(predictor) as explainer:
        cam = explainer.explain(synthetic_cell(0, 80)).cam
    outside = np.ones((80, 80), bool)
    outside[20:60, 20:60] = False
    assert cam.shape == (80, 80) and cam[outside].max() == 0.0 and cam[~outside].max() > 0.0


def test_every_method_and_the_class_override(tmp_path):
    predictor = _predictor(tmp_path)
    image = synthetic_cell(1, 64)
    with Explainer(predictor) as explainer:
        maps = {method: explainer.explain(image, method=method).cam for method in CAM_METHODS}
        assert all(cam.shape == (64, 64) for cam in maps.values())
        for method in ("gradcam++", "eigencam", "layercam", "scorecam"):
            assert not np.allclose(maps["gradcam"], maps[method]), method
        predicted = explainer.explain(image)
        other = "normal" if predicted.class_id == "ALL" else "ALL"
        forced = explainer.explain(image, class_id=other)
        assert forced.class_id == other and forced.probability == pytest.approx(1 - predicted.probability, abs=1e-5)
        with pytest.raises(ValueError, match="not a class"):
            explainer.explain(image, class_id="blast")
        with pytest.raises(ValueError, match="unknown CAM method"):
            explainer.explain(image, method="magic")
    assert explainer._cams == {}


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "seed004_squeezenet"])
def test_maps_from_the_onnx_feature_map_equal_those_of_the_pytorch_network(tmp_path, arch):
    fast = _predictor(tmp_path, arch, 96)
    plain = _predictor(tmp_path, arch, 96, backend="torch")
    images = [synthetic_cell(k % 2, 90, seed=k) for k in range(3)]
    with Explainer(fast) as onnx_explainer, Explainer(plain) as torch_explainer:
        assert onnx_explainer.on_onnx and not torch_explainer.on_onnx
        for method in sorted(FEATURE_MAP_METHODS):
            for class_index in (None, 1):
                onnx_maps, onnx_probs = onnx_explainer.explain_images(images, class_index, method)
                torch_maps, torch_probs = torch_explainer.explain_images(images, class_index, method)
                assert np.allclose(onnx_probs, torch_probs, atol=1e-6), method
                for a, b in zip(onnx_maps, torch_maps):
                    assert a.shape == (90, 90) and np.abs(a - b).max() < 1e-4, method
        assert onnx_explainer.cam_object("scorecam").model is fast.network
    assert not fast.network.backbone._forward_hooks and not onnx_explainer._head.features._forward_hooks


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def test_memory_does_not_grow_over_200_explanations(tmp_path):
    predictor = _predictor(tmp_path, size=32)
    images = [synthetic_cell(k % 2, 32, seed=k) for k in range(4)]
    hooks_before = len(predictor.network.backbone._forward_hooks)
    with Explainer(predictor) as explainer:
        for k in range(20):
            explainer.explain(images[k % 4])
        gc.collect()
        start = _rss_mb()
        for k in range(200):
            explainer.explain(images[k % 4])
        gc.collect()
        growth = _rss_mb() - start
        assert len(explainer._cams) == 1
    assert growth < 25, f"resident memory grew by {growth:.1f} MB over 200 explanations"
    assert len(predictor.network.backbone._forward_hooks) == hooks_before


def test_overlay_rendering_and_energy_share():
    rgb = synthetic_cell(0, 60)
    cam = np.zeros((60, 60), np.float32)
    cam[20:40, 20:40] = 1.0
    mask = np.zeros((60, 60), np.uint8)
    mask[10:50, 10:50] = 128
    rendered = overlay(rgb, cam, "turbo", 0.5, contour_mask=mask)
    assert rendered.shape == rgb.shape and rendered.dtype == np.uint8
    assert not np.array_equal(overlay(rgb, cam, opacity=0.2), overlay(rgb, cam, opacity=0.8))
    assert side_by_side(rgb, rendered).shape == (60, 124, 3)
    assert energy_inside(cam, mask) == 1.0 and energy_inside(cam, np.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError):
        overlay(rgb, cam, opacity=2)


def test_faithfulness_report_has_cam_and_random_figures(tmp_path):
    from leuko.data import Sample
    paths = []
    for k in range(4):
        path = tmp_path / f"{k}.png"
        Image.fromarray(synthetic_cell(k % 2, 64, seed=k)).save(path)
        paths.append(Sample(path, k % 2))
    predictor = _predictor(tmp_path, size=96)
    report = faithfulness(predictor, paths, segment=lambda rgb: np.full(rgb.shape[:2], 128, np.uint8),
                          percentiles=(50,))
    assert report["images"] == 4 and report["energy_inside_cell"] == pytest.approx(1.0)
    assert report["cell_area_share"] == pytest.approx(1.0) and report["mask_at_cam_resolution"] == 1.0

    def left_half(rgb: np.ndarray) -> np.ndarray:
        mask = np.zeros(rgb.shape[:2], np.uint8)
        mask[:, : rgb.shape[1] // 2] = 128
        return mask

    halves = faithfulness(predictor, paths, segment=left_half, percentiles=(50,))
    assert halves["cell_area_share"] == pytest.approx(0.5)
    assert 0.0 <= halves["energy_inside_cell"] <= 1.0 and 0.5 < halves["mask_at_cam_resolution"] < 1.0
    assert {"deletion", "deletion_random", "insertion", "insertion_random"} <= set(report)

    def centre(rgb: np.ndarray) -> np.ndarray:
        mask = np.zeros(rgb.shape[:2], np.uint8)
        mask[16:48, 16:48] = 128
        return mask

    assert faithfulness(predictor, paths, segment=centre, percentiles=(50,))["cell_area_share"] == pytest.approx(0.25)
    zoomed = faithfulness(_predictor(tmp_path, size=96, view_zoom=2.0), paths, segment=centre, percentiles=(50,))
    assert zoomed["view_zoom"] == 2.0 and zoomed["cell_area_share"] == pytest.approx(1.0)
    assert zoomed["energy_inside_cell"] == pytest.approx(1.0)


def test_a_small_cell_seen_at_a_coarse_grid_spills_out_of_its_outline():
    mask = np.zeros((160, 160), np.uint8)
    cv2.circle(mask, (80, 80), 30, 128, -1)
    area = (mask > 0).mean()
    coarse = energy_inside(mask_at_cam_resolution(mask, (5, 5)), mask)
    fine = energy_inside(mask_at_cam_resolution(mask, (40, 40)), mask)
    assert area < coarse < fine < 1.0 and fine > 0.9


def test_explain_command_writes_cam_pngs(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKO_HOME", str(tmp_path))
    _predictor(tmp_path)
    Image.fromarray(synthetic_cell(0, 64)).save(tmp_path / "cell.png")
    (tmp_path / "broken.png").write_text("x")
    assert main(["explain", "--task", "all_binary", "--model", "m-efficientnet_lite0", "--method", "gradcam++",
                 "--out-dir", str(tmp_path / "cams"), str(tmp_path / "cell.png"), str(tmp_path / "broken.png")]) == 0
    written = Image.open(tmp_path / "cams" / "cell_cam.png")
    assert written.size == (64 * 2 + 4, 64)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(synthetic_cell(0, 64)).save(tmp_path / folder / "same.png")
    assert main(["explain", "--task", "all_binary", "--model", "m-efficientnet_lite0", "--out-dir",
                 str(tmp_path / "twins"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "twins").glob("*.png")) == ["same-2_cam.png", "same_cam.png"]
    Image.fromarray(sample_field(cells=2)).save(tmp_path / "field.png")
    assert main(["explain", "--task", "all_binary", "--model", "m-efficientnet_lite0", "--out-dir",
                 str(tmp_path / "field"), str(tmp_path / "field.png")]) == 0
    written = sorted((tmp_path / "field").glob("*.png"))
    assert [p.name for p in written] == ["field_cell1_cam.png", "field_cell2_cam.png"]
    assert all(Image.open(p).size[0] < 2 * 600 for p in written)
    (tmp_path / "c").mkdir()
    Image.fromarray(synthetic_cell(0, 64)).save(tmp_path / "c" / "field_cell1.png")
    assert main(["explain", "--task", "all_binary", "--model", "m-efficientnet_lite0", "--out-dir",
                 str(tmp_path / "clash"), str(tmp_path / "c" / "field_cell1.png"), str(tmp_path / "field.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "clash").glob("*.png")) == [
        "field-2_cell1_cam.png", "field-2_cell2_cam.png", "field_cell1_cam.png"]


def test_every_architecture_declares_a_target_layer():
    assert all(spec.target_layer for spec in ARCHITECTURES.values())


def test_a_fusion_models_map_explains_the_prediction_made_with_the_blood_count():
    """pytorch-grad-cam calls its model with the image alone; the fusion model's blood count
    is bound in, so the map and its probabilities are those of the prediction the user saw
    (they used to come from the image alone)."""
    from leuko.clinical import ClinicalValues

    predictor = Predictor("all_binary-fusion_lite0-simulated")
    image = synthetic_cell(0, 96, seed=3)
    count = ClinicalValues(wbc=45.0, platelets=30.0, hemoglobin=7.5, blasts_pct=60.0)
    predicted = predictor.predict([image], clinical=[count])[0].probabilities
    with Explainer(predictor) as explainer:
        with_count = explainer.explain(image, clinical=count)
        image_only = explainer.explain(image)
    assert np.allclose([with_count.probabilities[c] for c in predictor.classes], predicted, atol=1e-5)
    assert abs(with_count.probabilities["ALL"] - image_only.probabilities["ALL"]) > 1e-3
    assert not np.allclose(with_count.cam, image_only.cam)
