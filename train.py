#!/usr/bin/env python
"""Train CapsNet (or the baseline CNN) on MNIST or Fashion-MNIST.

    python train.py -g 0 --save model --reconstruct   # GPU 0 (-d @cupy:0)
    python train.py --save model --reconstruct        # CPU (-d @numpy)

Read top to bottom like Chainer's examples/mnist/train_mnist.py: settings,
device, data, model, optimizer, iterators, updater, trainer, extensions,
resume, run. The settings are capsnet/training/settings.py (each flag once);
the loop's pieces are capsnet/training/loop.py, which the experiments run
too. A snapshot is written every epoch; --resume / --autoload continue from
one; the trained model is OUT/model.npz (or the --save file).
"""
import contextlib
import json
import sys

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import numpy

import nets  # first: it brings capsnet.compat before chainer
from chainer import training

from capsnet import devices
from capsnet.data import mnist
from capsnet.kernels import KernelOptions
from capsnet.training import distributed, loop, snapshots
from capsnet.errors import CapsNetError, UsageError
from capsnet.training.settings import Settings

INTERRUPTED = 'interrupted; resume with --autoload'


def build_parser():
    parser = cli.ArgumentParser(
        description='Train CapsNet (Sabour et al. 2017) or the baseline CNN '
                    'on MNIST or Fashion-MNIST')
    Settings.add_arguments(parser, sorted(nets.SINGLE_DIGIT_ARCHITECTURES))
    return parser


def parse_settings(argv=None):
    """The Settings of a command line (the recipe's defaults filled in),
    with what no single flag can check refused in one line."""
    parser = build_parser()
    settings = Settings.from_args(parser.parse_args(argv))
    try:
        settings.check()
    except UsageError as e:
        parser.error(str(e))
    distributed.check_launch(settings.communicator)
    mnist.check_batchsize(settings.batchsize, settings.train_size or
                          mnist.TRAIN_SIZE - settings.validation)
    devices.check_memory(nets.memory_estimate(
        settings.arch, settings.model_options(), settings.batchsize,
        settings.eval_batchsize, devices.physical_memory(),
        devices.INFERENCE_SHARE), '--arch {}, --input-size {}, --batchsize '
        '{}'.format(settings.arch, settings.input_size, settings.batchsize),
        'lower --input-size or --batchsize')
    return settings


def main(argv=None):
    # Settings: every flag defined once (capsnet/training/settings.py); a
    # bad one under mpiexec is said by rank 0 alone (every rank meets it)
    try:
        settings = parse_settings(argv)
    except CapsNetError as e:
        if distributed.launched_rank() in (None, 0):
            raise
        raise distributed.RankFailed(e.status)

    # Device; under MPI this process is one rank of several, and a failure
    # on any rank ends them all (distributed.guard)
    comm = distributed.start(settings) if settings.communicator else None
    device = devices.select_device(settings)
    settings.check_device(device)
    with distributed.guard(comm) if comm else contextlib.nullcontext(), \
            loop.run_folder(settings, comm) as out:

        # Data: (train, validation or None, test) TupleDatasets; under MPI
        # each rank trains and tests on its own shard
        train, validation, test = mnist.get_mnist_like(
            settings.dataset, data_dir=settings.data_dir,
            train_size=settings.train_size, test_size=settings.test_size,
            validation=settings.validation, input_size=settings.input_size,
            log=print)
        sizes = len(train), len(validation or ()), len(test)
        if comm is not None:
            train, test = distributed.scatter(comm, train, test,
                                              settings.seed)
            mnist.check_batchsize(settings.batchsize, len(train))

        # Model, initialised from --seed, on the device (CuPy's generator
        # too: the baseline's dropout draws from it there)
        numpy.random.seed(settings.seed)
        if device.xp is not numpy:
            device.xp.random.seed(settings.seed)
        model = nets.build(settings.arch, settings.recipe,
                           **settings.model_options())
        model.fast = {'auto': None, 'fast': True, 'plain': False}[
            settings.impl]
        model.kernel_options = KernelOptions(
            gpu_kernels=settings.gpu_kernels,
            gpu_convolutions=settings.gpu_convolutions)
        n_parameters = nets.count_parameters(model)
        print('{}: {:,} parameters ({})'.format(
            settings.arch, n_parameters, json.dumps(model.options)))
        print('train {} / validation {} / test {} examples of {}'.format(
            *sizes, settings.dataset))
        if comm is not None:
            distributed.say_layout(comm, settings, len(train))
        # evaluation in chunks that fit in memory (said once if it splits)
        chunk = devices.inference_batch(model, min(
            settings.eval_batchsize, max(len(test), len(validation or ()))),
            say=print)
        model.to_device(device)
        # room for two snapshots and the model, checked before the long run
        cli.check_free_space(out, 2 * snapshots.snapshot_bytes(
            n_parameters), 'the snapshots')

        # Optimizer: Adam (under MPI over every rank's gradients)
        optimizer = loop.make_optimizer(model, settings, comm)

        # Iterators: shuffled training batches, and the evaluation sets
        train_iter, order_random, eval_iters = loop.make_iterators(
            settings, train, dict(test=test, val=validation), comm)

        # Updater: every training image shifted by up to --max-shift pixels
        updater = loop.make_updater(train_iter, order_random, optimizer,
                                    settings, device, comm)

        # Trainer
        trainer = training.Trainer(updater, (settings.epoch, 'epoch'),
                                   out=out)

        # Extensions: evaluation, the schedule, the divergence check, a
        # snapshot every epoch, the log, plots and the printed report
        final = loop.extend(trainer, settings, model, eval_iters, device,
                            comm, chunk=chunk)

        # Resume from --resume, or the newest snapshot with --autoload
        resumed_from = snapshots.resume(
            trainer, settings.resume, settings.autoload, settings.out,
            settings.epoch, comm)   # --out: each rank finds its own folder

        # Run (a divergence or a full disk is one line; an interrupt keeps
        # the last snapshot)
        loop.run(trainer, settings, n_parameters)

        # The model (OUT/model.npz or --save) and final.json (rank 0)
        if comm is None or comm.rank == 0:
            loop.finish(settings, model, final, sizes, n_parameters,
                        resumed_from, comm)
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main, None, INTERRUPTED))
