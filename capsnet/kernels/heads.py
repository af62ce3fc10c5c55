"""Capsule heads and decoder: the primary capsules' squash, the margin loss
with the lengths, the mask, the decoder and the reconstruction error, one
Chainer FunctionNode each, written with the NumPy API alone (so on NumPy
and CuPy arrays alike). Same results as the plain path in ``nets``.
"""
import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import backend, function_node
from chainer.utils import type_check

from capsnet.kernels import DEFAULT
from capsnet.kernels.routing import EPSILON, squash_backward, squash_forward


# --------------------------------------------------------------------------
# Capsule heads and decoder: one node each, on both devices
# --------------------------------------------------------------------------
#
# Chainer spends tens of microseconds of host time on every function node,
# forward and backward, and on the GPU that host time, not the arithmetic,
# is what a training step waits for (docs/gpu.md). Stock functions spell
# the primary capsules' squash, the lengths with the margin loss, the mask,
# the decoder and the reconstruction error as 40 nodes; these five nodes do
# the same arithmetic with the NumPy API alone (so on NumPy and CuPy arrays
# alike).

class SquashCapsules(function_node.FunctionNode):
    """A convolution's output regrouped into capsules, then squashed (Eq. 1).

    Input: x of any layout holding B x I x K values. Output: (B, I, K),
    ``squash(x.reshape(split).transpose(axes).reshape(B, I, K))``.
    """

    def __init__(self, split, axes, capsule_shape, options=DEFAULT):
        self.split, self.axes = tuple(split), tuple(axes)
        self.options = options
        self.capsule_shape = tuple(capsule_shape)

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() == 1, in_types[0].dtype.kind == 'f')

    def forward(self, inputs):
        x, = inputs
        xp = backend.get_array_module(x)
        self.x_shape = x.shape
        self.s = xp.ascontiguousarray(
            x.reshape(self.split).transpose(self.axes)).reshape(
                self.capsule_shape)
        return squash_forward(self.s, self.options),

    def backward(self, indexes, grad_outputs):
        xp = backend.get_array_module(self.s)
        gs = squash_backward(self.s, grad_outputs[0].array, self.options)
        transposed = tuple(self.split[axis] for axis in self.axes)
        inverse = tuple(int(axis) for axis in numpy.argsort(self.axes))
        gx = xp.ascontiguousarray(gs.reshape(transposed).transpose(
            inverse)).reshape(self.x_shape)
        self.s = None
        return chainer.Variable(gx),


def squash_capsules(x, split, axes, capsule_shape, options=DEFAULT):
    """(B, I, K) squashed capsules from x, regrouped as in SquashCapsules."""
    return SquashCapsules(split, axes, capsule_shape, options).apply((x,))[0]


class MarginLoss(function_node.FunctionNode):
    """Eq. 4 from the digit capsules themselves: lengths and loss in one node.

    Input: v (B, J, D). Output: the scalar loss, summed over the classes and
    averaged over the batch. ``self.lengths`` keeps the lengths (B, J),
    sqrt(|v|^2 + eps) as ``nets.safe_norm``, for the accuracy.
    """

    def __init__(self, present, m_plus, m_minus, lambda_absent):
        self.present = present
        self.m_plus, self.m_minus = m_plus, m_minus
        self.lambda_absent = lambda_absent

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() == 1, in_types[0].dtype.kind == 'f',
                          in_types[0].ndim == 3)

    def forward(self, inputs):
        v, = inputs
        xp = backend.get_array_module(v)
        present = self.present.astype(v.dtype, copy=False)
        lengths = xp.sqrt((v * v).sum(axis=2) + v.dtype.type(EPSILON))
        short = xp.maximum(self.m_plus - lengths, 0)
        long = xp.maximum(lengths - self.m_minus, 0)
        absent = self.lambda_absent * (1 - present)
        loss = (present * short * short + absent * long * long).sum()
        batch = v.shape[0]
        # d loss / d length, per sample and class
        self.g_lengths = (2 / batch) * (absent * long - present * short)
        self.lengths = lengths
        self.retain_inputs((0,))
        # divided in the input's dtype on NumPy 1 and 2 alike (a NumPy 1
        # float32 scalar divided by an int gives float64)
        return xp.asarray(loss / v.dtype.type(batch), dtype=v.dtype),

    def backward(self, indexes, grad_outputs):
        v = self.get_retained_inputs()[0].array
        gy = grad_outputs[0].array
        scale = gy * self.g_lengths / self.lengths
        return chainer.Variable(scale[:, :, None] * v),


def margin_loss(v, present, m_plus, m_minus, lambda_absent):
    """(loss Variable, lengths (B, J) array) of digit capsules v (B, J, D)
    for the present classes (B, J) of 0 / 1."""
    node = MarginLoss(present, m_plus, m_minus, lambda_absent)
    loss, = node.apply((v,))
    return loss, node.lengths


class Mask(function_node.FunctionNode):
    """v (B, J, D) -> (B, J * D), zero but for each sample's chosen capsule."""

    def __init__(self, labels):
        self.labels = labels

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() == 1, in_types[0].ndim == 3)

    def forward(self, inputs):
        v, = inputs
        xp = backend.get_array_module(v)
        self.keep = xp.eye(v.shape[1], dtype=v.dtype)[self.labels][:, :, None]
        return (v * self.keep).reshape(v.shape[0], -1),

    def backward(self, indexes, grad_outputs):
        g = grad_outputs[0].array
        return chainer.Variable(g.reshape(self.keep.shape[:2] + (-1,))
                                * self.keep),


def mask(v, labels):
    """(B, J * D) as ``nets.mask``, in one node."""
    return Mask(labels).apply((v,))[0]


class SquaredError(function_node.FunctionNode):
    """Sum of squared errors per example, averaged over the batch.

    Inputs: y (B, P) and a target x with B x P values (no gradient: the
    data). Output: the scalar sum((y - x)^2) / B.
    """

    def __init__(self, target):
        self.target = getattr(target, 'array', target)

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() == 1, in_types[0].dtype.kind == 'f',
                          in_types[0].ndim == 2)

    def forward(self, inputs):
        y, = inputs
        xp = backend.get_array_module(y)
        self.difference = y - self.target.reshape(y.shape)
        flat = self.difference.ravel()
        return xp.asarray(flat.dot(flat) / y.dtype.type(y.shape[0]),
                          dtype=y.dtype),

    def backward(self, indexes, grad_outputs):
        gy = grad_outputs[0].array
        difference = self.difference
        scale = gy * difference.dtype.type(2 / difference.shape[0])
        return chainer.Variable(scale * difference),


def squared_error(y, target):
    """sum((y - target)^2) / B for y (B, P), in one node."""
    return SquaredError(target).apply((y,))[0]


class Decoder(function_node.FunctionNode):
    """Fig. 2's decoder in one node: FC ReLU, FC ReLU, FC sigmoid.

    Inputs: h (B, N0) and, per layer l, Chainer's Linear weights W_l
    (N_l, N_l-1) and bias b_l (N_l,). Output: (B, N_3) in (0, 1). Same
    arithmetic as ``nets.Decoder`` (the sigmoid as Chainer computes it,
    0.5 tanh(a / 2) + 0.5; ReLU's gradient where its output is positive).
    """

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() == 7)
        h = in_types[0]
        type_check.expect(h.dtype.kind == 'f', h.ndim == 2)
        for W, b in (in_types[1:3], in_types[3:5], in_types[5:7]):
            type_check.expect(W.dtype == h.dtype, b.dtype == h.dtype,
                              W.ndim == 2, b.ndim == 1,
                              b.shape[0] == W.shape[0])

    def forward(self, inputs):
        xp = backend.get_array_module(inputs[0])
        h, W1, b1, W2, b2, W3, b3 = inputs
        r1 = xp.maximum(h @ W1.T + b1, 0)
        r2 = xp.maximum(r1 @ W2.T + b2, 0)
        y = xp.tanh((r2 @ W3.T + b3) * h.dtype.type(0.5))
        y *= h.dtype.type(0.5)
        y += h.dtype.type(0.5)
        self.activations = (h, r1, r2, y)
        self.weights = (W1, W2, W3)
        return y,

    def backward(self, indexes, grad_outputs):
        h, r1, r2, y = self.activations
        W1, W2, W3 = self.weights
        g3 = grad_outputs[0].array * y * (1 - y)
        g2 = (g3 @ W3) * (r2 > 0)
        g1 = (g2 @ W2) * (r1 > 0)
        grads = {0: g1 @ W1, 1: g1.T @ h, 2: g1.sum(axis=0),
                 3: g2.T @ r1, 4: g2.sum(axis=0),
                 5: g3.T @ r2, 6: g3.sum(axis=0)}
        self.activations = self.weights = None
        return tuple(chainer.Variable(grads[i]) for i in indexes)


def decoder(h, layers):
    """(B, N0) -> (B, N3) through three layers [(W_l, b_l)] (a
    ``nets.Decoder``'s Linear weights and biases), in one node."""
    inputs = [h]
    for W, b in layers:
        inputs += [W, b]
    return Decoder().apply(inputs)[0]
