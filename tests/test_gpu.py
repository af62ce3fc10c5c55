"""The GPU path (CuPy) against the CPU: units, networks, files, tools.

Off unless CAPSNET_TEST_GPU=1 (see conftest.py); CAPSNET_TEST_DEVICE=@numpy
runs the same code on the CPU as a dry run.

Tolerances. Both devices compute in float32. CuPy's matrix products use
cuBLAS SGEMM without TF32 (CuPy enables TF32 only when CUPY_TF32=1, which
these tests refuse), and cuDNN is not used (CuPy 14 has none). What differs
is the order of summation (cuBLAS and CuPy reductions against OpenBLAS and
NumPy), so values agree to a few float32 ulps per operation: elementwise
units and routing are compared at rtol 1e-4, whole networks (convolutions
summing 20,736 products per output) at rtol 1e-3. Gradient checks run in
float64 on the device itself.
"""
import functools
import json
import os
import subprocess
import sys

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import gradient_check

from capsnet.kernels import KernelOptions, convolution, heads, routing
from capsnet import files
import nets

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
NETWORK_TOLERANCE = dict(rtol=1e-3, atol=1e-4)
CPU = chainer.get_device('@numpy')


def random(*shape, seed=0, scale=1.0, dtype=numpy.float32):
    return numpy.asarray(numpy.random.RandomState(seed).randn(*shape)
                         * scale, dtype=dtype)


def to_cpu(array):
    return CPU.send(array)


def run_unit(device, function, inputs, grad_seed=9):
    """Forward and backward of function(*inputs) on device.

    Returns (outputs, input gradients) as NumPy arrays; the upstream
    gradient is the same random array on every device.
    """
    variables = [chainer.Variable(device.send(x)) for x in inputs]
    outputs = function(*variables)
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    first = outputs[0]
    first.grad = device.send(random(*first.shape, seed=grad_seed))
    first.backward()
    return ([to_cpu(getattr(y, 'array', y)) for y in outputs],
            [to_cpu(v.grad) for v in variables])


def assert_same_on_both(device, function, inputs, tolerance=UNIT_TOLERANCE):
    on_cpu = run_unit(CPU, function, inputs)
    on_device = run_unit(device, function, inputs)
    for cpu_arrays, device_arrays in zip(on_cpu, on_device):
        for expected, actual in zip(cpu_arrays, device_arrays):
            numpy.testing.assert_allclose(actual, expected, **tolerance)


def test_no_tf32():
    assert os.environ.get('CUPY_TF32', '0') == '0', \
        'CUPY_TF32=1 would make GEMMs round to 10-bit mantissas'


UNITS = {
    'squash': (lambda s: nets.squash(s), [(4, 5, 8)]),
    'safe_norm': (lambda v: nets.safe_norm(v, axis=2), [(4, 10, 16)]),
    'prediction_vectors': (nets.prediction_vectors,
                           [(3, 12, 8), (12, 10, 16, 8)]),
    'dynamic_routing': (lambda u_hat: nets.dynamic_routing(u_hat, 3),
                        [(3, 12, 10, 16)]),
    'decoder': (None, [(3, 160)]),
    'reconstruction_loss': (nets.reconstruction_loss, [(3, 784), (3, 784)]),
}


@pytest.mark.parametrize('name', sorted(UNITS))
def test_unit_matches_cpu(gpu_device, name):
    function, shapes = UNITS[name]
    if name == 'decoder':
        numpy.random.seed(0)
        decoder = nets.Decoder(160, 784)
        decoder_on_device = decoder.copy(mode='copy')
        decoder_on_device.to_device(gpu_device)
        inputs = [random(*shapes[0], scale=0.3)]
        on_cpu = run_unit(CPU, decoder, inputs)
        on_device = run_unit(gpu_device, decoder_on_device, inputs)
        for expected, actual in zip(on_cpu[0] + on_cpu[1],
                                    on_device[0] + on_device[1]):
            numpy.testing.assert_allclose(actual, expected, **UNIT_TOLERANCE)
        return
    inputs = [random(*shape, seed=i, scale=0.3)
              for i, shape in enumerate(shapes)]
    assert_same_on_both(gpu_device, function, inputs)


def test_margin_loss_and_mask_match_cpu(gpu_device):
    lengths = numpy.random.RandomState(0).rand(6, 10).astype(numpy.float32)
    labels = numpy.array([0, 3, 9, 3, 1, 7], dtype=numpy.int32)
    for device in (CPU, gpu_device):
        x = chainer.Variable(device.send(lengths))
        loss = nets.margin_loss(x, device.send(labels))
        loss.backward()
        if device is CPU:
            expected = (to_cpu(loss.array), to_cpu(x.grad))
    numpy.testing.assert_allclose(to_cpu(loss.array), expected[0],
                                  **UNIT_TOLERANCE)
    numpy.testing.assert_allclose(to_cpu(x.grad), expected[1],
                                  **UNIT_TOLERANCE)
    v = random(6, 10, 16)
    masked = nets.mask(gpu_device.send(v), gpu_device.send(labels))
    expected = nets.mask(v, labels).array
    numpy.testing.assert_array_equal(to_cpu(masked.array), expected)


@pytest.fixture(params=[False, True], ids=['numpy-api', 'gpu-kernels'])
def gpu_kernels(request, monkeypatch):
    """KernelOptions with gpu_kernels off and on (the CuPy kernels apply to
    CuPy arrays only: with CAPSNET_TEST_DEVICE=@numpy both runs are the
    same)."""
    return KernelOptions(gpu_kernels=request.param)


@pytest.fixture(params=[False, True], ids=['chainer-conv', 'nchw-conv'])
def gpu_convolutions(request, monkeypatch):
    """KernelOptions.gpu_convolutions off and on (it changes the fast path
    on the GPU only: the CPU's has convolutions of its own)."""
    return request.param


@pytest.mark.parametrize('stride', [1, 2])
def test_nchw_convolution_matches_chainers_on_device(gpu_device, stride):
    inputs = [random(3, 6, 20, 20, scale=0.5),
              random(8, 6, 9, 9, seed=1, scale=0.1), random(8, seed=2)]
    ours, chainers = (run_unit(gpu_device, lambda x, W, b: function(
        x, W, b, stride=stride), inputs) for function in (
            convolution.conv2d_nchw, chainer.functions.convolution_2d))
    for actual, expected in zip(ours[0] + ours[1], chainers[0] + chainers[1]):
        numpy.testing.assert_allclose(actual, expected, **UNIT_TOLERANCE)


def test_gpu_kernels_match_the_numpy_api_forms(gpu_device, monkeypatch):
    s, gv = (gpu_device.send(random(6, 10, 16, seed=k, scale=0.5))
             for k in range(2))
    u_hat = gpu_device.send(random(12, 6, 10, 16, seed=2, scale=0.5))
    c = gpu_device.send(random(12, 6, 10, seed=3))
    weights = [gpu_device.send(random(12, 6, 10, seed=4 + k))
               for k in range(5)]
    vectors = [gpu_device.send(random(6, 10, 16, seed=9 + k))
               for k in range(5)]
    # logits far from 0, where a softmax without its maximum overflows
    logits = gpu_device.send(random(12, 6, 10, seed=14, scale=30) + 100)
    coupling = routing._softmax(logits, axis=2)
    def results(gpu_kernels):
        options = KernelOptions(gpu_kernels=gpu_kernels, einsum=False)
        return [routing.squash_forward(s, options),
                routing.squash_backward(s, gv, options),
                routing.sum_over_inputs(c, u_hat, options),
                routing.agreement(u_hat, s, options),
                routing.outer_sum(weights, vectors, False, options),
                routing._softmax(logits, 2, options),
                routing._softmax_backward(coupling, c, 2, None, options),
                routing._softmax_backward(coupling, c, 2, weights[0],
                                          options)]

    expected = results(False)
    for actual, wanted in zip(results(True), expected):
        assert actual.shape == wanted.shape
        numpy.testing.assert_allclose(to_cpu(actual), to_cpu(wanted),
                                      **UNIT_TOLERANCE)


@pytest.mark.parametrize('name', ['squash', 'routing', 'fast_routing'])
def test_gradient_check_on_device(gpu_device, name, gpu_kernels):
    def plain_routing(u, W):
        return nets.dynamic_routing(nets.prediction_vectors(u, W), 3)[0]

    def fast_routing(u, W):
        return routing.digit_capsules(u, W, 3, options=gpu_kernels)[0]

    if gpu_kernels.gpu_kernels and name != 'fast_routing':
        pytest.skip('the GPU kernels serve the fast routing only')
    if name == 'squash':
        function, inputs, out_shape = nets.squash, [random(3, 4, 5)], (3, 4, 5)
    else:
        function = plain_routing if name == 'routing' else fast_routing
        inputs = [random(2, 6, 4, scale=0.5),
                  random(6, 3, 5, 4, seed=1, scale=0.5)]
        out_shape = (2, 3, 5)
    inputs = [gpu_device.send(x.astype(numpy.float64)) for x in inputs]
    gy = gpu_device.send(random(*out_shape, seed=2, dtype=numpy.float64))
    gradient_check.check_backward(function, tuple(inputs), gy,
                                  dtype=numpy.float64, atol=1e-5, rtol=1e-4)


def capsule_heads(device, options=KernelOptions()):
    """{name: (fused node as a function of one input, its input's shape)}
    for fast_ops' capsule heads, their constant arguments on ``device``."""
    labels = numpy.array([2, 0, 3, 3], dtype=numpy.int32)
    present = device.send(numpy.eye(4, dtype=numpy.float32)[labels])
    target = device.send(random(4, 9, seed=7))
    labels = device.send(labels)
    return {
        'squash_capsules': (lambda x: heads.squash_capsules(
            x, (4, 2, 3, 2, 2), (0, 1, 3, 4, 2), (4, 8, 3), options),
            (4, 6, 2, 2)),
        'margin_loss': (lambda v: heads.margin_loss(
            v, present, nets.M_PLUS, nets.M_MINUS, nets.LAMBDA_ABSENT)[0],
            (4, 4, 5)),
        'mask': (lambda v: heads.mask(v, labels), (4, 4, 5)),
        'squared_error': (lambda y: heads.squared_error(y, target),
                          (4, 9)),
    }


HEADS = sorted(capsule_heads(CPU))


@pytest.mark.parametrize('name', HEADS)
def test_capsule_head_matches_cpu(gpu_device, name):
    function, shape = capsule_heads(CPU)[name]
    device_function, _ = capsule_heads(gpu_device)[name]
    inputs = [random(*shape, seed=3, scale=0.4)]
    on_cpu = run_unit(CPU, function, inputs)
    on_device = run_unit(gpu_device, device_function, inputs)
    for expected, actual in zip(on_cpu[0] + on_cpu[1],
                                on_device[0] + on_device[1]):
        numpy.testing.assert_allclose(actual, expected, **UNIT_TOLERANCE)


@pytest.mark.parametrize('name', HEADS)
def test_capsule_head_gradient_check_on_device(gpu_device, name,
                                               gpu_kernels):
    function, shape = capsule_heads(gpu_device, gpu_kernels)[name]
    x = gpu_device.send(random(*shape, seed=3, scale=0.4,
                               dtype=numpy.float64))
    gy = gpu_device.send(random(*function(x).shape, seed=4,
                                dtype=numpy.float64))
    gradient_check.check_backward(function, (x,), gy, dtype=numpy.float64,
                                  atol=1e-6, rtol=1e-5)


def test_decoder_node_matches_cpu(gpu_device):
    numpy.random.seed(0)
    chain = nets.Decoder(160, 784)
    chain_on_device = chain.copy(mode='copy')
    chain_on_device.to_device(gpu_device)
    inputs = [random(3, 160, scale=0.3)]
    results = []
    for device, where in ((CPU, chain), (gpu_device, chain_on_device)):
        where.cleargrads()
        outputs, grads = run_unit(
            device, lambda h: heads.decoder(h, where.layers()), inputs)
        results.append(outputs + grads + [to_cpu(p.grad)
                                          for p in where.params()])
    for expected, actual in zip(*results):
        numpy.testing.assert_allclose(actual, expected, **UNIT_TOLERANCE)


def test_decoder_node_gradient_check_on_device(gpu_device):
    numpy.random.seed(1)
    chain = nets.Decoder(20, 30)
    params = [gpu_device.send(array.array.astype(numpy.float64) + 0.01)
              for layer in chain.layers() for array in layer]
    h = gpu_device.send(random(3, 20, dtype=numpy.float64))
    gy = gpu_device.send(random(3, 30, seed=4, dtype=numpy.float64))

    def function(h, W1, b1, W2, b2, W3, b3):
        return heads.decoder(h, [(W1, b1), (W2, b2), (W3, b3)])

    gradient_check.check_backward(function, (h, *params), gy,
                                  dtype=numpy.float64, atol=1e-6, rtol=1e-5)


def capsnet_loss_and_grads(model, device, x, t):
    model = model.copy(mode='copy')
    model.to_device(device)
    model.cleargrads()
    with chainer.using_config('train', True):
        loss = model(device.send(x), device.send(t))
    loss.backward()
    grads = {name: to_cpu(p.grad) for name, p in model.namedparams()}
    return float(to_cpu(loss.array)), grads


def mnist_like_batch(batch, seed=0):
    random_state = numpy.random.RandomState(seed)
    x = random_state.rand(batch, 1, 28, 28).astype(numpy.float32)
    t = random_state.randint(0, 10, batch).astype(numpy.int32)
    return x, t


def assert_same_losses_and_grads(first, second, tolerance):
    numpy.testing.assert_allclose(first[0], second[0], **tolerance)
    assert sorted(first[1]) == sorted(second[1])
    for name in first[1]:
        scale = numpy.abs(first[1][name]).max()
        numpy.testing.assert_allclose(
            second[1][name], first[1][name], rtol=tolerance['rtol'],
            atol=tolerance['rtol'] * scale, err_msg=name)


def test_capsnet_plain_path_on_device_matches_cpu(gpu_device):
    numpy.random.seed(0)
    model = nets.CapsNet(reconstruct=True, fast=False)
    x, t = mnist_like_batch(4)
    assert_same_losses_and_grads(capsnet_loss_and_grads(model, CPU, x, t),
                                 capsnet_loss_and_grads(model, gpu_device,
                                                        x, t),
                                 NETWORK_TOLERANCE)


def test_fast_path_on_device_matches_plain_on_device(gpu_device,
                                                     gpu_kernels,
                                                     gpu_convolutions):
    numpy.random.seed(0)
    plain = nets.CapsNet(reconstruct=True, fast=False)
    fast = plain.copy(mode='copy')
    fast.fast = None   # what --impl auto gives
    fast.kernel_options = gpu_kernels._replace(
        gpu_convolutions=gpu_convolutions)
    x, t = mnist_like_batch(4, seed=1)
    fast_on_device = fast.copy(mode='copy')
    fast_on_device.to_device(gpu_device)
    assert fast_on_device._use_fast()
    # with its own convolutions the fast path sums the 20,736 products of
    # each PrimaryCaps output in another order than Chainer's: a whole
    # network's tolerance then
    assert_same_losses_and_grads(
        capsnet_loss_and_grads(plain, gpu_device, x, t),
        capsnet_loss_and_grads(fast, gpu_device, x, t),
        NETWORK_TOLERANCE if gpu_convolutions else UNIT_TOLERANCE)
    # the coupling coefficients too
    u = gpu_device.send(random(3, 1152, 8, scale=0.2))
    W = fast_on_device.W
    v_fast, c_fast = routing.digit_capsules(u, W, 3)
    v_plain, c_plain = nets.dynamic_routing(nets.prediction_vectors(u, W), 3)
    numpy.testing.assert_allclose(to_cpu(v_fast.array),
                                  to_cpu(v_plain.array), **UNIT_TOLERANCE)
    numpy.testing.assert_allclose(to_cpu(c_fast), to_cpu(c_plain.array),
                                  **UNIT_TOLERANCE)


def test_baseline_on_device_matches_cpu(gpu_device):
    numpy.random.seed(0)
    model = nets.BaselineCNN(dropout=0.0, fast=False)
    x, t = mnist_like_batch(4, seed=2)
    assert_same_losses_and_grads(capsnet_loss_and_grads(model, CPU, x, t),
                                 capsnet_loss_and_grads(model, gpu_device,
                                                        x, t),
                                 NETWORK_TOLERANCE)


def test_baseline_fast_kernels_are_refused_on_the_gpu(gpu_device):
    if gpu_device.xp is numpy:
        pytest.skip('dry run on the CPU, where the fast kernels are allowed')
    model = nets.BaselineCNN(input_size=28, fast=True)
    model.to_device(gpu_device)
    x, t = mnist_like_batch(2)
    with pytest.raises(RuntimeError, match='CPU-only'):
        model(gpu_device.send(x), gpu_device.send(t))
    result = run_tool('train.py', '--device', str(gpu_device), '--arch',
                      'baseline', '--impl', 'fast', '-o', 'unused')
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and 'CPU-only' in lines[0], result.stderr


def test_model_files_move_between_devices(gpu_device, tmp_path):
    x, t = mnist_like_batch(8, seed=3)
    for train_on, test_on in ((gpu_device, CPU), (CPU, gpu_device)):
        numpy.random.seed(0)
        model = nets.CapsNet(reconstruct=True)
        model.to_device(train_on)
        optimizer = chainer.optimizers.Adam()
        optimizer.setup(model)
        for _ in range(2):
            model.cleargrads()
            model(train_on.send(x), train_on.send(t)).backward()
            optimizer.update()
        path = str(tmp_path / 'model-{}.npz'.format(train_on.xp.__name__))
        files.save_model(path, model)
        _, lengths_before = model.predict(train_on.send(x))
        loaded = files.load_model(path, nets.ARCHITECTURES)
        loaded.to_device(test_on)
        _, lengths_after = loaded.predict(test_on.send(x))
        numpy.testing.assert_allclose(to_cpu(lengths_after),
                                      to_cpu(lengths_before),
                                      **NETWORK_TOLERANCE)


# -- the tools on the device ------------------------------------------------

def run_tool(tool, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, tool)] + [str(a) for a in args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, **(env or {})))


def assert_ran(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr


def read_log(out):
    with open(os.path.join(out, 'log')) as f:
        return json.load(f)


def tiny_training(device, out, mnist_dir, *more):
    return run_tool('train.py', '--device', device, '--data-dir', mnist_dir,
                    '--train-size', 200, '--test-size', 100, '-b', 50,
                    '--no-progress', '-o', out, *more)


@pytest.mark.slow
def test_resume_across_devices(gpu_device, mnist_dir, tmp_path):
    for order, (first, second) in enumerate(((str(gpu_device), '@numpy'),
                                             ('@numpy', str(gpu_device)))):
        out = tmp_path / 'run{}'.format(order)
        assert_ran(tiny_training(first, out, mnist_dir, '-e', 1,
                                 '--reconstruct'))
        assert_ran(tiny_training(second, out, mnist_dir, '-e', 2,
                                 '--reconstruct', '--autoload'))
        log = read_log(out)
        assert [entry['epoch'] for entry in log] == [1, 2]
        assert all(numpy.isfinite(entry['main/loss']) for entry in log)


@pytest.mark.slow
def test_train_visualize_evaluate_predict_on_device(gpu_device, mnist_dir,
                                                    tmp_path):
    device = str(gpu_device)
    model_path = tmp_path / 'model.npz'
    assert_ran(tiny_training(device, tmp_path / 'run', mnist_dir, '-e', 2,
                             '--reconstruct', '--save', model_path))
    final = json.loads((tmp_path / 'run' / 'final.json').read_text())
    assert final['final_test_error'] < 0.9

    assert_ran(run_tool('visualize.py', '--device', device, '--load',
                        model_path, '--data-dir', mnist_dir, '-o',
                        tmp_path / 'vis'))
    assert (tmp_path / 'vis' / 'vis.png').stat().st_size > 0

    reports = {}
    for where in (device, '@numpy'):
        result = run_tool('evaluate.py', '--device', where, '--load',
                          model_path, '--data-dir', mnist_dir, '--test-size',
                          500, '--json', '-o', tmp_path / 'eval')
        assert_ran(result)
        reports[where] = json.loads(result.stdout.strip().splitlines()[-1])
    # the same weights on both devices: the same answers but for examples
    # whose two longest capsules are within float32 noise of each other
    assert abs(reports[device]['errors'] - reports['@numpy']['errors']) <= 2

    from PIL import Image
    image = tmp_path / 'digit.png'
    Image.fromarray((numpy.eye(28) * 255).astype(numpy.uint8)).save(image)
    result = run_tool('predict.py', '--device', device, '--load', model_path,
                      '--json', image)
    assert_ran(result)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= answer['prediction'] <= 9 and len(answer['lengths']) == 10


@pytest.mark.slow
def test_seed_repeats_a_gpu_baseline_run(gpu_device, mnist_dir, tmp_path):
    """Dropout on the GPU draws from CuPy's generator, seeded by --seed."""
    logs = []
    for name in ('a', 'b'):
        out = tmp_path / name
        assert_ran(tiny_training(str(gpu_device), out, mnist_dir, '-e', 1,
                                 '--arch', 'baseline', '--seed', 5))
        logs.append(read_log(out)[0])
    for key in ('main/loss', 'main/accuracy', 'test/main/loss'):
        assert logs[0][key] == logs[1][key], key


def test_benchmark_on_device_prints_its_json_line(gpu_device):
    result = run_tool('dev/benchmark.py', '--device', str(gpu_device), '-b', 8,
                      '--repeats', 1, '--warmup', 1, '--json')
    assert_ran(result)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line['device'] == str(gpu_device)
    assert line['train_samples_per_s'] > 0
    assert line['plain_train_samples_per_s'] > 0
    if gpu_device.xp is not numpy:
        assert line['peak_gpu_mb'] > 0 and line['gpu']
        assert line['train_back_to_back_samples_per_s'] > 0


# -- the static step and its CUDA graph (capsnet/training/static_step.py) --
#
# Tolerances: the graph replays the kernels of the static step's eager run
# on the same device, so the two are compared at rtol 1e-6 (equal unless a
# kernel is not deterministic); against today's updater (Chainer's Adam
# kernel, whose expression the compiler may contract differently) over 50
# Adam steps at rtol 1e-3, atol 1e-4. On NumPy (the dry run) all are equal
# bit for bit, and what needs CuPy is skipped.
SAME_KERNELS = dict(rtol=1e-6, atol=1e-7)
ADAM_STEPS = dict(rtol=1e-3, atol=1e-4)


def static_trainer(gpu_device, out, **options):
    from test_static_step import make_trainer
    return make_trainer('paper', options.pop('static', True), out,
                        device=gpu_device, **options)


def trained_state(gpu_device, out, **options):
    from test_static_step import state
    trainer, model, optimizer = static_trainer(gpu_device, out, **options)
    trainer.run(show_loop_exception_msg=False)
    return trainer, {key: to_cpu(value) for key, value in
                     state(model, optimizer).items()}


def assert_states_close(first, second, tolerance):
    assert first.keys() == second.keys()
    for key in first:
        numpy.testing.assert_allclose(first[key], second[key], err_msg=key,
                                      **tolerance)


def test_cuda_graph_replay_matches_the_eager_steps(gpu_device, tmp_path):
    _, today = trained_state(gpu_device, tmp_path / 'today', static=False)
    _, eager = trained_state(gpu_device, tmp_path / 'eager')
    trainer, graph = trained_state(gpu_device, tmp_path / 'graph',
                                   cuda_graph=True)
    assert_states_close(graph, eager, SAME_KERNELS)
    assert_states_close(graph, today, ADAM_STEPS)
    if gpu_device.xp is numpy:
        pytest.skip('the CUDA graph itself needs CuPy')
    updater = trainer.updater
    assert updater.graph_failed is None and updater.graph.graph is not None


def test_resume_into_a_graph_run(gpu_device, tmp_path):
    """A snapshot at step 23 of an eager run, loaded into a graph run and
    continued to 50: the uninterrupted graph run."""
    _, uninterrupted = trained_state(gpu_device, tmp_path / 'u',
                                     cuda_graph=True)
    first, _, _ = static_trainer(gpu_device, tmp_path / 'a', stop=23)
    first.run(show_loop_exception_msg=False)
    path = str(tmp_path / 'snapshot.npz')
    chainer.serializers.save_npz(path, first)
    trainer, model, optimizer = static_trainer(gpu_device, tmp_path / 'b',
                                               cuda_graph=True)
    chainer.serializers.load_npz(path, trainer)
    trainer.run(show_loop_exception_msg=False)
    from test_static_step import state
    assert_states_close({key: to_cpu(value) for key, value in
                         state(model, optimizer).items()}, uninterrupted,
                        SAME_KERNELS)
    if gpu_device.xp is not numpy:
        assert trainer.updater.graph.graph is not None


def test_capture_failure_falls_back_in_one_line(gpu_device, tmp_path,
                                                monkeypatch):
    if gpu_device.xp is numpy:
        pytest.skip('a capture needs CuPy')
    from capsnet.training import static_step
    capture = static_step.CudaGraph.capture
    streams = []

    def failing(self, function):
        streams.append(self.stream)

        def inside():
            raise RuntimeError('made to fail inside the capture')
        return capture(self, inside)

    monkeypatch.setattr(static_step.CudaGraph, 'capture', failing)
    _, eager = trained_state(gpu_device, tmp_path / 'eager')
    said = []
    trainer, model, optimizer = static_trainer(
        gpu_device, tmp_path / 'graph', cuda_graph=True)
    trainer.updater.say = said.append
    trainer.run(show_loop_exception_msg=False)
    assert len(said) == 1 and 'made to fail inside the capture' in said[0]
    assert said[0].startswith('--cuda-graph: the capture failed')
    assert len(streams) == 1 and not streams[0].is_capturing()
    from test_static_step import state
    assert_states_close({key: to_cpu(value) for key, value in
                         state(model, optimizer).items()}, eager,
                        SAME_KERNELS)


def test_static_evaluator_matches_the_exact_evaluator(gpu_device):
    """10 examples in batches of 4: two full batches (warm-up, then the
    capture on the second pass) and a short last one, run eagerly."""
    from capsnet.training import extensions as ext
    from capsnet.training import static_step
    from test_static_step import dataset, small_capsnet
    model = small_capsnet()
    model.to_device(gpu_device)
    results = []
    for evaluator in (ext.ExactEvaluator, functools.partial(
            static_step.StaticEvaluator, cuda_graph=True)):
        iterator = chainer.iterators.SerialIterator(
            dataset(), 4, repeat=False, shuffle=False)
        target = evaluator(iterator, model, device=gpu_device)
        passes = [target() for _ in range(3)]
        results.append([{key: float(getattr(value, 'array', value))
                         for key, value in means.items()}
                        for means in passes])
    exact, static = results
    for a, b in zip(exact, static):
        assert a.keys() == b.keys()
        assert any(key.endswith('main/accuracy') for key in a)
        for key in a:
            numpy.testing.assert_allclose(b[key], a[key], rtol=1e-5)
    if gpu_device.xp is not numpy:
        assert target.graph.graph is not None and target.failed is None
