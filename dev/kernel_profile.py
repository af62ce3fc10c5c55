"""What the GPU does during a training step, kernel by kernel.

PyTorch's profiler reads the device's activity through CUPTI, which sees
every kernel the process launches, CuPy's as well as PyTorch's. While it
records, a function hook marks each Chainer function's forward and
backward call as a named range, so each kernel can be charged to the
function that launched it. ``summarize_trace`` reads the Chrome trace the
profiler writes and answers the question a speed-up starts from: how much
of a step the GPU is busy, and with what.

Needs PyTorch (``benchmark.py --kernel-profile``, run by gpu_check.py on a
machine that has it); nothing else in this project imports it.
"""
import os
import sys
# the repository above dev/: the capsnet package and nets.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bisect
import gzip
import json
import tempfile
import time

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import files

# Chrome-trace categories of PyTorch's profiler (Kineto)
DEVICE_CATEGORIES = ('kernel', 'gpu_memcpy', 'gpu_memset')
LAUNCH_CATEGORIES = ('cuda_runtime', 'cuda_driver')
RANGE_CATEGORY = 'user_annotation'
OTHER = '(outside any range)'


class MissingTorch(RuntimeError):
    """PyTorch (its profiler) is not importable."""


def require_torch():
    """PyTorch, with its profiler loaded; MissingTorch if it cannot be."""
    try:
        import torch
        import torch.profiler  # noqa: F401
    except ImportError as e:
        raise MissingTorch(str(e)) from None
    return torch


class _Ranges(chainer.FunctionHook):
    """Opens a profiler range around every Chainer function call."""

    name = 'KernelProfileRanges'

    def __init__(self, torch):
        self.torch = torch
        self.open = []

    def _enter(self, function, kind):
        name = getattr(function, '_impl_name', type(function).__name__)
        record_range = self.torch.profiler.record_function(
            '{}.{}'.format(name, kind))
        record_range.__enter__()
        self.open.append(record_range)

    def _leave(self):
        self.open.pop().__exit__(None, None, None)

    def forward_preprocess(self, function, in_data):
        self._enter(function, 'forward')

    def backward_preprocess(self, function, in_data, out_grad):
        self._enter(function, 'backward')

    def forward_postprocess(self, function, in_data):
        self._leave()

    def backward_postprocess(self, function, in_data, out_grad):
        self._leave()


def record(step, steps, synchronize, trace_path):
    """Run ``step()`` ``steps`` times under PyTorch's profiler.

    Each Chainer function call becomes a range named ``Function.forward`` /
    ``Function.backward`` (a step may open ranges of its own with
    ``annotate``). Writes the Chrome trace to ``trace_path`` (gzip if it
    ends with .gz) through ``files.atomic_write`` and returns ``(trace
    dict, wall seconds of the steps)``. Raises MissingTorch without PyTorch.
    """
    torch = require_torch()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    hook = _Ranges(torch)
    synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        with hook:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize()
            wall = time.perf_counter() - start
    # the profiler writes its trace only to a path
    with tempfile.TemporaryDirectory() as folder:
        exported = os.path.join(folder, 'trace.json')
        profiler.export_chrome_trace(exported)
        with open(exported, 'rb') as f:
            data = f.read()
    files.atomic_write(trace_path, lambda f: f.write(
        gzip.compress(data) if trace_path.endswith('.gz') else data))
    return json.loads(data), wall


def annotate(name):
    """A profiler range around a block (``with annotate('update'): ...``)."""
    return require_torch().profiler.record_function(name)


def _union_us(intervals):
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def summarize_trace(trace, steps, wall_s, top=15):
    """The GPU's side of ``steps`` profiled steps, per step.

    Args:
        trace: a Chrome trace dict from PyTorch's profiler (Kineto's
            categories: ``kernel``, ``gpu_memcpy``, ``gpu_memset`` on the
            device; ``cuda_runtime`` / ``cuda_driver`` launch calls with
            their ``correlation`` id; ``user_annotation`` ranges).
        steps: how many steps the trace holds; wall_s: their wall time.

    Returns a dict: ``device_ops_per_step`` (kernels, copies and memsets),
    ``device_ms_per_step`` (their durations added), ``busy_ms_per_step``
    (the union of their intervals: time the GPU was doing anything),
    ``wall_ms_per_step`` and ``idle_percent`` (the share of the step the GPU
    waited on the host), ``by_range`` (range name -> [device ms, device ops]
    per step, each device op charged to the innermost range open when the
    host launched it) and ``top_ops`` ([name, ms, calls] per step, the
    longest first).
    """
    events = [e for e in trace.get('traceEvents', [])
              if isinstance(e, dict) and e.get('ph') == 'X' and 'ts' in e]
    device = [e for e in events if e.get('cat') in DEVICE_CATEGORIES]
    launch_ts = {}
    for e in events:
        if e.get('cat') in LAUNCH_CATEGORIES:
            correlation = (e.get('args') or {}).get('correlation')
            if correlation is not None:
                launch_ts[correlation] = float(e['ts'])
    ranges = sorted((float(e['ts']), float(e['ts']) + float(e.get('dur', 0)),
                     e.get('name', '?')) for e in events
                    if e.get('cat') == RANGE_CATEGORY)
    starts = [r[0] for r in ranges]

    def innermost(ts):
        # the range that opened last among those still open at ts
        for start, end, name in reversed(ranges[:bisect.bisect_right(
                starts, ts)]):
            if end >= ts:
                return name
        return OTHER

    by_range, by_name = {}, {}
    for e in device:
        duration = float(e.get('dur', 0))
        ts = launch_ts.get((e.get('args') or {}).get('correlation'))
        owner = OTHER if ts is None else innermost(ts)
        entry = by_range.setdefault(owner, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
        name = e.get('name', '?')
        if e.get('cat') != 'kernel':
            name = '[{}] {}'.format(e['cat'], name)
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    per_step = float(steps)
    device_us = sum(float(e.get('dur', 0)) for e in device)
    busy_us = _union_us([(float(e['ts']), float(e['ts']) +
                          float(e.get('dur', 0))) for e in device])
    wall_ms = 1000 * wall_s / per_step
    busy_ms = busy_us / 1000 / per_step
    return {
        'steps': steps,
        'device_ops_per_step': round(len(device) / per_step, 1),
        'device_ms_per_step': round(device_us / 1000 / per_step, 3),
        'busy_ms_per_step': round(busy_ms, 3),
        'wall_ms_per_step': round(wall_ms, 3),
        'idle_percent': round(100 * (1 - busy_ms / wall_ms), 1)
        if wall_ms > 0 else None,
        'by_range': {name: [round(us / 1000 / per_step, 3),
                            round(count / per_step, 1)]
                     for name, (us, count) in sorted(
                         by_range.items(), key=lambda item: -item[1][0])},
        'top_ops': [[name[:100], round(us / 1000 / per_step, 3),
                     round(count / per_step, 1)]
                    for name, (us, count) in sorted(
                        by_name.items(), key=lambda item: -item[1][0])[:top]],
    }
