"""Cell finding in field images: each leukocyte once, platelets and red cells never."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from leuko.cellfind import (CandidateModel, count_matches, evaluate_fields, bionet_fields, find_leukocytes,
                            load_model, nucleus_candidates)
from leuko.cli import main
from leuko.paths import default_data_root
from leuko.segment import classical_segment, find_nuclei_groups, segment_image

BACKGROUND, RED_CELL, CYTOPLASM, NUCLEUS = (236, 214, 220), (214, 140, 152), (200, 190, 232), (105, 45, 150)


def smear(seed=0, size=(480, 640), keep_clear=()):
    """Red cells (52 px across) scattered over a pale background, away from ``keep_clear``
    (centre, radius) areas where cells are drawn."""
    rng = np.random.default_rng(seed)
    field = np.full((*size, 3), BACKGROUND, np.uint8)
    placed = 0
    while placed < 40:
        centre = rng.integers(30, [size[1] - 30, size[0] - 30])
        if any(np.hypot(*(centre - c)) < r + 30 for c, r in keep_clear):
            continue
        cv2.circle(field, tuple(int(v) for v in centre), 26, RED_CELL, -1, cv2.LINE_AA)
        cv2.circle(field, tuple(int(v) for v in centre), 8, (224, 170, 180), -1, cv2.LINE_AA)
        placed += 1
    return field


def add_granulocyte(field, centre, lobes=4):
    """A neutrophil: pale cytoplasm holding ``lobes`` separate nucleus lobes (14 px radius,
    6-10 px apart)."""
    cx, cy = centre
    cv2.circle(field, centre, 56, CYTOPLASM, -1, cv2.LINE_AA)
    offsets = [(-30, -8), (-6, -20), (18, -6), (8, 22)][:lobes]
    for dx, dy in offsets:
        cv2.circle(field, (cx + dx, cy + dy), 14, NUCLEUS, -1, cv2.LINE_AA)


def test_a_multi_lobed_nucleus_in_one_cytoplasm_is_one_cell():
    for lobes in (3, 4):
        field = smear(keep_clear=[((320, 240), 60)])
        add_granulocyte(field, (320, 240), lobes)
        found = find_nuclei_groups(field)
        assert len(found) == 1
        x, y, w, h = found[0]
        assert abs(x + w / 2 - 320) < 25 and abs(y + h / 2 - 240) < 25
        assert len(segment_image(field, classical_segment, "field").cells) == 1


def test_a_platelet_among_red_cells_is_not_a_cell():
    field = smear(keep_clear=[((200, 150), 20), ((450, 330), 60)])
    cv2.circle(field, (200, 150), 12, NUCLEUS, -1, cv2.LINE_AA)
    assert any(abs(c.box[0] + c.box[2] / 2 - 200) < 10 for c in nucleus_candidates(field))
    assert find_nuclei_groups(field) == []
    add_granulocyte(field, (450, 330))
    found = find_nuclei_groups(field)
    assert len(found) == 1 and abs(found[0][0] + found[0][2] / 2 - 450) < 25


def test_cell_finding_does_not_depend_on_magnification():
    field = smear(keep_clear=[((320, 240), 60), ((120, 380), 20)])
    add_granulocyte(field, (320, 240))
    cv2.circle(field, (120, 380), 12, NUCLEUS, -1, cv2.LINE_AA)
    for zoom in (0.8, 2.5):
        scaled = cv2.resize(field, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
        found = find_leukocytes(scaled)
        assert len(found) == 1 and found[0].red_cell_px == pytest.approx(52 * zoom, rel=0.12)


def test_matching_is_one_to_one_by_overlap_or_centre():
    true = [(100, 100, 100, 100), (300, 100, 100, 100)]
    assert count_matches([(90, 90, 120, 120), (310, 110, 80, 80)], true) == 2
    assert count_matches([(120, 120, 20, 20), (140, 140, 20, 20)], true) == 1
    assert count_matches([(500, 500, 50, 50)], true) == 0 and count_matches([], true) == 0
    scores = evaluate_fields([("a", None, true), ("b", None, [])], lambda rgb: [(120, 120, 20, 20)])
    assert scores.precision == 0.5 and scores.recall == 0.5 and scores.exact_count == 0.0


def test_the_candidate_model_round_trips_through_json():
    model = load_model()
    again = CandidateModel.from_json(model.to_json())
    values = dict.fromkeys(model.features, 0.3)
    assert again == model and 0.0 <= model.probability(values) <= 1.0 and model.provenance


def test_evaluate_cell_finding_command_writes_its_report(tmp_path, capsys):
    (tmp_path / "bionet_fields" / "images").mkdir(parents=True)
    rows, manifest = ["path,kind,xmin,ymin,xmax,ymax"], ["path,mask,dataset,task,label,split"]
    for k in range(2):
        field = smear(seed=k, keep_clear=[((320, 240), 60)])
        add_granulocyte(field, (320, 240))
        path = f"bionet_fields/images/{k}.jpg"
        Image.fromarray(field).save(tmp_path / path, quality=95)
        rows.append(f"{path},WBC,264,184,376,296")
        manifest.append(f"{path},,bionet_fields,cell_finding,,val")
    (tmp_path / "bionet_fields" / "boxes.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "manifest.csv").write_text("\n".join(manifest) + "\n")
    out = tmp_path / "report"
    assert main(["evaluate-cell-finding", "--split", "val", "--data", str(tmp_path), "--method", "classical",
                 "--out", str(out)]) == 0
    report = json.loads((out / "val.json").read_text())
    assert report["bionet_fields"]["precision"] == 1.0 and report["bionet_fields"]["exact_count"] == 1.0
    assert "precision" in (out / "val.txt").read_text() and "bionet_fields" in capsys.readouterr().out
    assert main(["evaluate-cell-finding", "--data", str(tmp_path / "nowhere")]) == 2


@pytest.mark.skipif(not (default_data_root() / "bionet_fields" / "boxes.csv").is_file(),
                    reason="needs ../shared/data/bionet_fields")
def test_real_fields_of_the_validation_split():
    """The shipped finder on the 100 bionet_fields validation fields (another microscope)."""
    scores = evaluate_fields(bionet_fields(default_data_root(), "val"), find_nuclei_groups)
    assert len(scores.fields) == 100
    assert scores.precision >= 0.97 and scores.recall >= 0.95 and scores.exact_count >= 0.95
