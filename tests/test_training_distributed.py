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

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import cli
from capsnet.errors import CapsNetError
from capsnet.training import distributed
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
        TINY + ['--train-size', '1', '-b', '1']
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


# --------------------------------------------------------------------------
# A failure on one rank ends the whole job, said once (issue 26)
# --------------------------------------------------------------------------

def error_lines(text):
    return [line for line in text.splitlines() if line.startswith('error:')]


def run_fault(case, timeout=120):
    start = time.time()
    result = mpiexec(2, os.path.join('tests', 'mpi_fault_driver.py'), case,
                     timeout=timeout)
    return result, time.time() - start


@needs_mpi
def test_no_fault_ends_normally():
    result, _ = run_fault('none')
    assert result.returncode == 0, result.stderr[-3000:]
    assert error_lines(result.stderr + result.stdout) == []
    assert 'rank 0: done' in result.stdout


@needs_mpi
@pytest.mark.parametrize('case, fragments', [
    ('start', ['rank 1 of 2', 'cannot write out/rank1 (injected)']),
    ('middle', ['rank 1 of 2', 'snapshot cannot be written (injected)']),
    ('disk', ['rank 1 of 2', 'no space left', 'out/rank1/snapshot_epoch_1']),
    ('bug', ['rank 1 of 2', 'ZeroDivisionError: injected bug']),
])
def test_a_failing_rank_ends_the_job_with_one_line(case, fragments):
    """Rank 1 fails at its start check or mid-run while rank 0 waits in an
    allreduce: the job ends (no hang) with a non-zero status and the one
    line of rank 1's problem, printed once."""
    result, seconds = run_fault(case)
    assert result.returncode != 0, (result.stdout, result.stderr)
    lines = error_lines(result.stderr + result.stdout)
    assert len(lines) == 1, (result.returncode, result.stdout, result.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert seconds < 60, seconds   # chainer's import alone takes a while
    if case == 'start':   # nobody started: the check came first
        assert 'checks passed' not in result.stdout


# --------------------------------------------------------------------------
# MPI misuse: a launch without --communicator, snapshots of another size
# --------------------------------------------------------------------------

LAUNCHERS = ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'PMI_SIZE',
             'PMI_RANK', 'PMIX_RANK', 'MPI_LOCALNRANKS', 'MPI_LOCALRANKID',
             'MV2_COMM_WORLD_SIZE', 'MV2_COMM_WORLD_RANK', 'HYDRA_CONTROL_FD',
             'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'SLURM_PROCID',
             'PMI_FD')


@pytest.mark.parametrize('environ, size', [
    ({}, None),
    ({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '0'}, 4),
    ({'PMI_SIZE': '2', 'PMI_RANK': '1', 'MPI_LOCALNRANKS': '2'}, 2),  # MPICH
    ({'PMI_SIZE': '1', 'PMI_RANK': '0'}, 1),                  # mpiexec -n 1
    ({'MV2_COMM_WORLD_SIZE': '3'}, 3),                        # MVAPICH2
    ({'MPI_LOCALNRANKS': '2', 'MPI_LOCALRANKID': '0'}, 2),    # Hydra
    ({'PMIX_RANK': '0', 'SLURM_STEP_NUM_TASKS': '8'}, 8),     # srun pmix
    ({'PMIX_RANK': '3'}, 4),                                  # at least
    # Slurm alone is no MPI launch (a batch job running python once)
    ({'SLURM_NTASKS': '4', 'SLURM_PROCID': '0'}, None),
    ({'SLURM_STEP_NUM_TASKS': '2', 'SLURM_PROCID': '1'}, None),
    ({'OMPI_COMM_WORLD_SIZE': 'x'}, None),                     # garbage
    ({'PMI_SIZE': '0'}, None),
])
def test_launched_by_mpi_reads_the_launchers(monkeypatch, environ, size):
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_by_mpi() == size
    assert distributed.launched_by_mpi(environ) == size


def mpi_run(out, ranks, epochs=(1, 2)):
    """The snapshots of a run of ``ranks`` processes in ``out``."""
    for rank in range(ranks):
        folder = out if rank == 0 else out / 'rank{}'.format(rank)
        folder.mkdir(parents=True, exist_ok=True)
        for epoch in epochs:
            (folder / 'snapshot_epoch_{}'.format(epoch)).write_bytes(b'x')


@pytest.mark.parametrize('made, resumed, fragments', [
    (2, 1, ['made by 2 processes', 'mpiexec -n 2', '--communicator']),
    (4, 2, ['made by 4 processes', 'mpiexec -n 4']),
    (1, 2, ['made by 1 process', 'without mpiexec']),
    (3, 1, ['made by 3 processes']),
])
def test_snapshots_of_another_number_of_ranks_are_refused(
        tmp_path, made, resumed, fragments):
    out = tmp_path / 'out'
    mpi_run(out, made)
    for where in (out, out / 'snapshot_epoch_2'):  # --autoload, --resume
        with pytest.raises(CapsNetError) as caught:
            distributed.check_snapshot_ranks(str(where), resumed)
        message = str(caught.value)
        for fragment in fragments:
            assert fragment in message, message
        assert str(out) in message


@pytest.mark.parametrize('ranks', [1, 2, 3])
def test_snapshots_of_as_many_ranks_are_fine(tmp_path, ranks):
    out = tmp_path / 'out'
    mpi_run(out, ranks)
    distributed.check_snapshot_ranks(str(out), ranks)
    distributed.check_snapshot_ranks(str(out / 'snapshot_epoch_1'), ranks)
    distributed.check_snapshot_ranks(str(tmp_path / 'empty'), ranks)


def test_a_rank_folder_snapshot_without_mpi_is_refused(tmp_path):
    out = tmp_path / 'out'
    mpi_run(out, 2)
    with pytest.raises(CapsNetError) as caught:
        distributed.check_snapshot_ranks(
            str(out / 'rank1' / 'snapshot_epoch_2'), 1)
    assert 'rank 1' in str(caught.value)


def test_a_gpu_communicator_without_cupy_names_cupy(monkeypatch):
    """Not NCCL, not ChainerMN: CuPy is what is missing."""
    monkeypatch.setitem(sys.modules, 'cupy', None)
    for name in ('pure_nccl', 'flat', 'hierarchical'):
        with pytest.raises(CapsNetError) as caught:
            distributed.communicator(name, '@cupy:0')
        message = str(caught.value)
        assert 'CuPy' in message and 'not installed' in message, message
        assert 'NCCL' not in message.split(';')[0]


def test_a_failure_before_mpi_is_said_by_rank_0_only(monkeypatch):
    """Every rank meets the same missing piece; rank 0 alone says it (the
    launcher's rank variable, since MPI is not up yet)."""
    monkeypatch.setitem(sys.modules, 'cupy', None)
    monkeypatch.setenv('PMI_RANK', '1')
    monkeypatch.setenv('PMI_SIZE', '2')
    with pytest.raises(distributed.RankFailed) as caught:
        distributed.communicator('pure_nccl', '@cupy:0')
    assert caught.value.quiet
    status, out, err = run_quietly(
        lambda argv: distributed.communicator('pure_nccl', '@cupy:0'))
    assert (status, out, err) == (1, '', '')
    monkeypatch.setenv('PMI_RANK', '0')
    with pytest.raises(CapsNetError) as caught:
        distributed.communicator('pure_nccl', '@cupy:0')
    assert not isinstance(caught.value, distributed.RankFailed)


def run_quietly(main):
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.run_main(main, [])
    return status, out.getvalue(), err.getvalue()
