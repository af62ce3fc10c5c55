"""benchmark.py's profile: the host timer's exclusive times per function,
and the profile in the JSON line (its bad flags are in test_bad_input)."""
import json
import os
import subprocess
import sys

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


def test_profile_is_in_the_json_line():
    result = subprocess.run(
        [sys.executable, 'benchmark.py', '-b', '2', '--repeats', '1',
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
