"""capsnet.onnx_export: the exported ONNX graph, run by ONNX Runtime on the
CPU, gives the model's own outputs (docs/onnx.md).

Compared with ``model.predict(x)`` (predictions and lengths),
``model.capsules(x)`` in test mode (v) and ``model.reconstruction(v,
predictions)``, to float32 precision: rtol 1e-4, atol 1e-5; predictions
identical. The models are freshly initialised with a fixed seed, then every
bias is set to random values (Chainer starts them at zero, which would hide
a misplaced bias) and W_ij is scaled by 20 so that routing is far from its
uniform start (checked on the default model). Real MNIST test digits are
used when ``shared/data/mnist`` lies beside the checkout (or under
$CAPSNET_SHARED_DATA), random images otherwise.
"""
import ast
import gzip
import inspect
import os

import numpy
import pytest

import nets  # first: applies capsnet.compat before chainer (NumPy 2)
import chainer
from capsnet.onnx_export import export_onnx

onnx = pytest.importorskip(
    'onnx', reason='the ONNX export tests need onnx and onnxruntime '
    '(python -m pip install onnx onnxruntime)')
ort = pytest.importorskip(
    'onnxruntime', reason='the ONNX export tests need onnx and onnxruntime '
    '(python -m pip install onnx onnxruntime)')

RTOL, ATOL = 1e-4, 1e-5
W_SCALE = 20
BATCH = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get('CAPSNET_SHARED_DATA') or os.path.join(
    REPO, '..', 'shared', 'data')
MNIST_TEST_IMAGES = os.path.join(SHARED_DATA, 'mnist',
                                 't10k-images-idx3-ubyte.gz')
HAVE_RECIPES = {'primary_scale', 'digit_bias'} <= set(
    inspect.signature(nets.CapsNet).parameters)

# the largest absolute difference seen per output, over all the cases
# (printed at the end of the module with pytest -s)
LARGEST = {}


@pytest.fixture(scope='module', autouse=True)
def report_largest_differences():
    yield
    print('\nlargest |ONNX Runtime - Chainer| per output:', {
        name: '{:.3g}'.format(value) for name, value in sorted(
            LARGEST.items())})


def mnist_digits(n):
    """(n, 28, 28) float32 in [0, 1]: the first MNIST test digits, or None
    when the file is not there."""
    if not os.path.isfile(MNIST_TEST_IMAGES):
        return None
    with gzip.open(MNIST_TEST_IMAGES, 'rb') as f:
        header = numpy.frombuffer(f.read(16), dtype='>u4')
        assert header[0] == 2051 and tuple(header[2:]) == (28, 28), header
        count = min(n, int(header[1]))
        pixels = numpy.frombuffer(f.read(count * 28 * 28), dtype=numpy.uint8)
    return pixels.reshape(count, 28, 28).astype(numpy.float32) / 255


def images(n=BATCH, side=28):
    """(n, 1, side, side) float32 in [0, 1]. For side > 28, two digits
    overlaid at opposite corners (as in MultiMNIST)."""
    digits = mnist_digits(2 * n)
    if digits is None:
        return numpy.random.RandomState(0).rand(n, 1, side, side).astype(
            numpy.float32)
    x = numpy.zeros((n, 1, side, side), dtype=numpy.float32)
    x[:, 0, :28, :28] = digits[:n]
    if side > 28:
        shifted = numpy.zeros_like(x)
        shifted[:, 0, side - 28:, side - 28:] = digits[n:2 * n]
        x = numpy.maximum(x, shifted)
    return x


def make_model(network=nets.CapsNet, seed=0, **options):
    """A model with a fixed seed, random biases and W_ij scaled up."""
    state = numpy.random.get_state()
    numpy.random.seed(seed)
    try:
        model = network(**options)
    finally:
        numpy.random.set_state(state)
    rng = numpy.random.RandomState(seed + 1)
    for name, param in model.namedparams():
        if name.endswith('/b') or name == '/digit_b':
            param.array[...] = rng.normal(0, 0.1, param.shape)
    model.W.array *= W_SCALE
    return model


def run_onnx(path, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options,
                                   providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {'x': x})))


def chainer_outputs(model, x):
    """The project's own predictions, lengths, v and reconstruction."""
    predictions, lengths = model.predict(x)
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        v = model.capsules(x).array
        reconstruction = None
        if getattr(model, 'decoder', None) is not None and not getattr(
                model, 'two_digits', False):
            reconstruction = model.reconstruction(v, predictions).array
    return predictions, lengths, v, reconstruction


def close(name, got, expected):
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    assert got.dtype == numpy.float32, (name, got.dtype)
    largest = float(numpy.abs(got - expected).max())
    LARGEST[name] = max(LARGEST.get(name, 0.0), largest)
    numpy.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL,
                                  err_msg=name)


def check_export(model, path, x, **kwargs):
    """Export, run with ONNX Runtime and compare with the model; return
    the outputs of both."""
    proto = export_onnx(model, path, **kwargs)
    assert os.path.isfile(path)
    got = run_onnx(path, x)
    assert list(got) == [o.name for o in proto.graph.output]
    predictions, lengths, v, reconstruction = chainer_outputs(model, x)
    close('lengths', got['lengths'], lengths)
    close('v', got['v'], v)
    if getattr(model, 'two_digits', False):
        numpy.testing.assert_array_equal(nets.top2(got['lengths']),
                                         predictions)
    else:
        numpy.testing.assert_array_equal(got['lengths'].argmax(axis=1),
                                         predictions)
    want_reconstruction = reconstruction is not None and kwargs.get(
        'decoder', True)
    assert ('reconstruction' in got) == want_reconstruction, list(got)
    if want_reconstruction:
        close('reconstruction', got['reconstruction'], reconstruction)
    return got, (predictions, lengths, v, reconstruction)


@pytest.fixture(scope='module')
def default_model():
    return make_model()


@pytest.fixture(scope='module')
def default_onnx(default_model, tmp_path_factory):
    path = tmp_path_factory.mktemp('onnx') / 'capsnet.onnx'
    export_onnx(default_model, path)
    return path


@pytest.fixture(scope='module')
def x28():
    return images()


@pytest.mark.parametrize('fast', [None, False], ids=['fast', 'plain'])
def test_default_capsnet_matches_the_model(default_model, default_onnx, x28,
                                           fast):
    """CapsNet() (r = 3, decoder): lengths, v, reconstruction and the
    predictions, against the fast path (the default) and the plain one."""
    default_model.fast = fast
    try:
        got = run_onnx(default_onnx, x28)
        predictions, lengths, v, reconstruction = chainer_outputs(
            default_model, x28)
    finally:
        default_model.fast = None
    assert list(got) == ['lengths', 'v', 'reconstruction']
    close('lengths', got['lengths'], lengths)
    close('v', got['v'], v)
    close('reconstruction', got['reconstruction'], reconstruction)
    numpy.testing.assert_array_equal(got['lengths'].argmax(axis=1),
                                     predictions)
    assert got['reconstruction'].shape == (len(x28), 28 * 28)


def test_routing_is_not_trivial_in_the_compared_model(default_model, x28):
    """The last coupling coefficients of the default model are far from
    their uniform start 1/J, so the comparison covers the agreement."""
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        _, c = default_model.digit_capsules(
            default_model.primary_capsules(x28))
    c = getattr(c, 'array', c)
    assert numpy.abs(c - 0.1).max() > 0.05


def test_the_graph_has_a_symbolic_batch(default_model, default_onnx, x28):
    model = onnx.load(str(default_onnx))
    (graph_input,) = model.graph.input
    assert graph_input.name == 'x'
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == 'batch'
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    for output in model.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == 'batch'
    assert model.opset_import[0].version == 17
    # one image and the whole batch give the same rows
    one = run_onnx(default_onnx, x28[3:4])
    many = run_onnx(default_onnx, x28)
    for name in one:
        numpy.testing.assert_allclose(one[name][0], many[name][3],
                                      rtol=RTOL, atol=ATOL, err_msg=name)


def test_the_file_is_written_atomically(default_model, tmp_path):
    path = tmp_path / 'model.onnx'
    path.write_bytes(b'old')
    proto = export_onnx(default_model, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']
    assert path.read_bytes() == proto.SerializeToString()
    onnx.checker.check_model(str(path))


def test_decoder_false_leaves_out_the_reconstruction(default_model, x28,
                                                     tmp_path):
    check_export(default_model, tmp_path / 'm.onnx', x28, decoder=False)


@pytest.mark.parametrize('options, opset', [
    pytest.param(dict(routing=1), 18, id='r1-opset18'),
    pytest.param(dict(routing=2), 17, id='r2'),
    pytest.param(dict(reconstruct=False), 17, id='no-decoder'),
    pytest.param(dict(share_weights=True), 17, id='share_weights'),
    pytest.param(dict(activation='leaky_relu', leaky_slope=0.2), 17,
                 id='leaky_relu'),
    pytest.param(dict(primary_scale=1 / 32, digit_bias=True), 17,
                 id='primary_scale-digit_bias', marks=pytest.mark.skipif(
                     not HAVE_RECIPES, reason='nets.CapsNet does not take '
                     'primary_scale / digit_bias yet')),
])
def test_variants_match_the_model(options, opset, x28, tmp_path):
    model = make_model(**options)
    if options.get('digit_bias'):
        assert float(numpy.abs(model.digit_b.array).max()) > 0
    got, _ = check_export(model, tmp_path / 'm.onnx', x28, opset=opset)
    names = ['lengths', 'v'] + (
        [] if options.get('reconstruct') is False else ['reconstruction'])
    assert list(got) == names


def test_two_digit_capsnet_lengths_and_v(tmp_path):
    """TwoDigitCapsNet (36 x 36, 3200 primary capsules): lengths and v, and
    the two longest capsules; its decoder is not exported."""
    model = make_model(nets.TwoDigitCapsNet)
    x = images(8, side=36)
    got, _ = check_export(model, tmp_path / 'two.onnx', x)
    assert list(got) == ['lengths', 'v']
    assert got['v'].shape == (8, 10, 16)


def test_baseline_cnn_is_refused(tmp_path):
    path = tmp_path / 'baseline.onnx'
    with pytest.raises(ValueError, match='only CapsNet models export'):
        export_onnx(nets.BaselineCNN(input_size=1), path)
    assert not os.path.exists(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('opset', [12, 10 ** 4])
def test_an_unknown_opset_is_refused(default_model, tmp_path, opset):
    with pytest.raises(ValueError, match='opset must be in'):
        export_onnx(default_model, tmp_path / 'm.onnx', opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_the_exporter_imports_neither_chainer_nor_a_top_level_file():
    """Only os, NumPy, onnx and capsnet.files (its atomic write)."""
    with open(os.path.join(REPO, 'capsnet', 'onnx_export.py')) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update('{}.{}'.format(node.module, alias.name)
                         if node.module == 'capsnet' else
                         node.module.split('.')[0] if node.level == 0
                         else '.' for alias in node.names)
    assert names <= {'os', 'numpy', 'onnx', 'capsnet.files'}, names
