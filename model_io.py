"""Files: model files (parameters plus the options that rebuild the
network), atomic writes, and loading a model for a tool.

    save_model(path, model)         # what train.py --save writes
    load_model(path)                # rebuild it; ModelFileError if unusable
    load_model_or_fail(path, ...)   # the same for a tool: one error line
"""
import io
import json
import os
import tempfile
import zipfile

import numpy

import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

import nets
from cli import fail


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


def write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


class ModelFileError(Exception):
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


def read_model_meta(path):
    """(arch, options) stored in a model file; ModelFileError if unusable."""
    if not os.path.exists(path):
        raise ModelFileError(
            'model file {} does not exist; pass the path given to '
            'train.py --save'.format(path))
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            if _META_KEY not in npz.files:
                raise ModelFileError(
                    '{} is not a model file of this project (no stored '
                    'options); save one with train.py --save'.format(path))
            meta = json.loads(str(npz[_META_KEY]))
    except ModelFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError,
            KeyError) as e:
        raise ModelFileError(
            '{} is not a readable model file ({}: {}); it may be truncated '
            'or corrupt, so train again with --save'
            .format(path, type(e).__name__, e))
    if meta.get('arch') not in nets.ARCHITECTURES:
        raise ModelFileError('{} holds an unknown architecture {!r}'
                             .format(path, meta.get('arch')))
    return meta['arch'], meta['options']


def load_model(path, expected_options=None):
    """Rebuild the network stored in ``path`` and load its parameters.

    Args:
        expected_options: if given, every key in it must match the stored
            options, else ModelFileError names the difference.
    """
    arch, options = read_model_meta(path)
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
        model = nets.ARCHITECTURES[arch](**options)
    except (TypeError, ValueError) as e:
        raise ModelFileError('{} holds options this code cannot build ({})'
                             .format(path, e))
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            chainer.serializers.NpzDeserializer(npz).load(model)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError,
            io.UnsupportedOperation) as e:
        raise ModelFileError(
            '{} does not match the {} network it describes ({}: {}); it may '
            'be truncated or corrupt, so train again with --save'
            .format(path, arch, type(e).__name__, str(e).splitlines()[0]
                    if str(e) else ''))
    return model


def load_model_or_fail(path, need_capsnet=True, need_decoder=False,
                       status=1, purpose='this tool'):
    """load_model for a tool: exit with one line when the file is unusable.

    Args:
        need_capsnet: the file must hold a CapsNet (not the baseline CNN).
        need_decoder: the CapsNet must have its decoder (--reconstruct).
        purpose: what needs it, for the messages.
    """
    try:
        model = load_model(path)
    except ModelFileError as e:
        fail(e, status)
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
