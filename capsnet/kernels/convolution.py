"""Fast convolutions: custom Chainer FunctionNodes.

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
- ``conv2d_nchw``: a convolution for the GPU without Chainer's extra copies
  of the columns (off until timed on a GPU).

The weights are Chainer's (O, C, kh, kw) convolution weights, so one model
file serves every path. Backward passes return first-order gradients only.
"""
import contextlib
import ctypes
import functools

import numpy
from numpy.lib.stride_tricks import as_strided

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import backend, function_node
from chainer.utils import conv, type_check


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
# Convolution on (N, C, H, W) arrays for the GPU (gpu_convolutions)
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
# (benchmark.py --gpu-convolutions; gpu_check.py times both); the model
# takes it with KernelOptions.gpu_convolutions.


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
