import numpy as np
import pytest
import torch
from scipy.special import softmax

from leuko.data import InputConfig
from leuko.device import DeviceError, pick_device
from leuko.images import ImageError
from leuko.modelstore import ModelCard, ModelStore
from leuko.nets import build_model
from leuko.onnx_backend import OnnxExportError, OnnxNetwork
from leuko.predict import LogitsAndFeatures, Predictor
from tests.conftest import synthetic_cell


@pytest.fixture
def store(tmp_path):
    store = ModelStore([tmp_path])
    network = build_model("seed004_squeezenet", 5)
    card = ModelCard(id="wbc", task="wbc_type", classes=["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
                     arch="seed004_squeezenet", input=InputConfig(input_size=64).to_dict(), temperature=2.0)
    store.save(network, card)
    return store


def test_predictions_are_calibrated_probabilities_and_deterministic(store):
    predictor = Predictor("wbc", store=store, device="cpu")
    images = [synthetic_cell(k, 48, seed=k) for k in range(3)]
    first, second = predictor.predict(images), predictor.predict(images[::-1])[::-1]
    for a, b in zip(first, second):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-6)
        assert a.probabilities.sum() == pytest.approx(1.0)
        assert a.label in predictor.classes and a.confidence == a.probabilities.max()
    assert set(first[0].as_dict()) == set(predictor.classes)


def test_batches_run_two_at_a_time_keep_their_order_and_results(store):
    predictor = Predictor("wbc", store=store, device="cpu")
    images = [synthetic_cell(k % 5, 48, seed=k) for k in range(11)]
    together = predictor.predict(images, batch_size=3)
    alone = [predictor.predict_one(image) for image in images]
    assert [p.label for p in together] == [p.label for p in alone]
    assert all(np.allclose(a.probabilities, b.probabilities, atol=1e-6) for a, b in zip(together, alone))
    with pytest.raises(ImageError):
        predictor.predict(images[:7] + [b"not an image"], batch_size=3)


def test_probabilities_are_the_softmax_of_the_logits_divided_by_the_card_temperature(store):
    predictor = Predictor("wbc", store=store)
    batch = predictor.tensors([synthetic_cell(k, 48, seed=k) for k in range(3)])
    logits = predictor.logits(batch).numpy()
    assert np.allclose(predictor.probabilities(batch), softmax(logits / 2.0, axis=1), atol=1e-6)
    assert (predictor.probabilities(batch).max(axis=1) < softmax(logits, axis=1).max(axis=1)).all()


def test_tta_averages_over_rotations(store):
    plain = Predictor("wbc", store=store).predict_one(synthetic_cell(1, 48))
    tta = Predictor("wbc", store=store, tta=True).predict_one(synthetic_cell(1, 48))
    assert tta.probabilities.sum() == pytest.approx(1.0)
    assert not np.allclose(plain.probabilities, tta.probabilities)


def test_task_mismatch_bad_image_and_missing_gpu_are_clear(store, monkeypatch):
    with pytest.raises(ValueError, match="not 'all_binary'"):
        Predictor("wbc", task="all_binary", store=store)
    with pytest.raises(ImageError):
        Predictor("wbc", store=store).predict([b"not an image"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device(None).type == "cpu"
    with pytest.raises(DeviceError):
        pick_device("tpu")


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_exported_runtimes_agree_with_pytorch(store, backend):
    images = [synthetic_cell(k % 5, 48, seed=k) for k in range(20)]
    exported = Predictor("wbc", store=store, backend=backend)
    torch_only = Predictor("wbc", store=store, backend="torch")
    assert exported.onnx.runtime == backend and torch_only.onnx is None
    for a, b in zip(exported.predict(images, batch_size=4), torch_only.predict(images)):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be"):
        Predictor("wbc", store=store, backend="tensorrt")


def test_auto_backend_prefers_openvino_then_onnx_runtime_then_pytorch(store, monkeypatch):
    assert Predictor("wbc", store=store).onnx.runtime_name == "OpenVINO"
    monkeypatch.setattr("leuko.onnx_backend.runtime_installed", lambda runtime: runtime == "onnx")
    assert Predictor("wbc", store=store).onnx.runtime_name == "ONNX Runtime"
    with pytest.raises(ValueError, match="needs the openvino package"):
        Predictor("wbc", store=store, backend="openvino")
    monkeypatch.setattr("leuko.onnx_backend.runtime_installed", lambda runtime: False)
    assert Predictor("wbc", store=store).onnx is None


class BatchBakedIn(torch.nn.Module):
    """Scales by the batch size as a Python number, which tracing freezes at the example's 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * float(x.shape[0])


@pytest.mark.parametrize("runtime", ["openvino", "onnx"])
def test_an_export_that_does_not_reproduce_its_network_is_caught(runtime):
    with pytest.raises(OnnxExportError, match="differs from it"):
        OnnxNetwork(BatchBakedIn(), 8, runtime)
    with pytest.raises(OnnxExportError, match="could not be exported"):
        OnnxNetwork(torch.nn.Conv2d(3, 4, 3), 8, runtime, output_names=("logits", "features"))
    with pytest.raises(OnnxExportError, match="2 output"):
        OnnxNetwork(LogitsAndFeatures(build_model("seed004_squeezenet", 2)), 32, runtime)


def test_networks_exported_from_two_threads_at_once_both_leave_pytorch():
    """The app loads models in several script threads; concurrent exports used to fail with
    "GLOBALS.in_onnx_export must be False" and silently left the model on PyTorch."""
    import threading

    exported, failed = [], []

    def export() -> None:
        try:
            exported.append(OnnxNetwork(build_model("efficientnet_lite0", 2).eval(), 64, "openvino"))
        except OnnxExportError as exc:
            failed.append(str(exc))

    threads = [threading.Thread(target=export) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == [] and len(exported) == 3


def test_a_model_whose_onnx_export_is_wrong_stays_on_pytorch(store, monkeypatch, caplog):
    def differs(self, *args):
        raise OnnxExportError("the ONNX export of LeukoNet differs from it by 0.2 on output 'logits'")

    monkeypatch.setattr(OnnxNetwork, "_check_against", differs)
    with caplog.at_level("WARNING", logger="leuko.onnx_backend"):
        predictor = Predictor("wbc", store=store)
    assert predictor.onnx is None and "running on PyTorch" in caplog.text
    assert predictor.predict([synthetic_cell(0, 48)])[0].probabilities.sum() == pytest.approx(1.0)
    for backend in ("openvino", "onnx"):
        with pytest.raises(ValueError, match="cannot serve this model"):
            Predictor("wbc", store=store, backend=backend)


def test_onnx_backend_is_refused_for_fusion_models(tmp_path):
    store = ModelStore([tmp_path])
    card = ModelCard(id="fused", task="all_binary", classes=["ALL", "normal"], arch="fusion_lite0",
                     input=InputConfig(input_size=64).to_dict())
    store.save(build_model("fusion_lite0", 2), card)
    assert Predictor("fused", store=store).onnx is None
    for backend in ("openvino", "onnx"):
        with pytest.raises(ValueError, match="image-only"):
            Predictor("fused", store=store, backend=backend)
