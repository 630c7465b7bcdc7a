import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuko.bench import sample_field
from leuko.cli import main
from tests.conftest import write_class_folder


@pytest.fixture(scope="module")
def trained(binary_folder, tmp_path_factory):
    """One model trained through the CLI on synthetic images, in its own LEUKO_HOME."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LEUKO_HOME", str(home))
    code = main(["train", "--task", "all_binary", "--arch", "seed004_squeezenet", "--folder", str(binary_folder),
                 "--pretrained", "none", "--input-size", "48", "--epochs", "3", "--batch-size", "8",
                 "--lr", "0.003", "--workers", "0", "--model-id", "cli-model", "--out-dir", str(home / "runs")])
    assert code == 0
    yield home
    mp.undo()


def test_train_registers_a_card_with_test_metrics(trained):
    card = json.loads((trained / "models" / "cli-model.json").read_text())
    assert card["task"] == "all_binary" and card["classes"] == ["ALL", "normal"]
    test = card["metrics"]["test"]
    assert test["n"] == 16 and {"accuracy", "mcc", "roc_auc", "ece", "sensitivity"} <= set(test)
    assert card["data"]["split_sizes"]["train"] == {"ALL": 24, "normal": 24}
    assert card["temperature"] > 0 and card["training_time_s"] > 0 and card["weights_dtype"] == "float16"
    assert card["training"]["history"] and card["input"]["input_size"] == 48


def test_predict_prints_the_csv_contract_and_skips_unreadable_files(trained, binary_folder, tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    env = {"LEUKO_HOME": str(trained), "PATH": "/usr/bin:/bin"}
    folder = binary_folder / "test" / "ALL"
    run = subprocess.run([sys.executable, "-m", "leuko", "predict", "--task", "all_binary", "--model", "cli-model",
                          str(folder), str(tmp_path / "broken.png")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert list(rows[0]) == ["path", "label", "confidence", "needs_review", "p_ALL", "p_normal",
                             "shift_score", "unfamiliar", "cell", "x", "y", "width", "height", "error",
                             "not_applicable"]
    unread = rows.pop()
    assert unread["path"].endswith("broken.png") and "not an image" in unread["error"]
    assert unread["label"] == unread["confidence"] == unread["p_ALL"] == ""
    assert len(rows) == 8 and all(row["cell"] == row["width"] == row["error"] == "" for row in rows)
    from leuko.predict import REVIEW_CONFIDENCE
    threshold = json.loads((trained / "models" / "cli-model.json").read_text())["review_threshold"] or REVIEW_CONFIDENCE
    clear = [row for row in rows if abs(float(row["confidence"]) - threshold) > 1e-5]
    assert clear and all(row["needs_review"] == str(float(row["confidence"]) < threshold or row["unfamiliar"] == "True"
                                                     or row["not_applicable"] != "") for row in clear)
    shift = json.loads((trained / "models" / "cli-model.json").read_text())["shift"]
    for row in rows:
        assert float(row["shift_score"]) > 0 and row["unfamiliar"] == str(float(row["shift_score"]) > shift["threshold"])
        assert abs(float(row["p_ALL"]) + float(row["p_normal"]) - 1.0) < 1e-5
        assert row["label"] in ("ALL", "normal")
        assert float(row["confidence"]) == max(float(row["p_ALL"]), float(row["p_normal"]))
    assert "broken.png" in run.stderr and "not an image" in run.stderr
    only_bad = subprocess.run([sys.executable, "-m", "leuko", "predict", "--task", "all_binary", "--model", "cli-model",
                               str(tmp_path / "broken.png")], capture_output=True, text=True, env=env)
    assert only_bad.returncode != 0


def test_predict_classifies_every_leukocyte_of_a_field_image(trained, tmp_path, monkeypatch, capsys):
    """A field used to be shrunk whole to the network's input and given one label."""
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    Image.fromarray(sample_field(cells=3)).save(tmp_path / "field.png")
    Image.fromarray(np.full((700, 900, 3), (236, 214, 220), np.uint8)).save(tmp_path / "empty.png")
    out = tmp_path / "out.csv"
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(out),
                 str(tmp_path / "field.png"), str(tmp_path / "empty.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    empty = rows.pop()
    assert empty["path"].endswith("empty.png") and empty["error"] == "no leukocyte found" and empty["label"] == ""
    assert [row["cell"] for row in rows] == ["1", "2", "3"] and all(row["path"].endswith("field.png") for row in rows)
    centres = sorted((int(row["x"]) + int(row["width"]) / 2, int(row["y"]) + int(row["height"]) / 2) for row in rows)
    assert all(abs(x - (150 + k * 340)) < 40 and abs(y - 350) < 40 for k, (x, y) in enumerate(centres))
    assert "empty.png: no leukocyte found" in capsys.readouterr().err
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--kind", "crop", "--csv", str(out),
                 str(tmp_path / "field.png")]) == 0
    assert [row["cell"] for row in csv.DictReader(out.open())] == [""]


def test_each_field_row_is_the_prediction_of_its_own_cell(trained, tmp_path, monkeypatch):
    from leuko.predict import Predictor
    from leuko.segment import classical_segment

    monkeypatch.setenv("LEUKO_HOME", str(trained))
    monkeypatch.setattr("leuko.segment.make_segmenter", lambda *args, **kwargs: classical_segment)
    Image.fromarray(sample_field(cells=4)).save(tmp_path / "field.png")
    Image.fromarray(sample_field(cells=4)).save(tmp_path / "copy.png")
    Image.fromarray(sample_field(cells=0)).save(tmp_path / "empty.png")
    out = tmp_path / "out.csv"
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(out),
                 str(tmp_path / "empty.png"), str(tmp_path / "field.png"), str(tmp_path / "copy.png"),
                 str(tmp_path / "field.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows.pop(0)["error"] == "no leukocyte found"
    field = np.asarray(Image.open(tmp_path / "field.png"))
    crops = [field[int(r["y"]):int(r["y"]) + int(r["height"]), int(r["x"]):int(r["x"]) + int(r["width"])] for r in rows]
    alone = Predictor("cli-model").predict(crops)
    assert len(rows) == 8 and [r["cell"] for r in rows] == ["1", "2", "3", "4"] * 2
    assert all(abs(float(r["p_ALL"]) - p.probabilities[0]) < 1e-5 for r, p in zip(rows, alone))
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(out),
                 str(tmp_path / "empty.png")]) == 0


def test_a_damaged_segmenter_skips_fields_and_keeps_the_crops(trained, binary_folder, tmp_path, monkeypatch, capsys):
    from leuko.modelstore import ModelIntegrityError

    def damaged(*args, **kwargs):
        raise ModelIntegrityError("weights of 'segmentation-unet_lite0' do not match their checksum")

    monkeypatch.setenv("LEUKO_HOME", str(trained))
    monkeypatch.setattr("leuko.segment.make_segmenter", damaged)
    Image.fromarray(sample_field(cells=2)).save(tmp_path / "field.png")
    out = tmp_path / "out.csv"
    crops = sorted((binary_folder / "test" / "ALL").iterdir())[:3]
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(out),
                 *map(str, crops), str(tmp_path / "field.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(row["label"] and not row["error"] for row in rows[:3])
    assert rows[3]["path"].endswith("field.png") and "needs the segmenter" in rows[3]["error"]
    assert "field.png: a field of view needs the segmenter" in capsys.readouterr().err


def test_predict_writes_a_csv_file_with_the_default_model(trained, binary_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    out = tmp_path / "out.csv"
    assert main(["predict", "--task", "all_binary", "--csv", str(out), str(binary_folder / "val")]) == 0
    assert len(out.read_text().splitlines()) == 1 + 16


def test_evaluate_and_models_commands(trained, binary_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    folder = write_class_folder(tmp_path / "eval", ["ALL", "normal"], 4)
    assert main(["evaluate", "--model", "cli-model", "--folder", str(folder), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "sensitivity" in printed
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["metrics"]["n"] == 8
    assert (tmp_path / "report" / "roc.png").stat().st_size > 1000
    assert main(["models", "--check"]) == 0
    assert "cli-model" in capsys.readouterr().out


def test_errors_are_one_clear_line_with_exit_code_2(trained, monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    assert main(["predict", "--task", "wbc_type", "--model", "absent", "x.png"]) == 2
    assert "no model 'absent'" in capsys.readouterr().err
    weights = trained / "models" / "cli-model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"tampered")
    try:
        assert main(["predict", "--task", "all_binary", "--model", "cli-model", "x.png"]) == 2
        assert "does not match its card" in capsys.readouterr().err
        assert main(["models", "--check"]) == 1
    finally:
        weights.write_bytes(original)
    assert main(["bench", "--backend", "tensorrt", "--skip-training"]) == 2
    assert "backend must be one of auto, torch, openvino, onnx" in capsys.readouterr().err


@pytest.mark.parametrize("backend, devices", [("openvino", ["cpu"]), ("onnx", ["cpu"]),
                                              ("torch", ["cpu", "cuda"]), ("auto", ["cpu", "cuda"])])
def test_bench_on_a_cuda_machine_skips_cuda_for_cpu_only_runtimes(monkeypatch, backend, devices):
    """``bench --backend openvino`` on a machine with CUDA measures the CPU alone instead of
    failing at the CUDA pass, which those runtimes cannot serve."""
    import torch

    import leuko.bench
    import leuko.onnx_backend

    benched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(leuko.onnx_backend, "runtime_installed", lambda runtime: True)
    monkeypatch.setattr("leuko.device.pick_device", lambda device=None: torch.device("cpu"))
    monkeypatch.setattr(leuko.bench, "run_benchmarks", lambda device, repeats, backend: benched.append(device) or [])
    monkeypatch.setattr(leuko.bench, "store_benchmarks", lambda: [])
    assert main(["bench", "--backend", backend, "--skip-training"]) == 0
    assert benched == devices


@pytest.mark.parametrize("arch, port", [("seed004_squeezenet", 29533), ("fusion_lite0", 29534)])
def test_torchrun_trains_with_distributed_data_parallel_on_the_cpu(binary_folder, tmp_path, arch, port):
    """Two gloo processes train one model; only rank 0 registers it. The fusion network
    keeps its image head's unused classifier, which DDP must be told about (it stopped at
    the second step)."""
    env = {"LEUKO_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "leuko", "train", "--task", "all_binary", "--arch", arch,
                          "--folder", str(binary_folder), "--pretrained", "none", "--input-size", "48",
                          "--epochs", "1", "--batch-size", "8", "--workers", "0", "--model-id", "ddp",
                          "--out-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["ddp.json", "ddp.safetensors", "ddp.shift.safetensors"]
    assert run.stdout.count("registered model ddp") == 1


def test_explain_offers_every_cam_method_and_colour_map_the_core_has():
    """The parser names the methods without importing pytorch-grad-cam at start-up; this keeps
    its list and the core's the same."""
    from leuko.cli import build_parser
    from leuko.explain import CAM_METHODS, COLORMAPS

    explain = build_parser()._subparsers._group_actions[0].choices["explain"]
    choices = {action.dest: action.choices for action in explain._actions}
    assert list(choices["method"]) == list(CAM_METHODS) and list(choices["colormap"]) == list(COLORMAPS)


@pytest.mark.parametrize("command", ["predict", "explain", "segment"])
def test_the_kind_help_gives_the_field_size_the_code_uses(command, capsys):
    from leuko.segment import FIELD_MIN_SIDE

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"is {FIELD_MIN_SIDE} px or more" in " ".join(capsys.readouterr().out.split())


def test_predict_never_writes_over_an_input_and_accounts_for_blank_or_tiny_images(trained, binary_folder, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    crop = tmp_path / "cell.png"
    crop.write_bytes(next((binary_folder / "test" / "ALL").iterdir()).read_bytes())
    original = crop.read_bytes()
    for target in (crop, tmp_path / "other.png"):
        assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(target), str(tmp_path)]) == 2
        assert "is an image file or one of the inputs" in capsys.readouterr().err
    assert crop.read_bytes() == original and not (tmp_path / "other.png").exists()
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(tmp_path), str(crop)]) == 2
    assert "Is a directory" in capsys.readouterr().err

    Image.new("RGB", (160, 160), (250, 250, 250)).save(tmp_path / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), np.uint8)).save(tmp_path / "tiny.png")
    out = tmp_path / "out.csv"
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(out), str(tmp_path)]) == 0
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert rows["cell.png"]["label"] and not rows["cell.png"]["error"]
    assert rows["blank.png"]["label"] == "" and "blank" in rows["blank.png"]["error"]
    assert rows["tiny.png"]["label"] == "" and "too small" in rows["tiny.png"]["error"]


def test_a_later_run_over_a_folder_skips_the_outputs_of_earlier_runs_in_it(trained, binary_folder, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    for path in sorted((binary_folder / "test" / "ALL").iterdir())[:2]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert main(["explain", "--task", "all_binary", "--model", "cli-model", "--out-dir", str(tmp_path / "cams"),
                 str(tmp_path)]) == 0
    assert main(["segment", "--method", "classical", "--out-dir", str(tmp_path / "segmentation"), str(tmp_path)]) == 0
    assert main(["explain", "--task", "all_binary", "--model", "cli-model", "--out-dir", str(tmp_path / "cams"),
                 str(tmp_path)]) == 0
    assert len(list((tmp_path / "cams").glob("*.png"))) == 2
    out = tmp_path / "out.csv"
    assert main(["predict", "--task", "all_binary", "--model", "cli-model", "--csv", str(out), str(tmp_path)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 2


def test_segment_keeps_earlier_results_when_nothing_was_read_and_refuses_a_bad_pixel_size(binary_folder, tmp_path,
                                                                                          capsys):
    out = tmp_path / "segmentation"
    assert main(["segment", "--method", "classical", "--out-dir", str(out), str(binary_folder / "test" / "ALL")]) == 0
    table = (out / "morphometrics.csv").read_text()
    assert len(table.splitlines()) > 1 and table.startswith("path,mask_file,cell,kind,x,y,width,height")
    assert main(["segment", "--method", "classical", "--out-dir", str(out), str(tmp_path / "typo")]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert (out / "morphometrics.csv").read_text() == table
    for size in ("-0.5", "0", "inf", "nan", "abc"):
        with pytest.raises(SystemExit):
            main(["segment", "--pixel-size", size, str(binary_folder)])
        assert "is not a positive number" in capsys.readouterr().err


def test_models_reports_damaged_cards_and_the_default_in_effect(trained, monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(trained))
    from leuko.modelstore import ModelStore

    ModelStore().set_default("all_binary", "cli-model")
    listed = json.loads((main(["models", "--json", "--task", "all_binary"]), capsys.readouterr().out)[1])
    assert [m["id"] for m in listed if m["default"]] == ["cli-model"] and len(listed) > 1
    broken = trained / "models" / "garbage.json"
    broken.write_text("{not json")
    try:
        assert main(["models", "--check"]) == 1
        assert f"BROKEN card {broken}" in capsys.readouterr().out
    finally:
        broken.unlink()
        (trained / "models" / "defaults.json").unlink()
    assert main(["models", "--check"]) == 0


def test_evaluate_segmentation_names_a_split_without_masks(shared_data, capsys):
    assert main(["evaluate-segmentation", "--method", "classical", "--split", "tset", "--data", str(shared_data)]) == 2
    assert "no images with masks in split 'tset'" in capsys.readouterr().err


def test_predict_with_the_simulated_fusion_model_says_its_clinical_branch_is_simulated(binary_folder, leuko_home,
                                                                                      capsys):
    crop = next((binary_folder / "test" / "ALL").iterdir())
    assert main(["predict", "--task", "all_binary", "--model", "all_binary-fusion_lite0-simulated", str(crop)]) == 0
    assert "SIMULATED blood counts" in capsys.readouterr().err
    assert main(["predict", "--task", "all_binary", str(crop)]) == 0
    assert "SIMULATED" not in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly(leuko_home):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    run = subprocess.Popen([sys.executable, "-m", "leuko", "models", "--task", "all_binary"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
    run.stdout.close()
    assert run.wait(timeout=120) == 0
    assert b"BrokenPipe" not in run.stderr.read()


def test_an_output_folder_holding_the_inputs_and_a_csv_link_to_an_image_are_refused(binary_folder, tmp_path, capsys):
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "cell.png").write_bytes(next((binary_folder / "test" / "ALL").iterdir()).read_bytes())
    for out_dir in (crops, tmp_path):
        assert main(["segment", "--method", "classical", "--out-dir", str(out_dir), str(crops)]) == 2
        assert "holds the input" in capsys.readouterr().err
    assert not (crops / ".leuko-output").exists() and not (tmp_path / ".leuko-output").exists()
    link = tmp_path / "results.csv"
    link.symlink_to(crops / "cell.png")
    original = (crops / "cell.png").read_bytes()
    assert main(["predict", "--task", "all_binary", "--csv", str(link), str(binary_folder / "val")]) == 2
    assert (crops / "cell.png").read_bytes() == original


def test_predict_reads_a_field_as_the_analyze_page_does(tmp_path, capsys):
    from leuko.analysis import AnalysisSettings, Analyzer

    field = tmp_path / "field.png"
    Image.fromarray(sample_field(cells=3)).save(field)
    assert main(["predict", "--task", "wbc_type", str(field)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    with Analyzer(AnalysisSettings("wbc_type")) as analyzer:
        analysed = analyzer.analyze(field, "field.png")
    assert analysed.estimated_pixel_size_um is not None
    assert [(int(r["cell"]), r["label"]) for r in rows] == [(c.index, c.prediction.label) for c in analysed.cells]
    shift = [float(r["shift_score"]) for r in rows]
    assert shift == pytest.approx([c.prediction.shift_score for c in analysed.cells], abs=1e-3)
