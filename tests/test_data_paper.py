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


# -- MultiMNIST made on the fly (pairs from the seed and the index) ----------

def test_the_dataset_makes_each_pair_from_seed_and_index_alone():
    images, labels = blocks()
    a = pd.MultiMNIST(images, labels, pairs_per_digit=50, seed=3)
    b = pd.MultiMNIST(images, labels, pairs_per_digit=50, seed=3)
    order = numpy.random.RandomState(0).permutation(len(a))[:300]
    forward = a.get_examples(order)
    backward = b.get_examples(order[::-1])
    for one, other in zip(forward, backward):
        assert (one == other[::-1]).all()
    # one at a time, after other pairs, on a third instance: the same
    c = pd.MultiMNIST(images, labels, pairs_per_digit=50, seed=3)
    for k in (7, 0, 299, 123):
        c.get_example(int(order[k] + 1) % len(c))
        single = c.get_example(int(order[k]))
        for value, batch in zip(single, forward):
            assert (value == batch[k]).all()
    other_seed = pd.MultiMNIST(images, labels, 50, seed=4).get_examples(order)
    other_split = pd.MultiMNIST(images, labels, 50, seed=3,
                                split='test').get_examples(order)
    assert (other_seed[0] != forward[0]).any()
    assert (other_split[0] != forward[0]).any()


def test_the_dataset_pairs_digits_of_two_classes_within_the_shifts():
    images, labels = blocks()
    d = pd.MultiMNIST(images, labels, pairs_per_digit=25, seed=1)
    assert len(d) == 25 * len(images)
    every = numpy.arange(len(d))
    p = d.pairs(every)
    assert (p['index1'] == every // 25).all()
    assert (labels[p['index1']] != labels[p['index2']]).all()
    s = p['shift']
    assert s.min() == -4 and s.max() == 4
    # every partner of another class turns up: uniform among them
    assert len(numpy.unique(p['index2'])) == len(images)
    x, t1, t2, x1, x2 = d.get_examples(every)
    assert x.shape == x1.shape == x2.shape == (len(d), 1, 36, 36)
    assert x.dtype == x1.dtype == numpy.float32 and t1.dtype == numpy.int32
    assert (t1 == labels[p['index1']]).all() and (t1 != t2).all()
    assert x.min() >= 0 and x.max() <= 1 and x1.max() > 0
    for k in range(0, len(d), 37):
        for img, idx, (dy, dx) in ((x1, p['index1'], s[k, :2]),
                                   (x2, p['index2'], s[k, 2:])):
            rows, cols = numpy.nonzero(img[k, 0])
            # the 28 x 28 digit centred on 36 x 36 (offset 4), then moved
            assert rows.min() == 4 + 12 + dy and cols.min() == 4 + 12 + dx
            assert img[k].max() * 255 == pytest.approx(10 + idx[k])


def test_the_dataset_pixels_are_the_clipped_sum():
    images = numpy.full((20, 28, 28), 200, numpy.uint8)
    labels = numpy.arange(20) % 10
    d = pd.MultiMNIST(images, labels, pairs_per_digit=3, seed=0)
    x, _, _, x1, x2 = d.get_examples(numpy.arange(len(d)))
    numpy.testing.assert_allclose(x, numpy.minimum(x1 + x2, 1), atol=1e-6)
    assert x.max() == 1 and (x1 + x2 > 1).any()
    # the uint8 arrays behind them, as multimnist() makes them
    u = d.arrays(numpy.arange(len(d)))
    assert (u['x'] == numpy.minimum(u['x1'].astype(int) + u['x2'], 255)).all()
    assert (pd.to_float(u['x']) == x).all()


def test_shifts_past_the_margin_are_cut_off_as_place_does():
    images, labels = blocks()
    images[:, 0, :] = images[:, :, 0] = 255   # ink at the frame's edges
    d = pd.MultiMNIST(images, labels, pairs_per_digit=10, seed=2,
                      max_shift=7)
    u = d.arrays(numpy.arange(len(d)))
    s = u['shift'].astype(int)
    assert abs(s).max() == 7
    want1 = pd.place(images[u['index1']], 36, s[:, 0], s[:, 1])
    want2 = pd.place(images[u['index2']], 36, s[:, 2], s[:, 3])
    assert (u['x1'] == want1).all() and (u['x2'] == want2).all()


def test_the_batch_path_and_indexing_agree_with_get_example():
    images, labels = blocks()
    d = pd.MultiMNIST(images, labels, pairs_per_digit=4, seed=9)
    index = [5, 3, 100, 5, len(d) - 1]
    batch = d.get_examples(index)
    for got in (d[index], d[numpy.array(index)]):
        assert len(got) == len(index)
        for k, example in enumerate(got):
            for value, column in zip(example, batch):
                assert (value == column[k]).all()
    assert all((a == b).all() for a, b in zip(d[-1], d.get_example(
        len(d) - 1)))
    sliced = d[2:8:3]
    assert len(sliced) == 2 and (sliced[1][0] == d[5][0]).all()
    from capsnet import compat  # noqa: F401
    import chainer
    it = chainer.iterators.SerialIterator(d, 8, shuffle=False)
    x, t1, t2, x1, x2 = chainer.dataset.concat_examples(next(it))
    assert x.shape == (8, 1, 36, 36) and t1.shape == (8,)
    assert (x == d.get_examples(numpy.arange(8))[0]).all()


def test_the_papers_60m_pairs_take_constant_memory():
    """1,000 pairs per MNIST digit (60M): building the dataset allocates
    nothing per pair, and its last pair is made like its first."""
    import time
    import tracemalloc
    images = numpy.zeros((60000, 28, 28), numpy.uint8)
    labels = numpy.arange(60000) % 10
    tracemalloc.start()
    start = time.perf_counter()
    d = pd.MultiMNIST(images, labels, pairs_per_digit=1000, seed=0)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(d) == 60000000
    assert seconds < 0.5
    # the other-class table: 10 x 54,000 int32, about 2.2 MB
    assert peak < 4e6
    x, t1, t2, _, _ = d.get_examples([0, len(d) - 1])
    assert x.shape == (2, 1, 36, 36) and (t1 != t2).all()
    assert (d.pairs([len(d) - 1])['index1'] == 59999).all()


@pytest.mark.parametrize('change, message', [
    (dict(pairs_per_digit=0), 'pairs per digit must be'),
    (dict(seed=-1), 'seed must be an integer >= 0'),
    (dict(max_shift=-1), 'shift must be an integer >= 0'),
    (dict(split='valid'), "split must be 'train' or 'test'"),
    (dict(canvas=20), 'canvas must be an integer >= 28'),
    (dict(labels=numpy.zeros(40, int)), 'at least two classes'),
    (dict(labels=numpy.arange(40)), 'labels must be 0-9'),
    (dict(images=numpy.zeros((40, 28, 28), numpy.float32)), 'uint8'),
])
def test_the_dataset_refuses_bad_settings_in_one_line(change, message):
    images, labels = blocks()
    settings = dict(images=images, labels=labels, pairs_per_digit=2, seed=0)
    settings.update(change)
    with pytest.raises(pd.DataError) as e:
        pd.MultiMNIST(**settings)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_an_index_outside_the_dataset_is_an_index_error():
    images, labels = blocks()
    d = pd.MultiMNIST(images, labels, pairs_per_digit=2, seed=0)
    for bad in ([len(d)], [-1], [0.5]):
        with pytest.raises(IndexError):
            d.get_examples(bad)


# -- bounding-box overlap (Section 6: 20 x 20 boxes) -------------------------

def test_bounding_box_overlap_by_hand():
    cases = [((0, 0), (0, 0), 1.0),
             ((4, 4), (-4, -4), 12 * 12 / 400),    # 8 px apart both ways
             ((2, -1), (0, 0), 18 * 19 / 400),
             ((0, 0), (0, 20), 0.0),                # side by side
             ((0, 0), (25, 0), 0.0),
             ((-3, 1), (1, 1), 16 * 20 / 400)]
    for s1, s2, want in cases:
        assert pd.bounding_box_overlap(s1, s2) == pytest.approx(want)
    a = numpy.array([c[0] for c in cases])
    b = numpy.array([c[1] for c in cases])
    numpy.testing.assert_allclose(pd.bounding_box_overlap(a, b),
                                  [c[2] for c in cases])


def test_the_generators_mean_overlap_is_the_expected_one():
    # uniform shifts on -m ... m: (1 - E|d| / 20)^2, E|d| = (n^2 - 1) / 3n
    assert pd.expected_overlap(4) == pytest.approx((1 - 80 / 27 / 20) ** 2)
    assert pd.expected_overlap(0) == 1
    for m in (2, 3, 4):
        assert pd.mean_overlap(m, 100000) == pytest.approx(
            pd.expected_overlap(m), abs=0.004)
    # the paper's "80% overlap" lies between shifts of 3 and 2 pixels
    assert pd.mean_overlap(4) < pd.mean_overlap(3) < 0.8 \
        < pd.mean_overlap(2)


@needs_mnist
def test_the_dataset_on_the_real_mnist_at_the_papers_scale():
    arrays = pd.load_mnist_arrays(MNIST_DIR)
    images, labels = arrays['train']
    d = pd.MultiMNIST(images, labels, pairs_per_digit=1000, seed=0)
    assert len(d) == 60000000
    index = numpy.random.RandomState(0).randint(0, len(d), 128)
    x, t1, t2, x1, x2 = d.get_examples(index)
    assert (t1 != t2).all() and (t1 == labels[index // 1000]).all()
    assert (x >= numpy.maximum(x1, x2) - 1e-6).all()
    assert 0 <= x.min() and x.max() <= 1


# -- affNIST pixels by their dtype and range -----------------------------------

@pytest.mark.parametrize('dtype, scale', [
    (numpy.uint8, 1), (numpy.float64, 1 / 255.0), (numpy.float32, 1.0),
    (numpy.float64, 1.0), (numpy.uint16, 1)],
    ids=['uint8', 'float 0-1', 'float32 0-255', 'float 0-255', 'uint16'])
def test_read_affnist_converts_pixels_by_dtype_and_range(tmp_path, dtype,
                                                         scale):
    rs = numpy.random.RandomState(0)
    images = rs.randint(0, 256, (4, 40, 40)).astype(numpy.uint8)
    images[0, 0, 0] = 255
    labels = numpy.array([0, 1, 2, 3])
    stored = (images * scale).astype(dtype)
    affnist_file(tmp_path / 't.mat', images, labels,
                 image=stored.reshape(4, -1).T)
    x, t = pd.read_affnist(str(tmp_path / 't.mat'))
    assert x.dtype == numpy.uint8
    assert (x == images).all() and (t == labels).all()


@pytest.mark.parametrize('values, message', [
    (numpy.full((1600, 2), -0.5), 'float64 in [-0.5, -0.5]'),
    (numpy.full((1600, 2), 300.0), 'float64 in [300, 300]'),
    (numpy.full((1600, 2), 256, numpy.int32), 'int32 in [256, 256]'),
    (numpy.full((1600, 2), numpy.nan), 'NaN or inf'),
    (numpy.full((1600, 2), 1 + 1j), 'dtype complex128'),
])
def test_read_affnist_refuses_pixels_it_cannot_read(tmp_path, values,
                                                    message):
    affnist_file(tmp_path / 't.mat', numpy.zeros((2, 40, 40), numpy.uint8),
                 numpy.array([0, 1]), image=values)
    with pytest.raises(pd.DataError) as e:
        pd.read_affnist(str(tmp_path / 't.mat'))
    assert message in str(e.value) and '\n' not in str(e.value)
    assert 'is not an affNIST .mat file' in str(e.value)
