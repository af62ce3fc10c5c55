"""compat.py: Chainer 7.8.1 on NumPy 2, Python 3.12+ and without
pkg_resources, and nothing replaced on the classic stack."""
import ast
import glob
import importlib
import os
import subprocess
import sys
import warnings

import numpy
import pytest

from capsnet import compat
from chainer import reporter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMPY_2 = numpy.lib.NumpyVersion(numpy.__version__) >= '2.0.0'
TOOLS = ('train.py', 'visualize.py', 'evaluate.py', 'predict.py',
         'experiments.py', 'dev/benchmark.py', 'dev/gpu_check.py')


def run_python(code, env=None):
    return subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_patches_follow_the_stack():
    assert ('numpy.sctypes' in compat.APPLIED) == NUMPY_2
    assert ('chainer.reporter.Summary' in compat.APPLIED) == NUMPY_2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            importlib.import_module('numpy.distutils.system_info')
        has_distutils = sys.modules['numpy.distutils'].__doc__ is not None
    except ImportError:
        has_distutils = False
    assert ('numpy.distutils.system_info' in compat.APPLIED) == \
        (not has_distutils)


def test_sctypes_are_numpy_1_26s():
    assert numpy.sctypes['int'] == [numpy.int8, numpy.int16, numpy.int32,
                                    numpy.int64]
    assert numpy.sctypes['uint'] == [numpy.uint8, numpy.uint16,
                                     numpy.uint32, numpy.uint64]
    assert numpy.sctypes['float'][:3] == [numpy.float16, numpy.float32,
                                          numpy.float64]
    # what chainer/functions/array/as_strided.py:10 builds from it
    index_dtype = {t().itemsize: t for t in numpy.sctypes['int']}
    assert index_dtype[8] is numpy.int64


def test_chainer_environment_check_runs_quietly():
    from chainer import _environment_check
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _environment_check.check()


def test_pkg_resources_stand_in_answers_from_the_installed_packages():
    assert compat._requirement_name('cupy-cuda12x>=7.7.0,<8.0.0') == \
        'cupy-cuda12x'
    assert compat._requirement_name('numpy') == 'numpy'
    assert compat._require('numpy>=1.0') == []
    with pytest.raises(compat._DistributionNotFound):
        compat._require('no-such-distribution-here>=1')
    assert compat._get_distribution('numpy').version == numpy.__version__


def test_chainer_imports_without_pkg_resources():
    """setuptools >= 81 has no pkg_resources; Python >= 3.12 venvs may have
    no setuptools at all. Blocked here, the stand-in takes its place."""
    result = run_python(
        'import sys; sys.modules["pkg_resources"] = None\n'
        'from capsnet import compat\n'
        'import chainer, chainer.functions as F, numpy\n'
        'assert "pkg_resources" in compat.APPLIED, compat.APPLIED\n'
        'assert sys.modules["pkg_resources"].__doc__.startswith("Stand-in")\n'
        'print(F.sum(numpy.ones(3, "f")).array)\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '3.0'
    assert result.stderr == ''


def test_report_sums_are_float64_on_every_stack():
    summary = reporter.Summary()
    for value in (0.1, 0.2, 0.7):
        summary.add(numpy.float32(value))
    mean = summary.compute_mean()
    assert mean.dtype == numpy.float64
    expected = (float(numpy.float32(0.1)) + float(numpy.float32(0.2))
                + float(numpy.float32(0.7))) / 3
    assert mean == pytest.approx(expected, rel=1e-15)


def chainer_importers():
    """(module, line of its first chainer import, of its compat import:
    ``from capsnet import compat``, or ``import nets``, which imports it
    first)."""
    paths = [path for pattern in ('*.py', 'tests/*.py', 'dev/*.py',
                                  'capsnet/**/*.py')
             for path in glob.glob(os.path.join(REPO, pattern),
                                   recursive=True)]
    for path in sorted(paths):
        with open(path) as f:
            tree = ast.parse(f.read())
        chainer_line = compat_line = None
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + ['{}.{}'.format(node.module, a.name)
                                         for a in node.names]
            for name in names:
                if name.split('.')[0] == 'chainer' and (
                        chainer_line is None or node.lineno < chainer_line):
                    chainer_line = node.lineno
                if name in ('capsnet.compat', 'nets') and (
                        compat_line is None or node.lineno < compat_line):
                    compat_line = node.lineno
        if chainer_line is not None and path != compat.__file__:
            yield os.path.relpath(path, REPO), chainer_line, compat_line


@pytest.mark.parametrize('module, chainer_line, compat_line',
                         list(chainer_importers()))
def test_compat_is_imported_before_chainer(module, chainer_line,
                                           compat_line):
    assert compat_line is not None and compat_line < chainer_line, (
        '{} imports chainer at line {} without importing compat before '
        'it'.format(module, chainer_line))


@pytest.mark.parametrize('tool', TOOLS)
def test_tool_starts_without_warnings(tool):
    result = subprocess.run([sys.executable, '-W', 'default', tool,
                             '--help'], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert 'usage:' in result.stdout


@pytest.mark.skipif(NUMPY_2, reason='NEP 50 is how NumPy 2 promotes; this '
                    'sentinel asks NumPy 1.26 where that would differ')
def test_no_project_code_changes_dtype_under_nep50(mnist_dir, tmp_path):
    """On NumPy 1.26, NPY_PROMOTION_STATE=weak_and_warn warns wherever NumPy
    2's promotion rules (NEP 50) would give another dtype. A short training
    run of both networks (the CapsNet with its decoder), evaluation
    included, must raise no such warning from the project's own files
    (Chainer's own are documented in compat.py)."""
    code = (
        'import warnings, sys, train\n'
        'warnings.simplefilter("always")\n'
        'with warnings.catch_warnings(record=True) as caught:\n'
        '    for arch, more in (("capsnet", ["--reconstruct"]),\n'
        '                       ("baseline", [])):\n'
        '        train.main(["--data-dir", sys.argv[1], "--arch", arch,\n'
        '                    "--train-size", "40", "--test-size", "20",\n'
        '                    "-b", "20", "-e", "1", "--no-progress",\n'
        '                    "-o", sys.argv[2] + "/" + arch] + more)\n'
        'for w in caught:\n'
        '    if "value-based promotion" in str(w.message):\n'
        '        print(w.filename, w.lineno)\n')
    result = subprocess.run(
        [sys.executable, '-c', code, mnist_dir, str(tmp_path)], cwd=REPO,
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, NPY_PROMOTION_STATE='weak_and_warn'))
    assert result.returncode == 0, result.stderr[-2000:]
    sites = [line.rsplit(' ', 1)[0] for line in result.stdout.splitlines()
             if line.startswith('/')]
    assert sites, 'the sentinel saw nothing: is weak_and_warn active?'
    # the project's files, not a venv's site-packages inside the checkout
    ours = [site for site in sites if site.startswith(REPO + os.sep)
            and '-packages' not in site]
    assert ours == [], ours
