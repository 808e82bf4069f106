"""service.plots: the pictures say what the numbers say (checked on pixels), and final jobs'
PNGs are rendered once."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from service import plots

PNG = b"\x89PNG\r\n\x1a\n"


def record(epoch: int, norms: list[float | None], *, loss: float | None = 1.0, nonfinite: list[int] = (),
           temporal: list[float] | None = None) -> dict:
    return {
        "epoch": epoch, "loss": loss, "nonfinite": loss is None, "metrics": {"accuracy": 0.5, "chance_accuracy": 0.1},
        "loss_stats": {"first": loss, "last": loss, "min": loss and loss * 0.8, "max": loss and loss * 1.2},
        "layers": [{"name": f"layers.{i}.linear", "type": "linear",
                    "grad_norm": {"mean": n}, "nonfinite_grads": 3 if i in nonfinite else 0}
                   for i, n in enumerate(norms)],
        "temporal": None if temporal is None else {"layer": "layers.0.rnn", "wrt": "hidden", "grad_norm_by_step": temporal},
    }


def image(png: bytes) -> Image.Image:
    assert png[:8] == PNG
    return Image.open(io.BytesIO(png)).convert("RGB")


def brightness(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def heatmap_column(img: Image.Image) -> list[tuple[int, int, int]]:
    """The pixels down the middle of the heatmap (the widest run of non-white columns' centre)."""
    width, height = img.size
    x = int(width * 0.45)
    return [img.getpixel((x, y)) for y in range(height)]


def test_vanishing_is_dark_at_the_bottom_and_healthy_is_not() -> None:
    depth = 8
    vanishing = [record(e, [10.0 ** (-12 + 1.5 * i) for i in range(depth)]) for e in (1, 2, 3)]
    healthy = [record(e, [0.5] * depth) for e in (1, 2, 3)]
    v_img, h_img = image(plots.gradient_flow_png("v", vanishing)), image(plots.gradient_flow_png("h", healthy))
    assert v_img.size == h_img.size
    # Rows of the heatmap: sample a quarter and three quarters up the plotting area.
    column_v, column_h = heatmap_column(v_img), heatmap_column(h_img)
    coloured = [y for y, px in enumerate(column_h) if px != (255, 255, 255) and brightness(px) < 240]
    top, bottom = min(coloured), max(coloured)
    low, high = bottom - (bottom - top) // 8, top + (bottom - top) // 8
    # Input side (bottom) of the vanishing net: near black; its output side (top): bright.
    assert brightness(column_v[low]) < 40, column_v[low]
    assert brightness(column_v[high]) > 100, column_v[high]
    # A healthy net is the same colour at both ends, and clearly not dark.
    assert abs(brightness(column_h[low]) - brightness(column_h[high])) < 10
    assert brightness(column_h[low]) > 100


def test_fixed_scale_an_all_tiny_network_is_dark_everywhere() -> None:
    """The colour scale is fixed: uniformly vanished gradients are not 'normalised' into bright."""
    tiny = [record(e, [1e-11] * 5) for e in (1, 2)]
    column = heatmap_column(image(plots.gradient_flow_png("t", tiny)))
    coloured = sorted(brightness(px) for px in column if brightness(px) < 240)
    assert coloured and coloured[len(coloured) // 2] < 30  # the cells; a few pixels are text/edges


def test_nonfinite_cells_are_marked_red() -> None:
    records = [record(1, [0.5, None, 0.5], nonfinite=[1]), record(2, [None, None, None], loss=None, nonfinite=[0, 1, 2])]
    img = image(plots.gradient_flow_png("nan", records, verdict="exploding"))
    px = np.asarray(img).reshape(-1, 3).astype(int)
    reds = int(((px[:, 0] > 200) & (px[:, 1] < 80) & (px[:, 2] < 80)).sum())
    assert reds > 200  # the hatching (and the legend swatch)


def test_zero_gradient_is_drawn_darkest_not_missing() -> None:
    column = heatmap_column(image(plots.gradient_flow_png("zeros", [record(1, [0.0, 0.0, 0.3])])))
    assert min(brightness(px) for px in column) < 15  # black, not the light grey of "no data"


def test_empty_and_loss_and_temporal_render() -> None:
    assert image(plots.gradient_flow_png("empty", [])).size[0] > 100
    assert image(plots.loss_png("empty", [])).size[0] > 100
    recs = [record(1, [1.0], loss=2.0, temporal=[1e-9, 1e-6, 1e-3, 1.0]),
            record(2, [1.0], loss=None, temporal=[None, 0.0, 1e-3, 1.0])]
    assert image(plots.loss_png("l", recs)).size == (800, 420)
    assert image(plots.temporal_png("t", recs, verdict="vanishing")).size == (800, 440)
    assert plots.has_temporal(recs) and not plots.has_temporal([record(1, [1.0])])
    assert plots.mentions_recurrent({"network": {"layers": [{"type": "rnn", "cell": "gru"}]}})
    assert not plots.mentions_recurrent({"network": {"layers": [{"type": "linear"}]}})


def test_many_layers_and_epochs_stay_within_bounds() -> None:
    records = [record(e, [math.exp(-i / 10) for i in range(120)]) for e in range(1, 61)]
    width, height = image(plots.gradient_flow_png("big", records)).size
    assert width <= 1600 and height <= 3000


def test_cache_renders_once_and_evicts_least_recent() -> None:
    cache = plots.PngCache(maxsize=2)
    calls: list[str] = []

    def render(name: str):  # noqa: ANN202
        return lambda: (calls.append(name), name.encode())[1]

    assert cache.get_or_render("a", render("a")) == b"a"
    assert cache.get_or_render("a", render("a")) == b"a"
    assert calls == ["a"] and cache.hits == 1
    cache.get_or_render("b", render("b"))
    cache.get_or_render("a", render("a"))  # a is now the most recent
    cache.get_or_render("c", render("c"))  # evicts b
    cache.get_or_render("b", render("b"))
    assert calls == ["a", "b", "c", "b"] and len(cache) == 2
