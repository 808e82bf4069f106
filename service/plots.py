"""Server-side PNGs (matplotlib, Agg: no display, safe in threads with one figure per call)."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)


def _log10(value: Any) -> float:
    return math.log10(value) if isinstance(value, (int, float)) and value > 0 and math.isfinite(value) else math.nan


def gradient_flow_png(title: str, records: list[dict[str, Any]]) -> bytes:
    """Layers (input side at the bottom) x epochs; colour = log10 mean gradient norm.
    Cells whose gradient was non-finite are marked with a red cross."""
    names: list[str] = []
    for record in records:
        for layer in record.get("layers") or []:
            if layer["name"] not in names:
                names.append(layer["name"])
    epochs = [r["epoch"] for r in records]
    grid = [[math.nan] * len(epochs) for _ in names]
    bad: list[tuple[int, int]] = []
    for col, record in enumerate(records):
        for layer in record.get("layers") or []:
            row = names.index(layer["name"])
            grid[row][col] = _log10((layer.get("grad_norm") or {}).get("mean"))
            if layer.get("nonfinite_grads"):
                bad.append((row, col))

    height = min(2.0 + 0.28 * max(len(names), 1), 30.0)
    fig = Figure(figsize=(max(6.0, 1.2 + 0.45 * max(len(epochs), 1)), height), dpi=100)
    ax = fig.add_subplot()
    if names and epochs:
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("log10 gradient norm (epoch mean)")
        for row, col in bad:
            ax.plot(col, row, marker="x", color="red", markersize=9, mew=2)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 20 else 9)
    else:
        ax.text(0.5, 0.5, "no epochs recorded yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer (input side at the bottom)")
    ax.set_title(f"Gradient flow: {title}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
