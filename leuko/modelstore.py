"""The model store: weights in safetensors plus a JSON model card, listing, loading by id,
a default model per task, and an integrity check.

A model is two files in a store folder: ``<id>.safetensors`` and ``<id>.json``. Stores are
searched in order: the user's ``$LEUKO_HOME/models`` (trained here), then the repository's
``models/`` (shipped). Weights are never pickles, and a weights file whose sha256 differs
from its card is refused before any tensor is read into a model.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leuko import __version__
from leuko.data import InputConfig, file_sha256
from leuko.nets import build_model
from leuko.nets.unet import UNET_ARCHS, build_unet
from leuko.paths import SHIPPED_MODELS, user_models_dir
from leuko.shift import ShiftDetector
from leuko.tasks import TASKS, get_task

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DEFAULTS_FILE = "defaults.json"
SEGMENTATION_TASK = "segmentation"


class ModelNotFoundError(LookupError):
    """No model with the requested id (or no model at all for a task)."""


class ModelIntegrityError(RuntimeError):
    """A model's files are missing, truncated, tampered with or inconsistent with its card."""


@dataclass
class ModelCard:
    """Everything needed to rebuild, trust and judge a model. Serialised as JSON.

    ``temperature`` is the calibration temperature fitted on the validation split;
    ``metrics`` holds ``{"val": {...}, "test": {...}}`` from :mod:`leuko.metrics`;
    ``training_time_s`` is wall-clock seconds; ``review_threshold`` is the calibrated
    confidence below which a prediction is marked needs-review (chosen on ``val`` for 99%
    accuracy above it).
    """

    id: str
    task: str
    classes: list[str]
    arch: str
    input: dict
    temperature: float = 1.0
    review_threshold: float | None = None
    arch_config: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training_time_s: float | None = None
    hardware: str = ""
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    pretrained_source: str = ""
    created: str = ""
    leuko_version: str = __version__
    default: bool = False
    intended_use: str = ("Decision support for trained laboratory staff reviewing peripheral blood "
                         "smear images; every result must be confirmed by a qualified person.")
    limitations: str = ("Trained on public single-centre image sets; accuracy on other microscopes, "
                        "stains and cameras is lower and must be checked locally. Not a diagnosis.")
    shift: dict = field(default_factory=dict)
    """The shift detector (:mod:`leuko.shift`) kept beside the weights: ``file``, its
    ``sha256``, the ``threshold`` and how it was fitted; empty for a model without one
    ("not measured")."""

    @property
    def input_config(self) -> InputConfig:
        return InputConfig.from_dict(self.input)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        """The card of a parsed JSON object; raises ``ValueError`` naming what is wrong when it
        is not an object, lacks a required field or has a field of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"a model card must be a JSON object, not {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        for name, value in data.items():
            expected = CARD_FIELD_TYPES.get(name)
            if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
                raise ValueError(f"card field {name!r} has the wrong type ({type(value).__name__})")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"the card lacks a field: {exc}") from None

    @classmethod
    def read(cls, path: Path) -> "ModelCard":
        """The card in the JSON file ``path``; raises ``ValueError`` (or ``OSError``) saying why
        it cannot be read."""
        return cls.from_dict(json.loads(path.read_text()))


CARD_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **{name: (str,) for name in ("id", "task", "arch", "hardware", "weights_sha256", "weights_dtype",
                                 "pretrained_source", "created", "leuko_version", "intended_use", "limitations")},
    **{name: (dict,) for name in ("input", "arch_config", "training", "data", "metrics", "shift")},
    "classes": (list,), "temperature": (int, float), "review_threshold": (int, float, type(None)),
    "training_time_s": (int, float, type(None)), "default": (bool,),
}
"""The JSON types each card field may have, so a damaged card is refused when read instead of
failing later where a field is used."""


@dataclass
class LoadedModel:
    """A model in memory with its card, and its shift detector where the card has one."""

    card: ModelCard
    network: torch.nn.Module
    shift: ShiftDetector | None = None


@dataclass
class ModelStatus:
    """An installed model as the Home page and ``models`` command list it: its card, why its
    weights are refused (``None``: they match the card) and whether it is its task's default."""

    card: ModelCard
    problem: str | None
    default: bool


def hardware_description() -> str:
    """CPU model and core count, and the GPU when CUDA is available, for the model card."""
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} CPU cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ModelStore:
    """Models across one or more store folders; the first folder is where new models go."""

    def __init__(self, folders: list[Path] | None = None) -> None:
        self.folders = [Path(f) for f in (folders or [user_models_dir(), SHIPPED_MODELS])]

    def _card_files(self) -> Iterator[tuple[Path, ModelCard | None, str | None]]:
        """Every card file of the store folders in order: (path, card, None) for a readable
        card named by its file, (path, None, why not) for any other."""
        for folder in self.folders:
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                if path.name == DEFAULTS_FILE:
                    continue
                card, why = _checked_card(path)
                if card is not None and card.task not in TASKS and card.task != SEGMENTATION_TASK:
                    card, why = None, f"the card is for an unknown task {card.task!r}"
                yield path, card, why

    def cards(self, task: str | None = None) -> list[ModelCard]:
        """All readable cards (first store wins on duplicate ids), newest first."""
        seen: dict[str, ModelCard] = {}
        for _, card, _ in self._card_files():
            if card is not None and card.id not in seen:
                seen[card.id] = card
        found = [c for c in seen.values() if task is None or c.task == task]
        return sorted(found, key=lambda c: c.created, reverse=True)

    def unreadable_cards(self) -> list[tuple[Path, str]]:
        """Card files that :meth:`cards` leaves out, with why: not JSON, fields missing or of
        the wrong type, an id other than the file's name, or a task this version does not know."""
        return [(path, why) for path, card, why in self._card_files() if card is None]

    def locate(self, model_id: str) -> tuple[ModelCard, Path]:
        """The card and folder of ``model_id``; raises :class:`ModelNotFoundError`."""
        for folder in self.folders:
            path = folder / f"{model_id}.json"
            if path.is_file():
                try:
                    return ModelCard.read(path), folder
                except (OSError, ValueError) as exc:
                    raise ModelIntegrityError(f"model card {path} is unreadable: {exc}") from exc
        known = ", ".join(c.id for c in self.cards()) or "none"
        raise ModelNotFoundError(f"no model {model_id!r} in {', '.join(map(str, self.folders))}; "
                                 f"available: {known}")

    def default_id(self, task: str) -> str:
        """The default model of a task: the user's choice (``defaults.json`` in the first store),
        else a card marked default, else the newest model of the task. ``segmentation`` is the
        task id of the segmenters."""
        if task != SEGMENTATION_TASK:
            get_task(task)
        choice_file = self.folders[0] / DEFAULTS_FILE
        if choice_file.is_file():
            try:
                chosen = json.loads(choice_file.read_text()).get(task)
            except ValueError:
                chosen = None
            if chosen and any(c.id == chosen for c in self.cards(task)):
                return chosen
        cards = self.cards(task)
        if not cards:
            raise ModelNotFoundError(f"no model for task {task!r} is installed; train one with "
                                     f"`python -m leuko train --task {task}`")
        marked = [c for c in cards if c.default]
        return (marked or cards)[0].id

    def set_default(self, task: str, model_id: str) -> None:
        """Make ``model_id`` the default for ``task`` in the first (user) store. A model whose
        weights fail their check (:meth:`verify`) is refused: no one could analyse with it."""
        card = self.verify(model_id)
        if card.task != task:
            raise ValueError(f"model {model_id!r} is for task {card.task!r}, not {task!r}")
        choice_file = self.folders[0] / DEFAULTS_FILE
        choices = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
        choices[task] = model_id
        _atomic_write(choice_file, lambda p: p.write_text(json.dumps(choices, indent=2)))

    def existing(self, model_id: str, folder: Path | None = None) -> ModelCard | None:
        """The readable card ``model_id`` already has in ``folder`` or any store folder, else ``None``."""
        for place in ([Path(folder)] if folder else []) + self.folders:
            card = _read_card(place / f"{model_id}.json")
            if card is not None:
                return card
        return None

    def check_new_id(self, model_id: str, task: str, replace: bool = False,
                     folder: Path | None = None) -> ModelCard | None:
        """Refuse ``model_id`` for a new model of ``task`` with a ``ValueError`` when it is not a
        valid id, when a model of another task has it (the new one would replace or shadow
        that one), or when a model of ``task`` has it and ``replace`` (retraining under the
        same id) was not asked for. Returns the card the id already has (:meth:`existing`)."""
        if not MODEL_ID_PATTERN.match(model_id):
            raise ValueError(f"model id {model_id!r} must be letters, digits, '.', '_' or '-'")
        card = self.existing(model_id, folder)
        if card is None:
            return None
        if card.task != task:
            raise ValueError(f"model id {model_id!r} is taken by a model of another task ({card.task}); "
                             f"choose another id for this {task} model")
        if not replace:
            raise ValueError(f"a {task} model {model_id!r} exists already; choose another id, or replace it "
                             "explicitly to retrain it under its id")
        return card

    def save(self, network: torch.nn.Module, card: ModelCard, half: bool = False,
             folder: Path | None = None) -> Path:
        """Write weights (fp16 when ``half``) and card; fills in sha256, dtype and date.

        Returns the card path. The weights are written first and the card last, each
        atomically, so a card never points at missing or partial weights. An id that a model of
        another task has is refused, so no model is replaced or shadowed by one of another task.
        A card saved over one marked default stays the default, so retraining the default
        under its id keeps it so.
        """
        self.check_new_id(card.id, card.task, replace=True, folder=folder)
        folder = Path(folder or self.folders[0])
        card_path = folder / f"{card.id}.json"
        previous = _read_card(card_path)
        card.default = card.default or (previous is not None and previous.default)
        state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in network.state_dict().items()}
        weights = folder / f"{card.id}.safetensors"
        _atomic_write(weights, lambda p: save_file(state, str(p), metadata={"id": card.id}))
        card.weights_sha256 = file_sha256(weights)
        card.weights_dtype = "float16" if half else "float32"
        card.created = card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        _atomic_write(card_path, lambda p: p.write_text(card.to_json()))
        return card_path

    def verify(self, model_id: str) -> ModelCard:
        """Check the weights file exists and its sha256 matches the card; returns the card."""
        card, folder = self.locate(model_id)
        weights = folder / f"{model_id}.safetensors"
        if not weights.is_file():
            raise ModelIntegrityError(f"weights file {weights} is missing")
        actual = file_sha256(weights)
        if actual != card.weights_sha256:
            raise ModelIntegrityError(
                f"weights file {weights} does not match its card (sha256 {actual[:12]}... "
                f"instead of {card.weights_sha256[:12]}...): it was changed or damaged; "
                "refusing to load it")
        return card

    def status(self, task: str | None = None) -> list[ModelStatus]:
        """Every installed model (of ``task``, or all), its weights checked against its card."""
        defaults: dict[str, str] = {}
        rows = []
        for card in self.cards(task):
            if card.task not in defaults:
                defaults[card.task] = self.default_id(card.task)
            try:
                self.verify(card.id)
                problem = None
            except ModelIntegrityError as exc:
                problem = str(exc)
            rows.append(ModelStatus(card, problem, defaults[card.task] == card.id))
        return rows

    def load(self, model_id: str | None = None, task: str | None = None) -> LoadedModel:
        """Verify and load a model by id (or the task's default) onto the CPU, in eval mode;
        a model of another task than ``task`` is refused with a ``ValueError``."""
        if model_id is None:
            if task is None:
                raise ValueError("give a model id or a task")
            model_id = self.default_id(task)
        card = self.verify(model_id)
        if task is not None and card.task != task:
            raise ValueError(f"model {model_id!r} is for task {card.task!r}, not {task!r}")
        _, folder = self.locate(model_id)
        try:
            state = load_file(str(folder / f"{model_id}.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise ModelIntegrityError(f"weights of {model_id!r} are unreadable: {exc}") from exc
        network = (build_unet(card.arch, len(card.classes)) if card.arch in UNET_ARCHS
                   else build_model(card.arch, len(card.classes), pretrained=None))
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelIntegrityError(f"weights of {model_id!r} do not fit architecture "
                                      f"{card.arch!r}: {exc}") from exc
        network.pretrained_source = card.pretrained_source
        return LoadedModel(card, network.eval(), self._load_shift(card, folder))

    def _load_shift(self, card: ModelCard, folder: Path) -> ShiftDetector | None:
        """The card's shift detector, its file checked against the card's sha256."""
        if not card.shift:
            return None
        path = folder / card.shift["file"]
        if not path.is_file() or file_sha256(path) != card.shift.get("sha256"):
            raise ModelIntegrityError(f"shift statistics {path} are missing or do not match the card of "
                                      f"{card.id!r}; refusing to load it")
        return ShiftDetector.load(path)

    def save_shift(self, model_id: str, detector: ShiftDetector, details: dict) -> ModelCard:
        """Write a model's shift detector beside its weights and record it in its card
        (``details``: how it was fitted); the weights are left as they are."""
        card, folder = self.locate(model_id)
        path = folder / f"{model_id}.shift.safetensors"
        _atomic_write(path, detector.save)
        card.shift = {"file": path.name, "sha256": file_sha256(path), "threshold": detector.threshold, **details}
        _atomic_write(folder / f"{model_id}.json", lambda p: p.write_text(card.to_json()))
        return card


COMPARED_METRICS = (("accuracy", "Accuracy", True), ("balanced_accuracy", "Balanced accuracy", True),
                    ("ece", "Calibration error (ECE)", False))
"""Test figures a model is compared on before it replaces its task's default: key in the
card's ``metrics["test"]``, name, and whether higher is better."""


@dataclass
class DefaultComparison:
    """A model beside its task's default on their test splits. ``refusal`` says why it may not
    be made the default from its evaluation (the test sets differ or it is smaller: the
    figures cannot be compared), ``worse`` names the figures on which it is worse than the
    default (making it the default then needs an explicit confirmation). ``default`` is
    ``None`` when the model is the default itself."""

    model: ModelCard
    default: ModelCard | None
    refusal: str | None = None
    worse: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One row per compared figure: its name, this model's and the default's value."""
        mine = self.model.metrics.get("test") or {}
        theirs = (self.default.metrics.get("test") or {}) if self.default else {}
        return [{"figure": name, self.model.id: mine.get(key), **({self.default.id: theirs.get(key)}
                                                                   if self.default else {})}
                for key, name, _ in [("n", "Test images", True), *COMPARED_METRICS]]


def _test_set(card: ModelCard) -> dict:
    """What identifies the test split a card's figures come from: the digest of its images and
    labels (``data.test_sha256``, recorded since 2026-12-04), the datasets kept and the images
    per class in ``test``."""
    return {"digest": card.data.get("test_sha256"), "datasets": card.data.get("datasets"),
            "test": (card.data.get("split_sizes") or {}).get("test")}


def _test_set_refusal(model: ModelCard, default: ModelCard) -> str | None:
    """Why ``model``'s test figures cannot be set beside ``default``'s, or ``None``."""
    mine, theirs = model.metrics.get("test") or {}, default.metrics.get("test") or {}
    if "n" not in mine or "n" not in theirs:
        missing = model.id if "n" not in mine else default.id
        return f"{missing} has no test figures to compare with"
    if mine["n"] < theirs["n"]:
        return (f"its test set is smaller than the default's ({mine['n']} images against {theirs['n']} for "
                f"{default.id}), so its figures are less certain")
    ours, other = _test_set(model), _test_set(default)
    if ours["digest"] and other["digest"]:
        differences = ([f"test images {ours['digest'][:12]} against {other['digest'][:12]}"]
                       if ours["digest"] != other["digest"] else [])
    else:
        differences = [f"{what} {ours[key]} against {other[key]}" for key, what in
                       (("datasets", "datasets"), ("test", "test images per class")) if ours[key] != other[key]]
    if differences:
        return (f"its test set is not the default's ({'; '.join(differences)}), so their figures cannot be "
                f"compared: evaluate both on the same split (python -m leuko evaluate) or choose the default "
                f"on the Models page")
    return None


def compare_with_default(store: ModelStore, model_id: str) -> DefaultComparison:
    """``model_id`` beside its task's current default (:class:`DefaultComparison`), from their
    cards' test figures. Raises :class:`ModelNotFoundError` or :class:`ModelIntegrityError`
    when the model's card cannot be read."""
    model, _ = store.locate(model_id)
    default_id = store.default_id(model.task)
    if default_id == model.id:
        return DefaultComparison(model, None)
    default, _ = store.locate(default_id)
    refusal = _test_set_refusal(model, default)
    mine, theirs = model.metrics.get("test") or {}, default.metrics.get("test") or {}
    worse = [name for key, name, higher in COMPARED_METRICS
             if mine.get(key) is not None and theirs.get(key) is not None
             and (mine[key] < theirs[key] if higher else mine[key] > theirs[key])]
    return DefaultComparison(model, default, refusal, worse)


def _checked_card(path: Path) -> tuple[ModelCard | None, str | None]:
    """(the card at ``path``, None) when it is readable and names itself by the file's stem,
    else (None, why not)."""
    try:
        card = ModelCard.read(path)
    except (OSError, ValueError) as exc:
        return None, f"the card cannot be read ({exc})"
    if card.id != path.stem:
        return None, f"the card names model {card.id!r}, not {path.stem!r}"
    return card, None


def _read_card(path: Path) -> ModelCard | None:
    """The card at ``path`` if it exists, is readable and names itself by the file's stem."""
    return _checked_card(path)[0]
