"""Files: model files (parameters plus the options that rebuild the
network), atomic writes, and loading a model for a tool.

    save_model(path, model)                 # what train.py --save writes
    load_model(path, nets.ARCHITECTURES)    # rebuild it; ModelFileError
    load_model_or_fail(path, nets.ARCHITECTURES, ...)  # and what a tool needs

The registry of networks is ``nets.ARCHITECTURES`` (above this package),
so the caller hands it in.
"""
import atexit
import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import cli
from capsnet.cli import fail
from capsnet.errors import CapsNetError


# --------------------------------------------------------------------------
# Temporary names: every one the project makes carries its marker, and the
# cleanup removes those names and no other
# --------------------------------------------------------------------------

MARKER = '.capsnet-'
# tempfile's random part: 8 characters of [a-z0-9_]
_RANDOM = r'[a-z0-9_]{8}'
#: atomic_write's temp file beside NAME: .capsnet-NAME.XXXXXXXX.tmp
TEMP_FILE = re.compile(re.escape(MARKER) + r'(?P<name>.+)\.' + _RANDOM +
                       r'\.tmp\Z')
#: temp_folder's folder: .capsnet-tmp-XXXXXXXX
TEMP_FOLDER = re.compile(re.escape(MARKER) + 'tmp-' + _RANDOM + r'\Z')


def atomic_write(path, write):
    """Call ``write(binary_file)``, then put the bytes under ``path``
    through a temp file beside it (``.capsnet-NAME.XXXXXXXX.tmp``) and a
    rename.

    The bytes are made in memory first, so their size is known: a disk
    without room for them raises cli.DiskFullError (naming the file and the
    space it needs) before anything is written, and so does a full disk
    found during the write. An interrupted or failed write never leaves a
    half file under the final name, and the previous file stays intact;
    only a kill -9 can leave the temp file, which remove_leftovers takes.
    """
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getbuffer()
    folder = os.path.dirname(os.path.abspath(path))
    cli.check_free_space(folder, len(data), path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=MARKER + os.path.basename(
            path) + '.', suffix='.tmp', dir=folder)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private; give it the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC,
                                                   errno.EDQUOT):
            raise cli.DiskFullError(
                'no space left on the disk while writing {}: it needs about '
                '{} ({} free); free some space or choose another folder; '
                'the previous {} is intact'.format(
                    path, cli.megabytes(len(data)),
                    cli.megabytes(cli.free_bytes(folder) or 0),
                    os.path.basename(path))) from None
        raise


@contextlib.contextmanager
def temp_folder(folder):
    """A new folder ``folder/.capsnet-tmp-XXXXXXXX`` for the block, removed
    with what it holds afterwards (or by remove_leftovers after a kill)."""
    path = tempfile.mkdtemp(prefix=MARKER + 'tmp-', dir=folder)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(folder):
    """Remove what killed writes of this project left in ``folder``:
    atomic_write's ``.capsnet-NAME.XXXXXXXX.tmp`` files and temp_folder's
    ``.capsnet-tmp-XXXXXXXX`` folders, nothing else (no other name, no link,
    no subfolder but those). Returns the removed paths."""
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if os.path.islink(path):
            continue
        try:
            if TEMP_FILE.match(name) and os.path.isfile(path):
                os.remove(path)
            elif TEMP_FOLDER.match(name) and os.path.isdir(path):
                shutil.rmtree(path)
            else:
                continue
        except OSError:
            continue   # not ours to force (permissions): left as it is
        removed.append(path)
    return removed


# --------------------------------------------------------------------------
# A fresh run in another run's folder
# --------------------------------------------------------------------------

#: what a training run writes in its --out (train.py and the trainer's
#: extensions): the epoch snapshots, the summary, the plots, the best model
RUN_FILE = re.compile(r'(snapshot_epoch_\d+|final\.json|loss\.png|'
                      r'accuracy\.png|error\.png|model\.npz|'
                      r'model_best_val\.npz)\Z')
#: under MPI rank r > 0 keeps its snapshots in --out/rank<r>
RANK_FOLDER = re.compile(r'rank(?P<rank>[1-9]\d*)\Z')
LOG_NAME = 'log'


def _is_training_log(path):
    """Whether ``path`` is a trainer's log: a JSON list of epoch records."""
    try:
        with open(path, 'rb') as f:
            if f.read(1).strip() not in (b'[', b''):
                return False
            f.seek(0)
            records = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(records, list) and all(
        isinstance(r, dict) and 'epoch' in r for r in records)


def run_files(out):
    """The names in folder ``out`` that a training run wrote (sorted): its
    snapshots, log, final.json, plots, best model and rank<r> folders with
    snapshots; [] for a missing or unrelated folder."""
    try:
        names = sorted(os.listdir(out))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(out, name)
        if RUN_FILE.match(name) or (name == LOG_NAME and
                                    _is_training_log(path)):
            found.append(name)
        elif RANK_FOLDER.match(name) and os.path.isdir(path) and any(
                RUN_FILE.match(n) for n in _listdir(path)):
            found.append(name)
    return found


def _listdir(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def check_fresh_out(out, resuming, flag='--out'):
    """CapsNetError if ``out`` holds another run's files (``run_files``)
    and this run does not continue it (``resuming`` false: no --autoload
    and no --resume); nothing in ``out`` is touched. A missing or empty
    folder, or one holding only other files, is fine."""
    if resuming:
        return
    found = run_files(out)
    if found:
        raise CapsNetError(
            '{} {} holds another run ({}{}); continue it with --autoload, or '
            'choose a new {} folder for a fresh run (nothing there was '
            'changed)'.format(flag, out, ', '.join(found[:4]),
                              ' and {} more'.format(len(found) - 4)
                              if len(found) > 4 else '', flag))


def write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


@contextlib.contextmanager
def open_npz(path):
    """``numpy.load(path)`` of an .npz archive as a context manager whose
    file is closed however the archive turns out (numpy.load leaves it
    open when a truncated file is not a readable zip); ValueError if the
    file is an .npy or pickle instead of an archive."""
    with open(path, 'rb') as f:
        npz = numpy.load(f, allow_pickle=False)
        if not isinstance(npz, numpy.lib.npyio.NpzFile):
            raise ValueError('not an .npz archive')
        with npz:
            yield npz


class ModelFileError(CapsNetError):
    """A model file that is missing, corrupt or of another network."""


_META_KEY = '_capsnet_meta'


def save_model(path, model):
    """Write the parameters and options to ``path`` atomically (.npz).

    The file is written beside its final name and renamed, so an
    interrupted save leaves any earlier file intact.
    """
    serializer = chainer.serializers.DictionarySerializer()
    serializer.save(model)
    meta = {'arch': model.arch, 'options': model.options}
    target = dict(serializer.target)
    target[_META_KEY] = numpy.array(json.dumps(meta))
    atomic_write(path, lambda f: numpy.savez_compressed(f, **target))


def _npz_hint(folder):
    """', e.g. FOLDER/NAME.npz' for the first .npz file in ``folder``."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith('.npz'))
    except OSError:
        names = []
    return ', e.g. {}'.format(os.path.join(folder, names[0])) if names \
        else ''


# a trainer snapshot (snapshot_epoch_N) also serves as a model file: the
# options its RecordOptions extension keeps, the model under the updater
SNAPSHOT_OPTIONS = 'extensions/options/options'
SNAPSHOT_MODEL = 'updater/model:main/'


def _snapshot_meta(npz):
    """(arch, options) of a trainer snapshot, or None for another file."""
    if SNAPSHOT_OPTIONS not in npz.files:
        return None
    options = json.loads(str(npz[SNAPSHOT_OPTIONS]))
    options.pop('dataset', None)
    return {'arch': options.pop('arch', None), 'options': options}


def read_model_meta(path, architectures=None):
    """(arch, options) stored in a model file or in a training snapshot
    (snapshot_epoch_N); ModelFileError if unusable."""
    if not os.path.exists(path):
        raise ModelFileError(
            'model file {} does not exist; pass the path given to '
            'train.py --save'.format(path))
    if os.path.isdir(path):
        raise ModelFileError(
            '{} is a folder, not a model file; pass the file given to '
            'train.py --save{}'.format(path, _npz_hint(path)))
    try:
        with open_npz(path) as npz:
            meta = json.loads(str(npz[_META_KEY])) if _META_KEY in \
                npz.files else _snapshot_meta(npz)
            if meta is None:
                raise ModelFileError(
                    '{} is neither a model file nor a training snapshot of '
                    "this project (no stored options); use a run's "
                    'model.npz or snapshot_epoch_N'.format(path))
    except ModelFileError:
        raise
    except PermissionError as e:
        raise ModelFileError('cannot read model file {} ({}); check its '
                             'permissions'.format(path, e.strerror or e))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError,
            KeyError) as e:
        raise ModelFileError(
            '{} is not a readable model file ({}: {}); it may be truncated '
            'or corrupt, so train again with --save'
            .format(path, type(e).__name__, e))
    if architectures is not None and meta.get('arch') not in architectures:
        raise ModelFileError('{} holds an unknown architecture {!r}'
                             .format(path, meta.get('arch')))
    return meta['arch'], meta['options']


def load_model(path, architectures, expected_options=None):
    """Rebuild the network stored in ``path`` and load its parameters.

    Args:
        architectures: {arch: network class} (``nets.ARCHITECTURES``).
        expected_options: if given, every key in it must match the stored
            options, else ModelFileError names the difference.
    """
    arch, options = read_model_meta(path, architectures)
    if expected_options:
        differ = {k: (options.get(k), v) for k, v in expected_options.items()
                  if options.get(k) != v}
        if differ:
            raise ModelFileError(
                '{} was built with other options: {}; use a matching model '
                'or drop those flags'.format(path, ', '.join(
                    '{}={!r} in the file, {!r} asked'.format(k, a, b)
                    for k, (a, b) in sorted(differ.items()))))
    try:
        model = architectures[arch](**options)
    except (TypeError, ValueError) as e:
        raise ModelFileError('{} holds options this code cannot build ({})'
                             .format(path, e))
    try:
        with open_npz(path) as npz:
            prefix = '' if _META_KEY in npz.files else SNAPSHOT_MODEL
            chainer.serializers.NpzDeserializer(npz, path=prefix).load(model)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError,
            io.UnsupportedOperation) as e:
        raise ModelFileError(
            '{} does not match the {} network it describes ({}: {}); it may '
            'be truncated or corrupt, so train again with --save'
            .format(path, arch, type(e).__name__, str(e).splitlines()[0]
                    if str(e) else ''))
    check_finite(model, path)
    return model


def non_finite_parameters(model):
    """Names of the parameters of ``model`` holding NaN or inf."""
    bad = []
    for name, param in sorted(model.namedparams()):
        if param.array is not None and not bool(
                chainer.backend.get_array_module(param.array).isfinite(
                    param.array).all()):
            bad.append(name)
    return bad


def check_finite(model, path):
    """ModelFileError if any parameter of ``model`` (read from ``path``) is
    NaN or inf: such a model answers, confidently and wrongly."""
    bad = non_finite_parameters(model)
    if bad:
        raise ModelFileError(
            '{} holds NaN or inf weights ({}{}); the run that wrote it '
            'diverged or the file is damaged; use an earlier model or train '
            'again (a lower --alpha)'.format(
                path, ', '.join(bad[:3]),
                ' and {} more'.format(len(bad) - 3) if len(bad) > 3 else ''))


def load_model_or_fail(path, architectures, need_capsnet=True,
                       need_decoder=False, status=1, purpose='this tool'):
    """load_model for a tool: ModelFileError (with ``status``) when the file
    is unusable or not the network the tool needs.

    Args:
        need_capsnet: the file must hold a CapsNet (not the baseline CNN).
        need_decoder: the CapsNet must have its decoder (--reconstruct).
        purpose: what needs it, for the messages.
    """
    try:
        model = load_model(path, architectures)
    except ModelFileError as e:
        raise ModelFileError(str(e), status)
    except Exception as e:  # anything load_model did not anticipate
        fail('cannot load model file {} ({}: {}); it may be truncated or '
             'corrupt, so train again with --save'.format(
                 path, type(e).__name__, str(e).splitlines()[0]
                 if str(e) else ''), status)
    if getattr(model, 'two_digits', False):
        fail('{} holds a MultiMNIST model ({}: two overlapping digits on '
             '{} x {}); {} works on single digits, so use a model trained '
             'with train.py (or experiments.py figure5 for this one)'.format(
                 path, model.arch, model.input_size, model.input_size,
                 purpose), status)
    if need_capsnet and model.arch != 'capsnet':
        fail('{} holds the {} network, not a CapsNet; {} needs a CapsNet '
             'model (train.py --arch capsnet)'.format(
                 path, model.arch, purpose), status)
    if need_decoder and model.arch != 'capsnet':
        fail('{} holds the {} network, which has no decoder; {} needs a '
             'CapsNet trained with train.py --reconstruct'.format(
                 path, model.arch, purpose), status)
    if need_decoder and not getattr(model, 'reconstruct', False):
        fail('{} was trained without --reconstruct, so it has no decoder and '
             '{} cannot draw reconstructions; train with train.py '
             '--reconstruct'.format(path, purpose), status)
    if model.options.get('n_classes', 10) != 10:
        fail('{} has {} classes; {} expects the 10 classes of MNIST'.format(
            path, model.options.get('n_classes'), purpose), status)
    return model


# --------------------------------------------------------------------------
# A lock on a run folder (train.py, experiments.py)
# --------------------------------------------------------------------------

LOCK_NAME = MARKER + 'lock'


def _alive(pid):
    """Whether process ``pid`` runs; a zombie (killed, not yet reaped by
    its parent, as after kill -9 of an mpiexec) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open('/proc/{}/stat'.format(pid)) as f:
            # pid (comm) STATE ...; comm may hold spaces and parentheses
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True


def lock_folder(folder, tool, flag='--out'):
    """Take ``folder/.capsnet-lock`` (holding our PID), or exit with one line if a
    live process holds it. A lock left by a dead process is taken over, and
    that is said on stdout. Returns the lock's path; ``unlock`` frees it."""
    path = os.path.join(folder, LOCK_NAME)
    text = '{} {}\n'.format(os.getpid(), tool).encode()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_lock(path)
            if owner is None:  # gone, being written, or left empty
                time.sleep(0.2)
                owner = read_lock(path) or (0, 'unknown, empty lock file')
            pid, who = owner
            if pid == os.getpid():
                return path  # ours already (main called again in-process)
            if pid != 0 and _alive(pid):
                fail('{} is in use by process {} ({}); wait for it to end or '
                     'choose another {}'.format(folder, pid, who, flag))
            print('taking over the stale lock of process {} ({}), which is '
                  'no longer running'.format(pid, who), flush=True)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            fail('cannot lock {} ({}); choose another {}'.format(
                folder, e.strerror or e, flag))
        with os.fdopen(fd, 'wb') as f:
            f.write(text)
        atexit.register(unlock, path)
        return path
    fail('cannot lock {}: its lock file keeps changing; choose another {}'
         .format(folder, flag))


def read_lock(path):
    """(pid, tool) from a lock file, or None if absent or unreadable."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return int(fields[0]), ' '.join(fields[1:]) or '?'
    except (OSError, ValueError, IndexError):
        return None


def unlock(path):
    """Remove a lock taken by this process (no-op if it is not ours)."""
    owner = read_lock(path)
    if owner is not None and owner[0] == os.getpid():
        try:
            os.remove(path)
        except OSError:
            pass
