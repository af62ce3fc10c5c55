"""The one training loop: Chainer's Trainer, built in the steps of
Chainer's examples/mnist/train_mnist.py. ``train.py`` spells the steps out;
``fit`` runs the same steps for the experiments (Table 1, MultiMNIST, the
affine test), so every training in the project is this loop, with one
snapshot format (capsnet.training.snapshots) and one run folder layout:

    OUT/log, OUT/loss.png, OUT/accuracy.png, OUT/error.png   the reports
    OUT/snapshot_epoch_N                                    every epoch
    OUT/model.npz                                           the trained model
    OUT/final.json                                          settings, results
"""
import contextlib
import errno
import json
import os

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import training
from chainer.training import extensions

from capsnet import cli, devices, files
from capsnet.errors import CapsNetError
from capsnet.training import distributed, plots, snapshots, static_step
from capsnet.training import extensions as ext

PAPER_ERROR_PCT = 0.25  # Table 1, CapsNet r = 3 with reconstruction


# -- output folders ---------------------------------------------------------

@contextlib.contextmanager
def run_folder(settings, comm=None, tool='train.py'):
    """``with run_folder(settings) as out``: the run's folder (under MPI
    this rank's), checked before anything is computed (``prepare_out``)
    and locked; unlocked at the end, and removed again if the run failed
    before writing anything there (no empty folders left behind)."""
    deepest = settings.out if comm is None else \
        distributed.rank_folder(settings.out, comm)
    made, folder = [], os.path.abspath(deepest)
    while not os.path.exists(folder):   # the folders this run will make
        made.append(folder)
        folder = os.path.dirname(folder)
    out, lock = prepare_out(settings, comm, tool)
    try:
        yield out
    except BaseException:
        files.unlock(lock)
        for folder in made:   # deepest first
            try:
                os.rmdir(folder)   # only if empty
            except OSError:
                pass
        raise
    files.unlock(lock)


def prepare_out(settings, comm=None, tool='train.py'):
    """Check ``settings.out`` (and under MPI this rank's folder) before
    anything is computed: writable, not another run's (unless this run
    continues it), locked for this process, with what interrupted writes of
    this project left there removed. Returns (folder of this rank, lock)."""
    out = settings.out if comm is None else \
        distributed.rank_folder(settings.out, comm)
    resuming = bool(settings.autoload or settings.resume)
    problem = None
    try:
        if settings.save:
            if os.path.isdir(settings.save):
                cli.fail('--save {} is a folder; give a file name, e.g. {}'
                         .format(settings.save,
                                 os.path.join(settings.save, 'model')))
            cli.check_writable(os.path.dirname(os.path.abspath(
                settings.save)), '--save')
        cli.check_writable(settings.out)
        cli.check_writable(out)
        files.check_fresh_out(settings.out, resuming)
    except CapsNetError as e:
        if comm is None:
            raise
        problem = e
    if comm is not None:   # every rank agrees before anything is written
        distributed.check_all(comm, problem)
    lock = files.lock_folder(out, tool)
    for path in files.remove_leftovers(out):
        print('removed {}, left by an interrupted write'.format(path))
    return out, lock


# -- the Trainer's pieces, in train_mnist.py's order ------------------------

def make_optimizer(model, settings, comm=None):
    """Adam (under MPI: gradients averaged over the ranks, and every rank
    starts from rank 0's weights)."""
    optimizer = chainer.optimizers.Adam(alpha=settings.alpha)
    if comm is None:
        optimizer.setup(model)
        return optimizer
    return distributed.optimizer(optimizer, comm, model)


def make_iterators(settings, train, evaluations, comm=None):
    """The shuffled training iterator, its order's random state (in the
    snapshots; one per rank under MPI), and one iterator per evaluation set
    ({name: dataset}, None sets left out)."""
    rank = [] if comm is None else [comm.rank]
    order_random = numpy.random.RandomState([settings.seed + 1] + rank)
    train_iter = ext.BatchIterator(
        train, settings.batchsize,
        order_sampler=chainer.iterators.ShuffleOrderSampler(order_random))
    eval_iters = {name: ext.BatchIterator(
        data, settings.eval_batchsize, repeat=False, shuffle=False)
        for name, data in evaluations.items() if data is not None}
    return train_iter, order_random, eval_iters


def make_updater(train_iter, order_random, optimizer, settings, device,
                 comm=None):
    """The updater: every training image shifted by up to --max-shift
    pixels, from its own random state (in the snapshots)."""
    rank = [] if comm is None else [comm.rank]
    shift_random = numpy.random.RandomState([settings.seed + 2] + rank)
    if settings.cuda_graph:   # the same step, static (and captured on GPU)
        schedule = static_step.Schedule(
            settings.alpha, settings.decay, settings.decay_steps,
            settings.alpha_floor, batchsize=settings.batchsize,
            train_size=len(train_iter.dataset))
        return static_step.StaticUpdater(
            train_iter, optimizer, settings.max_shift, shift_random,
            order_random, device, schedule, cuda_graph=True)
    return ext.AugmentingUpdater(train_iter, optimizer, settings.max_shift,
                                 shift_random, order_random, device)


def extend(trainer, settings, model, eval_iters, device, comm=None,
           options=None, chunk=None, final_key='test/main/accuracy'):
    """The extensions: evaluation of every set (the test set under MPI over
    every rank's shard), the best model on the validation set, the
    learning-rate schedule, the divergence check, a snapshot every epoch
    that records the options and settings it was made with, and (rank 0)
    the log, plots and printed report. Returns the FinalReport, which
    keeps ``final_key`` per epoch."""
    root = comm is None or comm.rank == 0
    for name, iterator in eval_iters.items():
        if comm is not None and name != 'val':
            evaluator = distributed.MultiNodeExactEvaluator(
                comm, iterator, model, device=device, chunk=chunk)
        elif settings.cuda_graph:   # a captured forward pass on a GPU
            evaluator = static_step.StaticEvaluator(
                iterator, model, device=device, chunk=chunk, cuda_graph=True)
        else:   # every rank evaluates the whole validation set
            evaluator = ext.ExactEvaluator(iterator, model, device=device,
                                           chunk=chunk)
        trainer.extend(evaluator, name=name)
    if 'val' in eval_iters and root:
        trainer.extend(ext.SaveBest('val/main/accuracy', os.path.join(
            settings.out, 'model_best_val.npz')))
    # ... the learning rate's schedule, and a stop on NaN
    if settings.decay < 1 and settings.decay_steps:
        trainer.extend(ext.StepDecay('alpha', settings.alpha, settings.decay,
                                     settings.decay_steps,
                                     settings.alpha_floor))
    elif settings.decay < 1:
        trainer.extend(extensions.ExponentialShift(
            'alpha', settings.decay, target=settings.alpha_floor),
            trigger=(1, 'epoch'))
    if not settings.cuda_graph:   # the static step checks once an epoch
        trainer.extend(ext.FailOnNonNumber())
    # ... the seconds of training steps and of the rest, per epoch
    trainer.extend(static_step.EpochTimer())
    trainer.extend(extensions.observe_value(
        'alpha', lambda t: t.updater.get_optimizer('main').alpha),
        trigger=(1, 'epoch'))
    # ... a snapshot every epoch, which records what it was made with
    trainer.extend(extensions.snapshot(
        filename=ext.SNAPSHOT_NAME, n_retains=settings.snapshot_keep,
        writer=snapshots.AtomicSnapshotWriter()), trigger=(1, 'epoch'))
    if settings.snapshot_every:   # a long epoch resumes mid-way
        trainer.extend(extensions.snapshot(
            filename=ext.SNAPSHOT_NAME, n_retains=settings.snapshot_keep,
            writer=snapshots.AtomicSnapshotWriter()), name='snapshot_steps',
            trigger=(settings.snapshot_every, 'iteration'))
    trainer.extend(ext.RecordOptions(dict(
        options or model.options, arch=model.arch,
        dataset=settings.dataset)), name='options')
    trainer.extend(ext.RecordOptions(settings.recorded(), what='settings',
                                     allow_missing=True), name='settings')
    final = ext.FinalReport(final_key)
    trainer.extend(final)
    if root:
        add_reports(trainer, settings, model, eval_iters,
                    final_key.split('/')[0])
    return final


def report_keys(model, eval_iters):
    """The columns the printed report shows."""
    keys = ['epoch', 'main/loss']
    if model.arch.startswith('capsnet'):
        keys.append('main/margin_loss')
    if getattr(model, 'reconstruct', False):
        keys.append('main/reconstruction_loss')
    keys.append('main/accuracy')
    for name in eval_iters:
        keys += (['{}/main/loss'.format(name)] if name == 'test' else [])
        keys.append('{}/main/accuracy'.format(name))
    return keys + ['alpha', 'time/train', 'time/other', 'elapsed_time']


def add_reports(trainer, settings, model, eval_iters, final_set='test'):
    """The log; the plots: error.png (``final_set``'s error in % per
    epoch, log scale, with the paper's 0.25% on MNIST), loss.png and
    accuracy.png; the printed report (a line per epoch, without terminal
    codes when stdout is not a terminal) and, on a terminal, the progress
    bar."""
    trainer.extend(extensions.LogReport())
    names = list(eval_iters)
    key = '{}/main/accuracy'.format(final_set)
    single_mnist = model.arch in ('capsnet', 'baseline') and \
        settings.dataset == 'mnist' and settings.input_size == 28
    trainer.extend(plots.ErrorPlot(
        key=key, reference=PAPER_ERROR_PCT if single_mnist else None))
    trainer.extend(plots.LossPlot(keys=['main/loss'] + [
        '{}/main/loss'.format(n) for n in names]))
    trainer.extend(plots.AccuracyPlot(keys=['main/accuracy'] + [
        '{}/main/accuracy'.format(n) for n in names]))
    trainer.extend(plots.PrintReport(report_keys(model, eval_iters)))
    if not settings.no_progress and cli.interactive():
        trainer.extend(extensions.ProgressBar(update_interval=10))


# -- running it -------------------------------------------------------------

def run(trainer, settings, n_parameters):
    """trainer.run(); a full disk and a diverging run are one line each,
    naming what to do next (the last snapshot is intact)."""
    try:
        trainer.run(show_loop_exception_msg=False)
    except cli.DiskFullError as e:  # a snapshot, a plot or the best model
        newest = ext.newest_snapshot(settings.out)
        cli.fail('{}{}'.format(e, '; then continue with --autoload from {}'
                               .format(newest) if newest else ''))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        newest = ext.newest_snapshot(settings.out)
        cli.fail('no space left on the disk while writing {} (a snapshot '
                 'needs about {}); free some space and continue with '
                 '--autoload{}'.format(
                     e.filename or 'the log or the plots in ' + settings.out,
                     cli.megabytes(snapshots.snapshot_bytes(n_parameters)),
                     ' from {}'.format(newest) if newest else ''))
    except RuntimeError as e:
        if 'diverge' not in str(e):
            raise
        cli.fail('training diverged: a parameter became NaN or inf (found '
                 'at epoch {}, iteration {}); try a lower --alpha (now {}), '
                 'or --resume from an earlier snapshot in {} with a lower '
                 '--alpha'.format('{:.2f}'.format(
                     trainer.updater.epoch_detail),
                     trainer.updater.iteration, settings.alpha, settings.out))


def counted_error(accuracy, n):
    """(errors, error) over ``n`` examples from their mean accuracy: the
    count of errors, rounded to a whole example, and errors / n, so that
    final.json holds 0.0059 and not 1 - 0.9941 = 0.005900000000000016
    (the accuracy is a float32 mean)."""
    errors = int(round((1 - accuracy) * n))
    return errors, errors / n


def finish(settings, model, final, sizes, n_parameters, resumed_from=None,
           comm=None, log=print, extra=None):
    """Write the model (OUT/model.npz, or the --save file) and
    OUT/final.json, say the final and the lowest test error; returns the
    summary."""
    model_path = settings.save or os.path.join(settings.out, 'model.npz')
    files.save_model(model_path, model)
    log('model saved to {}'.format(model_path))
    train_size, validation_size, test_size = sizes
    summary = dict(settings.record(), options=model.options,
                   parameters=int(n_parameters), train_size=train_size,
                   validation_size=validation_size, test_size=test_size,
                   epochs=settings.epoch, model=model_path)
    summary.update(extra or {})
    if resumed_from:
        summary['resumed_from'] = resumed_from
    if comm is not None:
        summary.update(processes=comm.size,
                       global_batchsize=comm.size * settings.batchsize)
    if final.history:
        last_epoch, last_acc = final.history[-1]
        best_epoch, best_acc = max(final.history, key=lambda h: h[1])
        last_errors, last_error = counted_error(last_acc, test_size)
        best_errors, best_error = counted_error(best_acc, test_size)
        summary.update(
            final_epoch=last_epoch, final_test_error=last_error,
            final_test_errors=last_errors, best_on_test_epoch=best_epoch,
            best_on_test_error=best_error, best_on_test_errors=best_errors,
            history=[dict(epoch=e, test_accuracy=a)
                     for e, a in final.history])
        log('final-epoch test error: {:.2f}% ({} of {} test examples, '
            'epoch {})'.format(100 * last_error, last_errors, test_size,
                               last_epoch))
        log('lowest test error over epochs: {:.2f}% ({} errors, epoch {}; '
            'chosen on the test set, so optimistic)'.format(
                100 * best_error, best_errors, best_epoch))
    files.write_text(os.path.join(settings.out, 'final.json'),
                     json.dumps(summary, indent=2) + '\n')
    return summary


def fit(settings, model, train, evaluations, device, log=print,
        final_set='test', extra=None):
    """Train ``model`` as train.py does, in process, in ``settings.out``:
    the same steps, snapshots and files. ``evaluations``: {name: dataset}
    evaluated after every epoch (``final_set`` is the one final.json
    reports).
    Continues from the newest snapshot with ``settings.autoload``. Returns
    the summary written to final.json."""
    with run_folder(settings, tool='experiments.py') as out:
        return _fit(settings, model, train, evaluations, device, out, log,
                    final_set, extra)


def _fit(settings, model, train, evaluations, device, out, log, final_set,
         extra):
    n_parameters = sum(p.size for p in model.params())
    cli.check_free_space(out, 2 * snapshots.snapshot_bytes(n_parameters),
                         'the snapshots')
    chunk = devices.inference_batch(model, settings.eval_batchsize, say=log)
    model.to_device(device)
    optimizer = make_optimizer(model, settings)
    train_iter, order_random, eval_iters = make_iterators(
        settings, train, evaluations)
    updater = make_updater(train_iter, order_random, optimizer, settings,
                           device)
    trainer = training.Trainer(updater, (settings.epoch, 'epoch'), out=out)
    final = extend(trainer, settings, model, eval_iters, device, chunk=chunk,
                   final_key='{}/main/accuracy'.format(final_set))
    resumed_from = snapshots.resume(trainer, settings.resume,
                                    settings.autoload, out, settings.epoch,
                                    log=log)
    run(trainer, settings, n_parameters)
    summary = finish(settings, model, final, (
        len(train), 0, len(evaluations[final_set])), n_parameters,
        resumed_from, log=log, extra=extra)
    return summary
