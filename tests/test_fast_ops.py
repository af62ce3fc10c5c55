"""The fast CPU kernels: gradient checks and agreement with the plain path."""
import os
import platform
import subprocess
import sys

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
import chainer.functions as F
from chainer import gradient_check

from capsnet.kernels import KernelOptions, convolution, heads, routing
import nets
from conftest import both_paths


def random(*shape, seed=0, scale=1.0):
    return numpy.random.RandomState(seed).randn(*shape) * scale


def reference_convolution(x, W, b, stride):
    """Chainer's own convolution on (H, W, B, C) data, as (OH, OW, B, O)."""
    x_nchw = numpy.ascontiguousarray(x.transpose(2, 3, 0, 1))
    y = chainer.functions.convolution_2d(x_nchw, W, b, stride=stride).array
    return y.transpose(2, 3, 0, 1)


@pytest.mark.parametrize('method', ['im2col', 'dft'])
@pytest.mark.parametrize('height, width, kernel, stride', [
    (9, 9, 3, 1), (11, 10, 5, 2), (12, 13, 4, 3), (20, 20, 9, 2)])
def test_convolution_matches_chainer(method, height, width, kernel, stride):
    x = random(height, width, 2, 3).astype(numpy.float32)
    W = random(4, 3, kernel, kernel, seed=1).astype(numpy.float32)
    b = random(4, seed=2).astype(numpy.float32)
    y = convolution.conv2d_hwbc(x, W, b, stride, method).array
    numpy.testing.assert_allclose(
        y, reference_convolution(x, W, b, stride), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('method', ['im2col', 'dft'])
@pytest.mark.parametrize('height, width, kernel, stride', [
    (7, 7, 3, 1), (10, 9, 5, 2)])
def test_convolution_gradient_check(method, height, width, kernel, stride):
    x = random(height, width, 2, 3)
    W = random(2, 3, kernel, kernel, seed=1)
    b = random(2, seed=2)
    out_h = (height - kernel) // stride + 1
    out_w = (width - kernel) // stride + 1
    gy = random(out_h, out_w, 2, 2, seed=3)
    gradient_check.check_backward(
        lambda x, W, b: convolution.conv2d_hwbc(x, W, b, stride, method),
        (x, W, b), gy, dtype=numpy.float64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('iterations', [1, 2, 3])
def test_digit_capsules_gradient_check(iterations):
    u = random(2, 6, 4, scale=0.5)
    W = random(6, 3, 5, 4, seed=1, scale=0.5)
    gy = random(2, 3, 5, seed=2)
    gradient_check.check_backward(
        lambda u, W: routing.digit_capsules(u, W, iterations)[0],
        (u, W), gy, dtype=numpy.float64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('iterations', [1, 3])
def test_digit_capsules_match_plain_routing(iterations):
    u = random(3, 12, 8, scale=0.3).astype(numpy.float32)
    W = random(12, 10, 16, 8, seed=1, scale=0.3).astype(numpy.float32)
    v, c = routing.digit_capsules(u, W, iterations)
    v_ref, c_ref = nets.dynamic_routing(nets.prediction_vectors(u, W),
                                        iterations)
    numpy.testing.assert_allclose(v.array, v_ref.array, rtol=1e-4,
                                  atol=1e-6)
    numpy.testing.assert_allclose(c, c_ref.array, rtol=1e-4, atol=1e-7)
    numpy.testing.assert_allclose(c.sum(axis=2), 1, rtol=1e-5)


@pytest.mark.parametrize('iterations', [1, 3])
def test_digit_capsules_contractions_agree(iterations, monkeypatch):
    """einsum (NumPy's choice) and broadcast-and-sum (CuPy's): the same
    output, coupling and gradients, and the broadcast form passes the
    gradient check on its own."""
    u = random(2, 6, 4, scale=0.5)
    W = random(6, 3, 5, 4, seed=1, scale=0.5)
    gy = random(2, 3, 5, seed=2)
    results = []
    for einsum in (True, False):
        u_var, W_var = chainer.Variable(u), chainer.Variable(W)
        v, c = routing.digit_capsules(u_var, W_var, iterations,
                                      options=KernelOptions(einsum=einsum))
        v.grad = gy
        v.backward()
        results.append((v.array, c, u_var.grad, W_var.grad))
    for with_einsum, broadcast in zip(*results):
        numpy.testing.assert_allclose(broadcast, with_einsum, rtol=1e-12,
                                      atol=1e-15)
    gradient_check.check_backward(
        lambda u, W: routing.digit_capsules(u, W, iterations)[0],
        (u, W), gy, dtype=numpy.float64, atol=1e-5, rtol=1e-4)


# -- the GPU's optional convolution node (GPU_CONVOLUTIONS), on the CPU ----

@pytest.mark.parametrize('x_shape, W_shape, stride', [
    ((3, 4, 11, 13), (5, 4, 3, 3), 1),
    ((3, 4, 11, 13), (5, 4, 3, 2), 2),
    ((2, 6, 20, 20), (8, 6, 9, 9), 2),       # PrimaryCaps' geometry
    ((2, 1, 28, 28), (4, 1, 9, 9), 1),       # conv1's
])
@pytest.mark.parametrize('dtype, tolerance', [
    (numpy.float64, dict(rtol=1e-12, atol=1e-12)),
    (numpy.float32, dict(rtol=1e-5, atol=1e-5))], ids=['float64', 'float32'])
def test_nchw_convolution_equals_chainers(x_shape, W_shape, stride, dtype,
                                          tolerance):
    inputs = [random(*x_shape), random(*W_shape, seed=1, scale=0.3),
              random(W_shape[0], seed=2)]
    results = []
    for function in (convolution.conv2d_nchw, F.convolution_2d):
        variables = [chainer.Variable(a.astype(dtype)) for a in inputs]
        y = function(*variables, stride=stride)
        y.grad = random(*y.shape, seed=3).astype(dtype)
        y.backward()
        results.append([y.array] + [v.grad for v in variables])
    for ours, chainers in zip(*results):
        assert ours.shape == chainers.shape and ours.dtype == dtype
        numpy.testing.assert_allclose(ours, chainers, **tolerance)


@pytest.mark.parametrize('stride', [1, 2])
def test_nchw_convolution_gradient_check(stride):
    x, W, b = random(2, 3, 8, 7), random(4, 3, 3, 3, seed=1), random(4, seed=2)
    gy = random(2, 4, (8 - 3) // stride + 1, (7 - 3) // stride + 1, seed=3)
    gradient_check.check_backward(
        lambda x, W, b: convolution.conv2d_nchw(x, W, b, stride=stride),
        (x, W, b), gy, dtype=numpy.float64, atol=1e-6, rtol=1e-5)


def test_convolution_nodes_check_the_channels_on_their_own_axis():
    from chainer.utils.type_check import InvalidType
    W, b = random(4, 3, 3, 3), random(4)
    with pytest.raises(InvalidType):
        convolution.conv2d_nchw(random(1, 2, 8, 8), W, b)       # 2 channels
    with pytest.raises(InvalidType):
        convolution.conv2d_hwbc(random(8, 8, 1, 2), W, b)
    assert convolution.conv2d_nchw(random(1, 3, 8, 8), W, b).shape == (
        1, 4, 6, 6)
    assert convolution.conv2d_hwbc(random(8, 8, 1, 3), W, b).shape == (
        6, 6, 1, 4)


# -- the CuPy kernels' arithmetic, run on the CPU --------------------------
#
# fast_ops keeps each GPU kernel's body as text. These stand-ins run that
# very text with NumPy (each C statement is also a Python one once its
# declaration and semicolon are dropped), so the bodies and the code that
# calls them (axes, broadcasting, argument order) are checked here; on a GPU
# tests/test_gpu.py checks the compiled kernels against the NumPy-API forms.

# the C functions the kernel bodies call
C_FUNCTIONS = {'sqrt': numpy.sqrt, 'exp': numpy.exp}


def elementwise_stand_in(in_params, out_params, body):
    names = [param.split()[-1] for param in in_params.split(',')]
    output = out_params.split()[-1]

    def kernel(*args):
        assert len(args) == len(names)
        scope = dict(zip(names, args))
        for statement in body.split(';'):
            statement = statement.strip()
            if statement.startswith('const T '):
                statement = statement[len('const T '):]
            if statement:
                exec(statement, C_FUNCTIONS, scope)
        return scope[output]
    return kernel


def sum_reduction_stand_in(in_params, out_params, map_expr, reduce_expr,
                           post_map_expr, identity):
    """A ReductionKernel that sums its map expression from 0."""
    assert (reduce_expr, post_map_expr, identity) == ('a + b', 'z = a', '0')
    names = [param.split()[-1] for param in in_params.split(',')]

    def kernel(*args, axis, keepdims=False):
        assert len(args) == len(names)
        mapped = eval(map_expr, C_FUNCTIONS, dict(zip(names, args)))
        return mapped.sum(axis=axis, keepdims=keepdims)
    return kernel


class StandInKernels:
    squash = staticmethod(elementwise_stand_in(*routing.SQUASH_KERNEL))
    squash_grad = staticmethod(elementwise_stand_in(
        *routing.SQUASH_GRAD_KERNEL))
    dot = staticmethod(sum_reduction_stand_in(*routing.DOT_KERNEL))
    exp_sum = staticmethod(sum_reduction_stand_in(*routing.EXP_SUM_KERNEL))
    softmax = staticmethod(elementwise_stand_in(*routing.SOFTMAX_KERNEL))
    softmax_grad = staticmethod(elementwise_stand_in(
        *routing.SOFTMAX_GRAD_KERNEL))

    @staticmethod
    def outer_sum(terms):
        return elementwise_stand_in(*routing.outer_sum_kernel(terms))


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """fast_ops takes its GPU-kernel branches, with the stand-ins, on
    NumPy arrays (and the broadcast contractions, as on CuPy)."""
    monkeypatch.setattr(routing, '_kernels_for',
                        lambda xp, options: StandInKernels)
    monkeypatch.setattr(routing, '_use_einsum', lambda xp, options: False)


def test_gpu_kernel_bodies_compute_squash_and_its_gradient(monkeypatch):
    s = random(4, 10, 16, scale=0.5).astype(numpy.float64)
    s[0, 0] = 0          # the gradient stays finite at zero
    gv = random(4, 10, 16, seed=1).astype(numpy.float64)
    expected = routing.squash_forward(s), routing.squash_backward(s, gv)
    monkeypatch.setattr(routing, '_kernels_for',
                        lambda xp, options: StandInKernels)
    actual = routing.squash_forward(s), routing.squash_backward(s, gv)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        numpy.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)
    assert numpy.isfinite(actual[1]).all()


def test_gpu_kernel_bodies_compute_the_softmax_and_its_gradient(
        monkeypatch):
    # float64 logits near 1000: exp overflows there unless the maximum is
    # taken out first
    logits = random(5, 4, 10, scale=30).astype(numpy.float64) + 1000
    g_c, g_more = (random(5, 4, 10, seed=k).astype(numpy.float64)
                   for k in (1, 2))
    c = routing._softmax(logits, axis=2)

    def results():
        return (routing._softmax(logits, axis=2),
                routing._softmax_backward(c, g_c, 2),
                routing._softmax_backward(c, g_c, 2, g_more))
    expected = results()
    monkeypatch.setattr(routing, '_kernels_for',
                        lambda xp, options: StandInKernels)
    actual = results()
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert numpy.isfinite(a).all()
        numpy.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)
    numpy.testing.assert_allclose(actual[0].sum(axis=2), 1, rtol=1e-12)


@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_routing_starts_from_the_softmax_of_zero_logits_exactly(dtype):
    u = random(2, 6, 4, scale=0.5).astype(dtype)
    W = random(6, 3, 5, 4, seed=1, scale=0.5).astype(dtype)
    node = routing.DigitCapsules(1)
    node.apply((u, W))
    first = node.coupling.transpose(1, 0, 2)                 # (I, B, J)
    assert first.dtype == dtype
    numpy.testing.assert_array_equal(
        first, routing._softmax(numpy.zeros((6, 2, 3), dtype), axis=2))


def test_gpu_kernel_outer_sum_equals_the_batched_product(stand_in_kernels):
    weights = [random(6, 2, 3, seed=k) for k in range(5)]
    vectors = [random(2, 3, 4, seed=10 + k) for k in range(5)]
    numpy.testing.assert_allclose(
        routing.outer_sum(weights, vectors, batched_gemm=False),
        routing.outer_sum(weights, vectors, batched_gemm=True), rtol=1e-5)


@pytest.mark.parametrize('iterations', [1, 3])
def test_digit_capsules_with_gpu_kernel_bodies(iterations, stand_in_kernels):
    """The routing node through the kernels' branches: the plain path's
    output, coupling and gradients, and the gradient check."""
    u = random(2, 6, 4, scale=0.5)
    W = random(6, 3, 5, 4, seed=1, scale=0.5)
    gy = random(2, 3, 5, seed=2)
    u_var, W_var = chainer.Variable(u), chainer.Variable(W)
    v, c = routing.digit_capsules(u_var, W_var, iterations)
    v.grad = gy
    v.backward()
    u_ref, W_ref = chainer.Variable(u), chainer.Variable(W)
    v_ref, c_ref = nets.dynamic_routing(nets.prediction_vectors(u_ref, W_ref),
                                        iterations)
    v_ref.grad = gy
    v_ref.backward()
    for actual, expected in [(v.array, v_ref.array), (c, c_ref.array),
                             (u_var.grad, u_ref.grad),
                             (W_var.grad, W_ref.grad)]:
        numpy.testing.assert_allclose(actual, expected, rtol=1e-10,
                                      atol=1e-13)
    gradient_check.check_backward(
        lambda u, W: routing.digit_capsules(u, W, iterations)[0],
        (u, W), gy, dtype=numpy.float64, atol=1e-5, rtol=1e-4)


def test_squash_backward_is_finite_at_zero():
    s = numpy.zeros((2, 16))
    g = routing.squash_backward(s, numpy.ones_like(s))
    assert numpy.isfinite(g).all()
    assert numpy.all(routing.squash_forward(s) == 0)


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


# the capsule heads: each fused node against the plain functions it replaces

LABELS = numpy.array([2, 0, 3, 3], dtype=numpy.int32)
PRESENT = numpy.eye(4)[LABELS]


def plain_squash_capsules(x):
    """The GPU layout: (B, types * K, G, G) -> (B, types * G * G, K)."""
    h = chainer.functions.transpose(chainer.functions.reshape(
        x, (4, 2, 3, 2, 2)), (0, 1, 3, 4, 2))
    return nets.squash(chainer.functions.reshape(h, (4, 8, 3)))


def fused_squash_capsules(x):
    return heads.squash_capsules(x, (4, 2, 3, 2, 2), (0, 1, 3, 4, 2),
                                    (4, 8, 3))


HEADS = {
    # name: (fused function, plain function, input shape)
    'squash_capsules': (fused_squash_capsules, plain_squash_capsules,
                        (4, 6, 2, 2)),
    'margin_loss': (
        lambda v: heads.margin_loss(v, PRESENT, nets.M_PLUS, nets.M_MINUS,
                                       nets.LAMBDA_ABSENT)[0],
        lambda v: nets.margin_loss_present(nets.safe_norm(v, axis=2),
                                           PRESENT.astype(v.dtype)),
        (4, 4, 5)),
    'mask': (lambda v: heads.mask(v, LABELS),
             lambda v: nets.mask(v, LABELS), (4, 4, 5)),
    'squared_error': (
        lambda y: heads.squared_error(y, random(4, 1, 3, 3, seed=7)
                                         .astype(y.dtype)),
        lambda y: nets.reconstruction_loss(y, random(4, 1, 3, 3, seed=7)
                                           .astype(y.dtype)),
        (4, 9)),
}


def head_input(name, dtype=numpy.float64):
    x = random(*HEADS[name][2], seed=3) * 0.4
    if name == 'margin_loss':
        x[1] *= 0.1     # lengths around m- = 0.1 (the others around m+)
    return x.astype(dtype)


@pytest.mark.parametrize('name', sorted(HEADS))
def test_capsule_head_gradient_check(name):
    fused, _, _ = HEADS[name]
    x = head_input(name)
    y = fused(x)
    gy = numpy.asarray(random(*y.shape, seed=4))
    gradient_check.check_backward(fused, (x,), gy, dtype=numpy.float64,
                                  atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('dtype', [numpy.float64, numpy.float32])
@pytest.mark.parametrize('name', sorted(HEADS))
def test_capsule_head_matches_the_plain_functions(name, dtype):
    fused, plain, _ = HEADS[name]
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == numpy.float64 \
        else dict(rtol=1e-5, atol=1e-7)
    results = []
    for function in (fused, plain):
        x = chainer.Variable(head_input(name, dtype))
        y = function(x)
        y.grad = numpy.asarray(random(*y.shape, seed=4), dtype=dtype)
        y.backward()
        assert y.dtype == dtype and x.grad.dtype == dtype
        results.append((y.array, x.grad))
    for fused_array, plain_array in zip(*results):
        numpy.testing.assert_allclose(fused_array, plain_array, **tolerance)


def test_margin_loss_node_keeps_the_lengths():
    v = head_input('margin_loss')
    lengths = heads.margin_loss(v, PRESENT, 0.9, 0.1, 0.5)[1]
    numpy.testing.assert_allclose(
        lengths, nets.safe_norm(v, axis=2).array, rtol=1e-12)
    # the test input takes every branch of Eq. 4's two hinges
    present, absent = lengths[PRESENT == 1], lengths[PRESENT == 0]
    assert (present < 0.9).any() and (present > 0.9).any()
    assert (absent < 0.1).any() and (absent > 0.1).any()


def decoder_inputs(dtype, seed=0):
    """h (3, 20) and a nets.Decoder(20, 30) with random biases, in dtype."""
    numpy.random.seed(seed)
    chain = nets.Decoder(20, 30)
    for layer in (chain.fc1, chain.fc2, chain.fc3):
        layer.b.array[...] = random(*layer.b.shape, seed=seed + 1) * 0.1
    chain.to_device('@numpy')
    for parameter in chain.params():
        parameter.array = parameter.array.astype(dtype)
    return random(3, 20, seed=seed + 2).astype(dtype), chain


@pytest.mark.parametrize('dtype', [numpy.float64, numpy.float32])
def test_decoder_node_matches_the_decoder_chain(dtype):
    h, chain = decoder_inputs(dtype)
    results = []
    for fused in (True, False):
        x = chainer.Variable(h.copy())
        chain.cleargrads()
        y = heads.decoder(x, chain.layers()) if fused else chain(x)
        y.grad = random(*y.shape, seed=5).astype(dtype)
        y.backward()
        assert y.dtype == dtype
        results.append([y.array, x.grad] + [p.grad.copy()
                                            for p in chain.params()])
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == numpy.float64 \
        else dict(rtol=1e-5, atol=1e-7)
    for fused_array, plain_array in zip(*results):
        numpy.testing.assert_allclose(fused_array, plain_array, **tolerance)


def test_decoder_node_gradient_check():
    h, chain = decoder_inputs(numpy.float64, seed=3)
    params = [array.array for layer in chain.layers() for array in layer]

    def function(h, W1, b1, W2, b2, W3, b3):
        return heads.decoder(h, [(W1, b1), (W2, b2), (W3, b3)])

    gy = random(3, 30, seed=4)
    gradient_check.check_backward(function, (h, *params), gy,
                                  dtype=numpy.float64, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('variant', ['numpy-api', 'gpu-kernel-bodies',
                                     'gpu-convolutions'])
@pytest.mark.parametrize('options', [{}, {'share_weights': True,
                                          'routing': 2}])
def test_gpu_arrangement_of_the_fast_path_equals_plain_path(options, variant,
                                                            request,
                                                            monkeypatch):
    """On the GPU the fast path keeps Chainer's convolutions around the
    fused nodes; the same arrangement, run here on the CPU (also through
    the GPU kernels' branches, with their stand-ins, and with the optional
    NCHW convolution node instead of Chainer's)."""
    if variant == 'gpu-kernel-bodies':
        request.getfixturevalue('stand_in_kernels')
    convolutions = []
    conv2d_nchw = convolution.conv2d_nchw
    monkeypatch.setattr(convolution, 'conv2d_nchw', lambda *args, **kwargs: (
        convolutions.append(1), conv2d_nchw(*args, **kwargs))[1])
    numpy.random.seed(0)
    model = nets.CapsNet(**options)
    model.kernel_options = KernelOptions(
        gpu_convolutions=variant == 'gpu-convolutions')
    model._hwbc_convolutions = lambda: False
    x = numpy.random.rand(3, 1, 28, 28).astype(numpy.float32)
    t = numpy.array([1, 5, 7], dtype=numpy.int32)
    results = both_paths(model, x, t)
    # the two convolutions of the one fast pass went through the node
    assert len(convolutions) == (2 if variant == 'gpu-convolutions' else 0)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        scale = numpy.abs(grad).max() + 1e-12
        assert numpy.abs(results[True][1][name] - grad).max() / scale \
            < 1e-4, name


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


def test_fixed_weights_reuses_the_kernel_transform_exactly():
    numpy.random.seed(1)
    model = nets.CapsNet(routing=1)
    x = numpy.random.rand(2, 1, 28, 28).astype(numpy.float32)
    with chainer.no_backprop_mode():
        expected = model.capsules(x).array
        with convolution.fixed_weights():
            first = model.capsules(x).array
            assert len(convolution._kernel_transforms) == 1
            second = model.capsules(x).array
        assert convolution._kernel_transforms is None
        numpy.testing.assert_array_equal(first, expected)
        numpy.testing.assert_array_equal(second, expected)
        # outside the block a weight change is seen at once
        model.primary.W.array *= 2
        changed = model.capsules(x).array
    assert not numpy.allclose(changed, expected)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='keep_freed_memory sets glibc malloc options')
def test_keep_freed_memory_takes_on_glibc():
    # in a child process: the settings last for the life of the process
    result = subprocess.run(
        [sys.executable, '-c',
         'import numpy; from capsnet.kernels import convolution; '
         'ok = convolution.keep_freed_memory(); '
         'a = numpy.ones((64 << 20) // 4, numpy.float32); del a; '
         'b = numpy.ones((64 << 20) // 4, numpy.float32); '
         'print(ok, float(b.sum()))'],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', str(float((64 << 20) // 4))]
