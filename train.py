#!/usr/bin/env python
"""Train CapsNet (or the baseline CNN) on MNIST or Fashion-MNIST.

    python train.py -g 0 --save model --reconstruct   # GPU 0 (-d @cupy:0)
    python train.py --save model --reconstruct        # CPU (-d @numpy)

Read top to bottom like Chainer's examples/mnist/train_mnist.py: flags,
device, data, model, optimizer, iterators, updater, trainer, extensions,
resume, run. The updater and the project's own extensions are in
capsnet/training/extensions.py; a snapshot is written every epoch and --resume /
--autoload continue from one.
"""
import errno
import json
import os
import sys
import zipfile
import zlib

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import training
from chainer.training import extensions

from capsnet.data import mnist
from capsnet import devices
from capsnet.training import distributed
from capsnet.kernels import convolution, routing
from capsnet import files
import nets
from capsnet.training import extensions as ext
from chainer.training.extensions import snapshot_writers

INTERRUPTED = 'interrupted; resume with --autoload'

# The training settings of each recipe (the model's are nets.RECIPES); a
# flag given on the command line wins. 'official' follows the authors'
# experiment.py: train() reads batches of 128, and default_hparams() with
# models/model.py decay Adam's 1e-3 by 0.96 ** (step / 2000), no floor.
RECIPE_SETTINGS = {
    'paper': dict(batchsize=100, decay=0.95, decay_steps=None,
                  alpha_floor=1e-5),
    'official': dict(batchsize=128, decay=0.96, decay_steps=2000,
                     alpha_floor=0.0),
}


def apply_recipe(args):
    """Fill the settings left unset on the command line from --recipe."""
    for key, value in RECIPE_SETTINGS[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def build_parser():
    parser = cli.ArgumentParser(
        description='Train CapsNet (Sabour et al. 2017) or the baseline CNN '
                    'on MNIST or Fashion-MNIST')
    add = parser.add_argument
    cli.add_device_arguments(parser)
    add('--save', default=None, help='write the trained model to this file')
    add('--out', '-o', default='result',
        help='folder for the log, plots and snapshots')
    add('--resume', '-r', default=None,
        help='continue from this snapshot (a snapshot_epoch_N in --out)')
    add('--autoload', action='store_true',
        help='continue from the newest snapshot in --out, if any')
    add('--recipe', default='paper', choices=sorted(RECIPE_SETTINGS),
        help="paper: the paper as written; official: the authors' released "
             'code (loss scaling, learning-rate schedule and batch, '
             'initialisation and biases; docs/model.md)')
    add('--batchsize', '-b', type=cli.positive_int, default=None,
        help='examples per training step (paper recipe: 100, official: '
             '128)')
    add('--epoch', '--epochs', '-e', type=cli.positive_int, default=30,
        help='epochs to train')
    add('--seed', '-s', type=cli.seed, default=0,
        help='seed of the initialisation, the shuffling and the shifts')
    add('--alpha', type=cli.positive_float, default=1e-3,
        help="Adam's learning rate")
    add('--decay', type=cli.fraction, default=None,
        help="factor of Adam's alpha per epoch, or per --decay-steps steps "
             '(1: constant; paper recipe: 0.95 per epoch, official: 0.96 '
             'per 2000 steps)')
    add('--decay-steps', type=cli.positive_int, default=None,
        help='decay alpha continuously, by --decay every this many steps '
             "(the authors' schedule), instead of once per epoch")
    add('--alpha-floor', type=cli.non_negative_float, default=None,
        help='alpha never decays below this (paper recipe: 1e-5, '
             'official: 0)')
    add('--dataset', default='mnist', choices=mnist.dataset_names(),
        help='which dataset (its test set for the evaluation)')
    add('--data-dir', default=None,
        help='read the four *-ubyte.gz files from here (no download)')
    add('--train-size', type=cli.positive_int, default=None,
        help='use the first N training examples (default: all)')
    add('--test-size', type=cli.positive_int, default=None,
        help='use the first N test examples (default: all)')
    add('--validation', type=cli.non_negative_int, default=0,
        help='hold out the last N training examples to choose a best model')
    add('--max-shift', type=cli.non_negative_int, default=2,
        help='training images are shifted by up to this many pixels')
    add('--arch', default='capsnet',
        choices=sorted(nets.SINGLE_DIGIT_ARCHITECTURES),
        help='network to train')
    add('--routing', type=cli.positive_int, default=3,
        help='routing iterations r (-r is --resume, as in Chainer)')
    add('--reconstruct', '--recon', action='store_true',
        help='add the decoder and its 0.0005-scaled reconstruction loss')
    add('--activation', default='relu', choices=['relu', 'leaky_relu'],
        help='Conv1 activation')
    add('--leaky-slope', type=cli.number_in(-1, 1), default=0.01,
        help='slope of leaky_relu below 0')
    add('--share-weights', action='store_true',
        help='share W_ij over the 6x6 grid (the older implementation)')
    add('--input-size', type=cli.int_at_least(mnist.IMAGE_SIZE),
        default=mnist.IMAGE_SIZE,
        help='side of the (zero-padded) input images')
    add('--impl', default='auto', choices=['auto', 'fast', 'plain'],
        help='fast kernels (fast_ops: every layer on the CPU, all but the '
             'convolutions on the GPU) or stock Chainer functions (plain); '
             'auto: fast, except for the baseline on the GPU')
    cli.add_gpu_fast_path_arguments(parser)
    add('--eval-batchsize', type=cli.positive_int, default=200,
        help='examples per evaluation step')
    add('--snapshot-keep', type=cli.positive_int, default=2,
        help='how many epoch snapshots to keep')
    add('--no-progress', action='store_true', help='hide the progress bar')
    add('--communicator', default=None, choices=distributed.COMMUNICATORS,
        help='data-parallel training with ChainerMN over MPI, launched as '
             'mpiexec -n N python train.py --communicator naive ...; -b is '
             'then the batch of each process (naive on the CPU; pure_nccl, '
             'flat, ... on GPUs, one per process)')
    return parser


def model_options(args):
    options = dict(routing=args.routing, reconstruct=args.reconstruct,
                   activation=args.activation, leaky_slope=args.leaky_slope,
                   share_weights=args.share_weights,
                   input_size=args.input_size, **nets.RECIPES[args.recipe])
    if args.arch != 'capsnet':
        options = dict(input_size=args.input_size)
    return options


def build_model(args):
    options = model_options(args)
    try:
        model = nets.ARCHITECTURES[args.arch](**options)
    except ValueError as e:
        cli.fail(str(e))
    model.fast = {'auto': None, 'fast': True, 'plain': False}[args.impl]
    return model


def memory_estimate(args):
    """Rough bytes a training run needs (parameters with their gradients and
    Adam's two moments, plus one step's and one evaluation batch's
    activations), from the shapes alone: nothing is allocated. The
    evaluation batch counts at most devices.INFERENCE_SHARE of the memory:
    a larger one is evaluated in chunks (devices.inference_batch)."""
    side = args.input_size
    if args.arch == 'capsnet':
        grid = nets.primary_grid(side)
        n_primary = 32 * grid * grid
        params = (256 * 81 + 256 * 256 * 81 + 10 * 16 * 8 *
                  (32 if args.share_weights else n_primary))
        if args.reconstruct:
            params += 160 * 512 + 512 * 1024 + 1024 * side * side
        per_example = 4 * (8 * n_primary * 160 + 3 * 256 * (side - 8) ** 2 +
                           2 * side * side)
    else:
        params = 128 * side * side * 328 + 256 * 256 * 25 + 256 * 128 * 25
        per_example = 4 * 3 * (256 + 256 + 128 + 1) * side * side
    evaluation = per_example // 2 * args.eval_batchsize
    memory = devices.physical_memory()
    if memory:
        evaluation = min(evaluation, int(memory * devices.INFERENCE_SHARE))
    return 16 * params + per_example * args.batchsize + evaluation


def check_memory(args):
    """Refuse up front a configuration that cannot fit in memory."""
    need, have = memory_estimate(args), devices.physical_memory()
    if have and need > have:
        cli.fail('this configuration needs about {:.1f} GB of memory (--arch '
                 '{}, --input-size {}, --batchsize {}) and the machine has '
                 '{:.1f} GB; lower --input-size or --batchsize'.format(
                     need / 1e9, args.arch, args.input_size, args.batchsize,
                     have / 1e9))


def snapshot_bytes(model):
    """Bytes of one snapshot (uncompressed): the parameters, Adam's two
    moments and a little state."""
    return 3 * 4 * nets.count_parameters(model) + (1 << 20)


class AtomicSnapshotWriter(snapshot_writers.Writer):
    """Snapshots through files.atomic_write: a full disk is one line
    naming the file and the space it needs, an interrupt leaves no
    temporary folder, and the previous snapshot stays intact."""

    def __call__(self, filename, outdir, target):
        # uncompressed: zlib took 2.85 s per snapshot of the paper's model
        # on this project's CPU for a file 11% smaller (84 against 94 MB),
        # most of an epoch's overhead on a GPU (docs/gpu.md)
        files.atomic_write(
            os.path.join(outdir, filename),
            lambda f: chainer.serializers.save_npz(f, target,
                                                   compression=False))
        self._post_save()


def report_keys(model, validation):
    """The columns PrintReport shows."""
    keys = ['epoch', 'main/loss', 'main/margin_loss']
    if getattr(model, 'reconstruct', False):
        keys.append('main/reconstruction_loss')
    keys += ['main/accuracy', 'test/main/loss', 'test/main/accuracy']
    if validation is not None:
        keys.append('val/main/accuracy')
    return keys + ['alpha', 'elapsed_time']


DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def readable_snapshot(path):
    """None if every array of the snapshot at ``path`` reads (CRCs and
    all), else why not."""
    try:
        with files.open_npz(path) as npz:
            for name in npz.files:
                npz[name]
    except DAMAGED as e:
        return '{}: {}'.format(type(e).__name__, str(e).splitlines()[0]
                               if str(e) else '')
    return None


def autoload_path(out):
    """The newest intact snapshot in ``out`` (None if there is none); the
    damaged newer ones are skipped, and that is said."""
    found = ext.snapshots(out)
    for epoch in sorted(found, reverse=True):
        problem = readable_snapshot(found[epoch])
        if problem is None:
            return found[epoch]
        print('skipping the damaged snapshot {} ({})'.format(
            found[epoch], problem), flush=True)
    if found:
        print('no intact snapshot in {}; starting from epoch 0'.format(out),
              flush=True)
    return None


def check_recorded(trainer, path):
    """Compare the options and settings a snapshot recorded with this run's
    before loading it, so a conflict is named (and not found later as a
    shape error of some array)."""
    try:
        with files.open_npz(path) as npz:
            for name in ('options', 'settings'):
                trainer.get_extension(name).serialize(
                    chainer.serializers.NpzDeserializer(
                        npz, path='extensions/{}/'.format(name)))
    except ValueError as e:
        if 'in the snapshot' not in str(e):
            return  # not readable: load_npz below says so
        cli.fail('cannot resume from {}: {}'.format(path, e))
    except Exception:  # not readable: load_npz below says so
        return


def resume(trainer, args, comm=None):
    """Load --resume (or, with --autoload, the newest intact snapshot in
    --out) into the trainer; one error line if it cannot be used. Returns
    the path resumed from, or None. Under MPI each rank loads its own
    snapshot of the same epoch."""
    path = args.resume
    if comm is not None and path is not None:
        path = distributed.rank_path(comm, path)
    if path is None and args.autoload:
        path = autoload_path(args.out) if comm is None else \
            distributed.common_snapshot(
                comm, args.out, lambda p: readable_snapshot(p) is None)
    if not path:
        return None
    if not os.path.exists(path):
        hint = ' (-r is short for --resume; the routing count is ' \
               '--routing {})'.format(path) if path.isdigit() else ''
        cli.fail('snapshot {} does not exist; check --resume{}'
                 .format(path, hint))
    if os.path.isdir(path):
        newest = ext.newest_snapshot(path)
        cli.fail('--resume {} is a folder; pass a snapshot file{}'.format(
            path, ' (the newest there is {}), or continue with --out {} '
            '--autoload'.format(newest, path) if newest else
            ' (snapshot_epoch_N in the --out of a run)'))
    check_recorded(trainer, path)
    try:
        with open(path, 'rb') as f:  # closed even if the file is damaged
            chainer.serializers.load_npz(f, trainer)
    except PermissionError as e:
        cli.fail('cannot read snapshot {} ({}); check its permissions'
                 .format(path, e.strerror or e))
    except Exception as e:
        cli.fail('cannot resume from {} ({}: {}); it is not a snapshot of '
                 'this configuration'.format(
                     path, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else ''))
    epoch = trainer.updater.epoch
    if epoch > args.epoch:
        cli.fail('{} is at epoch {}, beyond --epoch {}; pass --epoch {} or '
                 'more to continue it, or use another --out'.format(
                     path, epoch, args.epoch, epoch))
    print('resumed from {} at epoch {}'.format(path, epoch))
    return path


def run_settings(args):
    """The settings a snapshot fixes besides the network: resuming with
    others is refused (RecordOptions), so final.json holds what was used."""
    return dict(recipe=args.recipe, batchsize=args.batchsize, seed=args.seed,
                alpha=args.alpha, decay=args.decay,
                decay_steps=args.decay_steps, alpha_floor=args.alpha_floor,
                train_size=args.train_size, test_size=args.test_size,
                validation=args.validation, max_shift=args.max_shift)


def counted_error(accuracy, n):
    """(errors, error) over ``n`` examples from their mean accuracy: the
    count of errors, rounded to a whole example, and errors / n, so that
    final.json holds 0.0059 and not 1 - 0.9941 = 0.005900000000000016
    (the accuracy is a float32 mean)."""
    errors = int(round((1 - accuracy) * n))
    return errors, errors / n


def write_summary(args, model, n_params, sizes, validation, final,
                  resumed_from=None, comm=None):
    """Print the final and the lowest test error; write final.json."""
    train_size, test_size = sizes
    summary = {'arch': args.arch, 'dataset': args.dataset,
               'options': model.options, 'epochs': args.epoch,
               'parameters': int(n_params), 'train_size': train_size,
               'validation_size': len(validation) if validation else 0,
               'test_size': test_size, 'seed': args.seed,
               'recipe': args.recipe, 'batchsize': args.batchsize,
               'alpha': args.alpha, 'decay': args.decay,
               'decay_steps': args.decay_steps, 'alpha_floor': args.alpha_floor,
               'max_shift': args.max_shift,
               'eval_batchsize': args.eval_batchsize}
    if resumed_from:
        summary['resumed_from'] = resumed_from
    if comm is not None:
        summary.update(processes=comm.size, communicator=args.communicator,
                       global_batchsize=comm.size * args.batchsize)
    if final.history:
        last_epoch, last_acc = final.history[-1]
        best_epoch, best_acc = max(final.history, key=lambda h: h[1])
        last_errors, last_error = counted_error(last_acc, test_size)
        best_errors, best_error = counted_error(best_acc, test_size)
        summary.update(
            final_epoch=last_epoch, final_test_error=last_error,
            final_test_errors=last_errors, best_on_test_epoch=best_epoch,
            best_on_test_error=best_error, best_on_test_errors=best_errors)
        print('final-epoch test error: {:.2f}% ({} of {} test examples, '
              'epoch {})'.format(100 * last_error, last_errors, test_size,
                                 last_epoch))
        print('lowest test error over epochs: {:.2f}% ({} errors, epoch {}; '
              'chosen on the test set, so optimistic)'.format(
                  100 * best_error, best_errors, best_epoch))
    files.write_text(os.path.join(args.out, 'final.json'),
                        json.dumps(summary, indent=2) + '\n')


def main(argv=None):
    # Flags, and the output paths checked before anything is computed
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_recipe(args)
    gpu_pieces = [flag for flag, on in (('--gpu-kernels', args.gpu_kernels),
                                        ('--gpu-convolutions',
                                         args.gpu_convolutions)) if on]
    if gpu_pieces and (args.impl == 'plain' or
                       not args.arch.startswith('capsnet')):
        parser.error('{}: for the CapsNet fast path on the GPU; leave {} '
                     'out with --impl plain or a CNN --arch'.format(
                         ' and '.join(gpu_pieces),
                         'them' if len(gpu_pieces) > 1 else 'it'))
    routing.GPU_KERNELS = args.gpu_kernels
    convolution.GPU_CONVOLUTIONS = args.gpu_convolutions
    comm = None
    if args.communicator:   # MPI: this process is one rank of several
        args.device = cli.device_spec(args.device)
        comm = distributed.communicator(args.communicator, args.device)
        distributed.quiet_unless_root(comm)
        args.device = distributed.rank_device(comm, args.device)
    root = comm is None or comm.rank == 0
    # where this process keeps its snapshots (rank r > 0: --out/rank<r>)
    out = args.out if comm is None else distributed.rank_folder(args.out,
                                                                comm)
    device = devices.select_device(args)
    if args.impl == 'fast' and args.arch == 'baseline' and \
            device.xp is not numpy:
        parser.error("--impl fast: the baseline's fast kernels are CPU-only; "
                     'use --impl auto or plain on the GPU')
    if args.max_shift >= args.input_size:
        parser.error('argument --max-shift: must be an integer below '
                     '--input-size ({}), got {!r}'.format(
                         args.input_size, str(args.max_shift)))
    check_memory(args)
    if args.save is not None and not args.save.strip():
        parser.error('argument --save: needs a file name, got an empty one '
                     '(leave the flag out to keep no model file)')
    if args.save and os.path.isdir(args.save):
        cli.fail('--save {} is a folder; give a file name, e.g. {}'
                 .format(args.save, os.path.join(args.save, 'model')))
    cli.check_writable(args.out)
    cli.check_writable(out)
    if args.save:
        cli.check_writable(os.path.dirname(os.path.abspath(args.save)),
                           '--save')
    lock = files.lock_folder(out, 'train.py')
    for path in files.remove_leftovers(out):
        print('removed {}, left by an interrupted write'.format(path))

    # Data: (train, validation or None, test) TupleDatasets
    try:
        train, validation, test = mnist.get_mnist_like(
            args.dataset, data_dir=args.data_dir, train_size=args.train_size,
            test_size=args.test_size, validation=args.validation,
            input_size=args.input_size)
    except mnist.DatasetError as e:
        cli.fail(str(e))
    full_sizes = len(train), len(test)
    if comm is not None:   # each rank trains and tests on its own shard
        train, test = distributed.scatter(comm, train, test, args.seed)

    # Model, initialised from --seed, on the device (CuPy's generator too:
    # the baseline's dropout draws from it there)
    numpy.random.seed(args.seed)
    if device.xp is not numpy:
        device.xp.random.seed(args.seed)
    model = build_model(args)
    n_params = nets.count_parameters(model)
    print('{}: {} parameters ({})'.format(
        args.arch, '{:,}'.format(n_params), json.dumps(model.options)))
    print('train {} / validation {} / test {} examples of {}'.format(
        full_sizes[0], len(validation) if validation else 0, full_sizes[1],
        args.dataset))
    if comm is not None:
        print('{} processes ({} communicator), each with batch {} (global '
              'batch {}) and about {} training examples'.format(
                  comm.size, args.communicator, args.batchsize,
                  comm.size * args.batchsize, len(train)))
    # evaluation in chunks that fit in memory (said once if it splits)
    eval_chunk = devices.inference_batch(model, min(
        args.eval_batchsize, max(len(test), len(validation or ()))),
        say=print)
    model.to_device(device)
    # room for two snapshots and the model, checked before the long run
    cli.check_free_space(out, 2 * snapshot_bytes(model), 'the snapshots')

    # Optimizer (under MPI: gradients averaged over the ranks, and every
    # rank starts from rank 0's weights)
    optimizer = chainer.optimizers.Adam(alpha=args.alpha)
    if comm is None:
        optimizer.setup(model)
    else:
        optimizer = distributed.optimizer(optimizer, comm, model)

    # Iterators; the shuffling has its own random state (in the snapshots),
    # one per rank under MPI
    rank_seed = [] if comm is None else [comm.rank]
    order_random = numpy.random.RandomState([args.seed + 1] + rank_seed)
    shift_random = numpy.random.RandomState([args.seed + 2] + rank_seed)
    train_iter = chainer.iterators.SerialIterator(
        train, args.batchsize,
        order_sampler=chainer.iterators.ShuffleOrderSampler(order_random))
    test_iter = chainer.iterators.SerialIterator(
        test, args.eval_batchsize, repeat=False, shuffle=False)

    # Updater: shifts every training image by up to --max-shift pixels
    updater = ext.AugmentingUpdater(train_iter, optimizer, args.max_shift,
                                    shift_random, order_random, device)

    # Trainer
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=out)

    # Extensions: evaluation on the test set (under MPI over every rank's
    # shard) and the validation set
    if comm is None:
        trainer.extend(ext.ExactEvaluator(test_iter, model, device=device,
                                          chunk=eval_chunk), name='test')
    else:
        trainer.extend(distributed.MultiNodeExactEvaluator(
            comm, test_iter, model, device=device, chunk=eval_chunk),
            name='test')
    if validation is not None:
        val_iter = chainer.iterators.SerialIterator(
            validation, args.eval_batchsize, repeat=False, shuffle=False)
        trainer.extend(ext.ExactEvaluator(val_iter, model, device=device,
                                          chunk=eval_chunk),
                       name='val')   # every rank: the whole validation set
        if root:
            trainer.extend(ext.SaveBest(
                'val/main/accuracy', os.path.join(args.out,
                                                  'model_best_val.npz')))
    # ... the learning rate's decay, and a stop on NaN
    if args.decay < 1 and args.decay_steps:
        trainer.extend(ext.StepDecay('alpha', args.alpha, args.decay,
                                     args.decay_steps, args.alpha_floor))
    elif args.decay < 1:
        trainer.extend(extensions.ExponentialShift(
            'alpha', args.decay, target=args.alpha_floor),
            trigger=(1, 'epoch'))
    trainer.extend(ext.FailOnNonNumber())
    trainer.extend(extensions.observe_value(
        'alpha', lambda t: t.updater.get_optimizer('main').alpha),
        trigger=(1, 'epoch'))
    # ... a snapshot every epoch, which records the options it was made with
    trainer.extend(extensions.snapshot(
        filename=ext.SNAPSHOT_NAME, n_retains=args.snapshot_keep,
        writer=AtomicSnapshotWriter()), trigger=(1, 'epoch'))
    trainer.extend(ext.RecordOptions(dict(
        model.options, arch=args.arch, dataset=args.dataset)),
        name='options')
    trainer.extend(ext.RecordOptions(run_settings(args), what='settings',
                                     allow_missing=True), name='settings')
    # ... the log, the test accuracy history, plots and the printed report
    # (rank 0 alone under MPI)
    final = ext.FinalReport('test/main/accuracy')
    trainer.extend(final)
    if root:
        add_reports(trainer, args, model, validation)

    # Resume from --resume, or the newest snapshot with --autoload
    resumed_from = resume(trainer, args, comm)

    # Run (a divergence is one line; an interrupt keeps the last snapshot)
    try:
        trainer.run(show_loop_exception_msg=False)
    except cli.DiskFullError as e:  # a snapshot, a plot or the best model
        newest = ext.newest_snapshot(args.out)
        cli.fail('{}{}'.format(e, '; then continue with --autoload from {}'
                               .format(newest) if newest else ''))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        newest = ext.newest_snapshot(args.out)
        cli.fail('no space left on the disk while writing {} (a snapshot '
                 'needs about {}); free some space and continue with '
                 '--autoload{}'.format(
                     e.filename or 'the log or the plots in ' + args.out,
                     cli.megabytes(snapshot_bytes(model)),
                     ' from {}'.format(newest) if newest else ''))
    except RuntimeError as e:
        if 'diverge' not in str(e):
            raise
        cli.fail('training diverged: a parameter became NaN or inf (found '
                 'at epoch {}, iteration {}); try a lower --alpha (now {}), '
                 'or --resume from an earlier snapshot in {} with a lower '
                 '--alpha'.format('{:.2f}'.format(
                     trainer.updater.epoch_detail),
                     trainer.updater.iteration, args.alpha, args.out))

    # Save the model and the summary (rank 0 under MPI)
    if root:
        if args.save:
            files.save_model(args.save, model)
            print('model saved to {}'.format(args.save))
        write_summary(args, model, n_params, full_sizes, validation, final,
                      resumed_from, comm)
    files.unlock(lock)


def add_reports(trainer, args, model, validation):
    """The log, plots, the printed report and the progress bar."""
    trainer.extend(extensions.LogReport())
    if extensions.PlotReport.available():
        trainer.extend(ext.AtomicPlotReport(
            ['main/loss', 'test/main/loss'], 'epoch', file_name='loss.png'))
        trainer.extend(ext.AtomicPlotReport(
            ['main/accuracy', 'test/main/accuracy'], 'epoch',
            file_name='accuracy.png'))
    trainer.extend(extensions.PrintReport(report_keys(model, validation)))
    if not args.no_progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))


if __name__ == '__main__':
    sys.exit(cli.run_main(main, None, INTERRUPTED))
