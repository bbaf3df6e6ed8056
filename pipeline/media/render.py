"""Text drawn onto photos: the renderer behind the labelled text-spot set (bench/textspot_set.py), the
experiment's text-shortcut noise (experiments/webnoise.py) and its reading probe.

    from pipeline.media.render import render_text
    shown = render_text(photo, "a dog runs", random.Random(0))   # PIL image in, PIL image out

DejaVu fonts (they ship with matplotlib), 8-14% of the image height and at least 20 px (overlaid
titles and memes, legible at thumbnail size), outline / banner / plain styles, four positions.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf"
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
         "DejaVuSansMono-Bold.ttf", "DejaVuSans-Oblique.ttf")


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > max_width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def render_text(img: Image.Image, text: str, rng: random.Random) -> Image.Image:
    """Draw `text` on a copy of `img` in a random font, size, colour, style and position."""
    img = img.copy()
    draw = ImageDraw.Draw(img, "RGBA")
    size = max(20, round(img.height * rng.uniform(0.08, 0.14)))  # overlay titles: legible at thumbnail size
    font = ImageFont.truetype(str(FONT_DIR / rng.choice(FONTS)), size)
    lines = _wrap(text, font, int(img.width * 0.9))
    while max(font.getlength(line) for line in lines) > img.width * 0.95 and size > 12:  # one long word
        size -= 2
        font = ImageFont.truetype(str(font.path), size)
    line_h = round(size * 1.25)
    block_w, block_h = int(max(font.getlength(line) for line in lines)), line_h * len(lines)
    x = rng.randint(0, max(0, img.width - block_w))
    y = {"top": round(img.height * 0.04), "bottom": img.height - block_h - round(img.height * 0.04),
         "middle": (img.height - block_h) // 2,
         "random": rng.randint(0, max(0, img.height - block_h))}[rng.choice(("top", "bottom", "middle", "random"))]
    y = min(max(0, y), max(0, img.height - block_h))
    style = rng.choice(("outline", "banner", "plain"))
    stroke = 0
    if style == "outline":                       # meme style: light text, dark outline
        fill, stroke_fill, stroke = rng.choice([(255, 255, 255), (255, 230, 0)]), (0, 0, 0), max(1, size // 12)
    elif style == "banner":                      # title bar: text on a translucent band
        dark = rng.random() < 0.5
        draw.rectangle([x - size // 3, y - size // 5, x + block_w + size // 3, y + block_h + size // 5],
                       fill=(0, 0, 0, 170) if dark else (255, 255, 255, 190))
        fill, stroke_fill = ((255, 255, 255) if dark else (rng.choice([(0, 0, 0), (180, 0, 0), (0, 40, 140)]))), None
    else:  # plain: colour contrasting with the area under it, thin halo so busy backgrounds stay legible
        region = np.asarray(img.crop((x, y, x + block_w, y + block_h)).convert("L"))
        light_bg = bool(region.size) and region.mean() > 120
        fill, stroke_fill = ((20, 20, 20), (235, 235, 235)) if light_bg else ((250, 250, 250), (30, 30, 30))
        stroke = max(1, size // 24)
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_h), line, font=font, fill=fill, stroke_width=stroke, stroke_fill=stroke_fill)
    return img
