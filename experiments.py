#!/usr/bin/env python
"""Sweeps that reproduce the paper's tables, each run in process through
the same training loop as train.py (capsnet/training/loop.py).

    python experiments.py table1 --epoch 50 --trials 3 --out t1 -d @cupy:0
    python experiments.py table1 --epoch 1 --trials 1 --out t1 \\
        --train-size 1000 --test-size 500 --rows r1,r3     # a quick look
    python experiments.py multimnist --epoch 1 --out mm    # Section 6
    python experiments.py affnist --epoch 5 --out af       # Section 5.2
    python experiments.py figure5 --load mm/capsnet-trial0/model.npz --out f5

Every (row, trial) is a run folder OUT/<row>-trial<k> (seed S + k) with the
loop's files (log, plots, snapshots, model.npz, final.json) and run.json
(its config, the command, the wall-clock seconds); the run folder
convention and the sweep runner are capsnet/training/runs.py. Trials go
round the rows, so an early look at the table has every row in it. A
finished run is never redone, an unfinished one continues from its newest
snapshot, and a folder made with other settings is refused before anything
runs: an interrupted sweep is resumed by running the same command again,
and a sweep is lengthened by raising --epoch. After every run OUT/results.json
and OUT/table.md are rewritten from every finished run.
"""
import argparse
import json
import os
import shlex
import sys

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import numpy

import nets  # first: it brings capsnet.compat before chainer
import chainer

from capsnet import devices, figures, files
from capsnet.data import mnist, paper
from capsnet.training import loop, runs
from capsnet.training.settings import RECIPE_SETTINGS, Settings

FULL_SIZES = {name: (mnist.TRAIN_SIZE, mnist.TEST_SIZE)
              for name in mnist.dataset_names()}
DATASET_TITLES = {'mnist': 'MNIST', 'fashion-mnist': 'Fashion-MNIST'}
INTERRUPTED = ('interrupted; run the same command again to continue the '
               'sweep')
STD_KIND = 'sample standard deviation (ddof=1) over trials; 0 for one trial'
# what a sweep's runs keep: the newest snapshot only (with its Adam state a
# baseline snapshot is about 3 x 35.4M floats)
SWEEP_RUN = dict(autoload=True, snapshot_keep=1, no_progress=True)

# Table 1 of the paper: MNIST test error %, mean and std over 3 trials
# (the baseline's std is not given); the last column: the row's settings.
_ROWS = (
    ('baseline', 'Baseline CNN', None, False, 0.39, None,
     dict(arch='baseline')),
    ('r1', 'CapsNet', 1, False, 0.34, 0.032, dict(routing=1)),
    ('r1-recon', 'CapsNet', 1, True, 0.29, 0.011,
     dict(routing=1, reconstruct=True)),
    ('r3', 'CapsNet', 3, False, 0.35, 0.036, dict(routing=3)),
    ('r3-recon', 'CapsNet', 3, True, 0.25, 0.005,
     dict(routing=3, reconstruct=True)),
)
# Section 6: name: (title, arch, paper error %)
MULTIMNIST_ROWS = {
    'capsnet': ('CapsNet (r = 3, reconstruction)', 'capsnet-multimnist', 5.2),
    'baseline': ('Baseline CNN (the authors\' conv_model.py)',
                 'baseline-multimnist-conv', 8.1),
}
# Section 6: "the learning rate decay steps [are] 10 times larger": 10 x the
# recipe's MNIST steps (paper: 0.95 per epoch of 600 steps of 100)
MULTIMNIST_DECAY_STEPS = {'paper': 6000, 'official': 20000}
# Section 5.2: name: (title, arch, paper expanded-MNIST %, paper affNIST %)
AFFNIST_ROWS = {
    'capsnet': ('CapsNet (r = 3, reconstruction)', 'capsnet', 99.23, 79.0),
    'cnn': ('CNN, max pooling and dropout', 'cnn-pool', 99.22, 66.0),
}
# digits at random on 40 x 40: a centred 28 x 28 digit shifted by up to 6
AFFNIST_SHIFT = (paper.AFFNIST_CANVAS - mnist.IMAGE_SIZE) // 2


# --------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------

def row_specs():
    """The five rows of Table 1, in the paper's order, as dicts.

    Keys: name, method, routing (None for the baseline), reconstruct,
    paper_error_pct, paper_std_pct (None where the paper gives none) and
    settings (the Settings that make the row).
    """
    return [dict(name=name, method=method, routing=routing,
                 reconstruct=reconstruct, paper_error_pct=paper_pct,
                 paper_std_pct=paper_std, settings=dict(settings))
            for (name, method, routing, reconstruct, paper_pct, paper_std,
                 settings) in _ROWS]


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


def table1_settings(row, trial, args):
    """The Settings of (row, trial): the row's network, the sweep's data
    and schedule, trial k's seed, the run folder."""
    return Settings(
        dataset=args.dataset, train_size=args.train_size,
        test_size=args.test_size, batchsize=args.batchsize,
        recipe=args.recipe, epoch=args.epoch, seed=run_seed(args, trial),
        out=run_dir(args.out, row, trial), data_dir=args.data_dir,
        device=args.device, **SWEEP_RUN, **_row(row)['settings']).resolved()


def run_config(row, trial, args):
    """What makes a run's result (a folder made with another is not
    reused): the training settings and the network's options."""
    settings = table1_settings(row, trial, args)
    return dict(row=_row(row)['name'], trial=trial, arch=settings.arch,
                **settings.recorded(), **settings.model_options())


def run_command(row, trial, args):
    """The train.py command line that trains (row, trial) alone, the same
    run (for the record and --dry-run)."""
    settings = table1_settings(row, trial, args)
    default = Settings().resolved()
    flags = []
    for name in ('arch', 'routing', 'reconstruct', 'recipe', 'dataset',
                 'epoch', 'seed', 'batchsize', 'train_size', 'test_size',
                 'data_dir', 'out', 'no_progress', 'autoload',
                 'snapshot_keep'):
        value = getattr(settings, name)
        if value is None or (value == getattr(default, name) and name not in
                             ('epoch', 'seed', 'batchsize', 'out')):
            continue
        flag = '--' + name.replace('_', '-')
        flags += [flag] if value is True else [flag, str(value)]
    if cli.device_spec(args.device) != '@numpy':
        flags += ['--device', cli.device_spec(args.device)]
    return 'python train.py ' + shlex.join(flags)


def table1_jobs(args):
    return [runs.Job(args.out, row['name'], trial,
                     run_config(row, trial, args))
            for trial in range(args.trials)
            for row in row_specs() if row['name'] in args.rows]


def table1(args):
    jobs = table1_jobs(args)
    if args.dry_run:
        for job in jobs:
            problem = runs.conflict(job, args.epoch)
            done = runs.is_finished(job.folder, args.epoch)
            print('{}{}'.format(
                '# cannot run ({}): '.format(problem) if problem else
                '# finished: ' if done else '',
                run_command(job.row, job.trial, args)))
        return 0
    if args.seed + args.trials - 1 > cli.SEED_MAX:
        cli.fail('--seed {} with --trials {} gives seeds above {}; use a '
                 'smaller --seed'.format(args.seed, args.trials,
                                         cli.SEED_MAX), 2)
    cli.check_writable(args.out)
    lock = files.lock_folder(args.out, 'experiments.py')
    if not args.collect_only:
        device = devices.select_device(args)
        data = {}

        def train(job):
            settings = table1_settings(job.row, job.trial, args)
            if not data:   # read once, for every run
                train_set, _, test = mnist.get_mnist_like(
                    args.dataset, data_dir=args.data_dir,
                    train_size=args.train_size, test_size=args.test_size,
                    log=print)
                data.update(train=train_set, test=test)
            mnist.check_batchsize(settings.batchsize, len(data['train']))
            numpy.random.seed(settings.seed)
            model = nets.build(settings.arch, settings.recipe,
                               **settings.model_options())
            loop.fit(settings, model, data['train'], dict(test=data['test']),
                     device)
        runs.sweep(jobs, args.epoch, train, args.command,
                   after_each=lambda: write_results(args))
    finished, _ = write_results(args)
    print('{} finished runs; {} and {}'.format(
        len(finished), os.path.join(args.out, 'results.json'),
        os.path.join(args.out, 'table.md')))
    files.unlock(lock)
    return 0


def sizes(args_or_record):
    """(train, test) example counts: the --train/test-size or the full set."""
    get = (args_or_record.get if isinstance(args_or_record, dict)
           else lambda k: getattr(args_or_record, k))
    full_train, full_test = FULL_SIZES[get('dataset')]
    return (get('train_size') or full_train, get('test_size') or full_test)


def collect_runs(args):
    """Records of every finished run under args.out with these settings
    (the rows, trials 0 .. --trials - 1)."""
    found = []
    for job, final in runs.finished(table1_jobs(args), args.epoch):
        row = _row(job.row)
        info = runs.read_json(os.path.join(job.folder, 'run.json')) or {}
        train_size, test_size = sizes(args)
        found.append(dict(
            row=row['name'], method=row['method'], routing=row['routing'],
            reconstruct=row['reconstruct'], trial=job.trial,
            seed=run_seed(args, job.trial),
            final_test_error=final['final_test_error'],
            final_test_error_pct=100 * final['final_test_error'],
            best_on_test_error=final.get('best_on_test_error'),
            epochs=final['epochs'], final_epoch=final['final_epoch'],
            parameters=final.get('parameters'),
            dataset=final.get('dataset', args.dataset),
            train_size=final.get('train_size') or train_size,
            test_size=final.get('test_size') or test_size,
            wall_seconds=info.get('wall_seconds'),
            command=run_command(row, job.trial, args), run_dir=job.folder))
    return found


def summarize(records, rows=None, dataset=None):
    """One summary per row, in the paper's order.

    Args:
        records: as collect_runs makes them (needs row, trial,
            final_test_error, epochs; parameters, dataset, train_size,
            test_size, wall_seconds are used when present).
        rows: row names to list even without runs; default: those in records.
        dataset: the runs' dataset; default: the one the runs name (MNIST
            if they name none). The paper's figures are given for MNIST only.
    Returns:
        list of dicts: row, method, routing, reconstruct, n, trials,
        mean_error_pct, std_error_pct (STD_KIND), errors_pct, epochs,
        parameters, dataset, train_size, test_size, wall_seconds,
        paper_error_pct, paper_std_pct (None unless the dataset is MNIST).
    """
    names = {run['row'] for run in records} | set(rows or ())
    if dataset is None:
        named = {run.get('dataset') or 'mnist' for run in records} or {'mnist'}
        dataset = named.pop() if len(named) == 1 else None
    on_mnist = dataset == 'mnist'
    summary = []
    for spec in row_specs():
        if spec['name'] not in names:
            continue
        mine = sorted((r for r in records if r['row'] == spec['name']),
                      key=lambda r: r['trial'])
        errors = [100 * r['final_test_error'] for r in mine]
        mean, std = runs.mean_std(errors)

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




def write_results(args):
    """Rewrite OUT/results.json and OUT/table.md from the finished runs."""
    found = collect_runs(args)
    summary = summarize(found, rows=[r['name'] for r in row_specs()
                                     if r['name'] in args.rows],
                        dataset=args.dataset)
    meta = dict(
        table='table1', dataset=args.dataset, epochs=args.epoch,
        trials=args.trials, train_size=args.train_size,
        test_size=args.test_size, batchsize=args.batchsize,
        recipe=args.recipe, seed=args.seed, rows=args.rows,
        command=args.command, date=runs.now(),
        machine=runs.machine_description(),
        device='CPU' if cli.device_spec(args.device) == '@numpy'
        else cli.device_spec(args.device),
        error='final-epoch test error (not best-on-test)', std=STD_KIND)
    runs.write_tables(args.out, meta, summary, render_table(summary, meta),
                      found)
    return found, summary


# --------------------------------------------------------------------------
# MultiMNIST (Section 6)
# --------------------------------------------------------------------------

def multimnist_settings(args, row, trial):
    arch = MULTIMNIST_ROWS[row][1]
    return Settings(
        arch=arch, input_size=paper.MULTI_CANVAS, max_shift=0,
        recipe=args.recipe, batchsize=args.batchsize,
        decay_steps=MULTIMNIST_DECAY_STEPS[args.recipe],
        seed=args.seed + trial, epoch=args.epoch,
        out=os.path.join(args.out, '{}-trial{}'.format(row, trial)),
        device=args.device, data_dir=args.data_dir,
        snapshot_every=args.snapshot_every, **SWEEP_RUN).resolved()


def multimnist_config(args, row, trial):
    settings = multimnist_settings(args, row, trial)
    return dict(experiment='multimnist', row=row, trial=trial, arch=
                settings.arch, **settings.recorded(),
                data_seed=args.data_seed,
                pairs_per_digit=args.pairs_per_digit,
                test_pairs_per_digit=args.test_pairs_per_digit,
                train_digits=args.train_digits, test_digits=args.test_digits,
                multi_shift=args.multi_shift)


def multimnist_data(args):
    """(train, test) MultiMNIST datasets, every pair made on the fly from
    (--data-seed, its index): constant memory at the paper's 60M pairs."""
    arrays = paper.load_mnist_arrays(args.data_dir)
    sets = []
    for split, digits, pairs in (
            ('train', args.train_digits, args.pairs_per_digit),
            ('test', args.test_digits, args.test_pairs_per_digit)):
        images, labels = arrays[split]
        n = len(images) if digits is None else digits
        paper.check_count(n, len(images), '--{}-digits'.format(split))
        sets.append(paper.MultiMNIST(images[:n], labels[:n], pairs,
                                     args.data_seed, split=split,
                                     max_shift=args.multi_shift))
        print('MultiMNIST {}: {:,} digits x {:,} pairs = {:,} pairs, made '
              'on the fly'.format(split, n, pairs, len(sets[-1])))
    return sets


def paper_sweep(args, config_of, settings_of, read_data, fit, write_table):
    """The sweep of a paper experiment: a job per (row, trial), each trained
    by ``fit(settings, model, data, folder)`` on the data ``read_data()``
    gives (read once, at the first job that runs), the table rewritten
    after every job. Returns the table's summary."""
    jobs = [runs.Job(args.out, row, trial, config_of(args, row, trial))
            for trial in range(args.trials) for row in args.rows]
    device = devices.select_device(args)
    data = []

    def train(job):
        if not data:
            data.append(read_data(args))
        settings = settings_of(args, job.row, job.trial)
        numpy.random.seed(settings.seed)
        model = nets.build(settings.arch, settings.recipe,
                           **settings.model_options())
        fit(settings, model, data[0], device, job.folder)
    runs.sweep(jobs, args.epoch, train, args.command,
               after_each=lambda: write_table(args, jobs))
    return write_table(args, jobs)


def run_multimnist(args):
    def fit(settings, model, data, device, folder):
        loop.fit(settings, model, data[0], dict(test=data[1]), device)
    return paper_sweep(args, multimnist_config, multimnist_settings,
                       multimnist_data, fit, write_multimnist_table)


def _test_error(final):
    """A MultiMNIST run's final-epoch test error, as the shared loop writes
    it or as the experiments wrote it before."""
    return final.get('final_test_error', final.get('test_error'))


def write_multimnist_table(args, jobs):
    done = runs.finished(jobs, args.epoch)
    summary = []
    for row, (title, arch, paper_pct) in MULTIMNIST_ROWS.items():
        mine = [final for job, final in done if job.row == row]
        errors = [100 * _test_error(r) for r in mine]
        mean, std = runs.mean_std(errors)
        summary.append(dict(
            row=row, method=title, n=len(mine), errors_pct=errors,
            mean_error_pct=mean, std_error_pct=std, paper_error_pct=paper_pct,
            parameters=mine[0].get('parameters') if mine else None,
            train_examples=mine[0].get('train_size') if mine else None,
            test_examples=mine[0].get('test_size') if mine else None))
    meta = dict(experiment='multimnist', command=args.command,
                epochs=args.epoch, trials=args.trials, recipe=args.recipe,
                pairs_per_digit=args.pairs_per_digit,
                test_pairs_per_digit=args.test_pairs_per_digit,
                train_digits=args.train_digits, test_digits=args.test_digits,
                multi_shift=args.multi_shift, data_seed=args.data_seed,
                date=runs.now(), machine=runs.machine_description())
    lines = [
        '# MultiMNIST (Section 6): test error %', '',
        'Written {} by `{}` on {}.'.format(meta['date'], args.command,
                                          meta['machine']), '',
        '- Error: the two longest capsules (the two largest logits for the '
        'CNN) are not exactly the two labels; final epoch; mean ± sample '
        'std over trials (0 for one).',
        '- Budget: {} epoch(s); training set {} MNIST training digits x {} '
        'pairs each; test set {} MNIST test digits x {} pairs each; shifts '
        'of up to {} px; up to {} trial(s).'.format(
            args.epoch, args.train_digits or 60000, args.pairs_per_digit,
            args.test_digits or 10000, args.test_pairs_per_digit,
            args.multi_shift, args.trials),
        "- Paper: Sabour et al. 2017, Section 6: 60M training and 10M test "
        "pairs (1K per digit); CapsNet 5.2%, baseline 8.1%. **A smaller "
        "budget than the paper's is not comparable to its figures.**", '',
        '| Method | Parameters | Our error % (mean ± std, n) | Paper % | '
        'Train / test examples |',
        '| --- | ---: | ---: | ---: | ---: |']
    for row in summary:
        lines.append('| {} | {} | {} | {} | {} / {} |'.format(
            row['method'], '{:,}'.format(row['parameters'])
            if row['parameters'] else '—',
            _fmt(row['mean_error_pct'], row['std_error_pct'], row['n']),
            row['paper_error_pct'], row['train_examples'] or '—',
            row['test_examples'] or '—'))
    runs.write_tables(args.out, meta, summary, '\n'.join(lines) + '\n')
    return summary


def _fmt(mean, std, n):
    if not n:
        return 'not run (n=0)'
    return '{:.2f} ± {:.2f} (n={})'.format(mean, std, n)


# --------------------------------------------------------------------------
# Robustness to affine transformations (Section 5.2)
# --------------------------------------------------------------------------

def affnist_settings(args, row, trial):
    return Settings(
        arch=AFFNIST_ROWS[row][1], input_size=paper.AFFNIST_CANVAS,
        max_shift=AFFNIST_SHIFT, reconstruct=True, recipe=args.recipe,
        batchsize=args.batchsize, train_size=args.train_size,
        test_size=args.test_size, seed=args.seed + trial, epoch=args.epoch,
        out=os.path.join(args.out, '{}-trial{}'.format(row, trial)),
        device=args.device, data_dir=args.data_dir, **SWEEP_RUN).resolved()


def affnist_config(args, row, trial):
    settings = affnist_settings(args, row, trial)
    return dict(experiment='affnist', row=row, trial=trial,
                arch=settings.arch, **settings.recorded(),
                affnist=args.affnist, affnist_size=args.affnist_size,
                data_seed=args.data_seed)


def affnist_data(args):
    """(train, expanded test, affine test, the affine set's description):
    MNIST digits centred on 40 x 40 for training (the updater places them
    at random, up to 6 px off centre, anew every epoch), the test digits at
    random on 40 x 40, and affNIST (or a generated affNIST-like set)."""
    train, _, _ = mnist.get_mnist_like(
        data_dir=args.data_dir, train_size=args.train_size,
        input_size=paper.AFFNIST_CANVAS, log=print)
    test_images, test_labels = paper.load_mnist_arrays(args.data_dir)['test']
    m = args.test_size or len(test_images)
    paper.check_count(m, len(test_images), '--test-size')
    expanded = chainer.datasets.TupleDataset(
        paper.to_float(paper.expanded_mnist(test_images[:m],
                                            args.data_seed)),
        test_labels[:m].astype(numpy.int32))
    if args.affnist:
        x, t = paper.read_affnist(args.affnist)
        kind = 'affNIST ({})'.format(args.affnist)
    else:
        k = args.affnist_size or m
        paper.check_count(k, len(test_images), '--affnist-size')
        print('generating an affNIST-like set of {} images ...'.format(k),
              flush=True)
        x, _ = paper.affnist_like(test_images[:k], args.data_seed)
        t = test_labels[:k]
        kind = ('generated affNIST-like (the first {} MNIST test digits, '
                'affNIST ranges; not affNIST)'.format(k))
    if args.affnist_size:
        paper.check_count(args.affnist_size, len(x), '--affnist-size')
        x, t = x[:args.affnist_size], t[:args.affnist_size]
    print('affine test set: {}, {} images'.format(kind, len(x)))
    affine = chainer.datasets.TupleDataset(paper.to_float(x),
                                           t.astype(numpy.int32))
    return train, expanded, affine, kind


def run_affnist(args):
    if args.affnist and not os.path.isfile(args.affnist):
        cli.fail('affNIST file {} {}'.format(args.affnist, 'is a folder; '
                 'pass the .mat file' if os.path.isdir(args.affnist) else
                 'does not exist'))
    kind = 'affNIST ({})'.format(args.affnist) if args.affnist else \
        'generated affNIST-like (not affNIST)'

    def fit(settings, model, data, device, folder):
        train, expanded, affine, _ = data
        loop.fit(settings, model, train, dict(expanded=expanded,
                                              affine=affine),
                 device, final_set='expanded')
        add_affine_history(folder, data[3])
    return paper_sweep(args, affnist_config, affnist_settings, affnist_data,
                       fit, lambda args, jobs: write_affnist_table(
                           args, jobs, kind))


def add_affine_history(folder, kind):
    """final.json gets the per-epoch expanded-MNIST and affine accuracies
    (from the log) and the last epoch's, for the tables."""
    path = os.path.join(folder, 'final.json')
    final = runs.read_json(path)
    with open(os.path.join(folder, 'log')) as f:
        log = json.load(f)
    history = [dict(epoch=entry['epoch'],
                    expanded_accuracy=entry['expanded/main/accuracy'],
                    affine_accuracy=entry['affine/main/accuracy'])
               for entry in log if 'affine/main/accuracy' in entry]
    final.update(history=history, affine_set=kind,
                 expanded_accuracy=history[-1]['expanded_accuracy'],
                 affine_accuracy=history[-1]['affine_accuracy'])
    files.write_text(path, json.dumps(final, indent=2) + '\n')


def write_affnist_table(args, jobs, kind):
    done = runs.finished(jobs, args.epoch)
    by_row = {row: {job.trial: final for job, final in done if job.row == row}
              for row in AFFNIST_ROWS}
    generated = not args.affnist
    label = 'generated affNIST-like' if generated else 'affNIST'
    summary = []
    for row, (title, arch, paper_exp, paper_aff) in AFFNIST_ROWS.items():
        mine = list(by_row[row].values())
        exp = [100 * r['expanded_accuracy'] for r in mine]
        aff = [100 * r['affine_accuracy'] for r in mine]
        summary.append(dict(
            row=row, method=title, n=len(mine),
            expanded_accuracy_pct=exp, affine_accuracy_pct=aff,
            affine_set=kind, affine_is_generated=generated,
            mean_expanded_pct=runs.mean_std(exp)[0],
            mean_affine_pct=runs.mean_std(aff)[0],
            paper_expanded_pct=paper_exp, paper_affnist_pct=paper_aff,
            parameters=mine[0].get('parameters') if mine else None))
    meta = dict(experiment='affnist', command=args.command, epochs=args.epoch,
                trials=args.trials, train_size=args.train_size,
                test_size=args.test_size, affine_set=kind,
                affine_is_generated=generated, date=runs.now(),
                machine=runs.machine_description())
    lines = [
        '# Robustness to affine transformations (Section 5.2): test '
        'accuracy %', '',
        'Written {} by `{}` on {}.'.format(meta['date'], args.command,
                                          meta['machine']), '',
        '- Training: the first {} MNIST training digits, each placed at a '
        'random position on a 40 x 40 black canvas (redrawn every epoch), '
        'no other augmentation; {} epoch(s); final epoch; up to {} '
        'trial(s).'.format(args.train_size or 60000, args.epoch,
                           args.trials),
        '- Expanded MNIST test: the first {} MNIST test digits placed at '
        'random on 40 x 40.'.format(args.test_size or 10000),
        '- Affine test set: {}.'.format(kind),
        ("- **Every number in the '{}' column was measured on a generated "
         "set, not on affNIST.**".format(label)) if generated else
        '- The affNIST column was measured on the real affNIST file.',
        "- Paper: Sabour et al. 2017, Section 5.2: trained to 99.23% "
        "(CapsNet) and 99.22% (CNN) on expanded MNIST, then 79% and 66% on "
        "affNIST. **A smaller budget than the paper's is not comparable to "
        "its figures.**", '',
        '| Method | Parameters | Expanded MNIST % | {} % | Paper: expanded '
        'MNIST / affNIST % | n |'.format(label),
        '| --- | ---: | ---: | ---: | ---: | ---: |']
    for row in summary:
        def pct(value):
            return '—' if value is None else '{:.2f}'.format(value)
        lines.append('| {} | {} | {} | {} | {} / {} | {} |'.format(
            row['method'], '{:,}'.format(row['parameters'])
            if row['parameters'] else '—', pct(row['mean_expanded_pct']),
            pct(row['mean_affine_pct']), row['paper_expanded_pct'],
            row['paper_affnist_pct'], row['n']))
    matched = [m for m in (matched_epochs(by_row, trial)
                           for trial in range(args.trials)) if m]
    meta['matched'] = matched
    lines += [
        '', '## At matched expanded-MNIST accuracy', '',
        "The paper compares the two networks at the same expanded-MNIST "
        "accuracy (early stopping at 99.23% and 99.22%). Here, per trial, "
        "the target is the lower of the two networks' best per-epoch "
        "expanded-MNIST accuracy, and each network is taken at the first "
        "epoch that reaches it. The epochs are chosen on the expanded-MNIST "
        "test set itself (there is no separate validation set), as an "
        "early stop on it would.", '',
        '| Trial | Target % | CapsNet: epoch, expanded %, {0} % | CNN: '
        'epoch, expanded %, {0} % |'.format(label),
        '| ---: | ---: | ---: | ---: |']
    for m in matched:
        lines.append('| {} | {:.2f} | {}, {:.2f}, **{:.2f}** | {}, {:.2f}, '
                     '**{:.2f}** |'.format(
                         m['trial'], 100 * m['target'],
                         *(value for row in ('capsnet', 'cnn') for value in (
                             m[row]['epoch'],
                             100 * m[row]['expanded_accuracy'],
                             100 * m[row]['affine_accuracy']))))
    if not matched:
        lines.append('| — | not yet: needs both networks of a trial '
                     'finished | | |')
    runs.write_tables(args.out, meta, summary, '\n'.join(lines) + '\n')
    return summary


def matched_epochs(finals, trial):
    """The paper's comparison for one trial: both networks at the same
    expanded-MNIST accuracy.

    finals: {row: {trial: final.json}} with per-epoch ``history``. The target
    is the lower of the two rows' best expanded accuracy; each row is
    taken at its first epoch that reaches it. Returns {'trial', 'target',
    'capsnet': history entry, 'cnn': history entry}, or None when a row of
    that trial has not finished (or has no history).
    """
    histories = {}
    for row in ('capsnet', 'cnn'):
        final = finals.get(row, {}).get(trial)
        if final is None or not final.get('history'):
            return None
        histories[row] = final['history']
    target = min(max(h['expanded_accuracy'] for h in history)
                 for history in histories.values())
    result = dict(trial=trial, target=target)
    for row, history in histories.items():
        result[row] = next(h for h in history
                           if h['expanded_accuracy'] >= target)
    return result


# --------------------------------------------------------------------------
# Figure 5
# --------------------------------------------------------------------------

RED = (1.0, 0.25, 0.25)


def figure5_rows(model, data, n_right=4, n_wrong=4, batchsize=100):
    """The paper's Figure 5: per example (the first correctly classified
    ones, then incorrect ones) its input, its two reconstructions from the
    two longest capsules (red: the longer, green: the other), those forced
    from the two labels (red t1, green t2), and one forced from the
    longest capsule of a class that is neither a label nor predicted
    (blue; the paper's starred column, nets.forced_class).

    Returns (tiles (4 per row, S, S, 3) in [0, 1], rows: dicts of index,
    labels, predicted, forced, correct)."""
    x = paper.to_float(data['x'])
    t1, t2 = data['t1'], data['t2']
    scores = numpy.concatenate([
        chainer.backend.CpuDevice().send(model.predict(model.device.send(
            x[i:i + batchsize]))[1]) for i in range(0, len(x), batchsize)])
    best = nets.top2(scores)
    right = nets.pair_correct(scores, t1, t2)
    forced = nets.forced_class(scores, t1, t2, best)
    chosen = (list(numpy.flatnonzero(right)[:n_right])
              + list(numpy.flatnonzero(~right)[:n_wrong]))
    side = model.input_size
    tiles, rows = [], []
    for k in chosen:
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', False):
            v = model.capsules(x[k:k + 1])

            def draw(label):
                return model.reconstruction(
                    v, numpy.array([label])).array.reshape(side, side)
            predicted = (figures.tint(draw(best[k, 0]), RED)
                         + figures.tint(draw(best[k, 1]), figures.GREEN))
            true = (figures.tint(draw(t1[k]), RED)
                    + figures.tint(draw(t2[k]), figures.GREEN))
            starred = figures.tint(draw(forced[k]), figures.BLUE)
        tiles += [figures.tint(x[k, 0], (1, 1, 1)), predicted, true, starred]
        rows.append(dict(index=int(k), labels=[int(t1[k]), int(t2[k])],
                         predicted=[int(best[k, 0]), int(best[k, 1])],
                         forced=int(forced[k]), correct=bool(right[k])))
    return numpy.clip(numpy.array(tiles), 0, 1), rows


def figure5(args):
    model = files.load_model(args.load, nets.ARCHITECTURES)
    if model.arch != 'capsnet-multimnist' or not model.reconstruct:
        cli.fail('{} holds a {} model; figure5 needs the MultiMNIST CapsNet '
                 'with its decoder (experiments.py multimnist, row capsnet)'
                 .format(args.load, model.arch))
    images, labels = paper.load_mnist_arrays(args.data_dir)['test']
    paper.check_count(args.test_digits, len(images), '--test-digits')
    n = args.test_digits
    data = paper.MultiMNIST(images[:n], labels[:n], 1, args.data_seed,
                            split='test', max_shift=args.multi_shift)
    tiles, rows = figure5_rows(model, data.arrays(numpy.arange(len(data))),
                               args.right, args.wrong)
    if not rows:
        cli.fail('no example to draw: --right and --wrong are both 0')
    figure, _ = figures.mosaic_figure(
        tiles, 4, 'Figure 5: MultiMNIST reconstructions ({})'.format(
            os.path.basename(args.load)), scale=args.scale,
        col_labels=['input', 'from the two longest\n(red longer, green)',
                    'forced: labels\n(red t1, green t2)',
                    '* forced: another class\n(blue)'],
        row_labels=['{} {}+{} -> {}+{}, * {}'.format(
            'right' if r['correct'] else 'WRONG', *r['labels'],
            *r['predicted'], r['forced']) for r in rows])
    path = os.path.join(args.out, 'figure5.png')
    figures.save_figure(path, figure)
    files.write_text(os.path.join(args.out, 'figure5.json'), json.dumps(
        dict(load=args.load, rows=rows, columns=[
            'input', 'reconstructions from the two longest capsules (red '
            'the longer, green the other)', 'forced from the true labels '
            '(red t1, green t2)', 'forced from the longest capsule of a '
            'class that is neither a label nor predicted (blue)']),
        indent=2) + '\n')
    print('{} ({} rows: {} right, {} wrong)'.format(
        path, len(rows), sum(r['correct'] for r in rows),
        sum(not r['correct'] for r in rows)))
    return 0


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


def add_sweep_arguments(parser, rows, trials):
    """What every sweep takes: epochs, trials, --out, seed, batch, recipe,
    device, data, rows."""
    add = parser.add_argument
    add('--epoch', '--epochs', '-e', type=cli.positive_int, required=True,
        help='epochs per run')
    add('--trials', type=cli.positive_int, default=trials,
        help='runs per row (seeds S, S+1, ...)')
    add('--out', '-o', required=True,
        help='folder for the runs, results.json and table.md')
    add('--seed', '-s', type=cli.seed, default=0,
        help='trial k uses seed S + k')
    add('--batchsize', '-b', type=cli.positive_int, default=None,
        help='examples per training step (paper recipe: 100, official: '
             '128)')
    add('--recipe', default='paper', choices=sorted(RECIPE_SETTINGS),
        help="paper, or official: the authors' released code (as "
             'train.py --recipe)')
    add('--data-dir', default=None,
        help='folder with the four MNIST *-ubyte.gz files')
    add('--rows', type=_choice_list(rows), default=list(rows),
        help='comma-separated subset of ' + ','.join(rows))
    cli.add_device_arguments(parser)


def build_parser():
    parser = cli.ArgumentParser(
        description='Reproduce the tables of Sabour et al. 2017')
    commands = parser.add_subparsers(dest='table', required=True)
    t1 = commands.add_parser(
        'table1', help='Table 1: baseline and CapsNet, routing 1/3, '
                       'with and without reconstruction')
    add_sweep_arguments(t1, [spec['name'] for spec in row_specs()], 3)
    add = t1.add_argument
    add('--dataset', default='mnist', choices=sorted(FULL_SIZES),
        help='which dataset (its test set for the evaluation)')
    add('--train-size', type=cli.positive_int, default=None,
        help='use the first N training examples (default: all)')
    add('--test-size', type=cli.positive_int, default=None,
        help='use the first N test examples (default: all)')
    add('--dry-run', action='store_true',
        help='print the runs, as the equivalent train.py commands (finished '
             'ones commented out), and exit')
    add('--collect-only', action='store_true',
        help='start no run: rewrite results.json and table.md from the '
             'runs already finished in --out (e.g. rows with fewer trials)')
    mm = commands.add_parser(
        'multimnist', help='Section 6: CapsNet and the baseline on '
                           'MultiMNIST (top-2 error)')
    add_sweep_arguments(mm, list(MULTIMNIST_ROWS), 1)
    add = mm.add_argument
    add('--data-seed', type=cli.seed, default=0,
        help='seed of the pairs and their shifts')
    add('--pairs-per-digit', type=cli.positive_int, default=1000,
        help='training pairs made per MNIST training digit (paper: 1000)')
    add('--test-pairs-per-digit', type=cli.positive_int, default=1000,
        help='test pairs made per MNIST test digit (paper: 1000)')
    add('--train-digits', type=cli.positive_int, default=None,
        help='use the first N MNIST training digits (default: all 60,000)')
    add('--test-digits', type=cli.positive_int, default=None,
        help='use the first N MNIST test digits (default: all 10,000)')
    add('--multi-shift', type=cli.non_negative_int, default=paper.MULTI_SHIFT,
        help="each digit is shifted by up to this many pixels (the paper's "
             '4 gives a 72.5%% mean box overlap; 3 gives 78.4%%, the nearest '
             "to the paper's 80%%: docs/experiments.md)")
    add('--snapshot-every', type=cli.positive_int, default=1000,
        help='also snapshot every N steps (an epoch of 60M pairs is long), '
             'so that a run resumes mid-epoch')
    af = commands.add_parser(
        'affnist', help='Section 5.2: CapsNet and a pooling CNN trained on '
                        'MNIST at random on 40 x 40, tested on affNIST')
    add_sweep_arguments(af, list(AFFNIST_ROWS), 1)
    add = af.add_argument
    add('--data-seed', type=cli.seed, default=0,
        help='seed of the expanded-MNIST test placements and of the '
             'generated affine set')
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
    add('--data-seed', type=cli.seed, default=0,
        help='seed of the MultiMNIST test pairs')
    add('--multi-shift', type=cli.non_negative_int, default=paper.MULTI_SHIFT,
        help='shifts of up to this many pixels, as in training')
    add('--test-digits', type=cli.positive_int, default=500,
        help='make pairs from the first N MNIST test digits')
    add('--right', type=cli.non_negative_int, default=4,
        help='rows of correctly classified examples')
    add('--wrong', type=cli.non_negative_int, default=4,
        help='rows of incorrectly classified examples')
    add('--scale', type=cli.int_in(1, 16), default=figures.SCALE,
        help='screen pixels per image pixel')
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join(['python', 'experiments.py'] + argv)
    if args.table == 'table1':
        return table1(args)
    cli.check_writable(args.out)
    if args.table == 'figure5':
        return figure5(args)
    lock = files.lock_folder(args.out, 'experiments.py')
    (run_multimnist if args.table == 'multimnist' else run_affnist)(args)
    files.unlock(lock)
    print('{} and {}'.format(os.path.join(args.out, 'results.json'),
                             os.path.join(args.out, 'table.md')))
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main, None, INTERRUPTED))
