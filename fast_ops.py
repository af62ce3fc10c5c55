"""Fast kernels for CapsNet: custom Chainer FunctionNodes.

The plain Chainer path is bound by layout, not arithmetic (copies in
reshape/tensordot, im2col, col2im). These nodes keep every large operand
contiguous so that OpenBLAS does the work:

- ``conv2d_hwbc(..., method='im2col')``: convolution on (H, W, B, C)
  arrays with a strided-view im2col and one GEMM. With the batch inside the
  spatial axes, each kernel row of a patch is one contiguous run and the
  GEMM's output rows (oh, ow, b) are already the next layer's input layout.
- ``conv2d_hwbc(..., method='dft')``: the same convolution computed per
  spatial frequency (a DFT over H x W, then one GEMM per frequency). For
  PrimaryCaps (9x9 kernel, stride 2 on 20x20) it needs under half of the
  direct method's multiply-adds, and it needs no col2im.
- ``digit_capsules``: prediction vectors and all r routing iterations in
  one node, with the backward pass through the iterations written out, so
  u_hat (B x 1152 x 10 x 16) is read a few times instead of being copied
  by every broadcast. It is written with the NumPy API alone and runs on
  CuPy arrays as well: it is the GPU path's routing (the convolutions there
  stay Chainer's own unless GPU_CONVOLUTIONS).
- ``squash_capsules``, ``margin_loss``, ``mask``, ``decoder``,
  ``squared_error``: the rest of the network, one node each, also written
  with the NumPy API alone: on the GPU they cut the number of Chainer
  function calls a step pays host time for.
- Off until timed on a GPU: ``GPU_KERNELS`` (CuPy kernels for squash, the
  routing's softmax and its contractions) and ``GPU_CONVOLUTIONS`` (``conv2d_nchw``, a
  convolution for the GPU without Chainer's extra copies of the columns).

The parameters are the plain path's (Chainer's (O, C, kh, kw) convolution
weights, W of shape (I, J, D, K), the decoder's Linear weights), so one
model file serves both paths.
Backward passes return first-order gradients only (no double backprop).
"""
import contextlib
import ctypes
import functools

import numpy
from numpy.lib.stride_tricks import as_strided

import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import backend, function_node
from chainer.utils import conv, type_check

EPSILON = 1e-7


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of unmapping it.

    A training step allocates and frees arrays of up to 115 MB (the
    PrimaryCaps kernel's DFT and its gradient) and about 1 GB in all. glibc
    serves blocks above its mmap threshold (at most 32 MB) with fresh
    mappings and unmaps them on free, so every step page-faults that memory
    in again: on a 2-core Xeon this halved training throughput (62 against
    126 samples/s, ``benchmark.py --batchsize 100``). With mmap off and no
    trimming, freed blocks stay in the heap and the next step reuses them;
    peak memory is unchanged. Call it once at program start. Returns whether
    the C library took the settings (False off glibc, where it is a no-op).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(mallopt(m_mmap_max, 0)
                and mallopt(m_trim_threshold, 2 ** 31 - 1)
                and mallopt(m_top_pad, 64 << 20))


def _patches(x, kh, kw, stride):
    """(H, W, B, C) -> read-only view (OH, OW, B, kh, kw, C) of the patches."""
    height, width, batch, channels = x.shape
    out_h = (height - kh) // stride + 1
    out_w = (width - kw) // stride + 1
    sh, sw, sb, sc = x.strides
    return as_strided(x, (out_h, out_w, batch, kh, kw, channels),
                      (stride * sh, stride * sw, sb, sh, sw, sc),
                      writeable=False)


def im2col_hwbc(x, kh, kw, stride):
    """(H, W, B, C) -> (OH * OW * B, kh * kw * C), columns in (kh, kw, c)."""
    return numpy.ascontiguousarray(_patches(x, kh, kw, stride)).reshape(
        -1, kh * kw * x.shape[3])


def col2im_hwbc(cols, x_shape, kh, kw, stride):
    """Adjoint of im2col_hwbc: (OH*OW*B, kh*kw*C) -> (H, W, B, C) sums."""
    height, width, batch, channels = x_shape
    out_h = (height - kh) // stride + 1
    out_w = (width - kw) // stride + 1
    cols = cols.reshape(out_h, out_w, batch, kh, kw, channels)
    x = numpy.zeros(x_shape, dtype=cols.dtype)
    h_span = stride * (out_h - 1) + 1
    w_span = stride * (out_w - 1) + 1
    # one add per kernel tap: the taps of neighbouring outputs overlap
    for i in range(kh):
        for j in range(kw):
            x[i:i + h_span:stride, j:j + w_span:stride] += cols[:, :, :, i, j]
    return x


def _weight_matrix(W):
    """Chainer's (O, C, kh, kw) -> (kh * kw * C, O), matching im2col_hwbc."""
    return numpy.ascontiguousarray(W.transpose(2, 3, 1, 0)).reshape(
        -1, W.shape[0])


class _Convolution(function_node.FunctionNode):
    """Stride and input checks shared by the convolution nodes: x with its
    channels on axis ``channel_axis``, W (O, C, kh, kw), b (O,)."""

    channel_axis = None

    def __init__(self, stride=1):
        self.stride = stride

    def check_type_forward(self, in_types):
        type_check.expect(in_types.size() == 3)
        x, W, b = in_types
        type_check.expect(x.dtype.kind == 'f', W.dtype == x.dtype,
                          b.dtype == x.dtype, x.ndim == 4, W.ndim == 4,
                          b.ndim == 1, x.shape[self.channel_axis] ==
                          W.shape[1], b.shape[0] == W.shape[0])

    def _output_size(self, size, kernel):
        """Outputs along an axis of ``size`` inputs (no padding)."""
        return (size - kernel) // self.stride + 1

    @staticmethod
    def _wrap(indexes, grads):
        return tuple(chainer.Variable(grads[i]) if i in grads else None
                     for i in indexes)


class _ConvolutionHWBC(_Convolution):
    """Convolutions on (H, W, B, C) arrays.

    Inputs: x (H, W, B, C), W (O, C, kh, kw), b (O,).
    Output: (OH, OW, B, O). Batch-inside-space means a GEMM whose rows are
    (oh, ow, b) writes the next layer's input layout directly.
    """

    channel_axis = 3

    def _output_shape(self, x_shape, W_shape):
        height, width, batch, _ = x_shape
        out_c, _, kh, kw = W_shape
        return (self._output_size(height, kh), self._output_size(width, kw),
                batch, out_c)


class Conv2DIm2col(_ConvolutionHWBC):
    """Direct convolution: strided-view im2col and one GEMM."""

    def forward_cpu(self, inputs):
        x, W, b = inputs
        _, _, kh, kw = W.shape
        self.cols = im2col_hwbc(x, kh, kw, self.stride)
        y = self.cols @ _weight_matrix(W)
        y += b
        self.x_shape = x.shape
        self.retain_inputs((1,))
        return y.reshape(self._output_shape(x.shape, W.shape)),

    def backward(self, indexes, grad_outputs):
        W = self.get_retained_inputs()[0].array
        out_c, in_c, kh, kw = W.shape
        gy = grad_outputs[0].array.reshape(-1, out_c)
        grads = {}
        if 0 in indexes:
            grads[0] = col2im_hwbc(gy @ _weight_matrix(W).T, self.x_shape,
                                   kh, kw, self.stride)
        if 1 in indexes:
            gW = (self.cols.T @ gy).reshape(kh, kw, in_c, out_c)
            grads[1] = numpy.ascontiguousarray(gW.transpose(3, 2, 0, 1))
        if 2 in indexes:
            grads[2] = gy.sum(axis=0)
        self.cols = None
        return self._wrap(indexes, grads)


def _real_block(E):
    """Complex (R, C) -> real (2R, 2C) that maps a complex vector stored as
    rows (part, index) to one stored as rows (index, part), part = re, im."""
    rows, cols = E.shape
    M = numpy.zeros((rows, 2, 2, cols))
    M[:, 0, 0], M[:, 0, 1] = E.real, -E.imag
    M[:, 1, 0], M[:, 1, 1] = E.imag, E.real
    return M.reshape(2 * rows, 2 * cols)


@functools.lru_cache(maxsize=16)
def _dft_plan(height, width, kh, kw, stride, dtype):
    """Real matrices for the DFT convolution of an H x W input.

    Frequencies are u < H and v <= W // 2 (the input is real, so the other
    half of v is conjugate). Correlation is the product of the input's DFT
    and the conjugate DFT of the kernel; no padding is needed because a
    valid output never wraps around.
    """
    n_u, n_v = height, width // 2 + 1
    out_h = (height - kh) // stride + 1
    out_w = (width - kw) // stride + 1
    Eh = numpy.exp(-2j * numpy.pi * numpy.outer(numpy.arange(n_u),
                                                numpy.arange(height)) / height)
    Ew = numpy.exp(-2j * numpy.pi * numpy.outer(numpy.arange(n_v),
                                                numpy.arange(width)) / width)
    kernel_h, kernel_w = numpy.conj(Eh[:, :kh]), numpy.conj(Ew[:, :kw])
    # a real v-frequency stands for itself and its conjugate twin
    twins = numpy.full(n_v, 2.0)
    twins[0] = 1
    if width % 2 == 0:
        twins[-1] = 1
    rows = stride * numpy.arange(out_h)
    columns = stride * numpy.arange(out_w)
    inverse_u = numpy.exp(2j * numpy.pi * numpy.outer(
        rows, numpy.arange(n_u)) / height)
    inverse_v = numpy.exp(2j * numpy.pi * numpy.outer(
        columns, numpy.arange(n_v)) / width) * twins / (height * width)
    inverse = (inverse_u[:, None, :, None] * inverse_v[None, :, None, :]
               ).reshape(out_h * out_w, n_u * n_v)

    def real(a):
        return numpy.ascontiguousarray(a, dtype=dtype)

    return dict(
        n_u=n_u, n_v=n_v,
        # real x along h: rows (u, part)
        input_h=real(numpy.stack([Eh.real, Eh.imag], 1).reshape(2 * n_u,
                                                                 height)),
        input_w=real(_real_block(Ew)),
        kernel_h=real(numpy.stack([kernel_h.real, kernel_h.imag], 1)
                      .reshape(2 * n_u, kh)),
        kernel_w=real(_real_block(kernel_w)),
        # Re(inverse * Y) with Y = P0 - Q1 + i (Q0 + P1), see forward
        inverse_p=real(numpy.stack([inverse.real, -inverse.imag], 2)
                       .reshape(out_h * out_w, 2 * n_u * n_v)),
        inverse_q=real(numpy.stack([-inverse.imag, -inverse.real], 2)
                       .reshape(out_h * out_w, 2 * n_u * n_v)))


class Conv2DDFT(_ConvolutionHWBC):
    """Convolution computed per spatial frequency, all in real GEMMs.

    With X_f (B x C) and K_f (C x O) the DFTs of input and kernel at
    frequency f, Y_f = X_f K_f, and the outputs are the inverse DFT of Y at
    the strided output positions. Complex numbers are stored as real/imag
    planes; X2_f = [Re X_f; Im X_f] (2B x C), so
    P = X2 Re K and Q = X2 Im K give Re Y = P0 - Q1, Im Y = Q0 + P1.
    Every step is linear, so the backward pass is the transposed steps.
    """

    def forward_cpu(self, inputs):
        x, W, b = inputs
        height, width, batch, in_c = x.shape
        out_c, _, kh, kw = W.shape
        plan = _dft_plan(height, width, kh, kw, self.stride, x.dtype.type)
        n_u, n_v = plan['n_u'], plan['n_v']
        n_freq = n_u * n_v
        along_h = plan['input_h'] @ x.reshape(height, -1)
        X = numpy.matmul(plan['input_w'],
                         along_h.reshape(n_u, 2 * width, batch * in_c))
        X2 = X.reshape(n_freq, 2 * batch, in_c)
        K = self._kernel_transform(W, plan)
        P = numpy.matmul(X2, K[:, 0])
        Q = numpy.matmul(X2, K[:, 1])
        y = plan['inverse_p'] @ P.reshape(2 * n_freq, -1)
        y += plan['inverse_q'] @ Q.reshape(2 * n_freq, -1)
        y = y.reshape(self._output_shape(x.shape, W.shape))
        y += b
        self.X2, self.K, self.x_shape = X2, K, x.shape
        return y,

    def _kernel_transform(self, W, plan):
        """(F, 2, C, O): real and imaginary planes of the kernel's DFT."""
        key = (id(W), W.ctypes.data, W.shape, self.stride, plan['n_u'],
               plan['n_v'])
        if _kernel_transforms is not None and key in _kernel_transforms:
            return _kernel_transforms[key]
        out_c, in_c, kh, kw = W.shape
        n_u, n_v = plan['n_u'], plan['n_v']
        along_h = plan['kernel_h'] @ _weight_matrix(W).reshape(kh, -1)
        K = numpy.matmul(plan['kernel_w'], along_h.reshape(
            n_u, 2 * kw, in_c * out_c)).reshape(n_u * n_v, 2, in_c, out_c)
        if _kernel_transforms is not None:
            _kernel_transforms[key] = K
        return K

    def backward(self, indexes, grad_outputs):
        X2, K = self.X2, self.K
        height, width, batch, in_c = self.x_shape
        n_freq, _, _, out_c = K.shape
        kh, kw = self.inputs[1].shape[2:]
        plan = _dft_plan(height, width, kh, kw, self.stride, X2.dtype.type)
        n_u, n_v = plan['n_u'], plan['n_v']
        gy = grad_outputs[0].array
        g = gy.reshape(-1, batch * out_c)
        gP = (plan['inverse_p'].T @ g).reshape(n_freq, 2 * batch, out_c)
        gQ = (plan['inverse_q'].T @ g).reshape(n_freq, 2 * batch, out_c)
        grads = {}
        if 0 in indexes:
            gX2 = numpy.matmul(gP, K[:, 0].transpose(0, 2, 1))
            gX2 += numpy.matmul(gQ, K[:, 1].transpose(0, 2, 1))
            g_along_h = numpy.matmul(plan['input_w'].T, gX2.reshape(
                n_u, 2 * n_v, batch * in_c))
            grads[0] = (plan['input_h'].T @ g_along_h.reshape(2 * n_u, -1)
                        ).reshape(self.x_shape)
        if 1 in indexes:
            gK = numpy.empty_like(K)
            X2_t = X2.transpose(0, 2, 1)
            numpy.matmul(X2_t, gP, out=gK[:, 0])
            numpy.matmul(X2_t, gQ, out=gK[:, 1])
            g_kernel_h = numpy.matmul(plan['kernel_w'].T, gK.reshape(
                n_u, 2 * n_v, in_c * out_c))
            gW = plan['kernel_h'].T @ g_kernel_h.reshape(2 * n_u, -1)
            grads[1] = numpy.ascontiguousarray(
                gW.reshape(kh, kw, in_c, out_c).transpose(3, 2, 0, 1))
        if 2 in indexes:
            grads[2] = gy.reshape(-1, out_c).sum(axis=0)
        self.X2 = self.K = None
        return self._wrap(indexes, grads)


_kernel_transforms = None


@contextlib.contextmanager
def fixed_weights():
    """Within this block the DFT of each kernel is computed once and reused.

    For inference over many batches (an evaluation pass, prediction): the
    kernel's transform depends on the weights alone, so it is exact as long
    as no weights change inside the block. Blocks may nest.
    """
    global _kernel_transforms
    outer = _kernel_transforms
    if outer is None:
        _kernel_transforms = {}
    try:
        yield
    finally:
        if outer is None:
            _kernel_transforms = None


def conv2d_hwbc(x, W, b, stride=1, method='im2col'):
    """Convolution of x (H, W, B, C) with Chainer weights W (O, C, kh, kw).

    Returns (OH, OW, B, O). ``method`` is 'im2col' (direct) or 'dft'.
    """
    node = {'im2col': Conv2DIm2col, 'dft': Conv2DDFT}[method](stride)
    return node.apply((x, W, b))[0]


# --------------------------------------------------------------------------
# Convolution on (N, C, H, W) arrays for the GPU (GPU_CONVOLUTIONS)
# --------------------------------------------------------------------------
#
# Without cuDNN, Chainer convolves on the GPU through im2col: the column
# array (N, C, kh, kw, OH, OW), 298 MB for PrimaryCaps at batch 100, is
# copied again by tensordot into a GEMM layout, built and copied a second
# time for the weight gradient, and the input gradient's columns are copied
# once more (rollaxis) before col2im: three function nodes and about nine
# passes over that size per step. This node keeps the columns in the layout
# its GEMMs read, (C kh kw, N OH OW): one gather forward, the weight
# gradient a GEMM with a transposed operand, and one copy into col2im's
# layout backward. Written with the NumPy API and Chainer's im2col / col2im
# helpers, so the CPU tests check all of it; off until timed on a GPU
# (benchmark.py --gpu-convolutions; gpu_check.py times both).
GPU_CONVOLUTIONS = False


class Conv2DNCHW(_Convolution):
    """Convolution without padding of x (N, C, H, W) with Chainer's weights
    W (O, C, kh, kw) and bias b (O,), stride s: y (N, O, OH, OW), as
    ``F.convolution_2d(x, W, b, stride=s)``."""

    channel_axis = 1

    def forward(self, inputs):
        x, W, b = inputs
        xp = backend.get_array_module(x)
        n, c, h, w = x.shape
        out_c, _, kh, kw = W.shape
        s = self.stride
        oh, ow = self._output_size(h, kh), self._output_size(w, kw)
        x = xp.ascontiguousarray(x)
        sn, sc, sh, sw = x.strides
        # column (c, i, j, b, y, x) = x[b, c, s y + i, s x + j]
        self.columns = xp.ascontiguousarray(xp.lib.stride_tricks.as_strided(
            x, (c, kh, kw, n, oh, ow),
            (sc, sh, sw, sn, s * sh, s * sw))).reshape(c * kh * kw, -1)
        self.x_shape = x.shape
        self.retain_inputs((1,))
        y = (W.reshape(out_c, -1) @ self.columns).reshape(out_c, n, oh, ow)
        return y.transpose(1, 0, 2, 3) + b[:, None, None],

    def backward(self, indexes, grad_outputs):
        W = self.get_retained_inputs()[0].array
        gy = grad_outputs[0].array
        xp = backend.get_array_module(gy)
        n, out_c, oh, ow = gy.shape
        _, c, kh, kw = W.shape
        g_rows = xp.ascontiguousarray(gy.transpose(1, 0, 2, 3)).reshape(
            out_c, -1)                                     # (O, N OH OW)
        grads = {}
        if 0 in indexes:
            g_columns = (W.reshape(out_c, -1).T @ g_rows).reshape(
                c, kh, kw, n, oh, ow)
            grads[0] = conv.col2im(
                xp.ascontiguousarray(g_columns.transpose(3, 0, 1, 2, 4, 5)),
                self.stride, self.stride, 0, 0, *self.x_shape[2:])
        if 1 in indexes:
            grads[1] = (g_rows @ self.columns.T).reshape(W.shape)
        if 2 in indexes:
            grads[2] = g_rows.sum(axis=1)
        self.columns = None
        return self._wrap(indexes, grads)


def conv2d_nchw(x, W, b, stride=1):
    """(N, C, H, W) -> (N, O, OH, OW) through Conv2DNCHW."""
    return Conv2DNCHW(stride).apply((x, W, b))[0]


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
# gpu_check.py times both).
GPU_KERNELS = False

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


def _kernels_for(xp):
    """The CuPy kernels where they apply (CuPy arrays, GPU_KERNELS on),
    else None: the NumPy-API forms."""
    return _cupy_kernels() if GPU_KERNELS and xp is not numpy else None


def squash_forward(s):
    """(..., D) -> squashed (..., D), as nets.squash."""
    kernels = _kernels_for(backend.get_array_module(s))
    if kernels:
        return kernels.squash(kernels.dot(s, s, axis=-1, keepdims=True), s,
                              s.dtype.type(EPSILON))
    return _squash_scale((s * s).sum(axis=-1, keepdims=True)) * s


def squash_backward(s, gv):
    """Gradient of squash at s for the output gradient gv, both (..., D)."""
    xp = backend.get_array_module(s)
    kernels = _kernels_for(xp)
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


def _softmax(logits, axis):
    xp = backend.get_array_module(logits)
    top = logits.max(axis=axis, keepdims=True)
    kernels = _kernels_for(xp)
    if kernels:
        return kernels.softmax(logits, top, kernels.exp_sum(
            logits, top, axis=axis, keepdims=True))
    e = xp.exp(logits - top)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _softmax_backward(c, g_c, axis, g_more=None):
    """Gradient for the logits of c = softmax(logits) given c's gradient
    g_c, plus g_more (the logits' gradient from elsewhere) if given."""
    kernels = _kernels_for(backend.get_array_module(c))
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
# False forces one (benchmark.py --routing-contraction compares them).
ROUTING_EINSUM = None


def _use_einsum(xp):
    return xp is numpy if ROUTING_EINSUM is None else bool(ROUTING_EINSUM)


def sum_over_inputs(weights, u_hat):
    """sum_i weights[i, b, j] * u_hat[i, b, j, :] -> (B, J, D)."""
    xp = backend.get_array_module(u_hat)
    if _use_einsum(xp):
        return xp.einsum('ibj,ibjd->bjd', weights, u_hat)
    kernels = _kernels_for(xp)
    if kernels:
        return kernels.dot(weights[..., None], u_hat, axis=0)
    return (weights[..., None] * u_hat).sum(axis=0)


def agreement(u_hat, vectors):
    """<u_hat[i, b, j, :], vectors[b, j, :]> -> (I, B, J)."""
    xp = backend.get_array_module(u_hat)
    if _use_einsum(xp):
        return xp.einsum('ibjd,bjd->ibj', u_hat, vectors)
    kernels = _kernels_for(xp)
    if kernels:
        return kernels.dot(u_hat, vectors[None], axis=3)
    return (u_hat * vectors).sum(axis=3)


def outer_sum(weights, vectors, batched_gemm):
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
    kernels = _kernels_for(xp)
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

    def __init__(self, n_iterations):
        self.n_iterations = n_iterations

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
                c = _softmax(logits, axis=2)
            s = sum_over_inputs(c, u_hat)
            if bias is not None:
                s += bias
            v = squash_forward(s)
            self.c.append(c)
            self.s.append(s)
            self.v.append(v)
            if iteration < self.n_iterations - 1:
                if logits is None:
                    logits = agreement(u_hat, v)
                else:
                    logits += agreement(u_hat, v)
        self.u_t, self.W_t, self.u_hat = u_t, W_t, u_hat
        self.coupling = c.transpose(1, 0, 2)
        return v,

    def backward(self, indexes, grad_outputs):
        u_hat = self.u_hat
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
                gv = sum_over_inputs(g_logits_next, u_hat)
                weights.append(g_logits_next)
                vectors.append(self.v[r])
            gs = squash_backward(self.s[r], gv)
            if 2 in indexes:
                g_bias = g_bias + gs.sum(axis=0)
            weights.append(self.c[r])
            vectors.append(gs)
            if r > 0:   # the first logits are constant zeros
                g_logits_next = _softmax_backward(
                    self.c[r], agreement(u_hat, gs), 2, g_logits_next)
        n_in, batch, n_out, dim_out = u_hat.shape
        dim_in = self.u_t.shape[2]
        g_u_hat = outer_sum(weights, vectors, batched_gemm=xp is numpy)
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


def digit_capsules(u, W, n_iterations, bias=None):
    """(B, I, K) primary capsules -> v (B, J, D), last coupling c (B, I, J).

    Same result as ``nets.dynamic_routing(nets.prediction_vectors(u, W),
    n_iterations, bias)``; c is returned as an array (it carries no
    gradient). ``bias``: None, or b_j (J, D) added to s_j every iteration.
    """
    node = DigitCapsules(n_iterations)
    v, = node.apply((u, W) if bias is None else (u, W, bias))
    return v, node.coupling


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

    def __init__(self, split, axes, capsule_shape):
        self.split, self.axes = tuple(split), tuple(axes)
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
        return squash_forward(self.s),

    def backward(self, indexes, grad_outputs):
        xp = backend.get_array_module(self.s)
        gs = squash_backward(self.s, grad_outputs[0].array)
        transposed = tuple(self.split[axis] for axis in self.axes)
        inverse = tuple(int(axis) for axis in numpy.argsort(self.axes))
        gx = xp.ascontiguousarray(gs.reshape(transposed).transpose(
            inverse)).reshape(self.x_shape)
        self.s = None
        return chainer.Variable(gx),


def squash_capsules(x, split, axes, capsule_shape):
    """(B, I, K) squashed capsules from x, regrouped as in SquashCapsules."""
    return SquashCapsules(split, axes, capsule_shape).apply((x,))[0]


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
