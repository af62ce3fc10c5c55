"""dev/kernel_profile.py: the GPU's kernels of a step, read from a (here
synthetic) PyTorch trace: each kernel charged to its innermost range,
overlapping kernels counted once. benchmark.py --kernel-profile, which
runs it, is tested in test_dev_benchmark.py."""


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
