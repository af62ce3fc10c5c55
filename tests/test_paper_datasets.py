"""paper_datasets: MultiMNIST, expanded MNIST, affNIST-like and the affNIST
reader, on small synthetic digits and on the real MNIST."""
import numpy
import pytest

from capsnet.data import paper as pd
from conftest import needs_mnist, MNIST_DIR


def blocks(n=40, seed=0):
    """(n, 28, 28) uint8 digits: a distinct solid 4 x 4 block each, labels
    cycling 0-9, so positions and sources are easy to recover."""
    rs = numpy.random.RandomState(seed)
    images = numpy.zeros((n, 28, 28), numpy.uint8)
    for k in range(n):
        images[k, 12:16, 12:16] = 10 + k
    labels = numpy.arange(n) % 10
    rs.shuffle(labels)
    return images, labels.astype(numpy.uint8)


def test_multimnist_shapes_labels_and_pairs_of_different_classes():
    images, labels = blocks()
    d = pd.multimnist(images, labels, pairs_per_digit=3, seed=0)
    m = 3 * len(images)
    assert d['x'].shape == d['x1'].shape == d['x2'].shape == (m, 36, 36)
    assert d['x'].dtype == numpy.uint8
    assert d['t1'].shape == d['t2'].shape == (m,)
    assert (d['t1'] != d['t2']).all()
    assert (d['t1'] == labels[d['index1']]).all()
    assert (d['t2'] == labels[d['index2']]).all()
    # example k * 3 + p belongs to base digit k
    assert (d['index1'] == numpy.repeat(numpy.arange(len(images)), 3)).all()


def test_multimnist_shifts_are_within_4_pixels_and_images_match_them():
    images, labels = blocks()
    d = pd.multimnist(images, labels, pairs_per_digit=20, seed=1)
    s = d['shift'].astype(int)
    assert s.min() == -4 and s.max() == 4  # the whole range is used
    for k in range(0, len(s), 7):
        for img, idx, (dy, dx) in ((d['x1'], d['index1'], s[k, :2]),
                                   (d['x2'], d['index2'], s[k, 2:])):
            rows, cols = numpy.nonzero(img[k])
            # the 28 x 28 digit is centred on 36 x 36 (offset 4), then moved
            assert rows.min() == 4 + 12 + dy and cols.min() == 4 + 12 + dx
            assert img[k].max() == 10 + idx[k]


def test_multimnist_pixels_are_the_clipped_sum():
    images = numpy.full((20, 28, 28), 200, numpy.uint8)
    labels = numpy.arange(20) % 10
    d = pd.multimnist(images, labels, pairs_per_digit=1, seed=0)
    total = d['x1'].astype(int) + d['x2']
    assert (d['x'] == numpy.minimum(total, 255)).all()
    assert d['x'].max() == 255 and (total > 255).any()


def test_multimnist_is_deterministic_from_the_seed_and_split():
    images, labels = blocks()
    a = pd.multimnist(images, labels, 2, seed=5)
    b = pd.multimnist(images, labels, 2, seed=5)
    c = pd.multimnist(images, labels, 2, seed=6)
    t = pd.multimnist(images, labels, 2, seed=5, split='test')
    for key in a:
        assert (a[key] == b[key]).all()
    assert (a['x'] != c['x']).any() and (a['x'] != t['x']).any()


@pytest.mark.parametrize('bad', [0, -1, 1.5, None, True])
def test_pairs_per_digit_must_be_a_positive_integer(bad):
    images, labels = blocks()
    with pytest.raises(pd.DataError, match='pairs per digit must be'):
        pd.multimnist(images, labels, bad, seed=0)


def test_the_cache_is_reused_only_with_the_same_settings(tmp_path):
    images, labels = blocks()
    path = str(tmp_path / 'mm.npz')
    settings = dict(pairs_per_digit=2, seed=0, split='train', n_digits=40)
    first = pd.cached_multimnist(path, images, labels, settings)
    again = pd.cached_multimnist(path, images, labels, settings)
    assert all((first[k] == again[k]).all() for k in first)
    other = dict(settings, seed=1)
    with pytest.raises(pd.DataError) as e:
        pd.cached_multimnist(path, images, labels, other)
    assert 'made with other settings (seed 0 there, 1 now)' in str(e.value)
    assert '\n' not in str(e.value)


def test_a_tampered_cache_fails_its_checksum(tmp_path):
    images, labels = blocks()
    path = str(tmp_path / 'mm.npz')
    settings = dict(pairs_per_digit=1, seed=0, split='train')
    d = pd.cached_multimnist(path, images, labels, settings)
    with numpy.load(path) as npz:
        content = {k: npz[k] for k in npz.files}
    content['x'] = d['x'] + 1
    numpy.savez(path, **content)
    with pytest.raises(pd.DataError, match='does not match its checksum'):
        pd.cached_multimnist(path, images, labels, settings)


@pytest.mark.parametrize('cut', [100, 0.5], ids=['header', 'half'])
def test_a_truncated_cache_is_one_line_and_closed(tmp_path, cut):
    """A cache cut short (a full disk before atomic writes, a copy that
    stopped) is refused in one line, and its file is not left open."""
    import gc
    import warnings
    images, labels = blocks()
    path = tmp_path / 'mm.npz'
    settings = dict(pairs_per_digit=1, seed=0, split='train')
    pd.cached_multimnist(str(path), images, labels, settings)
    data = path.read_bytes()
    path.write_bytes(data[:cut if cut > 1 else int(len(data) * cut)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with pytest.raises(pd.DataError) as e:
            pd.cached_multimnist(str(path), images, labels, settings)
        gc.collect()
    assert 'is not a readable MultiMNIST cache' in str(e.value)
    assert '\n' not in str(e.value)
    assert [str(w.message) for w in caught
            if issubclass(w.category, ResourceWarning)] == []


def test_expanded_mnist_places_the_whole_digit_anywhere_on_40x40():
    images, labels = blocks(200)
    out = pd.expanded_mnist(images, seed=0)
    assert out.shape == (200, 40, 40)
    tops = [numpy.nonzero(o)[0].min() - 12 for o in out]
    assert min(tops) == 0 and max(tops) == 12
    assert (out.reshape(200, -1).sum(1) == images.reshape(200, -1).sum(1)
            .astype(int)).all()


def test_affnist_like_stays_inside_the_ranges_and_the_canvas():
    images = numpy.zeros((30, 28, 28), numpy.uint8)
    images[:, 4:24, 10:18] = 255
    out, params = pd.affnist_like(images, seed=0)
    assert out.shape == (30, 40, 40) and out.dtype == numpy.uint8
    angle, shear, sy, sx = params[:, 0], params[:, 1], params[:, 2], \
        params[:, 3]
    assert (abs(angle) <= 20).all() and (abs(shear) <= 0.2).all()
    assert ((0.8 <= sy) & (sy <= 1.2) & (0.8 <= sx) & (sx <= 1.2)).all()
    # the ink is kept: no digit loses more than rounding at the border
    ink = out.reshape(30, -1).astype(float).sum(1)
    assert (ink > 0.5 * 20 * 8 * 255).all()
    again, _ = pd.affnist_like(images, seed=0)
    assert (again == out).all()


def affnist_file(path, images, labels, **override):
    from scipy import io
    data = dict(image=images.reshape(len(images), -1).T,
                label_int=labels.astype(numpy.uint8),
                label_one_of_n=numpy.eye(10, dtype=numpy.uint8)[labels].T)
    data.update(override)
    io.savemat(str(path), {'affNISTdata': data})


def test_read_affnist_reads_a_file_of_the_published_structure(tmp_path):
    rs = numpy.random.RandomState(0)
    images = rs.randint(0, 256, (5, 40, 40)).astype(numpy.uint8)
    labels = numpy.array([3, 1, 4, 1, 5])
    affnist_file(tmp_path / 'test.mat', images, labels)
    x, t = pd.read_affnist(str(tmp_path / 'test.mat'))
    assert (x == images).all() and (t == labels).all()


@pytest.mark.parametrize('kind', ['not mat', 'no struct', 'wrong size',
                                  'labels'])
def test_read_affnist_refuses_a_file_of_another_structure(tmp_path, kind):
    from scipy import io
    path = tmp_path / 'bad.mat'
    images = numpy.zeros((3, 40, 40), numpy.uint8)
    if kind == 'not mat':
        path.write_bytes(b'hello')
    elif kind == 'no struct':
        io.savemat(str(path), {'images': images.reshape(3, -1)})
    elif kind == 'wrong size':
        affnist_file(path, images, numpy.arange(3),
                     image=numpy.zeros((784, 3), numpy.uint8))
    else:
        affnist_file(path, images, numpy.arange(3),
                     label_int=numpy.arange(4))
    with pytest.raises(pd.DataError) as e:
        pd.read_affnist(str(path))
    assert 'is not an affNIST .mat file' in str(e.value)
    assert '\n' not in str(e.value)


@needs_mnist
def test_multimnist_from_the_real_mnist():
    arrays = pd.load_mnist_arrays(MNIST_DIR)
    images, labels = arrays['test']
    d = pd.multimnist(images[:100], labels[:100], pairs_per_digit=2, seed=0,
                      split='test')
    assert d['x'].shape == (200, 36, 36) and (d['t1'] != d['t2']).all()
    # the sum loses no ink beyond the clipping
    assert (d['x'] >= numpy.maximum(d['x1'], d['x2'])).all()
    x = pd.to_float(d['x'])
    assert x.shape == (200, 1, 36, 36) and 0 <= x.min() and x.max() <= 1
