"""benchmark.py's profile: the host timer's exclusive times per function,
and the profile in the JSON line (its bad flags are in test_bad_input)."""
import gzip
import json
import os
import subprocess
import sys

import pytest

import benchmark

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

def span(cat, name, ts, dur, correlation=None):
    event = {'ph': 'X', 'cat': cat, 'name': name, 'ts': ts, 'dur': dur}
    if correlation is not None:
        event['args'] = {'correlation': correlation}
    return event


def synthetic_trace():
    """Two steps on one stream: each launches a GEMM inside
    Convolution2DFunction.forward, an elementwise kernel inside
    DigitCapsules.backward nested in an outer range, a memcpy outside any
    range; one kernel's launch was not recorded."""
    events = [{'ph': 'M', 'name': 'process_name'}]   # metadata, ignored
    for step, base in enumerate((0, 1000)):
        c = 10 * step
        events += [
            span('user_annotation', 'Convolution2DFunction.forward',
                 base, 100),
            span('cuda_runtime', 'cudaLaunchKernel', base + 10, 5, c + 1),
            span('user_annotation', 'step', base + 200, 400),
            span('user_annotation', 'DigitCapsules.backward', base + 300, 50),
            span('cuda_driver', 'cuLaunchKernel', base + 310, 5, c + 2),
            span('cuda_runtime', 'cudaMemcpyAsync', base + 700, 5, c + 3),
            # the device side: GEMM 40 us, elementwise 10 us overlapping
            # nothing, memcpy 5 us, one kernel without its launch 20 us
            span('kernel', 'sgemm_128x64', base + 20, 40, c + 1),
            span('kernel', 'cupy_multiply', base + 320, 10, c + 2),
            span('gpu_memcpy', 'Memcpy HtoD', base + 705, 5, c + 3),
            span('kernel', 'lost_launch', base + 800, 20, c + 4),
            # a range on the device's timeline is not a device operation
            span('gpu_user_annotation', 'step', base + 300, 40),
        ]
    return {'traceEvents': events}


def test_kernel_summary_charges_each_kernel_to_its_innermost_range():
    import kernel_profile
    summary = kernel_profile.summarize_trace(synthetic_trace(), steps=2,
                                             wall_s=0.002)
    assert summary['device_ops_per_step'] == 4
    assert summary['device_ms_per_step'] == 0.075          # 40+10+5+20 us
    assert summary['busy_ms_per_step'] == 0.075            # no overlaps
    assert summary['wall_ms_per_step'] == 1.0
    assert summary['idle_percent'] == 92.5
    assert summary['by_range'] == {
        'Convolution2DFunction.forward': [0.04, 1],
        kernel_profile.OTHER: [0.025, 2],        # the memcpy, the lost one
        'DigitCapsules.backward': [0.01, 1]}     # not the outer 'step'
    assert summary['top_ops'][0] == ['sgemm_128x64', 0.04, 1]
    assert ['[gpu_memcpy] Memcpy HtoD', 0.005, 1] in summary['top_ops']


def test_busy_time_counts_overlapping_kernels_once():
    import kernel_profile
    trace = {'traceEvents': [span('kernel', 'a', 0, 10),
                             span('kernel', 'b', 5, 10),     # overlaps a
                             span('kernel', 'c', 30, 10)]}
    summary = kernel_profile.summarize_trace(trace, steps=1, wall_s=1e-4)
    assert summary['device_ms_per_step'] == 0.03
    assert summary['busy_ms_per_step'] == 0.025
    assert summary['by_range'] == {kernel_profile.OTHER: [0.03, 3]}


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
