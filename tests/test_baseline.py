"""The paper's baseline CNN (nets.py), as registered in nets."""
import json
import os

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from capsnet import files
import nets
import train
from capsnet.training import loop
from conftest import both_paths

PAPER_COUNT = 35445522  # the docstring's sum, checked term by term below


def parameter_count(input_size=28, n_classes=10):
    """Number of parameters of ``BaselineCNN(input_size, n_classes)``."""
    count, channels = 0, 1
    for out in nets.CONV_CHANNELS:
        count += channels * out * nets.KERNEL * nets.KERNEL + out
        channels = out
    features = channels * input_size * input_size
    for out in nets.FC_SIZES + (n_classes,):
        count += features * out + out
        features = out
    return count


@pytest.fixture(scope='module')
def model():
    numpy.random.seed(0)
    return nets.BaselineCNN()


def images(n, side=28, seed=0):
    rng = numpy.random.RandomState(seed)
    x = rng.uniform(0, 1, (n, 1, side, side)).astype(numpy.float32)
    t = rng.randint(0, 10, n).astype(numpy.int32)
    return x, t


def test_parameter_count_is_the_papers(model):
    expected = (1 * 256 * 25 + 256 + 256 * 256 * 25 + 256
                + 256 * 128 * 25 + 128 + 100352 * 328 + 328
                + 328 * 192 + 192 + 192 * 10 + 10)
    assert nets.count_parameters(model) == expected == PAPER_COUNT
    assert parameter_count() == expected
    assert round(nets.count_parameters(model) / 1e6, 1) == 35.4  # "35.4M"
    assert '35,445,522' in nets.BaselineCNN.__doc__
    assert model.fc1.W.shape == (328, 28 * 28 * 128)


def test_layers(model):
    for conv, (c_in, c_out) in zip(
            (model.conv1, model.conv2, model.conv3),
            ((1, 256), (256, 256), (256, 128))):
        assert conv.W.shape == (c_out, c_in, 5, 5)
        assert conv.stride == (1, 1) and conv.pad == (2, 2)
    assert model.fc2.W.shape == (192, 328)
    assert model.fc3.W.shape == (10, 192)


def test_parameter_count_other_sizes():
    for side in (8, 13):
        m = nets.BaselineCNN(input_size=side)
        assert nets.count_parameters(m) == parameter_count(side)


def test_registered_in_nets():
    assert nets.BaselineCNN is nets.BaselineCNN
    assert nets.ARCHITECTURES['baseline'] is nets.BaselineCNN
    assert nets.BaselineCNN.arch == 'baseline'
    assert json.loads(json.dumps(nets.BaselineCNN(input_size=8).options)
                      ) == dict(input_size=8, n_classes=10, dropout=0.5)


def test_forward_loss_and_report(model):
    x, t = images(3)
    observation = {}
    reporter = chainer.Reporter()
    reporter.add_observer('main', model)
    with reporter.scope(observation):
        loss = model(x, t)
    assert loss.shape == ()
    assert numpy.isfinite(float(loss.array))
    assert set(observation) == {'main/loss', 'main/accuracy'}
    assert 0 <= float(observation['main/accuracy']) <= 1
    model.cleargrads()
    loss.backward()
    assert model.conv1.W.grad is not None
    assert numpy.abs(model.fc3.W.grad).sum() > 0


def test_predict(model):
    x, _ = images(4, seed=1)
    predictions, probabilities = model.predict(x)
    assert predictions.shape == (4,)
    assert probabilities.shape == (4, 10)
    numpy.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    numpy.testing.assert_array_equal(predictions,
                                     probabilities.argmax(axis=1))
    # inference mode: no dropout, so the same answer twice
    numpy.testing.assert_array_equal(model.predict(x)[1], probabilities)
    # flat (B, S*S) images are accepted too
    numpy.testing.assert_allclose(model.predict(x.reshape(4, -1))[1],
                                  probabilities, rtol=1e-6)


def test_dropout_only_in_training():
    numpy.random.seed(1)
    m = nets.BaselineCNN(input_size=8, dropout=0.5)
    x, _ = images(5, side=8)
    with chainer.using_config('train', True):
        a, b = m.logits(x).array, m.logits(x).array
    assert not numpy.array_equal(a, b)
    with chainer.using_config('train', False):
        a, b = m.logits(x).array, m.logits(x).array
    numpy.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        nets.BaselineCNN(dropout=1.0)


def test_save_load_round_trip(tmp_path):
    # a small input keeps the file small; the code path is the same
    numpy.random.seed(2)
    m = nets.BaselineCNN(input_size=12, dropout=0.25)
    path = str(tmp_path / 'nets.npz')
    files.save_model(path, m)
    assert files.read_model_meta(path, nets.ARCHITECTURES) == (
        'baseline', dict(input_size=12, n_classes=10, dropout=0.25))
    loaded = files.load_model(path, nets.ARCHITECTURES)
    assert isinstance(loaded, nets.BaselineCNN)
    assert loaded.options == m.options
    x, _ = images(3, side=12, seed=3)
    for a, b in zip(m.predict(x), loaded.predict(x)):
        numpy.testing.assert_array_equal(a, b)


def test_train_flags_build_the_baseline():
    settings = train.parse_settings(['--arch', 'baseline'])
    assert settings.arch == 'baseline'
    assert settings.model_options() == dict(input_size=28)
    settings.input_size = 12  # small; the flag itself refuses sizes below 28
    m = nets.build(settings.arch, settings.recipe, **settings.model_options())
    assert isinstance(m, nets.BaselineCNN)
    assert m.options['input_size'] == 12


def test_train_end_to_end(tmp_path, monkeypatch, mnist_dir):
    out = str(tmp_path / 'run')
    # A 50-image step of the 35M network takes ~15 s on 2 cores, and a
    # snapshot (parameters and Adam's two moments, ~400 MB compressed)
    # ~10 s: keep the run tiny and skip the snapshot, which is train.py's
    # business and independent of the network.
    monkeypatch.setattr(loop.extensions, 'snapshot',
                        lambda *a, **k: (lambda trainer: None))
    train.main(['--arch', 'baseline', '--data-dir', mnist_dir,
                '--train-size', '10', '--test-size', '10',
                '--batchsize', '10', '--epoch', '1', '--no-progress',
                '--out', out])
    with open(os.path.join(out, 'final.json')) as f:
        final = json.load(f)
    assert final['arch'] == 'baseline'
    assert final['parameters'] == PAPER_COUNT
    assert final['epochs'] == final['final_epoch'] == 1
    assert 0 <= final['final_test_error'] <= 1
    log = open(os.path.join(out, 'log')).read()
    assert 'test/main/accuracy' in log and 'main/loss' in log


def test_fast_baseline_equals_plain_in_float64():
    """The fast CPU path (HWBC, padded DFT convolutions) computes the same
    loss and gradients. Compared in float64: in float32 a single ReLU input
    within rounding of zero can take the other branch in one path, which
    moves a bias gradient by a visible fraction while both are right."""
    numpy.random.seed(0)
    model = nets.BaselineCNN(dropout=0)
    for param in model.params():
        param.array = param.array.astype(numpy.float64)
    x = numpy.random.rand(3, 1, 28, 28)
    t = numpy.array([1, 4, 9], dtype=numpy.int32)
    results = both_paths(model, x, t)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    for name, grad in results[False][1].items():
        numpy.testing.assert_allclose(results[True][1][name], grad,
                                      rtol=1e-9, atol=1e-12, err_msg=name)


def test_fast_baseline_is_chosen_on_the_cpu():
    model = nets.BaselineCNN()
    assert model._use_fast()
    x = numpy.random.rand(2, 1, 28, 28).astype(numpy.float32)
    with chainer.no_backprop_mode(), chainer.using_config('train', False):
        fast = model.logits(x).array
        model.fast = False
        plain = model.logits(x).array
    numpy.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5)


def test_fast_pooling_cnn_equals_plain_in_float64():
    """The affine experiment's pooling CNN: the fast CPU path (HWBC, DFT
    convolutions, pooling by reshape and max) gives the plain path's loss
    and gradients, and is the one chosen on the CPU for sides divisible by
    4 (Chainer's cover_all pooling differs on odd sides)."""
    numpy.random.seed(1)
    model = nets.PoolingCNN(input_size=16, dropout=0)
    assert model._use_fast()
    assert not nets.PoolingCNN(input_size=18)._use_fast()
    for param in model.params():
        param.array = param.array.astype(numpy.float64)
    x = numpy.random.rand(3, 1, 16, 16)
    t = numpy.array([0, 5, 7], dtype=numpy.int32)
    results = both_paths(model, x, t)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    for name, grad in results[False][1].items():
        numpy.testing.assert_allclose(results[True][1][name], grad,
                                      rtol=1e-9, atol=1e-12, err_msg=name)
