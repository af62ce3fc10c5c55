"""A fault injected on one rank of an MPI job, for tests/test_training_distributed.py:

    mpiexec -n 2 python tests/mpi_fault_driver.py CASE

CASE is where rank 1 fails: ``start`` (its check before writing anything:
distributed.check_all), ``middle`` (a CapsNetError inside distributed.guard
after a few allreduces, while rank 0 waits in the next one), ``disk`` (the
same with OSError ENOSPC), ``bug`` (an unexpected exception) or ``none``.
Every rank runs as a tool does, through cli.run_main, with rank > 0 quiet
(distributed.quiet_unless_root).
"""
import errno
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from capsnet import cli  # noqa: E402
from capsnet.errors import CapsNetError  # noqa: E402
from capsnet.training import distributed  # noqa: E402


def main(argv):
    case = argv[0]
    comm = distributed.communicator('naive', None)
    distributed.quiet_unless_root(comm)
    failing = comm.rank == 1
    problem = None
    if case == 'start' and failing:
        problem = 'cannot write out/rank1 (injected); choose another --out'
    distributed.check_all(comm, problem)
    print('rank {}: checks passed'.format(comm.rank), flush=True)
    with distributed.guard(comm):
        for step in itertools.count():
            total = comm.mpi_comm.allreduce(1)
            assert total == comm.size
            if failing and step == 3:
                if case == 'middle':
                    raise CapsNetError('the snapshot cannot be written '
                                       '(injected); free some space')
                if case == 'disk':
                    raise OSError(errno.ENOSPC, 'No space left on device',
                                  'out/rank1/snapshot_epoch_1')
                if case == 'bug':
                    raise ZeroDivisionError('injected bug')
            if case == 'none' and step == 5:
                break
    print('rank {}: done'.format(comm.rank), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main, sys.argv[1:]))
