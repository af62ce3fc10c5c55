"""The MultiMNIST objective and evaluation on hand-made cases, and the
parameter counts of the paper's other networks."""
import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import files
import nets
from capsnet.errors import CapsNetError


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


def test_single_digit_tools_refuse_a_multimnist_model(tmp_path, capsys):
    numpy.random.seed(0)
    path = str(tmp_path / 'm.npz')
    files.save_model(path, nets.TwoDigitCapsNet(reconstruct=False))
    with pytest.raises(CapsNetError) as e:
        files.load_model_or_fail(path, nets.ARCHITECTURES,
                                 purpose='predict.py')
    assert e.value.status == 1
    message = str(e.value)
    assert message.count('\n') == 0
    assert 'MultiMNIST model' in message
    assert 'predict.py works on single' in message
