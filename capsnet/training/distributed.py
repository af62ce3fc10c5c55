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
import os
import sys

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import cli
from capsnet.training import extensions as ext

#: ChainerMN's communicators; only 'naive' works without GPUs
COMMUNICATORS = ('naive', 'flat', 'hierarchical', 'two_dimensional',
                 'single_node', 'non_cuda_aware', 'pure_nccl')
CPU_COMMUNICATORS = ('naive',)
INSTALL = ('pip install -r requirements-mpi.txt, then launch with mpiexec -n '
           'N python train.py --communicator naive ...')


def communicator(name, device_spec):
    """ChainerMN communicator ``name``, or exit with one line.

    ``device_spec`` is train.py's --device (after cli.device_spec): GPU
    communicators need @cupy:N, the CPU only has 'naive'.
    """
    on_gpu = device_spec is not None and 'cupy' in str(device_spec)
    if not on_gpu and name not in CPU_COMMUNICATORS:
        cli.fail('--communicator {} needs GPUs (NCCL or CUDA-aware MPI); on '
                 'the CPU use --communicator naive, or add --device @cupy:0 '
                 '(each rank then takes the GPU of its local rank)'
                 .format(name))
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
    if len(train) < comm.size:
        cli.fail('{} ranks but only {} training examples; use at most {} '
                 'processes (mpiexec -n) or more --train-size'.format(
                     comm.size, len(train), len(train)))
    if len(test) < comm.size:
        cli.fail('{} ranks but only {} test examples; use at most {} '
                 'processes (mpiexec -n) or more --test-size'.format(
                     comm.size, len(test), len(test)))
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
