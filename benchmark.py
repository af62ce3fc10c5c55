#!/usr/bin/env python
"""Time CapsNet training steps and evaluation, fast kernels against plain.

    python benchmark.py --batchsize 100 --json

Both implementations run in this one process on the same parameters and
data, after warm-up, over several repeats; the median is reported. A
training step is forward, backward and Adam's update, with reconstruction
and 3 routing iterations (the paper's MNIST model). The fast path runs
first so that the peak resident memory it reports is its own.
"""
import json
import os
import platform
import resource
import statistics
import sys
import time

import cli  # standard library only: NumPy is imported after --threads


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
    add('--json', action='store_true',
        help='end with one line holding a JSON object')
    add('--default-malloc', action='store_true',
        help='leave glibc returning freed memory to the system (see '
             'fast_ops.keep_freed_memory)')
    return parser.parse_args(argv)


def peak_rss_mb():
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(function, warmup, repeats):
    """Median seconds of ``function()`` over ``repeats`` calls."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(model, optimizer, x, t, x_eval, args):
    """(training samples/s, evaluation samples/s) for one implementation."""
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

    train_s = time_calls(train_step, args.warmup, args.repeats)
    # as in an evaluation pass over a test set: the weights stay fixed, so
    # the fast path transforms each kernel once per pass, in the warm-up
    with model.inference():
        eval_s = time_calls(evaluate, args.warmup, args.repeats)
    return len(x) / train_s, len(x_eval) / eval_s


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        # must be set before NumPy loads its BLAS
        for var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS',
                    'MKL_NUM_THREADS'):
            os.environ[var] = str(args.threads)
    import numpy
    import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
    import chainer
    import datasets
    import fast_ops
    import nets

    # before any timing, so that both implementations run under it
    kept = False if args.default_malloc else fast_ops.keep_freed_memory()

    random = numpy.random.RandomState(0)
    numpy.random.seed(0)
    model = nets.CapsNet(routing=args.routing, reconstruct=True)
    optimizer = chainer.optimizers.Adam()
    optimizer.setup(model)
    x = random.rand(args.batchsize, 1, 28, 28).astype(numpy.float32)
    t = random.randint(0, 10, args.batchsize).astype(numpy.int32)
    x_eval = random.rand(args.eval_batchsize or args.batchsize, 1, 28,
                         28).astype(numpy.float32)

    result = {'batchsize': args.batchsize,
              'eval_batchsize': len(x_eval), 'routing': args.routing,
              'repeats': args.repeats,
              'threads': args.threads or 'default',
              'keep_freed_memory': kept,
              'machine': '{} ({} cores, {})'.format(
                  platform.processor() or platform.machine(),
                  os.cpu_count(), platform.platform(terse=True))}
    model.fast = True
    train, evaluation = measure(model, optimizer, x, t, x_eval, args)
    result.update(train_samples_per_s=round(train, 1),
                  eval_samples_per_s=round(evaluation, 1),
                  peak_rss_mb=round(peak_rss_mb(), 1))
    print('fast : train {:7.1f} samples/s   eval {:7.1f} samples/s   peak '
          'RSS {:.0f} MB'.format(train, evaluation, result['peak_rss_mb']))
    if not args.no_plain:
        model.fast = False
        train_p, eval_p = measure(model, optimizer, x, t, x_eval, args)
        result.update(plain_train_samples_per_s=round(train_p, 1),
                      plain_eval_samples_per_s=round(eval_p, 1),
                      train_speedup=round(train / train_p, 2),
                      eval_speedup=round(evaluation / eval_p, 2))
        print('plain: train {:7.1f} samples/s   eval {:7.1f} samples/s'
              .format(train_p, eval_p))
        print('fast/plain: train {:.2f}x   eval {:.2f}x'.format(
            result['train_speedup'], result['eval_speedup']))
    seconds_per_epoch = datasets.TRAIN_SIZE / train
    print('fast path, {:,} training images: about {:.1f} min/epoch of '
          'training steps (evaluation extra)'.format(datasets.TRAIN_SIZE,
                                                     seconds_per_epoch / 60))
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == '__main__':
    main()
