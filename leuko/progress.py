"""Progress events emitted by training and evaluation, and a terminal progress bar for them.

The training loop only emits :class:`ProgressEvent`; the CLI shows them with
:class:`TerminalProgress` and the Streamlit page with its own widgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
