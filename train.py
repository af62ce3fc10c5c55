#!/usr/bin/env python
"""Train CapsNet (or the baseline CNN) on MNIST or Fashion-MNIST.

    python train.py -g 0 --save model --reconstruct   # GPU 0
    python train.py --save model --reconstruct        # CPU (-g -1)

Shaped like Chainer's examples/mnist/train_mnist.py: a Trainer with an
Evaluator, LogReport, PrintReport, ProgressBar, PlotReport and a snapshot
every epoch that --resume / --autoload continue from.
"""
import argparse
import collections
import contextlib
import copy
import glob
import json
import os
import re

import numpy

import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import training
from chainer.training import extensions

import cli
import datasets
import nets


class AugmentingUpdater(training.updaters.StandardUpdater):
    """StandardUpdater that shifts each training image independently.

    Its random states (the shifts' and the iterator's shuffling) are part of
    the snapshot, so a resumed run draws what the uninterrupted run would.
    """

    def __init__(self, iterator, optimizer, max_shift, shift_random,
                 order_random, device):
        super().__init__(iterator, optimizer, device=device,
                         converter=self._convert)
        self.max_shift = max_shift
        self.shift_random = shift_random
        self.order_random = order_random

    def _convert(self, batch, device):
        x, t = chainer.dataset.concat_examples(batch)
        x = datasets.random_shift(x, self.max_shift, self.shift_random)
        return (chainer.dataset.to_device(device, x),
                chainer.dataset.to_device(device, t))

    def serialize(self, serializer):
        super().serialize(serializer)
        for name, state in (('shift_random', self.shift_random),
                            ('order_random', self.order_random)):
            serialize_random_state(serializer[name], state)


def serialize_random_state(serializer, random_state):
    """Save or restore a numpy RandomState (MT19937) through a serializer."""
    kind, keys, pos, has_gauss, gauss = random_state.get_state()
    keys = serializer('keys', keys)
    pos = serializer('pos', numpy.asarray(pos))
    has_gauss = serializer('has_gauss', numpy.asarray(has_gauss))
    gauss = serializer('gauss', numpy.asarray(gauss))
    random_state.set_state(
        (kind, numpy.asarray(keys, dtype=numpy.uint32), int(pos),
         int(has_gauss), float(gauss)))


def rate(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            'must be in (0, 1], got {}'.format(value))
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        description='CapsNet (Sabour et al. 2017) in Chainer')
    add = parser.add_argument
    cli.add_device_arguments(parser)
    add('--save', default=None, help='write the trained model to this file')
    add('--out', '-o', default='result',
        help='folder for the log, plots and snapshots')
    add('--resume', default=None, help='continue from this snapshot')
    add('--autoload', action='store_true',
        help='continue from the newest snapshot in --out, if any')
    add('--batchsize', '-b', type=cli.positive_int, default=100)
    add('--epoch', '-e', type=cli.positive_int, default=30)
    add('--seed', '-s', type=int, default=0)
    add('--alpha', type=float, default=1e-3, help="Adam's learning rate")
    add('--decay', type=rate, default=0.95,
        help="per-epoch factor of Adam's alpha (1: constant)")
    add('--alpha-floor', type=float, default=1e-5,
        help='alpha never decays below this')
    add('--dataset', default='mnist', choices=datasets.dataset_names())
    add('--data-dir', default=None,
        help='read the four *-ubyte.gz files from here (no download)')
    add('--train-size', type=cli.positive_int, default=None,
        help='use the first N training examples')
    add('--test-size', type=cli.positive_int, default=None,
        help='use the first N test examples')
    add('--validation', type=cli.non_negative_int, default=0,
        help='hold out the last N training examples to choose a best model')
    add('--max-shift', type=cli.non_negative_int, default=2,
        help='training images are shifted by up to this many pixels')
    add('--arch', default='capsnet', choices=sorted(nets.ARCHITECTURES),
        help='network to train')
    add('--routing', '-r', type=cli.positive_int, default=3,
        help='routing iterations r')
    add('--reconstruct', '--recon', action='store_true',
        help='add the decoder and its 0.0005-scaled reconstruction loss')
    add('--activation', default='relu', choices=['relu', 'leaky_relu'],
        help='Conv1 activation')
    add('--leaky-slope', type=float, default=0.01)
    add('--share-weights', action='store_true',
        help='share W_ij over the 6x6 grid (the older implementation)')
    add('--input-size', type=int, default=28,
        help='side of the (zero-padded) input images')
    add('--impl', default='auto', choices=['auto', 'fast', 'plain'],
        help='fast kernels (fast_ops: every layer on the CPU, the routing on '
             'the GPU) or stock Chainer functions (plain); auto: fast, except '
             'for the baseline on the GPU')
    add('--eval-batchsize', type=cli.positive_int, default=200)
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
    if hasattr(model, 'fast'):
        model.fast = {'auto': None, 'fast': True, 'plain': False}[args.impl]
    return model


def newest_snapshot(out):
    """Path of the snapshot with the highest epoch in ``out``, or None."""
    found = []
    for path in glob.glob(os.path.join(out, 'snapshot_epoch_*')):
        match = re.search(r'snapshot_epoch_(\d+)$', path)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


class RecordOptions(training.Extension):
    """Keeps the network's and the data's options in every snapshot.

    Most options leave the parameter shapes alone (W has the same shape for
    every routing count r), so a snapshot would otherwise load silently into
    a differently configured run. Loading one made with other options raises
    ValueError naming the differences.
    """
    trigger = 1, 'epoch'

    def __init__(self, options):
        self.options = options

    def __call__(self, trainer):
        pass

    def serialize(self, serializer):
        if not isinstance(serializer, chainer.serializer.Deserializer):
            serializer('options', numpy.asarray(
                json.dumps(self.options, sort_keys=True)))
            return
        try:
            stored = json.loads(str(serializer('options', None)[()]))
        except KeyError:
            return  # a snapshot from before options were recorded
        differences = ['{}={} in the snapshot, {} asked'.format(
            key, stored.get(key), self.options.get(key))
            for key in sorted(set(stored) | set(self.options))
            if stored.get(key) != self.options.get(key)]
        if differences:
            raise ValueError(
                'the snapshot was made with other options: {}; resume with '
                'the same flags or use another --out'.format(
                    ', '.join(differences)))


class FixedWeightsEvaluator(extensions.Evaluator):
    """Evaluator whose means are weighted by batch size, so the accuracy is
    the exact fraction of correct examples even when the last batch is
    short. It also tells the model that its weights are fixed for the pass,
    so the fast CPU kernels can reuse their weight transforms."""

    def evaluate(self):
        iterator = self._iterators['main']
        model = self._targets['main']
        if hasattr(iterator, 'reset'):
            iterator.reset()
            it = iterator
        else:
            it = copy.copy(iterator)
        summaries = collections.defaultdict(chainer.reporter.Summary)
        inference = getattr(model, 'inference', contextlib.nullcontext)
        with inference(), chainer.using_config('train', False), \
                chainer.no_backprop_mode():
            for batch in it:
                x, t = chainer.dataset.convert._call_converter(
                    self.converter, batch, self.device)
                observation = {}
                with chainer.reporter.report_scope(observation):
                    (self.eval_func or model)(x, t)
                for key, value in observation.items():
                    summaries[key].add(value, weight=len(batch))
        return {key: summary.compute_mean()
                for key, summary in summaries.items()}


class FinalReport(training.Extension):
    """Remember the last and the best (on the test set) test accuracy."""

    trigger = (1, 'epoch')
    priority = training.PRIORITY_READER

    def __init__(self, key):
        self.key = key
        self.history = []

    def __call__(self, trainer):
        value = trainer.observation.get(self.key)
        if value is not None:
            self.history.append((trainer.updater.epoch, float(value)))

    def serialize(self, serializer):
        if isinstance(serializer, chainer.serializer.Deserializer):
            # its length varies, so read it whole instead of into an array
            history = serializer('history', None)
        else:
            history = serializer('history', numpy.asarray(
                self.history, dtype=numpy.float64).reshape(-1, 2))
        self.history = [(int(e), float(a)) for e, a in
                        numpy.asarray(history).reshape(-1, 2)]


class SaveBest(training.Extension):
    """Save the model whenever the held-out validation accuracy improves."""

    trigger = (1, 'epoch')
    priority = training.PRIORITY_READER

    def __init__(self, key, path):
        self.key, self.path, self.best = key, path, -1.0

    def __call__(self, trainer):
        value = trainer.observation.get(self.key)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            nets.save_model(self.path, trainer.updater.get_optimizer(
                'main').target)

    def serialize(self, serializer):
        self.best = float(serializer('best', self.best))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input_size < 28:
        parser.error('--input-size must be >= 28, got {}'
                     .format(args.input_size))
    device = cli.select_device(args)
    if args.impl == 'fast' and args.arch == 'baseline' and \
            device.xp is not numpy:
        parser.error("--impl fast: the baseline's fast kernels are CPU-only; "
                     'use --impl auto or plain on the GPU')
    cli.check_writable(args.out)
    if args.save:
        cli.check_writable(os.path.dirname(os.path.abspath(args.save)),
                           '--save')

    try:
        train, validation, test = datasets.get_mnist_like(
            args.dataset, data_dir=args.data_dir, train_size=args.train_size,
            test_size=args.test_size, validation=args.validation,
            input_size=args.input_size)
    except datasets.DatasetError as e:
        cli.fail(str(e))

    numpy.random.seed(args.seed)  # parameter initialisation
    if device.xp is not numpy:
        device.xp.random.seed(args.seed)  # the baseline's dropout on the GPU
    model = build_model(args)
    n_params = nets.count_parameters(model)
    print('{}: {} parameters ({})'.format(
        args.arch, '{:,}'.format(n_params), json.dumps(model.options)))
    print('train {} / validation {} / test {} examples of {}'.format(
        len(train), len(validation) if validation else 0, len(test),
        args.dataset))
    model.to_device(device)

    optimizer = chainer.optimizers.Adam(alpha=args.alpha)
    optimizer.setup(model)

    order_random = numpy.random.RandomState(args.seed + 1)
    shift_random = numpy.random.RandomState(args.seed + 2)
    train_iter = chainer.iterators.SerialIterator(
        train, args.batchsize,
        order_sampler=chainer.iterators.ShuffleOrderSampler(order_random))
    test_iter = chainer.iterators.SerialIterator(
        test, args.eval_batchsize, repeat=False, shuffle=False)
    updater = AugmentingUpdater(train_iter, optimizer, args.max_shift,
                                shift_random, order_random, device)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    trainer.extend(FixedWeightsEvaluator(test_iter, model, device=device),
                   name='test')
    report_keys = ['epoch', 'main/loss', 'main/margin_loss']
    if getattr(model, 'reconstruct', False):
        report_keys.append('main/reconstruction_loss')
    report_keys += ['main/accuracy', 'test/main/loss', 'test/main/accuracy']
    if validation is not None:
        val_iter = chainer.iterators.SerialIterator(
            validation, args.eval_batchsize, repeat=False, shuffle=False)
        trainer.extend(FixedWeightsEvaluator(val_iter, model,
                                             device=device),
                       name='val')
        report_keys.append('val/main/accuracy')
        best_path = os.path.join(args.out, 'model_best_val.npz')
        trainer.extend(SaveBest('val/main/accuracy', best_path))
    report_keys += ['alpha', 'elapsed_time']

    if args.decay < 1:
        trainer.extend(extensions.ExponentialShift(
            'alpha', args.decay, target=args.alpha_floor),
            trigger=(1, 'epoch'))
    trainer.extend(extensions.FailOnNonNumber())
    trainer.extend(extensions.observe_value(
        'alpha', lambda t: t.updater.get_optimizer('main').alpha),
        trigger=(1, 'epoch'))
    trainer.extend(extensions.snapshot(
        filename='snapshot_epoch_{.updater.epoch}',
        n_retains=args.snapshot_keep), trigger=(1, 'epoch'))
    trainer.extend(extensions.LogReport())
    trainer.extend(RecordOptions(dict(
        model.options, arch=args.arch, dataset=args.dataset)),
        name='options')
    final = FinalReport('test/main/accuracy')
    trainer.extend(final)
    if extensions.PlotReport.available():
        trainer.extend(extensions.PlotReport(
            ['main/loss', 'test/main/loss'], 'epoch', file_name='loss.png'))
        trainer.extend(extensions.PlotReport(
            ['main/accuracy', 'test/main/accuracy'], 'epoch',
            file_name='accuracy.png'))
    trainer.extend(extensions.PrintReport(report_keys))
    if not args.no_progress:
        trainer.extend(extensions.ProgressBar(update_interval=10))

    resume = args.resume
    if resume is None and args.autoload:
        resume = newest_snapshot(args.out)
    if resume:
        if not os.path.exists(resume):
            cli.fail('snapshot {} does not exist; check --resume'
                     .format(resume))
        try:
            chainer.serializers.load_npz(resume, trainer)
        except Exception as e:
            cli.fail('cannot resume from {} ({}: {}); it is not a snapshot of '
                     'this configuration'.format(
                         resume, type(e).__name__,
                         str(e).splitlines()[0] if str(e) else ''))
        print('resumed from {} at epoch {}'.format(resume,
                                                   updater.epoch))

    trainer.run()

    if args.save:
        nets.save_model(args.save, model)
        print('model saved to {}'.format(args.save))
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
    text = json.dumps(summary, indent=2) + '\n'
    cli.atomic_write(os.path.join(args.out, 'final.json'),
                     lambda f: f.write(text.encode('utf-8')))


if __name__ == '__main__':
    main()
