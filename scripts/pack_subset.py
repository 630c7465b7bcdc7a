"""Pack a task's training data into a small data folder, to carry it to a GPU machine.

A data folder (``manifest.csv`` and images) is written with the train split limited per
class and lab exactly as ``TrainConfig.limit_train`` limits it (same seed, same choice), a
capped val split, and no test split: the test split is measured where the full data is.
Images are re-encoded as WebP to fit a transfer limit. The output is never committed (the
images are the shared data's).

    python scripts/pack_subset.py --config configs/wbc_type_lite0.yaml --limit-train 380 \
        --limit-val 60 --out .gpudata
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image

from leuko.config import TrainConfig
from leuko.tasks import get_task
from leuko.train import limit_per_class, load_split, load_training_samples, resolve_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--limit-train", type=int, required=True, help="train images per class and lab")
    parser.add_argument("--limit-val", type=int, required=True, help="val images per class and lab")
    parser.add_argument("--quality", type=int, default=75, help="WebP quality")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = resolve_config(TrainConfig.from_yaml(args.config).with_overrides(limit_train=args.limit_train))
    task = get_task(config.task)
    root = Path(config.data_root)
    splits = {"train": load_training_samples(config, task),
              "val": limit_per_class(load_split(config, task, "val"), args.limit_val, config.seed)}
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(args.out / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "mask", "dataset", "task", "label", "split"])
        for split, samples in splits.items():
            for sample in samples:
                relative = sample.path.relative_to(root).with_suffix(".webp")
                target = args.out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.open(sample.path).convert("RGB").save(target, "WEBP", quality=args.quality)
                total += target.stat().st_size
                writer.writerow([relative.as_posix(), "", sample.dataset, task.id, task.class_ids[sample.label], split])
    print(f"{sum(map(len, splits.values()))} images, {total / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
