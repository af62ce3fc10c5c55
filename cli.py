"""What the command-line programs share: one-line errors, flag types, the
device choice, model loading for the tools, and atomic file writes."""
import argparse
import os
import sys
import tempfile

import numpy

import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            'must be an integer, got {!r}'.format(text))
    if value <= 0:
        raise argparse.ArgumentTypeError('must be > 0, got {}'.format(value))
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            'must be an integer, got {!r}'.format(text))
    if value < 0:
        raise argparse.ArgumentTypeError('must be >= 0, got {}'.format(value))
    return value


def fail(message, status=1):
    """Print ONE line ``error: message`` to stderr and exit with status."""
    print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line ``error: ...`` (status 2)."""

    def error(self, message):
        fail('{}; see {} --help'.format(message, self.prog), 2)


def add_device_arguments(parser):
    parser.add_argument('--gpu', '-g', type=int, default=-1,
                        help='GPU id (negative: CPU, the default)')
    parser.add_argument('--device', default=None,
                        help='Chainer device specifier (@numpy, @cupy:0); '
                             'overrides -g')


def cupy_problem():
    """Why Chainer cannot use CuPy, in one line (the error it kept)."""
    from chainer.backends import cuda
    error = getattr(cuda, '_resolution_error', None)
    if error is None:
        return 'no reason recorded'
    text = ' '.join(str(error).split())
    return '{}: {}'.format(type(error).__name__, text) if text else \
        type(error).__name__


def select_device(args, status=1):
    """chainer Device for --device / -g (as train.py), or exit with a line.

    On the CPU it also lets malloc keep freed memory for the next batch
    (``fast_ops.keep_freed_memory``), which doubles training speed there.
    """
    spec = args.device
    if spec is None:
        spec = '@numpy' if args.gpu < 0 else '@cupy:{}'.format(args.gpu)
    if 'cupy' in spec:
        from chainer.backends import cuda
        if not cuda.available:
            fail('{} needs CuPy with a working CUDA GPU, and CuPy cannot be '
                 'used here ({}); install the CuPy for your CUDA (see '
                 'README.md, Install: cupy-cuda12x or cupy-cuda13x) or run '
                 'on the CPU with -g -1'.format(spec, cupy_problem()),
                 status)
    try:
        device = chainer.get_device(spec)
        device.use()
    except Exception as e:  # chainer raises several kinds here
        fail('cannot use device {}: {}; check -g/--device'.format(
            spec, str(e).splitlines()[0] if str(e) else type(e).__name__),
            status)
    if device.xp is numpy:
        import fast_ops
        fast_ops.keep_freed_memory()  # its docstring says why
    return device


def load_model(path, need_capsnet=True, need_decoder=False, status=1,
               purpose='this tool'):
    """nets.load_model, or exit with one line when the file is unusable.

    Args:
        need_capsnet: the file must hold a CapsNet (not the baseline CNN).
        need_decoder: the CapsNet must have its decoder (--reconstruct).
        purpose: what needs it, for the messages.
    """
    import nets  # nets itself uses atomic_write from here
    try:
        model = nets.load_model(path)
    except nets.ModelFileError as e:
        fail(e, status)
    except Exception as e:  # anything nets did not anticipate
        fail('cannot load model file {} ({}: {}); it may be truncated or '
             'corrupt, so train again with --save'.format(
                 path, type(e).__name__, str(e).splitlines()[0]
                 if str(e) else ''), status)
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


def check_writable(folder, what='--out', status=1):
    """Create ``folder`` if needed and make sure files can be written there."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        fail('cannot write to {} ({}); choose another {}'.format(
            folder, e.strerror or e, what), status)


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a temp file beside path, then rename.

    An interrupted write never leaves a half file under the final name.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                               suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private; give it the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


