"""The data of the paper's other two experiments, made from the real MNIST.

- MultiMNIST (Section 6): each example overlays a digit on a digit of a
  different class from the same split, each shifted by up to 4 pixels in
  each direction on a 36 x 36 canvas; pixels are summed and clipped to
  [0, 1], as the authors' released code (``mnist_shift.py`` of
  Sarasra/models, research/capsules, ``shift_write_multi_mnist``) does
  with uint8 images: add, then ``minimum(..., 255)`` (docs/experiments.md
  lists where the pairing and shifting here differ from it). Every example
  keeps both labels and both shifted single-digit images (the targets of
  the reconstruction loss).
  ``multimnist(...)`` is deterministic from its seed; ``cached_multimnist``
  keeps it in a .npz whose settings and checksum are checked on every load.
- Expanded MNIST (Section 5.2): each digit placed at a random position on a
  40 x 40 black canvas (``expanded_mnist``).
- affNIST: the real test set is read from its .mat files when the user has
  them (``read_affnist``, through SciPy); otherwise ``affnist_like`` makes a
  test set from the MNIST test digits with the published affNIST
  transformation ranges. Numbers measured on it are labelled "generated".

All images here are uint8 (N, S, S) arrays; ``to_float`` makes the float32
(N, 1, S, S) in [0, 1] that the networks take.
"""
import hashlib
import json
import math
import os
import zipfile

import numpy

from capsnet import cli
from capsnet.data import mnist

MULTI_CANVAS = 36
MULTI_SHIFT = 4
AFFNIST_CANVAS = 40
# https://www.cs.toronto.edu/~tijmen/affNIST/ (Tieleman): rotation within
# 20 degrees either way, shearing within 0.2 either way, scaling from 0.8 to
# 1.2 vertically and horizontally (independently), translation such that the
# digit stays in the 40 x 40 image.
AFFNIST_ROTATION_DEG = 20.0
AFFNIST_SHEAR = 0.2
AFFNIST_SCALE = (0.8, 1.2)
_SPLIT_SEED = {'train': 0, 'test': 1}


class DataError(mnist.DatasetError):
    """Bad settings, a cache made with other settings, a bad affNIST file.
    str() is one line."""


def load_mnist_arrays(data_dir=None, root=None):
    """The verified MNIST files as uint8 arrays.

    Returns:
        dict split -> (images (N, 28, 28) uint8, labels (N,) uint8) for
        'train' (60,000) and 'test' (10,000).
    """
    spec = mnist.DATASETS['mnist']['files']
    paths, fix = mnist._sources('mnist', data_dir, root)
    arrays = {f: mnist.load_idx(p, spec[f], fix) for f, p in paths.items()}
    return {'train': (arrays[mnist.TRAIN_IMAGES],
                      arrays[mnist.TRAIN_LABELS]),
            'test': (arrays[mnist.TEST_IMAGES],
                     arrays[mnist.TEST_LABELS])}


def place(images, canvas, dy, dx):
    """Put (N, h, w) images on (N, canvas, canvas) zeros, centred, then
    moved by (dy[n], dx[n]) pixels (positive: down / right); whatever moves
    outside the canvas is cut off."""
    n, h, w = images.shape
    out = numpy.zeros((n, canvas, canvas), images.dtype)
    top0, left0 = (canvas - h) // 2, (canvas - w) // 2
    for k in range(n):
        top, left = top0 + int(dy[k]), left0 + int(dx[k])
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + h, canvas), min(left + w, canvas)
        if r1 > r0 and c1 > c0:
            out[k, r0:r1, c0:c1] = images[k, r0 - top:r1 - top,
                                          c0 - left:c1 - left]
    return out


# --------------------------------------------------------------------------
# MultiMNIST
# --------------------------------------------------------------------------

def check_pairs_per_digit(pairs_per_digit):
    if (isinstance(pairs_per_digit, bool)
            or not isinstance(pairs_per_digit, (int, numpy.integer))
            or pairs_per_digit < 1):
        raise DataError('pairs per digit must be an integer >= 1 (the paper '
                        'uses 1000), got {!r}'.format(pairs_per_digit))


def multimnist(images, labels, pairs_per_digit, seed, split='train',
               max_shift=MULTI_SHIFT, canvas=MULTI_CANVAS):
    """MultiMNIST examples from one MNIST split, deterministic from seed.

    For every digit ("base", in order) ``pairs_per_digit`` examples are
    made: a partner ("top") drawn uniformly from the digits of the same
    split with another label, and independent shifts (dy, dx) of each, every
    one uniform on -max_shift ... max_shift. Example k * pairs_per_digit + p
    belongs to base digit k.

    Args:
        images: (N, 28, 28) uint8; labels: (N,) ints.
        split: 'train' or 'test'; mixed into the seed so that the two
            splits draw different pairs with the same seed.

    Returns:
        dict of arrays: x (M, S, S) uint8, the clipped sum; x1, x2 the two
        shifted digits alone (uint8, the reconstruction targets); t1, t2
        (M,) int32 labels (t1 != t2); index1, index2 (M,) the digits' indices
        in the split; shift (M, 4) int8: dy1, dx1, dy2, dx2.
    """
    check_pairs_per_digit(pairs_per_digit)
    if max_shift < 0 or canvas < images.shape[1]:
        raise DataError('max_shift must be >= 0 and the canvas at least {}'
                        .format(images.shape[1]))
    labels = numpy.asarray(labels).astype(numpy.int64)
    n = len(images)
    rs = numpy.random.RandomState([seed & 0xffffffff, _SPLIT_SEED[split]])
    base = numpy.repeat(numpy.arange(n), pairs_per_digit)
    by_class = [numpy.flatnonzero(labels != c) for c in range(10)]
    # a partner with another label: uniform over the other classes' digits
    u = rs.random_sample(len(base))
    top = numpy.empty_like(base)
    for c in range(10):
        where = labels[base] == c
        others = by_class[c]
        if where.any():
            if not len(others):
                raise DataError('no digit of another class than {} in the '
                                'split'.format(c))
            pick = (u[where] * len(others)).astype(numpy.int64)
            top[where] = others[numpy.minimum(pick, len(others) - 1)]
    shift = rs.randint(-max_shift, max_shift + 1,
                       size=(len(base), 4)).astype(numpy.int8)
    x1 = place(images[base], canvas, shift[:, 0], shift[:, 1])
    x2 = place(images[top], canvas, shift[:, 2], shift[:, 3])
    x = numpy.minimum(x1.astype(numpy.int16) + x2, 255).astype(numpy.uint8)
    return dict(x=x, x1=x1, x2=x2, t1=labels[base].astype(numpy.int32),
                t2=labels[top].astype(numpy.int32), index1=base, index2=top,
                shift=shift)


def _checksum(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = numpy.ascontiguousarray(arrays[key])
        h.update(key.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_multimnist(path, images, labels, settings, write=None):
    """multimnist(...) through a cache file.

    Args:
        path: the .npz; made when missing, else read and checked.
        settings: dict of multimnist's keyword arguments (pairs_per_digit,
            seed, split, max_shift, canvas) plus anything that identifies the
            source digits (e.g. n_digits); stored in the file.
        write: ``write(path, fn)`` to write atomically (files.atomic_write);
            default plain numpy.savez to a temp file and rename.

    Raises:
        DataError: the file was made with other settings, or its arrays do
            not match its checksum (truncated or edited).
    """
    settings = json.loads(json.dumps(settings, sort_keys=True))
    if os.path.exists(path):
        try:
            # the file is opened here so that it is closed even when
            # numpy.load fails on a damaged archive
            with open(path, 'rb') as f, \
                    numpy.load(f, allow_pickle=False) as npz:
                meta = json.loads(str(npz['_meta']))
                arrays = {k: npz[k] for k in npz.files if k != '_meta'}
        except (OSError, ValueError, KeyError, EOFError,
                zipfile.BadZipFile) as e:
            raise DataError('{} is not a readable MultiMNIST cache ({}); '
                            'delete it to make it again'.format(
                                path, ' '.join(str(e).split())))
        if meta.get('settings') != settings:
            raise DataError('{} was made with other settings ({}); delete '
                            'it or choose another cache file'.format(
                                path, cli.differences(
                                    meta.get('settings') or {}, settings)))
        if _checksum(arrays) != meta.get('sha256'):
            raise DataError('{} does not match its checksum (truncated or '
                            'edited); delete it to make it again'.format(path))
        return arrays
    keys = ('pairs_per_digit', 'seed', 'split', 'max_shift', 'canvas')
    arrays = multimnist(images, labels, **{k: settings[k] for k in keys
                                           if k in settings})
    meta = json.dumps(dict(settings=settings, sha256=_checksum(arrays)))

    def save(f):
        numpy.savez(f, _meta=numpy.array(meta), **arrays)
    if write is None:
        tmp = path + '.tmp'
        with open(tmp, 'wb') as f:
            save(f)
        os.replace(tmp, path)
    else:
        write(path, save)
    return arrays


# --------------------------------------------------------------------------
# Expanded MNIST and affNIST
# --------------------------------------------------------------------------

def expanded_mnist(images, seed, canvas=AFFNIST_CANVAS):
    """Each 28 x 28 digit at a uniformly random position on a canvas x
    canvas black image (every position where the whole 28 x 28 frame fits).
    Returns uint8 (N, canvas, canvas)."""
    rs = numpy.random.RandomState([seed & 0xffffffff, 2])
    room = canvas - images.shape[1]
    lo = -(room // 2)
    d = rs.randint(lo, lo + room + 1, size=(len(images), 2))
    return place(images, canvas, d[:, 0], d[:, 1])


def affine_matrix(angle_deg, shear, scale_y, scale_x):
    """2 x 2 matrix (row, col coordinates): rotation @ shear @ scale."""
    a = math.radians(angle_deg)
    rotation = numpy.array([[math.cos(a), -math.sin(a)],
                            [math.sin(a), math.cos(a)]])
    shearing = numpy.array([[1.0, 0.0], [shear, 1.0]])
    return rotation @ shearing @ numpy.diag([scale_y, scale_x])


def affnist_like(images, seed, canvas=AFFNIST_CANVAS):
    """A generated affNIST-like set: each digit, centred on a canvas,
    rotated by U(-20, 20) degrees, sheared by U(-0.2, 0.2), scaled by
    U(0.8, 1.2) vertically and horizontally (independently), about its
    centre, then translated uniformly among the offsets that keep all its
    ink inside the canvas (bilinear interpolation, SciPy).

    This is NOT affNIST: numbers measured on it are labelled 'generated'.

    Returns:
        (uint8 (N, canvas, canvas), params float (N, 6): angle, shear,
        scale_y, scale_x, dy, dx).
    """
    from scipy import ndimage
    rs = numpy.random.RandomState([seed & 0xffffffff, 3])
    n, h, w = images.shape
    angle = rs.uniform(-AFFNIST_ROTATION_DEG, AFFNIST_ROTATION_DEG, n)
    shear = rs.uniform(-AFFNIST_SHEAR, AFFNIST_SHEAR, n)
    scale = rs.uniform(AFFNIST_SCALE[0], AFFNIST_SCALE[1], (n, 2))
    u = rs.random_sample((n, 2))
    centred = place(images, canvas, numpy.zeros(n), numpy.zeros(n))
    centre = (canvas - 1) / 2.0
    out = numpy.zeros((n, canvas, canvas), numpy.uint8)
    params = numpy.zeros((n, 6))
    for k in range(n):
        A = affine_matrix(angle[k], shear[k], scale[k, 0], scale[k, 1])
        inverse = numpy.linalg.inv(A)
        offset = centre - inverse @ numpy.array([centre, centre])
        moved = ndimage.affine_transform(
            centred[k].astype(numpy.float32), inverse, offset=offset,
            order=1, mode='constant', cval=0.0)
        rows = numpy.flatnonzero(moved.max(axis=1) > 0.5)
        cols = numpy.flatnonzero(moved.max(axis=0) > 0.5)
        if len(rows):
            dy_lo, dy_hi = -rows[0], canvas - 1 - rows[-1]
            dx_lo, dx_hi = -cols[0], canvas - 1 - cols[-1]
            dy = dy_lo + int(u[k, 0] * (dy_hi - dy_lo + 1))
            dx = dx_lo + int(u[k, 1] * (dx_hi - dx_lo + 1))
            dy, dx = min(dy, dy_hi), min(dx, dx_hi)
        else:
            dy = dx = 0
        moved = numpy.clip(numpy.rint(moved), 0, 255).astype(numpy.uint8)
        out[k] = place(moved[None], canvas, [dy], [dx])[0]
        params[k] = (angle[k], shear[k], scale[k, 0], scale[k, 1], dy, dx)
    return out, params


def read_affnist(path):
    """Images and labels of one affNIST .mat file (e.g. test.mat or one of
    test_batches/*.mat of https://www.cs.toronto.edu/~tijmen/affNIST/).

    The file holds a struct ``affNISTdata`` with fields ``image`` (1600 x N
    uint8, one 40 x 40 image per column) and ``label_int`` (N labels 0-9).

    Returns:
        (uint8 (N, 40, 40), int32 (N,)).
    Raises:
        DataError: unreadable, or not of that structure.
    """
    from scipy import io as scipy_io

    def bad(why):
        return DataError('{} is not an affNIST .mat file ({}); pass a file '
                         'of https://www.cs.toronto.edu/~tijmen/affNIST/ '
                         '(e.g. test.mat) or leave the option out to use the '
                         'generated affNIST-like set'.format(path, why))
    try:
        mat = scipy_io.loadmat(path, struct_as_record=False,
                               squeeze_me=True)
    except FileNotFoundError:
        raise DataError('affNIST file {} does not exist'.format(path))
    except Exception as e:  # SciPy raises many kinds on a bad file
        raise bad('{}: {}'.format(type(e).__name__,
                                  ' '.join(str(e).split())[:120]))
    data = mat.get('affNISTdata')
    if data is None:
        raise bad('no affNISTdata struct')
    try:
        image = numpy.asarray(data.image)
        label = numpy.asarray(data.label_int).reshape(-1)
    except AttributeError as e:
        raise bad('affNISTdata lacks a field: {}'.format(e))
    side = AFFNIST_CANVAS
    if image.ndim == 1:
        image = image[:, None]
    if image.ndim != 2 or image.shape[0] != side * side:
        raise bad('image has shape {}, expected (1600, N)'
                  .format(image.shape))
    if label.shape != (image.shape[1],):
        raise bad('{} labels for {} images'.format(label.size,
                                                   image.shape[1]))
    if label.size and (label.min() < 0 or label.max() > 9):
        raise bad('labels outside 0-9')
    # each column is one image, its 1600 pixels row by row (the layout the
    # usual Python readers of affNIST assume: image.T.reshape(-1, 40, 40))
    images = image.T.reshape(-1, side, side)
    return numpy.ascontiguousarray(images, numpy.uint8), \
        label.astype(numpy.int32)


def to_float(images):
    """uint8 (N, S, S) -> float32 (N, 1, S, S) in [0, 1]."""
    return (images.astype(numpy.float32) / 255)[:, None]
