"""Server-side PNGs (matplotlib, Agg: no display; one Figure per call, so safe in threads).

Three pictures of a job, drawn from its epoch records alone (no ML here, only drawing):

- ``gradient_flow_png``: a heatmap, one row per layer with parameters (input side at the
  bottom, output side at the top) and one column per epoch; colour = the layer's mean
  gradient norm on a *fixed* logarithmic scale (``GRAD_LOG10_RANGE``), so the same colour means
  the same size in every job: vanishing layers are black, healthy ones orange, exploding ones
  pale yellow. A gradient that was exactly zero is drawn in the darkest colour; a cell whose
  gradient held NaN/Inf is hatched in red.
- ``loss_png``: the mean loss per epoch (with the range of its step losses), non-finite epochs
  marked, and accuracy against chance when the task is classification.
- ``temporal_png``: for a recurrent layer, the norm of the loss gradient at every time step,
  one line per epoch, on a log scale: a gradient that vanishes through time falls off a cliff
  towards the first steps.

``PngCache`` keeps rendered PNGs of final jobs in memory (their epochs never change again).
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _matplotlib() -> None:
    """Import matplotlib on the first picture, not with the API (it costs a second or two of
    start-up that /readyz, the CLI and the workers never need)."""
    if "Figure" in globals():
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    from matplotlib.transforms import ScaledTranslation

    globals().update(colormaps=colormaps, Normalize=Normalize, Patch=Patch, Rectangle=Rectangle,
                     FuncFormatter=FuncFormatter, MaxNLocator=MaxNLocator, ScaledTranslation=ScaledTranslation,
                     Figure=Figure)  # Figure last: its presence means "all loaded"

#: log10 of the gradient norm at the two ends of the colour bar. Fixed, not per job: a job
#: whose every layer has a gradient of 1e-9 must look dark, not "normalised" into bright.
GRAD_LOG10_RANGE = (-10.0, 4.0)
#: rough bands for the colour bar's words (presentation only; the verdict is the engine's).
VANISHING_BELOW = -5.0
EXPLODING_ABOVE = 2.0
CMAP = "inferno"
NONFINITE_COLOUR = "#e41a1c"
MISSING_COLOUR = "#d9d9d9"
VANISHING_COLOUR = "#2b6cb0"
DPI = 100


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _log10(value: Any) -> float:
    """log10 of a norm; exactly zero -> -inf (drawn in the darkest colour); unknown -> NaN."""
    v = _finite(value)
    if v is None or v < 0:
        return math.nan
    return math.log10(v) if v > 0 else -math.inf


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _title(kind: str, name: str, verdict: str | None) -> str:
    return f"{kind}: {name}" + (f"  ({verdict})" if verdict else "")


def _empty(fig: Figure, title: str, message: str) -> bytes:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def _epoch_ticks(ax: Any, epochs: list[int]) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(12, max(len(epochs), 1)), integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _pos: str(epochs[int(round(x))]) if 0 <= int(round(x)) < len(epochs) and abs(x - round(x)) < 1e-6 else ""))


def layer_names(records: list[dict[str, Any]]) -> list[str]:
    """Layers with parameters in the order the records list them (input side first)."""
    names: list[str] = []
    seen: set[str] = set()
    for record in records:
        for layer in record.get("layers") or []:
            name = layer.get("name")
            if name is not None and name not in seen:
                seen.add(name)
                names.append(name)
    return names


def gradient_flow_png(title: str, records: list[dict[str, Any]], verdict: str | None = None,
                      layer_verdicts: dict[str, str] | None = None) -> bytes:
    """Layers (input side at the bottom) x epochs; colour = log10 of the epoch-mean gradient norm.
    `layer_verdicts` ({name: "vanishing"|"exploding"|"healthy"}, the report's `layers`) colours
    the names of the layers the report blames."""
    _matplotlib()
    names = layer_names(records)
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    fig_title = _title("Gradient flow", title, verdict)
    if not names or not epochs:
        return _empty(Figure(figsize=(7.5, 3.0), dpi=DPI), fig_title, "no epochs recorded yet")
    row_of = {name: i for i, name in enumerate(names)}
    grid = [[math.nan] * len(epochs) for _ in names]
    nonfinite: list[tuple[int, int]] = []
    for col, record in enumerate(records):
        for layer in record.get("layers") or []:
            row = row_of.get(layer.get("name"))
            if row is None:
                continue
            grid[row][col] = _log10((layer.get("grad_norm") or {}).get("mean"))
            if layer.get("nonfinite_grads"):
                nonfinite.append((row, col))

    n_rows, n_cols = len(names), len(epochs)
    longest = max(len(n) for n in names)
    label_in = min(0.065 * longest, 3.5)
    width = min(max(7.5, 2.6 + label_in + 0.42 * n_cols), 16.0)
    height = min(max(3.8, 1.7 + 0.26 * n_rows), 30.0)
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_subplot()
    base = colormaps[CMAP]
    cmap = base.with_extremes(bad=MISSING_COLOUR, under=base(0.0), over=base(1.0))
    lo, hi = GRAD_LOG10_RANGE
    # -inf (an exactly-zero gradient) must land "under" the range, not be treated as missing.
    shown = [[lo - 1.0 if v == -math.inf else v for v in row] for row in grid]
    image = ax.imshow(shown, aspect="auto", origin="lower", cmap=cmap, norm=Normalize(lo, hi),
                      interpolation="nearest")
    for row, col in nonfinite:
        # over the colour of the finite steps' mean if there is one, over white if not
        face = "white" if math.isnan(grid[row][col]) else "none"
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, facecolor=face, edgecolor=NONFINITE_COLOUR,
                               hatch="xxx", linewidth=0.0))
    if n_cols <= 60 and n_rows <= 80:  # thin white grid lines separate the cells
        ax.set_xticks([c - 0.5 for c in range(1, n_cols)], minor=True)
        ax.set_yticks([r - 0.5 for r in range(1, n_rows)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
    _epoch_ticks(ax, epochs)
    step = max(1, math.ceil(n_rows / 60))
    rows = list(range(0, n_rows, step))
    ax.set_yticks(rows, [names[r] for r in rows], fontsize=8 if n_rows > 24 else 9)
    blamed = {"vanishing": VANISHING_COLOUR, "exploding": NONFINITE_COLOUR}
    flagged = set()
    for label, r in zip(ax.get_yticklabels(), rows):
        colour = blamed.get((layer_verdicts or {}).get(names[r], ""))
        if colour:
            label.set_color(colour)
            label.set_fontweight("bold")
            flagged.add((layer_verdicts or {})[names[r]])
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer  (input at the bottom)")
    ax.set_title(fig_title, fontsize=12, fontweight="bold")

    bar = fig.colorbar(image, ax=ax, extend="both", pad=0.05, fraction=0.05 if n_cols > 4 else 0.08)
    ticks = list(range(int(lo), int(hi) + 1, 2 if hi - lo > 8 else 1))
    bar.set_ticks(ticks, labels=[f"1e{t}" if t else "1" for t in ticks])
    bar.set_label("gradient norm (epoch mean, log scale)")
    # words beside the numbers, left of the bar: which end of the scale is which
    left = bar.ax.get_yaxis_transform() + ScaledTranslation(-4 / 72, 0, fig.dpi_scale_trans)
    for y0, y1, word, colour in ((lo, VANISHING_BELOW, "vanishing", VANISHING_COLOUR),
                                 (EXPLODING_ABOVE, hi, "exploding", NONFINITE_COLOUR)):
        bar.ax.plot([0, 0], [y0, y1], transform=left, color=colour, lw=3, clip_on=False, solid_capstyle="butt")
        bar.ax.text(0, (y0 + y1) / 2, word, rotation=90, ha="right", va="center", transform=left
                    + ScaledTranslation(-3 / 72, 0, fig.dpi_scale_trans), fontsize=8, color=colour)
    legend = []
    if any(v < lo for row in grid for v in row):
        legend.append(Patch(facecolor=cmap(0.0), edgecolor="#444", label=f"zero, or below 1e{int(lo)}"))
    if nonfinite:
        legend.append(Patch(facecolor="white", edgecolor=NONFINITE_COLOUR, hatch="xxx", label="NaN/Inf gradient in that epoch"))
    for kind in sorted(flagged):
        legend.append(Patch(facecolor=blamed[kind], edgecolor="none", label=f"name in bold: the report finds it {kind}"))
    bad_cells = set(nonfinite)
    if any(math.isnan(v) and (r, c) not in bad_cells for r, row in enumerate(grid) for c, v in enumerate(row)):
        legend.append(Patch(facecolor=MISSING_COLOUR, edgecolor="#444", label="no data"))
    if legend:
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.06 if height < 6 else 0.035) if legend else 0, 1, 1))
    return _png(fig)


def loss_png(title: str, records: list[dict[str, Any]], verdict: str | None = None) -> bytes:
    """Mean loss per epoch (band: the epoch's lowest to highest step loss), non-finite epochs
    marked in red; accuracy (right axis) against chance for classification."""
    _matplotlib()
    fig_title = _title("Loss", title, verdict)
    if not records:
        return _empty(Figure(figsize=(7.5, 3.0), dpi=DPI), fig_title, "no epochs recorded yet")
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    losses = [_finite(r.get("loss")) if not r.get("nonfinite") else None for r in records]
    bad = [e for e, r, v in zip(epochs, records, losses) if r.get("nonfinite") or v is None]
    fig = Figure(figsize=(8.0, 4.2), dpi=DPI)
    ax = fig.add_subplot()
    finite = [(e, v) for e, v in zip(epochs, losses) if v is not None]
    handles: list[Any] = []
    if finite:
        lows, highs, band_epochs = [], [], []
        for e, r in zip(epochs, records):
            stats = r.get("loss_stats") or {}
            lo, hi = _finite(stats.get("min")), _finite(stats.get("max"))
            if lo is not None and hi is not None:
                band_epochs.append(e)
                lows.append(lo)
                highs.append(hi)
        if band_epochs:
            handles.append(ax.fill_between(band_epochs, lows, highs, color="#1f77b4", alpha=0.15,
                                           label="range of step losses", step=None))
        (line,) = ax.plot([e for e, _ in finite], [v for _, v in finite], "o-", color="#1f77b4", lw=2, label="mean loss")
        handles.insert(0, line)
        values = [v for _, v in finite] + lows + highs
        if min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "the loss was not finite (NaN/Inf) in any epoch", ha="center", va="center",
                transform=ax.transAxes, fontsize=11, color=NONFINITE_COLOUR)
        ax.set_yticks([])
    if bad:
        for e in bad:
            ax.axvspan(e - 0.5, e + 0.5, color=NONFINITE_COLOUR, alpha=0.12, lw=0)
        handles.append(ax.scatter(bad, [1.0] * len(bad), transform=ax.get_xaxis_transform(), marker="X", s=90,
                                  color=NONFINITE_COLOUR, clip_on=False, zorder=5, label="loss NaN/Inf"))
    accuracy = [_finite((r.get("metrics") or {}).get("accuracy")) for r in records]
    if any(a is not None for a in accuracy):
        twin = ax.twinx()
        pts = [(e, a) for e, a in zip(epochs, accuracy) if a is not None]
        (acc_line,) = twin.plot([e for e, _ in pts], [a for _, a in pts], "s--", color="#2ca02c", lw=1.5, label="accuracy")
        handles.append(acc_line)
        chance = next((_finite((r.get("metrics") or {}).get("chance_accuracy")) for r in records
                       if _finite((r.get("metrics") or {}).get("chance_accuracy")) is not None), None)
        if chance is not None:
            handles.append(twin.axhline(chance, color="#2ca02c", lw=1, ls=":", label="chance accuracy"))
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("accuracy (training set)", color="#2ca02c")
    ax.set_xlim(min(epochs) - 0.6, max(epochs) + 0.6)
    _epoch_ticks_numeric(ax, epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(fig_title, fontsize=12, fontweight="bold")
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return _png(fig)


def _epoch_ticks_numeric(ax: Any, epochs: list[int]) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(12, max(len(epochs), 2)), integer=True))


def has_temporal(records: list[dict[str, Any]]) -> bool:
    return any((r.get("temporal") or {}).get("grad_norm_by_step") for r in records)


def temporal_png(title: str, records: list[dict[str, Any]], verdict: str | None = None) -> bytes:
    """||dL/dh_t|| for every time step t of the first recurrent layer, one line per epoch."""
    _matplotlib()
    series = [(int(r.get("epoch", i + 1)), r["temporal"]) for i, r in enumerate(records)
              if (r.get("temporal") or {}).get("grad_norm_by_step")]
    fig_title = _title("Gradient through time", title, verdict)
    if not series:
        return _empty(Figure(figsize=(8.0, 3.0), dpi=DPI), fig_title, "no time-step gradients recorded yet")
    if len(series) > 12:  # a readable number of lines: first, last and evenly spaced between
        keep = sorted({round(i * (len(series) - 1) / 11) for i in range(12)})
        series = [series[i] for i in keep]
    temporal = series[-1][1]
    wrt = temporal.get("wrt", "hidden")
    symbol = "h" if wrt == "hidden" else "x"
    fig = Figure(figsize=(8.0, 4.4), dpi=DPI)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    first_epoch, last_epoch = series[0][0], series[-1][0]
    zeros = False
    for epoch, t in series:
        values = t.get("grad_norm_by_step") or []
        pts = [(step, f) for step, raw in enumerate(values, start=1) if (f := _finite(raw)) is not None and f > 0]
        zeros = zeros or any(_finite(v) == 0 for v in values)
        shade = 0.0 if last_epoch == first_epoch else (epoch - first_epoch) / (last_epoch - first_epoch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=cmap(0.9 * shade), lw=2 if epoch in (first_epoch, last_epoch) else 1.2,
                label=f"epoch {epoch}", marker="o" if len(values) <= 30 else None, markersize=3)
    ax.set_yscale("log")
    steps = len(temporal.get("grad_norm_by_step") or [])
    ax.set_xlim(0.5, steps + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.set_xlabel(f"time step t  (1 = first input of the sequence, {steps} = last)")
    ax.set_ylabel(f"‖∂loss/∂{symbol}ₜ‖  (log scale)")
    ax.set_title(fig_title + f"\n{temporal.get('layer', '')}, gradient with respect to the {wrt} state"
                 if wrt == "hidden" else fig_title + f"\n{temporal.get('layer', '')}, gradient with respect to the input",
                 fontsize=11, fontweight="bold")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2 if len(series) > 6 else 1, framealpha=0.9)
    note = "a line that falls steeply towards t = 1: early inputs get (almost) no gradient — vanishing through time"
    if zeros:
        note += "; exactly-zero steps are not drawn"
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _png(fig)


PLOTS: dict[str, Callable[..., bytes]] = {
    "gradient-flow": gradient_flow_png,
    "loss": loss_png,
    "temporal": temporal_png,
}


class PngCache:
    """A small thread-safe LRU of rendered PNGs. Only final jobs are cached (their epochs never
    change again); the key holds the job's `updated_at` too, so a row that does change (a
    verification child finishing) can never serve a stale picture."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_render(self, key: Hashable, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return png
            self.misses += 1
        png = render()  # outside the lock: two concurrent misses both render, one wins; harmless
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return png

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


cache = PngCache()


# -- serving a job's picture (used by the /v1/jobs/{id}/plots/*.png endpoints) ---------------

FINAL = ("succeeded", "failed", "cancelled")
RECURRENT_TYPES = {"rnn", "lstm", "gru"}


def mentions_recurrent(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") in RECURRENT_TYPES or any(mentions_recurrent(v) for v in node.values())
    if isinstance(node, list):
        return any(mentions_recurrent(v) for v in node)
    return False


def job_plot_response(request: Any, session: Any, job: Any, plot: str) -> Any:
    """The PNG `plot` ("gradient-flow", "loss", "temporal") of `job` (already tenant-checked).
    Final jobs: rendered once, cached in-process, `ETag` + `Cache-Control: private, max-age`;
    running jobs: rendered on every request, `no-store`."""
    from fastapi.responses import Response

    from service.epoch_store import load_records
    from service.problems import Problem

    final = job.status in FINAL
    etag = f'"{job.id}-{plot}-{job.updated_at.timestamp() if job.updated_at else 0:.6f}"'
    if final and request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})

    def render() -> bytes:
        records = load_records(session, job.id)
        if plot == "temporal" and not has_temporal(records) and not (
                mentions_recurrent(job.spec) or mentions_recurrent(job.declared_layers)):
            return b""  # cached too: a final job never grows a recurrent layer
        if plot == "gradient-flow" and final and isinstance(job.report, dict):
            blamed = {layer.get("name"): layer.get("verdict") for layer in job.report.get("layers") or []
                      if isinstance(layer, dict)}
            return gradient_flow_png(job.name, records, job.verdict, blamed)
        return PLOTS[plot](job.name, records, job.verdict if final else None)

    if final:
        png = cache.get_or_render((job.id, plot, etag), render)
    else:
        png = render()
    if not png:
        raise Problem(404, "no-temporal", "No recurrent layer",
                      "This job has no recurrent layer, so there is no gradient through time to plot.")
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"} if final else {"Cache-Control": "no-store"}
    return Response(png, media_type="image/png", headers=headers)
