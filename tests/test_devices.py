"""capsnet/devices.py: the device a tool asked for, and a failing one named
with the fix for its cause (no CuPy, no driver, no GPU, a wrong number);
inference batches split to fit the memory (RAM or the GPU's), in the
tools too."""
import json

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from chainer.backends import cuda
from capsnet import files
import evaluate
import nets
import predict
from conftest import assert_one_error, needs_mnist, run_script
from conftest import MNIST_DIR as MNIST


def test_inference_batches_are_split_to_fit(fresh_model_path, monkeypatch):
    from capsnet import devices
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    monkeypatch.setattr(devices, 'physical_memory', lambda: 4 * 10 ** 9)
    said = []
    assert devices.inference_batch(model, 100, say=said.append) == 100
    assert said == []
    chunk = devices.inference_batch(model, 10 ** 9, say=said.append)
    assert 100 < chunk < 5000
    assert said == ['a batch of 1000000000 examples would take about '
                    '3037312.0 GB, more than 25% of the 4.0 GB of memory; it '
                    'is evaluated in chunks of {} (the results are the '
                    'same)'.format(chunk)]


def test_inference_batches_on_a_gpu_fit_the_gpu_memory(fresh_model_path):
    """On CuPy the chunk is judged from the GPU's memory, not the RAM's (a
    stand-in model reports a 2 GB GPU; no GPU is needed)."""
    from capsnet import devices
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)

    class OnGpu:
        xp = object()   # anything but numpy
        device = type('D', (), {'device': type('C', (), {
            'mem_info': (10 ** 9, 2 * 10 ** 9)})()})()
        inference_bytes_per_example = model.inference_bytes_per_example
    said = []
    gpu_chunk = devices.inference_batch(OnGpu(), 10 ** 9, say=said.append)
    per_example = devices.inference_bytes_per_example(model)
    assert gpu_chunk == 2 * 10 ** 9 // 4 // per_example
    assert 'of the 2.0 GB of GPU memory' in said[0]

    class Broken(OnGpu):
        device = None   # a CuPy error: no limit rather than a traceback
    assert devices.inference_batch(Broken(), 123) == 123


@needs_mnist
def test_evaluate_and_predict_split_a_huge_batch(run_tool, fresh_model_path,
                                                 tmp_path, monkeypatch):
    """-b larger than memory allows: said once, and the figures are those
    of a small batch."""
    from capsnet import devices
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    per_example = devices.inference_bytes_per_example(model)
    flags = ['--load', fresh_model_path, '--data-dir', MNIST, '--test-size',
             '30', '--json']
    status, small, _ = run_tool(evaluate.main, flags + [
        '-o', tmp_path / 'a', '-b', '7'])
    assert status == 0
    monkeypatch.setattr(devices, 'physical_memory', lambda: 4 * 7 *
                        per_example + 3)
    status, chunked, err = run_tool(evaluate.main, flags + [
        '-o', tmp_path / 'b', '-b', '100000'])
    assert status == 0
    assert err.count('it is evaluated in chunks of 7') == 1, err
    assert 'a batch of 30 examples' in err
    small, chunked = json.loads(small), json.loads(chunked)
    assert small.pop('model') == chunked.pop('model') == fresh_model_path
    assert small == chunked

    from PIL import Image
    image = tmp_path / 'digit.png'
    pixels = numpy.zeros((28, 28), numpy.uint8)
    pixels[6:22, 12:16] = 255
    Image.fromarray(pixels).save(str(image))
    status, out, err = run_tool(predict.main, [
        '--load', fresh_model_path, '--json', '-b', '1000'] + [image] * 9)
    assert status == 0 and len(out.splitlines()) == 9
    assert one_line(err).endswith('it is evaluated in chunks of 7 (the '
                                  'results are the same)')


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def cupy_without_a_gpu():
    """CuPy is installed but reaches no GPU (no driver, or no device)."""
    if not cuda.available:
        return False
    try:
        return cuda.cupy.cuda.runtime.getDeviceCount() == 0
    except Exception:  # CuPy's CUDARuntimeError, and whatever else fails
        return True


@pytest.mark.skipif(not cupy_without_a_gpu(), reason=(
    'needs CuPy installed on a machine without a usable GPU (CI installs '
    'CuPy in its current stack for these after the suite)'))
@pytest.mark.parametrize('tool', ['train.py', 'dev/benchmark.py'])
def test_cupy_without_a_usable_gpu_names_the_driver(tool, tmp_path):
    """Chainer sees CuPy but CUDA cannot start: the line names the driver
    and the CPU, not --device."""
    result = run_script(tool, '-d', '@cupy:0', *(
        ['--no-progress', '-o', tmp_path / 'out'] if tool == 'train.py'
        else ['--repeats', '1']))
    line = assert_one_error(result, 'cannot use device @cupy:0',
                            'NVIDIA', '-d @numpy', status=1)   # driver,
    # or 'no NVIDIA GPU found' where there is no /dev/nvidia* at all
    assert 'check --device' not in line
    assert not (tmp_path / 'out').exists()


class CUDARuntimeError(RuntimeError):
    """Named as CuPy's; its text is what cupy raises in each case."""


@pytest.mark.parametrize('text, fix', [
    # CuPy installed, no NVIDIA driver, or one older than CuPy's CUDA
    ('cudaErrorInsufficientDriver: CUDA driver version is insufficient for '
     'CUDA runtime version', 'install an NVIDIA driver'),
    ('cudaErrorNoDevice: no CUDA-capable device is detected',
     'install an NVIDIA driver'),
    # a GPU number the machine does not have
    ('cudaErrorInvalidDevice: invalid device ordinal', 'check --device/-d'),
])
def test_a_device_that_fails_names_the_fix_for_its_cause(text, fix):
    from capsnet import devices
    line = devices.device_failure('@cupy:1', CUDARuntimeError(text),
                                  gpu_present=True)
    problem, _, remedy = line.rpartition('; ')
    assert problem == 'cannot use device @cupy:1: ' + text
    assert fix in remedy
    assert ('check --device/-d' in remedy) != ('NVIDIA driver' in remedy)


@pytest.mark.parametrize('text', [
    'cudaErrorInsufficientDriver: CUDA driver version is insufficient for '
    'CUDA runtime version',
    'cudaErrorNoDevice: no CUDA-capable device is detected'])
def test_no_gpu_at_all_is_said_instead_of_a_driver_update(text,
                                                          monkeypatch):
    from capsnet import devices
    error = CUDARuntimeError(text)
    line = devices.device_failure('@cupy:0', error, gpu_present=False)
    assert line.startswith('cannot use device @cupy:0: ' + text + '; ')
    assert 'no NVIDIA GPU found' in line and '-d @numpy' in line
    assert 'driver' not in line.rpartition('; ')[2]
    # with a GPU device file, the driver is to blame
    assert 'install an NVIDIA driver' in devices.device_failure(
        '@cupy:0', error, gpu_present=True)
    # by default it looks for /dev/nvidia*
    monkeypatch.setattr(devices.glob, 'glob', lambda pattern: [])
    assert 'no NVIDIA GPU found' in devices.device_failure('@cupy:0', error)
    monkeypatch.setattr(devices.glob, 'glob',
                        lambda pattern: ['/dev/nvidia0'])
    assert 'install an NVIDIA driver' in devices.device_failure('@cupy:0',
                                                                error)
