"""Let Chainer 7.8.1 import and run on today's stack; import before chainer.

Chainer 7.8.1 (2020, the last release) was written for NumPy 1.x, Python
<= 3.11 and a setuptools that ships ``pkg_resources``. Every module of this
project that imports Chainer imports this module first (``import compat``
above ``import chainer``). Each patch below is applied only where the thing
Chainer needs is missing, so on the classic stack (Python 3.10/3.11,
NumPy 1.26, setuptools < 81) nothing is replaced; there the module only keeps
known-harmless warnings of Chainer's own imports off the screen.

Patches, each with the Chainer line that needs it:

1. ``numpy.sctypes`` (removed in NumPy 2.0):
   chainer/functions/array/as_strided.py:10
   ``index_dtype = {t().itemsize: t for t in np.sctypes['int']}`` runs when
   ``chainer.functions`` is imported, and line 252 reads
   ``np.sctypes['float']``. Restored with NumPy 1.26's contents.
2. ``numpy.distutils.system_info`` (removed in NumPy 2.0, and unusable on
   Python >= 3.12, which has no ``distutils``):
   chainer/_environment_check.py:6 imports it, and line 29 calls
   ``get_info('blas_opt')`` on macOS only, to warn about Accelerate. The
   stand-in's ``get_info`` returns ``{}`` (no BLAS information, no warning).
3. ``pkg_resources`` (gone from setuptools >= 81, and setuptools is not
   installed at all in a fresh Python >= 3.12 venv):
   chainer/_environment_check.py:7 imports it, and lines 57-74 call
   ``require``, ``get_distribution`` and catch ``DistributionNotFound`` /
   ``VersionConflict`` to warn about CuPy/iDeep versions. The stand-in
   answers from ``importlib.metadata``: ``require`` says whether the
   distribution is installed and does not compare versions (Chainer lists
   only CuPy 7 package names, none of which a current CuPy wheel has).
   Where the real ``pkg_resources`` exists it is used, imported here once
   with its own deprecation warning silenced.

4. Reported means in float64 (NumPy 2 only): ``chainer.reporter.Summary``
   starts its sums as the Python float 0.0 (chainer/reporter.py, in
   ``Summary.__init__``) and adds float32 values at lines 298-299
   (``self._x += weight * value``). Under NumPy 1's value-based promotion
   the sums were float64; under NEP 50 a Python float is "weak", so the sums
   and the logged epoch means became float32. Starting the sums as
   ``numpy.float64(0)`` restores the float64 sums on NumPy 2. Found by running
   training on NumPy 1.26 with ``NPY_PROMOTION_STATE=weak_and_warn``; the
   other sites that check reports lie inside Chainer's
   ``softmax_cross_entropy`` (the baseline's loss), where a float64 scalar
   multiplies a float32 array and the result is cast back to float32: only
   the rounding of that one product differs, so it is left alone.

Warnings kept off the screen (and only these):

- setuptools' "pkg_resources is deprecated as an API" (UserWarning),
  raised by Chainer's own import of it, see 3;
- Chainer's "cuDNN is not enabled" (UserWarning) from
  ``check_cuda_available``: CuPy 14 has no cuDNN module, and Chainer then
  uses its own CUDA kernels for every function this project calls.
- CuPy's "nccl library could not be loaded" (UserWarning, nine lines, at
  every import of CuPy 13 and 14 when NCCL is not installed): NCCL serves
  multi-GPU communication only, which single-process training never uses.
"""
import importlib
import importlib.metadata
import sys
import types
import warnings

import numpy

# the Chainer message that CuPy >= 14 triggers on every GPU start
warnings.filterwarnings('ignore', message=r'cuDNN is not enabled',
                        category=UserWarning)
warnings.filterwarnings('ignore', message=r'\s*nccl library could not be '
                        r'loaded', category=UserWarning)


def _restore_sctypes():
    """Patch 1: numpy.sctypes as NumPy 1.26 had it."""
    if 'sctypes' in vars(numpy):
        return False
    numpy.sctypes = {
        'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
        'uint': [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
        'float': [numpy.float16, numpy.float32, numpy.float64,
                  numpy.longdouble],
        'complex': [numpy.complex64, numpy.complex128, numpy.clongdouble],
        'others': [bool, object, bytes, str, numpy.void],
    }
    return True


def _imports(name):
    """Whether module ``name`` imports (its own warnings silenced)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            importlib.import_module(name)
        return True
    except ImportError:
        return False


def _stand_in_system_info():
    """Patch 2: numpy.distutils.system_info with an empty get_info."""
    if _imports('numpy.distutils.system_info'):
        return False
    distutils = types.ModuleType('numpy.distutils')
    system_info = types.ModuleType('numpy.distutils.system_info')
    system_info.get_info = lambda name, notfound_action=0: {}
    distutils.system_info = system_info
    distutils.__path__ = []      # a package, so that the submodule imports
    sys.modules['numpy.distutils'] = distutils
    sys.modules['numpy.distutils.system_info'] = system_info
    numpy.distutils = distutils
    return True


class _ResolutionError(Exception):
    pass


class _DistributionNotFound(_ResolutionError):
    pass


class _VersionConflict(_ResolutionError):
    pass


def _requirement_name(requirement):
    """'cupy-cuda12x>=7.7.0,<8.0.0' -> 'cupy-cuda12x'."""
    for i, char in enumerate(requirement):
        if char in '<>=!~;[ ':
            return requirement[:i]
    return requirement


def _require(requirement):
    name = _requirement_name(requirement)
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise _DistributionNotFound(name)
    return []


def _get_distribution(name):
    dist = importlib.metadata.distribution(_requirement_name(name))
    return types.SimpleNamespace(project_name=dist.metadata['Name'],
                                 version=dist.version)


def _stand_in_pkg_resources():
    """Patch 3: pkg_resources, real if installed, else a stand-in."""
    if _imports('pkg_resources'):
        return False
    module = types.ModuleType('pkg_resources')
    module.__doc__ = 'Stand-in made by compat.py for Chainer 7.8.1.'
    module.ResolutionError = _ResolutionError
    module.DistributionNotFound = _DistributionNotFound
    module.VersionConflict = _VersionConflict
    module.require = _require
    module.get_distribution = _get_distribution
    sys.modules['pkg_resources'] = module
    return True


def _accumulate_reports_in_float64():
    """Patch 4: chainer.reporter.Summary sums in float64 on NumPy 2."""
    if numpy.lib.NumpyVersion(numpy.__version__) < '2.0.0':
        return False
    from chainer import reporter
    plain_init = reporter.Summary.__init__

    def __init__(self):
        plain_init(self)
        self._x = numpy.float64(0.0)
        self._x2 = numpy.float64(0.0)

    reporter.Summary.__init__ = __init__
    return True


#: which patches this interpreter needed, for the tests and for bug reports
APPLIED = tuple(name for name, patch in (
    ('numpy.sctypes', _restore_sctypes),
    ('numpy.distutils.system_info', _stand_in_system_info),
    ('pkg_resources', _stand_in_pkg_resources),
    ('chainer.reporter.Summary', _accumulate_reports_in_float64),
) if patch())
