#!/usr/bin/env python
"""Time CapsNet training steps and evaluation, fast kernels against plain.

    python benchmark.py --batchsize 100 --json
    python benchmark.py --device @cupy:0 --batchsize 100 --json    # GPU 0
    python benchmark.py --device @cupy:0 --profile                 # where to?
    python benchmark.py --device @cupy:0 --kernel-profile trace.json.gz
    python benchmark.py --multimnist-generator --data-dir D --json

Both implementations run in this one process on the same parameters and
data, after warm-up, over several repeats; the median is reported. A
training step is forward, backward and Adam's update, with reconstruction
and 3 routing iterations (the paper's MNIST model). The fast path runs
first so that the peak resident memory it reports is its own. On a GPU
every timed call ends with a device synchronisation; the fast path's
training is also timed with its steps back to back and one synchronisation
at the end (``train_back_to_back_samples_per_s``), as train.py runs them
and as the PyTorch reference times its own. The peak GPU memory is the CuPy
memory pool's high-water mark for each path (the pool is emptied in
between).
"""
import os
import sys
# the repository above dev/: the capsnet package and nets.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capsnet import cli  # standard library only: NumPy is imported after --threads
if __name__ == '__main__':  # first: see cli.py
    cli.exit_on_signals_while_importing()

import json
import platform
import resource
import statistics
import time


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add('--batchsize', '-b', type=cli.positive_int, default=100,
        help='examples per training step')
    add('--eval-batchsize', type=cli.positive_int, default=None,
        help='examples per evaluation step (default: --batchsize)')
    add('--threads', type=cli.positive_int, default=None,
        help='BLAS threads (default: the BLAS default)')
    add('--repeats', type=cli.positive_int, default=5,
        help='timed steps per measurement')
    add('--warmup', type=cli.non_negative_int, default=2,
        help='untimed steps before each measurement')
    add('--routing', type=cli.positive_int, default=3,
        help='routing iterations r')
    add('--no-plain', action='store_true', help='time only the fast path')
    add('--routing-contraction', default='auto',
        choices=['auto', 'einsum', 'broadcast'],
        help="how the fast routing contracts u_hat (KernelOptions.einsum): "
             "auto picks einsum on the CPU, broadcast-and-sum on the GPU")
    cli.add_gpu_fast_path_arguments(parser)
    add('--profile', action='store_true',
        help='also break a fast training step down by Chainer function '
             '(chainer.function_hooks.TimerHook: CUDA events on the GPU) '
             'and time the host side of a step alone')
    add('--kernel-profile', metavar='TRACE', default=None,
        help="also record a few fast training steps' GPU kernels with "
             "PyTorch's profiler (needs PyTorch), each charged to the "
             "Chainer function that launched it; writes the Chrome trace "
             "to TRACE (gzip if it ends with .gz) and a summary to the "
             "output")
    add('--json', action='store_true',
        help='end with one line holding a JSON object')
    add('--default-malloc', action='store_true',
        help='leave glibc returning freed memory to the system (see '
             'convolution.keep_freed_memory)')
    add('--multimnist-generator', action='store_true',
        help='time only the on-the-fly MultiMNIST generator instead '
             '(paper.MultiMNIST at 1,000 pairs per digit: pairs/s of its '
             'batch path at batch 100 and 128, and the peak resident '
             'memory of building it and drawing the batches)')
    add('--data-dir', default=None,
        help='MNIST folder for --multimnist-generator (default: random '
             'uint8 digits, the same work)')
    cli.add_device_arguments(parser)
    return parser.parse_args(argv)


def peak_rss_mb():
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def multimnist_generator(args, batches=50, batchsizes=(100, 128)):
    """pairs/s of paper.MultiMNIST's batch path (get_examples) over
    ``batches`` batches of random indices for each batch size, on the 60,000
    MNIST training digits at the paper's 1,000 pairs per digit (60M pairs),
    and the process's peak RSS before building it and at the end."""
    import numpy
    from capsnet.data import paper
    if args.data_dir:
        images, labels = paper.load_mnist_arrays(args.data_dir)['train']
        source = 'MNIST ' + args.data_dir
    else:
        random = numpy.random.RandomState(0)
        images = random.randint(0, 256, (60000, 28, 28)).astype(numpy.uint8)
        labels = numpy.arange(60000) % 10
        source = 'random uint8 digits'
    before = peak_rss_mb()
    start = time.perf_counter()
    dataset = paper.MultiMNIST(images, labels, pairs_per_digit=1000, seed=0)
    result = dict(source=source, pairs=len(dataset),
                  build_s=round(time.perf_counter() - start, 4),
                  peak_rss_mb_before_build=round(before, 1))
    order = numpy.random.RandomState(1)
    for batchsize in batchsizes:
        indices = order.randint(0, len(dataset), (batches, batchsize))
        dataset.get_examples(indices[0])   # warm-up
        start = time.perf_counter()
        for index in indices:
            dataset.get_examples(index)
        seconds = time.perf_counter() - start
        result['pairs_per_s_batch{}'.format(batchsize)] = round(
            batches * batchsize / seconds, 1)
    result['peak_rss_mb'] = round(peak_rss_mb(), 1)
    print('MultiMNIST generator ({:,} pairs, {}): built in {:.4f} s; '
          .format(result['pairs'], source, result['build_s'])
          + ', '.join('batch {}: {:,.0f} pairs/s'.format(
              b, result['pairs_per_s_batch{}'.format(b)])
              for b in batchsizes)
          + '; peak RSS {:.0f} MB ({:.0f} MB before building)'.format(
              result['peak_rss_mb'], before))
    if args.json:
        print(json.dumps(result))
    return result


def time_calls(function, warmup, repeats, synchronize=lambda: None):
    """Median seconds of ``function()`` over ``repeats`` calls.

    ``synchronize`` waits for the device, so that each call is timed to the
    end of its GPU work.
    """
    for _ in range(warmup):
        function()
    synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def time_back_to_back(function, repeats, synchronize):
    """Mean seconds of ``function()`` over ``repeats`` calls made one after
    the other with one synchronisation at the end, as train.py runs its
    steps and as the PyTorch reference (torch_capsnet.py) times its own:
    on a GPU the host prepares a step while the device still runs the one
    before."""
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize()
    return (time.perf_counter() - start) / repeats


def measure(model, optimizer, x, t, x_eval, args, synchronize,
            back_to_back=False):
    """(training samples/s, evaluation samples/s, training samples/s with
    the steps back to back or None) for one implementation."""
    from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
    import chainer

    def train_step():
        model.cleargrads()
        loss = model(x, t)
        loss.backward()
        optimizer.update()

    def evaluate():
        with chainer.using_config('train', False), \
                chainer.no_backprop_mode():
            model.lengths(model.capsules(x_eval)).array.argmax(axis=1)

    train_s = time_calls(train_step, args.warmup, args.repeats, synchronize)
    back_to_back_s = time_back_to_back(train_step, args.repeats,
                                       synchronize) if back_to_back else None
    # as in an evaluation pass over a test set: the weights stay fixed, so
    # the fast path transforms each kernel once per pass, in the warm-up
    with model.inference():
        eval_s = time_calls(evaluate, args.warmup, args.repeats, synchronize)
    return (len(x) / train_s, len(x_eval) / eval_s,
            back_to_back_s and len(x) / back_to_back_s)


def host_timer():
    """A Chainer function hook that adds up, per function type, the host
    seconds of forward and backward calls without waiting for the device:
    the Python and launch side of each function, exclusive of the
    functions it calls (Linear's backward calls LinearGradData, ...)."""
    from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
    import chainer

    class HostTimer(chainer.FunctionHook):
        name = 'HostTimer'

        def __init__(self):
            self.seconds = {}
            self.running = []   # [start, seconds spent in nested calls]

        def _enter(self, function, *args):
            self.running.append([time.perf_counter(), 0.0])

        def _leave(self, function, *args):
            start, nested = self.running.pop()
            elapsed = time.perf_counter() - start
            if self.running:
                self.running[-1][1] += elapsed
            # the name TimerHook reports
            name = getattr(function, '_impl_name', type(function).__name__)
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested

        forward_preprocess = backward_preprocess = _enter
        forward_postprocess = backward_postprocess = _leave

    return HostTimer()


def profile(model, optimizer, x, t, args, synchronize):
    """Where a training step's time goes, as a dict for the JSON line.

    ``functions_ms``: milliseconds per step of each Chainer function type,
    forward and backward together (TimerHook synchronises around every
    function and counts the functions a backward pass calls in it as well,
    ReLUGrad2 inside ReLU's, so these add up to more than an unhooked
    step); ``host_functions_ms``: the same functions' host side alone, each
    without the functions it calls (no synchronisation: on the GPU, what
    Python and the kernel launches cost);
    ``function_calls``: Chainer function calls in a forward and backward
    pass; ``update_ms``: Adam's update; ``host_ms``: a step without waiting
    for the device (the Python and launch side alone; on the CPU the same
    as the step).
    """
    from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
    from chainer.function_hooks import TimerHook

    def forward_backward():
        model.cleargrads()
        model(x, t).backward()

    def step():
        forward_backward()
        optimizer.update()

    forward_backward()
    hook = TimerHook()
    with hook:
        for _ in range(args.repeats):
            forward_backward()
    synchronize()
    summary = hook.summary()
    functions = {name: round(1000 * entry['elapsed_time'] / args.repeats, 3)
                 for name, entry in summary.items()}
    # each node counts once forward and once backward (if it has a gradient)
    calls = sum(entry['occurrence'] for entry in summary.values()) \
        // args.repeats
    host = host_timer()
    with host:
        for _ in range(args.repeats):
            forward_backward()
    synchronize()
    host_functions = {name: round(1000 * seconds / args.repeats, 3)
                      for name, seconds in host.seconds.items()}
    update_s = time_calls(optimizer.update, 1, args.repeats, synchronize)
    synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    host_s = (time.perf_counter() - start) / args.repeats
    synchronize()
    ranked = sorted(functions.items(), key=lambda item: -item[1])
    print('profile of a fast training step (ms per step; forward + '
          'backward per function type):')
    print('  {:32s} {:>9s} {:>9s}'.format('', 'synced', 'host'))
    for name, ms in ranked:
        print('  {:32s} {:9.3f} {:9.3f}'.format(name, ms,
                                                host_functions.get(name, 0)))
    print('  {:32s} {:9.3f}'.format('(Adam update)', 1000 * update_s))
    print('  host side of a whole step, unsynchronised: {:.3f} ms'.format(
        1000 * host_s))
    print('  Chainer function calls per step (forward and backward): {}'
          .format(calls))
    return {'functions_ms': dict(ranked),
            'host_functions_ms': dict(sorted(
                host_functions.items(), key=lambda item: -item[1])),
            'function_calls': calls,
            'update_ms': round(1000 * update_s, 3),
            'host_ms': round(1000 * host_s, 3)}


def kernel_profile(model, optimizer, x, t, args, synchronize):
    """The GPU's side of a fast training step (kernel_profile.py), as a
    dict for the JSON line; prints the figures."""
    import kernel_profile as kernels

    def step():
        model.cleargrads()
        model(x, t).backward()
        with kernels.annotate('optimizer.update'):
            optimizer.update()

    for _ in range(max(1, args.warmup)):
        step()
    steps = min(args.repeats, 5)   # a few steps keep the trace small
    trace, wall = kernels.record(step, steps, synchronize,
                                 args.kernel_profile)
    summary = kernels.summarize_trace(trace, steps, wall)
    print('GPU side of a fast training step (PyTorch profiler, {} steps; '
          'trace in {}):'.format(steps, args.kernel_profile))
    print('  {device_ops_per_step} device operations, {device_ms_per_step} '
          'ms of them; GPU busy {busy_ms_per_step} of {wall_ms_per_step} ms '
          '({idle_percent}% idle)'.format(**summary))
    if not summary['device_ops_per_step']:
        print('  no device operations recorded (none on the CPU; on a GPU, '
              "the profiler did not see CuPy's kernels)")
        return summary
    print('  by Chainer function (ms, operations per step):')
    for name, (ms, count) in list(summary['by_range'].items())[:15]:
        print('    {:44s} {:9.3f} {:7.1f}'.format(name, ms, count))
    print('  longest device operations (ms, calls per step):')
    for name, ms, count in summary['top_ops'][:10]:
        print('    {:44s} {:9.3f} {:7.1f}'.format(name[:44], ms, count))
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        # must be set before NumPy loads its BLAS
        for var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS',
                    'MKL_NUM_THREADS'):
            os.environ[var] = str(args.threads)
    if args.kernel_profile:
        # a missing profiler or folder is found before the slow part
        # (and after --threads: torch loads NumPy)
        cli.check_writable(os.path.dirname(os.path.abspath(
            args.kernel_profile)), '--kernel-profile')
        import kernel_profile as kernels
        try:
            kernels.require_torch()
        except kernels.MissingTorch:
            cli.fail('--kernel-profile needs PyTorch, whose profiler reads '
                     "the GPU's kernels (pip install torch); leave the flag "
                     'out to run without it')
    if args.multimnist_generator:
        multimnist_generator(args)
        return
    import numpy
    from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
    import chainer
    from capsnet.data import mnist
    from capsnet import devices
    from capsnet.kernels import KernelOptions, convolution
    import nets

    # before any timing, so that both implementations run under it
    kept = False if args.default_malloc else convolution.keep_freed_memory()
    kernel_options = KernelOptions(
        gpu_kernels=args.gpu_kernels, gpu_convolutions=args.gpu_convolutions,
        einsum={'auto': None, 'einsum': True,
                'broadcast': False}[args.routing_contraction])

    args.device = cli.device_spec(args.device)
    device = devices.select_device(args, keep_freed_memory=False)
    on_gpu = device.xp is not numpy
    if on_gpu:
        pool = device.xp.get_default_memory_pool()

        def synchronize():
            device.device.synchronize()

        def peak_memory_mb():
            synchronize()
            return pool.total_bytes() / 2 ** 20
    else:
        def synchronize():
            pass

    random = numpy.random.RandomState(0)
    numpy.random.seed(0)
    model = nets.CapsNet(routing=args.routing, reconstruct=True)
    model.kernel_options = kernel_options
    model.to_device(device)
    optimizer = chainer.optimizers.Adam()
    optimizer.setup(model)
    x = device.send(random.rand(args.batchsize, 1, 28, 28)
                    .astype(numpy.float32))
    t = device.send(random.randint(0, 10, args.batchsize)
                    .astype(numpy.int32))
    x_eval = device.send(random.rand(args.eval_batchsize or args.batchsize,
                                     1, 28, 28).astype(numpy.float32))

    result = {'batchsize': args.batchsize,
              'eval_batchsize': len(x_eval), 'routing': args.routing,
              'routing_contraction': args.routing_contraction,
              'gpu_kernels': args.gpu_kernels,
              'gpu_convolutions': args.gpu_convolutions,
              'repeats': args.repeats,
              'threads': args.threads or 'default',
              'keep_freed_memory': kept,
              'device': str(device),
              'machine': '{} ({} cores, {})'.format(
                  platform.processor() or platform.machine(),
                  os.cpu_count(), platform.platform(terse=True))}
    if on_gpu:
        properties = device.xp.cuda.runtime.getDeviceProperties(
            device.device.id)
        name = properties['name']
        result['gpu'] = name.decode() if isinstance(name, bytes) else name
    model.fast = True
    # on a GPU also with the steps back to back (on the CPU nothing runs
    # ahead, so the figure would repeat the first)
    train, evaluation, back_to_back = measure(
        model, optimizer, x, t, x_eval, args, synchronize,
        back_to_back=on_gpu)
    result.update(train_samples_per_s=round(train, 1),
                  eval_samples_per_s=round(evaluation, 1),
                  peak_rss_mb=round(peak_rss_mb(), 1))
    memory = ''
    if on_gpu:
        result['train_back_to_back_samples_per_s'] = round(back_to_back, 1)
        result['peak_gpu_mb'] = round(peak_memory_mb(), 1)
        memory = '   peak GPU {:.0f} MB'.format(result['peak_gpu_mb'])
        pool.free_all_blocks()
    print('fast : train {:7.1f} samples/s   eval {:7.1f} samples/s   peak '
          'RSS {:.0f} MB{}'.format(train, evaluation, result['peak_rss_mb'],
                                   memory))
    if on_gpu:
        print('fast : train {:7.1f} samples/s with the steps back to back '
              '(one synchronisation after {}, as torch_capsnet.py times)'
              .format(back_to_back, args.repeats))
    if not args.no_plain:
        model.fast = False
        train_p, eval_p, _ = measure(model, optimizer, x, t, x_eval, args,
                                     synchronize)
        result.update(plain_train_samples_per_s=round(train_p, 1),
                      plain_eval_samples_per_s=round(eval_p, 1),
                      train_speedup=round(train / train_p, 2),
                      eval_speedup=round(evaluation / eval_p, 2))
        memory = ''
        if on_gpu:
            result['plain_peak_gpu_mb'] = round(peak_memory_mb(), 1)
            memory = '   peak GPU {:.0f} MB'.format(
                result['plain_peak_gpu_mb'])
        print('plain: train {:7.1f} samples/s   eval {:7.1f} samples/s{}'
              .format(train_p, eval_p, memory))
        print('fast/plain: train {:.2f}x   eval {:.2f}x'.format(
            result['train_speedup'], result['eval_speedup']))
    if args.profile:
        model.fast = True
        result['profile'] = profile(model, optimizer, x, t, args,
                                    synchronize)
    if args.kernel_profile:
        model.fast = True
        result['kernel_profile'] = kernel_profile(model, optimizer, x, t,
                                                  args, synchronize)
    seconds_per_epoch = mnist.TRAIN_SIZE / train
    print('fast path, {:,} training images: about {:.1f} min/epoch of '
          'training steps (evaluation extra)'.format(mnist.TRAIN_SIZE,
                                                     seconds_per_epoch / 60))
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
