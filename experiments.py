#!/usr/bin/env python
"""Sweeps that reproduce the paper's tables.

    python experiments.py table1 --epoch 50 --trials 3 --out t1 -d @cupy:0
    python experiments.py table1 --epoch 1 --trials 1 --out t1 \\
        --train-size 1000 --test-size 500 --rows r1,r3     # a quick look
    python experiments.py table1 --epoch 50 --trials 3 --out t1 --dry-run

``table1`` trains the five rows of Table 1 (MNIST test error): the baseline
CNN and CapsNet with 1 or 3 routing iterations, each without and with the
reconstruction loss. Every (row, trial) is its own ``train.py`` process with
its own folder ``OUT/<row>-trial<k>`` (seed S + k, log in ``train.log``,
model in ``model.npz``). Trials go round the rows (trial 0 of every row,
then trial 1, ...), so an early look at the table has every row in it.

A run is finished when its ``final.json`` says it trained ``--epoch``
epochs and its last epoch was that one; finished runs are never redone, and
an unfinished one is started again with ``--autoload``, which continues
from its newest snapshot. So an interrupted sweep is resumed by running the
same command again, and a sweep can be lengthened by raising ``--epoch``.
Runs keep only their newest snapshot (``--snapshot-keep 1``): with its
Adam state a baseline snapshot is about 3 x 35.4M floats. Each run folder
keeps ``run.json`` (the settings, the command and the
wall-clock seconds over all its invocations); a folder made with other
settings is never reused: the sweep stops before it starts anything.

After every run, ``OUT/results.json`` (all finished runs and a summary per
row) and ``OUT/table.md`` are rewritten (atomically) from every finished run
under OUT with the current settings, whichever invocation ran it.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

from capsnet.data import mnist
from capsnet import files
import nets
import paper_experiments
from capsnet.training import extensions as ext

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(HERE, 'train.py')

FULL_SIZES = {name: (mnist.TRAIN_SIZE, mnist.TEST_SIZE)
              for name in mnist.dataset_names()}
DATASET_TITLES = {'mnist': 'MNIST', 'fashion-mnist': 'Fashion-MNIST'}

# Table 1 of the paper: MNIST test error %, mean and std over 3 trials
# (the baseline's std is not given).
_ROWS = (
    ('baseline', 'Baseline CNN', None, False, 0.39, None,
     ['--arch', 'baseline']),
    ('r1', 'CapsNet', 1, False, 0.34, 0.032,
     ['--arch', 'capsnet', '--routing', '1']),
    ('r1-recon', 'CapsNet', 1, True, 0.29, 0.011,
     ['--arch', 'capsnet', '--routing', '1', '--reconstruct']),
    ('r3', 'CapsNet', 3, False, 0.35, 0.036,
     ['--arch', 'capsnet', '--routing', '3']),
    ('r3-recon', 'CapsNet', 3, True, 0.25, 0.005,
     ['--arch', 'capsnet', '--routing', '3', '--reconstruct']),
)

INTERRUPTED = ('interrupted; run the same command again to continue the '
               'sweep')
STD_KIND = 'sample standard deviation (ddof=1) over trials; 0 for one trial'


def row_specs():
    """The five rows of Table 1, in the paper's order, as dicts.

    Keys: name, method, routing (None for the baseline), reconstruct,
    paper_error_pct, paper_std_pct (None where the paper gives none) and
    train_args (the train.py flags that make the row).
    """
    return [dict(name=name, method=method, routing=routing,
                 reconstruct=reconstruct, paper_error_pct=paper,
                 paper_std_pct=paper_std, train_args=list(train_args))
            for (name, method, routing, reconstruct, paper, paper_std,
                 train_args) in _ROWS]


def _row(row):
    """A row spec from a spec or a row name."""
    if isinstance(row, dict):
        return row
    for spec in row_specs():
        if spec['name'] == row:
            return spec
    raise KeyError('unknown row {!r}; rows are {}'.format(
        row, ', '.join(spec['name'] for spec in row_specs())))


def run_dir(out, row, trial):
    return os.path.join(out, '{}-trial{}'.format(_row(row)['name'], trial))


def run_seed(args, trial):
    return args.seed + trial


def run_command(row, trial, args):
    """The argv (a list) of the train.py process for (row, trial)."""
    row = _row(row)
    folder = run_dir(args.out, row, trial)
    command = [sys.executable, TRAIN_SCRIPT] + row['train_args'] + [
        '--dataset', args.dataset, '--epoch', str(args.epoch),
        '--seed', str(run_seed(args, trial)),
        '--batchsize', str(args.batchsize),
        '--out', folder, '--save', os.path.join(folder, 'model.npz'),
        '--no-progress', '--autoload', '--snapshot-keep', '1']
    if cli.device_spec(args.device) != '@numpy':
        command += ['--device', cli.device_spec(args.device)]
    if args.data_dir:
        command += ['--data-dir', args.data_dir]
    if args.train_size:
        command += ['--train-size', str(args.train_size)]
    if args.test_size:
        command += ['--test-size', str(args.test_size)]
    return command


def run_config(row, trial, args):
    """What makes a run's result: everything but the epochs, device, paths.

    A run folder made with another config is not reused.
    """
    row = _row(row)
    return dict(row=row['name'], train_args=row['train_args'], trial=trial,
                seed=run_seed(args, trial), dataset=args.dataset,
                train_size=args.train_size, test_size=args.test_size,
                batchsize=args.batchsize)


# --------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------

def _read_json(path):
    """The parsed file, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_final(folder):
    final = _read_json(os.path.join(folder, 'final.json'))
    return final if isinstance(final, dict) else None


def is_finished(folder, epochs):
    """True iff folder/final.json records a run of ``epochs`` epochs that
    reached its last epoch."""
    final = read_final(folder)
    return (final is not None and final.get('epochs') == epochs
            and final.get('final_epoch') == epochs
            and final.get('final_test_error') is not None)


def newest_snapshot_epoch(folder):
    return max(ext.snapshots(folder), default=None)


def read_run_info(folder):
    info = _read_json(os.path.join(folder, 'run.json'))
    return info if isinstance(info, dict) else None


def conflict(row, trial, args):
    """Why the run folder of (row, trial) cannot be used, or None."""
    folder = run_dir(args.out, row, trial)
    info = read_run_info(folder)
    want = run_config(row, trial, args)
    if info is not None and info.get('config') != want:
        have = info.get('config') or {}
        differ = ', '.join(
            '{} {!r} there, {!r} now'.format(k, have.get(k), want[k])
            for k in sorted(want) if have.get(k) != want[k])
        return ('{} was made with other settings ({}); use another --out or '
                'remove that folder'.format(folder, differ or 'unreadable'))
    if is_finished(folder, args.epoch):
        return None
    last = newest_snapshot_epoch(folder)
    if last is not None and last > args.epoch:
        return ('{} already trained {} epochs, more than --epoch {}; use '
                'another --out or remove that folder'
                .format(folder, last, args.epoch))
    return None


def launch(command, log_path):
    """Run command, its stdout and stderr teed to the console and log_path
    (appended to). Returns (exit status, wall-clock seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    start = time.time()
    with open(log_path, 'a') as log:
        log.write('# {} {}\n'.format(_now(), shlex.join(command)))
        log.flush()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, text=True, errors='replace', bufsize=1)
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            status = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM: train.py stops too
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.write('# interrupted\n')
            raise
        log.write('# exit status {} after {:.1f} s\n'
                  .format(status, time.time() - start))
    return status, time.time() - start


def do_run(row, trial, args):
    """Train (row, trial) (or continue it); True if it is then finished."""
    folder = run_dir(args.out, row, trial)
    os.makedirs(folder, exist_ok=True)
    command = run_command(row, trial, args)
    info = read_run_info(folder) or {}
    info.update(config=run_config(row, trial, args),
                command=shlex.join(command), epochs=args.epoch)
    info.setdefault('wall_seconds', 0.0)
    info.setdefault('invocations', 0)
    files.write_text(os.path.join(folder, 'run.json'),
                     json.dumps(info, indent=2) + '\n')
    print('=== {} trial {} (seed {}): {}'.format(
        _row(row)['name'], trial, run_seed(args, trial),
        shlex.join(command)), flush=True)
    status, seconds = launch(command, os.path.join(folder, 'train.log'))
    info['wall_seconds'] += seconds
    info['invocations'] += 1
    info['last_exit_status'] = status
    files.write_text(os.path.join(folder, 'run.json'),
                     json.dumps(info, indent=2) + '\n')
    return status == 0 and is_finished(folder, args.epoch)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

def sizes(args_or_record):
    """(train, test) example counts: the --train/test-size or the full set."""
    get = (args_or_record.get if isinstance(args_or_record, dict)
           else lambda k: getattr(args_or_record, k))
    full_train, full_test = FULL_SIZES[get('dataset')]
    return (get('train_size') or full_train, get('test_size') or full_test)


def collect_runs(args):
    """Records of every finished run under args.out with these settings
    (all five rows, trials 0 .. --trials - 1)."""
    runs = []
    for row in row_specs():
        for trial in range(args.trials):
            folder = run_dir(args.out, row, trial)
            if not is_finished(folder, args.epoch):
                continue
            info = read_run_info(folder)
            if info is not None and info.get('config') != run_config(
                    row, trial, args):
                continue
            final = read_final(folder)
            train_size, test_size = sizes(args)
            train_size = final.get('train_size') or train_size
            test_size = final.get('test_size') or test_size
            runs.append(dict(
                row=row['name'], method=row['method'],
                routing=row['routing'], reconstruct=row['reconstruct'],
                trial=trial, seed=run_seed(args, trial),
                final_test_error=final['final_test_error'],
                final_test_error_pct=100 * final['final_test_error'],
                best_on_test_error=final.get('best_on_test_error'),
                epochs=final['epochs'], final_epoch=final['final_epoch'],
                parameters=final.get('parameters'),
                dataset=final.get('dataset', args.dataset),
                train_size=train_size, test_size=test_size,
                wall_seconds=(info or {}).get('wall_seconds'),
                command=(info or {}).get('command') or shlex.join(
                    run_command(row, trial, args)),
                run_dir=folder))
    return runs


def _mean_std(values):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(runs, rows=None, dataset=None):
    """One summary per row, in the paper's order.

    Args:
        runs: records as collect_runs makes them (needs row, trial,
            final_test_error, epochs; parameters, dataset, train_size,
            test_size, wall_seconds are used when present).
        rows: row names to list even without runs; default: those in runs.
        dataset: the runs' dataset; default: the one the runs name (MNIST
            if they name none). The paper's figures are given for MNIST only.
    Returns:
        list of dicts: row, method, routing, reconstruct, n, trials,
        mean_error_pct, std_error_pct (STD_KIND), errors_pct, epochs,
        parameters, dataset, train_size, test_size, wall_seconds,
        paper_error_pct, paper_std_pct (None unless the dataset is MNIST).
    """
    names = {run['row'] for run in runs} | set(rows or ())
    if dataset is None:
        named = {run.get('dataset') or 'mnist' for run in runs} or {'mnist'}
        dataset = named.pop() if len(named) == 1 else None
    on_mnist = dataset == 'mnist'
    summary = []
    for spec in row_specs():
        if spec['name'] not in names:
            continue
        mine = sorted((r for r in runs if r['row'] == spec['name']),
                      key=lambda r: r['trial'])
        errors = [100 * r['final_test_error'] for r in mine]
        mean, std = _mean_std(errors)

        def distinct(key):
            return sorted({r.get(key) for r in mine
                           if r.get(key) is not None})

        summary.append(dict(
            row=spec['name'], method=spec['method'],
            routing=spec['routing'], reconstruct=spec['reconstruct'],
            n=len(mine), trials=[r['trial'] for r in mine],
            mean_error_pct=mean, std_error_pct=std, std_kind=STD_KIND,
            errors_pct=errors, epochs=distinct('epochs'),
            parameters=distinct('parameters'), dataset=dataset,
            train_size=distinct('train_size'),
            test_size=distinct('test_size'),
            wall_seconds=sum(r.get('wall_seconds') or 0 for r in mine),
            paper_error_pct=spec['paper_error_pct'] if on_mnist else None,
            paper_std_pct=spec['paper_std_pct'] if on_mnist else None))
    return summary


def _join(values):
    return ', '.join(str(v) for v in values) if values else '—'


def render_table(summary, meta):
    """Markdown for the summaries, with a header that says what was run.

    meta: dataset, epochs, trials, train_size, test_size (None: full),
    command, date, machine, device; all optional but dataset.
    """
    dataset = meta.get('dataset', 'mnist')
    title = DATASET_TITLES.get(dataset, dataset)
    full_train, full_test = FULL_SIZES.get(dataset, (None, None))
    lines = ['# Table 1 on {}: test error %'.format(title) if dataset !=
             'mnist' else '# Table 1 (MNIST test error %)', '']
    lines.append('Written {} by `{}` on {} ({}).'.format(
        meta.get('date', '?'), meta.get('command', '?'),
        meta.get('machine', '?'), meta.get('device', '?')))
    lines.append('')
    lines.append(
        '- Our error is the test error after the final epoch of each run, '
        'not the lowest over epochs (that one is chosen on the test set); '
        'mean ± {}; n = finished runs.'.format(STD_KIND))
    budget = '{} epoch(s), {} training / {} test examples'.format(
        meta.get('epochs', '?'), meta.get('train_size') or full_train,
        meta.get('test_size') or full_test)
    lines.append(
        '- Budget: {}, up to {} trial(s) per row (n: the finished ones), '
        'train.py defaults otherwise (Adam, per-epoch decay, shifts of up '
        'to 2 px).'.format(
            budget, meta.get('trials', '?')))
    if dataset == 'mnist':
        lines.append(
            "- Paper: Sabour et al. 2017, Table 1 (mean ± std of 3 trials, "
            "all 60,000 training images shifted by up to 2 px, all 10,000 "
            "test images; epochs not stated). Results of smaller budgets "
            "than the paper's (fewer examples or epochs) are not comparable "
            "to its figures.")
        if (meta.get('train_size') or meta.get('test_size')):
            lines.append('- **Not comparable to the paper: this sweep used '
                         'a subset of the data.**')
    else:
        lines.append('- The paper reports no {} figures (—); the rows are '
                     "Table 1's settings on this dataset.".format(title))
    lines.append('')
    lines.append('| Method | Routing | Reconstruction | Our test error % '
                 '(mean ± std, n) | Paper % | Epochs | Train / test |')
    lines.append('| --- | ---: | --- | ---: | ---: | ---: | ---: |')
    for row in summary:
        if row['n']:
            ours = '{:.2f} ± {:.3f} (n={})'.format(
                row['mean_error_pct'], row['std_error_pct'], row['n'])
        else:
            ours = 'not run (n=0)'
        if row['paper_error_pct'] is None:
            paper = '—'
        elif row['paper_std_pct'] is None:
            paper = '{:.2f}'.format(row['paper_error_pct'])
        else:
            paper = '{:.2f} ± {:.3f}'.format(row['paper_error_pct'],
                                             row['paper_std_pct'])
        lines.append('| {} | {} | {} | {} | {} | {} | {} / {} |'.format(
            row['method'], '—' if row['routing'] is None else row['routing'],
            'yes' if row['reconstruct'] else 'no', ours, paper,
            _join(row['epochs']), _join(row['train_size']),
            _join(row['test_size'])))
    return '\n'.join(lines) + '\n'


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def machine_description():
    return '{}, {} CPUs, Python {}'.format(
        platform.platform(), os.cpu_count(), platform.python_version())


def write_results(args):
    """Rewrite OUT/results.json and OUT/table.md from the finished runs."""
    runs = collect_runs(args)
    summary = summarize(runs, rows=[r['name'] for r in row_specs()
                                    if r['name'] in args.rows],
                        dataset=args.dataset)
    meta = dict(
        table='table1', dataset=args.dataset, epochs=args.epoch,
        trials=args.trials, train_size=args.train_size,
        test_size=args.test_size, batchsize=args.batchsize,
        seed=args.seed, rows=args.rows, command=args.command,
        date=_now(), machine=machine_description(),
        device='CPU' if cli.device_spec(args.device) == '@numpy'
        else cli.device_spec(args.device),
        error='final-epoch test error (not best-on-test)', std=STD_KIND)
    files.write_text(os.path.join(args.out, 'results.json'), json.dumps(
        dict(meta=meta, runs=runs, summary=summary), indent=2) + '\n')
    files.write_text(os.path.join(args.out, 'table.md'),
                     render_table(summary, meta))
    return runs, summary


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _choice_list(known):
    """argparse type: a comma-separated subset of ``known``, in its order."""
    def parse(text):
        names = [name.strip() for name in text.split(',') if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                'unknown row(s) {}; choose from {}'.format(
                    ', '.join(unknown) or '(none given)', ','.join(known)))
        return [name for name in known if name in names]
    return parse


_rows = _choice_list([spec['name'] for spec in row_specs()])


def add_sweep_arguments(parser, trials):
    """What every sweep takes: epochs, trials, --out, seed, batch, device."""
    add = parser.add_argument
    add('--epoch', '--epochs', '-e', type=cli.positive_int, required=True,
        help='epochs per run')
    add('--trials', type=cli.positive_int, default=trials,
        help='runs per row (seeds S, S+1, ...)')
    add('--out', '-o', required=True,
        help='folder for the runs, results.json and table.md')
    add('--seed', '-s', type=cli.seed, default=0,
        help='trial k uses seed S + k')
    add('--batchsize', '-b', type=cli.positive_int, default=100,
        help='examples per training step')
    cli.add_device_arguments(parser)


def build_parser():
    parser = cli.ArgumentParser(
        description='Reproduce the tables of Sabour et al. 2017')
    commands = parser.add_subparsers(dest='table', required=True)
    t1 = commands.add_parser(
        'table1', help='Table 1: baseline and CapsNet, routing 1/3, '
                       'with and without reconstruction')
    add_sweep_arguments(t1, trials=3)
    add = t1.add_argument
    add('--data-dir', default=None, help='passed to train.py --data-dir')
    add('--dataset', default='mnist', choices=sorted(FULL_SIZES),
        help='which dataset (its test set for the evaluation)')
    add('--train-size', type=cli.positive_int, default=None,
        help='use the first N training examples (default: all)')
    add('--test-size', type=cli.positive_int, default=None,
        help='use the first N test examples (default: all)')
    add('--rows', type=_rows, default=[spec['name'] for spec in row_specs()],
        help='comma-separated subset of baseline,r1,r1-recon,r3,r3-recon')
    add('--dry-run', action='store_true',
        help='print the commands (finished ones commented out) and exit')
    add('--collect-only', action='store_true',
        help='start no run: rewrite results.json and table.md from the '
             'runs already finished in --out (e.g. rows with fewer trials)')
    add_paper_commands(commands)
    return parser


def add_paper_commands(commands):
    """The subcommands of the paper's other experiments (docs/experiments.md).
    """
    def common(p, rows):
        add_sweep_arguments(p, trials=1)
        add = p.add_argument
        add('--data-dir', default=None,
            help='folder with the four MNIST *-ubyte.gz files')
        add('--data-seed', type=cli.seed, default=0,
            help='seed of the generated data (pairs, shifts, placements)')
        add('--rows', type=_choice_list(rows), default=list(rows),
            help='comma-separated subset of ' + ','.join(rows))

    mm = commands.add_parser(
        'multimnist', help='Section 6: CapsNet and the baseline on '
                           'MultiMNIST (top-2 error)')
    common(mm, list(paper_experiments.MULTIMNIST_ROWS))
    add = mm.add_argument
    add('--pairs-per-digit', type=cli.positive_int, default=1000,
        help='training examples made per MNIST training digit (paper: 1000)')
    add('--test-pairs-per-digit', type=cli.positive_int, default=1000,
        help='test examples made per MNIST test digit (paper: 1000)')
    add('--train-digits', type=cli.positive_int, default=None,
        help='use the first N MNIST training digits (default: all 60,000)')
    add('--test-digits', type=cli.positive_int, default=None,
        help='use the first N MNIST test digits (default: all 10,000)')
    af = commands.add_parser(
        'affnist', help='Section 5.2: CapsNet and a pooling CNN trained on '
                        'MNIST at random on 40 x 40, tested on affNIST')
    common(af, list(paper_experiments.AFFNIST_ROWS))
    add = af.add_argument
    add('--train-size', type=cli.positive_int, default=None,
        help='use the first N MNIST training digits (default: all)')
    add('--test-size', type=cli.positive_int, default=None,
        help='expanded-MNIST test: the first N MNIST test digits')
    add('--affnist', default=None,
        help="an affNIST .mat file (e.g. test.mat); default: a generated "
             "affNIST-like set from the MNIST test digits")
    add('--affnist-size', type=cli.positive_int, default=None,
        help='use the first N images of the affine test set')
    f5 = commands.add_parser(
        'figure5', help="Figure 5: a MultiMNIST CapsNet's reconstructions")
    add = f5.add_argument
    add('--load', required=True,
        help='a model.npz of experiments.py multimnist (row capsnet)')
    add('--out', '-o', required=True, help='folder for figure5.png')
    add('--data-dir', default=None,
        help='folder with the four MNIST *-ubyte.gz files')
    add('--data-seed', type=cli.integer, default=0,
        help='seed of the MultiMNIST test pairs')
    add('--test-digits', type=cli.positive_int, default=500,
        help='make pairs from the first N MNIST test digits')
    add('--right', type=cli.non_negative_int, default=4,
        help='rows of correctly classified examples')
    add('--wrong', type=cli.non_negative_int, default=4,
        help='rows of incorrectly classified examples')


def paper_command(args):
    """Run multimnist, affnist or figure5; errors are one line."""
    from capsnet.data import paper
    args.date = _now()
    args.machine = machine_description()
    if args.table != 'figure5':
        from capsnet import devices
        args.chainer_device = devices.select_device(args)
    try:
        cli.check_writable(args.out)
        if args.table == 'figure5':
            return figure5(args)
        if args.table == 'multimnist':
            paper_experiments.run_multimnist(args)
        else:
            if args.affnist and not os.path.isfile(args.affnist):
                cli.fail('affNIST file {} {}'.format(args.affnist, 'is a '
                         'folder; pass the .mat file' if os.path.isdir(
                             args.affnist) else 'does not exist'))
            paper_experiments.run_affnist(args)
    except (paper.DataError, mnist.DatasetError,
            paper_experiments.RunConflict) as e:
        cli.fail(e)
    print('{} and {}'.format(os.path.join(args.out, 'results.json'),
                             os.path.join(args.out, 'table.md')))
    return 0


def figure5(args):
    from capsnet import figures
    from capsnet.data import paper
    try:
        model = files.load_model(args.load, nets.ARCHITECTURES)
    except files.ModelFileError as e:
        cli.fail(e)
    if model.arch != 'capsnet-multimnist' or not model.reconstruct:
        cli.fail('{} holds a {} model; figure5 needs the MultiMNIST CapsNet '
                 'with its decoder (experiments.py multimnist, row capsnet)'
                 .format(args.load, model.arch))
    images, labels = paper.load_mnist_arrays(args.data_dir)['test']
    n = min(args.test_digits, len(images))
    data = paper.multimnist(images[:n], labels[:n], 1,
                                     args.data_seed, split='test')
    mosaic, rows = paper_experiments.figure5(model, data, args.right,
                                             args.wrong)
    path = os.path.join(args.out, 'figure5.png')
    figures.save_image(path, mosaic)
    files.write_text(os.path.join(args.out, 'figure5.json'), json.dumps(
        dict(load=args.load, rows=rows, columns=[
            'input', 'reconstructions from the two longest capsules (red '
            'the longer, green the other)', 'forced from the true labels '
            '(red t1, green t2)', 'forced from a capsule of an absent class '
            '(blue)']), indent=2) + '\n')
    print('{} ({} rows: {} right, {} wrong)'.format(
        path, len(rows), sum(r['correct'] for r in rows),
        sum(not r['correct'] for r in rows)))
    return 0


def table1(args):
    jobs = [(row, trial) for trial in range(args.trials)
            for row in row_specs() if row['name'] in args.rows]
    if args.dry_run:
        for row, trial in jobs:
            problem = conflict(row, trial, args)
            done = is_finished(run_dir(args.out, row, trial), args.epoch)
            print('{}{}'.format(
                '# cannot run ({}): '.format(problem) if problem else
                '# finished: ' if done else '',
                shlex.join(run_command(row, trial, args))))
        return 0
    problems = [p for p in (conflict(row, trial, args) for row, trial in jobs)
                if p]
    if problems:
        print('error: ' + '; '.join(problems), file=sys.stderr)
        return 2
    if args.seed + args.trials - 1 > cli.SEED_MAX:
        cli.fail('--seed {} with --trials {} gives seeds above {}; use a '
                 'smaller --seed'.format(args.seed, args.trials,
                                         cli.SEED_MAX), 2)
    cli.check_writable(args.out)
    lock = files.lock_folder(args.out, 'experiments.py')
    failed = []
    for row, trial in [] if args.collect_only else jobs:
        if is_finished(run_dir(args.out, row, trial), args.epoch):
            continue
        if not do_run(row, trial, args):
            failed.append(run_dir(args.out, row, trial))
        write_results(args)
    runs, _ = write_results(args)
    print('{} finished runs; {} and {}'.format(
        len(runs), os.path.join(args.out, 'results.json'),
        os.path.join(args.out, 'table.md')))
    files.unlock(lock)
    if failed:
        sys.stderr.write('error: {} run(s) did not finish; see train.log in '
                         '{}\n'.format(len(failed), ', '.join(failed)))
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join(['python', 'experiments.py'] + argv)
    if args.table == 'table1':
        return table1(args)
    if args.table in ('multimnist', 'affnist', 'figure5'):
        return paper_command(args)
    raise AssertionError(args.table)


if __name__ == '__main__':
    sys.exit(cli.run_main(main, None, INTERRUPTED))
