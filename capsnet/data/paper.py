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
  keeps it in a .npz whose settings and checksum are checked on every load
  (small sets). ``MultiMNIST`` (a chainer dataset) makes pair i on the fly
  from (seed, split, i) alone, in constant memory: the paper's 60M pairs.
  ``bounding_box_overlap`` measures the paper's "80% overlap" (20 x 20
  boxes); ``mean_overlap`` is the generator's average for a shift range.
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

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

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


def check_count(n, available, flag):
    """DataError unless 0 < ``n`` <= ``available``: a count beyond the data
    is refused naming the limit, never clamped."""
    if not 0 < n <= available:
        raise DataError('{} {} is beyond the data: there are {} images, so '
                        'use 1 to {}'.format(flag, n, available, available))


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
# MultiMNIST at the paper's scale: pairs made on the fly
# --------------------------------------------------------------------------
#
# Section 6: "For each digit in the MNIST dataset we generate 1K MultiMNIST
# examples. So the training set size is 60M and the test set size is 10M."
# 60M pairs of 3 x 36 x 36 bytes do not fit in memory, so MultiMNIST below
# makes pair i from (seed, split, i) alone, with a counter-based generator:
# draw j of pair i is SplitMix64's output for the counter i * 5 + j of a
# stream keyed by (seed, split). Any pair can be made in any order, on any
# process, without state; the iterator's order is the only state of a run.

DIGIT_BOX = 20   # Section 6: "a digit in a 28x28 image is bounded in a 20x20 box"
_DRAWS = 5       # per pair: the partner, dy1, dx1, dy2, dx2
_GOLDEN = numpy.uint64(0x9E3779B97F4A7C15)
_MIX1 = numpy.uint64(0xBF58476D1CE4E5B9)
_MIX2 = numpy.uint64(0x94D049BB133111EB)


def _mix64(z):
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> numpy.uint64(30))) * _MIX1
    z = (z ^ (z >> numpy.uint64(27))) * _MIX2
    return z ^ (z >> numpy.uint64(31))


def stream_key(seed, split):
    """The uint64 key of the stream of (seed, split): (1,) array."""
    z = _mix64(numpy.array([seed], numpy.uint64) * _GOLDEN
               + numpy.uint64(_SPLIT_SEED[split] + 1))
    return _mix64(z + _GOLDEN)


def counter_ints(key, counters, n):
    """Integers uniform on 0 ... n - 1 for each counter, from the key alone.

    Args:
        key: (1,) uint64 (stream_key); counters: (...) uint64; n: int or
            array broadcasting with counters, each 1 <= n < 2**32.
    Returns:
        int64 array of counters' shape: the top 32 bits of SplitMix64's
        output for (key + counter * golden), times n, >> 32 (bias below
        n / 2**32).
    """
    r = _mix64(key + counters * _GOLDEN) >> numpy.uint64(32)
    return ((r * numpy.asarray(n, numpy.uint64)) >> numpy.uint64(32)) \
        .astype(numpy.int64)


def bounding_box_overlap(shift1, shift2, box=DIGIT_BOX):
    """Overlap of two digits' box x box boxes, as a fraction of one box.

    Both digits are centred on the same canvas point before their shifts
    (the generator's placement), so the boxes are offset by shift1 - shift2.

    Args:
        shift1, shift2: (..., 2) integer (dy, dx) shifts.
    Returns:
        float64 (...,): intersection area / box**2, in [0, 1].
    """
    d = numpy.abs(numpy.asarray(shift1, numpy.int64)
                  - numpy.asarray(shift2, numpy.int64))
    side = numpy.clip(box - d, 0, box)
    return side[..., 0] * side[..., 1] / float(box * box)


def expected_overlap(max_shift, box=DIGIT_BOX):
    """The mean of bounding_box_overlap when every shift is uniform on
    -max_shift ... max_shift (independently): (1 - E|d| / box)^2, E|d| =
    (n^2 - 1) / (3 n) for the difference of two uniforms on n = 2 max_shift
    + 1 values (exact while 2 max_shift <= box)."""
    n = 2 * max_shift + 1
    return (1 - (n * n - 1) / (3.0 * n) / box) ** 2


def _check_int(name, value, low, why=''):
    if (isinstance(value, bool)
            or not isinstance(value, (int, numpy.integer)) or value < low):
        raise DataError('{} must be an integer >= {}{}, got {!r}'.format(
            name, low, why, value))


class MultiMNIST(chainer.dataset.DatasetMixin):
    """MultiMNIST pairs made on the fly: constant memory, any size.

    Pair i belongs to base digit k = i // pairs_per_digit (as multimnist()):
    its partner is uniform among the digits of the split with another
    label, and the shifts dy1, dx1, dy2, dx2 are each uniform on -max_shift
    ... max_shift; all five come from counter_ints(stream_key(seed, split),
    i * 5 + j), so pair i is the same on every run, process and MPI rank, in
    any order of access, and a run resumed mid-epoch goes on with the same
    pairs. Pixels as multimnist(): both digits centred on the canvas, moved
    by their shifts (whatever leaves the canvas is cut off), the uint8 sum
    clipped at 255, then / 255. The digits' arrays are kept by reference;
    nothing proportional to the number of pairs is ever allocated.

    Args:
        images: (N, 28, 28) uint8 digits of one split; labels: (N,) 0-9.
        pairs_per_digit: pairs per base digit (the paper: 1000, so 60M
            training pairs and 10M test pairs).
        seed: int >= 0; split: 'train' or 'test' (another stream).
        max_shift: the largest shift in pixels (4: the paper's "up to 4
            pixels in each direction"); canvas: side of the output.

    ``len()`` is N * pairs_per_digit. ``get_example(i)`` is (x, t1, t2, x1,
    x2): float32 (1, S, S) images and int32 labels, t1 != t2.
    ``get_examples(indices)`` makes a whole batch in one vectorised call
    (float32 (B, 1, S, S), int32 (B,) ...), and ``dataset[indices]`` (a
    slice, list or array) uses it, so chainer's iterators and
    concat_examples work unchanged.
    """

    def __init__(self, images, labels, pairs_per_digit, seed, split='train',
                 max_shift=MULTI_SHIFT, canvas=MULTI_CANVAS):
        check_pairs_per_digit(pairs_per_digit)
        _check_int('the MultiMNIST seed', seed, 0)
        _check_int('the MultiMNIST shift', max_shift, 0, ' (the paper: 4)')
        if split not in _SPLIT_SEED:
            raise DataError("split must be 'train' or 'test', got {!r}"
                            .format(split))
        images = numpy.asarray(images)
        labels = numpy.asarray(labels).reshape(-1).astype(numpy.int64)
        if images.ndim != 3 or images.dtype != numpy.uint8 \
                or len(images) != len(labels) or not len(images):
            raise DataError('MultiMNIST needs (N, h, w) uint8 digits and N '
                            'labels, got {} {} and {} labels'.format(
                                images.dtype, images.shape, len(labels)))
        if labels.min() < 0 or labels.max() > 9:
            raise DataError('MultiMNIST labels must be 0-9, got {} ... {}'
                            .format(labels.min(), labels.max()))
        _check_int('the canvas', canvas, max(images.shape[1:]))
        self.images, self.labels = images, labels
        self.pairs_per_digit = int(pairs_per_digit)
        self.seed, self.split = int(seed), split
        self.max_shift, self.canvas = int(max_shift), int(canvas)
        self._key = stream_key(self.seed, split)
        # _others[c, :_count[c]]: the digits whose label is not c
        per_class = numpy.bincount(labels, minlength=10)
        self._count = (len(labels) - per_class).astype(numpy.uint64)
        if (per_class == len(labels)).any():
            raise DataError('MultiMNIST needs digits of at least two '
                            'classes, got only class {}'.format(labels[0]))
        self._others = numpy.zeros((10, int(self._count.max())),
                                   numpy.int32 if len(labels) < 2 ** 31
                                   else numpy.int64)
        for c in range(10):
            self._others[c, :self._count[c]] = numpy.flatnonzero(
                labels != c)

    def __len__(self):
        return len(self.images) * self.pairs_per_digit

    def settings(self):
        """What identifies the pairs (for run files and logs)."""
        return dict(pairs_per_digit=self.pairs_per_digit, seed=self.seed,
                    split=self.split, max_shift=self.max_shift,
                    canvas=self.canvas, n_digits=len(self.images))

    def _indices(self, indices):
        i = numpy.asarray(indices)
        if i.dtype == bool or not (i.dtype.kind in 'iu' or i.size == 0):
            raise IndexError('MultiMNIST indices must be integers, got {}'
                             .format(i.dtype))
        i = i.astype(numpy.int64).reshape(-1)
        if i.size and (i.min() < 0 or i.max() >= len(self)):
            raise IndexError('MultiMNIST index out of range 0 ... {}'
                             .format(len(self) - 1))
        return i

    def pairs(self, indices):
        """The draws of pairs ``indices`` (B,): dict index1, index2 (B,)
        int64 digits of the split, shift (B, 4) int64 dy1, dx1, dy2, dx2."""
        i = self._indices(indices)
        counters = (i.astype(numpy.uint64) * numpy.uint64(_DRAWS))[:, None] \
            + numpy.arange(_DRAWS, dtype=numpy.uint64)
        base = i // self.pairs_per_digit
        c = self.labels[base]
        pick = counter_ints(self._key, counters[:, 0], self._count[c])
        shift = counter_ints(self._key, counters[:, 1:],
                             2 * self.max_shift + 1) - self.max_shift
        return dict(index1=base, index2=self._others[c, pick].astype(
            numpy.int64), shift=shift)

    def _place(self, digits, dy, dx):
        """(B, h, w) uint8 -> (B, S, S): centred, moved, cut at the edges
        (place(), vectorised: drawn on a canvas with room, then cropped)."""
        b, h, w = digits.shape
        s = self.canvas
        top0, left0 = (s - h) // 2, (s - w) // 2
        room = max(0, self.max_shift - min(top0, left0, s - h - top0,
                                           s - w - left0))
        out = numpy.zeros((b, s + 2 * room, s + 2 * room), numpy.uint8)
        rows = (room + top0 + dy)[:, None] + numpy.arange(h)
        cols = (room + left0 + dx)[:, None] + numpy.arange(w)
        out[numpy.arange(b)[:, None, None], rows[:, :, None],
            cols[:, None, :]] = digits
        return out[:, room:room + s, room:room + s]

    def arrays(self, indices):
        """Pairs ``indices`` as multimnist() makes them: dict x, x1, x2
        uint8 (B, S, S); t1, t2 int32 (B,); index1, index2; shift (B, 4)
        int8."""
        d = self.pairs(indices)
        s = d['shift']
        x1 = self._place(self.images[d['index1']], s[:, 0], s[:, 1])
        x2 = self._place(self.images[d['index2']], s[:, 2], s[:, 3])
        x = numpy.minimum(x1.astype(numpy.int16) + x2, 255).astype(
            numpy.uint8)
        return dict(x=x, x1=x1, x2=x2,
                    t1=self.labels[d['index1']].astype(numpy.int32),
                    t2=self.labels[d['index2']].astype(numpy.int32),
                    index1=d['index1'], index2=d['index2'],
                    shift=s.astype(numpy.int8))

    def get_examples(self, indices):
        """A batch: (x, t1, t2, x1, x2), float32 (B, 1, S, S) images in
        [0, 1] (x the clipped sum) and int32 (B,) labels."""
        d = self.arrays(indices)
        return (to_float(d['x']), d['t1'], d['t2'], to_float(d['x1']),
                to_float(d['x2']))

    def get_example(self, i):
        x, t1, t2, x1, x2 = self.get_examples([i])
        return x[0], t1[0], t2[0], x1[0], x2[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = numpy.arange(*index.indices(len(self)))
        elif not isinstance(index, (list, numpy.ndarray)):
            index = int(index)
            return self.get_example(index + len(self) if index < 0
                                    else index)
        return list(zip(*self.get_examples(index)))

    def overlap(self, indices):
        """bounding_box_overlap of pairs ``indices``: float64 (B,)."""
        s = self.pairs(indices)['shift']
        return bounding_box_overlap(s[:, :2], s[:, 2:])


def mean_overlap(max_shift, n_pairs=100000, seed=0):
    """The generator's average bounding-box overlap over its first n_pairs
    pairs at this max_shift (the shifts do not depend on the digits, so
    ten blank digits of ten classes stand in for MNIST)."""
    blank = numpy.zeros((10, 28, 28), numpy.uint8)
    data = MultiMNIST(blank, numpy.arange(10), -(-n_pairs // 10), seed,
                      max_shift=max_shift)
    return float(data.overlap(numpy.arange(n_pairs)).mean())


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
    Pixels stored otherwise are converted by their dtype and range
    (affnist_pixels): float in [0, 1] scaled, float in [0, 255] rounded.

    Returns:
        (uint8 (N, 40, 40), int32 (N,)).
    Raises:
        DataError: unreadable, not of that structure, or pixels of another
            dtype or range.
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
    pixels, why = affnist_pixels(image)
    if pixels is None:
        raise bad(why)
    # each column is one image, its 1600 pixels row by row (the layout the
    # usual Python readers of affNIST assume: image.T.reshape(-1, 40, 40))
    images = pixels.T.reshape(-1, side, side)
    return numpy.ascontiguousarray(images), label.astype(numpy.int32)


def affnist_pixels(image):
    """affNIST pixels as uint8 0-255, by their real dtype and range.

    Integers within 0-255 (the published files: uint8) are kept; floats
    whose maximum over the file is at most 1 are taken as [0, 1] and
    scaled by 255, floats up to 255 as [0, 255]; both rounded.

    Returns:
        (uint8 array of image's shape, None), or (None, why) for anything
        else: another dtype, NaN or inf, or values outside those ranges.
    """
    image = numpy.asarray(image)
    kind = image.dtype.kind
    if kind not in 'iuf':
        return None, 'pixels of dtype {}: expected uint8 0-255 or float ' \
            'in [0, 1] or [0, 255]'.format(image.dtype)
    if not image.size:
        return image.astype(numpy.uint8), None
    if kind == 'f' and not numpy.isfinite(image).all():
        return None, 'pixels of dtype {} hold NaN or inf'.format(image.dtype)
    low, high = image.min(), image.max()
    if low < 0 or high > 255:
        return None, 'pixels of dtype {} in [{:g}, {:g}]: expected uint8 ' \
            '0-255 or float in [0, 1] or [0, 255]'.format(
                image.dtype, float(low), float(high))
    if kind in 'iu':
        return image.astype(numpy.uint8), None
    scale = 255.0 if high <= 1 else 1.0
    return numpy.rint(image.astype(numpy.float64) * scale).astype(
        numpy.uint8), None


def to_float(images):
    """uint8 (N, S, S) -> float32 (N, 1, S, S) in [0, 1]."""
    return (images.astype(numpy.float32) / 255)[:, None]
