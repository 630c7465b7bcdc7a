import json

import pytest
import torch

from leuko.data import InputConfig
from leuko.modelstore import ModelCard, ModelIntegrityError, ModelNotFoundError, ModelStore
from leuko.nets import build_model


def _save(store: ModelStore, model_id: str, task: str = "all_binary", half: bool = False, **card_fields):
    network = build_model("seed004_squeezenet", 2 if task == "all_binary" else 5)
    card = ModelCard(id=model_id, task=task, classes=["ALL", "normal"], arch="seed004_squeezenet",
                     input=InputConfig(input_size=48).to_dict(), temperature=1.7, **card_fields)
    store.save(network, card, half=half)
    return network


def test_round_trip_keeps_weights_card_and_temperature(tmp_path):
    store = ModelStore([tmp_path])
    network = _save(store, "m1")
    loaded = store.load("m1")
    assert loaded.card.temperature == 1.7 and loaded.card.input_config.input_size == 48
    assert len(loaded.card.weights_sha256) == 64 and loaded.card.created
    for a, b in zip(network.state_dict().values(), loaded.network.state_dict().values()):
        assert torch.equal(a, b)
    assert not loaded.network.training


def test_half_precision_weights_load_as_float32(tmp_path):
    store = ModelStore([tmp_path])
    network = _save(store, "h", half=True)
    loaded = store.load("h")
    assert loaded.card.weights_dtype == "float16"
    weight = next(loaded.network.parameters())
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, next(network.parameters()), atol=1e-3)


def test_tampered_or_truncated_weights_are_refused(tmp_path):
    store = ModelStore([tmp_path])
    _save(store, "m2")
    weights = tmp_path / "m2.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match its card"):
        store.load("m2")
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(ModelIntegrityError):
        store.load("m2")
    weights.unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        store.load("m2")


def test_missing_model_and_default_resolution(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    store = ModelStore([user, shipped])
    with pytest.raises(ModelNotFoundError, match="train one"):
        store.default_id("all_binary")
    _save(ModelStore([shipped]), "shipped-default", default=True)
    _save(ModelStore([shipped]), "shipped-other")
    assert store.default_id("all_binary") == "shipped-default"
    store.set_default("all_binary", "shipped-other")
    assert store.default_id("all_binary") == "shipped-other"
    assert json.loads((user / "defaults.json").read_text()) == {"all_binary": "shipped-other"}
    with pytest.raises(ModelNotFoundError, match="available: "):
        store.load("nope")
    with pytest.raises(ValueError, match="not 'wbc_type'"):
        store.set_default("wbc_type", "shipped-other")


def test_invalid_ids_and_unreadable_cards(tmp_path):
    store = ModelStore([tmp_path])
    with pytest.raises(ValueError, match="model id"):
        _save(store, "../escape")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "listed.json").write_text("[1, 2]")
    _save(store, "kept")
    future = json.loads((tmp_path / "kept.json").read_text())
    (tmp_path / "future.json").write_text(json.dumps({**future, "id": "future", "task": "aml_subtype"}))
    (tmp_path / "renamed.json").write_text(json.dumps(future))
    (tmp_path / "hot.json").write_text(json.dumps({**future, "id": "hot", "temperature": "hot"}))
    assert [c.id for c in store.cards()] == ["kept"] and store.status()[0].card.id == "kept"
    reasons = {path.name: why for path, why in store.unreadable_cards()}
    assert sorted(reasons) == ["broken.json", "future.json", "hot.json", "listed.json", "renamed.json"]
    assert reasons["hot.json"] == "the card cannot be read (card field 'temperature' has the wrong type (str))"
    assert "must be a JSON object, not list" in reasons["listed.json"]
    assert reasons["future.json"] == "the card is for an unknown task 'aml_subtype'"
    assert reasons["renamed.json"] == "the card names model 'kept', not 'renamed'"
    assert reasons["broken.json"].startswith("the card cannot be read")
    for unreadable in ("broken", "listed", "hot"):
        with pytest.raises(ModelIntegrityError, match="unreadable"):
            store.load(unreadable)


def test_each_task_has_exactly_one_shipped_model_marked_default():
    from leuko.paths import SHIPPED_MODELS

    store = ModelStore([SHIPPED_MODELS])
    for task in ("all_binary", "ball_subtype", "wbc_type", "segmentation"):
        marked = [card.id for card in store.cards(task) if card.default]
        assert len(marked) == 1 and store.default_id(task) == marked[0]
    assert store.default_id("wbc_type") == "wbc_type-lite0"


def test_retraining_the_default_under_its_id_keeps_it_the_default(tmp_path):
    store = ModelStore([tmp_path])
    _save(store, "shipped-default", default=True)
    _save(store, "alternative")
    _save(store, "shipped-default")
    assert store.locate("shipped-default")[0].default
    assert store.default_id("all_binary") == "shipped-default"


def test_an_id_of_another_tasks_model_is_refused_even_in_another_store_folder(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    _save(ModelStore([shipped]), "wbc_type-lite0", task="wbc_type", default=True)
    store = ModelStore([user, shipped])
    with pytest.raises(ValueError, match=r"another task \(wbc_type\)"):
        _save(store, "wbc_type-lite0", task="ball_subtype")
    assert not user.exists() and store.locate("wbc_type-lite0")[0].task == "wbc_type"
    assert store.default_id("wbc_type") == "wbc_type-lite0"


def test_a_taken_id_needs_an_explicit_replace_for_the_same_task(tmp_path):
    store = ModelStore([tmp_path / "user", tmp_path / "shipped"])
    _save(ModelStore([tmp_path / "shipped"]), "mine")
    store.check_new_id("new-one", "all_binary")
    with pytest.raises(ValueError, match="exists already"):
        store.check_new_id("mine", "all_binary")
    store.check_new_id("mine", "all_binary", replace=True)
    with pytest.raises(ValueError, match=r"another task \(all_binary\)"):
        store.check_new_id("mine", "wbc_type", replace=True)
    with pytest.raises(ValueError, match="model id"):
        store.check_new_id("../escape", "all_binary", replace=True)
    assert store.existing("mine").task == "all_binary" and store.existing("new-one") is None
