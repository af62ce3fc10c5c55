#!/usr/bin/env python
"""One GPU check: the GPU tests, speed beside PyTorch, a full-MNIST run.

    python gpu_check.py --data-dir DATA/mnist --out gpu-check \\
        [--torch-ref ../shared/bench/torch_capsnet.py] [--budget-minutes 8]

Runs, each step as its own process, every result written to --out as soon
as it exists (so an interrupted check keeps what it measured):

1. environment.json: Python, NumPy, Chainer, CuPy, CUDA, the GPU's name and
   which compat.py patches were applied;
2. gpu_tests.log, gpu_tests_slow-N.log: ``CAPSNET_TEST_GPU=1 python -m
   pytest -q -m gpu``, the slow tests each in its own process, at once;
3. benchmark-B.json for B in --batchsizes: ``benchmark.py --device D -b B
   --json`` (the fast and the plain path; at the first size also with the
   einsum contraction, --gpu-kernels, --gpu-convolutions and both), and
   beside it the PyTorch
   reference's training samples/s, eager and torch.compile, on the same GPU
   (torch-B-eager.txt, torch-B-compile.txt) when --torch-ref is given and
   PyTorch can use the GPU; at the first size also the GPU's side of a
   step, kernel by kernel (``benchmark.py --kernel-profile``, through
   PyTorch's profiler, kernel-trace-B.json.gz) where PyTorch is importable;
4. train/: ``train.py --device D --reconstruct`` on full MNIST (60,000 /
   10,000) for as many epochs as the time left allows, judged from the
   benchmark's speed (at least one), then evaluate.py and visualize.py on
   the model; with --gpu-kernels and/or --gpu-convolutions where that
   variant was the fastest in the benchmark by at least 3% and every GPU
   test passed (the summary says which and why);
5. summary.json and summary.md: the figures above, per-epoch time and test
   error, and per batch size whether our fastest training variant reaches
   PyTorch eager's samples/s (issue 10's target).

The device is GPU 0 (``-d @cupy:0``) unless -d says otherwise. Without
CuPy, or where CuPy reaches no GPU, the check stops at once, before any
step, with one line saying why (status 1).

``--dry-run`` does the same on the CPU at toy sizes (the GPU tests run with
CAPSNET_TEST_DEVICE=@numpy, the training on 300 examples): a check of this
script itself, not a measurement.
"""
import os
import sys
# the repository above dev/: the capsnet package and nets.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capsnet import cli
if __name__ == '__main__':  # first: see cli.py
    cli.exit_on_signals_while_importing()

import importlib.util
import json
import platform
import signal
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)   # the tools and tests/ are there
# PyTorch's modes (../shared/bench/torch_capsnet.py); on the CPU (dry run)
# eager only: compiling takes minutes there and graph needs CUDA
TORCH_MODES = ('eager', 'compile', 'compile-ro', 'graph')
# the public reimplementations' test error (%) at epochs 10 / 20 / 50
PEERS = {10: (0.46, 0.56), 20: (0.38, 0.42), 50: (0.30, 0.36)}
PAPER_ERROR = 0.25
GRAPH_TESTS = ('cuda_graph or graph_run or capture_failure or '
               'static_evaluator')
EPOCH_MARGIN = 1.8   # measured on an H200: shifts, copies, logging and the test pass
# the fast path's optional GPU pieces, timed beside the default
GPU_VARIANTS = (('gpu_kernels', ['--gpu-kernels']),
                ('gpu_convolutions', ['--gpu-convolutions']),
                ('gpu_both', ['--gpu-kernels', '--gpu-convolutions']))
# the training run takes a variant instead of the default when it ran this
# many times as fast (steps back to back; below it, noise could choose)
VARIANT_MARGIN = 1.03


def variant_key(tag, key):
    """The benchmark row's key for figure ``key`` of variant ``tag`` (the
    default fast path's own key for 'default')."""
    return key if tag == 'default' else '{}_{}'.format(tag, key)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_device_arguments(parser, default='@cupy:0')
    parser.add_argument('--data-dir', required=True,
                        help='folder with the four MNIST *-ubyte.gz files')
    parser.add_argument('--out', '-o', default='gpu-check',
                        help='folder for every result of the check')
    parser.add_argument('--torch-ref', default=None,
                        help='PyTorch reference script (torch_capsnet.py) '
                        'to time beside ours; skipped when not given')
    parser.add_argument('--batchsizes', default='100,128',
                        help='comma-separated batch sizes to benchmark')
    parser.add_argument('--budget-minutes', type=cli.positive_float,
                        default=8.0,
                        help='time for the whole check; the training gets '
                        'what the earlier steps leave (default 8)')
    parser.add_argument('--max-epochs', type=cli.positive_int, default=50,
                        help='never train longer than this')
    parser.add_argument('--dry-run', action='store_true',
                        help='on the CPU (-d @numpy) at toy sizes: tests '
                        'this script, no GPU needed')
    args = parser.parse_args(argv)
    try:
        args.batchsizes = [cli.positive_int(b)
                           for b in args.batchsizes.split(',')]
    except Exception:
        parser.error("argument --batchsizes: must be integers > 0 separated "
                     "by commas, got {!r}".format(args.batchsizes))
    args.device = cli.device_spec(args.device)
    if not os.path.isdir(args.data_dir):
        parser.error('--data-dir {} is not a folder'.format(args.data_dir))
    if args.dry_run:
        args.device = '@numpy'
    return args


def last_line(output):
    """The last non-blank line of a command's output ('' if none)."""
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ''


class Check:
    """Runs the steps, keeps the time, writes results into one folder."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.deadline = time.monotonic() + 60 * args.budget_minutes
        self.summary = {'device': args.device, 'dry_run': args.dry_run,
                        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                        'steps': {}}
        cli.check_writable(self.out)

    def seconds_left(self):
        return self.deadline - time.monotonic()

    def path(self, name):
        return os.path.join(self.out, name)

    def write(self, name, text):
        tmp = self.path(name) + '.tmp'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, self.path(name))

    def run(self, step, command, log, timeout, env=None):
        """Run command, its output into log; record status and seconds."""
        start = time.monotonic()
        timeout = max(10, min(timeout, self.seconds_left()))
        print('[{:5.0f} s left] {}: {}'.format(
            self.seconds_left(), step, ' '.join(command)), flush=True)
        try:
            result = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True,
                timeout=timeout, env=dict(os.environ, **(env or {})))
            status, output = result.returncode, result.stdout + \
                result.stderr
        except subprocess.TimeoutExpired as e:
            status = 'timeout after {:.0f} s'.format(timeout)
            output = (e.stdout or b'').decode(errors='replace') if \
                isinstance(e.stdout, bytes) else (e.stdout or '')
        self.write(log, output)
        self.summary['steps'][step] = {
            'status': status, 'seconds': round(time.monotonic() - start, 1),
            'log': log}
        self.save_summary()
        return status, output

    def save_summary(self):
        self.write('summary.json', json.dumps(self.summary, indent=1) + '\n')

    # -- the steps ------------------------------------------------------

    def environment(self):
        code = ('import json, platform, numpy\n'
                'from capsnet import compat\n'
                'import chainer\n'
                'from chainer.backends import cuda\n'
                'info = dict(python=platform.python_version(), '
                'numpy=numpy.__version__, chainer=chainer.__version__, '
                'compat_patches=list(compat.APPLIED), '
                'cupy_available=cuda.available)\n'
                'if cuda.available:\n'
                '    import cupy\n'
                '    info.update(cupy=cupy.__version__)\n'
                # CuPy without a usable GPU or driver: say why, keep the rest
                '    try:\n'
                '        p = cupy.cuda.runtime.getDeviceProperties(0)\n'
                '        info.update('
                'gpu=getattr(p["name"], "decode", lambda: p["name"])(), '
                'cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(), '
                'cuda_driver=cupy.cuda.runtime.driverGetVersion())\n'
                '    except Exception as e:\n'
                '        info.update(gpu_error=" ".join(str(e).split()) '
                'or type(e).__name__)\n'
                'print(json.dumps(info))\n')
        status, output = self.run('environment', [sys.executable, '-c', code],
                                  'environment.log', 120)
        info = {'machine': platform.node()}
        if status == 0:
            info.update(json.loads(output.strip().splitlines()[-1]))
        self.summary['environment'] = info
        self.write('environment.json', json.dumps(info, indent=1) + '\n')

    def tests(self):
        """The GPU tests: the quick ones in one pytest, then each slow one
        in its own pytest, all at once (they start tools, so they wait on
        process start-up more than on the GPU; one after the other they
        did not fit a check of 7 minutes). A timeout in the slow run keeps
        the quick run's report."""
        env = {'CAPSNET_TEST_GPU': '1', 'CAPSNET_SHARED_DATA':
               os.path.dirname(os.path.abspath(self.args.data_dir))}
        pytest = [sys.executable, '-m', 'pytest', '-q', '--tb=short', '-p',
                  'no:cacheprovider', 'tests']
        if self.args.dry_run:   # a few units: the rest trains on the CPU
            env['CAPSNET_TEST_DEVICE'] = '@numpy'
            quick = ['-m', 'gpu', '-k', 'unit_matches_cpu']
            slow = ['-m', 'gpu', '-k',
                    'capsule_head_matches_cpu and (mask or squared)']
        else:
            quick, slow = ['-m', 'gpu and not slow'], ['-m', 'gpu and slow']
        status, output = self.run('gpu_tests', pytest + quick,
                                  'gpu_tests.log', 0.4 * self.seconds_left(),
                                  env)
        self.summary['steps']['gpu_tests']['result'] = last_line(output)
        self.save_summary()
        status, output = self.run('gpu_tests_collect', pytest + slow + [
            '--collect-only'], 'gpu_tests_collect.log', 60, env)
        tests = [line.strip() for line in output.splitlines()
                 if '::' in line and ' ' not in line.strip()]
        self.summary['steps']['gpu_tests_collect']['result'] = \
            '{} slow tests'.format(len(tests))
        self.save_summary()
        if status == 0 and tests:
            self.run_together('gpu_tests_slow', [
                pytest[:-1] + [test] for test in tests],
                0.6 * self.seconds_left(), env)

    def run_together(self, step, commands, timeout, env=None):
        """Run the commands at once, each its own process group with its
        log step-N.log; the step succeeds when every command does, and its
        result is their last lines."""
        start = time.monotonic()
        timeout = max(10, min(timeout, self.seconds_left()))
        print('[{:5.0f} s left] {}: {} processes at once'.format(
            self.seconds_left(), step, len(commands)), flush=True)
        running = []
        try:
            for number, command in enumerate(commands):
                log = self.path('{}-{}.log'.format(step, number))
                with open(log + '.tmp', 'w') as f:
                    f.write(' '.join(command) + '\n')
                    f.flush()
                    running.append((log, subprocess.Popen(
                        command, cwd=ROOT, stdout=f,
                        stderr=subprocess.STDOUT, start_new_session=True,
                        env=dict(os.environ, **(env or {})))))
            statuses = []
            for log, process in running:
                try:
                    statuses.append(process.wait(
                        max(1, start + timeout - time.monotonic())))
                except subprocess.TimeoutExpired:
                    statuses.append('timeout after {:.0f} s'.format(timeout))
        finally:
            for log, process in running:   # with the tools they started
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait()
                if os.path.exists(log + '.tmp'):
                    os.replace(log + '.tmp', log)
        results = []
        for log, _ in running:
            with open(log) as f:
                results.append(last_line(f.read()))
        failed = [status for status in statuses if status != 0]
        self.summary['steps'][step] = {
            'status': failed[0] if failed else 0,
            'seconds': round(time.monotonic() - start, 1),
            'log': '{}-N.log'.format(step), 'result': '; '.join(results)}
        self.save_summary()

    def run_benchmark(self, name, batch, more=(), env=None):
        """benchmark.py on this check's device at one batch size (step
        ``name``, log name.log); its JSON line as a dict, None if it
        failed."""
        repeats = ['--repeats', '1', '--warmup', '1'] if self.args.dry_run \
            else ['--repeats', '20', '--warmup', '3']
        status, output = self.run(
            name, [sys.executable, 'dev/benchmark.py', '--device',
                   self.args.device, '-b', str(batch), '--json'] + repeats +
            list(more), name + '.log', 300, env)
        if status != 0:
            return None
        # the JSON line is the last one on stdout; libraries may write
        # after it on stderr (PyTorch's profiler does), which the log holds
        # after stdout
        for line in reversed(output.splitlines()):
            if line.startswith('{'):
                try:
                    return json.loads(line)
                except ValueError:
                    break
        self.summary['steps'][name]['status'] = 'exit 0 without a JSON line'
        self.save_summary()
        return None

    def benchmark(self):
        args = self.args
        self.summary['benchmark'] = {}
        for batch in args.batchsizes:
            name = 'benchmark-{}'.format(batch)
            first = batch == args.batchsizes[0]
            row = self.run_benchmark(name, batch,
                                     ['--profile'] if first else []) or {}
            if row:
                self.write(name + '.json', json.dumps(row, indent=1) + '\n')
            if first:
                # the routing's other contraction (auto picks broadcast on
                # the GPU): which is faster there is this figure's question
                self.run_variant(row, 'einsum', batch,
                                 ['--routing-contraction', 'einsum'],
                                 ['train_samples_per_s'])
                # fast_ops' CuPy kernels (squash, the contractions) and its
                # convolution node, each off by default until these figures
                # say it is faster: alone and together
                for tag, flags in GPU_VARIANTS:
                    self.run_variant(row, tag, batch, flags, [
                        'train_samples_per_s', 'eval_samples_per_s',
                        'train_back_to_back_samples_per_s'])
                row.update(self.kernel_profile(name, batch))
            if not args.dry_run:
                # TF32 tensor cores for CuPy's matrix products, as PyTorch
                # allows them for cuDNN convolutions by default
                self.run_variant(row, 'tf32', batch, [],
                                 ['train_samples_per_s', 'eval_samples_per_s'],
                                 {'CUPY_TF32': '1'})
            if args.torch_ref:
                row.update(self.torch_reference(batch))
            self.summary['benchmark'][str(batch)] = row
            self.save_summary()

    def run_variant(self, row, tag, batch, flags, keys, env=None):
        """The fast path alone with ``flags`` (step benchmark-B-TAG, its
        underscores as dashes); each of ``keys`` it reports goes into row
        as TAG_KEY."""
        result = self.run_benchmark(
            'benchmark-{}-{}'.format(batch, tag.replace('_', '-')), batch,
            ['--no-plain'] + list(flags), env) or {}
        for key in keys:
            if key in result:
                row[variant_key(tag, key)] = result[key]

    def kernel_profile(self, name, batch):
        """The GPU's side of a fast training step, kernel by kernel
        (benchmark.py --kernel-profile, through PyTorch's profiler): where
        the GPU is busy, and how much of a step it waits for the host."""
        if importlib.util.find_spec('torch') is None:
            return {'kernel_profile': {
                'skipped': 'PyTorch is not importable here'}}
        trace = 'kernel-trace-{}.json.gz'.format(batch)
        result = self.run_benchmark(
            name + '-kernels', batch,
            ['--no-plain', '--kernel-profile', self.path(trace)])
        if not result:
            return {}
        return {'kernel_profile': dict(result['kernel_profile'],
                                       trace=trace)}

    def torch_reference(self, batch):
        """PyTorch's samples/s in every mode of TORCH_MODES (eager only on
        the CPU), steps back to back (torch_capsnet.py synchronises once
        at the end)."""
        device = 'cpu' if self.args.dry_run else 'cuda'
        steps = '2' if self.args.dry_run else '50'
        found = {}
        for mode in TORCH_MODES:
            if self.args.dry_run and mode != 'eager':
                continue
            name = 'torch-{}-{}'.format(batch, mode)
            command = [sys.executable, os.path.abspath(self.args.torch_ref),
                       str(batch), steps, device, mode]
            status, output = self.run(name, command, name + '.txt', 240)
            for line in output.splitlines():
                if line.endswith('samples/s'):
                    found['torch_{}_samples_per_s'.format(
                        mode.replace('-', '_'))] = float(line.split()[0])
        return found

    def graph(self):
        """The CUDA-graph path first: its GPU tests, then its speed (and
        the static step's without the graph) at every batch size, steps
        back to back (gpu_check.py --graph-speed in a child process)."""
        env = {'CAPSNET_TEST_GPU': '1'}
        if self.args.dry_run:
            env['CAPSNET_TEST_DEVICE'] = '@numpy'
        status, output = self.run('graph_tests', [
            sys.executable, '-m', 'pytest', '-q', '--tb=short', '-p',
            'no:cacheprovider', 'tests/test_gpu.py', '-m', 'gpu', '-k',
            GRAPH_TESTS], 'graph_tests.log', 300, env)
        self.summary['steps']['graph_tests']['result'] = last_line(output)
        self.summary['graph'] = {}
        steps = '2' if self.args.dry_run else '100'
        for batch in self.args.batchsizes:
            name = 'graph-speed-{}'.format(batch)
            status, output = self.run(name, [
                sys.executable, 'dev/gpu_check.py', '--graph-speed',
                self.args.device, str(batch), steps], name + '.log', 300)
            row = json_line(output) if status == 0 else None
            if status == 0 and row is None:
                self.summary['steps'][name]['status'] = \
                    'exit 0 without a JSON line'
            self.summary['graph'][str(batch)] = row or {}
        self.save_summary()

    def graph_passed(self):
        """Whether train.py gets --cuda-graph: the graph tests passed and
        the speed step captured a graph at every batch size."""
        steps = self.summary['steps']
        rows = self.summary.get('graph', {})
        return (steps.get('graph_tests', {}).get('status') == 0 and
                bool(rows) and all(row.get('captured')
                                   for row in rows.values()))

    def epochs_that_fit(self, seconds, speed):
        """Training epochs that fit in ``seconds`` at the benchmark's
        ``speed`` (training samples/s, steps synchronised)."""
        if not speed:
            return 1
        epoch_s = EPOCH_MARGIN * 60000 / speed + 5
        return int(max(1, min(self.args.max_epochs, seconds // epoch_s)))

    def training(self):
        args = self.args
        folder = self.path('train')
        model = self.path('model.npz')
        sizes = ['--train-size', '300', '--test-size', '200'] if \
            args.dry_run else []
        row = self.summary.get('benchmark', {}).get(
            str(args.batchsizes[0]), {})
        tag, flags, reason = choose_training_variant(row, self.summary['steps'])
        # the trained variant's speed: it plans the epochs, and the report
        # sets the epochs' times beside it
        speed = row.get(variant_key(tag, 'train_samples_per_s'))
        if self.graph_passed():
            flags = flags + ['--cuda-graph']
            reason += '; with --cuda-graph, as its GPU tests passed and it ' \
                'captured'
            speed = self.summary['graph'][str(args.batchsizes[0])].get(
                'graph_samples_per_s') or speed
        # keep a minute for evaluate.py and visualize.py afterwards
        epochs = 1 if args.dry_run else self.epochs_that_fit(
            self.seconds_left() - 75, speed)
        self.summary['training'] = {'epochs_planned': epochs,
                                    'train_size': 300 if args.dry_run
                                    else 60000, 'variant': tag,
                                    'flags': flags, 'variant_reason': reason,
                                    'benchmark_batch': args.batchsizes[0],
                                    'benchmark_samples_per_s': speed}
        status, _ = self.run(
            'train', [sys.executable, 'train.py', '--device', args.device,
                      '--data-dir', args.data_dir, '--reconstruct',
                      '-e', str(epochs), '-o', folder, '--save', model,
                      '--no-progress'] + flags + sizes,
            'train.log', self.seconds_left() - 45)
        log_path = os.path.join(folder, 'log')
        if os.path.exists(log_path):
            with open(log_path) as f:
                log = json.load(f)
            elapsed = [entry['elapsed_time'] for entry in log]
            self.summary['training'].update(
                epochs_done=len(log),
                seconds_per_epoch=[round(b - a, 1) for a, b in
                                   zip([0] + elapsed[:-1], elapsed)],
                test_error_percent=[round(100 * (1 - entry[
                    'test/main/accuracy']), 2) for entry in log],
                train_seconds=[round(entry['time/train'], 1) for entry in log
                               if 'time/train' in entry],
                other_seconds=[round(entry['time/other'], 1) for entry in log
                               if 'time/other' in entry])
            self.summary['training']['plot'] = plot_test_error(
                self.summary['training']['test_error_percent'],
                self.path('test-error.png'))
        self.save_summary()
        if status == 0 and os.path.exists(model):
            self.run('evaluate', [sys.executable, 'evaluate.py', '--device',
                                  args.device, '--load', model, '--data-dir',
                                  args.data_dir, '-o', self.path('eval')] +
                     (['--test-size', '200'] if args.dry_run else []),
                     'evaluate.log', 120)
            self.run('visualize', [sys.executable, 'visualize.py',
                                   '--device', args.device, '--load', model,
                                   '--data-dir', args.data_dir, '-o',
                                   self.path('vis')], 'visualize.log', 120)

    def report(self):
        s = self.summary
        lines = ['# GPU check, {} ({})'.format(
            s['environment'].get('gpu', s['device']), s['started']), '',
            'environment: ' + json.dumps(s['environment']), '',
            '| step | status | seconds |', '| --- | --- | --- |']
        lines += ['| {} | {} | {} |'.format(name, step['status'],
                                            step['seconds'])
                  for name, step in s['steps'].items()]
        for step in ('gpu_tests', 'gpu_tests_slow'):
            if step in s['steps']:
                lines += ['', '{}: {}'.format(
                    step, s['steps'][step].get('result', ''))]
        columns = [
            ('ours fast train/s', 'train_samples_per_s'),
            ('ours fast train/s, steps back to back',
             'train_back_to_back_samples_per_s'),
            ('ours plain train/s', 'plain_train_samples_per_s'),
            ('ours fast, einsum routing train/s',
             'einsum_train_samples_per_s'),
            ('ours fast, GPU kernels train/s',
             'gpu_kernels_train_samples_per_s'),
            ('ours fast, GPU convolutions train/s',
             'gpu_convolutions_train_samples_per_s'),
            ('ours fast, both train/s', 'gpu_both_train_samples_per_s'),
            ('ours fast, both, back to back',
             'gpu_both_train_back_to_back_samples_per_s'),
            ('ours fast, TF32 train/s', 'tf32_train_samples_per_s'),
            ('PyTorch eager train/s', 'torch_eager_samples_per_s'),
            ('PyTorch compiled train/s', 'torch_compile_samples_per_s'),
            ('PyTorch compile-ro train/s', 'torch_compile_ro_samples_per_s'),
            ('PyTorch graph train/s', 'torch_graph_samples_per_s'),
            ('ours fast eval/s', 'eval_samples_per_s'),
            ('peak GPU MB', 'peak_gpu_mb')]
        lines += ['', '| batch | {} |'.format(' | '.join(
            title for title, _ in columns)),
            '| --- ' * (len(columns) + 1) + '|']
        for batch, row in s.get('benchmark', {}).items():
            lines.append('| {} | {} |'.format(batch, ' | '.join(
                str(row.get(key)) for _, key in columns)))
        lines += [''] + speed_verdicts(s.get('benchmark', {}), columns)
        lines += graph_lines(s)
        profile = s.get('benchmark', {}).get(
            str(self.args.batchsizes[0]), {}).get('profile')
        if profile:
            lines += ['', 'profile of a fast training step at batch {} (ms '
                      'per step): {}; Adam update {}; host side {}; Chainer '
                      'function calls {}'.format(
                          self.args.batchsizes[0], ', '.join(
                              '{} {}'.format(k, v) for k, v in list(
                                  profile['functions_ms'].items())[:8]),
                          profile['update_ms'], profile['host_ms'],
                          profile.get('function_calls'))]
            if profile.get('host_functions_ms'):
                lines += ['', 'host side alone of the same functions (ms per '
                          'step, not synchronised): {}'.format(', '.join(
                              '{} {}'.format(k, v) for k, v in list(
                                  profile['host_functions_ms'].items())[:8]))]
        kernels = s.get('benchmark', {}).get(
            str(self.args.batchsizes[0]), {}).get('kernel_profile')
        if kernels and 'skipped' in kernels:
            lines += ['', 'GPU kernels of a step: not recorded ({})'.format(
                kernels['skipped'])]
        elif kernels:
            lines += ['', 'GPU side of a fast training step at batch {} '
                      '(PyTorch profiler, trace in {}): {} device operations '
                      '({} ms) per step; the GPU busy {} ms of {} ms ({}% '
                      'idle); by Chainer function (ms, operations): {}; '
                      'longest operations (ms, calls): {}'.format(
                          self.args.batchsizes[0], kernels['trace'],
                          kernels['device_ops_per_step'],
                          kernels['device_ms_per_step'],
                          kernels['busy_ms_per_step'],
                          kernels['wall_ms_per_step'],
                          kernels['idle_percent'], ', '.join(
                              '{} {} ({})'.format(k, ms, n) for k, (ms, n)
                              in list(kernels['by_range'].items())[:10]),
                          ', '.join('{} {} ({})'.format(k, ms, n)
                                    for k, ms, n in kernels['top_ops'][:8]))]
        training = s.get('training', {})
        if training.get('epochs_done'):
            lines += ['', 'full-MNIST training, --reconstruct{}: {} epochs '
                      '(the fast path: {})'.format(
                          ''.join(' ' + flag
                                  for flag in training.get('flags', [])),
                          training['epochs_done'],
                          training.get('variant_reason', 'the default')), '',
                      '| epoch | seconds | test error % |',
                      '| --- | --- | --- |']
            lines += ['| {} | {} | {} |'.format(i + 1, sec, err)
                      for i, (sec, err) in enumerate(zip(
                          training['seconds_per_epoch'],
                          training['test_error_percent']))]
            speed = training.get('benchmark_samples_per_s')
            if speed:
                # what an epoch costs beyond its steps: data, checks,
                # the test pass, snapshot and plots
                lines += ['', "the benchmark's training speed at batch {} "
                          '({} samples/s) gives {:.1f} s of steps per epoch'
                          .format(training['benchmark_batch'], speed,
                                  training['train_size'] / speed)]
        self.write('summary.md', '\n'.join(lines) + '\n')


def choose_training_variant(row, steps):
    """(tag, train.py flags, why) for the training run: the GPU variant
    whose steps back to back were fastest in the benchmark's ``row``, when
    it ran at least VARIANT_MARGIN times as fast as the default fast path
    and every GPU test passed (they compare its kernels and convolutions
    with the forms they replace); else ('default', [], why)."""
    tests = {name: step['status'] for name, step in steps.items()
             if name.startswith('gpu_tests')}
    if 'gpu_tests' not in tests or any(
            status != 0 for status in tests.values()):
        return 'default', [], 'the default, as not every GPU test passed'
    key = 'train_back_to_back_samples_per_s'
    default = row.get(key)
    timed = [(row[variant_key(tag, key)], tag, flags)
             for tag, flags in GPU_VARIANTS
             if isinstance(row.get(variant_key(tag, key)), (int, float))]
    if not isinstance(default, (int, float)) or not timed:
        return 'default', [], 'the default, as the variants were not timed'
    speed, tag, flags = max(timed)
    if speed < VARIANT_MARGIN * default:
        return 'default', [], ('the default, as no variant was {} times as '
                               'fast (at best {} {} against {} samples/s, '
                               'back to back)'.format(VARIANT_MARGIN, tag,
                                                      speed, default))
    return tag, list(flags), ('{}, the fastest variant, {} against the '
                              "default's {} samples/s, back to back, with "
                              'every GPU test passed'.format(tag, speed,
                                                             default))


def speed_verdicts(benchmark, columns):
    """One line per batch size: our fastest training variant against
    PyTorch eager's samples/s (the target: at least as many)."""
    titles = dict((key, title) for title, key in columns)
    ours = [key for key in titles if key.endswith('samples_per_s')
            and key.startswith(('train', 'plain', 'einsum', 'gpu', 'tf32'))]
    lines = []
    for batch, row in benchmark.items():
        measured = [(row[key], key) for key in ours
                    if isinstance(row.get(key), (int, float))]
        eager = row.get('torch_eager_samples_per_s')
        if not measured or not isinstance(eager, (int, float)):
            lines.append('target at batch {}: not compared (ours or PyTorch '
                         'eager not measured)'.format(batch))
            continue
        best, key = max(measured)
        # what train.py runs: the fast path, its steps back to back
        default = row.get('train_back_to_back_samples_per_s',
                          row.get('train_samples_per_s'))
        lines.append('target at batch {}: {} (ours at best {} samples/s, '
                     '"{}", against PyTorch eager {}: {:.2f} times; the '
                     'default fast path {})'.format(
                         batch, 'met' if best >= eager else 'NOT met', best,
                         titles[key], eager, best / eager, default))
    return lines


CUPY_INSTALL = ('pip install "cupy-cuda13x[ctk]" for CUDA 13 or '
                '"cupy-cuda12x[ctk]" for CUDA 12 (README.md, Install)')
# run in a child process, so that this one holds no CUDA context while the
# steps measure: prints nothing when the device works, else its one line
DEVICE_PROBE = """
import sys, types
sys.path.insert(0, {root!r})
from capsnet import compat, devices
from capsnet.errors import CapsNetError
try:
    devices.select_device(types.SimpleNamespace(device={device!r}))
except CapsNetError as e:
    print(' '.join(str(e).split()))
    sys.exit(1)
"""


def gpu_problem(device, timeout=120):
    """None when ``device`` (a @cupy:N specifier) works here, else one line
    saying why not (CuPy missing, no GPU, an old driver): checked before
    any step, in a few seconds. A CPU device has nothing to check."""
    if 'cupy' not in device:
        return None
    if importlib.util.find_spec('cupy') is None:
        return ('CuPy is not installed, so there is no GPU to check; {}; '
                'or check this script on the CPU with --dry-run'.format(
                    CUPY_INSTALL))
    try:
        probe = subprocess.run(
            [sys.executable, '-c', DEVICE_PROBE.format(
                root=os.path.dirname(HERE), device=device)],
            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'setting up {} took over {} s'.format(device, timeout)
    if probe.returncode == 0:
        return None
    return last_line(probe.stdout) or last_line(probe.stderr) or \
        'cannot use {} (status {})'.format(device, probe.returncode)


def json_line(output):
    """The last line of ``output`` that is a JSON object, or None."""
    for line in reversed(output.splitlines()):
        if line.startswith('{'):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def graph_lines(summary):
    """The graph path's tests and speed, and per batch size whether it
    reached the best of PyTorch's modes (issue 28's target)."""
    rows = summary.get('graph')
    if rows is None:
        return []
    step = summary['steps'].get('graph_tests', {})
    lines = ['', 'CUDA-graph tests: {} ({})'.format(step.get('status'),
                                                     step.get('result'))]
    for batch, row in rows.items():
        torch = {key: value for key, value in summary.get(
            'benchmark', {}).get(batch, {}).items()
            if key.startswith('torch_') and isinstance(value, (int, float))}
        graph = row.get('graph_samples_per_s')
        line = ('batch {}: static step {} samples/s, CUDA graph {} '
                '(captured: {}{})'.format(
                    batch, row.get('static_samples_per_s'), graph,
                    row.get('captured'), '; capture failed: ' +
                    row['capture_failed'] if row.get('capture_failed')
                    else ''))
        if torch and graph:
            best = max(torch, key=torch.get)
            line += '; against PyTorch at its best ({} {}): {} ({:.2f} ' \
                'times)'.format(best, torch[best], 'met' if graph >=
                                torch[best] else 'NOT met',
                                graph / torch[best])
        lines.append(line)
    return lines


def plot_test_error(errors, path):
    """Test error (%) per epoch, log scale, beside the paper's 0.25% and
    the public reimplementations' ranges at epochs 10 / 20 / 50; returns
    the file's name, or why there is none."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return 'not drawn: matplotlib is not installed'
    figure, axes = plt.subplots(figsize=(6, 4))
    epochs = list(range(1, len(errors) + 1))
    axes.semilogy(epochs, errors, 'o-', label='this run')
    axes.axhline(PAPER_ERROR, color='k', linestyle='--',
                 label='paper ({}%)'.format(PAPER_ERROR))
    for number, (epoch, (low, high)) in enumerate(sorted(PEERS.items())):
        axes.vlines(epoch, low, high, color='tab:red', linewidth=4,
                    label='public reimplementations' if not number else None)
    axes.set_xlabel('epoch')
    axes.set_ylabel('test error (%)')
    axes.set_xlim(0, max(epochs + [50]) + 1)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return os.path.basename(path)


def graph_speed(argv):
    """gpu_check.py --graph-speed DEVICE BATCH STEPS: the paper's CapsNet
    (reconstruction, r = 3, the fast path) trained through StaticUpdater,
    without and with --cuda-graph, STEPS steps back to back after the
    warm-up (and the capture); one JSON line."""
    device_spec, batch, steps = argv[0], int(argv[1]), int(argv[2])
    sys.path.insert(0, ROOT)
    import numpy
    from capsnet import compat  # noqa: F401
    import chainer
    from capsnet.training import static_step
    import nets
    device = chainer.get_device(device_spec)
    device.use()
    warmup = static_step.WARMUP_STEPS + 2
    random = numpy.random.RandomState(0)
    n = batch * (warmup + steps + 1)   # no epoch's end while timed
    data = chainer.datasets.TupleDataset(
        random.rand(n, 1, 28, 28).astype(numpy.float32),
        random.randint(0, 10, n).astype(numpy.int32))
    result = {'batch': batch, 'steps': steps}

    def synchronize():
        if device.xp is not numpy:
            device.xp.cuda.Device().synchronize()

    for name, cuda_graph in (('static', False), ('graph', True)):
        numpy.random.seed(0)
        model = nets.CapsNet(reconstruct=True)
        model.fast = None
        model.to_device(device)
        optimizer = chainer.optimizers.Adam()
        optimizer.setup(model)
        said = []
        updater = static_step.StaticUpdater(
            chainer.iterators.SerialIterator(data, batch, shuffle=False),
            optimizer, 2, numpy.random.RandomState(1),
            numpy.random.RandomState(2), device,
            static_step.Schedule(1e-3), cuda_graph=cuda_graph,
            say=said.append)
        observer = chainer.Reporter()   # as the Trainer's: main/...
        observer.add_observer('main', model)
        with observer:
            for _ in range(warmup):
                updater.update()
            synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                updater.update()
            synchronize()
        result[name + '_samples_per_s'] = round(
            batch * steps / (time.perf_counter() - start), 1)
        if cuda_graph:
            result['captured'] = bool(updater.graph is not None and
                                      updater.graph.graph is not None)
            result['capture_failed'] = updater.graph_failed
            result['said'] = said
    print(json.dumps(result))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--graph-speed']:
        return graph_speed(argv[1:])
    args = parse_args(argv)
    problem = gpu_problem(args.device)
    if problem:
        cli.fail('gpu_check.py needs a working GPU: {}'.format(problem))
    check = Check(args)
    try:
        check.environment()
        check.graph()       # the CUDA-graph path first: tests and speed
        check.benchmark()   # its speed sizes the training run
        check.tests()
        check.training()
    except (KeyboardInterrupt, cli.Terminated):
        # keep what was measured, then let run_main say it in one line
        check.summary['interrupted'] = True
        check.save_summary()
        check.report()
        raise
    check.report()
    print(open(check.path('summary.md')).read())
    failed = [name for name, step in check.summary['steps'].items()
              if step['status'] != 0]
    if failed:
        print('steps that did not succeed: {}'.format(', '.join(failed)),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main, None, 'interrupted; the results so far are '
                          'in --out'))
