"""capsnet.data.mnist: verified download, IDX parsing, splits, padding and shifts.

The downloader is exercised against a real HTTP server on 127.0.0.1 serving
small synthetic IDX files; nothing here reaches the internet (see the
autouse ``no_internet`` fixture).  Tests on the real MNIST read it from
shared/data (or $CAPSNET_SHARED_DATA) and skip when it is absent.
"""
import gzip
import hashlib
import http.server
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import types
import urllib.error
import urllib.parse
import urllib.request

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from capsnet.data import mnist
from conftest import (MNIST_DIR, MNIST_FILES, Unchanged, assert_one_error,
                      needs_mnist, run_script)

MNIST_MD5 = mnist.DATASETS['mnist']['files']


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Fail loudly (not an OSError the downloader would swallow) on any
    request that is not to the local test server."""
    real_urlopen = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        host = urllib.parse.urlsplit(getattr(url, 'full_url', url)).hostname
        if host != '127.0.0.1':
            raise AssertionError('test tried to reach ' + str(url))
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, 'urlopen', guarded)
    monkeypatch.setenv('no_proxy', '*')


def md5(data):
    return hashlib.md5(data).hexdigest()


def idx_bytes(array, magic=None):
    """gzip-compressed IDX of a uint8 array (N,) or (N, rows, cols)."""
    array = numpy.asarray(array, numpy.uint8)
    if magic is None:
        magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack('>I' + 'I' * array.ndim, magic, *array.shape)
    return gzip.compress(header + array.tobytes())


def one_line(exc):
    text = str(exc)
    assert '\n' not in text
    return text


# -- downloader --------------------------------------------------------------

@pytest.fixture
def synthetic():
    """The four MNIST file names with tiny synthetic contents."""
    rng = numpy.random.RandomState(0)
    contents = {
        mnist.TRAIN_IMAGES: idx_bytes(rng.randint(0, 256, (5, 28, 28))),
        mnist.TRAIN_LABELS: idx_bytes(rng.randint(0, 10, 5)),
        mnist.TEST_IMAGES: idx_bytes(rng.randint(0, 256, (3, 28, 28))),
        mnist.TEST_LABELS: idx_bytes(rng.randint(0, 10, 3)),
    }
    return types.SimpleNamespace(
        contents=contents,
        files={name: md5(data) for name, data in contents.items()})


@pytest.fixture
def server():
    """HTTP server on 127.0.0.1: routes maps a path to (status, body) or to
    (status, body, advertised Content-Length); unknown paths answer 404."""
    routes, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            status, body, *length = routes.get(self.path, (404, b'missing'))
            self.send_response(status)
            self.send_header('Content-Length',
                             str(length[0] if length else len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever,
                              kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    base = 'http://127.0.0.1:{}'.format(httpd.server_address[1])
    try:
        yield types.SimpleNamespace(
            routes=routes, requests=requests,
            mirror=lambda name: '{}/{}/'.format(base, name))
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def serve(server, mirror, contents, status=200):
    for name, data in contents.items():
        server.routes['/{}/{}'.format(mirror, name)] = (status, data)


def test_fetch_downloads_verified_files_then_uses_the_cache(
        tmp_path, server, synthetic):
    serve(server, 'm1', synthetic.contents)
    logs = []
    paths = mnist.fetch('mnist', root=str(tmp_path),
                           mirrors=[server.mirror('m1')],
                           files=synthetic.files, log=logs.append)
    assert sorted(paths) == sorted(synthetic.files)
    for name, path in paths.items():
        assert path == os.path.join(str(tmp_path), name)
        with open(path, 'rb') as f:
            assert f.read() == synthetic.contents[name]
    assert sorted(os.listdir(tmp_path)) == sorted(synthetic.files)
    assert len(server.requests) == 4

    assert mnist.fetch('mnist', root=str(tmp_path),
                          mirrors=[server.mirror('m1')],
                          files=synthetic.files, log=logs.append) == paths
    assert len(server.requests) == 4  # second call: all from the cache


def test_fetch_falls_back_to_the_next_mirror_on_403(
        tmp_path, server, synthetic):
    serve(server, 'm1', synthetic.contents, status=403)
    serve(server, 'm2', synthetic.contents)
    logs = []
    paths = mnist.fetch('mnist', root=str(tmp_path),
                           mirrors=[server.mirror('m1'), server.mirror('m2')],
                           files=synthetic.files, log=logs.append)
    for name, path in paths.items():
        with open(path, 'rb') as f:
            assert f.read() == synthetic.contents[name]
    assert server.requests == [
        '/{}/{}'.format(m, name) for name in synthetic.files
        for m in ('m1', 'm2')]
    assert sum('HTTP 403' in line for line in logs) == 4
    assert all('\n' not in line for line in logs)


def test_fetch_rejects_a_mirror_serving_the_wrong_bytes(
        tmp_path, server, synthetic):
    wrong = {name: idx_bytes(numpy.zeros(4)) for name in synthetic.files}
    serve(server, 'bad', wrong)
    serve(server, 'good', synthetic.contents)
    logs = []
    paths = mnist.fetch(
        'mnist', root=str(tmp_path),
        mirrors=[server.mirror('bad'), server.mirror('good')],
        files=synthetic.files, log=logs.append)
    for name, path in paths.items():
        with open(path, 'rb') as f:
            assert f.read() == synthetic.contents[name]
    assert sum('md5' in line for line in logs) == 4


def test_fetch_with_no_good_mirror_names_file_and_expected_md5(
        tmp_path, server, synthetic):
    name = mnist.TEST_IMAGES
    server.routes['/bad/' + name] = (200, b'not the file')
    with pytest.raises(mnist.DatasetError) as info:
        mnist.fetch('mnist', root=str(tmp_path),
                       mirrors=[server.mirror('bad'), server.mirror('gone')],
                       files={name: synthetic.files[name]}, log=lambda m: 0)
    message = one_line(info.value)
    assert name in message
    assert synthetic.files[name] in message
    assert server.mirror('bad') in message and server.mirror('gone') in message
    assert 'HTTP 404' in message and '--data-dir' in message
    assert os.listdir(tmp_path) == []


def test_fetch_redownloads_a_corrupt_cached_file(tmp_path, server, synthetic):
    name = mnist.TRAIN_IMAGES
    good = synthetic.contents[name]
    (tmp_path / name).write_bytes(good[:len(good) // 2])
    files = {name: synthetic.files[name]}

    # With no mirror able to replace it, the corrupt copy is not used.
    with pytest.raises(mnist.DatasetError) as info:
        mnist.fetch('mnist', root=str(tmp_path),
                       mirrors=[server.mirror('m1')], files=files,
                       log=lambda m: 0)
    assert name in one_line(info.value)

    serve(server, 'm1', synthetic.contents)
    logs = []
    paths = mnist.fetch('mnist', root=str(tmp_path),
                           mirrors=[server.mirror('m1')], files=files,
                           log=logs.append)
    assert (tmp_path / name).read_bytes() == good
    assert paths == {name: str(tmp_path / name)}
    assert 'corrupt' in logs[0] and name in logs[0]
    assert server.requests[-1] == '/m1/' + name


def test_a_truncated_download_leaves_no_file_behind(
        tmp_path, server, synthetic):
    name = mnist.TRAIN_IMAGES
    data = synthetic.contents[name]
    # Advertises the full length but the connection closes half-way.
    server.routes['/m1/' + name] = (200, data[:len(data) // 2], len(data))
    with pytest.raises(mnist.DatasetError):
        mnist.fetch('mnist', root=str(tmp_path),
                       mirrors=[server.mirror('m1')],
                       files={name: synthetic.files[name]}, log=lambda m: 0)
    assert os.listdir(tmp_path) == []


def test_the_final_name_appears_only_once_the_file_is_verified(
        tmp_path, synthetic):
    name = mnist.TRAIN_IMAGES
    final = tmp_path / name
    seen_final_while_streaming = []

    class Response(io.BytesIO):
        def read(self, size=-1):
            seen_final_while_streaming.append(final.exists())
            if self.tell() > 0:
                raise ConnectionResetError('connection reset')
            return super().read(10)

    def opener(url, timeout):
        assert timeout > 0
        return Response(synthetic.contents[name])

    with pytest.raises(mnist.DatasetError) as info:
        mnist.fetch('mnist', root=str(tmp_path), mirrors=['http://m/'],
                       files={name: synthetic.files[name]}, opener=opener,
                       log=lambda m: 0)
    assert 'connection reset' in one_line(info.value)
    assert seen_final_while_streaming and not any(seen_final_while_streaming)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('error', [
    urllib.error.URLError('name resolution failed'),
    socket.timeout('timed out'),
    urllib.error.HTTPError('http://m1/', 404, 'Not Found', None, None),
], ids=['urlerror', 'timeout', 'http404'])
def test_fetch_falls_back_when_the_opener_fails(tmp_path, synthetic, error):
    calls = []

    def opener(url, timeout):
        calls.append(url)
        if url.startswith('http://m1/'):
            raise error
        return io.BytesIO(synthetic.contents[url.rsplit('/', 1)[1]])

    logs = []
    paths = mnist.fetch('mnist', root=str(tmp_path),
                           mirrors=['http://m1/', 'http://m2'],
                           files=synthetic.files, opener=opener,
                           log=logs.append)
    assert len(calls) == 8
    assert sorted(paths) == sorted(synthetic.files)
    assert all((tmp_path / n).read_bytes() == synthetic.contents[n]
               for n in synthetic.files)
    assert all('\n' not in line for line in logs)


def test_fetch_raises_when_every_mirror_has_a_url_error(tmp_path, synthetic):
    def opener(url, timeout):
        raise urllib.error.URLError('no route to host')

    name = mnist.TEST_LABELS
    with pytest.raises(mnist.DatasetError) as info:
        mnist.fetch('mnist', root=str(tmp_path),
                       mirrors=['http://m1/', 'http://m2/'],
                       files={name: synthetic.files[name]}, opener=opener,
                       log=lambda m: 0)
    message = one_line(info.value)
    assert name in message and 'no route to host' in message
    assert 'http://m1/' + name in message and 'http://m2/' + name in message


def test_fetch_default_cache_is_under_the_chainer_dataset_root(
        tmp_path, server, synthetic):
    serve(server, 'm1', synthetic.contents)
    old_root = chainer.dataset.get_dataset_root()
    chainer.dataset.set_dataset_root(str(tmp_path))
    try:
        paths = mnist.fetch('fashion-mnist', mirrors=[server.mirror('m1')],
                               files=synthetic.files, log=lambda m: 0)
    finally:
        chainer.dataset.set_dataset_root(old_root)
    folder = os.path.join(str(tmp_path), 'capsnet', 'fashion-mnist')
    assert all(os.path.dirname(p) == folder for p in paths.values())


def test_registry_names_mirrors_and_published_md5s():
    assert mnist.dataset_names() == ['mnist', 'fashion-mnist']
    spec = mnist.DATASETS['mnist']
    assert spec['mirrors'] == [
        'https://storage.googleapis.com/cvdf-datasets/mnist/',
        'https://ossci-mnist.s3.amazonaws.com/mnist/',
        'http://yann.lecun.com/exdb/mnist/']
    assert spec['files'][mnist.TEST_IMAGES] == \
        '9fb629c4189551a2d022fa330f9573f3'
    fashion = mnist.DATASETS['fashion-mnist']
    assert fashion['mirrors'][0] == \
        'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
    assert fashion['files'][mnist.TRAIN_IMAGES] == \
        '8d4fb7e6c68d591d4c3dfef9ec88bf0d'
    for spec in mnist.DATASETS.values():
        assert len(spec['files']) == 4


@pytest.mark.parametrize('call', [
    lambda: mnist.fetch('emnist', log=lambda m: 0),
    lambda: mnist.get_mnist_like('emnist'),
], ids=['fetch', 'get_mnist_like'])
def test_an_unknown_name_lists_the_valid_ones(call):
    with pytest.raises(mnist.DatasetError) as info:
        call()
    message = one_line(info.value)
    assert 'emnist' in message
    assert 'mnist, fashion-mnist' in message


# -- load_idx ----------------------------------------------------------------

def test_load_idx_reads_images_and_labels(tmp_path):
    images = numpy.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    (tmp_path / 'i.gz').write_bytes(idx_bytes(images))
    (tmp_path / 'l.gz').write_bytes(idx_bytes([7, 3]))
    x = mnist.load_idx(str(tmp_path / 'i.gz'))
    t = mnist.load_idx(str(tmp_path / 'l.gz'),
                          expected_md5=md5(idx_bytes([7, 3])))
    assert x.dtype == numpy.uint8 and x.shape == (2, 28, 28)
    numpy.testing.assert_array_equal(x, images)
    assert t.dtype == numpy.uint8 and t.tolist() == [7, 3]


def bad_idx_files():
    good = idx_bytes(numpy.ones((4, 28, 28)))
    return {
        'truncated': (good[:len(good) // 2], 'truncated'),
        'not-gzip': (b'<html>403 Forbidden</html>', 'gzip'),
        'empty': (b'', 'truncated'),
        'wrong-magic': (idx_bytes(numpy.ones(4), magic=2050), 'magic'),
        'short-data': (gzip.compress(struct.pack('>IIII', 2051, 5, 28, 28)
                                     + bytes(4 * 28 * 28)), 'shape'),
        'short-header': (gzip.compress(b'\0\0\x08'), 'header'),
    }


@pytest.mark.parametrize('kind', sorted(bad_idx_files()))
def test_load_idx_reports_a_bad_file_in_one_line(tmp_path, kind):
    data, problem = bad_idx_files()[kind]
    path = tmp_path / 'train-images-idx3-ubyte.gz'
    path.write_bytes(data)
    with pytest.raises(mnist.DatasetError) as info:
        mnist.load_idx(str(path))
    message = one_line(info.value)
    assert 'train-images-idx3-ubyte.gz' in message and str(tmp_path) in message
    assert problem in message


def test_load_idx_checks_the_md5_and_reports_missing_files(tmp_path):
    path = tmp_path / 'labels.gz'
    path.write_bytes(idx_bytes([1, 2, 3]))
    with pytest.raises(mnist.DatasetError) as info:
        mnist.load_idx(str(path), expected_md5='0' * 32)
    message = one_line(info.value)
    assert 'labels.gz' in message and '0' * 32 in message
    assert md5(path.read_bytes()) in message
    with pytest.raises(mnist.DatasetError) as info:
        mnist.load_idx(str(tmp_path / 'absent.gz'))
    assert 'absent.gz' in one_line(info.value)


# -- get_mnist_like on the real MNIST ------------------------------------------

@pytest.fixture(scope='module')
def raw_mnist():
    return {name: mnist.load_idx(os.path.join(MNIST_DIR, name), digest)
            for name, digest in MNIST_MD5.items()}


@needs_mnist
def test_full_mnist_shapes_dtypes_and_range(raw_mnist):
    train, validation, test = mnist.get_mnist_like(data_dir=MNIST_DIR)
    assert validation is None
    for dataset, n, images, labels in (
            (train, 60000, mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS),
            (test, 10000, mnist.TEST_IMAGES, mnist.TEST_LABELS)):
        assert isinstance(dataset, chainer.datasets.TupleDataset)
        x, t = mnist.to_arrays(dataset)
        assert x.shape == (n, 1, 28, 28) and x.dtype == numpy.float32
        assert t.shape == (n,) and t.dtype == numpy.int32
        assert x.min() == 0 and x.max() == 1
        assert set(numpy.unique(t)) == set(range(10))
        numpy.testing.assert_array_equal(x[:50, 0] * 255,
                                         raw_mnist[images][:50])
        numpy.testing.assert_array_equal(t, raw_mnist[labels])


@needs_mnist
def test_validation_holds_out_the_last_examples_and_sizes_take_the_first(
        raw_mnist):
    train, validation, test = mnist.get_mnist_like(
        data_dir=MNIST_DIR, validation=5000, train_size=100, test_size=30)
    assert (len(train), len(validation), len(test)) == (100, 5000, 30)
    train_t = raw_mnist[mnist.TRAIN_LABELS]
    numpy.testing.assert_array_equal(mnist.to_arrays(train)[1], train_t[:100])
    numpy.testing.assert_array_equal(mnist.to_arrays(validation)[1], train_t[55000:])
    numpy.testing.assert_array_equal(
        mnist.to_arrays(validation)[0][:, 0] * 255,
        raw_mnist[mnist.TRAIN_IMAGES][55000:])
    numpy.testing.assert_array_equal(
        mnist.to_arrays(test)[1], raw_mnist[mnist.TEST_LABELS][:30])
    # All that remains after the hold-out is still available...
    train, _, _ = mnist.get_mnist_like(
        data_dir=MNIST_DIR, validation=5000, train_size=55000, test_size=1)
    assert len(train) == 55000
    # ...but not one more.
    with pytest.raises(mnist.DatasetError) as info:
        mnist.get_mnist_like(data_dir=MNIST_DIR, validation=5000,
                                train_size=55001)
    assert '--train-size' in one_line(info.value)


@needs_mnist
@pytest.mark.parametrize('size, top', [(40, 6), (36, 4), (29, 0)])
def test_input_size_pads_with_zeros_centred(raw_mnist, size, top):
    train, _, test = mnist.get_mnist_like(
        data_dir=MNIST_DIR, train_size=20, test_size=20, input_size=size)
    for dataset, name in ((train, mnist.TRAIN_IMAGES),
                          (test, mnist.TEST_IMAGES)):
        x = mnist.to_arrays(dataset)[0]
        assert x.shape == (20, 1, size, size) and x.dtype == numpy.float32
        inner = x[:, 0, top:top + 28, top:top + 28]
        numpy.testing.assert_array_equal(inner * 255, raw_mnist[name][:20])
        outside = x.copy()
        outside[:, 0, top:top + 28, top:top + 28] = 0
        assert not outside.any()


def copy_mnist(folder, skip=()):
    for name in MNIST_MD5:
        if name not in skip:
            shutil.copy(os.path.join(MNIST_DIR, name), str(folder))


@needs_mnist
def test_data_dir_with_a_truncated_file_names_it_and_its_md5(tmp_path):
    copy_mnist(tmp_path)
    name = mnist.TEST_IMAGES
    with open(str(tmp_path / name), 'r+b') as f:
        f.truncate(100000)
    with pytest.raises(mnist.DatasetError) as info:
        mnist.get_mnist_like(data_dir=str(tmp_path))
    message = one_line(info.value)
    assert name in message and str(tmp_path) in message
    assert '9fb629c4189551a2d022fa330f9573f3' in message


@needs_mnist
def test_data_dir_with_a_missing_file_names_it_and_the_folder(tmp_path):
    copy_mnist(tmp_path, skip=[mnist.TRAIN_LABELS])
    with pytest.raises(mnist.DatasetError) as info:
        mnist.get_mnist_like(data_dir=str(tmp_path))
    message = one_line(info.value)
    assert mnist.TRAIN_LABELS in message and str(tmp_path) in message


@needs_mnist
def test_a_verified_cache_is_used_without_network(tmp_path):
    copy_mnist(tmp_path)
    train, validation, test = mnist.get_mnist_like(
        root=str(tmp_path), train_size=10, test_size=10)
    assert (len(train), validation, len(test)) == (10, None, 10)


# -- command line ------------------------------------------------------------

@needs_mnist
def test_cli_verifies_a_data_dir(capsys):
    assert mnist.main(['--dataset', 'mnist', '--data-dir', MNIST_DIR]) == 0
    out = capsys.readouterr().out
    assert '60000 images' in out and '10000 labels' in out


def test_cli_error_is_one_line_on_stderr_with_exit_status_1(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'capsnet.data.mnist', '--dataset', 'mnist',
         '--data-dir', str(tmp_path)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ''
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ')
    assert mnist.TRAIN_IMAGES in lines[0] and str(tmp_path) in lines[0]


# -- random_shift ------------------------------------------------------------

def shifted(image, dy, dx):
    """Reference: image (C, H, W) moved down dy and right dx, zero fill."""
    out = numpy.zeros_like(image)
    h, w = image.shape[1:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = image[:, i - dy, j - dx]
    return out


def test_random_shift_moves_each_sample_by_its_own_offsets():
    x = numpy.random.RandomState(1).uniform(
        1, 2, (32, 2, 7, 9)).astype(numpy.float32)  # no zeros in the input
    original = x.copy()
    out = mnist.random_shift(x, 3, numpy.random.RandomState(0))
    offsets = numpy.random.RandomState(0).randint(-3, 4, size=(32, 2))
    assert out.shape == x.shape and out.dtype == x.dtype and out is not x
    numpy.testing.assert_array_equal(x, original)
    assert len({tuple(o) for o in offsets}) > 20  # genuinely per sample
    for b, (dy, dx) in enumerate(offsets):
        numpy.testing.assert_array_equal(out[b], shifted(x[b], dy, dx))
        assert (out[b] == 0).sum() == 2 * (
            7 * 9 - (7 - abs(dy)) * (9 - abs(dx)))


def test_random_shift_stays_within_max_shift_and_covers_the_range():
    x = numpy.zeros((500, 1, 11, 11), numpy.uint8)
    x[:, 0, 5, 5] = 255
    out = mnist.random_shift(x, 2, numpy.random.RandomState(3))
    assert out.dtype == numpy.uint8
    b, _, i, j = numpy.nonzero(out)
    numpy.testing.assert_array_equal(b, numpy.arange(500))
    assert set(zip(i - 5, j - 5)) == {(dy, dx) for dy in range(-2, 3)
                                      for dx in range(-2, 3)}


def test_random_shift_draws_once_and_is_deterministic():
    x = numpy.random.RandomState(2).rand(8, 1, 28, 28).astype(numpy.float32)
    state = numpy.random.RandomState(5)
    first = mnist.random_shift(x, 2, state)
    reference = numpy.random.RandomState(5)
    reference.randint(-2, 3, size=(8, 2))
    assert state.randint(1 << 30) == reference.randint(1 << 30)
    numpy.testing.assert_array_equal(
        first, mnist.random_shift(x, 2, numpy.random.RandomState(5)))
    assert not numpy.array_equal(
        first, mnist.random_shift(x, 2, numpy.random.RandomState(6)))


def test_random_shift_zero_is_the_identity():
    x = numpy.random.RandomState(0).rand(4, 1, 28, 28).astype(numpy.float32)
    state = numpy.random.RandomState(0)
    out = mnist.random_shift(x, 0, state)
    numpy.testing.assert_array_equal(out, x)
    assert out.dtype == x.dtype and out is not x
    assert state.randint(1 << 30) == \
        numpy.random.RandomState(0).randint(1 << 30)  # nothing drawn


def test_random_shift_rejects_a_negative_max_shift():
    with pytest.raises(ValueError):
        mnist.random_shift(numpy.zeros((1, 1, 4, 4)), -1,
                              numpy.random.RandomState(0))


# -- one rule for sizes (issue 26): beyond the data is refused, naming the
# limit; no silent clamping ---------------------------------------------------

@pytest.mark.parametrize('kwargs, sizes', [
    (dict(), (60000, 0, 10000)),
    (dict(train_size=100, test_size=30), (100, 0, 30)),
    (dict(validation=5000), (55000, 5000, 10000)),
    (dict(validation=5000, train_size=55000), (55000, 5000, 10000)),
    (dict(validation=59999), (1, 59999, 10000)),
])
def test_split_sizes_takes_what_is_asked(kwargs, sizes):
    assert mnist.split_sizes(60000, 10000, **kwargs) == sizes


@pytest.mark.parametrize('kwargs, fragments', [
    (dict(train_size=60001), ['--train-size 60001', 'at most 60000']),
    (dict(train_size=55001, validation=5000),
     ['--train-size 55001', 'at most 55000', '--validation 5000']),
    (dict(test_size=10001), ['--test-size 10001', 'at most 10000']),
    (dict(validation=60000), ['--validation 60000', 'at most 59999']),
    (dict(validation=70000, train_size=10), ['--validation 70000']),
    (dict(train_size=0), ['--train-size', '0']),
    (dict(test_size=0), ['--test-size', '0']),
    (dict(train_size=-3), ['--train-size']),
    (dict(validation=-1), ['--validation']),
    (dict(train_size=10.5), ['--train-size', 'whole number']),
    (dict(test_size=True), ['--test-size', 'whole number']),
    (dict(validation='10'), ['--validation', 'whole number']),
])
def test_split_sizes_refuses_what_the_data_cannot_honour(kwargs, fragments):
    with pytest.raises(mnist.DatasetError) as info:
        mnist.split_sizes(60000, 10000, **kwargs)
    message = one_line(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_split_sizes_names_the_dataset():
    with pytest.raises(mnist.DatasetError) as info:
        mnist.split_sizes(600, 100, train_size=601, name='fashion-mnist')
    assert 'fashion-mnist has 600 training examples' in one_line(info.value)


@pytest.mark.parametrize('batchsize, n, ok', [
    (100, 60000, True), (100, 100, True), (101, 100, False), (0, 100, False),
])
def test_a_batch_larger_than_the_training_set_is_refused(batchsize, n, ok):
    if ok:
        mnist.check_batchsize(batchsize, n)
        return
    with pytest.raises(mnist.DatasetError) as info:
        mnist.check_batchsize(batchsize, n)
    message = one_line(info.value)
    assert '--batchsize {}'.format(batchsize) in message
    if batchsize:
        assert 'at most {}'.format(n) in message


@needs_mnist
@pytest.mark.parametrize('kwargs, fragment', [
    (dict(train_size=60001), 'at most 60000'),
    (dict(validation=100, train_size=59901), 'at most 59900'),
    (dict(test_size=10.0), 'whole number'),
    # the flag is named
    (dict(test_size=10001), '--test-size'),
    (dict(train_size=0), '--train-size'),
    (dict(test_size=-1), '--test-size'),
    (dict(validation=60000), '--validation'),
    (dict(validation=-5), '--validation'),
    (dict(input_size=27), '--input-size'),
])
def test_get_mnist_like_refuses_sizes_beyond_the_data(kwargs, fragment):
    with pytest.raises(mnist.DatasetError) as info:
        mnist.get_mnist_like(data_dir=MNIST_DIR, **kwargs)
    assert fragment in one_line(info.value)


@needs_mnist
def test_get_mnist_like_says_what_it_reads():
    """A phase that can take seconds (md5s, decompression, padding) is said
    in one line, before it starts."""
    lines = []
    mnist.get_mnist_like(data_dir=MNIST_DIR, train_size=10, test_size=10,
                         log=lines.append)
    assert len(lines) == 1 and 'mnist' in lines[0] and MNIST_DIR in lines[0]
    assert lines[0].endswith('...')


# -- the data found once: $CAPSNET_DATA, the remembered --data-dir ----------

def test_data_is_found_from_capsnet_data_or_the_remembered_folder(
        tmp_path, monkeypatch):
    """Without --data-dir: $CAPSNET_DATA (the four files, or a <dataset>/
    folder of them), else the last --data-dir that held them; none found
    is None (the cache and download). A $CAPSNET_DATA without the files is
    one line naming it."""
    shared = tmp_path / 'shared'
    (shared / 'mnist').mkdir(parents=True)
    for name in mnist.DATASETS['mnist']['files']:
        (shared / 'mnist' / name).write_bytes(b'')
    monkeypatch.setenv('CHAINER_DATASET_ROOT', str(tmp_path / 'chainer'))
    monkeypatch.delenv(mnist.DATA_ENV, raising=False)
    assert mnist.find_data_dir('mnist') is None
    monkeypatch.setenv(mnist.DATA_ENV, str(shared))
    assert mnist.find_data_dir('mnist') == str(shared / 'mnist')
    monkeypatch.setenv(mnist.DATA_ENV, str(shared / 'mnist'))
    assert mnist.find_data_dir('mnist') == str(shared / 'mnist')
    monkeypatch.setenv(mnist.DATA_ENV, str(tmp_path))
    with pytest.raises(mnist.DatasetError, match='CAPSNET_DATA'):
        mnist.find_data_dir('mnist')
    monkeypatch.delenv(mnist.DATA_ENV)
    mnist.remember_data_dir('mnist', str(shared / 'mnist'))
    assert mnist.find_data_dir('mnist') == str(shared / 'mnist')
    assert mnist.find_data_dir('fashion-mnist') is None


@needs_mnist
def test_a_data_dir_that_held_the_files_is_remembered(tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv('CHAINER_DATASET_ROOT', str(tmp_path / 'chainer'))
    monkeypatch.delenv(mnist.DATA_ENV, raising=False)
    _, _, test = mnist.get_mnist_like(data_dir=MNIST_DIR, test_size=5,
                                      need_train=False)
    assert len(test) == 5
    assert mnist.find_data_dir('mnist') == os.path.abspath(MNIST_DIR)
    _, _, again = mnist.get_mnist_like(test_size=5, need_train=False)
    numpy.testing.assert_array_equal(again[0][0], test[0][0])


def link_or_copy(source, target):
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copy(source, target)


def data_dir_with(folder, mnist_dir, name, content):
    """A --data-dir holding the real MNIST files but ``name`` = content."""
    os.makedirs(str(folder))
    for fname in MNIST_FILES:
        target = os.path.join(str(folder), fname)
        if fname == name:
            with open(target, 'wb') as f:
                f.write(content)
        else:
            link_or_copy(os.path.join(mnist_dir, fname), target)
    return str(folder)


@pytest.fixture
def truncated_data(tmp_path, mnist_dir):
    """The test images cut to their first 100,000 bytes (every tool reads
    the test files; visualize.py and evaluate.py read them alone)."""
    name = 't10k-images-idx3-ubyte.gz'
    with open(os.path.join(mnist_dir, name), 'rb') as f:
        head = f.read(100000)
    return data_dir_with(tmp_path / 'truncated', mnist_dir, name, head), name


@pytest.fixture
def wrong_md5_data(tmp_path, mnist_dir):
    """The test labels replaced by a valid IDX file (10,000 zeros) whose md5
    is not the published one."""
    name = 't10k-labels-idx1-ubyte.gz'
    content = gzip.compress(struct.pack('>II', 2049, 10000) + bytes(10000))
    return data_dir_with(tmp_path / 'wrong-md5', mnist_dir, name,
                         content), name


def data_command(program, data_dir, out, model):
    """(argv, files that must stay unchanged) for a tool reading MNIST."""
    if program == 'train.py':
        # a model.npz or final.json in --out would be another run's
        saved = out.parent / 'saved.npz'
        return (['--no-progress', '--data-dir', data_dir, '-o', out,
                 '--save', saved], [saved])
    if program == 'visualize.py':
        return (['--load', model, '--data-dir', data_dir, '-o', out],
                [out / 'vis.png'])
    if program == 'evaluate.py':
        return (['--load', model, '--data-dir', data_dir, '-o', out],
                [out / 'confusion.png', out / 'evaluation.json'])
    return ['--data-dir', data_dir], []


PROGRAMS_READING_MNIST = ['train.py', 'visualize.py', 'evaluate.py',
                          '-m capsnet.data.mnist']


@pytest.mark.parametrize('program', PROGRAMS_READING_MNIST)
@pytest.mark.parametrize('bad_data, fragments', [
    # the expected md5 is the published one of the file
    ('truncated_data', ['md5 is', 'truncated',
                        '9fb629c4189551a2d022fa330f9573f3']),
    ('wrong_md5_data', ['md5 is', 'expected ec29112dd5afa0611ce80d1b7f02629c']),
], ids=['truncated', 'wrong-md5'])
def test_bad_dataset_file(program, bad_data, fragments, tmp_path, request,
                          fresh_model_path):
    data_dir, name = request.getfixturevalue(bad_data)
    argv, outputs = data_command(program, data_dir, tmp_path / 'out',
                                 fresh_model_path)
    kept = Unchanged(*outputs + [os.path.join(data_dir, name)])
    assert_one_error(run_script(program, *argv), name, data_dir, *fragments)
    kept.check()


@pytest.mark.parametrize('program', ['-m capsnet.data.mnist', 'train.py'])
def test_unusable_dataset_cache_folder(program, tmp_path, blocker):
    """No --data-dir: the download cache under CHAINER_DATASET_ROOT cannot
    be created (reported before any download is tried)."""
    argv = ['--no-progress', '-o', tmp_path / 'out'] \
        if program == 'train.py' else []
    result = run_script(program, *argv,
                        env={'CHAINER_DATASET_ROOT': str(blocker / 'root')})
    assert_one_error(result, 'cannot create the cache folder',
                     'CHAINER_DATASET_ROOT')
    assert 'downloading' not in result.stdout
    assert blocker.read_text() == 'keep me'


def test_datasets_cli_unknown_dataset():
    assert_one_error(run_script('-m capsnet.data.mnist', '--dataset', 'cifar'),
                     "unknown dataset 'cifar'", 'mnist, fashion-mnist',
                     status=1)


@pytest.mark.parametrize('what', ['file', 'missing'])
def test_data_dir_that_is_not_a_folder(blocker, tmp_path, what):
    """It said 'train-images-idx3-ubyte.gz not found in F'."""
    data_dir = blocker if what == 'file' else tmp_path / 'nowhere'
    assert_one_error(run_script('train.py', '--data-dir', data_dir, '-o',
                                tmp_path / 'out'), '--data-dir {} {}; pass the '
                     'folder holding the four mnist files'.format(
                         data_dir, 'is a file, not a folder'
                         if what == 'file' else 'does not exist'), status=1)


def test_train_size_beyond_what_validation_leaves(mnist_dir, tmp_path):
    """It said 'train_size must be between 1 and 1', without naming the
    hold-out that left one example nor the flag."""
    assert_one_error(run_script('train.py', '--data-dir', mnist_dir, '-o',
                                tmp_path / 'out', '--validation', '59999',
                                '--train-size', '100'),
                     '--train-size 100 is beyond the data: mnist has 60000 '
                     'training examples (1 with --validation 59999 held '
                     'out); use at most 1', status=1)
