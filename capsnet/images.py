"""Image files as gray levels in [0, 1], read right whatever PIL opens.

    gray = read_gray('digit.jpg')     # (H, W) float64 in [0, 1], upright

- Orientation: the EXIF orientation tag (phone photos) is applied, so the
  digit is upright as any viewer shows it (an unreadable EXIF block counts
  as no tag).
- Range: each mode by its real range, not by the values it happens to hold:
  1-bit, L, P (through its palette), RGB, CMYK, YCbCr ... (8-bit, by 255;
  colour as luminance, ITU-R 601 as PIL's 'L'); I;16 / I;16B / 16-bit PGM
  (by 65535; PIL scales a PGM's maxval to it); I (by its stored sample
  type: 16-bit by 65535, 32-bit by 2**31 - 1 or 2**32 - 1; an image whose
  type PIL does not say, by 65535 if its values fit in 16 bits, else by
  2**31 - 1); F (float): kept if within [0, 1], divided by 255 if within
  [0, 255], else refused, as are non-finite pixels and negative integers.
- Alpha (LA, RGBA, PA, La, RGBa, a palette's or a colour key's
  transparency): the transparent pixels are composited onto the background
  that contrasts with the opaque (drawn) pixels: white under dark ink,
  black under light ink, so both survive. White alone would lose light
  strokes on a transparent canvas, and the drawn pixels say which it is.
- Only the first frame of an animation is used.

Every problem is an ImageError whose str() is the one-line reason.
"""
import os
import warnings

import numpy
from PIL import Image, ImageOps, UnidentifiedImageError

from capsnet.errors import CapsNetError


class ImageError(CapsNetError):
    """An input that cannot be read right; str() is the one-line reason."""


def describe(e):
    """An exception's text on one line (its type when it has none)."""
    text = ' '.join(str(e).split())
    return text or type(e).__name__


def read_gray(path):
    """Read an image file as (H, W) float64 gray levels in [0, 1], upright
    (EXIF orientation applied), by its mode's real range (module doc).

    Raises:
        ImageError: missing, a folder, empty, unreadable, not an image,
            truncated, float values outside [0, 1] and [0, 255], non-finite
            or negative pixels.
    """
    if not os.path.exists(path):
        raise ImageError('no such file')
    if os.path.isdir(path):
        raise ImageError('is a folder with no image files')
    try:
        if os.path.getsize(path) == 0:
            raise ImageError('file is empty')
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                rawmode = stored_rawmode(image)
                image.load()
                return to_gray(upright(image), rawmode)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError('not an image file (PIL cannot identify it)')
    except (Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageError('image is too large ({})'.format(describe(e)))
    except OSError as e:
        raise ImageError('cannot read the image ({}); the file may be '
                         'truncated or corrupt'.format(
                             e.strerror or describe(e)))
    except (ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError('cannot decode the image ({}: {})'.format(
            type(e).__name__, describe(e)))


def stored_rawmode(image):
    """How the file stores its samples (PIL's raw mode of its first tile,
    e.g. 'I;16B', 'I;32S', 'F;32F'), known before ``load``; None if PIL
    does not say. A PGM/PPM gives ('L', maxval): 'maxval'."""
    try:
        tile = image.tile[0]
    except (AttributeError, IndexError, TypeError):
        return None
    args = tile[3] if len(tile) > 3 else None
    if tile[0] == 'ppm':
        return 'maxval'  # PIL scales a PGM's maxval to the mode's range
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else None


def upright(image):
    """``image`` turned as its EXIF orientation tag says (a new image), or
    itself without a tag (or with an unreadable EXIF block)."""
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: PIL raises several kinds
        return image
    return image if turned is None else turned


def integer_range(mode, rawmode, values):
    """The largest level of an integer image (mode I or I;16...): the range
    of the type the file stores (``rawmode``: 'I;16B' 65535, 'I;32S' or 'I'
    2**31 - 1, 'I;32' 2**32 - 1, 'L' or 'I;8' 255); without one, 65535 if
    the ``values`` fit in 16 bits, else 2**31 - 1."""
    if mode.startswith('I;16') or rawmode == 'maxval' or \
            (rawmode and rawmode.startswith('I;16')):
        return 65535.0
    if rawmode and rawmode.startswith('I;32'):
        signed = rawmode.endswith('S')
        return float(2 ** 31 - 1 if signed else 2 ** 32 - 1)
    if rawmode == 'I':
        return float(2 ** 31 - 1)
    if rawmode and rawmode.startswith(('L', 'I;8')):
        return 255.0
    return 65535.0 if values.max(initial=0) <= 65535 else float(2 ** 31 - 1)


def _float_gray(values):
    """Mode F: [0, 1] kept, [0, 255] divided by 255, else ImageError."""
    finite = numpy.isfinite(values)
    if not finite.all():
        raise ImageError(
            'the float image holds {} non-finite pixel{} (NaN or infinity); '
            'fix or re-export the image'.format(
                (~finite).sum(), 's' if (~finite).sum() > 1 else ''))
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return values
    if low >= 0 and high <= 255:
        return values / 255
    raise ImageError(
        'the float image\'s pixels range from {:g} to {:g}, outside [0, 1] '
        'and [0, 255]; scale it to [0, 1] or save it as an 8- or 16-bit '
        'image'.format(low, high))


def _has_alpha(image):
    return image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or \
        'transparency' in image.info


def to_gray(image, rawmode=None):
    """PIL image -> (H, W) float64 in [0, 1], alpha composited (module doc).

    ``rawmode``: how the file stored the samples (``stored_rawmode``), for
    the range of an integer image.
    """
    alpha = None
    if image.mode == 'F':
        gray = _float_gray(numpy.asarray(image, dtype=numpy.float64))
    elif image.mode == 'I' or image.mode.startswith('I;'):
        values = numpy.asarray(image, dtype=numpy.float64)
        if values.size and values.min() < 0:
            raise ImageError('the image holds negative pixel values (down to '
                             '{:g}); save it as an 8- or 16-bit image'
                             .format(values.min()))
        gray = values / integer_range(image.mode, rawmode, values)
    else:
        if _has_alpha(image):
            image = image.convert('LA' if image.mode in ('L', 'LA', 'La', '1')
                                  else 'RGBA')
            alpha = numpy.asarray(image.getchannel('A'),
                                  dtype=numpy.float64) / 255
        try:
            gray = numpy.asarray(image.convert('L'), dtype=numpy.float64)
        except ValueError:
            try:
                gray = numpy.asarray(image.convert('RGB').convert('L'),
                                     dtype=numpy.float64)
            except ValueError as e:
                raise ImageError('cannot read images of mode {} ({}); save '
                                 'it as PNG'.format(image.mode, describe(e)))
        gray = gray / 255
    gray = numpy.clip(gray, 0, 1)
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError('image has no pixels (size {})'.format(
            'x'.join(str(s) for s in gray.shape)))
    if alpha is not None and (alpha < 1).any():
        weight = alpha.sum()
        ink = (alpha * gray).sum() / weight if weight > 0 else 0.0
        background = 1.0 if ink < 0.5 else 0.0
        gray = alpha * gray + (1 - alpha) * background
    return gray
