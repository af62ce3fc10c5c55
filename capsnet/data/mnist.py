#!/usr/bin/env python
"""MNIST and Fashion-MNIST: verified download, IDX parsing and augmentation.

    python mnist.py --dataset mnist                 # download and verify
    python mnist.py --dataset mnist --data-dir D    # verify local files

Every file is checked against its published md5 before use, so a truncated or
corrupt copy is reported (DatasetError, one line) instead of silently
training on garbage.
"""
import gzip
import hashlib
import json
import http.client
import numbers
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import cli
from capsnet.errors import CapsNetError

TRAIN_IMAGES = 'train-images-idx3-ubyte.gz'
TRAIN_LABELS = 'train-labels-idx1-ubyte.gz'
TEST_IMAGES = 't10k-images-idx3-ubyte.gz'
TEST_LABELS = 't10k-labels-idx1-ubyte.gz'

# Mirrors are tried in order; yann.lecun.com is last because it often
# answers 403 to scripts.
DATASETS = {
    'mnist': {
        'files': {
            TRAIN_IMAGES: 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
            TRAIN_LABELS: 'd53e105ee54ea40749a09fcbcd1e9432',
            TEST_IMAGES: '9fb629c4189551a2d022fa330f9573f3',
            TEST_LABELS: 'ec29112dd5afa0611ce80d1b7f02629c',
        },
        'mirrors': [
            'https://storage.googleapis.com/cvdf-datasets/mnist/',
            'https://ossci-mnist.s3.amazonaws.com/mnist/',
            'http://yann.lecun.com/exdb/mnist/',
        ],
    },
    'fashion-mnist': {
        'files': {
            TRAIN_IMAGES: '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
            TRAIN_LABELS: '25c81989df183df01b3e8a0aad5dffbe',
            TEST_IMAGES: 'bef4ecab320f06d8554ea6380940ec79',
            TEST_LABELS: 'bb300cfdad3c16e7a12a480ee83cd310',
        },
        'mirrors': [
            'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
            'https://raw.githubusercontent.com/zalandoresearch/'
            'fashion-mnist/master/data/fashion/',
        ],
    },
}

TIMEOUT = 60  # seconds per connection attempt / blocking read
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIZE = 28
TRAIN_SIZE, TEST_SIZE = 60000, 10000  # examples, in both datasets
_CHUNK = 1 << 20
_CACHE_FIX = ('delete it and run again to re-download, '
              'or pass --data-dir with a good copy')


class DatasetError(CapsNetError):
    """A dataset file is missing, corrupt or could not be downloaded.

    str() is one line: the problem, the file and how to fix it.
    """


def dataset_names():
    """Names accepted by fetch() and get_mnist_like()."""
    return list(DATASETS)


def _spec(name):
    if name not in DATASETS:
        raise DatasetError('unknown dataset {!r}; valid names: {}'.format(
            name, ', '.join(DATASETS)))
    return DATASETS[name]


def _one_line(obj):
    return ' '.join(str(obj).split())


def _md5(path):
    h = hashlib.md5(usedforsecurity=False)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            h.update(chunk)
    return h.hexdigest()


def _describe(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return 'HTTP {} {}'.format(exc.code, _one_line(exc.reason))
    if isinstance(exc, urllib.error.URLError):
        return _one_line(exc.reason)
    if isinstance(exc, TimeoutError):
        return 'timed out'
    return _one_line('{}: {}'.format(type(exc).__name__, exc))


def _download(url, path, md5, opener):
    """Stream url to path via a temp file; return None or why it failed.

    The final name only ever appears with verified content, so an
    interrupted run cannot leave a half file that looks cached.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            prefix='.capsnet-' + os.path.basename(path) + '.', suffix='.tmp',
            dir=os.path.dirname(path))
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, 'wb') as out, opener(url, timeout=TIMEOUT) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b''):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5:
            return 'md5 is {}, expected {}'.format(h.hexdigest(), md5)
        os.replace(tmp, path)
        tmp = None
        return None
    except (OSError, http.client.HTTPException, ValueError) as e:
        return _describe(e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def fetch(name, root=None, mirrors=None, files=None, opener=None, log=print):
    """Make sure the dataset's files are cached and intact; return paths.

    Args:
        name: one of dataset_names().
        root: cache folder; default
            ``chainer.dataset.get_dataset_directory('capsnet/' + name)``,
            which honours ``CHAINER_DATASET_ROOT``.
        mirrors: base URLs tried in order (default DATASETS[name]).
        files: dict file name -> md5 (default DATASETS[name]).
        opener: ``opener(url, timeout=...)`` returning a readable context
            manager; default ``urllib.request.urlopen``.
        log: called with one-line progress / fallback messages.

    Returns:
        dict file name -> local path, every file with a verified md5.
    """
    spec = _spec(name)
    mirrors = spec['mirrors'] if mirrors is None else list(mirrors)
    files = spec['files'] if files is None else files
    opener = urllib.request.urlopen if opener is None else opener
    if root is None:
        root = chainer.dataset.get_dataset_directory(
            'capsnet/' + name, create_directory=False)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise DatasetError('cannot create the cache folder {} ({}); set '
                           'CHAINER_DATASET_ROOT or pass --data-dir'.format(
                               root, _one_line(e))) from None

    paths = {}
    for fname, md5 in files.items():
        path = os.path.join(root, fname)
        if os.path.exists(path):
            actual = _md5(path)
            if actual == md5:
                paths[fname] = path
                continue
            log('{} in {}: cached copy is corrupt (md5 {}, expected {}); '
                're-downloading'.format(fname, root, actual, md5))
        failures = []
        for base in mirrors:
            url = base.rstrip('/') + '/' + fname
            log('downloading {}'.format(url))
            why = _download(url, path, md5, opener)
            if why is None:
                break
            log('  failed: {}'.format(why))
            failures.append('{}: {}'.format(url, why))
        else:
            raise DatasetError(
                '{} (expected md5 {}) could not be downloaded from any mirror [{}]; '
                'download it by hand into a folder with the other {} files '
                'and pass --data-dir FOLDER'.format(
                    fname, md5, '; '.join(failures) or 'no mirrors given',
                    name))
        paths[fname] = path
    return paths


def load_idx(path, expected_md5=None, fix=_CACHE_FIX):
    """Read a gzip-compressed IDX file.

    Args:
        path: the .gz file.
        expected_md5: if given, the file's md5 must match.
        fix: how to repair a bad file, appended to error messages.

    Returns:
        numpy.uint8 array: images (N, rows, cols) for magic 2051,
        labels (N,) for magic 2049.

    Raises:
        DatasetError: missing, unreadable, wrong md5, not gzip, truncated,
            wrong magic or sizes that disagree with the header.
    """
    def error(problem):
        return DatasetError('{} in {}: {}; {}'.format(
            os.path.basename(path), os.path.dirname(os.path.abspath(path)),
            problem, fix))

    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise error('cannot read it ({})'.format(
            _one_line(e.strerror or e))) from None
    if expected_md5 is not None:
        actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if actual != expected_md5:
            raise error('md5 is {}, expected {} (file corrupt or truncated)'
                        .format(actual, expected_md5))
    try:
        data = gzip.decompress(raw)
    except gzip.BadGzipFile as e:
        raise error('not a valid gzip file ({})'.format(_one_line(e))) \
            from None
    except (EOFError, zlib.error) as e:
        raise error('gzip stream is truncated or corrupt ({})'.format(
            _one_line(e))) from None

    if len(data) < 8:
        raise error('IDX header is truncated ({} bytes)'.format(len(data)))
    magic, n = struct.unpack('>II', data[:8])
    if magic == IMAGE_MAGIC:
        if len(data) < 16:
            raise error('IDX image header is truncated')
        rows, cols = struct.unpack('>II', data[8:16])
        shape, offset = (n, rows, cols), 16
    elif magic == LABEL_MAGIC:
        shape, offset = (n,), 8
    else:
        raise error('magic number is {}, expected {} (images) or {} (labels);'
                    ' not an MNIST IDX file'.format(
                        magic, IMAGE_MAGIC, LABEL_MAGIC))
    expected = int(numpy.prod(shape))
    if len(data) - offset != expected:
        raise error('header says shape {} ({} bytes of data) but the file '
                    'holds {} (file truncated or corrupt)'.format(
                        shape, expected, len(data) - offset))
    return numpy.frombuffer(data, numpy.uint8, offset=offset).reshape(shape)


# Where the data is found, set once: $CAPSNET_DATA (a folder holding the
# four files, or a <dataset>/ folder of them, as ../shared/data does), else
# the last --data-dir that held them (remembered in Chainer's dataset
# folder), else Chainer's dataset folder itself (downloaded there once).
DATA_ENV = 'CAPSNET_DATA'
REMEMBERED = 'data-dirs.json'


def _remembered_path():
    root = os.environ.get('CHAINER_DATASET_ROOT') or \
        chainer.dataset.get_dataset_root()
    return os.path.join(root, 'capsnet', REMEMBERED)


def _holds(folder, name):
    return all(os.path.isfile(os.path.join(folder, f))
               for f in _spec(name)['files'])


def find_data_dir(name):
    """The folder of ``name``'s four files when no --data-dir is given:
    $CAPSNET_DATA (or its <name>/ subfolder), else the remembered --data-dir,
    else None (Chainer's dataset folder, downloading once)."""
    folder = os.environ.get(DATA_ENV)
    if folder:
        for candidate in (os.path.join(folder, name), folder):
            if _holds(candidate, name):
                return candidate
        raise DatasetError(
            '${} is {}, which holds neither the four {} files nor a {}/ '
            'folder of them ({}); point it at such a folder or unset it'
            .format(DATA_ENV, folder, name, name,
                    ', '.join(_spec(name)['files'])))
    try:
        with open(_remembered_path()) as f:
            folder = json.load(f).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return folder if folder and _holds(folder, name) else None


def remember_data_dir(name, folder):
    """Remember ``folder`` (it held good files) for the runs without
    --data-dir; quietly nothing where Chainer's dataset folder is not
    writable."""
    path = _remembered_path()
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or known.get(name) == folder:
        return
    known[name] = folder
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(known, f)
    except OSError:
        pass


def _sources(name, data_dir, root):
    """(paths, fix): data_dir's files (or the found folder's), or the
    verified cache via fetch()."""
    spec = _spec(name)
    if data_dir is None and root is None:
        data_dir = find_data_dir(name)
    if data_dir is None:
        return fetch(name, root=root), _CACHE_FIX
    if not os.path.isdir(data_dir):
        raise DatasetError(
            '--data-dir {} {}; pass the folder holding the four {} files '
            '({})'.format(data_dir, 'is a file, not a folder' if
                          os.path.exists(data_dir) else 'does not exist',
                          name, ', '.join(spec['files'])))
    for fname in spec['files']:
        if not os.path.isfile(os.path.join(data_dir, fname)):
            raise DatasetError(
                '{} not found in {}: --data-dir must hold the four {} files '
                '({}); download them from {} or drop --data-dir to download '
                'automatically'.format(
                    fname, os.path.abspath(data_dir), name,
                    ', '.join(spec['files']), spec['mirrors'][0]))
    fix = ('replace it with a good copy (e.g. from {}) or drop --data-dir to '
           'download it'.format(spec['mirrors'][0]))
    return {f: os.path.join(data_dir, f) for f in spec['files']}, fix


def _whole(value, flag):
    """``value`` as an int (None stays None); DatasetError if it is not a
    whole number (a float, a bool, a string)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DatasetError('{} must be a whole number, got {!r}'.format(
            flag, value))
    return int(value)


def split_sizes(n_train, n_test, train_size=None, test_size=None,
                validation=0, name='mnist'):
    """(training, validation, test) example counts for the tools' size
    flags on a dataset of ``n_train`` training and ``n_test`` test examples:
    --validation holds out the last N training examples, --train-size and
    --test-size take the first N. A value the data cannot honour is refused
    (DatasetError naming the flag and the limit), never clamped: a size
    beyond the data, 0 or negative sizes, a validation set that leaves no
    training example, a value that is not a whole number."""
    train_size = _whole(train_size, '--train-size')
    test_size = _whole(test_size, '--test-size')
    validation = _whole(validation, '--validation') or 0
    if not 0 <= validation < n_train:
        raise DatasetError(
            '--validation {} is beyond the data: {} has {} training examples '
            'and at least one must stay for training; use at most {}'.format(
                validation, name, n_train, n_train - 1))
    available = n_train - validation
    held = ' ({} with --validation {} held out)'.format(
        available, validation) if validation else ''
    for flag, size, limit, what, note in (
            ('--train-size', train_size, available, 'training', held),
            ('--test-size', test_size, n_test, 'test', '')):
        if size is not None and size > limit:
            raise DatasetError(
                '{} {} is beyond the data: {} has {} {} examples{}; use at '
                'most {}'.format(flag, size, name, n_train if what ==
                                 'training' else n_test, what, note, limit))
        if size is not None and size <= 0:
            raise DatasetError(
                '{} {} would take no {} example; use 1 to {}, or leave the '
                'flag out for all {}'.format(flag, size, what, limit, limit))
    return (available if train_size is None else train_size, validation,
            n_test if test_size is None else test_size)


def check_batchsize(batchsize, n_train, flag='--batchsize'):
    """DatasetError unless 0 < ``batchsize`` <= ``n_train`` (the training
    examples a process has): a larger batch would wrap the set within one
    step, and an epoch would not be one pass."""
    if not 0 < batchsize <= n_train:
        raise DatasetError(
            '{} {} {}; there are {} training examples, so use at most {}{}'
            .format(flag, batchsize, 'is larger than the training set'
                    if batchsize > 0 else 'is no batch', n_train, n_train,
                    ' (or more --train-size)' if batchsize > n_train
                    else ''))


def _to_dataset(images, labels, input_size):
    """uint8 (N, 28, 28) and (N,) -> TupleDataset of float32 (N, 1, S, S)
    in [0, 1] and int32 (N,); images are zero-padded, centred (an odd margin
    puts the extra pixel at the bottom / right)."""
    n, rows, cols = images.shape
    x = numpy.zeros((n, 1, input_size, input_size), numpy.float32)
    top, left = (input_size - rows) // 2, (input_size - cols) // 2
    x[:, 0, top:top + rows, left:left + cols] = images
    x /= 255
    return chainer.datasets.TupleDataset(x, labels.astype(numpy.int32))


def to_arrays(dataset):
    """(x, t): the image and label arrays of a dataset from get_mnist_like."""
    return chainer.dataset.concat_examples(dataset[:])


def get_mnist_like(name='mnist', data_dir=None, train_size=None,
                   test_size=None, validation=0, input_size=28, root=None,
                   log=None, need_train=True):
    """Load MNIST or Fashion-MNIST as (train, validation, test).

    Args:
        name: one of dataset_names().
        data_dir: folder holding the four .gz files; read with no network.
            Default: fetch() into the cache folder (under ``root``).
        train_size: keep the FIRST N training examples (after the hold-out).
        test_size: keep the FIRST N of the 10,000 test examples.
        validation: hold out the LAST N of the 60,000 training examples as a
            validation set (None when 0).
        input_size: S >= 28; images are zero-padded, centred, to S x S.
        root: cache folder passed to fetch() when data_dir is None.
        need_train: False reads the test files alone (train and
            validation are then None): a tool that only evaluates.
        log: called with one line before the reading (md5s, decompression,
            scaling: about a second on a 2-core CPU, more on a slow disk),
            e.g. ``print``; None says nothing (a tool whose stdout is JSON
            passes a function writing to stderr).

    Returns:
        (train, validation or None, test), each a TupleDataset of x float32
        (N, 1, S, S) scaled to [0, 1] and t int32 (N,).
    """
    spec = _spec(name)
    if input_size < IMAGE_SIZE:
        raise DatasetError('--input-size must be >= {}, got {}; pass a larger '
                           '--input-size'.format(IMAGE_SIZE, input_size))
    split_sizes(TRAIN_SIZE, TEST_SIZE, train_size, test_size, validation,
                name)   # before the reading: the published sizes
    paths, fix = _sources(name, data_dir, root)
    if log is not None:
        log('reading {} from {} (checking md5s) ...'.format(
            name, os.path.dirname(os.path.abspath(paths[TEST_IMAGES]))))
    if not need_train:
        paths = {f: p for f, p in paths.items()
                 if f in (TEST_IMAGES, TEST_LABELS)}
    arrays = {fname: load_idx(path, spec['files'][fname], fix)
              for fname, path in paths.items()}
    if data_dir is not None:
        remember_data_dir(name, os.path.abspath(data_dir))

    if not need_train:
        x, t = arrays[TEST_IMAGES], arrays[TEST_LABELS]
        n_test = split_sizes(TRAIN_SIZE, len(x), None, test_size, 0,
                             name)[2]
        return None, None, _to_dataset(x[:n_test], t[:n_test], input_size)
    splits = []
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS),
                           (TEST_IMAGES, TEST_LABELS)):
        x, t = arrays[images], arrays[labels]
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or \
                len(x) != len(t):
            raise DatasetError(
                '{} / {} in {}: images {} do not match labels {}; {}'.format(
                    images, labels, os.path.dirname(paths[images]), x.shape,
                    t.shape, fix))
        splits.append((x, t))
    (x_train, t_train), (x_test, t_test) = splits

    n_train, validation, n_test = split_sizes(
        len(x_train), len(x_test), train_size, test_size, validation, name)
    held = len(x_train) - validation
    valid = None
    if validation:
        valid = _to_dataset(x_train[held:], t_train[held:], input_size)
    return (_to_dataset(x_train[:n_train], t_train[:n_train], input_size),
            valid,
            _to_dataset(x_test[:n_test], t_test[:n_test], input_size))


def random_shift(x, max_shift, random_state):
    """Shift each image independently by up to max_shift pixels, zero fill.

    Args:
        x: numpy or cupy array (B, C, H, W).
        max_shift: m >= 0.
        random_state: numpy.random.RandomState; offsets are drawn on the host
            with exactly one call ``random_state.randint(-m, m + 1,
            size=(B, 2))`` (column 0 dy, column 1 dx), none when m == 0.

    Returns:
        New array (B, C, H, W) of x's dtype and module with
        ``out[b, :, i, j] = x[b, :, i - dy[b], j - dx[b]]`` (positive dy / dx
        move the content down / right) and zeros where that falls outside.
    """
    if max_shift < 0:
        raise ValueError('max_shift must be >= 0, got {}'.format(max_shift))
    xp = chainer.backend.get_array_module(x)
    if max_shift == 0:
        return x.copy()
    m = max_shift
    b, c, h, w = x.shape
    offsets = xp.asarray(random_state.randint(-m, m + 1, size=(b, 2)))
    padded = xp.pad(x, ((0, 0), (0, 0), (m, m), (m, m)))
    # every H x W window of the padded images, a view (B, C, 2m+1, 2m+1,
    # H, W): window (m - dy, m - dx) is the image shifted by (dy, dx), so
    # one gather copies whole images instead of indexing every pixel
    windows = xp.lib.stride_tricks.sliding_window_view(
        padded, (h, w), axis=(2, 3))
    return windows[xp.arange(b), :, m - offsets[:, 0], m - offsets[:, 1]]


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dataset', default='mnist',
                        help='one of: ' + ', '.join(DATASETS))
    parser.add_argument('--data-dir', help='folder with the four .gz files '
                        '(verified, no download)')
    args = parser.parse_args(argv)
    try:
        spec = _spec(args.dataset)
        paths, fix = _sources(args.dataset, args.data_dir, None)
        for fname, path in paths.items():
            array = load_idx(path, spec['files'][fname], fix)
            print('{}: {} {} (md5 ok)'.format(
                path, len(array), 'images' if array.ndim == 3 else 'labels'))
    except DatasetError as e:
        print('error: {}'.format(e), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
