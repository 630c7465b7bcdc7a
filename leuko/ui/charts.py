"""Plotly figures shared by the pages: probabilities, confusion matrices, training curves."""

from __future__ import annotations

import plotly.graph_objects as go

from leuko.analysis import percent
from leuko.tasks import Task

LAYOUT = dict(margin=dict(l=10, r=10, t=30, b=10), height=260)


def probability_bars(task: Task, probabilities: dict[str, float], review_threshold: float | None = None) -> go.Figure:
    """Horizontal bars of calibrated class probabilities (0-1); the top class is dark, and the
    review threshold, when known, is a dashed line. Every bar carries its class name and its
    probability rounded as the page's heading rounds it (:func:`leuko.analysis.percent`),
    outside the bar so that a bar too short to hold it still shows it."""
    names = [task.info(c).display for c in probabilities]
    values = list(probabilities.values())
    top = max(range(len(values)), key=values.__getitem__)
    colours = ["#5b2a86" if i == top else "#b9a7cf" for i in range(len(values))]
    figure = go.Figure(go.Bar(x=values, y=names, orientation="h", marker_color=colours,
                              text=[percent(v) for v in values], textposition="outside", cliponaxis=False))
    if review_threshold:
        figure.add_vline(x=review_threshold, line_dash="dash", line_color="#c0392b")
        figure.add_annotation(x=review_threshold, y=1.0, yref="paper", xanchor="right", yanchor="bottom",
                              text="review below", showarrow=False, font=dict(color="#c0392b", size=11))
    figure.update_layout(xaxis=dict(range=[0, 1.15], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=".0%",
                                    title="calibrated probability"),
                         **{**LAYOUT, "margin": dict(l=10, r=40, t=30, b=10)})
    figure.update_yaxes(autorange="reversed", tickmode="array", tickvals=names, ticktext=names)
    return figure


def confusion_heatmap(matrix: list[list[int]], classes: list[str], title: str = "", rows: str = "true",
                      columns: str = "predicted") -> go.Figure:
    """A count table as a heat map; ``rows`` and ``columns`` name what the axes hold."""
    figure = go.Figure(go.Heatmap(z=matrix, x=classes, y=classes, colorscale="Purples", showscale=False,
                                  text=matrix, texttemplate="%{text}"))
    figure.update_layout(title=title, xaxis_title=columns, yaxis_title=rows, **{**LAYOUT, "height": 320})
    figure.update_yaxes(autorange="reversed")
    return figure


def training_curves(history: list[dict]) -> go.Figure:
    """Train and validation loss (left axis) and validation accuracy (right axis) by epoch."""
    epochs = [h["epoch"] for h in history]
    figure = go.Figure()
    figure.add_scatter(x=epochs, y=[h.get("train_loss") for h in history], name="train loss")
    figure.add_scatter(x=epochs, y=[h.get("val_loss") for h in history], name="val loss")
    figure.add_scatter(x=epochs, y=[h.get("val_accuracy") for h in history], name="val accuracy", yaxis="y2")
    figure.update_layout(xaxis_title="epoch", yaxis=dict(title="loss"),
                         yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1]),
                         **{**LAYOUT, "height": 320})
    return figure


def recall_bars(task: Task, per_class: dict[str, dict]) -> go.Figure:
    """Per-class recall (sensitivity, 0-1) on a model's test split."""
    names = [task.info(c).display for c in per_class]
    values = [m["sensitivity"] for m in per_class.values()]
    figure = go.Figure(go.Bar(x=values, y=names, orientation="h", marker_color="#8e6bb5",
                              text=[f"{v:.1%}" for v in values], textposition="auto"))
    figure.update_layout(xaxis=dict(range=[0, 1], title="recall on the test split"), **LAYOUT)
    figure.update_yaxes(autorange="reversed")
    return figure
