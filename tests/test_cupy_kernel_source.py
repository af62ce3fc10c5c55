"""fast_ops' CuPy kernels (GPU_KERNELS) compiled as CuPy writes them, on a
machine without a GPU.

tests/test_fast_ops.py runs the kernel bodies' arithmetic with NumPy
stand-ins, and tests/test_gpu.py runs the compiled kernels on a device.
This file sits between them: CuPy's own code generation (the private
functions ElementwiseKernel and ReductionKernel call before they compile)
wraps each body, and CuPy's compile step (its headers, its options) hands
the source to NVRTC for sm_90, where loading the module onto a device is
replaced by a stop. A typo in a body, or a body that does not build in
CuPy's wrapper for float or double, fails here.

Needs CuPy with NVRTC and the CUDA headers, no GPU:
``pip install "cupy-cuda13x[ctk]"`` (written against CuPy 14.2); skipped,
with the reason, where they are missing or where CuPy's private code
generation has other names.
"""
import itertools

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet.kernels import routing

cupy = pytest.importorskip('cupy', reason='CuPy is not installed')

try:
    from cupy.cuda import compiler
    from cupy._core import _carray, _kernel, _reduction, _scalar, core
    CODE_GENERATION = (
        _kernel._get_elementwise_kernel_code, _kernel._ArgInfo,
        _kernel._TypeMap,
        _reduction._ReductionKernel_get_cached_function_code,
        core.compile_with_cache, compiler._compile_module_with_cache,
        compiler._get_arch_for_options_for_nvrtc)
except (ImportError, AttributeError) as error:
    pytest.skip('CuPy {} has no code generation of the shape this test '
                'follows (CuPy 14.2): {}'.format(cupy.__version__, error),
                allow_module_level=True)
try:
    compiler._get_nvrtc_version()
except Exception as error:  # CuPy raises its own error types here
    pytest.skip('NVRTC is not available to CuPy ({}); install '
                '"cupy-cuda13x[ctk]"'.format(error), allow_module_level=True)

# CuPy's _ArgKind values: an ndarray, an indexer, a scalar
NDARRAY, INDEXER, SCALAR = 1, 2, 3
FLOATS = (numpy.float32, numpy.float64)


class Compiled(Exception):
    """Raised where CuPy would load the compiled module onto a device."""


@pytest.fixture
def compile_source(monkeypatch):
    """compile(code, name): CuPy's compile_with_cache of the code, NVRTC
    for sm_90 with CuPy's headers and options; raises on a compile error."""
    def compile_only(source, options=(), arch=None, **kwargs):
        # CuPy adds this option itself in the step this stands in for
        compiler.compile_using_nvrtc(source, options + ('-ftz=true',), '90')
        raise Compiled
    monkeypatch.setattr(compiler, '_compile_module_with_cache', compile_only)
    # asked of the device otherwise: sm_90, compiled to a cubin
    monkeypatch.setattr(compiler, '_get_arch_for_options_for_nvrtc',
                        lambda arch=None: ('-arch=sm_90', 'cubin'))

    def compile_code(code):
        with pytest.raises(Compiled):
            core.compile_with_cache(code, ())
    return compile_code


def array_info(dtype, ndim):
    return _kernel._ArgInfo(NDARRAY, cupy.ndarray, dtype, ndim, False, True)


def elementwise_source(definition, name, dtype, ndims):
    """The source of ElementwiseKernel(*definition) for arguments of these
    ndims (0: a scalar), the output last."""
    kernel = cupy.ElementwiseKernel(*definition, name=name)
    infos = [_kernel._ArgInfo(SCALAR, _scalar.CScalar, dtype, 0, True, True)
             if ndim == 0 else array_info(dtype, ndim) for ndim in ndims]
    infos.append(_kernel._ArgInfo(INDEXER, _carray.Indexer, None,
                                  max(ndims), True, True))
    return _kernel._get_elementwise_kernel_code(
        tuple(infos), _kernel._TypeMap((('T', dtype),)), kernel.params,
        kernel.operation, kernel.name, kernel.preamble)


ELEMENTWISE = [
    ('capsnet_squash', routing.SQUASH_KERNEL, (3, 3, 0, 3)),
    ('capsnet_squash_grad', routing.SQUASH_GRAD_KERNEL, (3, 3, 3, 3, 0, 3)),
    ('capsnet_softmax', routing.SOFTMAX_KERNEL, (3, 3, 3, 3)),
    # the gradient that reaches the logits another way: none (a scalar 0)
    # or an array
    ('capsnet_softmax_grad', routing.SOFTMAX_GRAD_KERNEL, (3, 3, 3, 0, 3)),
    ('capsnet_softmax_grad', routing.SOFTMAX_GRAD_KERNEL, (3, 3, 3, 3, 3)),
] + [('capsnet_outer_sum_{}'.format(terms), routing.outer_sum_kernel(terms),
      (4,) * (2 * terms + 1)) for terms in (1, 3, 5)]


@pytest.mark.parametrize('dtype', FLOATS)
@pytest.mark.parametrize('name, definition, ndims', ELEMENTWISE)
def test_elementwise_kernels_compile(compile_source, name, definition,
                                     ndims, dtype):
    source = elementwise_source(definition, name, dtype, ndims)
    assert definition[2].strip() in source
    compile_source(source)


REDUCTIONS = [('capsnet_dot', routing.DOT_KERNEL),
              ('capsnet_exp_sum', routing.EXP_SUM_KERNEL)]


@pytest.mark.parametrize('dtype, index', itertools.product(
    FLOATS, (numpy.int32, numpy.int64)))
@pytest.mark.parametrize('in_ndim, out_ndim', [(2, 1), (4, 3)])
@pytest.mark.parametrize('name, definition', REDUCTIONS)
def test_reduction_kernels_compile(compile_source, name, definition,
                                   in_ndim, out_ndim, dtype, index):
    kernel = cupy.ReductionKernel(*definition, name=name)
    infos = (array_info(dtype, in_ndim), array_info(dtype, in_ndim),
             array_info(dtype, out_ndim),
             _kernel._ArgInfo(INDEXER, _carray.Indexer, None, in_ndim,
                              True, True),
             _kernel._ArgInfo(INDEXER, _carray.Indexer, None, out_ndim,
                              True, True),
             _kernel._ArgInfo(SCALAR, _scalar.CScalar, numpy.int32, 0,
                              True, True))
    # CuPy puts the index type into the type map as 'IndexT' (int for
    # 32-bit indexers, long long otherwise)
    type_map = _kernel._TypeMap((('IndexT', index), ('T', dtype)))
    source = _reduction._ReductionKernel_get_cached_function_code(
        2, 1, kernel._params, infos, type_map, kernel.name, 512,
        kernel.reduce_type, kernel.identity, kernel.map_expr,
        kernel.reduce_expr, kernel.post_map_expr, kernel.preamble,
        kernel.options)
    assert definition[2] in source
    compile_source(source)


def test_a_broken_body_fails_to_compile(compile_source):
    """The check can fail: a body naming an undefined variable."""
    inputs, output, body = routing.SQUASH_GRAD_KERNEL
    broken = (inputs, output, body.replace('den * den', 'den * dn'))
    source = elementwise_source(broken, 'broken', numpy.float32,
                                (3, 3, 3, 3, 0, 3))
    with pytest.raises(Exception, match='identifier "dn" is undefined'):
        compile_source(source)
