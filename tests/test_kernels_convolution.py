"""capsnet.kernels.convolution: the CPU convolutions (im2col and DFT) and
the GPU's optional NCHW node (run on the CPU) against Chainer's, with
gradient checks; the fixed-weights transform cache; keep_freed_memory."""

import os
import platform
import subprocess
import sys

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import gradient_check
import chainer.functions as F
from capsnet.kernels import convolution
import nets
from conftest import random


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
