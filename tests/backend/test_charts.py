"""Chart layout: no text or legend entry overlaps another, the plot or the image edge, whatever the inputs."""
from __future__ import annotations

import io
import math
from itertools import combinations

import numpy as np
from hypothesis import given, settings, strategies as st
from PIL import Image

from backend.charts import COLOURS, Box, Layout, chart_layout, line_chart

REPORT_NAMES = ["mean IoU with the final annotation", "regions accepted unchanged"]
words = st.text(st.characters(min_codepoint=32, max_codepoint=0x24F, exclude_categories=("Cc", "Cs")), max_size=40)
texts = st.lists(words, max_size=6).map(" ".join)  # word breaks in any place, words of any length


def overlaps(a: Box, b: Box) -> bool:
    """Whether two boxes (right and bottom exclusive) share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def assert_apart(placed: Layout) -> None:
    width, height = placed.size
    boxes = placed.boxes()
    for name, (left, top, right, bottom) in boxes:
        assert 0 <= left and 0 <= top and right <= width and bottom <= height, (name, placed.size)
    for (a, box_a), (b, box_b) in combinations(boxes, 2):
        assert not overlaps(box_a, box_b), (a, box_a, b, box_b)


@settings(max_examples=150, deadline=None)
@given(names=st.lists(texts | st.sampled_from(REPORT_NAMES), min_size=1, max_size=6, unique=True),
       positions=st.integers(1, 200), tick=texts, numbered=st.booleans(), title=texts, x_label=texts, y_label=texts,
       lo=st.floats(-1e6, 1e6), span=st.floats(0, 1e6))
def test_nothing_overlaps_for_any_names_ticks_and_labels(names: list[str], positions: int, tick: str, numbered: bool,
                                                        title: str, x_label: str, y_label: str, lo: float,
                                                        span: float) -> None:
    series = {name: [lo + span * ((i * (k + 3)) % 7) / 6 for i in range(positions)] for k, name in enumerate(names)}
    ticks = [f"{tick}{i}" for i in range(positions)] if numbered else [tick] * positions
    placed, _ = chart_layout(series, title, x_label, y_label, x_ticks=ticks)
    assert_apart(placed)
    assert len(placed.legend) == len(names) and placed.x_ticks[0][0] == 0
    y_ticks = [t.lines[0] for t in placed.y_ticks]
    assert 4 <= len(y_ticks) <= 7 and len(set(y_ticks)) == len(y_ticks)
    assert all(t.box[2] <= placed.plot[0] for t in placed.y_ticks)


def test_the_report_legend_and_labels_are_apart_and_short_ticks_all_shown() -> None:
    for versions in (1, 3, 15):
        series = {name: [0.5] * versions for name in REPORT_NAMES}
        placed, grid = chart_layout(series, "pre-label quality, project 1", "model version", "share / IoU",
                                    x_ticks=[f"v{i + 1}" for i in range(versions)], y_range=(0.0, 1.0))
        assert_apart(placed)
        assert [i for i, _ in placed.x_ticks] == list(range(versions))  # room for every version's name
        assert [t.lines[0] for t in placed.y_ticks] == ["0.00", "0.25", "0.50", "0.75", "1.00"] and grid[-1] == 1.0
        assert len({e.box[1] for e in placed.legend}) == 1  # both entries fit on one row


def test_crowded_ticks_are_thinned_and_long_names_take_more_legend_rows() -> None:
    names = [f"series {k} " + "with a very long name " * k for k in range(6)]
    placed, _ = chart_layout({n: [0.0] * 200 for n in names}, "t", "step", "loss")
    assert_apart(placed)
    kept = [i for i, _ in placed.x_ticks]
    assert 5 <= len(kept) < 200 and len({b - a for a, b in zip(kept, kept[1:])}) == 1
    assert len({e.box[1] for e in placed.legend}) >= 3
    short, _ = chart_layout({"a": [0.0] * 200}, "t", "step", "loss")
    assert placed.size[1] > short.size[1]  # the image grew for the legend, the plot did not shrink
    assert placed.plot[3] - placed.plot[1] == short.plot[3] - short.plot[1]


def render(series: dict[str, list[float]], **kwargs) -> tuple[np.ndarray, Layout, list[float]]:
    args = (series, "a title " * 20, "the x axis " * 10, "the y axis " * 8)
    png = Image.open(io.BytesIO(line_chart(*args, **kwargs)))
    placed, grid = chart_layout(*args, **kwargs)
    assert png.size == placed.size
    return np.asarray(png.convert("RGB")).astype(int), placed, grid


def test_every_drawn_pixel_lies_in_its_box_and_every_text_is_drawn() -> None:
    losses = {f"loss {k} " * (k + 1): [math.exp(-i / 30) + k for i in range(100)] for k in range(6)}
    for series, kwargs in [({n: [0.1, 1.4, float("nan"), 0.0] for n in REPORT_NAMES}, {"y_range": (0.0, 1.0)}),
                           (losses, {}), ({"v": [3.0]}, {"x_ticks": ["a rather long tick label that gets cut short"]})]:
        pixels, placed, _ = render(series, **kwargs)
        inked = (pixels != 255).any(axis=-1)
        covered = np.zeros_like(inked)
        for _, (left, top, right, bottom) in placed.boxes():
            covered[top:bottom, left:right] = True
            assert inked[top:bottom, left:right].any()
        assert not (inked & ~covered).any()


def test_a_missing_value_leaves_a_gap_in_its_line() -> None:
    pixels, placed, grid = render({"only": [0.2, float("nan"), 0.8]}, y_range=(0.0, 1.0))
    colour = np.array(COLOURS[0])
    column = pixels[placed.plot[1]:placed.plot[3], round(placed.x_at(1))]
    assert not (np.abs(column - colour).sum(axis=-1) < 60).any()
    for i, v in ((0, 0.2), (2, 0.8)):  # the two values are drawn where they belong
        y = round(placed.y_at((v - grid[0]) / (grid[-1] - grid[0])))
        assert (np.abs(pixels[y, round(placed.x_at(i))] - colour).sum() < 60)
