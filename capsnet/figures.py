"""Figures people read: labelled mosaics of digit images, scaled up for a
screen, saved as PNGs atomically (visualize.py, predict.py, evaluate.py).

A mosaic figure (``mosaic_figure``) is a grid of gray images, white digit
on black, each drawn as ``scale`` x ``scale`` screen pixels per image pixel
(nearest neighbour, no smoothing) with a gray border between tiles, on a
white page with a title, optional row and column labels, optional labels
above single tiles (e.g. the true and the predicted class) and optional
red frames around tiles. The pixels are placed exactly (``Figure.figimage``
at the figure's own dpi), so the tests can read the tiles back from the
PNG: ``Layout`` says where every tile is.

``tile`` and ``tint`` make plain RGB mosaics (one array); ``save_image``
and ``save_figure`` write PNGs through ``files.atomic_write``.
"""
import numpy

import matplotlib
import matplotlib.image
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from capsnet.files import atomic_write

matplotlib.use('Agg')  # no display needed (and none on a server)

BORDER = 2
BORDER_COLOR = (0.5, 0.5, 0.5)
FRAME_COLOR = (1.0, 0.0, 0.0)
WRONG_COLOR = (0.85, 0.0, 0.0)   # labels of misclassified digits
#: between the tiles of a mosaic figure: light, apart from the black
#: background of a digit and from a mid-gray (untrained) reconstruction
MOSAIC_BORDER_COLOR = (0.8, 0.8, 0.8)
GREEN = (0.25, 1.0, 0.25)
BLUE = (0.35, 0.6, 1.0)

#: screen pixels per image pixel in the tools' figures (--scale): a 28 x 28
#: digit becomes 112 x 112; the largest figure, vis_tweaked*.png (16 x 11
#: digits), stays about 1.4k x 2k pixels
SCALE = 4
DPI = 100           # figure dots per inch: 1 point = DPI / 72 pixels
TITLE_POINTS = 12
LABEL_POINTS = 9
PAD = 6             # pixels between texts and around the page


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def save_image(path, image):
    """Save (H, W) gray or (H, W, 3) RGB values in [0, 1] as a PNG, one
    array element per PNG pixel."""
    image = numpy.clip(numpy.asarray(image, dtype=numpy.float32), 0, 1)
    kwargs = {'cmap': 'gray', 'vmin': 0, 'vmax': 1} if image.ndim == 2 \
        else {}
    atomic_write(path, lambda f: matplotlib.image.imsave(
        f, image, format='png', **kwargs))


def save_figure(path, figure, dpi=None):
    """Save a matplotlib Figure as a PNG atomically, at the figure's own
    dpi unless ``dpi`` is given (so a mosaic keeps its exact pixels)."""
    atomic_write(path, lambda f: figure.savefig(
        f, format='png', dpi=figure.dpi if dpi is None else dpi))


def pixel_size(figure):
    """(width, height) in PNG pixels of ``figure`` saved by save_figure."""
    width, height = figure.get_size_inches() * figure.dpi
    return int(width), int(height)


# --------------------------------------------------------------------------
# Mosaics as one array
# --------------------------------------------------------------------------

def tint(images, color):
    """(..., H, W) gray in [0, 1] -> (..., H, W, 3): black stays black,
    white becomes ``color``."""
    images = numpy.asarray(images, dtype=numpy.float32)
    return images[..., None] * numpy.asarray(color, dtype=numpy.float32)


def upscale(images, scale):
    """(N, H, W) or (N, H, W, 3) -> (N, H * scale, W * scale[, 3]): every
    pixel becomes a scale x scale block (nearest neighbour)."""
    images = numpy.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError('images must be (N, H, W) or (N, H, W, 3), got {}'
                         .format(images.shape))
    scale = int(scale)
    return images.repeat(scale, axis=1).repeat(scale, axis=2)


def border_px(scale):
    """Screen pixels between the tiles of a mosaic at ``scale``: 2 at
    scale 1 (a plain mosaic), 4 at the default 4."""
    return BORDER + int(scale) // 2


def _rgb(images):
    images = numpy.asarray(images, dtype=numpy.float32)
    if images.ndim == 3:
        images = numpy.repeat(images[..., None], 3, axis=3)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError('images must be (N, H, W) or (N, H, W, 3), got {}'
                         .format(images.shape))
    return images


def _draw_frame(canvas, top, left, height, width, border, color):
    """Paint the ring of ``border`` pixels around a tile."""
    ring = canvas[top - border:top + height + border,
                  left - border:left + width + border]
    ring[:border] = color
    ring[-border:] = color
    ring[:, :border] = color
    ring[:, -border:] = color


def tile(images, rows, cols, border=BORDER, border_color=BORDER_COLOR,
         frames=(), frame_color=FRAME_COLOR):
    """Tile images row by row into one RGB mosaic.

    Args:
        images: (N, H, W) gray or (N, H, W, 3) RGB in [0, 1], N <= rows*cols;
            image k goes to row k // cols, column k % cols (empty cells
            keep the border colour).
        border: pixels between tiles and around the mosaic.
        frames: (row, col) tiles whose surrounding border is drawn in
            ``frame_color`` (e.g. to mark a reference column).
    Returns:
        float32 (rows * (H + border) + border, cols * (W + border) + border,
        3) in [0, 1].
    """
    images = _rgb(images)
    n, height, width = images.shape[:3]
    if n > rows * cols:
        raise ValueError('{} images do not fit {} x {} tiles'.format(
            n, rows, cols))
    grid = numpy.empty((rows * (height + border) + border,
                        cols * (width + border) + border, 3), numpy.float32)
    grid[...] = border_color
    for k in range(n):
        top = border + (k // cols) * (height + border)
        left = border + (k % cols) * (width + border)
        grid[top:top + height, left:left + width] = images[k]
    for row, col in frames:
        _draw_frame(grid, border + row * (height + border),
                    border + col * (width + border), height, width, border,
                    frame_color)
    return numpy.clip(grid, 0, 1)


# --------------------------------------------------------------------------
# Labelled mosaic figures
# --------------------------------------------------------------------------

_RENDERER = None


def text_size(text, points, weight='normal'):
    """(width, height) in pixels of ``text`` at ``points`` (matplotlib's
    default font, ``weight`` 'normal' or 'bold'), one or more lines."""
    global _RENDERER
    if _RENDERER is None:
        from matplotlib.backends.backend_agg import RendererAgg
        _RENDERER = RendererAgg(1, 1, DPI)
    prop = FontProperties(size=points, weight=weight)
    widths, height = [0], 0
    for line in str(text).split('\n'):
        w, h, _ = _RENDERER.get_text_width_height_descent(
            line or ' ', prop, ismath=False)
        widths.append(w)
        height += h * 1.25
    return int(numpy.ceil(max(widths))), int(numpy.ceil(height))


class Layout:
    """Where a mosaic figure's parts are, in PNG pixels from the top left.

    Attributes:
        width, height: the PNG's size.
        rows, cols: the grid; side: a tile's side (image side * scale);
        border: pixels of gray between and around tiles.
        tops: (rows,) the top pixel row of the tiles of each grid row;
        lefts: (cols,) the left pixel column of the tiles of each column.
        mosaic: (top, left, height, width) of the gray block holding all
            tiles (label bands above rows included).
    """

    def __init__(self, rows, cols, side, border, label_rows, title,
                 row_labels=None, col_labels=None, row_title=None,
                 col_title=None, tile_labels=None):
        _, label_h = text_size('Tg', LABEL_POINTS)
        title_w, title_h = text_size(title, TITLE_POINTS, 'bold')
        self.rows, self.cols, self.side, self.border = rows, cols, side, \
            border
        self.label_h = label_h + 2
        y = PAD + title_h + PAD
        self.title_y = PAD
        self.col_title_y = y
        if col_title:
            y += text_size(col_title, LABEL_POINTS)[1] + 2
        self.col_labels_y = y
        if col_labels is not None:
            y += max(text_size(t, LABEL_POINTS)[1] for t in col_labels) + 2
        # texts wider than a tile stick out of the grid by ``overhang``
        widest = max([text_size(t, LABEL_POINTS)[0] for t in
                      list(col_labels or []) + list(tile_labels or [])
                      if t] or [0])
        overhang = max(0, (widest - side) // 2 + 1)
        x = PAD
        self.row_title_x = x
        if row_title:
            x += text_size(row_title, LABEL_POINTS)[1] + PAD
        if row_labels is not None:
            x += max(text_size(t, LABEL_POINTS)[0] for t in row_labels) + PAD
        self.row_labels_right = x - PAD
        x = max(x, PAD + overhang)
        self.mosaic_top, self.mosaic_left = y, x
        tops, band = [], []
        for r in range(rows):
            extra = self.label_h if r in label_rows else 0
            band.append(extra)
            tops.append(y + extra + border)
            y += extra + side + border
        self.tops = numpy.asarray(tops)
        self.bands = numpy.asarray(band)
        self.lefts = x + border + numpy.arange(cols) * (side + border)
        mosaic_w = cols * (side + border) + border
        self.mosaic = (self.mosaic_top, x, y + border - self.mosaic_top,
                       mosaic_w)
        self.height = y + border + PAD
        widths = [x + mosaic_w + PAD + overhang, title_w + 2 * PAD]
        if col_title:
            widths.append(text_size(col_title, LABEL_POINTS)[0] + 2 * PAD)
        self.width = int(max(widths))

    def tile_box(self, row, col):
        """(top, left, bottom, right) pixel bounds of tile (row, col)."""
        top, left = self.tops[row], self.lefts[col]
        return top, left, top + self.side, left + self.side


def mosaic_figure(images, cols, title, scale=SCALE, row_labels=None,
                  col_labels=None, tile_labels=None, tile_colors=None,
                  frames=(), row_title=None, col_title=None):
    """A titled, labelled figure of gray images in a grid.

    Args:
        images: (N, S, S) gray in [0, 1] (white digit on black) or
            (N, S, S, 3) RGB; image k goes to row k // cols, column k % cols.
        cols: tiles per row.
        title: text above everything (may hold newlines).
        scale: screen pixels per image pixel (integer >= 1).
        row_labels: one text per row, left of it; col_labels: one text per
            column, above the grid; row_title / col_title: what the row /
            column labels are (drawn beside them).
        tile_labels: N texts (or None for none), each drawn just above its
            tile; tile_colors: their colours (default black).
        frames: (row, col) tiles framed in red.
    Returns:
        (matplotlib Figure, Layout). Save with ``save_figure``: the PNG is
        Layout.width x Layout.height pixels.
    """
    images = _rgb(images)
    n, side = len(images), images.shape[1]
    scale = int(scale)
    if scale < 1:
        raise ValueError('scale must be an integer >= 1, got {}'.format(scale))
    rows = max(1, -(-n // cols))
    if tile_labels is not None and len(tile_labels) != n:
        raise ValueError('{} tile labels for {} images'.format(
            len(tile_labels), n))
    for name, labels, count in (('row_labels', row_labels, rows),
                                ('col_labels', col_labels, cols)):
        if labels is not None and len(labels) != count:
            raise ValueError('{} must have {} texts, got {}'.format(
                name, count, len(labels)))
    label_rows = set() if tile_labels is None else {
        k // cols for k, text in enumerate(tile_labels) if text}
    b, s = border_px(scale), side * scale
    layout = Layout(rows, cols, s, b, label_rows, title, row_labels,
                    col_labels, row_title, col_title, tile_labels)

    canvas = numpy.ones((layout.height, layout.width, 3), numpy.float32)
    top, left, _, width = layout.mosaic
    big = upscale(numpy.clip(images, 0, 1), scale)
    for r in range(rows):
        block = layout.tops[r] - b
        canvas[block:block + s + 2 * b, left:left + width] = \
            MOSAIC_BORDER_COLOR
    for k in range(n):
        t, lft, bottom, right = layout.tile_box(*divmod(k, cols))
        canvas[t:bottom, lft:right] = big[k]
    for r, c in frames:
        _draw_frame(canvas, layout.tops[r], layout.lefts[c], s, s, b,
                    FRAME_COLOR)

    figure = Figure(figsize=((layout.width + 0.01) / DPI,
                             (layout.height + 0.01) / DPI), dpi=DPI)
    figure.figimage((canvas * 255).round().astype(numpy.uint8),
                    xo=0, yo=0, origin='upper')

    def text(x, y, string, **kwargs):
        kwargs.setdefault('fontsize', LABEL_POINTS)
        figure.text(x / layout.width, 1 - y / layout.height, string,
                    **kwargs)

    text(PAD, layout.title_y, title, fontsize=TITLE_POINTS, ha='left',
         va='top', fontweight='bold')
    if col_title:
        text(left + width / 2, layout.col_title_y, col_title, ha='center',
             va='top', style='italic')
    if col_labels is not None:
        for c, label in enumerate(col_labels):
            text(layout.lefts[c] + s / 2, layout.col_labels_y, label,
                 ha='center', va='top')
    if row_title:
        text(layout.row_title_x, top + layout.mosaic[2] / 2, row_title,
             ha='left', va='center', rotation=90, style='italic')
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            text(layout.row_labels_right, layout.tops[r] + s / 2, label,
                 ha='right', va='center')
    if tile_labels is not None:
        for k, label in enumerate(tile_labels):
            if not label:
                continue
            r, c = divmod(k, cols)
            color = 'black' if tile_colors is None else tile_colors[k]
            text(layout.lefts[c] + s / 2, layout.tops[r] - b - 1, label,
                 ha='center', va='bottom', color=color)
    return figure, layout


def figure_texts(figure):
    """Every text drawn on ``figure`` (its own and its axes'), in order."""
    texts = [t.get_text() for t in figure.texts]
    for ax in figure.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.texts]
        texts += [t.get_text() for t in ax.get_xticklabels()]
        texts += [t.get_text() for t in ax.get_yticklabels()]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
    return [t for t in texts if t]
