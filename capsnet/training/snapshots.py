"""The one snapshot format: Chainer's trainer snapshot (an npz of the
trainer: model, Adam's state, the updater's random states and iteration,
the extensions' state) as ``snapshot_epoch_N`` in the run folder, written
atomically every epoch; ``resume`` loads ``--resume`` or, with
``--autoload``, the newest intact one.
"""
import os
import zipfile
import zlib

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer.training.extensions import snapshot_writers

from capsnet import cli, files
from capsnet.training import distributed
from capsnet.training import extensions as ext

DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def snapshot_bytes(n_parameters):
    """Bytes of one snapshot (uncompressed): the parameters, Adam's two
    moments and a little state."""
    return 3 * 4 * n_parameters + (1 << 20)


class AtomicSnapshotWriter(snapshot_writers.Writer):
    """Snapshots through files.atomic_write: a full disk is one line
    naming the file and the space it needs, an interrupt leaves no
    temporary file, and the previous snapshot stays intact."""

    def __call__(self, filename, outdir, target):
        # uncompressed: zlib took 2.85 s per snapshot of the paper's model
        # on this project's CPU for a file 11% smaller (84 against 94 MB),
        # most of an epoch's overhead on a GPU (docs/gpu.md)
        files.atomic_write(
            os.path.join(outdir, filename),
            lambda f: chainer.serializers.save_npz(f, target,
                                                   compression=False))
        self._post_save()


def readable_snapshot(path):
    """None if every array of the snapshot at ``path`` reads (CRCs and
    all), else why not."""
    try:
        with files.open_npz(path) as npz:
            for name in npz.files:
                npz[name]
    except DAMAGED as e:
        return '{}: {}'.format(type(e).__name__, str(e).splitlines()[0]
                               if str(e) else '')
    return None


def autoload_path(out, log=print):
    """The newest intact snapshot in ``out`` (None if there is none); the
    damaged newer ones are skipped, and that is said."""
    found = ext.snapshots(out)
    for epoch in sorted(found, reverse=True):
        problem = readable_snapshot(found[epoch])
        if problem is None:
            return found[epoch]
        log('skipping the damaged snapshot {} ({})'.format(found[epoch],
                                                           problem))
    if found:
        log('no intact snapshot in {}; starting from epoch 0'.format(out))
    return None


def check_recorded(trainer, path):
    """Compare the options and settings a snapshot recorded with this run's
    before loading it, so a conflict is named (and not found later as a
    shape error of some array)."""
    try:
        with files.open_npz(path) as npz:
            for name in ('options', 'settings'):
                trainer.get_extension(name).serialize(
                    chainer.serializers.NpzDeserializer(
                        npz, path='extensions/{}/'.format(name)))
    except ValueError as e:
        if 'in the snapshot' not in str(e):
            return  # not readable: load_npz below says so
        cli.fail('cannot resume from {}: {}'.format(path, e))
    except Exception:  # not readable: load_npz below says so
        return


def resume(trainer, resume_path, autoload, out, epochs, comm=None,
           log=print):
    """Load ``resume_path`` (or, with ``autoload``, the newest intact
    snapshot in ``out``) into the trainer; a CapsNetError if it cannot be
    used. Returns the path resumed from, or None. Under MPI each rank
    loads its own snapshot of the same epoch; snapshots of another number
    of processes are refused."""
    path = resume_path
    if comm is not None and path is not None:
        path = distributed.rank_path(comm, path)
    if path is None and autoload:
        path = autoload_path(out, log) if comm is None else \
            distributed.common_snapshot(
                comm, out, lambda p: readable_snapshot(p) is None)
    if not path:
        return None
    if not os.path.exists(path):
        hint = ' (-r is short for --resume; the routing count is ' \
               '--routing {})'.format(path) if path.isdigit() else ''
        cli.fail('snapshot {} does not exist; check --resume{}'
                 .format(path, hint))
    if os.path.isdir(path):
        newest = ext.newest_snapshot(path)
        cli.fail('--resume {} is a folder; pass a snapshot file{}'.format(
            path, ' (the newest there is {}), or continue with --out {} '
            '--autoload'.format(newest, path) if newest else
            ' (snapshot_epoch_N in the --out of a run)'))
    # under MPI the ranks are counted from rank 0's snapshot or --out
    distributed.check_snapshot_ranks(
        path if comm is None else resume_path or out,
        1 if comm is None else comm.size)
    check_recorded(trainer, path)
    try:
        with open(path, 'rb') as f:  # closed even if the file is damaged
            chainer.serializers.load_npz(f, trainer)
    except PermissionError as e:
        cli.fail('cannot read snapshot {} ({}); check its permissions'
                 .format(path, e.strerror or e))
    except Exception as e:
        cli.fail('cannot resume from {} ({}: {}); it is not a snapshot of '
                 'this configuration'.format(
                     path, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else ''))
    epoch = trainer.updater.epoch
    if epoch > epochs:
        cli.fail('{} is at epoch {}, beyond --epoch {}; pass --epoch {} or '
                 'more to continue it, or use another --out'.format(
                     path, epoch, epochs, epoch))
    log('resumed from {} at epoch {}'.format(path, epoch))
    return path
