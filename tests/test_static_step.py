"""capsnet.training.static_step on the CPU: the static step (buffers
allocated once, Adam's alpha_t from a device-side counter, the reported
values summed on the device) equals today's AugmentingUpdater with
Chainer's Adam bit for bit, across learning-rate decay boundaries of both
recipes' schedules and across a snapshot and resume; the epoch timer."""
import math

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from chainer import training
from chainer.training import extensions

from capsnet.training import extensions as ext
from capsnet.training import static_step
import nets

N, B, STEPS = 10, 4, 50     # 10 examples, batch 4: epochs end mid-batch
ALPHA = 1e-3
# train.py's two schedules, made to cross boundaries within 50 steps:
# per epoch (ExponentialShift, down to its floor) and per step (StepDecay)
SCHEDULES = {
    'paper': dict(decay=0.5, decay_steps=None, floor=1e-4),
    'official': dict(decay=0.5, decay_steps=7, floor=0.0),
}


def dataset():
    random = numpy.random.RandomState(3)
    x = random.rand(N, 1, 28, 28).astype(numpy.float32)
    t = random.randint(0, 10, N).astype(numpy.int32)
    return chainer.datasets.TupleDataset(x, t)


def schedule_extension(recipe):
    settings = SCHEDULES[recipe]
    if settings['decay_steps']:
        return ext.StepDecay('alpha', ALPHA, settings['decay'],
                             settings['decay_steps'], settings['floor'])
    return extensions.ExponentialShift('alpha', settings['decay'],
                                       target=settings['floor'])


def small_capsnet():
    """CapsNet(routing=1) with 8 channels out of conv1 instead of 256 (the
    PrimaryCaps convolution, most of a step's time, 32 times cheaper): the
    same code path, in seconds on a 2-core machine."""
    numpy.random.seed(0)
    model = nets.CapsNet(routing=1)
    del model.conv1, model.primary
    with model.init_scope():
        model.conv1 = chainer.links.Convolution2D(1, 8, 9)
        model.primary = chainer.links.Convolution2D(8, 256, 9, stride=2)
    model.fast = None    # train.py's --impl auto
    return model


def make_trainer(recipe, static, out, stop=STEPS, with_extension=True,
                 timer=False, device='@numpy', cuda_graph=False):
    """train.py's set-up in small, on ``device``."""
    model = small_capsnet()
    device = chainer.get_device(device)
    model.to_device(device)
    optimizer = chainer.optimizers.Adam(alpha=ALPHA)
    optimizer.setup(model)
    order_random = numpy.random.RandomState(1)
    shift_random = numpy.random.RandomState(2)
    iterator = chainer.iterators.SerialIterator(
        dataset(), B, order_sampler=chainer.iterators.ShuffleOrderSampler(
            order_random))
    if static:
        settings = SCHEDULES[recipe]
        schedule = static_step.Schedule(
            ALPHA, settings['decay'], settings['decay_steps'],
            settings['floor'], batchsize=B, train_size=N)
        updater = static_step.StaticUpdater(
            iterator, optimizer, 2, shift_random, order_random, device,
            schedule, cuda_graph=cuda_graph)
    else:
        updater = ext.AugmentingUpdater(iterator, optimizer, 2, shift_random,
                                        order_random, device)
    trainer = training.Trainer(updater, (stop, 'iteration'), out=str(out))
    if with_extension or not static:
        trigger = (1, 'epoch') if not SCHEDULES[recipe]['decay_steps'] \
            else None
        trainer.extend(schedule_extension(recipe), trigger=trigger,
                       name='schedule')
    if timer:
        trainer.extend(static_step.EpochTimer())
    trainer.extend(extensions.LogReport(), name='log')
    return trainer, model, optimizer


def state(model, optimizer):
    """Parameters, Adam's moments and counters."""
    arrays = {}
    for name, param in model.namedparams():
        rule = param.update_rule
        arrays[name] = param.array
        arrays[name + '/m'] = rule.state['m']
        arrays[name + '/v'] = rule.state['v']
        arrays[name + '/t'] = numpy.asarray(rule.t)
    arrays['t'] = numpy.asarray(optimizer.t)
    arrays['epoch'] = numpy.asarray(optimizer.epoch)
    return arrays


def assert_bitwise_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        a, b = numpy.asarray(first[key]), numpy.asarray(second[key])
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert (a == b).all(), key


def log_of(trainer):
    return [{k: v for k, v in entry.items() if k != 'elapsed_time'}
            for entry in trainer.get_extension('log').log]


@pytest.fixture(scope='module')
def today(tmp_path_factory):
    """{recipe: (state, log)} of today's updater over 50 steps."""
    results = {}
    for recipe in SCHEDULES:
        trainer, model, optimizer = make_trainer(
            recipe, False, tmp_path_factory.mktemp(recipe))
        trainer.run(show_loop_exception_msg=False)
        results[recipe] = (state(model, optimizer), log_of(trainer),
                           optimizer.alpha)
    return results


@pytest.mark.parametrize('recipe', sorted(SCHEDULES))
def test_schedule_is_the_extensions(recipe, tmp_path):
    """The alpha of every step, from Schedule, is what train.py's
    extension set before that step; alpha_t is Chainer's."""
    settings = SCHEDULES[recipe]
    schedule = static_step.Schedule(ALPHA, settings['decay'],
                                    settings['decay_steps'],
                                    settings['floor'], B, N)
    trainer, _, optimizer = make_trainer(recipe, False, tmp_path)
    core, seen = trainer.updater.update_core, []

    def recording():
        seen.append(optimizer.alpha)
        core()

    trainer.updater.update_core = recording
    trainer.run(show_loop_exception_msg=False)
    expected = [schedule.alpha(t) for t in range(1, STEPS + 1)]
    assert seen == expected
    assert len(set(expected)) > 3   # it decayed, several times
    if recipe == 'paper':
        assert expected[-1] == settings['floor']   # and reached its floor
    for t in (1, 2, 17, STEPS):
        fix1, fix2 = 1 - math.pow(0.9, t), 1 - math.pow(0.999, t)
        assert schedule.alpha_t(t) == numpy.float32(
            expected[t - 1] * math.sqrt(fix2) / fix1)


@pytest.mark.parametrize('recipe', sorted(SCHEDULES))
def test_static_step_equals_todays_bit_for_bit(recipe, today, tmp_path):
    trainer, model, optimizer = make_trainer(recipe, True, tmp_path,
                                             with_extension=False)
    trainer.run(show_loop_exception_msg=False)
    expected_state, expected_log, expected_alpha = today[recipe]
    assert_bitwise_equal(state(model, optimizer), expected_state)
    # the epoch means reported once per epoch equal LogReport's means of
    # the per-step values; optimizer.alpha (observe_value's) follows too
    assert log_of(trainer) == expected_log
    assert len(expected_log) == STEPS * B // N
    assert optimizer.alpha == expected_alpha
    # the buffers were allocated once
    assert trainer.updater.step.x.shape == (B, 1, 28, 28)


@pytest.mark.parametrize('source', ['static', 'augmenting'])
@pytest.mark.parametrize('recipe', sorted(SCHEDULES))
def test_resume_mid_epoch_equals_the_uninterrupted_run(recipe, source, today,
                                                       tmp_path):
    """A snapshot at step 23 (mid-epoch), loaded into a fresh static
    trainer, continued to step 50: today's uninterrupted result."""
    first, _, _ = make_trainer(recipe, source == 'static', tmp_path / 'a',
                               stop=23)
    first.run(show_loop_exception_msg=False)
    path = str(tmp_path / 'snapshot.npz')
    chainer.serializers.save_npz(path, first)
    second, model, optimizer = make_trainer(recipe, True, tmp_path / 'b')
    chainer.serializers.load_npz(path, second)
    assert optimizer.t == 23
    second.run(show_loop_exception_msg=False)
    expected_state, expected_log, _ = today[recipe]
    assert_bitwise_equal(state(model, optimizer), expected_state)
    if source == 'static':   # the sums of the interrupted epoch came along
        assert log_of(second) == expected_log


def test_divergence_is_found_at_the_report(tmp_path):
    trainer, model, _ = make_trainer('paper', True, tmp_path, stop=STEPS)
    model.conv1.b.array[0] = numpy.nan
    with pytest.raises(RuntimeError, match='diverge'):
        trainer.run(show_loop_exception_msg=False)
    # in the first epoch's last step (step 3: 3 * 4 >= 10), whose count
    # the raise cuts off, and not before
    assert trainer.updater.iteration == 2
    assert trainer.updater.get_optimizer('main').t == 3


def test_other_optimizers_are_refused():
    model = small_capsnet()
    optimizer = chainer.optimizers.MomentumSGD()
    optimizer.setup(model)
    with pytest.raises(ValueError, match='Adam'):
        static_step.check_optimizer(optimizer)
    optimizer = chainer.optimizers.Adam(amsgrad=True)
    optimizer.setup(model)
    with pytest.raises(ValueError, match='amsgrad'):
        static_step.check_optimizer(optimizer)


def test_alpha_t_table_is_refilled_in_place(monkeypatch, tmp_path):
    """A table of 8 steps, refilled 6 times over 50: the same result."""
    monkeypatch.setattr(static_step, 'TABLE_STEPS', 8)
    trainer, model, optimizer = make_trainer('official', True, tmp_path,
                                             with_extension=False)
    fills = []
    original = static_step.StaticStep.fill_table

    def fill_table(step, base):
        fills.append((base, id(step.table)))
        original(step, base)

    monkeypatch.setattr(static_step.StaticStep, 'fill_table', fill_table)
    trainer.run(show_loop_exception_msg=False)
    assert [base for base, _ in fills] == list(range(0, STEPS, 8))
    assert len({table for _, table in fills}) == 1   # the same buffer


def test_epoch_timer_reports_train_and_other_seconds(tmp_path):
    ticks = iter(range(10 ** 6))
    trainer, _, _ = make_trainer('paper', True, tmp_path, stop=6,
                                 timer=True)
    timer = trainer.get_extension('EpochTimer')
    timer.clock = lambda: float(next(ticks))
    trainer.run(show_loop_exception_msg=False)
    log = trainer.get_extension('log').log
    assert [entry['epoch'] for entry in log] == [1, 2]
    # each step is one tick of the fake clock (epoch 1: steps 1-3, 3 * 4
    # >= 10; epoch 2: steps 4-5), everything else the other ticks
    assert [entry['time/train'] for entry in log] == [3.0, 2.0]
    assert all(entry['time/other'] > 0 for entry in log)
    total = sum(e['time/train'] + e['time/other'] for e in log)
    assert total == timer._last - 0.0
