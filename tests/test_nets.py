"""nets.py: the paper's units (squash, routing, losses, masking), the
CapsNet (its fast path against the plain one), the baseline CNN and the
two-digit (MultiMNIST) networks."""
import json

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import gradient_check
import chainer.functions as F
from capsnet import files
from capsnet.kernels import routing
import nets
from conftest import both_paths


def variable(array):
    return chainer.Variable(numpy.asarray(array, dtype=numpy.float32))


# -- squash and norms ------------------------------------------------------

def test_squash_keeps_direction_and_shrinks_length_below_one():
    s = numpy.random.RandomState(0).randn(50, 16).astype(numpy.float32) * 3
    v = nets.squash(variable(s)).array
    s_norm = numpy.linalg.norm(s, axis=1)
    v_norm = numpy.linalg.norm(v, axis=1)
    assert (v_norm < 1).all()
    numpy.testing.assert_allclose(v_norm, s_norm ** 2 / (1 + s_norm ** 2),
                                  rtol=1e-5)
    cosine = (s * v).sum(1) / (s_norm * v_norm)
    numpy.testing.assert_allclose(cosine, 1, rtol=1e-5)


def test_squash_of_a_zero_vector_is_zero_with_finite_gradients():
    s = variable(numpy.zeros((2, 8)))
    v = nets.squash(s)
    F.sum(v * v + v).backward()
    assert numpy.all(v.array == 0)
    assert numpy.isfinite(s.grad).all()


def test_safe_norm_has_finite_gradient_at_zero():
    x = variable(numpy.zeros((3, 16)))
    F.sum(nets.safe_norm(x)).backward()
    assert numpy.isfinite(x.grad).all()


# -- routing -----------------------------------------------------------------

def random_u_hat(batch=3, n_in=12, n_out=4, dim=5, seed=0):
    return variable(numpy.random.RandomState(seed).randn(
        batch, n_in, n_out, dim) * 0.5)


@pytest.mark.parametrize('iterations', [1, 2, 3])
def test_coupling_coefficients_sum_to_one_over_digit_capsules(iterations):
    v, c = nets.dynamic_routing(random_u_hat(), iterations)
    assert v.shape == (3, 4, 5) and c.shape == (3, 12, 4)
    numpy.testing.assert_allclose(c.array.sum(axis=2), 1, rtol=1e-6)


def test_one_iteration_couples_uniformly():
    _, c = nets.dynamic_routing(random_u_hat(), 1)
    numpy.testing.assert_allclose(c.array, 0.25, rtol=1e-6)


def test_more_iterations_move_coupling_towards_agreement():
    _, c = nets.dynamic_routing(random_u_hat(), 3)
    assert c.array.std() > 1e-3


def test_routing_logits_start_at_zero_for_every_sample():
    u_hat = random_u_hat(batch=4)
    v_batch, c_batch = nets.dynamic_routing(u_hat, 3)
    v_alone, c_alone = nets.dynamic_routing(u_hat[2:3], 3)
    numpy.testing.assert_allclose(v_batch.array[2:3], v_alone.array,
                                  rtol=1e-5, atol=1e-7)
    numpy.testing.assert_allclose(c_batch.array[2:3], c_alone.array,
                                  rtol=1e-5, atol=1e-7)


def test_prediction_vectors_apply_one_matrix_per_capsule_pair():
    rng = numpy.random.RandomState(1)
    u = rng.randn(2, 3, 8).astype(numpy.float32)
    W = rng.randn(3, 4, 16, 8).astype(numpy.float32)
    u_hat = nets.prediction_vectors(variable(u), variable(W)).array
    expected = numpy.einsum('ijdk,bik->bijd', W, u)
    numpy.testing.assert_allclose(u_hat, expected, rtol=1e-5, atol=1e-5)


# -- losses and masking ------------------------------------------------------

def test_margin_loss_by_hand():
    lengths = variable([[0.95, 0.3, 0.05], [0.5, 0.2, 0.8]])
    t = numpy.array([0, 2], dtype=numpy.int32)
    # sample 0: present 0.95 >= 0.9 -> 0; absent 0.3 -> .5*.2^2 = .02;
    #           absent 0.05 <= 0.1 -> 0
    # sample 1: absent .5 -> .5*.4^2 = .08; absent .2 -> .5*.1^2 = .005;
    #           present .8 -> .1^2 = .01
    expected = (0.02 + 0.08 + 0.005 + 0.01) / 2
    assert float(nets.margin_loss(lengths, t).array) == \
        pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_is_summed_squared_error_averaged_over_batch():
    x = numpy.zeros((2, 1, 2, 2), dtype=numpy.float32)
    reconstruction = variable([[0.5, 0.5, 0, 0], [1, 0, 0, 0]])
    # (0.25 + 0.25 + 1) / 2
    assert float(nets.reconstruction_loss(reconstruction, x).array) == \
        pytest.approx(0.75)


def test_mask_keeps_only_the_labelled_capsule():
    v = variable(numpy.arange(2 * 3 * 2).reshape(2, 3, 2))
    masked = nets.mask(v, numpy.array([1, 2])).array
    numpy.testing.assert_array_equal(
        masked, [[0, 0, 2, 3, 0, 0], [0, 0, 0, 0, 10, 11]])


# -- the network ---------------------------------------------------------------

@pytest.mark.parametrize('options, expected', [
    ({}, 8215568),
    ({'share_weights': True}, 6781968),
    ({'reconstruct': False}, 6804224),
])
def test_parameter_count(options, expected):
    assert nets.count_parameters(nets.CapsNet(**options)) == expected


@pytest.mark.parametrize('size, grid', [(28, 6), (36, 10), (40, 12)])
def test_primary_grid_and_output_shapes_for_each_input_size(size, grid):
    assert nets.primary_grid(size) == grid
    model = nets.CapsNet(input_size=size, routing=1)
    x = numpy.random.rand(2, 1, size, size).astype(numpy.float32)
    with chainer.no_backprop_mode():
        u = model.primary_capsules(x)
        v = model.capsules(x)
        recon = model.reconstruction(v, numpy.array([1, 2]))
    assert u.shape == (2, 32 * grid * grid, 8)
    assert v.shape == (2, 10, 16)
    assert recon.shape == (2, size * size)


def test_primary_capsules_are_squashed():
    model = nets.CapsNet(fast=False)
    x = numpy.random.rand(2, 1, 28, 28).astype(numpy.float32)
    with chainer.no_backprop_mode():
        u = model.primary_capsules(x).array
    assert (numpy.linalg.norm(u, axis=2) < 1).all()


def test_forward_reports_losses_and_uses_true_then_predicted_label():
    numpy.random.seed(0)
    model = nets.CapsNet(routing=1)
    x = numpy.random.rand(4, 1, 28, 28).astype(numpy.float32)
    t = numpy.array([0, 1, 2, 3], dtype=numpy.int32)
    for train in (True, False):
        reporter = chainer.Reporter()
        reporter.add_observer('main', model)
        observation = {}
        with reporter.scope(observation), \
                chainer.using_config('train', train):
            loss = model(x, t)
        v = model.capsules(x)
        labels = t if train else model.lengths(v).array.argmax(1)
        expected = nets.reconstruction_loss(model.reconstruction(v, labels),
                                            x)
        assert set(observation) >= {'main/loss', 'main/margin_loss',
                                    'main/reconstruction_loss',
                                    'main/accuracy'}
        assert float(observation['main/reconstruction_loss'].array) == \
            pytest.approx(float(expected.array), rel=1e-5)
        assert float(loss.array) == pytest.approx(
            float(observation['main/margin_loss'].array)
            + 0.0005 * float(expected.array), rel=1e-5)


def test_invalid_options_raise_clear_errors():
    with pytest.raises(ValueError, match='routing'):
        nets.CapsNet(routing=0)
    with pytest.raises(ValueError, match='activation'):
        nets.CapsNet(activation='tanh')
    with pytest.raises(ValueError, match='input_size'):
        nets.CapsNet(input_size=20)


# -- model files -----------------------------------------------------------------

def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    numpy.random.seed(3)
    model = nets.CapsNet(routing=2, activation='leaky_relu', leaky_slope=0.1)
    path = str(tmp_path / 'model.npz')
    files.save_model(path, model)
    loaded = files.load_model(path, nets.ARCHITECTURES)
    assert loaded.options == model.options
    x = numpy.random.rand(5, 1, 28, 28).astype(numpy.float32)
    prediction, lengths = model.predict(x)
    prediction2, lengths2 = loaded.predict(x)
    numpy.testing.assert_array_equal(prediction, prediction2)
    numpy.testing.assert_array_equal(lengths, lengths2)
    assert [p for p in tmp_path.iterdir()] == [tmp_path / 'model.npz']


# -- the two recipes: the paper's and the authors' code's -------------------

def _fixed_batch(n=3):
    rs = numpy.random.RandomState(5)
    return (rs.rand(n, 1, 28, 28).astype(numpy.float32),
            numpy.array([3, 0, 7][:n], dtype=numpy.int32))


def test_the_paper_recipe_is_the_default_and_records_nothing_new():
    numpy.random.seed(0)
    default = nets.CapsNet()
    numpy.random.seed(0)
    paper = nets.build('capsnet', 'paper')
    assert default.options == paper.options
    assert not {'digit_bias', 'primary_scale', 'init', 'margin_scale'} & \
        set(paper.options)
    assert nets.count_parameters(paper) == 8215568
    for (name, a), (_, b) in zip(sorted(default.namedparams()),
                                 sorted(paper.namedparams())):
        numpy.testing.assert_array_equal(a.array, b.array, err_msg=name)
    assert float(paper.W.array.std()) == pytest.approx(0.01, rel=0.02)
    assert not paper.conv1.b.array.any() and not paper.primary.b.array.any()


def test_the_official_recipe_has_the_authors_initial_statistics():
    numpy.random.seed(0)
    model = nets.build('capsnet', 'official')
    assert nets.count_parameters(model) == 8215568 + 10 * 16  # b_j
    assert model.options['digit_bias'] is True
    # truncated normals: redrawn beyond two sigmas, so the std is 0.88 sigma
    for array, sigma in ((model.W.array, 0.1), (model.conv1.W.array, 0.05),
                         (model.primary.W.array, 0.1),
                         (model.decoder.fc1.W.array, 0.1)):
        assert numpy.abs(array).max() <= 2 * sigma
        assert float(array.std()) == pytest.approx(0.8796 * sigma, rel=0.03)
    for bias in (model.conv1.b, model.primary.b, model.digit_b,
                 model.decoder.fc3.b):
        numpy.testing.assert_allclose(bias.array, 0.1)


def test_the_official_loss_on_a_fixed_batch_is_the_authors_formula():
    """layers.py: 0.5 x (T relu(0.9 - l)^2 + 0.5 (1 - T) relu(l - 0.1)^2)
    averaged over batch AND classes, plus 0.0005 x the pixel sum averaged
    over the batch: 0.05 x Eq. 4 + 0.0005 x the reconstruction error."""
    x, t = _fixed_batch()
    numpy.random.seed(0)
    model = nets.build('capsnet', 'official')
    with chainer.using_config('train', True):
        loss = float(model(x, t).array)
        v = model.capsules(x)
        lengths = model.lengths(v).array.astype(numpy.float64)
        recon = float(nets.reconstruction_loss(model.reconstruction(v, t),
                                               x).array)
    present = numpy.eye(10)[t]
    logits = lengths - 0.5
    authors = numpy.mean(
        0.5 * present * (logits < 0.4) * (logits - 0.4) ** 2
        + 0.5 * 0.5 * (1 - present) * (logits > -0.4) * (logits + 0.4) ** 2)
    assert loss == pytest.approx(authors + 0.0005 * recon, rel=1e-5)
    eq4 = float(nets.margin_loss(model.lengths(v), t).array)
    assert authors == pytest.approx(0.05 * eq4, rel=1e-5)


@pytest.mark.parametrize('fast', [True, False])
def test_the_official_primary_capsules_are_conv_over_32_plus_bias(fast):
    x, _ = _fixed_batch(2)
    numpy.random.seed(0)
    model = nets.build('capsnet', 'official')
    model.fast = fast
    with chainer.using_config('train', False):
        u = model.primary_capsules(x).array
        h = F.relu(model.conv1(x))
        pre = F.convolution_2d(h, model.primary.W, stride=2).array / 32 + \
            model.primary.b.array[None, :, None, None]
    s = pre.reshape(2, 32, 8, 6, 6).transpose(0, 1, 3, 4, 2).reshape(
        2, 1152, 8)
    numpy.testing.assert_allclose(u, nets.squash(s).array, rtol=1e-4,
                                  atol=1e-6)


def test_the_official_digit_bias_is_in_every_iteration_on_both_paths():
    rs = numpy.random.RandomState(1)
    u = rs.randn(2, 12, 8)
    W = rs.randn(12, 10, 16, 8) * 0.1
    b = rs.randn(10, 16)
    for r in (1, 2, 3):
        fast, _ = routing.digit_capsules(u, W, r, b)
        plain, _ = nets.dynamic_routing(nets.prediction_vectors(u, W), r, b)
        numpy.testing.assert_allclose(fast.array, plain.array, rtol=1e-12)
    # and b's gradient through all three iterations
    gradient_check.check_backward(
        lambda u, W, b: routing.digit_capsules(u, W, 3, b)[0], (u, W, b),
        rs.randn(2, 10, 16), dtype=numpy.float64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('options', [
    {},
    {'routing': 1},
    {'share_weights': True, 'activation': 'leaky_relu', 'leaky_slope': 0.1},
    {'input_size': 36, 'routing': 2},
])
def test_fast_path_equals_plain_path(options):
    """Same loss and same gradient for every parameter, float32 tolerance."""
    numpy.random.seed(0)
    model = nets.CapsNet(**options)
    size = model.input_size
    x = numpy.random.rand(3, 1, size, size).astype(numpy.float32)
    t = numpy.array([1, 5, 7], dtype=numpy.int32)
    results = both_paths(model, x, t)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        fast_grad = results[True][1][name]
        scale = numpy.abs(grad).max() + 1e-12
        assert numpy.abs(fast_grad - grad).max() / scale < 1e-4, name


class CountFunctions(chainer.FunctionHook):
    """Counts the function nodes run forward."""
    name = 'CountFunctions'

    def __init__(self):
        self.forward = 0

    def forward_preprocess(self, function, in_data):
        self.forward += 1


@pytest.mark.parametrize('hwbc', [True, False])
def test_fast_training_step_runs_few_function_nodes(hwbc):
    """Chainer's per-node host time is what a GPU step waits for. A
    forward pass of the paper's model (r = 3, decoder) on the fast path is
    11 function nodes with Chainer's convolutions, as on the GPU, and 14
    with the CPU's (the plain path: 103 and 106); the count is the same
    whichever device runs it."""
    model = nets.CapsNet(routing=3, reconstruct=True)
    model._hwbc_convolutions = lambda: hwbc
    x = numpy.random.RandomState(0).rand(2, 1, 28, 28).astype(numpy.float32)
    t = numpy.array([1, 5], dtype=numpy.int32)
    counts = {}
    for fast in (True, False):
        model.fast = fast
        with CountFunctions() as hook:
            model(x, t)
        counts[fast] = hook.forward
    assert counts[True] <= (14 if hwbc else 11), counts
    assert counts[False] > 5 * counts[True], counts


def test_fast_path_is_chosen_on_the_cpu_and_can_be_turned_off():
    model = nets.CapsNet()
    assert model._use_fast()
    model.fast = False
    assert not model._use_fast()


# -- the baseline CNN (BaselineCNN, PoolingCNN) ------------------------------

PAPER_COUNT = 35445522  # the docstring's sum, checked term by term below


def baseline_parameter_count(input_size=28, n_classes=10):
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
def baseline_model():
    numpy.random.seed(0)
    return nets.BaselineCNN()


def baseline_images(n, side=28, seed=0):
    rng = numpy.random.RandomState(seed)
    x = rng.uniform(0, 1, (n, 1, side, side)).astype(numpy.float32)
    t = rng.randint(0, 10, n).astype(numpy.int32)
    return x, t


def test_baseline_parameter_count_is_the_papers(baseline_model):
    expected = (1 * 256 * 25 + 256 + 256 * 256 * 25 + 256
                + 256 * 128 * 25 + 128 + 100352 * 328 + 328
                + 328 * 192 + 192 + 192 * 10 + 10)
    assert nets.count_parameters(baseline_model) == expected == PAPER_COUNT
    assert baseline_parameter_count() == expected
    assert round(nets.count_parameters(baseline_model) / 1e6, 1) == 35.4  # "35.4M"
    assert '35,445,522' in nets.BaselineCNN.__doc__
    assert baseline_model.fc1.W.shape == (328, 28 * 28 * 128)


def test_baseline_layers(baseline_model):
    for conv, (c_in, c_out) in zip(
            (baseline_model.conv1, baseline_model.conv2, baseline_model.conv3),
            ((1, 256), (256, 256), (256, 128))):
        assert conv.W.shape == (c_out, c_in, 5, 5)
        assert conv.stride == (1, 1) and conv.pad == (2, 2)
    assert baseline_model.fc2.W.shape == (192, 328)
    assert baseline_model.fc3.W.shape == (10, 192)


def test_baseline_parameter_count_other_sizes():
    for side in (8, 13):
        m = nets.BaselineCNN(input_size=side)
        assert nets.count_parameters(m) == baseline_parameter_count(side)


def test_baseline_registered_in_nets():
    assert nets.BaselineCNN is nets.BaselineCNN
    assert nets.ARCHITECTURES['baseline'] is nets.BaselineCNN
    assert nets.BaselineCNN.arch == 'baseline'
    assert json.loads(json.dumps(nets.BaselineCNN(input_size=8).options)
                      ) == dict(input_size=8, n_classes=10, dropout=0.5)


def test_baseline_forward_loss_and_report(baseline_model):
    x, t = baseline_images(3)
    observation = {}
    reporter = chainer.Reporter()
    reporter.add_observer('main', baseline_model)
    with reporter.scope(observation):
        loss = baseline_model(x, t)
    assert loss.shape == ()
    assert numpy.isfinite(float(loss.array))
    assert set(observation) == {'main/loss', 'main/accuracy'}
    assert 0 <= float(observation['main/accuracy']) <= 1
    baseline_model.cleargrads()
    loss.backward()
    assert baseline_model.conv1.W.grad is not None
    assert numpy.abs(baseline_model.fc3.W.grad).sum() > 0


def test_baseline_predict(baseline_model):
    x, _ = baseline_images(4, seed=1)
    predictions, probabilities = baseline_model.predict(x)
    assert predictions.shape == (4,)
    assert probabilities.shape == (4, 10)
    numpy.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    numpy.testing.assert_array_equal(predictions,
                                     probabilities.argmax(axis=1))
    # inference mode: no dropout, so the same answer twice
    numpy.testing.assert_array_equal(baseline_model.predict(x)[1], probabilities)
    # flat (B, S*S) baseline_images are accepted too
    numpy.testing.assert_allclose(baseline_model.predict(x.reshape(4, -1))[1],
                                  probabilities, rtol=1e-6)


def test_baseline_dropout_only_in_training():
    numpy.random.seed(1)
    m = nets.BaselineCNN(input_size=8, dropout=0.5)
    x, _ = baseline_images(5, side=8)
    with chainer.using_config('train', True):
        a, b = m.logits(x).array, m.logits(x).array
    assert not numpy.array_equal(a, b)
    with chainer.using_config('train', False):
        a, b = m.logits(x).array, m.logits(x).array
    numpy.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        nets.BaselineCNN(dropout=1.0)


def test_baseline_save_load_round_trip(tmp_path):
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
    x, _ = baseline_images(3, side=12, seed=3)
    for a, b in zip(m.predict(x), loaded.predict(x)):
        numpy.testing.assert_array_equal(a, b)


def test_fast_baseline_equals_plain_in_float64():
    """The fast CPU path (HWBC, padded DFT convolutions) computes the same
    loss and gradients. Compared in float64: in float32 a single ReLU input
    within rounding of zero can take the other branch in one path, which
    moves a bias gradient by a visible fraction while both are right."""
    numpy.random.seed(0)
    assert_fast_equals_plain_in_float64(
        nets.BaselineCNN(dropout=0), numpy.random.rand(3, 1, 28, 28),
        numpy.array([1, 4, 9], dtype=numpy.int32))


def assert_fast_equals_plain_in_float64(model, x, t):
    """The model's loss and every gradient, in float64, alike on the fast
    and the plain path."""
    for param in model.params():
        param.array = param.array.astype(numpy.float64)
    results = both_paths(model, x, t)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    for name, grad in results[False][1].items():
        numpy.testing.assert_allclose(results[True][1][name], grad,
                                      rtol=1e-9, atol=1e-12, err_msg=name)


def test_fast_baseline_is_chosen_on_the_cpu():
    baseline_model = nets.BaselineCNN()
    assert baseline_model._use_fast()
    x = numpy.random.rand(2, 1, 28, 28).astype(numpy.float32)
    with chainer.no_backprop_mode(), chainer.using_config('train', False):
        fast = baseline_model.logits(x).array
        baseline_model.fast = False
        plain = baseline_model.logits(x).array
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
    assert_fast_equals_plain_in_float64(
        model, numpy.random.rand(3, 1, 16, 16),
        numpy.array([0, 5, 7], dtype=numpy.int32))


# -- the two-digit networks (MultiMNIST): objective, evaluation, counts ----

def test_two_hot_marks_both_labels():
    got = nets.two_hot(numpy.array([0, 3]), numpy.array([9, 4]), 10)
    want = numpy.zeros((2, 10), numpy.float32)
    want[0, [0, 9]] = want[1, [3, 4]] = 1
    assert (got == want).all()


def test_margin_loss_with_both_classes_present_by_hand():
    lengths = numpy.zeros((1, 10), numpy.float32)
    lengths[0, 2], lengths[0, 5], lengths[0, 7] = 0.95, 0.5, 0.3
    present = nets.two_hot(numpy.array([2]), numpy.array([5]), 10)
    # present 2: max(0, 0.9 - 0.95)^2 = 0; present 5: (0.9 - 0.5)^2 = 0.16
    # absent 7: 0.5 * (0.3 - 0.1)^2 = 0.02; absent zeros: 0
    loss = nets.margin_loss_present(chainer.Variable(lengths), present)
    assert float(loss.array) == pytest.approx(0.16 + 0.02, abs=1e-6)


def test_margin_loss_present_with_one_label_is_the_old_margin_loss():
    rs = numpy.random.RandomState(0)
    lengths = rs.uniform(0, 1, (4, 10)).astype(numpy.float32)
    t = numpy.array([1, 0, 9, 4], numpy.int32)
    one = nets.margin_loss(chainer.Variable(lengths), t).array
    same = nets.margin_loss_present(chainer.Variable(lengths),
                                    nets.two_hot(t, t, 10)).array
    assert float(one) == pytest.approx(float(same))


def test_top2_and_pair_correct_on_hand_made_lengths():
    lengths = numpy.array([
        [0.1, 0.9, 0.8, 0, 0, 0, 0, 0, 0, 0],    # top 1, 2
        [0.7, 0.1, 0.1, 0, 0, 0, 0, 0, 0, 0.9],  # top 9, 0
        [0.1, 0.9, 0.2, 0.8, 0, 0, 0, 0, 0, 0],  # top 1, 3
        [0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0],    # ties: 0, 1
    ], numpy.float32)
    assert nets.top2(lengths).tolist() == [[1, 2], [9, 0], [1, 3], [0, 1]]
    t1 = numpy.array([2, 0, 1, 0])
    t2 = numpy.array([1, 9, 2, 2])
    # right in either order; one of two right is wrong
    assert nets.pair_correct(lengths, t1, t2).tolist() == [
        True, True, False, False]


def small_batch(b=2, side=36):
    rs = numpy.random.RandomState(0)
    x1 = rs.uniform(0, 1, (b, 1, side, side)).astype(numpy.float32)
    x2 = rs.uniform(0, 1, (b, 1, side, side)).astype(numpy.float32)
    return (numpy.minimum(x1 + x2, 1), numpy.array([3, 1], numpy.int32),
            numpy.array([5, 7], numpy.int32), x1, x2)


def test_the_two_digit_capsnet_loss_is_margin_plus_both_reconstructions():
    numpy.random.seed(0)
    model = nets.TwoDigitCapsNet()
    x, t1, t2, x1, x2 = small_batch()
    loss = model(x, t1, t2, x1, x2)
    v = model.capsules(x)
    lengths = model.lengths(v)
    margin = nets.margin_loss_present(lengths, nets.two_hot(t1, t2, 10))
    recon = (nets.reconstruction_loss(model.reconstruction(v, t1), x1)
             + nets.reconstruction_loss(model.reconstruction(v, t2), x2))
    assert model.decoder.fc3.W.shape == (36 * 36, 1024)
    assert float(loss.array) == pytest.approx(
        float(margin.array) + 0.0005 * float(recon.array), rel=1e-4)
    loss.backward()  # gradients reach every parameter
    assert all(p.grad is not None for p in model.params())
    top, _ = model.predict(x)
    assert top.shape == (2, 2)


def test_the_two_digit_baseline_trains_on_both_labels():
    numpy.random.seed(0)
    model = nets.TwoDigitBaselineCNN()
    x, t1, t2, x1, x2 = small_batch()
    loss = model(x, t1, t2, x1, x2)
    assert numpy.isfinite(float(loss.array))
    assert model.predict(x)[0].shape == (2, 2)


def test_parameter_counts_against_the_paper():
    count = nets.count_parameters
    # Section 6: "11.36M" parameters for the MultiMNIST CapsNet
    caps = nets.TwoDigitCapsNet()
    conv1, primary = 256 * 81 + 256, 256 * 256 * 81 + 256
    W = 32 * 10 * 10 * 10 * 16 * 8  # 3200 primary capsules x 10 classes
    decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 1296 + 1296)
    assert count(caps) == conv1 + primary + W + decoder == 11361808
    assert round(count(caps) / 1e6, 2) == 11.36
    # the baseline as the authors' conv_model.py builds it (ConvModel:
    # _add_convs with channels [1, 512, 256], 5 x 5 SAME, each followed by
    # a 2 x 2 stride-2 SAME max pooling: 36 -> 18 -> 9; FC 1024; FC 10)
    base = nets.TwoDigitBaselineCNN()
    convs = (5 * 5 * 1 * 512 + 512) + (5 * 5 * 512 * 256 + 256)
    fc = (9 * 9 * 256 * 1024 + 1024) + (1024 * 10 + 10)
    assert count(base) == convs + fc == 24535306
    assert round(count(base) / 1e6, 2) == 24.54   # the paper: 24.56M
    assert base.fc1.W.shape == (1024, 9 * 9 * 256)
    # the earlier layout, kept for its files: valid convolutions 36 -> 24
    legacy = nets.LegacyTwoDigitBaselineCNN()
    convs = (25 * 256 + 256) + (256 * 256 * 25 + 256) + (256 * 128 * 25
                                                         + 128)
    fc = (128 * 24 * 24 * 328 + 328) + (328 * 192 + 192) + (192 * 10 + 10)
    assert count(legacy) == convs + fc == 26712850
    # Section 5.2: CNN of similar size to CapsNet on 40 x 40
    assert count(nets.PoolingCNN()) == 12445386
    assert count(nets.CapsNet(input_size=40, reconstruct=False)) == 11227904
    assert count(nets.CapsNet(input_size=40)) == 13475648


def test_the_baselines_fast_path_equals_the_plain_one_in_float64():
    """The authors' baseline on the CPU kernels (HWBC, pooling by reshape)
    gives the plain path's loss and gradients; odd sides pool as TF's SAME
    (ceil) on the plain path."""
    numpy.random.seed(1)
    model = nets.TwoDigitBaselineCNN(input_size=16)
    assert model._use_fast()
    for param in model.params():
        param.array = param.array.astype(numpy.float64)
    x = numpy.random.rand(3, 1, 16, 16)
    t1, t2 = numpy.array([0, 5, 7], numpy.int32), numpy.array(
        [1, 2, 3], numpy.int32)
    results = {}
    for fast in (True, False):
        model.fast = fast
        model.cleargrads()
        loss = model(x, t1, t2)
        loss.backward()
        results[fast] = float(loss.array), {
            name: p.grad.copy() for name, p in model.namedparams()}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    for name, grad in results[False][1].items():
        numpy.testing.assert_allclose(results[True][1][name], grad,
                                      rtol=1e-9, atol=1e-12, err_msg=name)
    odd = nets.TwoDigitBaselineCNN(input_size=18)   # 18 -> 9 -> 5
    assert not odd._use_fast() and odd.fc1.W.shape == (1024, 5 * 5 * 256)
    assert odd.predict(numpy.random.rand(2, 1, 18, 18).astype(
        numpy.float32))[0].shape == (2, 2)


def test_a_file_of_the_earlier_baseline_still_loads(tmp_path):
    numpy.random.seed(0)
    for model, cls in ((nets.LegacyTwoDigitBaselineCNN(input_size=28),
                        nets.LegacyTwoDigitBaselineCNN),
                       (nets.TwoDigitBaselineCNN(input_size=16),
                        nets.TwoDigitBaselineCNN)):
        path = str(tmp_path / (cls.__name__ + '.npz'))
        files.save_model(path, model)
        loaded = files.load_model(path, nets.ARCHITECTURES)
        assert type(loaded) is cls and loaded.arch == model.arch
        assert (loaded.fc1.W.array == model.fc1.W.array).all()
    assert nets.LegacyTwoDigitBaselineCNN.arch == 'baseline-multimnist'
    assert nets.TwoDigitBaselineCNN.arch == 'baseline-multimnist-conv'


def test_the_starred_column_is_neither_label_nor_prediction():
    lengths = numpy.array([
        [0.9, 0.8, 0.7, 0.1, 0, 0, 0, 0, 0, 0.05],   # labels 0, 2; pred 0, 1
        [0.1, 0.2, 0.3, 0.9, 0.95, 0.3, 0, 0, 0, 0],  # right; tie 2 and 5
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9],  # wrong: 9, 0
    ], numpy.float32)
    t1, t2 = numpy.array([0, 4, 3]), numpy.array([2, 3, 7])
    predicted = nets.top2(lengths)
    forced = nets.forced_class(lengths, t1, t2, predicted)
    assert forced.tolist() == [3, 2, 1]
    for k, c in enumerate(forced):
        assert c not in (t1[k], t2[k]) and c not in predicted[k]
    with pytest.raises(ValueError, match='no class is left'):
        # four classes, all taken by the labels 0, 1 and the prediction 2, 3
        nets.forced_class(lengths[:1, :4], numpy.array([0]),
                          numpy.array([1]), numpy.array([[2, 3]]))


def test_a_two_digit_model_file_round_trips(tmp_path):
    numpy.random.seed(0)
    model = nets.TwoDigitCapsNet(reconstruct=False)
    path = str(tmp_path / 'm.npz')
    files.save_model(path, model)
    loaded = files.load_model(path, nets.ARCHITECTURES)
    assert type(loaded) is nets.TwoDigitCapsNet
    assert (loaded.W.array == model.W.array).all()
