"""Benchmarks: latency and throughput of the pipeline, each beside a naive reference measured
in the same run and beside the model's compute-bound limit.

The machines are shared and absolute times drift, so every figure is read as a ratio to a
reference measured moments before in the same process.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import functional as TF

from leuko.analysis import AnalysisSettings, Analyzer
from leuko.data import CentreView
from leuko.device import pick_device
from leuko.explain import Explainer
from leuko.modelstore import ModelNotFoundError
from leuko.morphometrics import measure_cell
from leuko.predict import Predictor
from leuko.segment import (BACKGROUND, CYTOPLASM, NUCLEUS, LearnedSegmenter, keep_central_cell, make_segmenter,
                           segment_image)
from leuko.tasks import TASKS


@dataclass
class BenchRow:
    """One measured figure: ``value`` in ``unit`` for leuko and for the naive reference."""

    name: str
    unit: str
    value: float
    reference: float | None = None
    bound: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.reference is None:
            return None
        return self.reference / self.value if self.unit == "ms" else self.value / self.reference


def _milliseconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return 1000 * (time.perf_counter() - start)


def timed(function: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock milliseconds of ``function`` over ``repeats`` calls after warm-up."""
    for _ in range(warmup):
        function()
    return statistics.median(_milliseconds(function) for _ in range(repeats))


def timed_pair(function: Callable[[], object], reference: Callable[[], object], repeats: int = 20,
               warmup: int = 3) -> tuple[float, float]:
    """Median wall-clock milliseconds of ``function`` and of ``reference``, called in turn, so
    that the shared host's drift during the run (other tenants, clock changes) falls on both
    alike instead of on whichever block of calls it happened to meet."""
    for _ in range(warmup):
        function()
        reference()
    pairs = [(_milliseconds(function), _milliseconds(reference)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def matmul_flops_per_second(device: torch.device, size: int = 1024, repeats: int = 10) -> float:
    """Measured float32 matrix-multiply throughput (FLOP/s): the machine's compute ceiling."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    milliseconds = timed(lambda: torch.mm(a, b), repeats)
    return 2 * size ** 3 / (milliseconds / 1000)


def model_flops(network: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward-pass FLOPs of one image (PyTorch's FLOP counter: convolutions and matmuls)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.randn(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


class NaiveClassifier:
    """The straightforward reference: a plain timm/torch forward per image under ``no_grad``,
    PIL resizing and normalisation, no batching, a new CAM object on every explanation."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.network = copy.deepcopy(predictor.network).to(memory_format=torch.contiguous_format)
        config = predictor.input_config
        self.size, self.mean, self.std = config.input_size, list(config.mean), list(config.std)
        self.view = CentreView(config.view_zoom)

    def tensor(self, image: Image.Image) -> torch.Tensor:
        resized = self.view(image).resize((self.size, self.size), Image.BICUBIC)
        return TF.normalize(TF.to_tensor(resized), self.mean, self.std)[None].to(self.predictor.device)

    def predict(self, image: Image.Image) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.network(self.tensor(image)), 1).cpu().numpy()

    def explain(self, image: Image.Image) -> np.ndarray:
        from pytorch_grad_cam import GradCAM

        from leuko.nets import get_arch, resolve_target_layer

        for parameter in self.network.parameters():
            parameter.requires_grad_(True)
        layer = resolve_target_layer(self.network, get_arch(self.network.arch).target_layer)
        with GradCAM(model=self.network, target_layers=[layer]) as cam:
            return cam(input_tensor=self.tensor(image), targets=None)


class NaiveSegmenter:
    """The straightforward U-Net call: PIL resizing and normalisation, a plain channels-first
    forward pass under ``no_grad``, the same mask post-processing as leuko."""

    def __init__(self, learned: LearnedSegmenter) -> None:
        self.network = copy.deepcopy(learned.network).to(memory_format=torch.contiguous_format)
        self.size, self.device = learned.size, learned.device
        self.mean, self.std = learned.mean.tolist(), learned.std.tolist()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        image = Image.fromarray(rgb).resize((self.size, self.size), Image.BILINEAR)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)[None].to(self.device)
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(self.network(tensor), size=rgb.shape[:2], mode="bilinear")
        classes = logits[0].argmax(0).cpu().numpy()
        return keep_central_cell(np.array([BACKGROUND, CYTOPLASM, NUCLEUS], np.uint8)[classes])


def naive_segmenter(segment: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """The naive counterpart of a segmenter: :class:`NaiveSegmenter` for the learned one; the
    classical one is already plain OpenCV."""
    owner = getattr(segment, "__self__", None)
    return NaiveSegmenter(owner) if isinstance(owner, LearnedSegmenter) else segment


def naive_analysis(naive: "NaiveClassifier", segment: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray) -> None:
    """The straightforward crop analysis: PIL preprocessing, a plain forward pass, a new CAM
    object, the naive segmentation, and the same morphometrics as leuko."""
    image = Image.fromarray(rgb)
    naive.predict(image)
    naive.explain(image)
    measure_cell(segment(rgb), rgb)


def sample_crop(size: int = 257) -> Image.Image:
    """A stained-cell-like test crop (no dataset image is needed to run the benchmark)."""
    yy, xx = np.mgrid[:size, :size]
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[...] = (236, 214, 220)
    distance = np.hypot(yy - size / 2, xx - size / 2)
    rgb[distance < size * 0.3] = (196, 188, 228)
    rgb[distance < size * 0.18] = (105, 45, 150)
    return Image.fromarray(rgb)


def sample_field(cells: int = 10, width: int = 1712, height: int = 1368, seed: int = 0) -> np.ndarray:
    """A 1712x1368 field (ALL-IDB1's frame size) with red cells and ``cells`` leukocytes."""
    import cv2

    rng = np.random.default_rng(seed)
    field = np.full((height, width, 3), (236, 214, 220), np.uint8)
    for _ in range(300):
        cv2.circle(field, tuple(int(v) for v in rng.integers(0, [width, height])), 38, (226, 150, 160), -1)
    for k in range(cells):
        x, y = 150 + (k % 5) * 340, 350 + (k // 5) * 650
        cv2.circle(field, (x, y), 90, (196, 188, 228), -1)
        cv2.circle(field, (x, y), 55, (105, 45, 150), -1)
    return field


def run_benchmarks(device: str | None = None, repeats: int = 20, backend: str = "auto") -> list[BenchRow]:
    """Every benchmark on one device and inference ``backend`` (see :mod:`leuko.onnx_backend`);
    rows for tasks without an installed model are skipped."""
    target = pick_device(device)
    flops_per_second = matmul_flops_per_second(target)
    rows = [BenchRow("matmul throughput", "GFLOP/s", flops_per_second / 1e9)]
    crop = sample_crop()
    crop_rgb = np.asarray(crop)
    segment = make_segmenter("auto", device=str(target), backend=backend)
    plain_segment = naive_segmenter(segment)
    rows.append(BenchRow("segment a 257x257 crop (auto segmenter)", "ms",
                         *timed_pair(lambda: segment(crop_rgb), lambda: plain_segment(crop_rgb), repeats)))
    for task in TASKS:
        try:
            predictor = Predictor(task=task, device=str(target), backend=backend)
        except ModelNotFoundError:
            continue
        naive = NaiveClassifier(predictor)
        size = predictor.input_config.input_size
        bound = model_flops(predictor.network, size, target) / flops_per_second * 1000
        rows.append(BenchRow(f"{task}: predict, batch 1", "ms",
                             *timed_pair(lambda: predictor.predict([crop]), lambda: naive.predict(crop), repeats), bound))
        batch = [crop] * 64
        batch_ms, naive_ms = timed_pair(lambda: predictor.predict(batch), lambda: [naive.predict(crop) for _ in batch],
                                        max(3, repeats // 5), 1)
        rows.append(BenchRow(f"{task}: batch throughput", "images/s", 64000 / batch_ms, 64000 / naive_ms,
                             1000 / bound))
        with Explainer(predictor) as explainer:
            rows.append(BenchRow(f"{task}: predict + Grad-CAM", "ms",
                                 *timed_pair(lambda: explainer.explain(crop),
                                             lambda: (naive.predict(crop), naive.explain(crop)), repeats), 2 * bound))

        with Analyzer(AnalysisSettings(task, device=str(target), backend=backend)) as analyzer:
            rows.append(BenchRow(f"{task}: full crop analysis", "ms",
                                 *timed_pair(lambda: analyzer.analyze(crop_rgb, kind="crop"),
                                             lambda: naive_analysis(naive, plain_segment, crop_rgb), repeats)))
            field = sample_field()
            rows.append(BenchRow(f"{task}: field 1712x1368, 10 cells", "ms",
                                 *timed_pair(lambda: analyzer.analyze(field, kind="field"),
                                             lambda: [naive_analysis(naive, plain_segment, cell.crop) for cell in
                                                      segment_image(field, plain_segment, "field").cells], 3, 1)))
    return rows


def training_throughput(arch: str = "efficientnet_lite0", size: int = 192, batch: int = 32,
                        freeze_stages: int = 2, device: str | None = None) -> BenchRow:
    """Training images/s with leuko's settings (channels-last, frozen early stages) against a
    plain timm training step on the same architecture and input size."""
    from leuko.nets import build_model

    target = pick_device(device)
    images, labels = torch.randn(batch, 3, size, size, device=target), torch.randint(0, 2, (batch,), device=target)

    def training_step(network: torch.nn.Module, channels_last: bool) -> Callable[[], None]:
        network.train()
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad])
        x = images.to(memory_format=torch.channels_last) if channels_last else images

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(network(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    ours = build_model(arch, 2).to(target)
    ours.freeze_early_stages(freeze_stages)
    ours = ours.to(memory_format=torch.channels_last)
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=2).to(target)
    ours_ms, plain_ms = timed_pair(training_step(ours, True), training_step(plain, False), 3, 1)
    return BenchRow(f"training {arch} at {size} px", "images/s", batch * 1000 / ours_ms, batch * 1000 / plain_ms)


def format_rows(rows: list[BenchRow]) -> str:
    """A fixed-width table and a closing line summarising the speed-ups over the reference."""
    lines = [f"{'benchmark':<44}{'leuko':>12}{'naive':>12}{'speed-up':>10}{'bound':>12}  unit"]
    for row in rows:
        reference = f"{row.reference:12.1f}" if row.reference is not None else f"{'-':>12}"
        speedup = f"{row.speedup:9.2f}x" if row.speedup is not None else f"{'-':>10}"
        bound = f"{row.bound:12.1f}" if row.bound is not None else f"{'-':>12}"
        lines.append(f"{row.name:<44}{row.value:12.1f}{reference}{speedup}{bound}  {row.unit}")
    ratios = [row.speedup for row in rows if row.speedup]
    if ratios:
        lines.append(f"summary: {len(ratios)} comparisons, speed-up over the naive reference "
                     f"{min(ratios):.2f}x to {max(ratios):.2f}x (geometric mean "
                     f"{float(np.exp(np.mean(np.log(ratios)))):.2f}x)")
    return "\n".join(lines)


def store_benchmarks(cases: int = 10_000, repeats: int = 30) -> list[BenchRow]:
    """Saving one case (one image, its prediction and CAM) on SQLite, and the history query
    (first page, filtered by task and needs-review) over ``cases`` cases, in a temporary home."""
    import io
    import tempfile
    from pathlib import Path

    from sqlalchemy import insert

    from leuko.store import CaseFilter, CaseStore, ImageEntry, PredictionEntry
    from leuko.store.models import Case, ImageRecord, Prediction

    buffer = io.BytesIO()
    sample_crop().save(buffer, "PNG")
    image_bytes = buffer.getvalue()
    with tempfile.TemporaryDirectory() as home:
        store = CaseStore(home=Path(home), url=f"sqlite:///{Path(home) / 'bench.db'}")
        counter = iter(range(10**9))

        def save() -> None:
            k = next(counter)
            entry = PredictionEntry("bench", "0" * 64, "all_binary", {"ALL": 0.8, "normal": 0.2}, "ALL", 0.8, False,
                                    10.0, image_bytes[:-8] + k.to_bytes(8, "little"))
            store.save_case(f"S-{k}", "bench", [ImageEntry(image_bytes, "cell.png", 257, 257, prediction=entry)])

        save_ms = timed(save, repeats)
        with store.engine.begin() as connection:
            connection.execute(insert(Case), [{"reference": f"B-{k}", "notes": "", "created_by": "bench", "status": "new"}
                                              for k in range(cases)])
            ids = [row[0] for row in connection.exec_driver_sql("SELECT id FROM cases WHERE reference LIKE 'B-%'")]
            connection.execute(insert(ImageRecord), [{"case_id": i, "sha256": "0" * 64, "original_name": "x.png",
                                                      "stored_path": "x", "size_bytes": 1, "width": 1, "height": 1,
                                                      "kind": "crop"} for i in ids])
            images = [row[0] for row in connection.exec_driver_sql("SELECT id FROM images")]
            connection.execute(insert(Prediction), [{"image_id": i, "model_id": "bench", "weights_sha256": "0" * 64,
                                                     "task": "all_binary", "probabilities": {"ALL": 0.5},
                                                     "label": "ALL", "confidence": 0.5, "needs_review": i % 5 == 0}
                                                    for i in images])
        query_ms = timed(lambda: store.list_cases(CaseFilter(task="all_binary", needs_review=True), 1, 50), 10)
        store.close()
    return [BenchRow("case log: save one case (SQLite)", "ms", save_ms),
            BenchRow(f"case log: history query over {cases} cases", "ms", query_ms)]
