"""Figures of a pruning report.

The per-layer chart is drawn with Pillow, not matplotlib: `metaprune prune` writes it on every
run, and importing matplotlib (~0.5-1 s) would cost more than pruning a small model.
"""

import os
from pathlib import Path

BAR_COLOUR = (72, 120, 168)
AXIS_COLOUR = (60, 60, 60)
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM = 60, 40, 150  # room for the axis, title, layer names
PLOT_HEIGHT = 260


def _vertical_text(draw_module, image_module, font, text: str, fill):
    """`text` drawn on its own white image, turned 90° (for layer names under bars)."""
    left, top, right, bottom = font.getbbox(text)
    label = image_module.new("RGB", (right - left + 4, bottom - top + 4), "white")
    draw_module.Draw(label).text((-left + 2, -top + 2), text, font=font, fill=fill)
    return label.rotate(90, expand=True)


def plot_sparsity(report: dict, png_path: str | os.PathLike) -> Path:
    """Bar chart of the kept fraction of output channels per layer, as a PNG.

    Example::

        plot_sparsity(result.report, "pruned.sparsity.png")
    """
    from PIL import Image, ImageDraw, ImageFont

    names = list(report["kept"])
    fractions = [kept / total for kept, total in report["kept"].values()]
    bar_step = max(14, min(40, 900 // max(len(names), 1)))
    width = MARGIN_LEFT + 20 + bar_step * max(len(names), 1)
    height = MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM
    image = Image.new("RGB", (max(width, 480), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    base = MARGIN_TOP + PLOT_HEIGHT  # y of fraction 0
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base - tick * PLOT_HEIGHT
        draw.line([(MARGIN_LEFT - 4, y), (image.width - 10, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.2f}", font=font, fill=AXIS_COLOUR)
    draw.line([(MARGIN_LEFT, MARGIN_TOP), (MARGIN_LEFT, base)], fill=AXIS_COLOUR)
    draw.line([(MARGIN_LEFT, base), (image.width - 10, base)], fill=AXIS_COLOUR)
    for index, (name, fraction) in enumerate(zip(names, fractions)):
        left = MARGIN_LEFT + 10 + index * bar_step
        draw.rectangle([left, base - fraction * PLOT_HEIGHT, left + bar_step * 0.7, base],
                       fill=BAR_COLOUR)
        label = _vertical_text(ImageDraw, Image, font, name[-28:], AXIS_COLOUR)
        image.paste(label, (int(left), base + 6))
    title = (f"kept fraction of output channels: {report.get('criterion', '')}, "
             f"{report.get('allocation', '')}")
    if report.get("speedup"):
        title += f", {report['speedup']:.2f}x fewer MACs"
    draw.text((MARGIN_LEFT, 12), title, font=font, fill=(0, 0, 0))
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
