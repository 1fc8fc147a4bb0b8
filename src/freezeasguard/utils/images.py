"""Image grids written as PNG, for people to look at."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write_bytes


def grid_image(images: torch.Tensor, nrow: int, *, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile [N, 3, H, W] images in [0, 1] row-major, `nrow` per row, with a white border."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def label_lines(text: str, fits: int, width: int = 18) -> list[str]:
    """`text` in lines of at most `width` characters, at most `fits` of them, a cut one ending in "…".
    Composite protection names break after their "+" (the space added there only marks the break)."""
    lines = [line.replace("+ ", "+") for line in textwrap.wrap(text.replace("+", "+ "), width)] or [""]
    if len(lines) > fits:
        lines = lines[: fits - 1] + [lines[fits - 1][: width - 1] + "…"]
    return lines


def labelled(img: Image.Image, labels: list[str], *, width: int = 110) -> Image.Image:
    """`img` with a white margin on the left naming each of its rows (equal-height rows, top to bottom), so a
    grid says what its rows are without the report beside it."""
    from PIL import ImageDraw

    out = Image.new("RGB", (img.width + width, img.height), "white")
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    step = img.height / max(len(labels), 1)
    fits = max(1, int(step // 11))  # lines of the default font a row has room for
    for i, text in enumerate(labels):
        lines = label_lines(text, fits)
        top = int(i * step + step / 2) - 6 * len(lines)
        for j, line in enumerate(lines):
            draw.text((4, top + 11 * j), line, fill="black")
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, *, scale: int = 1,
              row_labels: list[str] | None = None) -> Path:
    """Write the grid of `images` as a PNG (atomically); `row_labels` names its rows in the image."""
    img = grid_image(images, nrow, scale=scale)
    if row_labels:
        rows = (len(images) + nrow - 1) // nrow
        if len(row_labels) != rows:
            raise ValueError(f"save_grid: {len(row_labels)} row label(s) for {rows} row(s)")
        img = labelled(img, row_labels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
