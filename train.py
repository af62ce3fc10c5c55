#!/usr/bin/env python
"""Train CapsNet (or the baseline CNN) on MNIST or Fashion-MNIST.

    python train.py -g 0 --save model --reconstruct   # GPU 0 (-d @cupy:0)
    python train.py --save model --reconstruct        # CPU (-d @numpy)

Read top to bottom like Chainer's examples/mnist/train_mnist.py: flags,
device, data, model, optimizer, iterators, updater, trainer, extensions,
resume, run. The updater and the project's own extensions are in
training_extensions.py; a snapshot is written every epoch and --resume /
--autoload continue from one.
"""
import json
import os

import numpy

import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import training
from chainer.training import extensions

import cli
import datasets
import devices
import model_io
import nets
import training_extensions as ext


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
    add('--batchsize', '-b', type=cli.positive_int, default=100,
        help='examples per training step')
    add('--epoch', '--epochs', '-e', type=cli.positive_int, default=30,
        help='epochs to train')
    add('--seed', '-s', type=cli.integer, default=0,
        help='seed of the initialisation, the shuffling and the shifts')
    add('--alpha', type=cli.positive_float, default=1e-3,
        help="Adam's learning rate")
    add('--decay', type=cli.fraction, default=0.95,
        help="per-epoch factor of Adam's alpha (1: constant)")
    add('--alpha-floor', type=cli.non_negative_float, default=1e-5,
        help='alpha never decays below this')
    add('--dataset', default='mnist', choices=datasets.dataset_names(),
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
    add('--leaky-slope', type=cli.number, default=0.01,
        help='slope of leaky_relu below 0')
    add('--share-weights', action='store_true',
        help='share W_ij over the 6x6 grid (the older implementation)')
    add('--input-size', type=cli.int_at_least(datasets.IMAGE_SIZE),
        default=datasets.IMAGE_SIZE,
        help='side of the (zero-padded) input images')
    add('--impl', default='auto', choices=['auto', 'fast', 'plain'],
        help='fast kernels (fast_ops: every layer on the CPU, the routing on '
             'the GPU) or stock Chainer functions (plain); auto: fast, except '
             'for the baseline on the GPU')
    add('--eval-batchsize', type=cli.positive_int, default=200,
        help='examples per evaluation step')
    add('--snapshot-keep', type=cli.positive_int, default=2,
        help='how many epoch snapshots to keep')
    add('--no-progress', action='store_true', help='hide the progress bar')
    return parser


def model_options(args):
    options = dict(routing=args.routing, reconstruct=args.reconstruct,
                   activation=args.activation, leaky_slope=args.leaky_slope,
                   share_weights=args.share_weights,
                   input_size=args.input_size)
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


def report_keys(model, validation):
    """The columns PrintReport shows."""
    keys = ['epoch', 'main/loss', 'main/margin_loss']
    if getattr(model, 'reconstruct', False):
        keys.append('main/reconstruction_loss')
    keys += ['main/accuracy', 'test/main/loss', 'test/main/accuracy']
    if validation is not None:
        keys.append('val/main/accuracy')
    return keys + ['alpha', 'elapsed_time']


def resume(trainer, args):
    """Load --resume (or, with --autoload, the newest snapshot in --out)
    into the trainer; one error line if it cannot be used."""
    path = args.resume
    if path is None and args.autoload:
        path = ext.newest_snapshot(args.out)
    if not path:
        return
    if not os.path.exists(path):
        hint = ' (-r is short for --resume; the routing count is ' \
               '--routing {})'.format(path) if path.isdigit() else ''
        cli.fail('snapshot {} does not exist; check --resume{}'
                 .format(path, hint))
    try:
        chainer.serializers.load_npz(path, trainer)
    except Exception as e:
        cli.fail('cannot resume from {} ({}: {}); it is not a snapshot of '
                 'this configuration'.format(
                     path, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else ''))
    print('resumed from {} at epoch {}'.format(path, trainer.updater.epoch))


def write_summary(args, model, n_params, train, validation, test, final):
    """Print the final and the lowest test error; write final.json."""
    summary = {'arch': args.arch, 'dataset': args.dataset,
               'options': model.options, 'epochs': args.epoch,
               'parameters': int(n_params), 'train_size': len(train),
               'validation_size': len(validation) if validation else 0,
               'test_size': len(test), 'seed': args.seed,
               'batchsize': args.batchsize}
    if final.history:
        last_epoch, last_acc = final.history[-1]
        best_epoch, best_acc = max(final.history, key=lambda h: h[1])
        summary.update(
            final_epoch=last_epoch, final_test_error=1 - last_acc,
            best_on_test_epoch=best_epoch, best_on_test_error=1 - best_acc)
        print('final-epoch test error: {:.2f}% (epoch {}, {} test examples)'
              .format(100 * (1 - last_acc), last_epoch, len(test)))
        print('lowest test error over epochs: {:.2f}% (epoch {}; chosen on '
              'the test set, so optimistic)'.format(100 * (1 - best_acc),
                                                    best_epoch))
    model_io.write_text(os.path.join(args.out, 'final.json'),
                        json.dumps(summary, indent=2) + '\n')


def main(argv=None):
    # Flags, and the output paths checked before anything is computed
    parser = build_parser()
    args = parser.parse_args(argv)
    device = devices.select_device(args)
    if args.impl == 'fast' and args.arch == 'baseline' and \
            device.xp is not numpy:
        parser.error("--impl fast: the baseline's fast kernels are CPU-only; "
                     'use --impl auto or plain on the GPU')
    cli.check_writable(args.out)
    if args.save:
        cli.check_writable(os.path.dirname(os.path.abspath(args.save)),
                           '--save')

    # Data: (train, validation or None, test) TupleDatasets
    try:
        train, validation, test = datasets.get_mnist_like(
            args.dataset, data_dir=args.data_dir, train_size=args.train_size,
            test_size=args.test_size, validation=args.validation,
            input_size=args.input_size)
    except datasets.DatasetError as e:
        cli.fail(str(e))

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
        len(train), len(validation) if validation else 0, len(test),
        args.dataset))
    model.to_device(device)

    # Optimizer
    optimizer = chainer.optimizers.Adam(alpha=args.alpha)
    optimizer.setup(model)

    # Iterators; the shuffling has its own random state (in the snapshots)
    order_random = numpy.random.RandomState(args.seed + 1)
    shift_random = numpy.random.RandomState(args.seed + 2)
    train_iter = chainer.iterators.SerialIterator(
        train, args.batchsize,
        order_sampler=chainer.iterators.ShuffleOrderSampler(order_random))
    test_iter = chainer.iterators.SerialIterator(
        test, args.eval_batchsize, repeat=False, shuffle=False)

    # Updater: shifts every training image by up to --max-shift pixels
    updater = ext.AugmentingUpdater(train_iter, optimizer, args.max_shift,
                                    shift_random, order_random, device)

    # Trainer
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    # Extensions: evaluation on the test set (and the validation set)
    trainer.extend(ext.ExactEvaluator(test_iter, model, device=device),
                   name='test')
    if validation is not None:
        val_iter = chainer.iterators.SerialIterator(
            validation, args.eval_batchsize, repeat=False, shuffle=False)
        trainer.extend(ext.ExactEvaluator(val_iter, model, device=device),
                       name='val')
        trainer.extend(ext.SaveBest(
            'val/main/accuracy', os.path.join(args.out,
                                              'model_best_val.npz')))
    # ... the learning rate's decay, and a stop on NaN
    if args.decay < 1:
        trainer.extend(extensions.ExponentialShift(
            'alpha', args.decay, target=args.alpha_floor),
            trigger=(1, 'epoch'))
    trainer.extend(extensions.FailOnNonNumber())
    trainer.extend(extensions.observe_value(
        'alpha', lambda t: t.updater.get_optimizer('main').alpha),
        trigger=(1, 'epoch'))
    # ... a snapshot every epoch, which records the options it was made with
    trainer.extend(extensions.snapshot(
        filename=ext.SNAPSHOT_NAME, n_retains=args.snapshot_keep),
        trigger=(1, 'epoch'))
    trainer.extend(ext.RecordOptions(dict(
        model.options, arch=args.arch, dataset=args.dataset)),
        name='options')
    # ... the log, the test accuracy history, plots and the printed report
    trainer.extend(extensions.LogReport())
    final = ext.FinalReport('test/main/accuracy')
    trainer.extend(final)
    if extensions.PlotReport.available():
        trainer.extend(extensions.PlotReport(
            ['main/loss', 'test/main/loss'], 'epoch', file_name='loss.png'))
        trainer.extend(extensions.PlotReport(
            ['main/accuracy', 'test/main/accuracy'], 'epoch',
            file_name='accuracy.png'))
    trainer.extend(extensions.PrintReport(report_keys(model, validation)))
    if not args.no_progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))

    # Resume from --resume, or the newest snapshot with --autoload
    resume(trainer, args)

    # Run
    trainer.run()

    # Save the model and the summary
    if args.save:
        model_io.save_model(args.save, model)
        print('model saved to {}'.format(args.save))
    write_summary(args, model, n_params, train, validation, test, final)


if __name__ == '__main__':
    main()
