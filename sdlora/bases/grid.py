"""Labelled image grids (UI Compare tab, `sdlora generate --sweep`): rows of equal-sized cells."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

PAD = 4  # pixels between cells


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed size
        return ImageFont.load_default()


def labelled_grid(
    rows: list[list[Image.Image]], column_labels: list[str], row_labels: list[str], title: str = ""
) -> Image.Image:
    """Tile `rows` (equal-sized images) with a label above each column and left of each row."""
    cell_w, cell_h = rows[0][0].size
    font = _font(max(10, min(16, cell_w // 6)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    line_h = max([size(t)[1] for t in [title, *column_labels, *row_labels] if t] or [0]) + 2 * PAD
    left_w = max([size(t)[0] for t in row_labels if t] or [0]) + (2 * PAD if any(row_labels) else 0)
    top_h = line_h * (2 if title else 1)
    columns = len(column_labels)
    width = left_w + columns * (cell_w + PAD) + PAD
    height = top_h + len(rows) * (cell_h + PAD) + PAD
    grid = Image.new("RGB", (max(width, size(title)[0] + 2 * PAD), height), "white")
    pen = ImageDraw.Draw(grid)
    if title:
        pen.text((PAD, PAD), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        x = left_w + PAD + c * (cell_w + PAD) + (cell_w - size(label)[0]) // 2
        pen.text((x, top_h - line_h + PAD), label, fill="black", font=font)
    for r, row in enumerate(rows):
        y = top_h + PAD + r * (cell_h + PAD)
        if row_labels[r]:
            pen.text(
                (PAD, y + (cell_h - size(row_labels[r])[1]) // 2),
                row_labels[r],
                fill="black",
                font=font,
            )
        for c, image in enumerate(row):
            grid.paste(image, (left_w + PAD + c * (cell_w + PAD), y))
    return grid
