"""The command line: ``python -m leuko {train,evaluate,predict,models}``."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from leuko.config import OPTIMIZERS, TrainConfig
from leuko.images import ImageError, find_images, load_image
from leuko.tasks import TASKS

T = TypeVar("T")


def _train(args: argparse.Namespace) -> int:
    from leuko.evaluate import format_metrics
    from leuko.paths import SHIPPED_MODELS
    from leuko.pipeline import train_and_register
    from leuko.progress import JsonlProgress, TerminalProgress

    base = TrainConfig.from_yaml(args.config) if args.config else TrainConfig(task=args.task or "")
    config = base.with_overrides(
        task=args.task, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, data_root=args.data, folder=args.folder, input_size=args.input_size,
        limit_train=args.limit_train, max_steps_per_epoch=args.max_steps, model_id=args.model_id,
        device=args.device, pretrained=args.pretrained, seed=args.seed, out_dir=args.out_dir,
        num_workers=args.workers, resume=True if args.resume else None)
    if config.task not in TASKS:
        print(f"error: give --task ({', '.join(TASKS)}) or a config file with a task", file=sys.stderr)
        return 2
    folder = SHIPPED_MODELS if args.ship else None
    callbacks = [TerminalProgress()] + ([JsonlProgress(args.events)] if args.events else [])
    card = train_and_register(config, callbacks=callbacks, folder=folder, make_default=args.default,
                              report_dir=args.report,
                              should_stop=(lambda: args.stop_file.exists()) if args.stop_file else None)
    if card is None:
        return 0
    print(f"\nregistered model {card.id} ({card.training_time_s / 60:.1f} min training, "
          f"temperature {card.temperature:.3f})")
    print("test split:")
    print(format_metrics(card.metrics["test"]))
    return 0


def _crosslab(args: argparse.Namespace) -> int:
    from leuko import crosslab
    from leuko.pipeline import export_run
    from leuko.progress import TerminalProgress
    from leuko.train import train_model

    config = TrainConfig.from_yaml(args.config).with_overrides(
        data_root=args.data, epochs=args.epochs, limit_train=args.limit_train, max_steps_per_epoch=args.max_steps,
        device=args.device, num_workers=args.workers, pretrained=args.pretrained)
    labs = args.labs.split(",")
    if args.table:
        rows = crosslab.read_rows(args.out)
        print(crosslab.table(rows) if rows else f"no rows in {args.out}")
        if not rows:
            return 1
    else:
        methods = args.methods.split(",") if args.methods else list(crosslab.METHODS)
        rows = crosslab.leave_one_lab_out(config, labs, methods, args.out, [TerminalProgress()])
        print(crosslab.table([r.as_dict() for r in rows]))
    if args.then_train:
        best = crosslab.best_method(crosslab.read_rows(args.out))
        final = crosslab.method_config(config, best, datasets=labs, out_dir=str(args.then_train),
                                       epochs=args.final_epochs or config.epochs)
        print(f"training {final.model_id} on {', '.join(labs)} with {best}")
        result = train_model(final, [TerminalProgress()])
        print(f"exported to {export_run(result, args.then_train)}")
    return 0


def _register_run(args: argparse.Namespace) -> int:
    from leuko.evaluate import format_metrics
    from leuko.paths import SHIPPED_MODELS
    from leuko.pipeline import load_exported_run, register_result
    from leuko.progress import TerminalProgress

    result = load_exported_run(args.run, args.data)
    card = register_result(result, callbacks=[TerminalProgress()], folder=SHIPPED_MODELS if args.ship else None,
                           make_default=args.default, report_dir=args.report)
    if card is None:
        return 1
    print(f"registered model {card.id} (temperature {card.temperature:.3f}); test split:")
    print(format_metrics(card.metrics["test"]))
    return 0


def _fit_shift(args: argparse.Namespace) -> int:
    from leuko.modelstore import ModelStore
    from leuko.shiftfit import fit_model_shift

    store = ModelStore()
    ids = args.model or [card.id for card in store.cards() if card.task in TASKS]
    for model_id in ids:
        card = fit_model_shift(model_id, store, args.data, args.datasets)
        print(f"{model_id}: shift threshold {card.shift['threshold']:.3f} "
              f"(fitted on {card.shift['fitted_on']['train']} train, {card.shift['fitted_on']['val']} val images)")
    return 0


def _evaluate_shift(args: argparse.Namespace) -> int:
    from leuko.data import read_manifest
    from leuko.modelstore import ModelStore
    from leuko.paths import default_data_root
    from leuko.shiftfit import measure_shift
    from leuko.tasks import get_task

    store = ModelStore()
    card, _ = store.locate(args.model)
    manifest = Path(args.data or default_data_root()) / "manifest.csv"
    task = get_task(card.task)
    seen = read_manifest(manifest, task, args.split, args.seen)
    unseen = [s for split in args.unseen_split for s in read_manifest(manifest, task, split, args.unseen)]
    report = measure_shift(args.model, seen, unseen, store)
    print(json.dumps(report.as_dict(), indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(report.as_dict(), model=args.model, seen=args.seen, unseen=args.unseen,
                                            split=args.split, unseen_split=args.unseen_split), indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from leuko.data import read_folder, read_manifest
    from leuko.evaluate import evaluate, format_metrics, write_report
    from leuko.modelstore import ModelStore
    from leuko.paths import default_data_root
    from leuko.tasks import get_task

    loaded = ModelStore().load(args.model, args.task)
    task = get_task(loaded.card.task)
    if args.folder:
        samples = read_folder(Path(args.folder), task, "all")
    else:
        manifest = Path(args.data or default_data_root()) / "manifest.csv"
        samples = read_manifest(manifest, task, args.split, args.datasets)
    seed = loaded.card.training.get("simulated_clinical_seed")
    if seed is not None:
        from leuko.cohort import SIMULATED_NOTICE, attach_simulated

        samples = attach_simulated(samples, task.positive_index or 0, seed)
        print(SIMULATED_NOTICE)
    report = evaluate(loaded, samples, args.device, withhold_clinical=args.withhold_clinical)
    print(f"model {loaded.card.id} on {args.folder or args.split} ({len(samples)} images)")
    print(format_metrics(report["metrics"]))
    if args.out:
        written = write_report(report, Path(args.out))
        print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


class _CellsOf:
    """Splits an image into what a classifier should see: a single-cell crop as it is, a field of
    view (:func:`leuko.segment.resolve_kind`) into each leukocyte's crop, cut as the Analyze page
    cuts it: for a model that records its training view, a square of that physical view cut
    from the field at the given pixel size or the one its red cells give. The segmenter loads
    on the first field."""

    def __init__(self, kind: str, device: str | None, input_config=None, pixel_size_um: float | None = None) -> None:
        self.kind, self.device, self.segment = kind, device, None
        self.input_config, self.pixel_size_um = input_config, pixel_size_um

    def __call__(self, path: Path, image) -> list[tuple[int | None, object, tuple[int, int, int, int] | None]]:
        """(cell number or None for a crop, RGB image, box x, y, w, h in pixels or None) per cell;
        none for a field without a leukocyte. Raises :class:`leuko.images.ImageError` for a crop
        too small or blank to hold a cell, and :class:`leuko.segment.SegmentationError` when a
        field needs the segmenter and it cannot be loaded (a damaged model file)."""
        import numpy as np

        from leuko.analysis import field_pixel_size_um
        from leuko.data import physical_side, square_about
        from leuko.modelstore import ModelIntegrityError
        from leuko.segment import SegmentationError, crop_problem, make_segmenter, resolve_kind, segment_image

        if resolve_kind(self.kind, image.height, image.width) == "crop":
            problem = crop_problem(np.asarray(image))
            if problem:
                raise ImageError(f"{path}: {problem}")
            return [(None, image, None)]
        if self.segment is None:
            try:
                self.segment = make_segmenter("auto", device=self.device)
            except (ModelIntegrityError, OSError) as exc:
                raise SegmentationError(f"a field of view needs the segmenter, which could not be loaded: {exc}") from exc
        rgb = np.asarray(image)
        cells = segment_image(rgb, self.segment, "field").cells
        if not cells:
            print(f"{path}: no leukocyte found", file=sys.stderr)
        config = self.input_config
        side = None
        if config is not None and config.view_um and cells:
            side = physical_side(self.pixel_size_um or field_pixel_size_um(rgb), config.view_um, config.view_zoom)
        if side is None:
            return [(index, cell.crop, cell.box) for index, cell in enumerate(cells, start=1)]
        return [(index, square_about(rgb, (x + w / 2, y + h / 2), side), (x, y, w, h))
                for index, (x, y, w, h) in enumerate((cell.box for cell in cells), start=1)]


class _Refused(Exception):
    """A run refused before any work; ``main`` prints the message and exits with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _input_images(inputs: Sequence[str], out_dir: Path | None = None) -> list[Path]:
    """The image files of the run's inputs (:func:`leuko.images.find_images`). Refuses a run
    with none (exit 1) and an ``out_dir`` that is, or holds, one of the inputs (exit 2):
    marking it as an output folder would hide those images from later runs."""
    if out_dir is not None:
        out = out_dir.resolve()
        for item in map(Path, inputs):
            target = item.resolve()
            if target == out or out in target.parents:
                raise _Refused(f"--out-dir {out_dir} holds the input {item}; choose a folder of its own")
    paths = find_images(inputs)
    if not paths:
        raise _Refused("no image files found in the given paths", code=1)
    return paths


def _read_each(paths: list[Path], prepare: Callable[[Path], T]) -> Iterator[tuple[Path, T | None, str | None]]:
    """(path, prepare(path), None) for each path, or (path, None, why) when its image cannot be
    read or prepared (:class:`leuko.images.ImageError`, :class:`leuko.segment.SegmentationError`);
    the reason is also printed on standard error, so one bad file never ends a run."""
    from leuko.segment import SegmentationError

    for path in paths:
        try:
            prepared = prepare(path)
        except (ImageError, SegmentationError) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            print(f"skipped {path}: {reason}", file=sys.stderr)
            yield path, None, reason
        else:
            yield path, prepared, None


def _predict(args: argparse.Namespace) -> int:
    from leuko.images import IMAGE_SUFFIXES
    from leuko.predict import Predictor

    paths = _input_images(args.paths)
    if args.csv and ({Path(args.csv).suffix.lower(), Path(args.csv).resolve().suffix.lower()} & set(IMAGE_SUFFIXES)
                     or Path(args.csv).resolve() in {path.resolve() for path in paths}):
        raise _Refused(f"--csv {args.csv} is an image file or one of the inputs; name a new .csv file")
    predictor = Predictor(args.model, task=args.task, device=args.device, tta=args.tta)
    if predictor.card.training.get("simulated_clinical_seed") is not None:
        from leuko.cohort import SIMULATED_NOTICE

        print(SIMULATED_NOTICE, file=sys.stderr)
    cells_of = _CellsOf(args.kind, args.device, predictor.input_config, args.pixel_size)
    handle = open(args.csv, "w", newline="") if args.csv else sys.stdout
    read = 0
    try:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "confidence", "needs_review", *(f"p_{c}" for c in predictor.classes),
                         "shift_score", "unfamiliar", "cell", "x", "y", "width", "height", "error", "not_applicable"])
        batch: list[tuple[Path, int | None, object, tuple | None]] = []

        def flush() -> None:
            for (path, index, _, box), result in zip(batch, predictor.predict([image for _, _, image, _ in batch], pixel_size_um=args.pixel_size)):
                writer.writerow([str(path), result.label, f"{result.confidence:.6f}", result.needs_review,
                                 *(f"{p:.6f}" for p in result.probabilities),
                                 "" if result.shift_score is None else f"{result.shift_score:.4f}", result.unfamiliar,
                                 *((index, *box) if box else ("",) * 5), "", result.not_applicable or ""])
            batch.clear()

        def unclassified(path: Path, reason: str) -> None:
            flush()
            writer.writerow([str(path), *("",) * (3 + len(predictor.classes) + 7), reason, ""])

        for path, cells, reason in _read_each(paths, lambda path: cells_of(path, load_image(path))):
            if reason is not None:
                unclassified(path, reason)
                continue
            read += 1
            if not cells:
                unclassified(path, "no leukocyte found")
            batch += [(path, *cell) for cell in cells]
            if len(batch) >= 32:
                flush()
        flush()
    finally:
        if args.csv:
            handle.close()
    return 0 if read else 1


def _models(args: argparse.Namespace) -> int:
    from leuko.modelstore import ModelStore

    store = ModelStore()
    if args.set_default:
        card, _ = store.locate(args.set_default)
        store.set_default(card.task, card.id)
        print(f"{card.id} is now the default for {card.task}")
        return 0
    rows = store.status(args.task)
    unreadable = store.unreadable_cards()
    failures = sum(entry.problem is not None for entry in rows) + len(unreadable)
    if args.json:
        print(json.dumps([{**entry.card.__dict__, "default": entry.default, "problem": entry.problem} for entry in rows]
                         + [{"card_file": str(path), "problem": why} for path, why in unreadable], indent=2))
        return 1 if failures and args.check else 0
    for path, why in unreadable:
        print(f"BROKEN card {path}: {why}")
    if not rows:
        print("no models installed" + (f" for {args.task}" if args.task else ""))
        return 1 if failures and args.check else 0
    print(f"{'id':<44}{'task':<14}{'arch':<22}{'test acc':>9}{'T':>7}  status")
    for entry in rows:
        card = entry.card
        test = card.metrics.get("test", {})
        accuracy = f"{test['accuracy']:.3f}" if "accuracy" in test else "-"
        status = "ok" if entry.problem is None else f"BROKEN: {entry.problem}"
        print(f"{card.id:<44}{card.task:<14}{card.arch:<22}{accuracy:>9}{card.temperature:>7.2f}  {status}"
              + (" (default)" if entry.default else ""))
    return 1 if failures and args.check else 0


def _unique_names(stem: str, suffixes: Sequence[str], used: set[str]) -> list[str]:
    """``<stem><suffix>`` for each suffix, or all with ``<stem>-2``, ``-3``... when an earlier
    input of the same run took any of them (images of the same name in different folders, or a
    crop named like a field's cell), so one input's files share one stem; recorded in ``used``."""
    names, copy = [f"{stem}{suffix}" for suffix in suffixes], 2
    while used.intersection(names):
        names, copy = [f"{stem}-{copy}{suffix}" for suffix in suffixes], copy + 1
    used.update(names)
    return names


def _segment(args: argparse.Namespace) -> int:
    from dataclasses import fields

    import numpy as np
    from PIL import Image

    from leuko.images import mark_output_folder
    from leuko.morphometrics import Morphometrics, measure_cell
    from leuko.segment import make_segmenter, segment_image

    out_dir = Path(args.out_dir)
    paths = _input_images(args.paths, out_dir)
    segment = make_segmenter(args.method, device=args.device)
    table = out_dir / "morphometrics.csv"
    handle, writer, done, cells, used = None, None, 0, 0, set()
    try:
        for path, result, reason in _read_each(
                paths, lambda path: segment_image(np.asarray(load_image(path)), segment, kind=args.kind)):
            if reason is not None:
                continue
            if writer is None:
                if table.exists():
                    print(f"replacing the morphometrics.csv of an earlier run in {out_dir}", file=sys.stderr)
                handle = open(mark_output_folder(out_dir) / table.name, "w", newline="")
                writer = csv.writer(handle)
                writer.writerow(["path", "mask_file", "cell", "kind", "x", "y", "width", "height", "touches_border",
                                 *(f.name for f in fields(Morphometrics))])
            name = _unique_names(path.stem, ["_mask.png"], used)[0]
            Image.fromarray(result.mask).save(out_dir / name)
            done += 1
            if not result.cells:
                print(f"{path}: no leukocyte found", file=sys.stderr)
            for index, cell in enumerate(result.cells, start=1):
                writer.writerow([str(path), name, index, result.kind, *cell.box, cell.touches_border,
                                 *measure_cell(cell.mask, cell.crop, args.pixel_size).as_dict().values()])
            cells += len(result.cells)
            handle.flush()
    finally:
        if handle is not None:
            handle.close()
    if not done:
        print("error: no image could be segmented; nothing was written", file=sys.stderr)
        return 1
    print(f"segmented {done} image(s), {cells} cell(s); masks and morphometrics.csv in {out_dir}")
    return 0


def _evaluate_segmentation(args: argparse.Namespace) -> int:
    from leuko.segment import make_segmenter
    from leuko.segtrain import evaluate_masks, mask_samples

    samples = mask_samples(args.split, Path(args.data) if args.data else None)
    methods = ["classical", "learned"] if args.method == "both" else [args.method]
    for method in methods:
        table = evaluate_masks(make_segmenter(method, device=args.device), samples)
        print(f"\n{method} segmenter on the {args.split} split")
        print(table.round(3).to_string())
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            table.to_csv(Path(args.out) / f"segmentation_{method}_{args.split}.csv")
    return 0


def _evaluate_cell_finding(args: argparse.Namespace) -> int:
    from leuko.cellfind import evaluate_cell_finding, format_report, write_report
    from leuko.paths import default_data_root
    from leuko.segment import make_segmenter

    root = Path(args.data) if args.data else default_data_root()
    if not (root / "bionet_fields" / "boxes.csv").is_file():
        raise _Refused(f"{root} holds no bionet_fields/boxes.csv")
    report = evaluate_cell_finding(root, args.split, make_segmenter(args.method, device=args.device))
    print(format_report(report))
    written = write_report(report, Path(args.out))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _train_segmenter(args: argparse.Namespace) -> int:
    from leuko.paths import SHIPPED_MODELS
    from leuko.progress import TerminalProgress
    from leuko.segtrain import SegTrainConfig, train_segmenter

    config = SegTrainConfig(**{k: v for k, v in {"epochs": args.epochs, "input_size": args.input_size,
                                                 "model_id": args.model_id, "data_root": args.data,
                                                 "num_workers": args.workers}.items() if v is not None})
    card = train_segmenter(config, [TerminalProgress()], folder=SHIPPED_MODELS if args.ship else None,
                           make_default=args.default)
    print(f"registered segmenter {card.id} ({card.training_time_s / 60:.1f} min)")
    for split, rows in card.metrics.items():
        print(f"{split}: " + "; ".join(f"{r['dataset']} nucleus {r['nucleus_dice']:.3f} cytoplasm "
                                      f"{r['cytoplasm_dice']:.3f} cell {r['cell_dice']:.3f}" for r in rows))
    return 0


def _explain(args: argparse.Namespace) -> int:
    import numpy as np

    from leuko.explain import Explainer, overlay, save_png, side_by_side
    from leuko.images import mark_output_folder
    from leuko.predict import Predictor

    paths = _input_images(args.paths, Path(args.out_dir))
    predictor = Predictor(args.model, task=args.task, device=args.device, check_cell_type=False)
    cells_of = _CellsOf(args.kind, args.device)
    out_dir = mark_output_folder(Path(args.out_dir))
    done, used = 0, set()
    with Explainer(predictor) as explainer:
        for path, cells, reason in _read_each(paths, lambda path: cells_of(path, load_image(path))):
            if reason is not None:
                continue
            names = _unique_names(path.stem, ["_cam.png" if index is None else f"_cell{index}_cam.png"
                                              for index, _, _ in cells], used)
            for (index, image, _), name in zip(cells, names):
                rgb = np.asarray(image)
                result = explainer.explain(rgb, args.class_id, args.method)
                rendered = overlay(rgb, result.cam, args.colormap, args.opacity)
                target = save_png(side_by_side(rgb, rendered), out_dir / name)
                print(f"{path}{'' if index is None else f' cell {index}'}: {result.method} for {result.class_id} "
                      f"(p = {result.probability:.3f}) -> {target}")
            done += 1
    return 0 if done else 1


def _evaluate_cam(args: argparse.Namespace) -> int:
    from leuko.data import read_manifest
    from leuko.explain import faithfulness
    from leuko.paths import default_data_root
    from leuko.predict import Predictor
    from leuko.segment import make_segmenter

    predictor = Predictor(args.model, task=args.task, device=args.device, check_cell_type=False)
    samples = read_manifest(Path(args.data or default_data_root()) / "manifest.csv", predictor.task, args.split)
    if args.limit:
        samples = samples[:: max(1, len(samples) // args.limit)][: args.limit]
    report = faithfulness(predictor, samples, make_segmenter("auto"), args.method)
    print(json.dumps({"task": predictor.task.id, "model": predictor.card.id, "split": args.split, **report}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from leuko.bench import format_rows, run_benchmarks, store_benchmarks, training_throughput
    from leuko.device import describe_device, pick_device
    from leuko.onnx_backend import RUNTIME_NAMES, RUNTIME_PACKAGES, choose_runtime

    on_cuda_too = torch.cuda.is_available() and args.backend not in RUNTIME_PACKAGES
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if on_cuda_too else [])
    for device in devices:
        runtime = choose_runtime(args.backend, pick_device(device))
        print(f"\n{describe_device(pick_device(device))}, torch {torch.__version__}, "
              f"exported networks on {RUNTIME_NAMES.get(runtime, 'none (PyTorch)')}")
        rows = run_benchmarks(device, args.repeats, args.backend)
        if not args.skip_training:
            rows.append(training_throughput(device=device))
        if device == devices[0]:
            rows += store_benchmarks()
        print(format_rows(rows))
    return 0


def _store(args: argparse.Namespace) -> int:
    from leuko.store import CaseStore

    store = CaseStore()
    if args.action == "check":
        report = store.check(repair=args.repair)
        for path in report.missing_files:
            print(f"missing file (row kept): {path}")
        for path in report.orphan_files:
            print(f"{'removed' if args.repair else 'orphan'} file: {path}")
        for path in report.recent_files:
            print(f"recent unreferenced file (kept: a save may be in progress): {path}")
        print("store consistent" if report.ok else
              f"{len(report.orphan_files)} orphan file(s), {len(report.missing_files)} missing file(s)")
        return 0 if report.ok or (args.repair and not report.missing_files) else 1
    import getpass

    password = getpass.getpass(f"password for {args.username}: ")
    store.create_user(args.username, password, args.role, actor="cli")
    print(f"created {args.role} {args.username}")
    return 0


def _positive_number(text: str) -> float:
    """An argparse type: a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _add_kind_argument(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--kind", choices=["auto", "crop", "field"], default="auto",
                        help=f"crop: the image is one cell; field: {verb} every leukocyte found; auto: a field "
                             "when its longer side is 600 px or more (leuko.segment.FIELD_MIN_SIDE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m leuko",
                                     description="Leuko: acute leukemia screening from blood smear images")
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sorted(TASKS)

    train = sub.add_parser("train", help="train, calibrate, evaluate and register a model")
    train.add_argument("--config", type=Path, help="YAML training configuration")
    train.add_argument("--task", choices=tasks)
    train.add_argument("--arch", help="registered architecture (see leuko.nets.ARCHITECTURES)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--optimizer", choices=OPTIMIZERS)
    train.add_argument("--input-size", type=int, help="input side in pixels")
    train.add_argument("--data", help="folder holding manifest.csv (default ../shared/data)")
    train.add_argument("--folder", help="folder of class sub-folders instead of a manifest")
    train.add_argument("--limit-train", type=int, help="at most this many training images per class")
    train.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    train.add_argument("--model-id")
    train.add_argument("--pretrained", help="auto, none, offline, hub or a checkpoint path")
    train.add_argument("--device", help="auto, cpu or cuda")
    train.add_argument("--seed", type=int)
    train.add_argument("--workers", type=int, help="data-loading processes")
    train.add_argument("--out-dir", help="folder for run checkpoints (default runs/)")
    train.add_argument("--resume", action="store_true", help="continue the run's last checkpoint")
    train.add_argument("--ship", action="store_true", help="register into the repository's models/")
    train.add_argument("--default", action="store_true", help="mark as the task's default model")
    train.add_argument("--events", type=Path, help="also append progress events to this JSON-lines file")
    train.add_argument("--report", type=Path, help="write the test evaluation's metrics and plots here")
    train.add_argument("--stop-file", type=Path, help="stop early (keeping the best weights) once this file exists")
    train.set_defaults(handler=_train)

    lolo = sub.add_parser("crosslab", help="leave-one-lab-out comparison of training recipes")
    lolo.add_argument("--config", type=Path, help="base YAML training configuration")
    lolo.add_argument("--labs", default="pbc_wbc,wbc_seg_jtsc,wbc_seg_cellavision",
                      help="comma-separated datasets of the manifest, one fold each")
    lolo.add_argument("--methods", help="comma-separated methods (default: all of leuko.crosslab.METHODS)")
    lolo.add_argument("--out", type=Path, default=Path("runs/crosslab"), help="folder for rows, logits and runs")
    lolo.add_argument("--table", action="store_true", help="print the table of the rows already in --out")
    lolo.add_argument("--then-train", type=Path, help="then train the best method on all labs and export the run "
                                                     "here (weights and JSON, for register-run)")
    lolo.add_argument("--final-epochs", type=int, help="epochs of that final run (default: the config's)")
    lolo.add_argument("--data", help="folder holding manifest.csv (default ../shared/data)")
    lolo.add_argument("--epochs", type=int)
    lolo.add_argument("--limit-train", type=int, help="at most this many training images per class and lab")
    lolo.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    lolo.add_argument("--pretrained", help="auto, none, offline, hub or a checkpoint path")
    lolo.add_argument("--device", help="auto, cpu or cuda")
    lolo.add_argument("--workers", type=int, help="data-loading processes")
    lolo.set_defaults(handler=_crosslab)

    register_run = sub.add_parser("register-run", help="calibrate, evaluate and register a run exported by "
                                                       "crosslab --then-train (trained on another machine)")
    register_run.add_argument("run", type=Path, help="the run's JSON file (weights beside it)")
    register_run.add_argument("--data", help="folder holding manifest.csv (default ../shared/data)")
    register_run.add_argument("--ship", action="store_true", help="register into the repository's models/")
    register_run.add_argument("--default", action="store_true", help="mark as the task's default model")
    register_run.add_argument("--report", type=Path, help="write the test evaluation's metrics and plots here")
    register_run.set_defaults(handler=_register_run)

    fit_shift = sub.add_parser("fit-shift", help="fit the shift detector of models on their training images")
    fit_shift.add_argument("--model", nargs="+", help="model ids (default: every installed classifier)")
    fit_shift.add_argument("--data", help="folder holding manifest.csv (default ../shared/data)")
    fit_shift.add_argument("--datasets", nargs="+", help="only these manifest datasets (default: the model's own)")
    fit_shift.set_defaults(handler=_fit_shift)

    shift_eval = sub.add_parser("evaluate-shift", help="shift score on seen labs against labs the model never saw")
    shift_eval.add_argument("--model", required=True)
    shift_eval.add_argument("--seen", nargs="+", required=True, help="datasets like the training images")
    shift_eval.add_argument("--unseen", nargs="+", required=True, help="datasets from labs the model never saw")
    shift_eval.add_argument("--split", default="test", help="split of the seen datasets")
    shift_eval.add_argument("--unseen-split", nargs="+", default=["train", "val", "test"],
                            help="splits of the unseen datasets (default: all of them)")
    shift_eval.add_argument("--data", help="folder holding manifest.csv (default ../shared/data)")
    shift_eval.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    shift_eval.set_defaults(handler=_evaluate_shift)

    evaluate = sub.add_parser("evaluate", help="evaluate a model on a manifest split or a folder")
    evaluate.add_argument("--model", help="model id (default: the task's default model)")
    evaluate.add_argument("--task", choices=tasks)
    evaluate.add_argument("--split", default="test", help="manifest split (train, val, test)")
    evaluate.add_argument("--datasets", nargs="+", help="only these manifest datasets")
    evaluate.add_argument("--data", help="folder holding manifest.csv")
    evaluate.add_argument("--folder", help="folder of class sub-folders instead of the manifest")
    evaluate.add_argument("--out", help="folder for metrics.json and plots")
    evaluate.add_argument("--withhold-clinical", action="store_true",
                          help="fusion models: evaluate from the images alone (ablation)")
    evaluate.add_argument("--device")
    evaluate.set_defaults(handler=_evaluate)

    predict = sub.add_parser("predict", help="classify images; CSV to a file or standard output")
    predict.add_argument("--task", required=True, choices=tasks)
    predict.add_argument("--model", help="model id (default: the task's default model)")
    predict.add_argument("--csv", help="output CSV file (default: standard output)")
    predict.add_argument("--tta", action="store_true", help="average over 8 rotations/flips")
    predict.add_argument("--pixel-size", type=_positive_number,
                         help="micrometres per pixel of the images: they are brought to the model's training scale")
    _add_kind_argument(predict, "classify")
    predict.add_argument("--device")
    predict.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    predict.set_defaults(handler=_predict)

    segment = sub.add_parser("segment", help="nucleus/cytoplasm masks and morphometrics of crops or fields")
    segment.add_argument("--method", choices=["auto", "classical", "learned"], default="auto",
                         help="auto: the learned segmenter when installed, else classical")
    _add_kind_argument(segment, "segment")
    segment.add_argument("--out-dir", default="segmentation")
    segment.add_argument("--pixel-size", type=_positive_number, help="micrometres per pixel, for areas in um^2")
    segment.add_argument("--device")
    segment.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    segment.set_defaults(handler=_segment)

    seg_eval = sub.add_parser("evaluate-segmentation", help="Dice and IoU of the segmenters on a manifest split")
    seg_eval.add_argument("--method", choices=["classical", "learned", "both"], default="both")
    seg_eval.add_argument("--split", default="test")
    seg_eval.add_argument("--data", help="folder holding manifest.csv")
    seg_eval.add_argument("--out", help="folder for the CSV tables")
    seg_eval.add_argument("--device")
    seg_eval.set_defaults(handler=_evaluate_segmentation)

    cell_eval = sub.add_parser("evaluate-cell-finding",
                               help="precision, recall and exact-count rate of leukocyte finding in fields")
    cell_eval.add_argument("--split", default="test", help="bionet_fields split (train, val, test)")
    cell_eval.add_argument("--data", help="folder holding manifest.csv and bionet_fields/")
    cell_eval.add_argument("--method", choices=["auto", "classical", "learned"], default="auto",
                           help="crop segmenter behind the field path (as for segment)")
    cell_eval.add_argument("--out", default="reports/cell_finding", help="folder for <split>.json and <split>.txt")
    cell_eval.add_argument("--device")
    cell_eval.set_defaults(handler=_evaluate_cell_finding)

    seg_train = sub.add_parser("train-segmenter", help="train and register the U-Net segmenter on the shared masks")
    seg_train.add_argument("--epochs", type=int)
    seg_train.add_argument("--input-size", type=int)
    seg_train.add_argument("--model-id")
    seg_train.add_argument("--data")
    seg_train.add_argument("--workers", type=int)
    seg_train.add_argument("--ship", action="store_true", help="register into the repository's models/")
    seg_train.add_argument("--default", action="store_true", help="mark it as the default segmenter")
    seg_train.set_defaults(handler=_train_segmenter)

    explain = sub.add_parser("explain", help="CAM overlays beside the original: <stem>_cam.png, or "
                                             "<stem>_cell<k>_cam.png per leukocyte of a field")
    explain.add_argument("--task", required=True, choices=tasks)
    explain.add_argument("--model")
    explain.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "xgradcam", "eigencam",
                                                                  "layercam", "scorecam"])
    explain.add_argument("--class", dest="class_id", help="class to explain (default: the predicted one)")
    explain.add_argument("--colormap", default="jet", choices=["jet", "turbo", "inferno", "viridis"])
    explain.add_argument("--opacity", type=float, default=0.45)
    explain.add_argument("--out-dir", default="cams")
    _add_kind_argument(explain, "explain")
    explain.add_argument("--device")
    explain.add_argument("paths", nargs="+")
    explain.set_defaults(handler=_explain)

    cam_eval = sub.add_parser("evaluate-cam", help="CAM faithfulness: energy inside the cell, ROAD deletion/insertion")
    cam_eval.add_argument("--task", required=True, choices=tasks)
    cam_eval.add_argument("--model")
    cam_eval.add_argument("--method", default="gradcam")
    cam_eval.add_argument("--split", default="test")
    cam_eval.add_argument("--limit", type=int, help="evaluate an evenly spread subset of this many images")
    cam_eval.add_argument("--data")
    cam_eval.add_argument("--device")
    cam_eval.set_defaults(handler=_evaluate_cam)

    bench = sub.add_parser("bench", help="latency and throughput against a naive reference, same run")
    bench.add_argument("--device", help="cpu or cuda (default: the CPU, and CUDA when present "
                       "unless --backend names a CPU-only runtime)")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--backend", default="auto",
                       help="auto (default: OpenVINO, else ONNX Runtime, on the CPU), torch, openvino or onnx")
    bench.add_argument("--skip-training", action="store_true")
    bench.set_defaults(handler=_bench)

    store = sub.add_parser("store", help="the case log: consistency check and repair, accounts")
    store_actions = store.add_subparsers(dest="action", required=True)
    store_check = store_actions.add_parser("check", help="find files no case refers to and cases missing a file")
    store_check.add_argument("--repair", action="store_true",
                             help="delete files no case refers to (except recent ones a save may still need)")
    add_user = store_actions.add_parser("add-user", help="create a local account (the password is asked for)")
    add_user.add_argument("--username", required=True)
    add_user.add_argument("--role", choices=["analyst", "reviewer", "admin"], default="analyst")
    store.set_defaults(handler=_store)

    models = sub.add_parser("models", help="list installed models and check their integrity")
    models.add_argument("--task", choices=tasks)
    models.add_argument("--json", action="store_true")
    models.add_argument("--check", action="store_true", help="exit 1 when any model fails its check")
    models.add_argument("--set-default", metavar="ID", help="make this model its task's default")
    models.set_defaults(handler=_models)
    return parser


def _store_errors() -> tuple[type[Exception], ...]:
    """The case log's error types where a command has loaded it: commands that never touch
    the case log (training, leave-one-lab-out) then run where its database libraries are not
    installed, such as a GPU machine."""
    store = sys.modules.get("leuko.store")
    return (store.StoreError, store.StoreUnavailableError) if store else ()


def main(argv: Sequence[str] | None = None) -> int:
    from leuko.device import DeviceError
    from leuko.modelstore import ModelIntegrityError, ModelNotFoundError

    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")
        return 0
    except _Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (ModelNotFoundError, ModelIntegrityError, DeviceError, ValueError, KeyError, *_store_errors()) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except EOFError:
        print("error: the input ended before a value was given", file=sys.stderr)
        return 2
