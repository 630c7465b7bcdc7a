"""Leave-one-lab-out validation and registering a run trained elsewhere, on tiny synthetic labs."""

import csv
import json

import pytest
from PIL import Image

from leuko import crosslab
from leuko.cli import main
from leuko.config import TrainConfig
from tests.conftest import synthetic_cell

LABS = ("lab_a", "lab_b")


@pytest.fixture(scope="module")
def two_labs(tmp_path_factory):
    """A manifest of two 'labs' of synthetic all_binary cells (the second lab's cells are
    larger and bluer), with train/val/test splits."""
    root = tmp_path_factory.mktemp("labs")
    rows = []
    for lab_index, lab in enumerate(LABS):
        for split, count in (("train", 8), ("val", 4), ("test", 4)):
            for label_index, label in enumerate(("ALL", "normal")):
                for i in range(count):
                    cell = synthetic_cell(label_index + 2 * lab_index, 40, seed=hash((lab, split, i)) % 1000)
                    path = root / lab / split / label / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(cell).save(path)
                    rows.append([path.relative_to(root).as_posix(), "", lab, "all_binary", label, split])
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "mask", "dataset", "task", "label", "split"])
        writer.writerows(rows)
    return root


def base_config(root) -> TrainConfig:
    return TrainConfig(task="all_binary", arch="seed004_squeezenet", pretrained="none", input_size=32, epochs=1,
                       batch_size=4, num_workers=0, data_root=str(root), model_id="lolo-test",
                       preprocess={"stain_normalization": "reinhard"})


def test_a_method_adds_its_settings_and_keeps_the_base_preprocessing(two_labs):
    config = crosslab.method_config(base_config(two_labs), "macenko", datasets=["lab_a"])
    assert config.preprocess.stain_normalization == "macenko" and config.datasets == ["lab_a"]
    degrade = crosslab.method_config(base_config(two_labs), "reinhard+colour+degrade")
    assert degrade.degrade and degrade.colour_invariance and degrade.preprocess.stain_normalization == "reinhard"


def test_each_fold_measures_the_lab_left_out_and_keeps_its_rows(two_labs, tmp_path):
    rows = crosslab.leave_one_lab_out(base_config(two_labs), list(LABS), ["reinhard"], tmp_path)
    assert [(r.method, r.held_out, r.n) for r in rows] == [("reinhard", "lab_a", 24), ("reinhard", "lab_b", 24)]
    assert all(0.0 <= r.balanced_accuracy <= 1.0 and 0.0 <= r.ece <= 1.0 and r.temperature > 0 for r in rows)
    assert (tmp_path / "reinhard-lab_a.npz").is_file() and len(crosslab.read_rows(tmp_path)) == 2
    table = crosslab.table(crosslab.read_rows(tmp_path))
    assert table.splitlines()[0].startswith("| method | lab_a: bal. acc. / ECE | lab_b")
    assert crosslab.best_method(crosslab.read_rows(tmp_path)) == "reinhard"
    with pytest.raises(ValueError, match="unknown method"):
        crosslab.leave_one_lab_out(base_config(two_labs), list(LABS), ["histogram"], tmp_path)
    extra = base_config(two_labs).with_overrides(extra_train=[{"task": "ball_subtype", "label_map": {"Pro": "ALL"}}])
    with pytest.raises(ValueError, match="cannot use extra_train"):
        crosslab.leave_one_lab_out(extra, list(LABS), ["reinhard"], tmp_path)


def test_a_run_trained_elsewhere_is_exported_then_registered_with_its_test_figures(two_labs, tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKO_HOME", str(tmp_path / "home"))
    config = tmp_path / "base.yaml"
    config.write_text(json.dumps(base_config(two_labs).to_dict()))
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "rows.jsonl").write_text(json.dumps({"method": "reinhard", "held_out": "lab_a",
                                                              "balanced_accuracy": 0.5, "ece": 0.1}) + "\n")
    assert main(["crosslab", "--config", str(config), "--labs", ",".join(LABS), "--table", "--out",
                 str(tmp_path / "rows"), "--then-train", str(tmp_path / "final")]) == 0
    exported = json.loads((tmp_path / "final" / "lolo-test.json").read_text())
    assert exported["config"]["datasets"] == list(LABS) and exported["best_epoch"] == 1
    assert main(["register-run", str(tmp_path / "final" / "lolo-test.json"), "--data", str(two_labs)]) == 0
    card = json.loads((tmp_path / "home" / "models" / "lolo-test.json").read_text())
    assert card["metrics"]["test"]["n"] == 16 and card["shift"]["threshold"] > 0 and card["data"]["test_sha256"]
