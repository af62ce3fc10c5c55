"""The one run-folder convention and the one sweep runner.

A sweep (experiments.py: Table 1, MultiMNIST, the affine test) is a list of
jobs, one per (row, trial), each trained in process by
``capsnet.training.loop.fit`` in its own folder ``OUT/<row>-trial<k>``:

    run.json     the job's config (what its result depends on), the
                 command, wall-clock seconds and invocations
    final.json   written by the loop when the run has trained its epochs
    (and the loop's own files: log, plots, snapshot_epoch_N, model.npz)

A job is finished when final.json says it trained ``epochs`` epochs and
reached the last one; finished jobs are never redone, an unfinished one
continues from its newest snapshot (--autoload), and a folder made with
another config is refused before anything runs. Results the experiments
wrote before the loop was shared (final.json with ``test_error`` or
``expanded_accuracy`` and no ``final_epoch``) still read.
"""
import datetime
import json
import math
import os
import platform
import time

from capsnet import files
from capsnet.errors import CapsNetError


class RunConflict(CapsNetError):
    """A run folder made with other settings."""


class Job:
    """One (row, trial) of a sweep: its folder, label and config."""

    def __init__(self, out, row, trial, config):
        self.row, self.trial, self.config = row, trial, config
        self.folder = os.path.join(out, '{}-trial{}'.format(row, trial))

    def __repr__(self):
        return 'Job({!r})'.format(self.folder)


def read_json(path):
    """The parsed JSON object at ``path``, or None (missing, unreadable, not
    an object)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_final(folder):
    return read_json(os.path.join(folder, 'final.json'))


def is_finished(folder, epochs):
    """True iff folder/final.json records a run of ``epochs`` epochs that
    reached its last epoch (or, written before the shared loop, a finished
    run of that many epochs)."""
    final = read_final(folder)
    if final is None:
        return False
    if 'final_epoch' in final:
        return final.get('epochs') == epochs and \
            final.get('final_epoch') == epochs and \
            final.get('final_test_error') is not None
    config = final.get('config') or {}   # the older experiments' format
    return config.get('epochs') == epochs and os.path.exists(
        os.path.join(folder, 'model.npz'))


def conflict(job, epochs):
    """Why ``job``'s folder cannot be used, or None."""
    info = read_json(os.path.join(job.folder, 'run.json'))
    if info is not None and info.get('config') != job.config:
        have = info.get('config') or {}
        differ = ', '.join(
            '{} {!r} there, {!r} now'.format(k, have.get(k), job.config.get(k))
            for k in sorted(set(have) | set(job.config))
            if have.get(k) != job.config.get(k))
        return ('{} was made with other settings ({}); use another --out or '
                'remove that folder'.format(job.folder,
                                            differ or 'unreadable'))
    final = read_final(job.folder)
    if final and final.get('final_epoch', 0) > epochs:
        return ('{} already trained {} epochs, more than --epoch {}; use '
                'another --out or remove that folder'.format(
                    job.folder, final['final_epoch'], epochs))
    return None


def sweep(jobs, epochs, train, command, log=print, after_each=None):
    """Train every job not finished yet, in order: ``train(job)`` runs it
    in job.folder (loop.fit). Conflicting folders are refused first
    (RunConflict naming them all). run.json keeps the config, the command
    and the wall-clock seconds over all invocations. ``after_each()`` runs
    after every job (the tables are rewritten)."""
    problems = [p for p in (conflict(job, epochs) for job in jobs) if p]
    if problems:
        raise RunConflict('; '.join(problems), status=2)
    for job in jobs:
        if is_finished(job.folder, epochs):
            continue
        os.makedirs(job.folder, exist_ok=True)
        info = read_json(os.path.join(job.folder, 'run.json')) or {}
        info.update(config=job.config, command=command, epochs=epochs)
        info.setdefault('wall_seconds', 0.0)
        info.setdefault('invocations', 0)
        files.write_text(os.path.join(job.folder, 'run.json'),
                         json.dumps(info, indent=2) + '\n')
        log('=== {} trial {} in {}'.format(job.row, job.trial, job.folder))
        start = time.time()
        try:
            train(job)
        finally:
            info['wall_seconds'] += time.time() - start
            info['invocations'] += 1
            files.write_text(os.path.join(job.folder, 'run.json'),
                             json.dumps(info, indent=2) + '\n')
        if after_each is not None:
            after_each()


def finished(jobs, epochs):
    """[(job, final.json)] of the finished jobs."""
    return [(job, read_final(job.folder)) for job in jobs
            if is_finished(job.folder, epochs)]


def mean_std(values):
    """(mean, sample std (ddof=1; 0 for one value)), (None, None) for none."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def machine_description():
    return '{}, {} CPUs, Python {}'.format(
        platform.platform(), os.cpu_count(), platform.python_version())


def write_tables(out, meta, summary, markdown, runs=None):
    """OUT/results.json (meta, summary, runs) and OUT/table.md, atomically."""
    record = dict(meta=meta, summary=summary)
    if runs is not None:
        record['runs'] = runs
    files.write_text(os.path.join(out, 'results.json'),
                     json.dumps(record, indent=2) + '\n')
    files.write_text(os.path.join(out, 'table.md'), markdown)
