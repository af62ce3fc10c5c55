"""gpu_check.py: its CPU dry run goes through every step and writes the
summary; bad flags are one line."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import assert_one_error, needs_mnist, MNIST_DIR
import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'dev/gpu_check.py')]
                          + [str(a) for a in args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@needs_mnist
def test_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / 'check'
    result = run_check('--dry-run', '--data-dir', MNIST_DIR, '--out', out,
                       '--batchsizes', '8', '--budget-minutes', '10')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['dry_run'] and summary['device'] == '@numpy'
    steps = summary['steps']
    # the kernel profile runs where PyTorch is importable (not in CI)
    has_torch = importlib.util.find_spec('torch') is not None
    assert set(steps) == {'environment', 'benchmark-8', 'benchmark-8-einsum',
                          'benchmark-8-gpu-kernels',
                          'benchmark-8-gpu-convolutions',
                          'benchmark-8-gpu-both', 'gpu_tests',
                          'gpu_tests_collect', 'gpu_tests_slow', 'train',
                          'evaluate', 'visualize', 'graph_tests',
                          'graph-speed-8'} | (
                              {'benchmark-8-kernels'} if has_torch else set())
    assert all(step['status'] == 0 for step in steps.values()), steps
    assert 'passed' in steps['gpu_tests']['result']
    # the slow-test step: one pytest per test, at once, a log each
    assert steps['gpu_tests_collect']['result'] == '2 slow tests'
    assert steps['gpu_tests_slow']['result'].count('1 passed') == 2, steps
    for number in (0, 1):
        log = (out / 'gpu_tests_slow-{}.log'.format(number)).read_text()
        assert 'capsule_head_matches_cpu' in log and '1 passed' in log
    assert not list(out.glob('*.tmp'))
    assert summary['environment']['chainer'] == '7.8.1'
    row = summary['benchmark']['8']
    assert row['train_samples_per_s'] > 0 and row['profile']['functions_ms']
    assert row['einsum_train_samples_per_s'] > 0
    assert row['gpu_kernels_train_samples_per_s'] > 0
    assert row['gpu_convolutions_train_samples_per_s'] > 0
    assert row['gpu_both_train_samples_per_s'] > 0
    assert row['profile']['function_calls'] > 0
    # the CUDA-graph path first: its tests (what runs on NumPy) and its
    # speed; on the CPU nothing is captured, so train.py gets no --cuda-graph
    assert 'passed' in steps['graph_tests']['result']
    graph = summary['graph']['8']
    assert graph['static_samples_per_s'] > 0 and not graph['captured']
    assert '--cuda-graph' not in summary['training']['flags']
    assert summary['training']['plot'] in ('test-error.png', 'not drawn: '
                                           'matplotlib is not installed')
    assert summary['training']['epochs_done'] == 1
    assert len(summary['training']['test_error_percent']) == 1
    # on the CPU the variants differ by noise only; whichever was taken,
    # train.py ran with its flags
    training = summary['training']
    assert training['flags'] == dict(
        gpu_check.GPU_VARIANTS).get(training['variant'], [])
    assert training['benchmark_batch'] == 8
    assert training['benchmark_samples_per_s'] == row[gpu_check.variant_key(
        training['variant'], 'train_samples_per_s')]
    report = (out / 'summary.md').read_text()
    assert '| 8 |' in report and '| epoch | seconds | test error % |' in report
    assert 'host side alone of the same functions' in report
    if has_torch:
        assert row['kernel_profile']['steps'] == 1
        assert (out / row['kernel_profile']['trace']).exists()
        assert 'GPU side of a fast training step at batch 8' in report
    else:
        assert row['kernel_profile'] == {
            'skipped': 'PyTorch is not importable here'}
        assert 'GPU kernels of a step: not recorded' in report


@pytest.mark.parametrize('flags, fragment', [
    (['--batchsizes', '100,x'], '--batchsizes'),
    (['--batchsizes', '0'], '--batchsizes'),
    (['--budget-minutes', '0'], '--budget-minutes'),
    (['--max-epochs', '-1'], '--max-epochs'),
    (['--data-dir', '/nonexistent/mnist'], '--data-dir'),
])
def test_bad_flags_are_one_line(flags, fragment, tmp_path):
    args = ['--data-dir', str(tmp_path), '--out', str(tmp_path / 'o')]
    result = run_check(*(args + flags))
    assert_one_error(result, fragment, status=2)


@pytest.fixture
def check(tmp_path):
    """A Check, not run, with --data-dir tmp_path and --out tmp_path/o."""
    return gpu_check.Check(gpu_check.parse_args(
        ['--data-dir', str(tmp_path), '--out', str(tmp_path / 'o')]))


def alive(pid):
    """Whether process pid runs (a zombie, killed but not yet reaped by
    whoever adopted it, does not)."""
    try:
        with open('/proc/{}/stat'.format(pid)) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_tests_run_together_stop_at_their_timeout_with_what_they_started(
        check, tmp_path):
    pid_file = tmp_path / 'grandchild.pid'
    stuck = [sys.executable, '-c', (
        'import subprocess, sys, time; child = subprocess.Popen([sys.executable'
        ', "-c", "import time; time.sleep(120)"]); open({!r}, "w").write('
        'str(child.pid)); print("started", flush=True); time.sleep(120)'
    ).format(str(pid_file))]
    quick = [sys.executable, '-c', 'print("1 passed")']
    start = time.monotonic()
    check.run_together('slow', [stuck, quick], timeout=1)
    assert time.monotonic() - start < 60
    step = check.summary['steps']['slow']
    assert step['status'] == 'timeout after 10 s'    # the shortest timeout
    assert step['result'] == 'started; 1 passed'
    grandchild = int(pid_file.read_text())
    for _ in range(50):     # killed with its group
        if not alive(grandchild):
            break
        time.sleep(0.1)
    assert not alive(grandchild)
    assert (tmp_path / 'o' / 'slow-1.log').read_text().endswith('1 passed\n')
    assert not list((tmp_path / 'o').glob('*.tmp'))


@pytest.mark.parametrize('output, expected', [
    ('fast : train\n{"train_samples_per_s": 5.0}\n', {'train_samples_per_s':
                                                      5.0}),
    # PyTorch's profiler writes to stderr, which the log holds after stdout
    ('{"a": 1}\nERROR:2026 DeviceProperties.cpp:56] gpuGetDeviceCount\n',
     {'a': 1}),
    ('fast : train\n', None),
    ('{"cut short\n', None),
])
def test_benchmark_result_is_its_json_line(output, expected, check,
                                           monkeypatch):
    def run(step, command, log, timeout, env=None):
        check.summary['steps'][step] = {'status': 0}
        return 0, output

    monkeypatch.setattr(check, 'run', run)
    assert check.run_benchmark('benchmark-8', 8) == expected
    status = check.summary['steps']['benchmark-8']['status']
    # a step that printed no result is not counted as a success
    assert status == (0 if expected else 'exit 0 without a JSON line')


def test_report_sets_epoch_times_beside_the_steps_they_hold(check,
                                                             tmp_path):
    check.summary.update(
        environment={'gpu': 'a GPU'},
        benchmark={'100': {'train_samples_per_s': 5000.0,
                           'gpu_kernels_train_samples_per_s': 6000.0}},
        training={'epochs_planned': 2, 'train_size': 60000, 'epochs_done': 2,
                  'seconds_per_epoch': [16.2, 16.4],
                  'test_error_percent': [1.15, 0.79],
                  'flags': ['--gpu-kernels'], 'variant_reason': 'WHY',
                  # the trained variant's speed, not the default's
                  'benchmark_batch': 100, 'benchmark_samples_per_s': 6000.0})
    check.report()
    report = (tmp_path / 'o' / 'summary.md').read_text()
    assert ('full-MNIST training, --reconstruct --gpu-kernels: 2 epochs '
            '(the fast path: WHY)') in report
    assert '| 2 | 16.4 | 0.79 |' in report
    assert ('training speed at batch 100 (6000.0 samples/s) gives 10.0 s of '
            'steps per epoch') in report


def test_report_says_whether_the_speed_target_is_met(check, tmp_path):
    """Our fastest variant per batch size against PyTorch eager."""
    check.summary.update(environment={'gpu': 'a GPU'}, benchmark={
        '100': {'train_samples_per_s': 6000.0,
                'gpu_both_train_back_to_back_samples_per_s': 9000.0,
                'eval_samples_per_s': 30000.0, 'peak_gpu_mb': 1000.0,
                'torch_eager_samples_per_s': 10000.0},
        '128': {'train_samples_per_s': 11000.0,
                'torch_eager_samples_per_s': 10500.0},
        '256': {'train_samples_per_s': 5000.0}})
    check.report()
    report = (tmp_path / 'o' / 'summary.md').read_text()
    assert ('target at batch 100: NOT met (ours at best 9000.0 samples/s, '
            '"ours fast, both, back to back", against PyTorch eager 10000.0: '
            '0.90 times; the default fast path 6000.0)') in report
    assert 'target at batch 128: met (ours at best 11000.0' in report
    assert 'target at batch 256: not compared' in report


STEPS_PASSED = {'gpu_tests': {'status': 0}, 'gpu_tests_collect': {'status': 0},
                'gpu_tests_slow': {'status': 0}, 'train': {'status': 0}}


@pytest.mark.parametrize('row, steps, chosen, why', [
    # the fastest variant, back to back, 10% ahead of the default
    ({'train_back_to_back_samples_per_s': 6000.0,
      'gpu_kernels_train_back_to_back_samples_per_s': 6300.0,
      'gpu_both_train_back_to_back_samples_per_s': 6600.0}, STEPS_PASSED,
     'gpu_both', 'gpu_both, the fastest variant, 6600.0 against'),
    # 2% ahead: within noise, the default stays
    ({'train_back_to_back_samples_per_s': 6000.0,
      'gpu_kernels_train_back_to_back_samples_per_s': 6120.0}, STEPS_PASSED,
     'default', 'at best gpu_kernels 6120.0 against 6000.0'),
    # faster, but a slow GPU test failed (or timed out)
    ({'train_back_to_back_samples_per_s': 6000.0,
      'gpu_both_train_back_to_back_samples_per_s': 9000.0},
     dict(STEPS_PASSED, gpu_tests_slow={'status': 'timeout after 60 s'}),
     'default', 'not every GPU test passed'),
    # the GPU tests did not run
    ({'train_back_to_back_samples_per_s': 6000.0,
      'gpu_both_train_back_to_back_samples_per_s': 9000.0},
     {'train': {'status': 0}}, 'default', 'not every GPU test passed'),
    # a variant that failed to run has no figure
    ({'train_back_to_back_samples_per_s': 6000.0}, STEPS_PASSED, 'default',
     'the variants were not timed'),
])
def test_training_takes_the_fastest_variant_only_when_tested(row, steps,
                                                             chosen, why):
    tag, flags, reason = gpu_check.choose_training_variant(row, steps)
    assert tag == chosen
    assert flags == dict(gpu_check.GPU_VARIANTS).get(tag, [])
    assert why in reason


@pytest.mark.skipif(importlib.util.find_spec('cupy') is not None,
                    reason='CuPy is installed here')
def test_without_cupy_it_stops_at_once_with_one_line(tmp_path):
    start = time.monotonic()
    result = run_check('--data-dir', tmp_path, '--out', tmp_path / 'o')
    assert time.monotonic() - start < 30   # no step ran (they take 75 s)
    line = assert_one_error(result, 'needs a working GPU',
                            'CuPy is not installed', 'pip install',
                            '--dry-run', status=1)
    assert 'test' not in line.lower().replace('--dry-run', '')
    assert result.stdout == ''
    assert not (tmp_path / 'o').exists()


class Finished:
    def __init__(self, returncode, stdout='', stderr=''):
        self.returncode, self.stdout, self.stderr = returncode, stdout, \
            stderr


def test_a_gpu_cupy_cannot_reach_is_said_before_any_step(monkeypatch):
    monkeypatch.setattr(gpu_check.importlib.util, 'find_spec',
                        lambda name: object())   # as if CuPy were there
    line = ('cannot use device @cupy:0: cudaErrorNoDevice: no CUDA-capable '
            'device is detected; no NVIDIA GPU found on this machine')
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return Finished(1, stdout=line + '\n')
    monkeypatch.setattr(gpu_check.subprocess, 'run', fake_run)
    assert gpu_check.gpu_problem('@cupy:0') == line
    assert "'@cupy:0'" in calls[0][-1]     # the probe sets up that device
    monkeypatch.setattr(gpu_check.subprocess, 'run',
                        lambda command, **kwargs: Finished(0))
    assert gpu_check.gpu_problem('@cupy:0') is None
    assert gpu_check.gpu_problem('@numpy') is None   # nothing to check


def test_help_names_the_gpu_as_the_default_device():
    parser_help = subprocess.run(
        [sys.executable, os.path.join(REPO, 'dev/gpu_check.py'), '--help'],
        cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    text = ' '.join(parser_help.split())
    assert '(default: @cupy:0)' in text
    assert 'the CPU, the default' not in text


@pytest.mark.skipif(importlib.util.find_spec('cupy') is not None,
                    reason='CuPy is installed here')
def test_the_device_probe_reports_select_devices_line(monkeypatch):
    """The real probe process, where Chainer cannot use CuPy: its line is
    devices.select_device's."""
    monkeypatch.setattr(gpu_check.importlib.util, 'find_spec',
                        lambda name: object())
    problem = gpu_check.gpu_problem('@cupy:0')
    assert problem.startswith('@cupy:0 needs CuPy with a working CUDA GPU')
    assert '-d @numpy' in problem
