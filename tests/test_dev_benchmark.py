"""dev/benchmark.py: the profile (the host timer's exclusive times per
function, the profile in the JSON line), --kernel-profile with and without
PyTorch, and bad flags and devices in one line."""
import gzip
import json
import os
import subprocess
import sys

import pytest

import benchmark
from conftest import assert_one_error, needs_no_cupy, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Function:
    def __init__(self, name):
        self._impl_name = name


def test_host_timer_counts_nested_calls_once(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: next(ticks))
    timer = benchmark.host_timer()
    outer, inner = Function('LinearFunction'), Function('LinearGradData')
    timer.forward_preprocess(outer, None)          # t = 0
    timer.forward_postprocess(outer, None)         # t = 1
    timer.backward_preprocess(outer, None, None)   # t = 2
    timer.forward_preprocess(inner, None)          # t = 3: called inside
    next(ticks)                                    # t = 4: it works
    timer.forward_postprocess(inner, None)         # t = 5
    timer.backward_postprocess(outer, None, None)  # t = 6
    # the outer node's own time: 1 forward + (6 - 2) - 2 spent inside
    assert timer.seconds == {'LinearFunction': 3, 'LinearGradData': 2}
    assert timer.running == []


def test_back_to_back_timing_synchronises_once_at_each_end(monkeypatch):
    ticks = iter([10.0, 14.0])
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: next(ticks))
    calls = []
    seconds = benchmark.time_back_to_back(
        lambda: calls.append('step'), 4, lambda: calls.append('sync'))
    assert calls == ['sync'] + ['step'] * 4 + ['sync']
    assert seconds == 1.0


def test_profile_is_in_the_json_line():
    result = subprocess.run(
        [sys.executable, 'dev/benchmark.py', '-b', '2', '--repeats', '1',
         '--warmup', '1', '--no-plain', '--profile', '--json'], cwd=REPO,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    profile = json.loads(result.stdout.strip().splitlines()[-1])['profile']
    assert set(profile['host_functions_ms']) == set(profile['functions_ms'])
    assert 'DigitCapsules' in profile['functions_ms']
    # the paper's model, fast path on the CPU: 14 nodes forward; backward,
    # the 11 with a gradient (not the input's reshapes), the ReLUGrad2 and
    # MulConstant that ReLU's and MulConstant's call, and the Add of v's
    # two gradients (from the margin loss and from the mask)
    assert profile['function_calls'] == 28
    assert profile['host_ms'] > 0 and profile['update_ms'] > 0


# -- --kernel-profile: the GPU's side of a step, read from PyTorch's trace --


def test_kernel_profile_without_torch_is_one_clear_line(tmp_path):
    # as on a machine without PyTorch, whether or not this one has it
    code = ('import sys, runpy; sys.modules["torch"] = None; '
            'sys.path.insert(0, "dev"); '
            'sys.argv = ["dev/benchmark.py"] + sys.argv[1:]; '
            'runpy.run_path("dev/benchmark.py", run_name="__main__")')
    result = subprocess.run(
        [sys.executable, '-c', code, '-b', '2', '--kernel-profile',
         str(tmp_path / 'trace.json')], cwd=REPO, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith('error: --kernel-profile needs PyTorch')
    assert len(result.stderr.splitlines()) == 1
    assert 'Traceback' not in result.stderr


def test_kernel_profile_runs_where_torch_is_installed(tmp_path):
    pytest.importorskip('torch.profiler', reason='PyTorch is not installed '
                        '(benchmark.py --kernel-profile needs it)')
    trace = tmp_path / 'trace.json.gz'
    result = subprocess.run(
        [sys.executable, 'dev/benchmark.py', '-b', '2', '--repeats', '2',
         '--warmup', '1', '--no-plain', '--kernel-profile', str(trace),
         '--json'], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])[
        'kernel_profile']
    assert summary['steps'] == 2 and summary['wall_ms_per_step'] > 0
    with gzip.open(trace, 'rt') as f:
        events = json.load(f)['traceEvents']
    # every Chainer function call and the update were recorded as ranges
    names = {e.get('name') for e in events if e.get('cat') ==
             'user_annotation'}
    assert {'DigitCapsules.forward', 'DigitCapsules.backward',
            'optimizer.update'} <= names


def test_benchmark_batchsize_zero():
    assert_one_error(run_script('dev/benchmark.py', '-b', '0'), '--batchsize',
                     'must be an integer > 0', status=2)


@pytest.mark.parametrize('flags, fragments', [
    (['--routing', '0'], ['argument --routing:', "an integer > 0, got '0'"]),
    (['--eval-batchsize', '-5'], ['argument --eval-batchsize:',
                                  "an integer > 0, got '-5'"]),
    (['--threads', '0'], ['argument --threads:', "an integer > 0, got '0'"]),
    (['--warmup', '-1'], ['argument --warmup:', "an integer >= 0, got '-1'"]),
    (['--repeats', 'abc'], ['argument --repeats:',
                            "an integer > 0, got 'abc'"])],
    ids=['routing-0', 'eval-batchsize-negative', 'threads-0',
         'warmup-negative', 'repeats-not-a-number'])
def test_benchmark_other_bad_numbers(flags, fragments):
    assert_one_error(run_script('dev/benchmark.py', '-b', '1', '--repeats', '1',
                                '--no-plain', *flags), *fragments, status=2)


@needs_no_cupy
def test_benchmark_gpu_without_cupy():
    """benchmark.py had a device message of its own ('(...); check
    --device'); it now takes the other tools' line."""
    assert_one_error(run_script('dev/benchmark.py', '-d', '@cupy:0', '--repeats', '1'),
                     '@cupy:0', 'CuPy cannot be used here', status=1)
