"""A PNG bar chart of the end-to-end throughput (img/s per implementation, one group per
model; training steps, then sampling), drawn with Pillow (torchvision's dependency; no
matplotlib here)."""
from __future__ import annotations

from typing import Optional

COLOURS = {"eager": (150, 150, 150), "compile": (100, 100, 100), "flowkern": (31, 119, 180),
           "flowkern+compile": (23, 190, 207), "flowkern-triton": (148, 103, 189), "nflows": (255, 127, 14),
           "zuko": (44, 160, 44), "normflows": (214, 39, 40), "conditioners only": (210, 210, 210),
           "conditioners only, compiled": (185, 185, 185)}
SECTIONS = {"train": "training step", "realnvp_train": "training step", "sample": "sampling"}


def training_chart(rows: list, path: str, title: str) -> Optional[str]:
    """Writes the chart of the end-to-end rows (suites train and sample) to `path`; None
    (nothing written) when there are none or Pillow is missing."""
    rows = [r for r in rows if r.suite in SECTIONS and "img/s" in r.extra]
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    if not rows:
        return None
    groups = list(dict.fromkeys((r.suite, r.case) for r in rows))
    bar_h, gap, left, right, top = 16, 14, 330, 250, 40
    height = top + sum(sum((r.suite, r.case) == g for r in rows) * bar_h + gap + 18 for g in groups) + 10
    width = 1000
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    y = top
    for suite, case in groups:
        group = [r for r in rows if (r.suite, r.case) == (suite, case)]
        # One scale per group: models differ by orders of magnitude, the bars compare implementations.
        scale = (width - left - right) / max(r.extra["img/s"] for r in group)
        draw.text((10, y), f"{case}: {SECTIONS[suite]}", fill="black")
        y += 18
        for r in group:
            speed = r.extra["img/s"]
            draw.text((left - 130, y + 2), r.impl, fill="black")
            draw.rectangle([left, y, left + max(1, int(speed * scale)), y + bar_h - 3],
                           fill=COLOURS.get(r.impl, (120, 120, 200)))
            label = f"{speed:,.0f} img/s"
            if r.extra.get("vs_eager"):
                label += f"  ({r.extra['vs_eager']:.2f}x eager)"
            draw.text((left + int(speed * scale) + 6, y + 2), label, fill="black")
            y += bar_h
        y += gap
    img.save(path)
    return path
