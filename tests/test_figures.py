"""capsnet/figures.py: labelled mosaic figures scaled up for a screen (exact
tile pixels in the PNG, texts inside the page and off the digits)."""
import io
import os

import numpy
import pytest
from PIL import Image

from capsnet import figures
from conftest import tile_shape


def png_of(figure):
    """(H, W, 3) uint8 of a figure saved as save_figure saves it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=figure.dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return numpy.asarray(image.convert('RGB'))


def text_boxes(figure):
    """[(text, (top, left, bottom, right))] in PNG pixels of every text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    height = figures.pixel_size(figure)[1]
    boxes = []
    for text in figure.texts:
        box = text.get_window_extent(renderer)
        boxes.append((text.get_text(), (height - box.y1, box.x0,
                                         height - box.y0, box.x1)))
    return boxes


def overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def digits(n=6, side=7, seed=0):
    return numpy.random.RandomState(seed).rand(n, side, side).astype(
        numpy.float32)


# -- plain mosaics -------------------------------------------------------------

def test_upscale_repeats_each_pixel_into_a_block():
    images = numpy.arange(4, dtype=numpy.float32).reshape(1, 2, 2)
    big = figures.upscale(images, 3)
    assert big.shape == (1, 6, 6)
    numpy.testing.assert_array_equal(big[0, :3, :3], 0)
    numpy.testing.assert_array_equal(big[0, 3:, 3:], 3)
    assert figures.upscale(numpy.zeros((2, 4, 5, 3)), 2).shape == (2, 8, 10,
                                                                   3)


def test_border_grows_with_the_scale():
    assert figures.border_px(1) == figures.BORDER
    assert figures.border_px(figures.SCALE) == 4
    assert 4 <= figures.SCALE <= 8


# -- labelled mosaic figures ---------------------------------------------------

@pytest.mark.parametrize('scale', [1, 4, 6])
def test_mosaic_figure_places_every_tile_exactly_at_the_scale(scale):
    images = digits()
    figure, layout = figures.mosaic_figure(
        images, 3, 'A title', scale=scale, row_labels=['first', 'second'])
    png = png_of(figure)
    assert png.shape[:2] == (layout.height, layout.width)
    assert figures.pixel_size(figure) == (layout.width, layout.height)
    side = 7 * scale
    border = figures.border_px(scale)
    top, left, height, width = layout.mosaic
    assert (height, width) == tile_shape(2, 3, side, border)
    for k in range(6):
        t, lft, bottom, right = layout.tile_box(*divmod(k, 3))
        assert (bottom - t, right - lft) == (side, side)
        expected = numpy.round(255 * figures.upscale(images[k:k + 1],
                                                     scale)[0])
        numpy.testing.assert_array_equal(png[t:bottom, lft:right, 0],
                                         expected)
        assert (png[t:bottom, lft:right, 0] == png[t:bottom, lft:right,
                                                   2]).all()   # gray
    # the border between tile 0 and tile 1 is the border colour
    t, lft, bottom, right = layout.tile_box(0, 0)
    gap = png[t:bottom, right:right + border]
    assert (gap == round(255 * figures.MOSAIC_BORDER_COLOR[0])).all()


def test_texts_are_drawn_inside_the_page_and_off_the_tiles():
    figure, layout = figures.mosaic_figure(
        digits(side=28), 3, 'Title\nsecond line', row_labels=['row a', 'row b'],
        col_labels=['-0.25', '0', '+0.25'], col_title='value added',
        row_title='dimension', tile_labels=['true 1, pred 2', None,
                                            'true 3, pred 3', None, None,
                                            None],
        tile_colors=[figures.WRONG_COLOR, 'black', 'black', 'black',
                     'black', 'black'])
    texts = [t for t, _ in text_boxes(figure)]
    for expected in ('Title\nsecond line', 'row a', 'row b', '-0.25', '0',
                     '+0.25', 'value added', 'dimension', 'true 1, pred 2',
                     'true 3, pred 3'):
        assert expected in texts
    assert figures.figure_texts(figure) == texts
    tiles = [layout.tile_box(r, c) for r in range(2) for c in range(3)]
    for text, box in text_boxes(figure):
        assert box[0] >= 0 and box[1] >= 0, text
        assert box[2] <= layout.height and box[3] <= layout.width, text
        for tile_box in tiles:
            assert not overlaps(box, tile_box), (text, box, tile_box)
    labels = [box for text, box in text_boxes(figure)
              if text.startswith('true')]
    assert not overlaps(*labels)
    colors = {t.get_text(): t.get_color() for t in figure.texts}
    assert colors['true 1, pred 2'] == figures.WRONG_COLOR


def test_frames_are_red_around_the_tile_and_leave_it_untouched():
    images = digits()
    plain, layout = figures.mosaic_figure(images, 3, 't', scale=2)
    framed, same = figures.mosaic_figure(images, 3, 't', scale=2,
                                         frames=[(1, 2)])
    a, b = png_of(plain), png_of(framed)
    changed = (a != b).any(axis=2)
    t, lft, bottom, right = layout.tile_box(1, 2)
    border = figures.border_px(2)
    assert changed.any() and not changed[t:bottom, lft:right].any()
    assert (b[t - border:t, lft:right] == [255, 0, 0]).all()
    assert (b[t:bottom, right:right + border] == [255, 0, 0]).all()
    ring = numpy.zeros_like(changed)
    ring[t - border:bottom + border, lft - border:right + border] = True
    assert not changed[~ring].any()


def test_long_texts_widen_the_page():
    title = 'x' * 200
    figure, layout = figures.mosaic_figure(digits(1), 1, title)
    box = dict(text_boxes(figure))[title]
    assert box[3] <= layout.width
    label = 'a label far wider than the tile'
    figure, layout = figures.mosaic_figure(digits(1), 1, 't',
                                           tile_labels=[label])
    box = dict(text_boxes(figure))[label]
    assert box[1] >= 0 and box[3] <= layout.width


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='scale'):
        figures.mosaic_figure(digits(), 3, 't', scale=0)
    with pytest.raises(ValueError, match='row_labels'):
        figures.mosaic_figure(digits(), 3, 't', row_labels=['a'])
    with pytest.raises(ValueError, match='tile labels'):
        figures.mosaic_figure(digits(), 3, 't', tile_labels=['a'])


def test_save_figure_writes_the_exact_size_atomically(tmp_path):
    figure, layout = figures.mosaic_figure(digits(), 3, 'saved')
    path = tmp_path / 'f.png'
    figures.save_figure(str(path), figure)
    with Image.open(path) as image:
        assert image.size == (layout.width, layout.height)
    assert os.listdir(tmp_path) == ['f.png']
