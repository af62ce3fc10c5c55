"""The training step without the host inside it (issue 28): static input
buffers, Adam's update read from a device-side step counter, the reported
losses summed on the device, and on CuPy the whole step captured as one
CUDA graph and replayed.

- ``Schedule``: Adam's learning rate per step (constant, train.py's
  per-epoch ``ExponentialShift`` or its per-step ``StepDecay``) and Adam's
  bias-corrected ``alpha_t``, with Chainer's own formulas.
- ``StaticStep``: buffers x (B, 1, S, S) and t (B,), a step counter (1,)
  and an ``alpha_t`` table on the device; ``compute()`` runs forward,
  backward and Adam's update and adds the reported values to device sums,
  reading nothing back to the host.
- ``CudaGraph``: captures ``StaticStep.compute`` on CuPy and replays it.
- ``StaticUpdater``: ``AugmentingUpdater`` (same shifts, same random states,
  same snapshots) that runs the step through ``StaticStep`` (and
  ``CudaGraph`` with ``cuda_graph=True``), reports the epoch's means once
  per epoch and checks for divergence then.
- ``StaticEvaluator``: ``ExactEvaluator`` whose full batches go through a
  static (on CuPy captured) forward pass; a shorter last batch runs eagerly.
- ``EpochTimer``: per epoch, seconds in training steps (``time/train``) and
  in everything else (``time/other``).

Why a table for ``alpha_t``: the step reads ``alpha_t`` from a device array
indexed by the device counter, and the table holds Chainer's own values
(``math.pow`` on the host). Computing ``beta2 ** t`` with the array library
instead is not the same number: NumPy's ``power`` (SVML on AVX-512) differed
from ``math.pow`` for 1,071 of t = 1..20,000 with beta2 = 0.999 on this
project's CPU, and CUDA's ``pow`` is not glibc's either. The table holds
``TABLE_STEPS`` steps and is refilled in place (same buffer, so a captured
graph stays valid) when the run reaches its end.
"""
import collections
import contextlib
import gc
import json
import math
import time

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import reporter, training

from capsnet.data import mnist
from capsnet.training import extensions as ext

TABLE_STEPS = 4096
WARMUP_STEPS = 3
DIVERGED = ("Kill the process since parameters in optimizer 'main' "
            'diverge. R.I.P.')   # FailOnNonNumber's message (train.py)


class Schedule:
    """Adam's alpha per step as train.py's extensions set it.

    Args:
        alpha: the initial learning rate.
        decay: factor per epoch (``per='epoch'``, ExponentialShift with
            target ``floor``) or per ``decay_steps`` steps (StepDecay,
            floored at ``floor``); 1 (or None) keeps alpha constant.
        decay_steps: None for the per-epoch schedule.
        floor: the lowest alpha (None: no floor).
        batchsize, train_size: B and N; the per-epoch schedule needs them
            (after i steps, floor(i * B / N) epochs are done: the
            SerialIterator with repeat=True gives full batches).
        beta1, beta2: Adam's.
    """

    def __init__(self, alpha, decay=None, decay_steps=None, floor=None,
                 batchsize=None, train_size=None, beta1=0.9, beta2=0.999):
        self.alpha0, self.decay, self.decay_steps = alpha, decay, decay_steps
        self.floor, self.beta1, self.beta2 = floor, beta1, beta2
        self.batchsize, self.train_size = batchsize, train_size
        if decay is None or decay >= 1:
            self.kind = 'constant'
        elif decay_steps:
            self.kind = 'step'
        else:
            self.kind = 'epoch'
            if not batchsize or not train_size:
                raise ValueError('a per-epoch schedule needs batchsize and '
                                 'train_size')

    def alpha(self, t):
        """alpha of step t (1 for the first step), a Python float."""
        if self.kind == 'constant':
            return self.alpha0
        if self.kind == 'step':   # StepDecay.value(iteration before it)
            return max(self.alpha0 * self.decay ** ((t - 1) /
                                                     self.decay_steps),
                       self.floor or 0.0)
        epochs = (t - 1) * self.batchsize // self.train_size
        if epochs == 0:   # ExponentialShift.initialize: no floor
            return self.alpha0
        value = self.alpha0 * (self.decay ** epochs)
        if self.floor and value / self.floor < 1:
            value = self.floor
        return value

    def alpha_t(self, t):
        """Adam's bias-corrected step size of step t, float32 (Chainer's
        optimizers.adam._learning_rate, as its CPU update casts it)."""
        fix1 = 1. - math.pow(self.beta1, t)
        fix2 = 1. - math.pow(self.beta2, t)
        return numpy.float32(self.alpha(t) * math.sqrt(fix2) / fix1)


def check_optimizer(optimizer):
    """The static step does Adam's plain update: refuse anything else."""
    if not isinstance(optimizer, chainer.optimizers.Adam):
        raise ValueError('the static step needs chainer.optimizers.Adam, '
                         'got {}'.format(type(optimizer).__name__))
    hp = optimizer.hyperparam
    if hp.amsgrad or hp.adabound or hp.weight_decay_rate or hp.eta != 1:
        raise ValueError('the static step does plain Adam: no amsgrad, '
                         'adabound, weight decay or eta')
    hooks = optimizer._hookable
    if (hooks._pre_update_hooks or hooks._post_update_hooks or
            optimizer._loss_scale is not None):
        raise ValueError('the static step has no optimizer hooks or loss '
                         'scaling')


class StaticStep:
    """One training step on buffers allocated once.

    Args:
        model: the CapsNet (its forward reports margin_loss, loss, ...).
        optimizer: its Adam, set up (``check_optimizer``).
        schedule: a ``Schedule``.
        batchsize: B of the buffers.
    """

    def __init__(self, model, optimizer, schedule, batchsize):
        check_optimizer(optimizer)
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        xp = self.xp = model.xp
        side = model.input_size
        self.x = xp.zeros((batchsize, 1, side, side), numpy.float32)
        self.t = xp.zeros((batchsize,), numpy.int32)
        self.counter = xp.zeros((1,), numpy.int64)    # steps done
        self.table = xp.zeros((TABLE_STEPS,), numpy.float32)
        self.table_base = xp.zeros((1,), numpy.int64)  # table[0]: step base+1
        self._host_base = None
        self.sums = {}    # reported key -> 0-d device array of sums
        self.hp = optimizer.hyperparam

    def prepare(self, steps_done):
        """Before a step: Adam's states exist and sit on the device, the
        counter says ``steps_done`` and the table holds the next step."""
        for param in self.optimizer.target.params():
            param.update_rule._init_states(param)
        self.counter.fill(steps_done)
        if self._host_base is None or not (
                self._host_base <= steps_done <
                self._host_base + TABLE_STEPS):
            self.fill_table(steps_done)

    def fill_table(self, base):
        """alpha_t of steps base+1 .. base+TABLE_STEPS, in place."""
        values = numpy.array([self.schedule.alpha_t(base + 1 + i)
                              for i in range(TABLE_STEPS)], numpy.float32)
        self.table[...] = self.xp.asarray(values)
        self.table_base.fill(base)
        self._host_base = base

    def compute(self):
        """Forward, backward, Adam's update, the sums: device work only."""
        model = self.model
        observation = {}
        with reporter.report_scope(observation):
            loss = model(self.x, self.t)
        model.cleargrads()
        loss.backward()
        self.counter += 1
        self.update()
        for key, value in observation.items():
            value = getattr(value, 'array', value)
            if key not in self.sums:   # float64, as compat's Summary
                self.sums[key] = self.xp.zeros((), numpy.promote_types(
                    value.dtype, numpy.float64))
            self.sums[key] += value
        return loss, observation

    def update(self):
        hp = self.hp
        if self.xp is numpy:
            alpha_t = numpy.take(self.table,
                                 self.counter - self.table_base - 1)[0]
            for param in self.optimizer.target.params():
                adam_numpy(param, param.update_rule.state, alpha_t, hp)
            return
        kernel = adam_kernel()   # on CuPy: one kernel per parameter
        for param in self.optimizer.target.params():
            state = param.update_rule.state
            grad = param.grad if param.grad is not None else \
                self.xp.zeros_like(param.array)
            kernel(grad, self.table, self.counter, self.table_base,
                   1 - hp.beta1, 1 - hp.beta2, hp.eps, param.array,
                   state['m'], state['v'])

    def take_means(self, count):
        """{key: mean over the last ``count`` steps} (device arrays), and
        the sums set back to zero."""
        means = {key: total / count for key, total in self.sums.items()}
        for total in self.sums.values():
            total.fill(0)
        return means

    def load_sums(self, sums):
        """Set the sums from {key: NumPy 0-d array} (a snapshot's)."""
        for key, value in sums.items():
            if key in self.sums:
                self.sums[key][...] = self.xp.asarray(value)
            else:
                self.sums[key] = self.xp.asarray(value)

    def finite(self):
        """Whether the loss sums and every parameter are finite (one read
        back to the host)."""
        xp = self.xp
        flags = [xp.isfinite(total) for total in self.sums.values()] + [
            xp.isfinite(p.array).all() for p in self.optimizer.target.params()]
        return bool(xp.stack(flags).all())


def adam_numpy(param, state, alpha_t, hp):
    """Chainer's AdamRule.update_core_cpu (plain Adam), with alpha_t given:
    the same operations in the same order, so equal bit for bit."""
    grad = param.grad
    if grad is None:
        grad = numpy.zeros_like(param.array)
    m, v = state['m'], state['v']
    m += (1.0 - hp.beta1) * (grad - m)
    v += (1.0 - hp.beta2) * (grad * grad - v)
    step = alpha_t / (numpy.sqrt(v) + hp.eps)
    param.array += -1.0 * (step * m)


_ADAM_KERNEL = []


def adam_kernel():
    """Chainer's Adam GPU kernel reading alpha_t from the table at the
    device counter (compiled once)."""
    if not _ADAM_KERNEL:
        import cupy
        _ADAM_KERNEL.append(cupy.ElementwiseKernel(
            'T grad, raw float32 table, raw int64 counter, raw int64 base, '
            'T one_minus_beta1, T one_minus_beta2, T eps',
            'T param, T m, T v',
            '''T alpha_t = table[counter[0] - base[0] - 1];
               m += one_minus_beta1 * (grad - m);
               v += one_minus_beta2 * (grad * grad - v);
               param -= alpha_t * m / (sqrt(v) + eps);''',
            'capsnet_static_adam'))
    return _ADAM_KERNEL[0]


class CudaGraph:
    """A function of device work only, captured once on CuPy and replayed.

    Everything the capture allocates comes from a memory pool of its own
    that nothing else uses, filled by the eager warm-up calls on the same
    stream (so every block size is cached and cuBLAS has its workspace for
    that stream); ``keep`` holds what the captured call returned (its
    outputs and, through them, the arrays it wrote)."""

    def __init__(self):
        import cupy
        self.cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.private_pool = cupy.cuda.MemoryPool()
        self.graph = None
        self.keep = None

    def pool(self):
        """The private pool, for the warm-up and the capture only (after
        the capture nothing else may allocate from it: its free blocks are
        the graph's temporaries)."""
        return self.cupy.cuda.using_allocator(self.private_pool.malloc)

    def capture(self, function):
        """Capture ``function()`` on the stream (the caller is inside
        ``with graph.stream``); returns what it returned. The stream leaves
        capture mode whatever happens."""
        gc_was_on = gc.isenabled()
        gc.disable()   # no collection (and no frees from __del__) inside
        graph = None
        try:
            with self.pool():
                self.stream.synchronize()
                self.stream.begin_capture()
                try:
                    self.keep = function()
                finally:
                    graph = self.stream.end_capture()
        finally:
            if gc_was_on:
                gc.enable()
        self.graph = graph
        return self.keep

    def launch(self):
        self.graph.launch(self.stream)


class StaticUpdater(ext.AugmentingUpdater):
    """AugmentingUpdater whose step is a ``StaticStep`` (on CuPy with
    ``cuda_graph=True`` a replayed CUDA graph after ``warmup`` eager
    steps).

    The images are shifted on the host from ``shift_random`` exactly as
    AugmentingUpdater does and copied into the static buffers. The reported
    values (main/loss, main/margin_loss, main/reconstruction_loss,
    main/accuracy) are summed on the device and reported once, as the means
    over the epoch, at its last step (the means LogReport would have made
    of the per-step values: Chainer's Summary weights every iteration
    alike); the divergence check (parameters and loss sums finite) runs
    there too and raises FailOnNonNumber's RuntimeError.

    Args: those of AugmentingUpdater, and
        schedule: a ``Schedule`` (train.py's ExponentialShift or StepDecay
            may stay registered: they set the host's optimizer.alpha, which
            this updater also sets, to the same values, for the log).
        cuda_graph: capture the step on CuPy (ignored on NumPy).
        warmup: eager steps before the capture.
        say: where the one line about a failed capture goes (print).
    """

    def __init__(self, iterator, optimizer, max_shift, shift_random,
                 order_random, device, schedule, cuda_graph=False,
                 warmup=WARMUP_STEPS, say=print):
        super().__init__(iterator, optimizer, max_shift, shift_random,
                         order_random, device)
        check_optimizer(optimizer)
        self.schedule = schedule
        self.cuda_graph = cuda_graph
        self.warmup = warmup
        self.say = say
        self.step = None
        self.graph = None
        self.graph_failed = None    # the reason, once a capture failed
        self._steps_since_report = 0
        self._eager_steps = 0
        self._pinned = None
        self._loaded_sums = {}

    @property
    def model(self):
        return self.get_optimizer('main').target

    def _host_batch(self, batch):
        """(x, t) on the host, shifted as AugmentingUpdater shifts them."""
        arrays = chainer.dataset.concat_examples(batch)
        if len(arrays) != 2:
            raise ValueError('the static step takes (x, t) batches of one '
                             'digit, got {} arrays a batch'.format(
                                 len(arrays)))
        x, t = arrays
        if self.max_shift:
            x = mnist.random_shift(x, self.max_shift, self.shift_random)
        return x, t

    def update_core(self):
        iterator = self._iterators['main']
        optimizer = self.get_optimizer('main')
        x, t = self._host_batch(iterator.next())
        if self.step is None or self.step.x.shape[0] != len(x):
            if self.step is not None:   # another batch size: no graph
                self.drop_graph()
            self.step = StaticStep(self.model, optimizer, self.schedule,
                                   len(x))
            self.step.load_sums(self._loaded_sums)
            self._loaded_sums = {}
        self._run(x, t)
        # the host's bookkeeping, as Optimizer.update and UpdateRule.update
        optimizer.t += 1
        for param in optimizer.target.params():
            param.update_rule.t += 1
        optimizer.alpha = self.schedule.alpha(optimizer.t + 1)
        self._steps_since_report += 1
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)
        if iterator.is_new_epoch:
            self.report()

    def _run(self, x, t):
        step = self.step
        if not (self.cuda_graph and step.xp is not numpy and
                self.graph_failed is None):
            step.prepare(self.get_optimizer('main').t)
            step.x[...] = step.xp.asarray(x)
            step.t[...] = step.xp.asarray(t)
            step.compute()
            return
        if self.graph is None:
            self.graph = CudaGraph()
        graph = self.graph
        with graph.stream:   # every device operation of a step on it
            step.prepare(self.get_optimizer('main').t)
            self._copy_in(x, t)
            if graph.graph is not None:
                graph.launch()
            elif self._eager_steps < self.warmup:
                self._eager_steps += 1
                with graph.pool():
                    step.compute()
            else:
                try:
                    graph.capture(step.compute)
                except Exception as e:
                    self.capture_failed(e)
                    step.compute()   # this step, eagerly (not yet run)
                    return
                graph.launch()

    def _copy_in(self, x, t):
        """Copy the batch into the static buffers on the graph's stream,
        from pinned host memory (two pairs, each reused only after its
        last copy is done)."""
        import cupyx
        step = self.step
        if self._pinned is None:
            self._pinned = [[cupyx.empty_pinned(step.x.shape, numpy.float32),
                             cupyx.empty_pinned(step.t.shape, numpy.int32),
                             None] for _ in range(2)]
        self._pinned.reverse()
        host_x, host_t, done = self._pinned[0]
        if done is not None:
            done.synchronize()
        host_x[...] = x
        host_t[...] = t
        step.x.set(host_x, self.graph.stream)
        step.t.set(host_t, self.graph.stream)
        self._pinned[0][2] = self.graph.stream.record()

    def capture_failed(self, error):
        reason = ' '.join(str(error).split()) or type(error).__name__
        self.graph_failed = reason
        self.say('--cuda-graph: the capture failed ({}: {}); training goes '
                 'on eagerly'.format(type(error).__name__, reason[:200]))
        self.graph = None

    def drop_graph(self):
        """Forget a captured graph (after a load into the arrays it
        writes, or a new batch size): the next steps warm up and capture
        again."""
        self.graph = None
        self._eager_steps = 0
        self._pinned = None

    def report(self):
        """The means since the last report into the reporter, and the
        divergence check (the one read back to the host per epoch)."""
        step, count = self.step, self._steps_since_report
        if step is None or not count:
            return
        with self.graph.stream if self.graph is not None else \
                contextlib.nullcontext():
            if not step.finite():
                raise RuntimeError(DIVERGED)
            means = step.take_means(count)
        self._steps_since_report = 0
        reporter.report(means)

    def serialize(self, serializer):
        """AugmentingUpdater's state, and the sums since the last report
        (exact: float32 and float64 sums are kept as float64). A snapshot
        without them (AugmentingUpdater's) loads with empty sums."""
        super().serialize(serializer)
        if not isinstance(serializer, chainer.serializer.Deserializer):
            sums = self.step.sums if self.step is not None else {}
            keys = sorted(sums)
            serializer('sum_keys', numpy.asarray(json.dumps(
                [(key, str(sums[key].dtype)) for key in keys])))
            serializer('sum_values', numpy.asarray(
                [float(sums[key]) for key in keys], numpy.float64))
            serializer('steps_since_report',
                       numpy.asarray(self._steps_since_report))
            return
        self.drop_graph()   # the arrays it wrote may have been replaced
        try:
            keys = json.loads(str(serializer('sum_keys', None)[()]))
            values = serializer('sum_values', None)
            count = int(serializer('steps_since_report', None))
        except KeyError:
            keys, values, count = [], [], 0
        self._loaded_sums = {key: numpy.asarray(value, dtype)
                             for (key, dtype), value in zip(keys, values)}
        self._steps_since_report = count
        if self.step is not None:
            self.step.load_sums(self._loaded_sums)


class StaticEvaluator(ext.ExactEvaluator):
    """ExactEvaluator whose full batches run, on CuPy with
    ``cuda_graph=True``, as a captured forward pass on static buffers (two
    eager warm-up batches, then the capture); a batch of another size (the
    last, shorter one) runs eagerly. Same means (each batch weighted by its
    size). If the capture fails, one line says why and the evaluation goes
    on eagerly. On NumPy it is ExactEvaluator."""

    def __init__(self, *args, cuda_graph=False, say=print, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda_graph, self.say = cuda_graph, say
        self.graph = self.x = self.t = None
        self.failed = None
        self._warm = 0

    def evaluate(self):
        model = self._targets['main']
        if model.xp is numpy or not self.cuda_graph or self.failed:
            return super().evaluate()
        import cupy
        cupy.cuda.Device().synchronize()   # the training steps are done
        if self.graph is None:
            self.graph = CudaGraph()
        iterator = self._iterators['main']
        iterator.reset()
        summaries = collections.defaultdict(reporter.Summary)
        with model.inference(), chainer.using_config('train', False), \
                chainer.no_backprop_mode(), self.graph.stream:
            for batch in iterator:
                size = self.chunk or len(batch)
                for start in range(0, len(batch), size):
                    part = batch[start:start + size]
                    x, t = chainer.dataset.concat_examples(part)
                    for key, value in self._forward(model, x, t).items():
                        summaries[key].add(value, weight=len(part))
            self.graph.stream.synchronize()
        return {key: summary.compute_mean()
                for key, summary in summaries.items()}

    def _forward(self, model, x, t):
        """{key: array} of the model's report for one batch."""
        if self.x is None:
            self.x = model.xp.zeros(x.shape, numpy.float32)
            self.t = model.xp.zeros(t.shape, numpy.int32)
        if x.shape != self.x.shape:
            return _observe(model, model.xp.asarray(x),
                            model.xp.asarray(t))
        self.x.set(numpy.ascontiguousarray(x, numpy.float32),
                   self.graph.stream)
        self.t.set(numpy.ascontiguousarray(t, numpy.int32),
                   self.graph.stream)
        if self.graph.graph is not None:
            self.graph.launch()
            return self.graph.keep
        if self._warm < 2:
            self._warm += 1
            with self.graph.pool():
                return _observe(model, self.x, self.t)
        try:
            observed = self.graph.capture(
                lambda: _observe(model, self.x, self.t))
        except Exception as e:
            reason = ' '.join(str(e).split()) or type(e).__name__
            self.failed = reason
            self.say('--cuda-graph: the evaluation capture failed ({}: {}); '
                     'it goes on eagerly'.format(type(e).__name__,
                                                 reason[:200]))
            self.graph = None
            return _observe(model, self.x, self.t)
        self.graph.launch()
        return observed


def _observe(model, x, t):
    observation = {}
    with reporter.report_scope(observation):
        model(x, t)
    return {key: getattr(value, 'array', value)
            for key, value in observation.items()}


class EpochTimer(training.Extension):
    """Reports per epoch ``time/train``, the seconds in the updater's steps
    (on a GPU the device is synchronised at the epoch's last step, so its
    queued work counts there), and ``time/other``, the rest of the wall
    time since the previous report: the previous epoch's extensions after
    this one (log, plots, printing, snapshot), the per-iteration
    extensions, and this epoch's evaluation (evaluators run before it:
    priority PRIORITY_WRITER against its PRIORITY_EDITOR; LogReport,
    PRIORITY_READER, logs both). The two add up to the run's wall time.
    It wraps ``trainer.updater.update`` when the trainer starts."""

    trigger = (1, 'epoch')
    priority = training.PRIORITY_EDITOR

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.train = 0.0
        self._last = None

    def initialize(self, trainer):
        updater = trainer.updater
        update = updater.update
        model = updater.get_optimizer('main').target

        def timed_update():
            start = self.clock()
            update()
            if updater.is_new_epoch and model.xp is not numpy:
                model.xp.cuda.Device().synchronize()
            self.train += self.clock() - start

        updater.update = timed_update
        self._last = self.clock()

    def __call__(self, trainer):
        now = self.clock()
        reporter.report({'time/train': self.train,
                         'time/other': now - self._last - self.train})
        self._last, self.train = now, 0.0
