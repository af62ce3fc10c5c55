"""capsnet.images: every image file PIL reads, brought to gray levels in
[0, 1] by its real range and shown upright (EXIF orientation), so predict.py
prepares the same digit from any of them; what cannot be read right is one
line (ImageError)."""
import numpy
import pytest
from PIL import Image, ImageFilter

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import images
from capsnet.images import ImageError
import predict


def digit(height=40, width=30, blur=True):
    """uint8 (H, W): a white, lopsided '7'-like stroke on black (no
    symmetry, so any flip or turn shows)."""
    g = numpy.zeros((height, width), numpy.uint8)
    g[6:10, 5:25] = 255                  # the bar
    for row in range(10, 34):            # the slanted leg
        col = 24 - (row - 10) // 2
        g[row, col - 2:col + 2] = 255
    g[20:23, 10:20] = 180                # a fainter cross bar
    if not blur:
        return g
    # soft edges, as a scan or MNIST has (JPEG's ringing stays small)
    image = Image.fromarray(g).filter(ImageFilter.GaussianBlur(1))
    return numpy.asarray(image)


def same_digit(gray, reference, tolerance=0.03):
    """predict.py's preprocessing of both gives the same 28 x 28 digit."""
    a = predict.preprocess(gray)
    b = predict.preprocess(reference)
    assert numpy.abs(a - b).mean() < tolerance, numpy.abs(a - b).mean()


def save(tmp_path, image, name, **options):
    path = tmp_path / name
    image.save(path, **options)
    return str(path)


# --------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------

# what exif_transpose does for each orientation; the file holds the inverse
SHOWN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}
STORED = dict(SHOWN) | {6: Image.Transpose.ROTATE_90,
                          8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize('orientation', range(1, 9))
@pytest.mark.parametrize('fmt', ['jpg', 'png'])
def test_exif_orientation_is_applied(tmp_path, orientation, fmt):
    """A phone stores the sensor's pixels and says how to turn them: the
    digit read must be the upright one, for all 8 orientations."""
    upright = Image.fromarray(255 - digit())   # dark ink on white paper
    stored = upright if orientation == 1 else upright.transpose(
        STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, stored, 'photo.' + fmt, exif=exif.tobytes(),
                **({'quality': 100} if fmt == 'jpg' else {}))
    gray = images.read_gray(path)
    assert gray.shape == (40, 30)
    assert numpy.abs(gray - (255 - digit()) / 255).mean() < 0.03
    with Image.open(path) as raw:   # the decoded pixels, turned by hand
        shown = raw if orientation == 1 else raw.transpose(
            SHOWN[orientation])
        numpy.testing.assert_allclose(gray, numpy.asarray(shown) / 255)


# --------------------------------------------------------------------------
# Every mode and bit depth, by its real range
# --------------------------------------------------------------------------

def as_mode(mode):
    """digit() as a PIL image of ``mode`` showing the same gray levels."""
    g = digit()
    if mode == '1':
        return Image.fromarray(g >= 128)
    if mode == 'L':
        return Image.fromarray(g)
    if mode == 'P':   # indices reversed: only the palette gives the grays
        image = Image.fromarray(255 - g).convert('P')
        image.putpalette([255 - i for i in range(256) for _ in range(3)])
        return image
    if mode == 'RGB':
        return Image.fromarray(numpy.stack([g] * 3, axis=-1))
    if mode == 'CMYK':
        return Image.fromarray(numpy.stack([g] * 3, axis=-1)).convert('CMYK')
    if mode == 'I;16':
        return Image.fromarray(g.astype(numpy.uint16) * 257)
    if mode == 'I;16B':
        return Image.frombytes('I;16B', g.shape[::-1],
                               (g.astype('>u2') * 257).tobytes())
    if mode == 'I':
        return Image.fromarray(g.astype(numpy.int32) * 8421504)  # 2**31-1
    if mode == 'F255':
        return Image.fromarray(g.astype(numpy.float32))
    if mode == 'F1':
        return Image.fromarray(g.astype(numpy.float32) / 255)
    raise ValueError(mode)


@pytest.mark.parametrize('mode, fmt', [
    ('1', 'png'), ('L', 'png'), ('P', 'png'), ('RGB', 'png'),
    ('CMYK', 'jpg'), ('CMYK', 'tif'), ('I;16', 'png'), ('I;16', 'tif'),
    ('I;16B', 'tif'), ('I', 'tif'), ('F255', 'tif'), ('F1', 'tif'),
    ('L', 'pgm'), ('I;16', 'pgm'),
])
def test_every_mode_gives_the_same_digit(tmp_path, mode, fmt):
    path = save(tmp_path, as_mode(mode), 'digit.' + fmt,
                **({'quality': 100} if fmt == 'jpg' else {}))
    gray = images.read_gray(path)
    assert gray.dtype == numpy.float64 and gray.shape == (40, 30)
    assert 0 <= gray.min() and gray.max() <= 1
    reference = digit() / 255
    if mode == '1':
        reference = (digit() >= 128).astype(float)
    assert numpy.abs(gray - reference).mean() < 0.03, (mode, fmt)
    same_digit(gray, reference)


def test_a_dim_16_bit_image_keeps_its_range():
    """16-bit levels are out of 65535, even when none is above 255."""
    dim = (digit() // 2).astype(numpy.uint16)
    gray = images.to_gray(Image.fromarray(dim))
    assert gray.max() == pytest.approx(dim.max() / 65535)


def test_a_16_bit_pgm_with_a_small_maxval_is_scaled_by_it(tmp_path):
    path = tmp_path / 'ten-bit.pgm'
    g = (digit().astype(numpy.uint32) * 1023) // 255
    path.write_bytes(b'P5 30 40 1023\n' + g.astype('>u2').tobytes())
    gray = images.read_gray(str(path))
    assert numpy.abs(gray - digit() / 255).max() < 0.01


@pytest.mark.parametrize('mode', ['LA', 'RGBA', 'PA'])
@pytest.mark.parametrize('ink', [0, 255])
def test_alpha_is_composited_on_the_background_the_ink_implies(tmp_path,
                                                                mode, ink):
    """Opaque strokes on a transparent canvas: dark ink lands on white,
    light ink on black; either way the digit is the same."""
    g = digit()
    alpha = g
    level = numpy.full_like(g, ink)
    if mode == 'LA':
        image = Image.fromarray(numpy.stack([level, alpha], -1), 'LA')
    elif mode == 'RGBA':
        image = Image.fromarray(numpy.stack([level] * 3 + [alpha], -1))
    else:
        image = Image.fromarray(level).convert('P').convert('PA')
        image.putalpha(Image.fromarray(alpha))
    if mode == 'PA':   # PNG cannot hold PA: as PIL would give it
        gray = images.to_gray(image)
    else:
        gray = images.read_gray(save(tmp_path, image, 'digit.png'))
    expected = g / 255 if ink == 255 else 1 - g / 255
    assert numpy.abs(gray - expected).mean() < 0.03
    same_digit(gray, g / 255)


def test_a_transparent_colour_key_is_honoured(tmp_path):
    """A gray PNG whose background level is declared transparent (tRNS)."""
    g = 255 - digit(blur=False)                 # dark ink on white
    g[g == 255] = 128                           # the canvas: mid gray ...
    image = Image.fromarray(g)
    path = save(tmp_path, image, 'keyed.png', transparency=128)  # ... clear
    gray = images.read_gray(path)
    same_digit(gray, digit(blur=False) / 255)


# --------------------------------------------------------------------------
# Refused, in one line
# --------------------------------------------------------------------------

@pytest.mark.parametrize('values, fragments', [
    ((0.0, 1000.0), ['0 to 1000', '[0, 1]', '[0, 255]']),
    ((-1.0, 1.0), ['-1 to 1']),
    ((0.0, numpy.nan), ['non-finite']),
    ((0.0, numpy.inf), ['non-finite']),
])
def test_float_images_out_of_range_are_refused(tmp_path, values, fragments):
    g = (digit() / 255).astype(numpy.float32)
    g[0, 0], g[0, 1] = values
    path = save(tmp_path, Image.fromarray(g), 'float.tif')
    with pytest.raises(ImageError) as caught:
        images.read_gray(path)
    message = str(caught.value)
    assert '\n' not in message
    for fragment in fragments:
        assert fragment in message, message


def test_negative_integer_pixels_are_refused():
    g = digit().astype(numpy.int32)
    g[0, 0] = -5
    with pytest.raises(ImageError, match='negative'):
        images.to_gray(Image.fromarray(g))


def test_predict_uses_the_library_reader():
    assert predict.read_gray is images.read_gray
    assert predict.ImageError is ImageError
