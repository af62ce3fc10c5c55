"""The paper's units (squash, routing, losses, masking) and the CapsNet."""
import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
import chainer.functions as F
from chainer import gradient_check

from capsnet import files
from capsnet.kernels import routing
import nets


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


def test_load_errors_are_one_clear_line(tmp_path):
    missing = str(tmp_path / 'nope.npz')
    with pytest.raises(files.ModelFileError, match='does not exist'):
        files.load_model(missing, nets.ARCHITECTURES)
    path = str(tmp_path / 'model.npz')
    files.save_model(path, nets.CapsNet(routing=1))
    data = open(path, 'rb').read()
    truncated = str(tmp_path / 'truncated.npz')
    with open(truncated, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(files.ModelFileError, match='truncated or corrupt') \
            as error:
        files.load_model(truncated, nets.ARCHITECTURES)
    assert '\n' not in str(error.value)
    foreign = str(tmp_path / 'foreign.npz')
    numpy.savez(foreign, W=numpy.zeros(3))
    with pytest.raises(files.ModelFileError, match='not a model file'):
        files.load_model(foreign, nets.ARCHITECTURES)
    with pytest.raises(files.ModelFileError, match='routing=1 in the file'):
        files.load_model(path, nets.ARCHITECTURES, expected_options={'routing': 3})


def test_interrupted_save_leaves_the_earlier_model_intact(tmp_path,
                                                          monkeypatch):
    path = str(tmp_path / 'model.npz')
    files.save_model(path, nets.CapsNet(routing=1))
    before = open(path, 'rb').read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing')

    monkeypatch.setattr(numpy, 'savez_compressed', crash)
    with pytest.raises(KeyboardInterrupt):
        files.save_model(path, nets.CapsNet(routing=2))
    assert open(path, 'rb').read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.npz']
    assert files.load_model(path, nets.ARCHITECTURES).options['routing'] == 1


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
