"""Small PNG line charts drawn with Pillow: tuning loss curves and quality over model versions.

Pillow is already a dependency; a plotting library would add tens of megabytes to the
image for two charts.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))
WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 70  # plot margins, pixels


def line_chart(series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str,
               x_ticks: Sequence[str] | None = None, y_range: tuple[float, float] | None = None) -> bytes:
    """A PNG with one line (and dots) per series over a shared x axis of positions 0..n-1.

    ``x_ticks`` names the positions (at most about 12 are written); non-finite values
    are left out of their line. Returns PNG bytes.
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    lo, hi = y_range or ((min(values), max(values)) if values else (0.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(vs) for vs in series.values()), default=0)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM

    def at(i: int, v: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (i / (n - 1) if n > 1 else 0.5)
        return x, y1 - (y1 - y0) * (v - lo) / (hi - lo)

    draw.text((WIDTH / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for k in range(5):  # y grid and labels
        v = lo + (hi - lo) * k / 4
        _, y = at(0, v)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 6, y), f"{v:.3g}", fill="black", font=font, anchor="rm")
    stride = max(1, math.ceil(n / 12))
    for i in range(0, n, stride):
        x, _ = at(i, lo)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x, y1 + 6), str(x_ticks[i]) if x_ticks else str(i + 1), fill="black", font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, HEIGHT - 30), x_label, fill="black", font=font, anchor="mt")
    draw.text((8, y0 - 22), y_label, fill="black", font=font)
    for k, (name, vs) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [at(i, v) for i, v in enumerate(vs) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(points) <= 50:
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        lx = x0 + 10 + 170 * k
        draw.line((lx, HEIGHT - 12, lx + 20, HEIGHT - 12), fill=colour, width=3)
        draw.text((lx + 26, HEIGHT - 12), name, fill="black", font=font, anchor="lm")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
