"""DigitCaps in one node: prediction vectors u_hat = W u and all r
iterations of routing by agreement (Procedure 1), with the backward pass
through the iterations written out, so u_hat (B x 1152 x 10 x 16) is read a
few times instead of being copied by every broadcast. Written with the NumPy
API alone, it runs on CuPy arrays as well: it is the GPU path's routing.
Optional CuPy kernels for squash and the routing's softmax and contractions
(off until timed on a GPU) are kept as text so the CPU tests can run their
arithmetic. Same results as ``nets.dynamic_routing`` (the plain path).
"""
import functools

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import backend, function_node
from chainer.utils import type_check

from capsnet.kernels import DEFAULT

EPSILON = 1e-7


# --------------------------------------------------------------------------
# DigitCaps: prediction vectors and dynamic routing in one node
# --------------------------------------------------------------------------

def _squash_scale(squared):
    """g(q) with v = g(|s|^2) s: q / ((1 + q) sqrt(q + eps))."""
    xp = backend.get_array_module(squared)
    return squared / ((1 + squared) * xp.sqrt(squared + EPSILON))


# --------------------------------------------------------------------------
# CuPy kernels for squash and the routing (GPU_KERNELS)
# --------------------------------------------------------------------------
#
# Through the NumPy API each step of squash and of its gradient is a kernel
# of its own (8 forward, about 20 backward, most of them on B x J values,
# so each is mostly a launch the host pays for), the routing's softmax is 5
# and its gradient 5, and each contraction with u_hat writes a temporary of
# u_hat's size before summing it. These CuPy kernels do each in one launch
# (the softmax in three: its maximum, its sum, the quotient; its gradient
# in two) and without the temporaries. Their bodies are kept as text here
# so that the tests can run the same arithmetic on the CPU
# (tests/test_fast_ops.py reads them with NumPy stand-ins); on a GPU
# tests/test_gpu.py compares them with the NumPy-API forms. Written in a
# session without a GPU: off until timed on one (benchmark.py --gpu-kernels;
# gpu_check.py times both); KernelOptions.gpu_kernels switches them on.

# ReductionKernels: sums over the given axes (inputs broadcast) of x * y,
# and of exp(l - m) (the softmax's denominator)
DOT_KERNEL = ('T x, T y', 'T z', 'x * y', 'a + b', 'z = a', '0')
EXP_SUM_KERNEL = ('T l, T m', 'T z', 'exp(l - m)', 'a + b', 'z = a', '0')
# ElementwiseKernels: (inputs, output, body); one statement per line
SQUASH_KERNEL = ('T q, T s, T eps', 'T v',
                 'v = q / ((1 + q) * sqrt(q + eps)) * s;')
SQUASH_GRAD_KERNEL = ('T q, T sg, T s, T gv, T eps', 'T gs', """
    const T root = sqrt(q + eps);
    const T den = (1 + q) * root;
    const T d_den = root + (1 + q) / (2 * root);
    const T d_scale = (den - q * d_den) / (den * den);
    gs = q / den * gv + 2 * d_scale * s * sg;
""")
# the softmax from its logits l, their maximum m and EXP_SUM_KERNEL's z
SOFTMAX_KERNEL = ('T l, T m, T z', 'T c', 'c = exp(l - m) / z;')
# the logits' gradient from the softmax c, its output gradient g, t =
# sum_j c g, plus the gradient n that reaches the same logits another way
SOFTMAX_GRAD_KERNEL = ('T c, T g, T t, T n', 'T gl', 'gl = c * (g - t) + n;')


def outer_sum_kernel(terms):
    """ElementwiseKernel text of sum_k w_k * v_k over ``terms`` pairs."""
    return (', '.join('T w{0}, T v{0}'.format(k) for k in range(terms)),
            'T g', 'g = {};'.format(' + '.join(
                'w{0} * v{0}'.format(k) for k in range(terms))))


@functools.lru_cache(maxsize=None)
def _cupy_kernels():
    cupy = chainer.backends.cuda.cupy

    @functools.lru_cache(maxsize=None)
    def outer_sum(terms):
        return cupy.ElementwiseKernel(
            *outer_sum_kernel(terms),
            name='capsnet_outer_sum_{}'.format(terms))

    class Kernels:
        dot = cupy.ReductionKernel(*DOT_KERNEL, name='capsnet_dot')
        exp_sum = cupy.ReductionKernel(*EXP_SUM_KERNEL,
                                       name='capsnet_exp_sum')
        softmax = cupy.ElementwiseKernel(*SOFTMAX_KERNEL,
                                         name='capsnet_softmax')
        softmax_grad = cupy.ElementwiseKernel(*SOFTMAX_GRAD_KERNEL,
                                              name='capsnet_softmax_grad')
        squash = cupy.ElementwiseKernel(*SQUASH_KERNEL, name='capsnet_squash')
        squash_grad = cupy.ElementwiseKernel(*SQUASH_GRAD_KERNEL,
                                             name='capsnet_squash_grad')
    Kernels.outer_sum = staticmethod(outer_sum)
    return Kernels


def _kernels_for(xp, options):
    """The CuPy kernels where they apply (CuPy arrays, options.gpu_kernels
    on), else None: the NumPy-API forms."""
    return _cupy_kernels() if options.gpu_kernels and xp is not numpy \
        else None


def squash_forward(s, options=DEFAULT):
    """(..., D) -> squashed (..., D), as nets.squash."""
    kernels = _kernels_for(backend.get_array_module(s), options)
    if kernels:
        return kernels.squash(kernels.dot(s, s, axis=-1, keepdims=True), s,
                              s.dtype.type(EPSILON))
    return _squash_scale((s * s).sum(axis=-1, keepdims=True)) * s


def squash_backward(s, gv, options=DEFAULT):
    """Gradient of squash at s for the output gradient gv, both (..., D)."""
    xp = backend.get_array_module(s)
    kernels = _kernels_for(xp, options)
    if kernels:
        return kernels.squash_grad(
            kernels.dot(s, s, axis=-1, keepdims=True),
            kernels.dot(s, gv, axis=-1, keepdims=True), s, gv,
            s.dtype.type(EPSILON))
    q = (s * s).sum(axis=-1, keepdims=True)
    root = xp.sqrt(q + EPSILON)
    denominator = (1 + q) * root
    # d/dq [q / ((1 + q) root)], finite at q = 0 thanks to EPSILON
    d_denominator = root + (1 + q) / (2 * root)
    d_scale = (denominator - q * d_denominator) / (denominator * denominator)
    return (q / denominator) * gv + 2 * d_scale * s * (s * gv).sum(
        axis=-1, keepdims=True)


def _softmax(logits, axis, options=DEFAULT):
    xp = backend.get_array_module(logits)
    top = logits.max(axis=axis, keepdims=True)
    kernels = _kernels_for(xp, options)
    if kernels:
        return kernels.softmax(logits, top, kernels.exp_sum(
            logits, top, axis=axis, keepdims=True))
    e = xp.exp(logits - top)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _softmax_backward(c, g_c, axis, g_more=None, options=DEFAULT):
    """Gradient for the logits of c = softmax(logits) given c's gradient
    g_c, plus g_more (the logits' gradient from elsewhere) if given."""
    kernels = _kernels_for(backend.get_array_module(c), options)
    if kernels:
        return kernels.softmax_grad(
            c, g_c, kernels.dot(c, g_c, axis=axis, keepdims=True),
            c.dtype.type(0) if g_more is None else g_more)
    g_logits = c * (g_c - (c * g_c).sum(axis=axis, keepdims=True))
    if g_more is not None:
        g_logits += g_more
    return g_logits


# How DigitCapsules contracts u_hat with the couplings and with the capsules:
# None picks einsum on NumPy (3 to 4 times faster there than the broadcast
# form at the paper's sizes, one core, measured on this project's CPU) and
# broadcast products with a sum on CuPy (two kernels each, where cupy.einsum
# spends host time planning and copies u_hat into a matmul layout); True or
# False forces one (KernelOptions.einsum; benchmark.py --routing-contraction
# compares them).
def _use_einsum(xp, options):
    return xp is numpy if options.einsum is None else bool(options.einsum)


def sum_over_inputs(weights, u_hat, options=DEFAULT):
    """sum_i weights[i, b, j] * u_hat[i, b, j, :] -> (B, J, D)."""
    xp = backend.get_array_module(u_hat)
    if _use_einsum(xp, options):
        return xp.einsum('ibj,ibjd->bjd', weights, u_hat)
    kernels = _kernels_for(xp, options)
    if kernels:
        return kernels.dot(weights[..., None], u_hat, axis=0)
    return (weights[..., None] * u_hat).sum(axis=0)


def agreement(u_hat, vectors, options=DEFAULT):
    """<u_hat[i, b, j, :], vectors[b, j, :]> -> (I, B, J)."""
    xp = backend.get_array_module(u_hat)
    if _use_einsum(xp, options):
        return xp.einsum('ibjd,bjd->ibj', u_hat, vectors)
    kernels = _kernels_for(xp, options)
    if kernels:
        return kernels.dot(u_hat, vectors[None], axis=3)
    return (u_hat * vectors).sum(axis=3)


def outer_sum(weights, vectors, batched_gemm, options=DEFAULT):
    """sum_k weights[k][i, b, j] * vectors[k][b, j, :] -> (I, B, J, D).

    Args:
        weights: list of (I, B, J) arrays; vectors: list of (B, J, D).
        batched_gemm: one broadcast matmul over all (i, b, j) (NumPy: the
            BLAS does it in one pass), else one fused multiply-add per term
            (CuPy: a matmul of a million 1 x R by R x D products is slow
            there, while each term is one memory-bound elementwise kernel).
    """
    xp = backend.get_array_module(weights[0])
    if batched_gemm:
        return xp.matmul(xp.stack(weights, axis=-1)[..., None, :],
                         xp.stack(vectors, axis=-2))[..., 0, :]
    kernels = _kernels_for(xp, options)
    if kernels:
        pairs = []
        for w, vector in zip(weights, vectors):
            pairs += [w[..., None], vector]
        return kernels.outer_sum(len(weights))(*pairs)
    total = weights[0][..., None] * vectors[0]
    for w, vector in zip(weights[1:], vectors[1:]):
        total += w[..., None] * vector
    return total


class DigitCapsules(function_node.FunctionNode):
    """u_hat = W u, then Procedure 1 for r iterations.

    Inputs: u (B, I, K) primary capsules, W (I, J, D, K), and optionally
    b (J, D), a bias added to s_j in every iteration (the official recipe).
    Output: v (B, J, D). ``self.coupling`` holds the last c as (B, I, J).
    Internally u_hat is laid out (I, B, J, D): the prediction GEMMs are
    batched over i, and every routing pass reads it front to back.
    Written with the NumPy API only, so the same code runs on NumPy and on
    CuPy arrays (the GPU path's routing: one graph node instead of about
    sixty small ones, each with Chainer's per-function overhead).
    """

    def __init__(self, n_iterations, options=DEFAULT):
        self.n_iterations = n_iterations
        self.options = options

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() >= 2, in_types.size() <= 3)
        u, W = in_types[:2]
        type_check.expect(u.dtype.kind == 'f', W.dtype == u.dtype,
                          u.ndim == 3, W.ndim == 4, u.shape[1] == W.shape[0],
                          u.shape[2] == W.shape[3])

    def forward(self, inputs):
        u, W = inputs[:2]
        bias = inputs[2] if len(inputs) == 3 else None
        xp = backend.get_array_module(u)
        n_in, n_out, dim_out, dim_in = W.shape
        batch = u.shape[0]
        options = self.options
        u_t = xp.ascontiguousarray(u.transpose(1, 0, 2))         # (I, B, K)
        W_t = xp.ascontiguousarray(W.transpose(0, 3, 1, 2)).reshape(
            n_in, dim_in, n_out * dim_out)                        # (I, K, JD)
        u_hat = xp.matmul(u_t, W_t).reshape(n_in, batch, n_out, dim_out)
        self.c, self.s, self.v = [], [], []
        logits = None         # zeros until the first agreement is added
        for iteration in range(self.n_iterations):
            if logits is None:
                # the softmax of zeros, exactly, without the array
                # operations (kernel launches on a GPU) that it takes
                c = xp.full((n_in, batch, n_out),
                            u.dtype.type(1) / u.dtype.type(n_out), u.dtype)
            else:
                c = _softmax(logits, axis=2, options=options)
            s = sum_over_inputs(c, u_hat, options)
            if bias is not None:
                s += bias
            v = squash_forward(s, options)
            self.c.append(c)
            self.s.append(s)
            self.v.append(v)
            if iteration < self.n_iterations - 1:
                if logits is None:
                    logits = agreement(u_hat, v, options)
                else:
                    logits += agreement(u_hat, v, options)
        self.u_t, self.W_t, self.u_hat = u_t, W_t, u_hat
        self.coupling = c.transpose(1, 0, 2)
        return v,

    def backward(self, indexes, grad_outputs):
        u_hat, options = self.u_hat, self.options
        xp = backend.get_array_module(u_hat)
        # g_u_hat[i, b, j, :] = sum_k weights_k[i, b, j] * vectors_k[b, j, :],
        # summed at the end in one pass over u_hat's size
        weights, vectors = [], []

        gv_final = grad_outputs[0].array
        g_bias = 0                # b_j's gradient: every iteration's g_s_j
        g_logits_next = None      # gradient for the logits after iteration r
        for r in reversed(range(self.n_iterations)):
            if g_logits_next is None:      # r is the last iteration: v_r is v
                gv = gv_final
            else:
                # v_r only reaches the loss through logits_{r+1} = logits_r
                # + <u_hat, v_r>
                gv = sum_over_inputs(g_logits_next, u_hat, options)
                weights.append(g_logits_next)
                vectors.append(self.v[r])
            gs = squash_backward(self.s[r], gv, options)
            if 2 in indexes:
                g_bias = g_bias + gs.sum(axis=0)
            weights.append(self.c[r])
            vectors.append(gs)
            if r > 0:   # the first logits are constant zeros
                g_logits_next = _softmax_backward(
                    self.c[r], agreement(u_hat, gs, options), 2,
                    g_logits_next, options)
        n_in, batch, n_out, dim_out = u_hat.shape
        dim_in = self.u_t.shape[2]
        g_u_hat = outer_sum(weights, vectors, xp is numpy, options)
        g_flat = g_u_hat.reshape(n_in, batch, n_out * dim_out)
        grads = {}
        if 0 in indexes:
            g_u_t = xp.matmul(g_flat, self.W_t.transpose(0, 2, 1))
            grads[0] = xp.ascontiguousarray(g_u_t.transpose(1, 0, 2))
        if 1 in indexes:
            g_W_t = xp.matmul(self.u_t.transpose(0, 2, 1), g_flat)
            grads[1] = xp.ascontiguousarray(
                g_W_t.reshape(n_in, dim_in, n_out, dim_out)
                .transpose(0, 2, 3, 1))
        if 2 in indexes:
            grads[2] = g_bias
        self.u_hat = self.u_t = self.c = self.s = self.v = None
        return tuple(chainer.Variable(grads[i]) if i in grads else None
                     for i in indexes)


def digit_capsules(u, W, n_iterations, bias=None, options=DEFAULT):
    """(B, I, K) primary capsules -> v (B, J, D), last coupling c (B, I, J).

    Same result as ``nets.dynamic_routing(nets.prediction_vectors(u, W),
    n_iterations, bias)``; c is returned as an array (it carries no
    gradient). ``bias``: None, or b_j (J, D) added to s_j every iteration.
    ``options``: the KernelOptions (CuPy kernels, einsum).
    """
    node = DigitCapsules(n_iterations, options)
    v, = node.apply((u, W) if bias is None else (u, W, bias))
    return v, node.coupling
