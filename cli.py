"""The command-line convention every tool follows.

One parser class whose errors are one line ``error: ...`` (status 2), one
family of number types whose message is always ``must be WHAT, got 'TEXT'``,
the device flags (``--device/-d``, with ``--gpu/-g`` kept as an alias) and
``fail`` for every other error. Standard library only, so that any module
can use it (benchmark.py parses its flags before NumPy is imported).
"""
import argparse
import math
import os
import re
import sys
import tempfile


def fail(message, status=1):
    """Print ONE line ``error: message`` to stderr and exit with status."""
    print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line ``error: ...`` (status 2)."""

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


def int_at_least(low):
    return number_type(int, 'an integer >= {}'.format(low),
                       lambda v: v >= low)


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
        help='Chainer device specifier: @numpy (the CPU, the default), '
             '@cupy:N (GPU N), or an integer (N >= 0: GPU N, negative: CPU)')
    parser.add_argument(
        '--gpu', '-g', dest='device', type=_gpu_id, metavar='N',
        help='GPU N, the same as --device @cupy:N (negative: the CPU)')


def device_spec(spec):
    """--device's value as a Chainer specifier ('3' -> '@cupy:3')."""
    if spec is not None and re.fullmatch(r'\s*-?\d+\s*', str(spec)):
        return _gpu_id(spec)
    return spec


# --------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------

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
