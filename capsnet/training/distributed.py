"""Data-parallel training with ChainerMN (``train.py --communicator NAME``).

Launched as ``mpiexec -n N python train.py --communicator naive ...``: every
process (rank) holds the whole model, trains on its own shard of the
training set with batch ``-b`` (so the global batch is N x b), and the
gradients are averaged over the ranks at every step (ChainerMN's
multi-node optimizer, which also gives every rank rank 0's weights at the
first update). Rank 0 alone prints and writes the log, the plots,
``final.json`` and the model; every rank snapshots its own state (rank 0 in
--out as without MPI, rank r in --out/rank<r>), so ``--autoload`` resumes
each rank from the newest epoch that all of them have.

Nothing here imports MPI until ``communicator`` is called: without
``--communicator`` train.py never loads mpi4py or ChainerMN.
"""
import contextlib
import errno
import os
import re
import sys
import time
import traceback

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import cli
from capsnet.errors import CapsNetError
from capsnet.training import extensions as ext

#: ChainerMN's communicators; only 'naive' works without GPUs
COMMUNICATORS = ('naive', 'flat', 'hierarchical', 'two_dimensional',
                 'single_node', 'non_cuda_aware', 'pure_nccl')
CPU_COMMUNICATORS = ('naive',)
INSTALL = ('pip install -r requirements-mpi.txt, then launch with mpiexec -n '
           'N python train.py --communicator naive ...')


def communicator(name, device_spec):
    """ChainerMN communicator ``name``; a CapsNetError (one line) if it
    cannot be made.

    ``device_spec`` is train.py's --device (after cli.device_spec): GPU
    communicators need @cupy:N and CuPy, the CPU only has 'naive'. Every
    rank meets the same problem here, before MPI is up: rank 0 (by the
    launcher's variables, see ``launched_rank``) raises the message, the
    others ``RankFailed``, so the job says it once.
    """
    try:
        return _communicator(name, device_spec)
    except RankFailed:
        raise
    except CapsNetError as e:
        if launched_rank() not in (None, 0):
            raise RankFailed(e.status) from None
        raise


def _communicator(name, device_spec):
    on_gpu = device_spec is not None and 'cupy' in str(device_spec)
    if not on_gpu and name not in CPU_COMMUNICATORS:
        cli.fail('--communicator {} needs GPUs (NCCL or CUDA-aware MPI); on '
                 'the CPU use --communicator naive, or add --device @cupy:0 '
                 '(each rank then takes the GPU of its local rank)'
                 .format(name))
    if on_gpu:
        try:
            import cupy  # noqa: F401
        except ImportError:
            cli.fail('--communicator {} with --device {} needs CuPy, which '
                     'is not installed; install CuPy with the CUDA libraries '
                     'for your driver (README.md, Install), or train on the '
                     'CPU with --communicator naive and no --device'.format(
                         name, device_spec))
    try:
        import mpi4py
    except ImportError:
        cli.fail('--communicator needs mpi4py and an MPI library, and mpi4py '
                 'is not installed; ' + INSTALL)
    try:
        from mpi4py import MPI  # noqa: F401  (loads the MPI library)
    except (ImportError, RuntimeError, OSError) as e:
        cli.fail('--communicator needs an MPI library, and mpi4py {} cannot '
                 'load one ({}); {}'.format(
                     mpi4py.__version__, ' '.join(str(e).split()), INSTALL))
    import chainermn
    try:
        return chainermn.create_communicator(name)
    except Exception as e:  # ChainerMN raises several kinds here
        cli.fail('cannot create the {} communicator ({}: {}); on the CPU use '
                 '--communicator naive'.format(
                     name, type(e).__name__,
                     ' '.join(str(e).split()) or 'no message'))


# --------------------------------------------------------------------------
# Which launcher started this process
# --------------------------------------------------------------------------

#: (size, rank) variables of the MPI launchers: Open MPI's mpirun/prterun,
#: MPICH's and Intel MPI's Hydra (and Slurm's srun --mpi=pmi2), MVAPICH2
_SIZE_RANK = (('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK'),
              ('PMI_SIZE', 'PMI_RANK'),
              ('MV2_COMM_WORLD_SIZE', 'MV2_COMM_WORLD_RANK'))
#: variables set by an MPI launcher without the world size: Hydra's
#: processes on this node, PMIx's rank (Open MPI 5, srun --mpi=pmix)
_LOCAL_SIZE, _LOCAL_RANK, _PMIX_RANK = ('MPI_LOCALNRANKS', 'MPI_LOCALRANKID',
                                        'PMIX_RANK')
#: Slurm's task count: an MPI world size only when an MPI rank variable is
#: set too (Slurm alone runs a program, not an MPI job)
_SLURM_SIZE = ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS')


def _count(environ, name, low):
    """int(environ[name]) when it is an integer >= low, else None."""
    try:
        value = int(environ.get(name, ''))
    except ValueError:
        return None
    return value if value >= low else None


def launched_by_mpi(environ=None):
    """The world size an MPI launcher (mpiexec, mpirun, srun --mpi=...) gave
    this process, read from its environment variables (default os.environ);
    None when none launched it. 1 for ``mpiexec -n 1``.

    Slurm's own variables count only beside an MPI rank variable (PMIx's):
    a batch job running python once is no MPI launch.
    """
    environ = os.environ if environ is None else environ
    for size, _ in _SIZE_RANK:
        value = _count(environ, size, 1)
        if value is not None:
            return value
    if _PMIX_RANK in environ:
        rank = _count(environ, _PMIX_RANK, 0)
        sizes = [_count(environ, name, 1) for name in _SLURM_SIZE +
                 (_LOCAL_SIZE,)]
        known = [n for n in sizes if n is not None]
        if rank is not None or known:
            return max(known + [(rank or 0) + 1])
    return _count(environ, _LOCAL_SIZE, 1)


def launched_rank(environ=None):
    """This process's rank by its launcher's variables, or None."""
    environ = os.environ if environ is None else environ
    for name in [rank for _, rank in _SIZE_RANK] + [_PMIX_RANK,
                                                    _LOCAL_RANK]:
        value = _count(environ, name, 0)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------
# A failure on one rank ends the job, said once
# --------------------------------------------------------------------------

class RankFailed(CapsNetError):
    """This rank stops because ANOTHER rank failed (check_all), or because
    rank 0 says a problem every rank met (communicator): ``quiet``, it has
    nothing to print. A tool returns ``e.status`` without a line (cli.run_main
    does so for any CapsNetError whose ``quiet`` is true)."""
    quiet = True

    def __init__(self, status=1):
        super().__init__('', status)


class RankError(CapsNetError):
    """Rank 0's account of the lowest failing rank's problem (check_all),
    which every rank agreed on: guard lets it pass, the ranks end in
    step."""


def _payload(problem):
    """(message, status) of None, a message or a CapsNetError."""
    if problem is None:
        return None
    if isinstance(problem, CapsNetError):
        return str(problem), problem.status
    return ' '.join(str(problem).split()), 1


def check_all(comm, problem=None):
    """Agree on the ranks' checks before anything is written.

    Every rank calls it, with None or its problem (a one-line message or a
    CapsNetError); all ranks then know all problems (allgather). If any rank
    has one, every rank raises: rank 0 a ``RankError`` naming the lowest
    failing rank and its problem (rank 0's stderr is the one the user sees),
    the other ranks a quiet ``RankFailed``; with no problem anywhere it
    returns None.
    """
    problems = comm.mpi_comm.allgather(_payload(problem))
    failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
    if not failed:
        return
    rank, (message, status) = failed[0]
    if comm.rank != 0:
        raise RankFailed(status)
    others = len(failed) - 1
    raise RankError('{}{}{}'.format(
        '' if comm.size == 1 else 'rank {} of {}: '.format(rank, comm.size),
        message, '' if not others else ' (and {} more rank{})'.format(
            others, 's' if others > 1 else '')), status)


@contextlib.contextmanager
def agreed(comm):
    """``check_all`` around a block of checks: a CapsNetError raised in the
    block on any rank ends every rank (as check_all says); the block must
    write nothing, and every rank must reach the end of it."""
    problem = None
    try:
        yield
    except CapsNetError as e:
        problem = e
    check_all(comm, problem)


def describe(error):
    """(one-line message, exit status) of an exception, as cli.run_main
    would print it; (None, 1) for one it has no line for (a bug)."""
    if isinstance(error, CapsNetError):
        return str(error), error.status
    if isinstance(error, MemoryError):
        return 'out of memory ({}); use smaller batches (--batchsize/-b, ' \
               '--eval-batchsize)'.format(' '.join(str(error).split()) or
                                          'MemoryError'), 1
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                       errno.EDQUOT):
        return 'no space left on the disk while writing {}; free some ' \
               'space, then continue with --autoload'.format(
                   error.filename or 'a file'), 1
    return None, 1


@contextlib.contextmanager
def guard(comm):
    """Around the training run of an MPI job: an exception on this rank
    ends EVERY rank within seconds (the others may wait in an allreduce
    that will never complete).

    The failing rank writes its one line ``error: rank R of N: ...`` to the
    process's real stderr (``sys.__stderr__``: quiet_unless_root silences
    ``sys.stderr`` of ranks > 0), a traceback first for an unexpected error
    (a bug), then calls ``MPI_Abort`` with the error's status, which the
    launcher passes on to every rank. ``RankError`` / ``RankFailed``
    (check_all: every rank already ends in step), KeyboardInterrupt,
    SystemExit and cli.Terminated (the launcher sends a signal to every
    rank) pass through. With one process it only re-raises.
    """
    try:
        yield
    except (RankError, RankFailed, KeyboardInterrupt, SystemExit,
            cli.Terminated):
        raise
    except BaseException as e:
        if comm.size == 1:
            raise
        message, status = describe(e)
        stream = sys.__stderr__
        if message is None:
            traceback.print_exc(file=stream)
            message = '{}: {}'.format(type(e).__name__,
                                      ' '.join(str(e).split()))
        print('error: rank {} of {}: {}'.format(comm.rank, comm.size,
                                                message),
              file=stream, flush=True)
        # give the launcher a moment to forward the line: an immediate
        # Abort lost it in about one run in three (mpiexec -n 2, mpich)
        time.sleep(1)
        comm.mpi_comm.Abort(status)


def rank_device(comm, device_spec):
    """Each rank on the GPU of its local rank; the CPU stays the CPU."""
    if device_spec is not None and 'cupy' in str(device_spec):
        return '@cupy:{}'.format(comm.intra_rank)
    return device_spec


def quiet_unless_root(comm):
    """Ranks other than 0 print nothing (rank 0 reports for all of them,
    and every rank meets the same checks on the same data).
    CAPSNET_MPI_ALL_OUTPUT=1 keeps every rank's output, for debugging."""
    if comm.rank != 0 and os.environ.get('CAPSNET_MPI_ALL_OUTPUT') != '1':
        devnull = open(os.devnull, 'w')
        sys.stdout = sys.stderr = devnull


def rank_folder(out, comm):
    """Where a rank's snapshots go: --out for rank 0, --out/rank<r> else."""
    return out if comm.rank == 0 else os.path.join(out, 'rank{}'.format(
        comm.rank))


def scatter(comm, train, test, seed):
    """Each rank's shards: training examples shuffled once by ``seed`` and
    split evenly, test examples split in order (for the exact evaluator)."""
    import chainermn
    for what, data, flag in (('training', train, '--train-size'),
                             ('test', test, '--test-size')):
        if len(data) < comm.size:   # every rank meets it: said by rank 0
            if comm.rank:
                raise RankFailed()
            raise RankError('{} ranks but only {} {} examples; use at most {} '
                            'processes (mpiexec -n) or more {}'.format(
                                comm.size, len(data), what, len(data), flag))
    return (chainermn.scatter_dataset(train, comm, shuffle=True, seed=seed),
            chainermn.scatter_dataset(test, comm))


def optimizer(actual, comm, model):
    """``actual`` set up on ``model`` and wrapped so that gradients are
    averaged over the ranks; every rank now holds rank 0's weights.

    ChainerMN's multi-node optimizer spends its first ``update`` on that
    broadcast and skips the step; a run resumed from a snapshot would skip
    one more step than the uninterrupted run and end with other weights.
    Broadcasting here, before the first step and before any resume, keeps
    every update a real one.
    """
    import chainermn
    wrapped = chainermn.create_multi_node_optimizer(actual, comm)
    wrapped.setup(model)
    comm.bcast_data(model)
    wrapped.is_changed(model)   # records the parameters it has now seen
    return wrapped


def common_snapshot(comm, out, usable=lambda path: True):
    """The newest epoch whose snapshot every rank has intact (``usable``):
    this rank's path to it, or None when no rank has any. Snapshots on some
    ranks only (made with another number of processes) are refused."""
    mine = {epoch: path for epoch, path in
            ext.snapshots(rank_folder(out, comm)).items() if usable(path)}
    everyone = comm.mpi_comm.allgather(sorted(mine))
    common = set(everyone[0]).intersection(*everyone[1:])
    if not common and any(everyone):
        cli.fail('the snapshots in {} do not cover all {} ranks (made with '
                 'another number of processes?); launch as many processes '
                 'as before, or use another --out'.format(out, comm.size))
    return mine[max(common)] if common else None


def rank_path(comm, path):
    """This rank's file for a --resume path given for rank 0."""
    if comm.rank == 0:
        return path
    return os.path.join(os.path.dirname(path) or '.', 'rank{}'.format(
        comm.rank), os.path.basename(path))


_RANK_FOLDER = re.compile(r'rank([1-9]\d*)\Z')


def snapshot_ranks(out):
    """How many processes made the snapshots in ``out``: 1 + the highest r
    of the rank<r> folders holding a snapshot (1 without any); None when
    ``out`` holds no snapshot at all."""
    ranks = [int(m.group(1)) for m in map(_RANK_FOLDER.match,
                                            _names(out)) if m and
             ext.snapshots(os.path.join(out, m.group(0)))]
    if not ranks and not ext.snapshots(out):
        return None
    return 1 + max(ranks, default=0)


def _names(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def check_snapshot_ranks(path, size):
    """CapsNetError unless the snapshots at ``path`` (a run's --out for
    --autoload, or a snapshot file for --resume) were made by ``size``
    processes (1 without MPI): an MPI run's snapshots are per rank (rank 0
    in --out, rank r in --out/rank<r>) and resume only with as many."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    match = _RANK_FOLDER.match(os.path.basename(os.path.normpath(folder)))
    if match and not os.path.isdir(path) and size == 1:
        raise CapsNetError(
            '{} is the snapshot of rank {} of an MPI run; resume the run '
            'from its --out {} (the rank 0 snapshot) with mpiexec and '
            '--communicator, as it was launched'.format(
                path, match.group(1), os.path.dirname(folder)))
    made = snapshot_ranks(folder)
    if made is None or made == size:
        return
    how = ('mpiexec -n {} python train.py --communicator naive (or the '
           'communicator it used) ... --autoload'.format(made) if made > 1
           else 'train.py without mpiexec and --communicator')
    raise CapsNetError(
        'the snapshots in {} were made by {} process{}{} and this run has '
        '{}; resume it with {}, or start a fresh run in another --out'
        .format(folder, made, 'es' if made > 1 else '',
                ' (rank folder{} rank1{})'.format(
                    's' if made > 2 else '', ' to rank{}'.format(made - 1)
                    if made > 2 else '') if made > 1 else '',
                size if size > 1 else 'one (no MPI)', how))


class MultiNodeExactEvaluator(ext.ExactEvaluator):
    """ExactEvaluator over the test shards of all ranks: each rank's
    count-weighted sums are added up, so the means are those a single
    process would get over the whole set (accuracy counted exactly)."""

    def __init__(self, comm, iterator, target, **kwargs):
        super().__init__(iterator, target, **kwargs)
        self.comm = comm

    def evaluate(self):
        iterator = self.get_iterator('main')
        n_local = len(iterator.dataset)
        local = super().evaluate()
        sums = {key: float(chainer.backend.CpuDevice().send(
            getattr(value, 'array', value))) * n_local
            for key, value in local.items()}
        gathered = self.comm.mpi_comm.allgather((n_local, sums))
        total = sum(n for n, _ in gathered)
        return {key: sum(s[key] for _, s in gathered) / total
                for key in sorted(local)}


# --------------------------------------------------------------------------
# A tool's start under MPI
# --------------------------------------------------------------------------

def check_launch(communicator_name, environ=None):
    """CapsNetError when an MPI launcher started several processes but no
    --communicator was given: each would train alone on one --out."""
    size = launched_by_mpi(environ)
    if communicator_name is None and size is not None and size > 1:
        raise CapsNetError(
            'this process is one of {} started by an MPI launcher (mpiexec), '
            'but --communicator was not given, so each would train alone on '
            'the same --out; add --communicator naive (CPU) or pure_nccl '
            '(GPUs), or run python train.py without mpiexec'.format(size),
            status=2)


def start(settings):
    """The communicator of ``settings.communicator`` for this rank; its
    device set into ``settings.device``; ranks > 0 print nothing but
    their errors."""
    settings.device = cli.device_spec(settings.device)
    comm = communicator(settings.communicator, settings.device)
    quiet_unless_root(comm)
    settings.device = rank_device(comm, settings.device)
    return comm


def say_layout(comm, settings, n_train, log=print):
    log('{} processes ({} communicator), each with batch {} (global batch '
        '{}) and about {} training examples'.format(
            comm.size, settings.communicator, settings.batchsize,
            comm.size * settings.batchsize, n_train))
