"""Run a tool and send its process a signal at a chosen point, for the
tests of Ctrl-C and SIGTERM (tests/test_faults.py): deterministic, no
sleeping and no race with the process's start.

    python tests/interrupt_at.py POINT SIGNAL TOOL.py [ARGS ...]

POINT is one of
    import:MODULE      when MODULE is first imported (the tool is still
                       importing: cli.run_main is not in place yet)
    write              in the middle of the first atomic write (the first
                       os.fsync: its temporary file exists, the final one
                       is not replaced yet)
    call:MODULE:NAME   on the first call of MODULE.NAME (NAME may be
                       dotted: ``nets:CapsNet.forward``)
SIGNAL is INT or TERM. The tool runs as ``__main__`` (runpy), with
``sys.argv`` as it would have from the command line; a point that is
never reached leaves the tool to end normally (the test then fails on its
exit status).
"""
import importlib
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fire(signum):
    os.kill(os.getpid(), signum)


class ImportTrap:
    """A meta path finder that sends the signal when ``module`` is first
    looked for, and then lets the import go on."""

    def __init__(self, module, signum):
        self.module, self.signum, self.fired = module, signum, False

    def find_spec(self, name, path=None, target=None):
        if name == self.module and not self.fired:
            self.fired = True
            fire(self.signum)
        return None


def trap_call(owner, name, signum):
    original = getattr(owner, name)

    def trapped(*args, **kwargs):
        setattr(owner, name, original)
        fire(signum)
        return original(*args, **kwargs)
    setattr(owner, name, trapped)


def main():
    point, signame, tool, *argv = sys.argv[1:]
    signum = {'INT': signal.SIGINT, 'TERM': signal.SIGTERM}[signame]
    sys.path.insert(0, REPO)
    if point.startswith('import:'):
        sys.meta_path.insert(0, ImportTrap(point[len('import:'):], signum))
    elif point == 'write':
        trap_call(os, 'fsync', signum)
    elif point.startswith('call:'):
        module, name = point[len('call:'):].split(':')
        from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
        owner = importlib.import_module(module)
        *path, name = name.split('.')
        for part in path:
            owner = getattr(owner, part)
        trap_call(owner, name, signum)
    else:
        raise SystemExit('unknown point {!r}'.format(point))
    sys.argv = [tool] + argv
    runpy.run_path(os.path.join(REPO, tool), run_name='__main__')


if __name__ == '__main__':
    main()
