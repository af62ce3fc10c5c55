"""The command-line convention every tool follows.

One parser class whose errors are one line ``error: ...`` (status 2), one
family of number types whose message is always ``must be WHAT, got 'TEXT'``,
the device flags (``--device/-d``, with ``--gpu/-g`` kept as an alias) and
``fail`` for every other error. Standard library only, so that any module
can use it (benchmark.py parses its flags before NumPy is imported).
"""
import argparse
import atexit
import errno
import gc
import math
import os
import re
import shutil
import signal
import sys
import tempfile

from capsnet.errors import CapsNetError


def fail(message, status=1):
    """Raise the one-line error ``message``: ``run_main`` prints it as
    ``error: message`` and exits with ``status``."""
    raise CapsNetError(message, status)


class HelpFormatter(argparse.HelpFormatter):
    """--help with each option's default: ``(default: 0.25)`` after its
    text, as argparse.ArgumentDefaultsHelpFormatter, but not for options
    whose default says nothing (None, False, True, the empty string or
    list), nor where the text already names its default."""

    def _get_help_string(self, action):
        text = action.help or ''
        default = action.default
        if default is argparse.SUPPRESS or default is None or \
                isinstance(default, bool) or default in ('', [], ()) or \
                'default' in text.lower() or not action.option_strings:
            return text
        return text + ' (default: %(default)s)'


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line ``error: ...`` (status 2)
    and whose --help shows the defaults (``HelpFormatter``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail('{}; see {} --help'.format(message, self.prog), 2)


# --------------------------------------------------------------------------
# Number types: ``type=cli.positive_int`` etc.
# --------------------------------------------------------------------------

def number_type(convert, what, accept=lambda value: True):
    """An argparse type: ``convert(text)`` if ``accept``s it, else the error
    ``must be WHAT, got 'TEXT'`` (the same for unparsable and out-of-range
    text, and for NaN and infinities)."""
    def parse(text):
        try:
            value = convert(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(
                'must be {}, got {!r}'.format(what, text))
        return value
    parse.__name__ = what
    return parse


integer = number_type(int, 'an integer')
positive_int = number_type(int, 'an integer > 0', lambda v: v > 0)
non_negative_int = number_type(int, 'an integer >= 0', lambda v: v >= 0)
number = number_type(float, 'a number')
positive_float = number_type(float, 'a number > 0', lambda v: v > 0)
non_negative_float = number_type(float, 'a number >= 0', lambda v: v >= 0)
fraction = number_type(float, 'a number in (0, 1]', lambda v: 0 < v <= 1)


SEED_MAX = 2 ** 32 - 3  # train.py seeds with seed, seed + 1 and seed + 2
seed = number_type(int, 'an integer from 0 to {}'.format(SEED_MAX),
                   lambda v: 0 <= v <= SEED_MAX)


def number_in(low, high):
    return number_type(float, 'a number from {} to {}'.format(low, high),
                       lambda v: low <= v <= high)


def int_in(low, high):
    return number_type(int, 'an integer from {} to {}'.format(low, high),
                       lambda v: low <= v <= high)


def int_at_least(low):
    return number_type(int, 'an integer >= {}'.format(low),
                       lambda v: v >= low)


def differences(have, want):
    """'key HAVE there, WANT now, ...' for every key of either dict whose
    values differ: why stored settings do not fit the ones asked for."""
    return ', '.join('{} {!r} there, {!r} now'.format(
        key, have.get(key), want.get(key))
        for key in sorted(set(have) | set(want))
        if have.get(key) != want.get(key))


# --------------------------------------------------------------------------
# Device flags (Chainer's examples: --device/-d, --gpu/-g as the old alias)
# --------------------------------------------------------------------------

def _gpu_id(text):
    """``-g N`` as a device specifier: @cupy:N, or @numpy when negative."""
    gpu = integer(text)
    return '@numpy' if gpu < 0 else '@cupy:{}'.format(gpu)


def add_device_arguments(parser, default='@numpy'):
    parser.add_argument(
        '--device', '-d', default=default,
        help='Chainer device specifier: @numpy (the CPU), @cupy:N (GPU N), '
             'or an integer (N >= 0: GPU N, negative: the CPU)')
    parser.add_argument(
        '--gpu', '-g', dest='device', type=_gpu_id, metavar='N',
        help='GPU N, the same as --device @cupy:N (negative: the CPU)')


def add_gpu_fast_path_arguments(parser):
    """--gpu-kernels and --gpu-convolutions: the fast path's optional GPU
    pieces (capsnet.kernels.KernelOptions: gpu_kernels, gpu_convolutions)."""
    parser.add_argument(
        '--gpu-kernels', action='store_true',
        help="on the GPU, squash, the routing's softmax and its "
             "contractions with u_hat through fast_ops' CuPy kernels "
             "(KernelOptions.gpu_kernels; off by default until timed on a GPU; "
             "no effect on the CPU)")
    parser.add_argument(
        '--gpu-convolutions', action='store_true',
        help="on the GPU, the convolutions through fast_ops' NCHW node "
             "instead of Chainer's (KernelOptions.gpu_convolutions; off by "
             "default until timed on a GPU; no effect on the CPU)")


def device_spec(spec):
    """--device's value as a Chainer specifier ('3' -> '@cupy:3')."""
    if spec is not None and re.fullmatch(r'\s*-?\d+\s*', str(spec)):
        return _gpu_id(spec)
    return spec


# --------------------------------------------------------------------------
# Terminals
# --------------------------------------------------------------------------

def interactive(stream=None):
    """True when ``stream`` (default sys.stdout) is a terminal: progress
    bars and terminal control codes only then, plain lines otherwise."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------

def check_writable(folder, what='--out', status=1):
    """Create ``folder`` if needed and make sure files can be written there."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail('cannot write to {}: it is a file, not a folder; choose another '
             '{}'.format(folder, what), status)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        fail('cannot write to {} ({}); choose another {}'.format(
            folder, e.strerror or e, what), status)


# --------------------------------------------------------------------------
# Faults: a full disk, Ctrl-C and SIGTERM, as one line (``run_main``)
# --------------------------------------------------------------------------

class DiskFullError(CapsNetError):
    """A write that found no room; the message names the file and the space
    it needs. Raised by files.atomic_write and ``check_free_space``."""


def megabytes(n_bytes):
    """'12.3 MB', or '45.6 kB' below 0.1 MB (a plot, a JSON file)."""
    if n_bytes < 1e5:
        return '{:.1f} kB'.format(n_bytes / 1e3)
    return '{:.1f} MB'.format(n_bytes / 1e6)


def free_bytes(folder):
    """Free bytes on the disk holding ``folder`` (None if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(folder, needed, what):
    """Raise DiskFullError if ``folder``'s disk has less than ``needed``
    bytes free; ``what`` says what needs them."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DiskFullError(
            'not enough free space in {} for {}: needs about {}, {} free; '
            'free some space or choose another folder'.format(
                folder, what, megabytes(needed), megabytes(free)))


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM, so that
    ``finally`` blocks (temporary files) run as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _exit_while_importing(signum, frame):
    """The handler of ``exit_on_signals_while_importing``: one line, then
    exit at once (nothing has been written yet)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        sys.stderr.write('error: interrupted\n')
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def exit_on_signals_while_importing():
    """Ctrl-C or SIGTERM before ``run_main`` runs (while Python imports
    NumPy, Chainer, matplotlib, which takes a second or more) ends the
    process with ``error: interrupted`` and status 130 / 143 instead of a
    traceback. Every tool calls it at the top of its file, under ``if
    __name__ == '__main__':``, before its other imports; ``run_main`` then
    takes the signals over. A signal the shell made the process ignore
    (``command &``) stays ignored."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _exit_while_importing)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_while_importing)
    except ValueError:  # not the main thread
        pass


def run_main(main, argv=None, interrupted='interrupted'):
    """Run a tool's ``main(argv)`` and return its exit status.

    Ctrl-C prints ``error: INTERRUPTED`` and gives 130, SIGTERM the same and
    143 (the shells' 128 + signal); a full disk is one line naming the file
    (status 1), and so is running out of memory; never a traceback for
    these.
    """
    # at exit the collector skips what is left: Python 3.12.1's crashed
    # (SIGSEGV, the exit status lost) collecting what an interrupted write
    # had left, in CI
    atexit.register(gc.freeze)
    try:
        if signal.getsignal(signal.SIGINT) is _exit_while_importing:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        if previous is _exit_while_importing:
            previous = signal.SIG_DFL
    except ValueError:  # not the main thread
        previous = None
    try:
        return main(argv)
    except CapsNetError as e:
        if getattr(e, 'quiet', False):  # another MPI rank said it
            return e.status
        return _error(str(e), e.status)
    except KeyboardInterrupt:
        return _interrupted(interrupted, 128 + signal.SIGINT)
    except Terminated:
        return _interrupted(interrupted, 128 + signal.SIGTERM)
    except MemoryError as e:
        return _error('out of memory ({}); use smaller batches (--batchsize/'
                      '-b, --eval-batchsize) or a smaller --input-size'.format(
                          ' '.join(str(e).split()) or 'MemoryError'), 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return _error('no space left on the disk while writing {}; free some '
                      'space or choose another folder'.format(
                          e.filename or 'a file'), 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(message, status):
    """Print the one line ``error: message`` (after what stdout holds) and
    return ``status``."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print('error: ' + ' '.join(message.split()), file=sys.stderr)
    return status


_interrupted = _error
