"""Small PNG line charts drawn with Pillow: tuning loss curves and quality over model versions.

Pillow is already a dependency; a plotting library would add tens of megabytes to the
image for two charts. ``layout`` places every piece of text and every legend entry as a
box around the plot frame, measured with the font, so that nothing overlaps whatever the
series names, their number or the number of x positions (the image grows taller for a
long legend); ``line_chart`` draws exactly those boxes.
"""
from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from functools import cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))
WIDTH = 720
PLOT_HEIGHT = 300
MARGIN = 8  # image edge to anything drawn
GAP = 6  # between neighbouring elements
PAD = 6  # inside the frame, so the dots of values on the range's ends stay inside it
TICK = 4  # length of the x tick marks, drawn inside the frame
SWATCH = 22  # length of a legend entry's line
ENTRY_GAP = 18  # between legend entries on one row
MAX_TICK_WIDTH = 96  # longer x tick labels are cut short with an ellipsis
Y_TICKS = 5  # about this many y tick values, at a round step

Box = tuple[int, int, int, int]  # left, top, right, bottom; right and bottom exclusive


@dataclass(frozen=True)
class Text:
    """Lines drawn as one block whose ink and advance lie in ``box`` (turned a quarter left when ``rotated``)."""

    lines: tuple[str, ...]
    box: Box
    centred: bool = False
    rotated: bool = False


@dataclass(frozen=True)
class LegendEntry:
    """A series' colour line followed by its (wrapped) name; ``box`` holds both."""

    name: Text
    swatch: tuple[int, int, int]  # x from, x to, y of the colour line
    box: Box


@dataclass(frozen=True)
class Layout:
    """Where ``line_chart`` draws everything: kept apart from drawing so it can be checked box by box."""

    size: tuple[int, int]
    plot: Box  # the frame; data, grid and tick marks are drawn inside it
    title: Text
    y_label: Text
    x_label: Text
    y_ticks: tuple[Text, ...]  # bottom to top, evenly spaced from PAD above the bottom to PAD below the top
    x_ticks: tuple[tuple[int, Text], ...]  # (position, label) for the positions that keep a label
    positions: int
    legend: tuple[LegendEntry, ...]

    def x_at(self, i: int) -> float:
        """Pixel column of x position ``i``."""
        return _x_at(self.plot, self.positions, i)

    def y_at(self, fraction: float) -> float:
        """Pixel row of a value ``fraction`` of the way up the y range."""
        return _y_at(self.plot, fraction)

    def boxes(self) -> list[tuple[str, Box]]:
        """Every element that must not overlap another, named, empty texts left out."""
        named = [("plot", self.plot), ("title", self.title.box), ("y label", self.y_label.box),
                 ("x label", self.x_label.box)]
        named += [(f"y tick {t.lines}", t.box) for t in self.y_ticks]
        named += [(f"x tick {i}", t.box) for i, t in self.x_ticks]
        named += [(f"legend {k}", e.box) for k, e in enumerate(self.legend)]
        return [(name, box) for name, box in named if box[2] > box[0] and box[3] > box[1]]


def _x_at(plot: Box, positions: int, i: int) -> float:
    x0, _, x1, _ = plot
    return x0 + PAD + (x1 - 1 - x0 - 2 * PAD) * (i / (positions - 1) if positions > 1 else 0.5)


def _y_at(plot: Box, fraction: float) -> float:
    _, y0, _, y1 = plot
    return y1 - 1 - PAD - (y1 - 1 - y0 - 2 * PAD) * fraction


@cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=12)


def _line_height() -> int:
    ascent, descent = _font().getmetrics()
    return ascent + descent


def _measure(lines: Sequence[str], centred: bool) -> tuple[int, int, list[tuple[int, int]]]:
    """Width and height of a block of lines and each line's origin in it (anchor "la").

    The block covers both the ink and the advance of every line, so baselines line up
    between labels and glyphs overhanging their advance are still inside.
    """
    font, height = _font(), _line_height()
    if not lines:
        return 0, 0, []
    advances = [math.ceil(font.getlength(s)) for s in lines]
    widest = max(advances)
    starts, spans = [], []
    for k, (line, advance) in enumerate(zip(lines, advances)):
        dx, dy = ((widest - advance) // 2 if centred else 0), k * height
        left, top, right, bottom = font.getbbox(line, anchor="la")
        starts.append((dx, dy))
        spans.append((dx + min(0, left), dy + min(0, top), dx + max(advance, right), dy + max(height, bottom)))
    x0, y0 = min(s[0] for s in spans), min(s[1] for s in spans)
    x1, y1 = max(s[2] for s in spans), max(s[3] for s in spans)
    return x1 - x0, y1 - y0, [(dx - x0, dy - y0) for dx, dy in starts]


def _size(lines: Sequence[str], centred: bool = False, rotated: bool = False) -> tuple[int, int]:
    w, h, _ = _measure(lines, centred)
    return (h, w) if rotated else (w, h)


def _text(lines: Sequence[str], left: int, top: int, centred: bool = False, rotated: bool = False) -> Text:
    w, h = _size(lines, centred, rotated)
    return Text(tuple(lines), (left, top, left + w, top + h), centred, rotated)


def _ellipsize(text: str, width: int) -> str:
    """``text`` cut short to end in an ellipsis within ``width`` pixels."""
    while text and _font().getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, width: int, max_lines: int | None = None) -> list[str]:
    """Words in lines of at most ``width`` pixels; a word longer than a line is broken
    where it must be; past ``max_lines`` the last kept line ends in an ellipsis."""
    font = _font()
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and font.getlength(current + char) > width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [_ellipsize(lines[max_lines - 1], width)]
    return lines


def layout(names: Sequence[str], title: str, x_label: str, y_label: str, x_ticks: Sequence[str],
           y_ticks: Sequence[str]) -> Layout:
    """Where everything goes: title on top, the rotated y label left of the y tick labels,
    x tick labels thinned to those that fit side by side, the x label under them and the
    legend under that, in as many centred rows as its entries need."""
    title_text = _wrap(title, WIDTH - 2 * MARGIN, max_lines=3)
    title_w, title_h = _size(title_text, centred=True)
    top = MARGIN + (title_h + GAP if title_text else 0)
    y_label_text = _wrap(y_label, PLOT_HEIGHT - 2 * PAD, max_lines=2)
    y_label_w, y_label_h = _size(y_label_text, rotated=True)
    y_sizes = [_size([t]) for t in y_ticks]
    labels = [t if _font().getlength(t) <= MAX_TICK_WIDTH else _ellipsize(t, MAX_TICK_WIDTH) for t in x_ticks]
    x_sizes = [_size([t]) for t in labels]
    widest_x = max((w for w, _ in x_sizes), default=0)

    # the frame: below the title by half a y tick label, right of the y labels, and far enough
    # from both sides that the x tick labels centred on the first and last positions fit
    y0 = top + max(0, math.ceil(max((h for _, h in y_sizes), default=0) / 2) - PAD)
    y1 = y0 + PLOT_HEIGHT
    y_column = MARGIN + (y_label_w + GAP if y_label_text else 0)
    x0 = max(y_column + max((w for w, _ in y_sizes), default=0) + GAP, MARGIN + math.ceil(widest_x / 2) - PAD)
    x1 = WIDTH - max(MARGIN, MARGIN + math.ceil(widest_x / 2) - PAD)
    n, plot = len(labels), (x0, y0, x1, y1)

    y_ticks_placed = []
    for k, (text, (w, h)) in enumerate(zip(y_ticks, y_sizes)):
        y = _y_at(plot, k / (len(y_ticks) - 1) if len(y_ticks) > 1 else 0.5)
        y_ticks_placed.append(_text([text], x0 - GAP - w, round(y - h / 2)))
    y_label_placed = _text(y_label_text, MARGIN, round((y0 + y1 - y_label_h) / 2), rotated=True)

    x_top = max([y1] + [t.box[3] for t in y_ticks_placed]) + GAP
    step = (x1 - 1 - x0 - 2 * PAD) / (n - 1) if n > 1 else math.inf
    stride = max(1, math.ceil((widest_x + GAP) / step))
    x_ticks_placed = tuple((i, _text([labels[i]], round(_x_at(plot, n, i) - x_sizes[i][0] / 2), x_top))
                           for i in range(0, n, stride))
    bottom = max([y1] + [t.box[3] for _, t in x_ticks_placed]) + GAP
    x_label_text = _wrap(x_label, x1 - x0, max_lines=2)
    x_label_w, x_label_h = _size(x_label_text, centred=True)
    x_label_placed = _text(x_label_text, (x0 + x1 - x_label_w) // 2, bottom, centred=True)
    bottom += (x_label_h + GAP if x_label_text else 0) + GAP

    legend, row_width = [], WIDTH - 2 * MARGIN
    rows: list[list[tuple[list[str], int, int]]] = [[]]
    for name in names:
        text = _wrap(name, row_width - SWATCH - GAP)
        w, h = _size(text)
        entry = (text, SWATCH + GAP + w, max(h, _line_height()))
        used = sum(e[1] for e in rows[-1]) + ENTRY_GAP * len(rows[-1])
        if rows[-1] and used + entry[1] > row_width:
            rows.append([])
        rows[-1].append(entry)
    for row in (r for r in rows if r):
        left = (WIDTH - sum(e[1] for e in row) - ENTRY_GAP * (len(row) - 1)) // 2
        for text, w, h in row:
            swatch_y = bottom + _line_height() // 2
            legend.append(LegendEntry(_text(text, left + SWATCH + GAP, bottom), (left, left + SWATCH, swatch_y),
                                      (left, bottom, left + w, bottom + h)))
            left += w + ENTRY_GAP
        bottom += max(h for _, _, h in row) + GAP
    height = bottom - GAP + MARGIN
    return Layout((WIDTH, height), plot, _text(title_text, (WIDTH - title_w) // 2, MARGIN, centred=True),
                  y_label_placed, x_label_placed, tuple(y_ticks_placed), x_ticks_placed, n, tuple(legend))


def _round_ticks(lo: float, hi: float) -> list[float]:
    """Tick values a round step apart (1, 2, 2.5 or 5 times a power of ten), about
    ``Y_TICKS`` of them, from at most ``lo`` to at least ``hi``: 0.25 rather than 0.2487."""
    scale = max(abs(lo), abs(hi))
    if hi - lo <= max(scale * 1e-6, sys.float_info.min):  # one value, or differences no tick could tell apart
        lo, hi = lo - max(0.5, scale / 10), hi + max(0.5, scale / 10)
    raw = (hi - lo) / (Y_TICKS - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def _tick_texts(ticks: Sequence[float]) -> list[str]:
    """Tick values with as many decimals as their step needs, all alike (0.25 0.50 0.75);
    where that would take more than twelve, as many significant digits as tell them apart."""
    step = ticks[1] - ticks[0]
    decimals = next((d for d in range(13) if abs(step * 10 ** d - round(step * 10 ** d)) <= 1e-6 * step * 10 ** d),
                    None)
    if decimals is not None:
        return [f"{v:.{decimals}f}" for v in ticks]
    digits = 2 + math.ceil(math.log10(max(abs(v) for v in ticks) / step))
    return [f"{v:.{digits}g}" for v in ticks]


def _draw_text(image: Image.Image, text: Text) -> None:
    """Paste ``text``'s lines, drawn as a mask the size of its box, at the box's corner."""
    w, h, starts = _measure(text.lines, text.centred)
    if not w or not h:
        return
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for line, xy in zip(text.lines, starts):
        draw.text(xy, line, fill=255, font=_font(), anchor="la")
    if text.rotated:
        mask = mask.transpose(Image.Transpose.ROTATE_90)
    image.paste((0, 0, 0), text.box[:2], mask)


def chart_layout(series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str,
                 x_ticks: Sequence[str] | None = None,
                 y_range: tuple[float, float] | None = None) -> tuple[Layout, list[float]]:
    """The layout ``line_chart`` draws for these arguments, and its y grid values (bottom to top).

    ``x_ticks`` names the positions (default 1..n); those that do not fit side by side are
    left unlabelled. ``y_range`` is widened to hold every value and to round tick values.
    """
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    lo, hi = y_range or ((min(values), max(values)) if values else (0.0, 1.0))
    grid = _round_ticks(min([lo, *values]), max([hi, *values]))
    n = max([len(vs) for vs in series.values()] + [len(x_ticks or ())])
    ticks = [str(t) for t in x_ticks] if x_ticks else []
    ticks += [str(i + 1) for i in range(len(ticks), n)]
    return layout(list(series), title, x_label, y_label, ticks, _tick_texts(grid)), grid


def line_chart(series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str,
               x_ticks: Sequence[str] | None = None, y_range: tuple[float, float] | None = None) -> bytes:
    """A PNG with one line (and dots, up to 50 points) per series over a shared x axis of
    positions 0..n-1, laid out by ``chart_layout``; a non-finite value leaves a gap in its line."""
    placed, grid = chart_layout(series, title, x_label, y_label, x_ticks, y_range)
    lo, hi = grid[0], grid[-1]
    image = Image.new("RGB", placed.size, "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = placed.plot
    for v in grid:
        y = placed.y_at((v - lo) / (hi - lo))
        draw.line((x0, y, x1 - 1, y), fill=(225, 225, 225))
    for i, _ in placed.x_ticks:
        x = placed.x_at(i)
        draw.line((x, y1 - 1 - TICK, x, y1 - 1), fill="black")
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="black")
    for k, vs in enumerate(series.values()):
        colour = COLOURS[k % len(COLOURS)]
        runs: list[list[tuple[float, float]]] = [[]]  # a missing value breaks the line
        for i, v in enumerate(vs):
            if math.isfinite(v):
                runs[-1].append((placed.x_at(i), placed.y_at((v - lo) / (hi - lo))))
            elif runs[-1]:
                runs.append([])
        dotted = sum(len(run) for run in runs) <= 50
        for run in runs:
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
            for x, y in run if dotted or len(run) == 1 else ():
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    for k, entry in enumerate(placed.legend):
        left, right, y = entry.swatch
        draw.line((left, y, right - 1, y), fill=COLOURS[k % len(COLOURS)], width=3)
        _draw_text(image, entry.name)
    for text in (placed.title, placed.y_label, placed.x_label, *placed.y_ticks, *(t for _, t in placed.x_ticks)):
        _draw_text(image, text)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
