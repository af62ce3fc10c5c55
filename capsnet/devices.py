"""Running a model on a device: the tools' device choice (``--device``),
inference over many batches, and copying results back to NumPy."""
import contextlib
import glob
import os

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import backend

from capsnet import cli
from capsnet.kernels import convolution


def cupy_problem():
    """Why Chainer cannot use CuPy, in one line (the error it kept)."""
    from chainer.backends import cuda
    error = getattr(cuda, '_resolution_error', None)
    if error is None:
        return 'no reason recorded'
    text = ' '.join(str(error).split())
    return '{}: {}'.format(type(error).__name__, text) if text else \
        type(error).__name__


def select_device(args, status=1, keep_freed_memory=True):
    """chainer Device for ``args.device`` (--device/-d or --gpu/-g), or exit
    with one line.

    On the CPU it also lets malloc keep freed memory for the next batch
    (``convolution.keep_freed_memory``), which doubles training speed there;
    ``keep_freed_memory=False`` leaves that to the caller (benchmark.py
    measures both).
    """
    spec = cli.device_spec(args.device)
    if 'cupy' in spec:
        from chainer.backends import cuda
        if not cuda.available:
            cli.fail('{} needs CuPy with a working CUDA GPU, and CuPy cannot '
                     'be used here ({}); install CuPy with the CUDA libraries '
                     'for your driver (README.md, Install: pip install '
                     '"cupy-cuda13x[ctk]" for CUDA 13, "cupy-cuda12x[ctk]" '
                     'for CUDA 12) or run on the CPU with -d @numpy'.format(
                         spec, cupy_problem()), status)
    try:
        device = chainer.get_device(spec)
        device.use()
    except Exception as e:  # chainer raises several kinds here
        cli.fail(device_failure(spec, e), status)
    if device.xp is numpy and keep_freed_memory:
        convolution.keep_freed_memory()  # its docstring says why
    return device


def machine_has_gpu():
    """True when the machine has an NVIDIA GPU device file (/dev/nvidia0,
    ...): the kernel driver sees a GPU, whatever CUDA says."""
    return bool(glob.glob('/dev/nvidia[0-9]*'))


#: CUDA's answers when it finds no usable GPU: with no /dev/nvidia* either,
#: there is no GPU at all, and a newer driver would not help
NO_GPU_ERRORS = ('cudaErrorNoDevice', 'cudaErrorInsufficientDriver')


def device_failure(spec, error, gpu_present=None):
    """The one line for a device Chainer could not set up: a wrong device
    name or number points at --device; a CUDA error of the machine (no
    driver, a driver older than CuPy's CUDA) at the driver, unless the
    machine has no NVIDIA GPU at all: then it says so.

    gpu_present: whether the machine has a GPU (None: look, see
    ``machine_has_gpu``)."""
    text = ' '.join(str(error).split()) or type(error).__name__
    if 'cudaError' in text and 'cudaErrorInvalidDevice' not in text:
        if gpu_present is None:
            gpu_present = machine_has_gpu()
        if not gpu_present and any(e in text for e in NO_GPU_ERRORS):
            fix = ('no NVIDIA GPU found on this machine (no /dev/nvidia* '
                   'device): run on the CPU with -d @numpy, or on a machine '
                   'with an NVIDIA GPU')
        else:
            fix = ('the GPU or its driver cannot be used: install an NVIDIA '
                   "driver recent enough for your CuPy's CUDA version "
                   '(README.md, Install) or run on the CPU with -d @numpy')
    else:
        fix = 'check --device/-d'
    return 'cannot use device {}: {}; {}'.format(spec, text, fix)


@contextlib.contextmanager
def inference_mode(model):
    """Test mode, no graph, and the model's fixed-weight context."""
    with chainer.using_config('train', False), chainer.no_backprop_mode(), \
            model.inference():
        yield


def physical_memory():
    """Bytes of RAM of this machine, or None if unknown."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def inference_bytes_per_example(model):
    """Rough bytes one example takes in an inference pass of ``model`` (the
    network's own arithmetic: nets.bytes_per_example)."""
    return model.inference_bytes_per_example()


INFERENCE_SHARE = 0.25  # of the machine's memory, for one inference chunk


def check_memory(need, configuration, fix):
    """CapsNetError when ``need`` bytes (nets.memory_estimate) exceed this
    machine's memory: refused up front, naming the configuration and the
    fix, instead of failing an allocation later."""
    have = physical_memory()
    if have and need > have:
        cli.fail('this configuration needs about {:.1f} GB of memory ({}) '
                 'and the machine has {:.1f} GB; {}'.format(
                     need / 1e9, configuration, have / 1e9, fix))


def device_memory(model):
    """(bytes, what) of the memory ``model``'s arrays live in: the GPU's
    for a model on CuPy, else the machine's RAM; bytes None if unknown."""
    if model.xp is not numpy:
        try:
            return model.device.device.mem_info[1], 'GPU memory'
        except Exception:  # any CuPy error: fall back to no limit
            return None, 'GPU memory'
    return physical_memory(), 'memory'


def inference_batch(model, batchsize, share=INFERENCE_SHARE, say=None):
    """``batchsize`` or, if a batch that large would take more than
    ``share`` of the memory the model lives in (RAM, or the GPU's), the
    largest batch that does not: a huge -b / --eval-batchsize is split
    instead of exhausting memory. When it splits, ``say(line)`` is called
    with one line that says so."""
    memory, what = device_memory(model)
    if not memory:
        return batchsize
    per_example = inference_bytes_per_example(model)
    fits = max(1, int(memory * share) // per_example)
    if fits < batchsize and say is not None:
        say('a batch of {} examples would take about {:.1f} GB, more than '
            '{:.0f}% of the {:.1f} GB of {}; it is evaluated in chunks '
            'of {} (the results are the same)'.format(
                batchsize, batchsize * per_example / 1e9, 100 * share,
                memory / 1e9, what, fits))
    return min(batchsize, fits)


def to_cpu(array):
    return numpy.asarray(backend.CpuDevice().send(array))
