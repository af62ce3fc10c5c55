"""Shared fixtures for the tests of the command-line tools.

- ``MNIST_DIR``: the real MNIST folder (shared/data/mnist beside the
  checkout, or $CAPSNET_SHARED_DATA/mnist); ``needs_mnist`` skips a test
  when it is absent, and the ``mnist_dir`` fixture returns it (or skips).
- ``fresh_model_path`` / ``no_decoder_model_path``: a freshly initialised
  ``nets.CapsNet()`` (seed 0), with / without the decoder, saved once per
  session with ``files.save_model``; ``small_baseline_path``: likewise a
  ``nets.BaselineCNN(input_size=1)``.
- ``one_error_line(err)``: the one ``error: ...`` line of a tool's stderr;
  ``assert_one_error(result, *fragments, status=None)`` checks a finished
  process (non-zero exit, that one line, the fragments in it) (plain
  functions: ``from conftest import one_error_line``).
- ``both_paths(model, x, t)``: loss and gradients on the plain and on the
  fast path, for the tests that compare them.
- ``random(*shape, seed, scale)``: a normal float64 array (kernel tests).
- ``tile_shape``: the (height, width) a mosaic of figures.tile must have.
- ``run_tool``: call a tool's ``main(argv)`` in-process and return
  (exit status, stdout, stderr), an exit by ``sys.exit`` included.
- As a user runs them: ``run_script(script, *args)`` (a finished
  ``python script``), ``start(*argv)`` / ``wait_for(condition, process)``
  (one still running, for the signal tests), ``TINY_TRAIN`` (train.py flags
  of a small run); ``leftovers(folder)`` / ``leftovers_below(folder)`` (what
  an interrupted write left), ``Unchanged(*paths)`` (files that must not
  change), the ``blocker`` fixture (a file where a folder is wanted),
  ``needs_no_cupy`` (skip where CuPy is installed),
  ``assert_missing_data_dir`` (a tool's line for a --data-dir not there).
- GPU switch: tests marked ``gpu`` run only when the environment variable
  CAPSNET_TEST_GPU is 1 (``CAPSNET_TEST_GPU=1 python -m pytest -q -m gpu``);
  otherwise they are skipped with that reason, so CI without a GPU stays
  green. The ``gpu_device`` fixture then fails (not skips) if CuPy or the
  GPU cannot be used, since the run asked for them. CAPSNET_TEST_DEVICE
  (default @cupy:0) names the device; @numpy runs the same tests on the CPU
  as a dry run of their code (CPU against CPU, GPU-only checks skipped).
- A pytest started in the background (``pytest &``, nohup) inherits SIGINT
  ignored, and so would every tool the tests start, which would then
  train on through the Ctrl-C tests: the default handler is put back here.
"""
import hashlib
import os
import signal
import subprocess
import tempfile
import sys
import time

import numpy
import pytest

# The tests find their data only where they say: no $CAPSNET_DATA and no
# --data-dir remembered from the user's own runs (Chainer's dataset folder
# is a fresh one for the session, set before chainer is imported)
os.environ.pop('CAPSNET_DATA', None)
os.environ.setdefault('CHAINER_DATASET_ROOT', tempfile.mkdtemp(
    prefix='capsnet-tests-dataset-'))

# the developer harnesses (gpu_check, benchmark, kernel_profile) import as
# modules too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'dev'))

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import cli, files
from chainer.backends import cuda
import nets

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

GPU_SWITCH = 'CAPSNET_TEST_GPU'
SHARED_DATA = os.environ.get('CAPSNET_SHARED_DATA') or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data')
MNIST_DIR = os.path.abspath(os.path.join(SHARED_DATA, 'mnist'))
MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
               't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
HAVE_MNIST = all(os.path.isfile(os.path.join(MNIST_DIR, f))
                 for f in MNIST_FILES)
_NO_MNIST = ('real MNIST not found in {} (set CAPSNET_SHARED_DATA to the '
             'folder holding mnist/)'.format(MNIST_DIR))
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=_NO_MNIST)


def pytest_sessionstart(session):
    """Said at the top of the run, -q or not: without MNIST the tests that
    need it skip, and why."""
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if not HAVE_MNIST and reporter is not None:
        reporter.write_line('note: the tests that need MNIST will SKIP: ' +
                            _NO_MNIST)


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('error: ') and 'Traceback' not in err
    return lines[0]


def gpu_tests_on():
    return os.environ.get(GPU_SWITCH) == '1'


def pytest_collection_modifyitems(config, items):
    if gpu_tests_on():
        return
    skip = pytest.mark.skip(reason='GPU tests are off: set {}=1 on a machine '
                            'with CuPy and a CUDA GPU'.format(GPU_SWITCH))
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def gpu_device():
    """chainer device @cupy:0; fails when the GPU tests are on without it."""
    import chainer
    from chainer.backends import cuda
    spec = os.environ.get('CAPSNET_TEST_DEVICE', '@cupy:0')
    if 'cupy' in spec and not cuda.available:
        pytest.fail('{}=1 but Chainer cannot use CuPy: {!r}'.format(
            GPU_SWITCH, getattr(cuda, '_resolution_error', None)))
    device = chainer.get_device(spec)
    device.use()
    return device
def assert_one_error(result, *fragments, status=None):
    """A finished process (CompletedProcess) failed with one line
    ``error: ...`` on stderr holding every fragment; return that line."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    if status is not None:
        assert result.returncode == status, result.stderr
    line = one_error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(scope='session')
def mnist_dir():
    """Folder with the four real MNIST files, or skip the test."""
    if not HAVE_MNIST:
        pytest.skip(_NO_MNIST)
    return MNIST_DIR


def _save_fresh(path, network=nets.CapsNet, **options):
    state = numpy.random.get_state()
    numpy.random.seed(0)
    try:
        files.save_model(str(path), network(**options))
    finally:
        numpy.random.set_state(state)
    return str(path)


@pytest.fixture(scope='session')
def fresh_model_path(tmp_path_factory):
    """A freshly initialised CapsNet() (with decoder) saved to a file."""
    return _save_fresh(tmp_path_factory.mktemp('models') / 'fresh.npz')


@pytest.fixture(scope='session')
def no_decoder_model_path(tmp_path_factory):
    """A freshly initialised CapsNet(reconstruct=False) saved to a file."""
    return _save_fresh(tmp_path_factory.mktemp('models') / 'no_decoder.npz',
                       reconstruct=False)


@pytest.fixture(scope='session')
def small_baseline_path(tmp_path_factory):
    """A baseline CNN model file. input_size=1 keeps it small (9.5 MB
    instead of 140 MB for 28 x 28); what is checked is its architecture."""
    return _save_fresh(tmp_path_factory.mktemp('models') / 'nets.npz',
                       nets.BaselineCNN, input_size=1)


def both_paths(model, x, t):
    """{fast: (loss, {parameter name: gradient})} of one forward and
    backward pass of ``model`` on (x, t) with model.fast False, then True:
    what the fast-against-plain tests compare."""
    results = {}
    for fast in (False, True):
        model.fast = fast
        model.cleargrads()
        loss = model(x, t)
        loss.backward()
        results[fast] = (float(loss.array), {
            name: p.grad.copy() for name, p in model.namedparams()})
    return results


def tile_shape(rows, cols, side, border=2):
    """(height, width) of a figures.tile mosaic of rows x cols tiles of side
    x side pixels with ``border`` pixels around and between them."""
    return (rows * (side + border) + border, cols * (side + border) + border)


@pytest.fixture
def run_tool(capsys):
    """run_tool(main, argv) -> (status, stdout, stderr) of main(argv)."""
    def run(main, argv):
        capsys.readouterr()
        try:
            status = cli.run_main(main, [str(a) for a in argv])
        except SystemExit as e:   # --help, or a tool's own sys.exit
            status = e.code
        out, err = capsys.readouterr()
        if status is None:
            status = 0
        return status, out, err
    return run


# -- running the tools as a user does ---------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py flags of a small run (a few seconds an epoch on the CPU)
TINY_TRAIN = ['--train-size', '150', '--test-size', '50', '-b', '50',
              '--routing', '1', '--no-progress']


def leftovers(folder):
    """Temporary files an interrupted write left in ``folder``."""
    return [n for n in os.listdir(folder)
            if n.endswith('.tmp') or n.startswith('tmp')]


def leftovers_below(folder):
    """Temporary files and folders, and lock files, anywhere below."""
    found = []
    for top, dirs, names in os.walk(str(folder)):
        found += [os.path.join(top, n) for n in dirs + names
                  if n.endswith('.tmp') or n.startswith('tmp') or
                  n == files.LOCK_NAME]
    return found


def start(*argv):
    """Start ``python argv`` in the repository (text pipes, unbuffered)."""
    return subprocess.Popen([sys.executable, *[str(a) for a in argv]],
                            cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))


def wait_for(condition, process, seconds=120):
    """Poll ``condition()`` while ``process`` runs; fail on its end or a
    timeout."""
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


needs_no_cupy = pytest.mark.skipif(
    cuda.available, reason='CuPy is installed here; these cases check the '
                           'message for a machine without it')


def run_script(script, *args, env=None):
    """Run ``python REPO/script args`` (or ``python -m module args`` for a
    script '-m module') -> CompletedProcess (text)."""
    environment = dict(os.environ, **(env or {}))
    program = script.split() if script.startswith('-m ') else [
        os.path.join(REPO, script)]
    return subprocess.run(
        [sys.executable] + program + [str(a) for a in args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env=environment)


def file_md5(path):
    with open(str(path), 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


class Unchanged:
    """Files written before a run, to check afterwards that none changed."""

    def __init__(self, *paths):
        self.before = {}
        for path in paths:
            path = str(path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                with open(path, 'wb') as f:
                    f.write(b'written before the run: ' + path.encode())
            self.before[path] = (file_md5(path), os.stat(path).st_mtime_ns)

    def check(self):
        for path, (digest, mtime) in self.before.items():
            assert os.path.exists(path), path + ' was removed'
            assert (file_md5(path), os.stat(path).st_mtime_ns) == (digest, mtime), \
                path + ' was changed'


@pytest.fixture
def blocker(tmp_path):
    """A plain file: any path below it cannot be created."""
    path = tmp_path / 'a-file'
    path.write_text('keep me')
    return path


def random(*shape, seed=0, scale=1.0):
    """Standard normal float64 array of ``shape`` (times ``scale``)."""
    return numpy.random.RandomState(seed).randn(*shape) * scale


def assert_missing_data_dir(run_tool, main, argv, data_dir):
    """A tool given a --data-dir that does not exist: one line naming it."""
    status, _, err = run_tool(main, list(argv) + ['--data-dir', data_dir])
    assert status != 0
    assert '--data-dir {} does not exist'.format(data_dir) in \
        one_error_line(err)
