"""The pieces train.py puts into its Trainer (as Chainer's examples keep
them beside train_mnist.py): the augmenting updater, the exact evaluator,
the divergence check, and the extensions that record
options, the accuracy history and the best model; plus ``newest_snapshot``
for --autoload and experiments.py.
"""
import collections
import copy
import glob
import json
import os
import re

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import training
from chainer.iterators import _statemachine
from chainer.training import extensions

from capsnet.data import mnist
from capsnet import files

SNAPSHOT_PREFIX = 'snapshot_epoch_'
SNAPSHOT_NAME = SNAPSHOT_PREFIX + '{.updater.epoch}'  # for extensions.snapshot


def snapshots(out):
    """{epoch: path} of the epoch snapshots in folder ``out``."""
    found = {}
    for path in glob.glob(os.path.join(out, SNAPSHOT_PREFIX + '*')):
        match = re.search(re.escape(SNAPSHOT_PREFIX) + r'(\d+)$', path)
        if match:
            found[int(match.group(1))] = path
    return found


def newest_snapshot(out):
    """Path of the snapshot with the highest epoch in ``out``, or None."""
    found = snapshots(out)
    return found[max(found)] if found else None


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


class BatchIterator(chainer.iterators.SerialIterator):
    """SerialIterator that reads a whole batch in one call,
    ``dataset.get_examples(indices)``, from a dataset that makes its
    examples in batches (MultiMNIST's pairs, made on the fly); any other
    dataset is read example by example, as SerialIterator does."""

    def __next__(self):
        get_examples = getattr(self.dataset, 'get_examples', None)
        if get_examples is None:
            return super().__next__()
        self._previous_epoch_detail = self.epoch_detail
        self._state, indices = _statemachine.iterator_statemachine(
            self._state, self.batch_size, self.repeat, self.order_sampler,
            len(self.dataset))
        if indices is None:
            raise StopIteration
        return list(zip(*get_examples(numpy.asarray(indices))))

    next = __next__


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
        # (x, t) for MNIST; (x, t1, t2, x1, x2) for MultiMNIST, which comes
        # shifted already (max_shift 0)
        x, *rest = chainer.dataset.concat_examples(batch)
        if self.max_shift:
            x = mnist.random_shift(x, self.max_shift, self.shift_random)
        return tuple(chainer.dataset.to_device(device, a) for a in [x] + rest)

    def serialize(self, serializer):
        super().serialize(serializer)
        for name, state in (('shift_random', self.shift_random),
                            ('order_random', self.order_random)):
            serialize_random_state(serializer[name], state)


class StepDecay(training.Extension):
    """``attr`` = initial * rate ** (iteration / steps), floored at
    ``floor``, set after every step for the next one: the continuous
    exponential decay of the authors' code (tf.train.exponential_decay in
    research/capsules/models/model.py). Computed from the iteration count
    alone, so a resumed run continues the same schedule exactly."""
    trigger = 1, 'iteration'
    priority = training.PRIORITY_EDITOR

    def __init__(self, attr, initial, rate, steps, floor=0.0,
                 optimizer='main'):
        self.attr, self.initial = attr, initial
        self.rate, self.steps, self.floor = rate, steps, floor
        self.optimizer = optimizer

    def value(self, iteration):
        return max(self.initial * self.rate ** (iteration / self.steps),
                   self.floor)

    def initialize(self, trainer):
        self(trainer)

    def __call__(self, trainer):
        setattr(trainer.updater.get_optimizer(self.optimizer), self.attr,
                self.value(trainer.updater.iteration))


class RecordOptions(training.Extension):
    """Keeps the network's and the data's options in every snapshot.

    Most options leave the parameter shapes alone (W has the same shape for
    every routing count r), so a snapshot would otherwise load silently into
    a differently configured run. Loading one made with other options raises
    ValueError naming the differences.
    """
    trigger = None  # never called: it only rides along in the snapshots

    def __init__(self, options, what='options', allow_missing=False):
        self.options = options
        self.what = what
        self.allow_missing = allow_missing  # keys older snapshots lack

    def serialize(self, serializer):
        if not isinstance(serializer, chainer.serializer.Deserializer):
            serializer('options', numpy.asarray(
                json.dumps(self.options, sort_keys=True)))
            return
        try:
            stored = json.loads(str(serializer('options', None)[()]))
        except KeyError:
            return  # a snapshot from before options were recorded
        keys = set(stored) | set(self.options)
        if self.allow_missing:
            keys = set(stored) & set(self.options)
        differences = ['{}={} in the snapshot, {} asked'.format(
            key, stored.get(key), self.options.get(key))
            for key in sorted(keys)
            if stored.get(key) != self.options.get(key)]
        if differences:
            raise ValueError(
                'the snapshot was made with other {}: {}; resume with '
                'the same flags or use another --out'.format(
                    self.what, ', '.join(differences)))


class ExactEvaluator(extensions.Evaluator):
    """Evaluator whose means are weighted by batch size, so the accuracy is
    the exact fraction of correct examples even when the last batch is
    short (Chainer's Evaluator weights every batch alike). The pass runs in
    the model's ``inference()`` context: its weights are fixed, so the fast
    CPU kernels can reuse their weight transforms.

    ``chunk``: run the model on at most this many examples at a time (a
    batch larger than memory allows is split; devices.inference_batch);
    each chunk is weighted by its size, so the means are the same."""

    def __init__(self, *args, chunk=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk = chunk

    #: a pass over more examples than this says so first (it takes
    #: minutes on a CPU: 10M MultiMNIST pairs, say)
    ANNOUNCE = 50000

    def evaluate(self):
        iterator = self._iterators['main']
        model = self._targets['main']
        if len(iterator.dataset) > self.ANNOUNCE:
            print('evaluating {}: {:,} examples ...'.format(
                getattr(self, 'name', None) or 'the test set',
                len(iterator.dataset)), flush=True)
        if hasattr(iterator, 'reset'):
            iterator.reset()
            it = iterator
        else:
            it = copy.copy(iterator)
        summaries = collections.defaultdict(chainer.reporter.Summary)
        with model.inference(), chainer.using_config('train', False), \
                chainer.no_backprop_mode():
            for batch in it:
                size = self.chunk or len(batch)
                for start in range(0, len(batch), size):
                    part = batch[start:start + size]
                    arrays = chainer.dataset.convert._call_converter(
                        self.converter, part, self.device)
                    observation = {}
                    with chainer.reporter.report_scope(observation):
                        (self.eval_func or model)(*arrays)
                    for key, value in observation.items():
                        summaries[key].add(value, weight=len(part))
        return {key: summary.compute_mean()
                for key, summary in summaries.items()}


class FailOnNonNumber(training.Extension):
    """Stop training when a parameter becomes NaN or inf, as Chainer's
    ``extensions.FailOnNonNumber`` does (the same RuntimeError), with fewer
    waits for the GPU.

    Chainer's version reads one flag per parameter back to the host after
    every iteration; on a GPU each read waits until the step's kernels have
    run, so the host cannot prepare the next step meanwhile. Here the
    parameters' flags are folded into one on the device and read once, at
    every iteration on the CPU (where nothing waits) and on a GPU every
    ``gpu_interval`` iterations and at the end of every epoch. Its priority
    puts it before the epoch's snapshot (priority -100), so a diverged state
    is never snapshotted.
    """

    trigger = (1, 'iteration')
    priority = training.PRIORITY_READER

    def __init__(self, gpu_interval=100):
        self.gpu_interval = gpu_interval

    def __call__(self, trainer):
        updater = trainer.updater
        due = updater.is_new_epoch or \
            updater.iteration % self.gpu_interval == 0
        for name, optimizer in updater.get_all_optimizers().items():
            target = optimizer.target
            xp = target.xp
            if xp is not numpy and not due:
                continue
            flags = [xp.isfinite(param.array).all()
                     for param in target.params() if param.array is not None]
            if flags and not bool(xp.stack(flags).all()):
                raise RuntimeError(
                    'Kill the process since parameters in optimizer '
                    "'{}' diverge. R.I.P.".format(name))


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
            files.save_model(self.path, trainer.updater.get_optimizer(
                'main').target)

    def serialize(self, serializer):
        self.best = float(serializer('best', self.best))
