"""Progress events emitted by training and evaluation, and a terminal progress bar for them.

The training loop only emits :class:`ProgressEvent`; the CLI shows them with
:class:`TerminalProgress` and the Streamlit page with its own widgets.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from tqdm import tqdm

EventKind = Literal["start", "phase", "step", "epoch", "done", "message"]


@dataclass
class ProgressEvent:
    """One moment of a run. ``elapsed_s`` and ``eta_s`` are seconds; ``metrics`` holds the
    epoch's train/validation figures on ``epoch`` events."""

    kind: EventKind
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""


Callback = Callable[[ProgressEvent], None]


class TerminalProgress:
    """A tqdm bar per epoch plus one summary line per epoch."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=event.steps, desc=f"epoch {event.epoch}/{event.epochs}",
                                leave=False, dynamic_ncols=True)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{event.loss:.4f}")
        elif event.kind == "epoch":
            self.close()
            figures = "  ".join(f"{k} {v:.4f}" for k, v in event.metrics.items()
                                if isinstance(v, float))
            eta = f"  ~{event.eta_s / 60:.1f} min left" if event.eta_s else ""
            tqdm.write(f"epoch {event.epoch}/{event.epochs}  {figures}  "
                       f"({event.elapsed_s:.0f} s){eta}")
        elif event.kind in ("start", "phase", "done", "message"):
            self.close()
            tqdm.write(event.message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlProgress:
    """Appends events to a JSON-lines file that another process (the Train page) follows.
    Step events are written at most every ``step_interval_s`` seconds, and on an epoch's
    last step, to keep the file small."""

    def __init__(self, path: Path, step_interval_s: float = 1.0) -> None:
        self.path = path
        self.step_interval_s = step_interval_s
        self._last_step = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "step":
            now = time.monotonic()
            if now - self._last_step < self.step_interval_s and event.step != event.steps:
                return
            self._last_step = now
        with self.path.open("a") as handle:
            handle.write(json.dumps(asdict(event), default=str) + "\n")
