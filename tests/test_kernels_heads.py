"""capsnet.kernels.heads: each fused capsule head (squash, lengths, the
margin loss, the decoder) against the plain functions it replaces, with
gradient checks."""

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import gradient_check
from capsnet.kernels import heads
import nets
from conftest import random


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
