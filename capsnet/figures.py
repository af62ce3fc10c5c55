"""Images and figures: tiling images into mosaics, tinting them, and
saving PNGs atomically (visualize.py, predict.py and evaluate.py use them).
"""
import numpy

import matplotlib
import matplotlib.image

from capsnet.files import atomic_write

matplotlib.use('Agg')  # no display needed (and none on a server)

BORDER = 2
BORDER_COLOR = (0.5, 0.5, 0.5)
FRAME_COLOR = (1.0, 0.0, 0.0)
GREEN = (0.25, 1.0, 0.25)
BLUE = (0.35, 0.6, 1.0)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def save_image(path, image):
    """Save (H, W) gray or (H, W, 3) RGB values in [0, 1] as a PNG."""
    image = numpy.clip(numpy.asarray(image, dtype=numpy.float32), 0, 1)
    kwargs = {'cmap': 'gray', 'vmin': 0, 'vmax': 1} if image.ndim == 2 \
        else {}
    atomic_write(path, lambda f: matplotlib.image.imsave(
        f, image, format='png', **kwargs))


def save_figure(path, figure, dpi=100):
    """Save a matplotlib Figure as a PNG atomically."""
    atomic_write(path, lambda f: figure.savefig(f, format='png',
                                                    dpi=dpi))


# --------------------------------------------------------------------------
# Mosaics
# --------------------------------------------------------------------------

def tint(images, color):
    """(..., H, W) gray in [0, 1] -> (..., H, W, 3): black stays black,
    white becomes ``color``."""
    images = numpy.asarray(images, dtype=numpy.float32)
    return images[..., None] * numpy.asarray(color, dtype=numpy.float32)


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
    images = numpy.asarray(images, dtype=numpy.float32)
    if images.ndim == 3:
        images = numpy.repeat(images[..., None], 3, axis=3)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError('images must be (N, H, W) or (N, H, W, 3), got {}'
                         .format(images.shape))
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
        top = border + row * (height + border)
        left = border + col * (width + border)
        ring = grid[top - border:top + height + border,
                    left - border:left + width + border]
        ring[:border] = frame_color
        ring[-border:] = frame_color
        ring[:, :border] = frame_color
        ring[:, -border:] = frame_color
    return numpy.clip(grid, 0, 1)
