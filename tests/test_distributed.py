"""train.py --communicator: ChainerMN over MPI with 2 processes on the CPU.

Needs mpi4py and an mpiexec (requirements-mpi.txt; CI installs both);
skipped with that reason otherwise.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy
import pytest

from conftest import MNIST_DIR, assert_one_error, needs_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which('mpiexec', path=os.path.dirname(sys.executable)) or \
    shutil.which('mpiexec')
try:
    from mpi4py import MPI  # noqa: F401
    HAVE_MPI4PY = True
except Exception:  # not installed, or no MPI library to load
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(
    not (MPIEXEC and HAVE_MPI4PY),
    reason='needs mpi4py and mpiexec: pip install -r requirements-mpi.txt')
TINY = ['--data-dir', MNIST_DIR, '--train-size', '120', '--test-size', '60',
        '-b', '20', '--no-progress']


def mpiexec(n, *args, timeout=600, **kwargs):
    command = [MPIEXEC, '-n', str(n), sys.executable] + [str(a) for a in
                                                         args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


GRADIENT_CHECK = r'''
import numpy, nets, chainer, chainermn
comm = chainermn.create_communicator('naive')
random = numpy.random.RandomState(0)
x = random.rand(8, 1, 28, 28).astype(numpy.float32)
t = random.randint(0, 10, 8).astype(numpy.int32)
numpy.random.seed(0)
model = nets.CapsNet(reconstruct=True)
reference = model.copy(mode='copy')
half = slice(4 * comm.rank, 4 * comm.rank + 4)
model(x[half], t[half]).backward()
comm.multi_node_mean_grad(model)   # what the multi-node optimizer does
if comm.rank == 0:
    reference(x, t).backward()     # one process, the concatenated batch
    worst = 0.0
    for (name, p), (_, q) in zip(sorted(model.namedparams()),
                                 sorted(reference.namedparams())):
        scale = float(numpy.abs(q.grad).max()) or 1.0
        worst = max(worst, float(numpy.abs(p.grad - q.grad).max()) / scale)
    print('worst relative difference', worst)
'''


@needs_mpi
def test_allreduced_gradients_equal_the_gradient_of_the_whole_batch():
    result = mpiexec(2, '-c', GRADIENT_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.split()[-1])
    assert worst < 1e-5


def load_weights(path):
    with numpy.load(str(path)) as npz:
        return {key: npz[key] for key in npz.files}


@needs_mpi
@needs_mnist
@pytest.mark.slow
def test_two_processes_write_one_log_and_one_model(tmp_path):
    out, model = tmp_path / 'run', tmp_path / 'model.npz'
    result = mpiexec(2, 'train.py', '--communicator', 'naive', '-e', '1',
                     '-o', out, '--save', model, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('model saved to') == 1   # rank 0 alone
    assert 'global batch 40' in result.stdout
    assert sorted(os.listdir(out / 'rank1')) == ['snapshot_epoch_1']
    assert not (out / 'rank1' / 'log').exists()
    log = json.loads((out / 'log').read_text())
    assert [entry['epoch'] for entry in log] == [1]
    final = json.loads((out / 'final.json').read_text())
    assert final['processes'] == 2 and final['global_batchsize'] == 40
    assert final['train_size'] == 120 and final['test_size'] == 60
    # the multi-node evaluation counts exactly what one process counts
    evaluation = subprocess.run(
        [sys.executable, 'evaluate.py', '--load', str(model), '--data-dir',
         MNIST_DIR, '--test-size', '60', '--json', '-o', str(tmp_path / 'e')],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr
    errors = json.loads(evaluation.stdout.strip().splitlines()[-1])['errors']
    assert round(final['final_test_error'] * 60) == errors


@needs_mpi
@needs_mnist
@pytest.mark.slow
def test_kill_9_then_autoload_gives_the_same_weights(tmp_path):
    reference = tmp_path / 'reference.npz'
    result = mpiexec(2, 'train.py', '--communicator', 'naive', '-e', '2',
                     '-o', tmp_path / 'straight', '--save', reference, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]

    out, resumed = tmp_path / 'killed', tmp_path / 'resumed.npz'
    command = [MPIEXEC, '-n', '2', sys.executable, 'train.py',
               '--communicator', 'naive', '-e', '2', '-o', str(out),
               '--save', str(resumed)] + TINY
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not ((out / 'snapshot_epoch_1').exists()
               and (out / 'rank1' / 'snapshot_epoch_1').exists()):
        assert process.poll() is None, 'the run ended before its snapshot'
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)   # every rank and mpiexec
    process.wait()
    assert not resumed.exists()

    result = mpiexec(2, 'train.py', '--communicator', 'naive', '-e', '2',
                     '-o', out, '--save', resumed, '--autoload', *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resumed from' in result.stdout
    expected, actual = load_weights(reference), load_weights(resumed)
    assert sorted(expected) == sorted(actual)
    for key in expected:
        numpy.testing.assert_array_equal(actual[key], expected[key],
                                         err_msg=key)


@needs_mpi
@needs_mnist
def test_more_ranks_than_training_examples_is_one_line(tmp_path):
    args = ['train.py', '--communicator', 'naive', '-o', tmp_path / 'o'] + \
        TINY + ['--train-size', '1']
    assert_one_error(mpiexec(2, *args), '2 ranks but only 1 training')
    assert not (tmp_path / 'o' / 'log').exists()


def run_train(*args, prelude=''):
    code = (prelude + 'import runpy, sys\n'
            'sys.argv = ["train.py"] + sys.argv[1:]\n'
            'runpy.run_path("train.py", run_name="__main__")\n')
    return subprocess.run([sys.executable, '-c', code] + [str(a) for a in
                                                          args],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize('prelude, fragment', [
    ('import sys; sys.modules["mpi4py"] = None\n', 'mpi4py is not installed'),
    ('import sys, mpi4py; sys.modules["mpi4py.MPI"] = None\n',
     'needs an MPI library'),
])
def test_missing_mpi_is_one_line(tmp_path, prelude, fragment):
    if 'mpi4py;' in prelude and not HAVE_MPI4PY:
        pytest.skip('needs mpi4py installed to simulate a missing library')
    result = run_train('--communicator', 'naive', '-o', tmp_path / 'o',
                       prelude=prelude)
    assert_one_error(result, fragment, 'requirements-mpi.txt')
    assert not (tmp_path / 'o').exists() or not os.listdir(tmp_path / 'o')


def test_unknown_and_gpu_only_communicators_are_one_line(tmp_path):
    result = run_train('--communicator', 'carrier-pigeon', '-o', tmp_path)
    assert_one_error(result, '--communicator', status=2)
    result = run_train('--communicator', 'pure_nccl', '-o', tmp_path / 'o')
    assert_one_error(result, 'pure_nccl needs GPUs', 'naive')


def test_without_the_flag_nothing_mpi_is_imported():
    code = ('import sys, train\n'
            'loaded = [m for m in sys.modules if m.split(".")[0] in '
            '("mpi4py", "chainermn")]\n'
            'print(loaded)\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'
