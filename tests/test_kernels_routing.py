"""capsnet.kernels.routing: digit capsules (prediction vectors, routing by
agreement, squash) against the plain path with gradient checks, and the
CuPy kernels' bodies run on the CPU by NumPy stand-ins."""

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import gradient_check
from capsnet.kernels import KernelOptions, convolution, routing
import nets
from conftest import both_paths, random


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
