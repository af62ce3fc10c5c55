"""capsnet/training/extensions.py: the divergence check (how often it
reads the GPU back, before the snapshot), the exact evaluator in chunks,
the newest snapshot of a folder."""
import types

import numpy
import pytest

from capsnet.training import extensions as ext
import nets


def fake_trainer(xp, iteration, is_new_epoch, broken):
    """What FailOnNonNumber reads of a trainer: its updater's optimizers,
    their targets' parameters and array module, the iteration."""
    model = nets.CapsNet(routing=1)
    if broken:
        model.W.array[0, 0, 0, 0] = numpy.inf
    # xp stands for CuPy when it is not numpy itself
    target = types.SimpleNamespace(xp=xp, params=model.params)
    optimizer = types.SimpleNamespace(target=target)
    updater = types.SimpleNamespace(
        iteration=iteration, is_new_epoch=is_new_epoch,
        get_all_optimizers=lambda: {'main': optimizer})
    return types.SimpleNamespace(updater=updater)


# the NumPy functions the check calls, in a module that is not numpy
GPU_LIKE = types.SimpleNamespace(isfinite=numpy.isfinite, stack=numpy.stack)


@pytest.mark.parametrize('xp, iteration, is_new_epoch, checked', [
    (numpy, 7, False, True),          # CPU: every iteration
    (GPU_LIKE, 7, False, False),      # GPU: not between the intervals,
    (GPU_LIKE, 200, False, True),     # at every 100th iteration
    (GPU_LIKE, 7, True, True),        # and at each epoch's end
], ids=['cpu', 'gpu-between', 'gpu-interval', 'gpu-epoch-end'])
def test_divergence_check_reads_the_gpu_back_rarely(xp, iteration,
                                                    is_new_epoch, checked):
    check = ext.FailOnNonNumber(gpu_interval=100)
    check(fake_trainer(xp, iteration, is_new_epoch, broken=False))
    broken = fake_trainer(xp, iteration, is_new_epoch, broken=True)
    if checked:
        with pytest.raises(RuntimeError, match='diverge'):
            check(broken)
    else:
        check(broken)


def test_divergence_check_runs_before_the_snapshot():
    import chainer.training.extensions as extensions
    snapshot = extensions.snapshot()
    assert ext.FailOnNonNumber.priority > snapshot.priority


def tiny_capsnet_and_data(n=23):
    numpy.random.seed(0)
    model = nets.CapsNet(routing=1, reconstruct=True)
    rs = numpy.random.RandomState(1)
    data = ext.chainer.datasets.TupleDataset(
        rs.rand(n, 1, 28, 28).astype(numpy.float32),
        rs.randint(0, 10, n).astype(numpy.int32))
    return model, data


def test_exact_evaluator_in_chunks_gives_the_same_figures():
    """One batch of 23 evaluated in chunks of 5 gives exactly what batches
    of 5 give, and the model never sees more than 5 examples at once."""
    import chainer
    model, data = tiny_capsnet_and_data()
    seen = []

    def evaluate(batchsize, chunk):
        def forward(x, t):
            seen.append(len(x))
            return model(x, t)
        iterator = chainer.iterators.SerialIterator(
            data, batchsize, repeat=False, shuffle=False)
        reporter = chainer.Reporter()
        reporter.add_observer('main', model)
        with reporter:
            result = ext.ExactEvaluator(
                iterator, model, eval_func=forward, chunk=chunk).evaluate()
        return {key: float(getattr(value, 'array', value))
                for key, value in result.items()}
    chunked = evaluate(10 ** 8, 5)
    assert seen == [5, 5, 5, 5, 3]
    small = evaluate(5, None)
    assert set(small) >= {'main/loss', 'main/accuracy'}
    assert chunked == small
    whole = evaluate(23, None)
    assert abs(whole['main/accuracy'] - chunked['main/accuracy']) < 1e-6


def test_newest_snapshot_picks_the_highest_epoch(tmp_path):
    for epoch in (2, 10, 9):
        (tmp_path / 'snapshot_epoch_{}'.format(epoch)).write_bytes(b'')
    (tmp_path / 'snapshot_epoch_x').write_bytes(b'')
    newest = ext.newest_snapshot
    assert newest(str(tmp_path)).endswith('snapshot_epoch_10')
    assert newest(str(tmp_path / 'none')) is None
