"""Faults (issue 14): a full disk, damaged model files, Ctrl-C and SIGTERM,
a diverging run, out-of-range numbers and memory, resume settings, damaged
snapshots and two processes on one --out. Each test injects its fault: the
full disk by making ``cli.free_bytes`` report no room or a write raise
OSError(ENOSPC), the signals by sending them to a real process."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import cli
import evaluate
from capsnet import files
import nets
from capsnet.errors import CapsNetError
import predict
import train
from capsnet import devices
from capsnet.training import loop, plots, snapshots
from capsnet.training.settings import Settings
from capsnet.training import extensions as ext
import visualize
from conftest import MNIST_DIR as MNIST
from conftest import assert_one_error, needs_mnist, one_error_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--train-size', '150', '--test-size', '50', '-b', '50',
        '--routing', '1', '--no-progress']


def leftovers(folder):
    return [n for n in os.listdir(folder)
            if n.endswith('.tmp') or n.startswith('tmp')]


# --------------------------------------------------------------------------
# 1. A full disk
# --------------------------------------------------------------------------

def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path,
                                                        monkeypatch):
    path = tmp_path / 'final.json'
    files.write_text(str(path), 'old\n')

    def no_room(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', no_room)
    with pytest.raises(cli.DiskFullError) as info:
        files.write_text(str(path), 'new' * 1000)
    message = str(info.value)
    assert str(path) in message and 'needs about' in message
    assert path.read_text() == 'old\n'
    assert leftovers(str(tmp_path)) == []


def test_atomic_write_refuses_up_front_without_room(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, 'free_bytes', lambda folder: 10)
    with pytest.raises(cli.DiskFullError, match='needs about 0.1 kB, 0.0 kB '
                       'free'):
        files.write_text(str(tmp_path / 'x.json'), 'x' * 100)
    assert os.listdir(str(tmp_path)) == []


def test_run_main_maps_enospc_to_one_line(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, 'No space left on device', 'out/log')
    assert cli.run_main(main) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'no space left on the disk while writing out/log' in line


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('epochs, lost, plots', [
    (2, 'snapshot_epoch_2', False), (1, 'model.npz', False),
    (2, 'loss.png', True)])
def test_train_on_a_disk_that_fills_keeps_the_last_epoch(
        tmp_path, monkeypatch, capsys, epochs, lost, plots):
    """The disk fills once epoch 1's snapshot is written: the next write
    (epoch 2's snapshot or the model without the plots, else epoch 2's
    loss.png: the plots come before the snapshot) is one line naming it,
    and epoch 1's snapshot (and plot) is intact, so --autoload loses at
    most the epoch in progress."""
    from chainer.training import extensions
    if not plots:  # as without matplotlib
        monkeypatch.setattr(extensions.PlotReport, 'available',
                            staticmethod(lambda: False))
    out = tmp_path / 'out'
    first = out / 'snapshot_epoch_1'
    monkeypatch.setattr(cli, 'free_bytes', lambda folder: 0 if first.exists()
                        else 10 ** 12)
    with pytest.raises(CapsNetError) as info:
        cli.run_main(train.main, ['--data-dir', MNIST, *TINY, '-e',
                                  str(epochs), '-o', str(out), '--save',
                                  str(out / 'model.npz')])
    assert info.value.status == 1
    line = one_error_line(capsys.readouterr().err)
    assert lost in line and 'needs about' in line, line
    if lost != 'model.npz':  # not a run's end: it can go on
        assert line.endswith('; then continue with --autoload from {}'
                             .format(first)), line
    if plots:  # epoch 1's
        assert (out / lost).read_bytes().startswith(b'\x89PNG')
    else:
        assert not (out / lost).exists()
    assert leftovers(str(out)) == []
    assert snapshots.readable_snapshot(str(first)) is None


@pytest.mark.slow
@needs_mnist
def test_train_log_on_a_full_disk_is_one_line(tmp_path, monkeypatch,
                                              capsys):
    """Chainer's LogReport finds the disk full: one line naming --out and
    the intact snapshot to continue from."""
    from chainer.training.extensions import log_report
    out = tmp_path / 'out'

    class FullDisk:
        dumps, loads = staticmethod(json.dumps), staticmethod(json.loads)

        @staticmethod
        def dump(obj, f, **options):
            if (out / 'snapshot_epoch_1').exists():
                raise OSError(errno.ENOSPC, 'No space left on device')
            json.dump(obj, f, **options)
    monkeypatch.setattr(log_report, 'json', FullDisk)
    with pytest.raises(CapsNetError):
        cli.run_main(train.main, ['--data-dir', MNIST, *TINY, '-e', '3',
                                  '-o', str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert 'the log or the plots in {}'.format(out) in line, line
    assert '--autoload from {}'.format(out / 'snapshot_epoch_1') in line
    assert leftovers(str(out)) == []


def plot_once(out, value):
    """One LossPlot('loss.png') call, as the trainer makes it."""
    log = types.SimpleNamespace(log=[{'epoch': 1, 'main/loss': value}])
    plots.LossPlot(keys=['main/loss'], log_report=log)(
        types.SimpleNamespace(out=str(out)))


def test_plots_on_a_full_disk_keep_the_previous_png(tmp_path, monkeypatch):
    """loss.png / accuracy.png: a disk that fills during the write, or has
    no room up front, leaves the previous plot and no temporary file."""
    plot_once(tmp_path, 1.0)
    before = (tmp_path / 'loss.png').read_bytes()
    assert before.startswith(b'\x89PNG') and leftovers(str(tmp_path)) == []

    def no_room(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    with monkeypatch.context() as patch:
        patch.setattr(os, 'fsync', no_room)
        with pytest.raises(cli.DiskFullError, match='loss.png is intact'):
            plot_once(tmp_path, 2.0)
    assert (tmp_path / 'loss.png').read_bytes() == before
    assert leftovers(str(tmp_path)) == []
    monkeypatch.setattr(cli, 'free_bytes', lambda folder: 10)
    with pytest.raises(cli.DiskFullError, match='not enough free space'):
        plot_once(tmp_path, 3.0)
    assert (tmp_path / 'loss.png').read_bytes() == before
    assert sorted(os.listdir(str(tmp_path))) == ['loss.png']


def test_train_writes_its_plots_atomically():
    from chainer.training import extensions
    added = []
    trainer = types.SimpleNamespace(extend=lambda e, **kw: added.append(e))
    loop.add_reports(trainer, Settings(no_progress=True),
                     types.SimpleNamespace(reconstruct=False, arch='capsnet'),
                     {'test': None})
    drawn = [e for e in added if isinstance(e, plots.EpochPlot)]
    assert sorted(e.file_name for e in drawn) == [
        'accuracy.png', 'error.png', 'loss.png']
    assert not any(isinstance(e, extensions.PlotReport) for e in added)


def test_train_refuses_a_disk_without_room_for_snapshots(tmp_path,
                                                         monkeypatch,
                                                         capsys):
    monkeypatch.setattr(cli, 'free_bytes', lambda folder: 10 ** 6)
    assert cli.run_main(train.main, ['--data-dir', MNIST, *TINY, '-e', '1',
                                     '-o', str(tmp_path / 'out')]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'not enough free space' in line and 'the snapshots' in line


# --------------------------------------------------------------------------
# 2. Models with NaN or inf weights
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def nan_model_path(tmp_path_factory):
    numpy.random.seed(0)
    model = nets.CapsNet()
    model.decoder.fc1.W.array[0, 0] = numpy.nan
    model.conv1.b.array[0] = numpy.inf
    path = str(tmp_path_factory.mktemp('bad') / 'nan.npz')
    files.save_model(path, model)
    return path


def test_load_model_refuses_non_finite_weights(nan_model_path):
    with pytest.raises(files.ModelFileError, match='NaN or inf weights'):
        files.load_model(nan_model_path, nets.ARCHITECTURES)


@pytest.mark.parametrize('cut', [100, 0.5], ids=['header', 'half'])
def test_a_truncated_model_file_is_closed(fresh_model_path, tmp_path, cut):
    """numpy.load leaves the file of a damaged .npz open (a ResourceWarning
    on Python 3.13 and a leaked handle in a long process)."""
    import gc
    import warnings
    data = open(fresh_model_path, 'rb').read()
    path = tmp_path / 'cut.npz'
    path.write_bytes(data[:cut if cut > 1 else int(len(data) * cut)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for load in (lambda p: files.load_model(p, nets.ARCHITECTURES),
                     snapshots.readable_snapshot):
            try:
                load(str(path))
            except files.ModelFileError:
                pass
        gc.collect()
    assert [str(w.message) for w in caught
            if issubclass(w.category, ResourceWarning)] == []


def test_final_json_errors_are_counted(tmp_path):
    """final.json's errors come from counts: 59 of 10000 is 0.0059, not
    1 - float32 accuracy = 0.005900013446807861."""
    settings = train.parse_settings(['-o', str(tmp_path)])
    final = ext.FinalReport('test/main/accuracy')
    final.history = [(1, float(numpy.float32(0.9912))),
                     (2, float(numpy.float32(0.9941))),
                     (3, float(numpy.float32(0.9937)))]
    loop.finish(settings, nets.CapsNet(routing=1, reconstruct=False), final,
                (60000, 0, 10000), 1, log=lambda line: None)
    text = (tmp_path / 'final.json').read_text()
    summary = json.loads(text)
    assert summary['final_test_errors'] == 63
    assert summary['best_on_test_errors'] == 59
    assert '"final_test_error": 0.0063,' in text
    assert '"best_on_test_error": 0.0059,' in text


@pytest.mark.parametrize('tool, argv', [
    (predict, ['--json', 'digit.png']),
    (evaluate, ['--json', '--test-size', '10']),
    (visualize, []),
], ids=['predict', 'evaluate', 'visualize'])
def test_every_tool_refuses_a_model_with_nan_weights(
        run_tool, nan_model_path, tmp_path, tool, argv):
    status, out, err = run_tool(tool.main, ['--load', nan_model_path,
                                            '-o' if tool is not predict
                                            else '--batchsize',
                                            str(tmp_path / 'o')
                                            if tool is not predict else '1']
                                + argv)
    assert status != 0 and out == ''
    line = one_error_line(err)
    assert 'NaN or inf weights' in line and 'decoder/fc1/W' in line
    assert not (tmp_path / 'o').exists()


# --------------------------------------------------------------------------
# 3. Ctrl-C and SIGTERM
# --------------------------------------------------------------------------

def start(*argv):
    return subprocess.Popen([sys.executable, *[str(a) for a in argv]],
                            cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))


def wait_for(condition, process, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130),
                                            (signal.SIGTERM, 143)])
def test_train_interrupted_is_one_line_and_resumable(tmp_path, signum,
                                                     status):
    out = tmp_path / 'out'
    process = start('train.py', '--data-dir', MNIST, *TINY, '-e', '50',
                    '-o', out)
    wait_for(lambda: (out / 'snapshot_epoch_1').exists(), process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert one_error_line(err) == \
        'error: interrupted; resume with --autoload'
    assert leftovers(str(out)) == []
    assert not (out / files.LOCK_NAME).exists()
    assert snapshots.readable_snapshot(str(out / 'snapshot_epoch_1')) is None


SIGNALS = [('INT', 130), ('TERM', 143)]
TOOLS = ['train.py', 'visualize.py', 'evaluate.py', 'predict.py',
         'experiments.py', 'dev/benchmark.py', 'dev/gpu_check.py']


def interrupt(point, signame, tool, *argv):
    """Run ``tool`` under tests/interrupt_at.py, which sends it SIGsigname
    at ``point``; the finished process."""
    return subprocess.run(
        [sys.executable, os.path.join('tests', 'interrupt_at.py'), point,
         signame, tool, *[str(a) for a in argv]], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))


@pytest.mark.parametrize('signame, status', SIGNALS)
@pytest.mark.parametrize('tool', TOOLS)
def test_a_signal_while_a_tool_imports_is_one_line(tool, signame, status):
    """Ctrl-C or SIGTERM while the tool is still importing (NumPy for most;
    benchmark.py and gpu_check.py import only the standard library at the
    top, so json there): one line and 130 / 143, not a traceback (nor a
    silent death by SIGTERM)."""
    module = 'json' if tool in ('dev/benchmark.py', 'dev/gpu_check.py') else \
        'numpy'
    result = interrupt('import:' + module, signame, tool, '--help')
    assert result.returncode == status, result.stderr
    assert one_error_line(result.stderr) == 'error: interrupted'
    assert result.stdout == ''


def leftovers_below(folder):
    """Temporary files and folders, and lock files, anywhere below."""
    found = []
    for top, dirs, names in os.walk(str(folder)):
        found += [os.path.join(top, n) for n in dirs + names
                  if n.endswith('.tmp') or n.startswith('tmp') or
                  n == files.LOCK_NAME]
    return found


@pytest.fixture(scope='module')
def multimnist_model_path(tmp_path_factory):
    state = numpy.random.get_state()
    numpy.random.seed(0)
    path = str(tmp_path_factory.mktemp('models') / 'two.npz')
    files.save_model(path, nets.TwoDigitCapsNet())
    numpy.random.set_state(state)
    return path


EXPERIMENTS_INTERRUPTED = ('error: interrupted; run the same command again '
                           'to continue the sweep')
# (tool and its flags, where the signal comes, the message, files that an
# uninterrupted run writes into OUT and this one must not)
SIGNAL_POINTS = {
    'evaluate': (['evaluate.py', '--test-size', '20'], 'write',
                 'error: interrupted', ['confusion.png', 'evaluation.json']),
    'visualize': (['visualize.py'], 'write', 'error: interrupted',
                  ['vis.png']),
    'benchmark': (['dev/benchmark.py', '-b', '2', '--repeats', '1', '--warmup',
                   '0'], 'call:chainer.optimizers:Adam.update',
                  'error: interrupted', []),
    'multimnist': (['experiments.py', 'multimnist', '--epoch', '1',
                    '--train-digits', '30', '--pairs-per-digit', '2',
                    '--test-digits', '20', '--test-pairs-per-digit', '1',
                    '--rows', 'capsnet', '--batchsize', '20'], 'write',
                   EXPERIMENTS_INTERRUPTED,
                   ['data/multimnist-train.npz']),
    'affnist': (['experiments.py', 'affnist', '--epoch', '1',
                 '--train-size', '20', '--test-size', '10', '--rows',
                 'capsnet', '--batchsize', '10'],
                'call:chainer.optimizers:Adam.update',
                EXPERIMENTS_INTERRUPTED, ['capsnet-trial0/final.json']),
    'figure5': (['experiments.py', 'figure5', '--test-digits', '30'],
                'write', EXPERIMENTS_INTERRUPTED, ['figure5.json']),
}


@needs_mnist
@pytest.mark.parametrize('signame, status', SIGNALS)
@pytest.mark.parametrize('case', sorted(SIGNAL_POINTS))
def test_a_signal_at_work_is_one_line_and_leaves_no_temp_files(
        tmp_path, fresh_model_path, multimnist_model_path, case, signame,
        status):
    """SIGINT / SIGTERM sent at a chosen point of each tool's work (in the
    middle of its first atomic write, or in a training step): one line,
    130 / 143, no temporary file or lock left, nothing half-written."""
    argv, point, message, not_written = SIGNAL_POINTS[case]
    out = tmp_path / 'out'
    if case != 'benchmark':
        argv = argv + ['--out', out, '--data-dir', MNIST]
    if case in ('evaluate', 'visualize'):
        argv += ['--load', fresh_model_path]
    elif case == 'figure5':
        argv += ['--load', multimnist_model_path]
    result = interrupt(point, signame, *argv)
    assert result.returncode == status, result.stderr
    assert one_error_line(result.stderr) == message
    assert leftovers_below(tmp_path) == []
    for name in not_written:
        assert not (out / name).exists(), name


def test_an_interrupted_snapshot_write_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM (raised as cli.Terminated) during a snapshot's write: the
    temp file goes, the earlier snapshot stays."""
    (tmp_path / 'snapshot_epoch_1').write_bytes(b'epoch 1')

    def terminated(fd):
        raise cli.Terminated()
    monkeypatch.setattr(os, 'fsync', terminated)
    with pytest.raises(cli.Terminated):
        snapshots.AtomicSnapshotWriter()('snapshot_epoch_2', str(tmp_path),
                                     {'x': numpy.zeros(3)})
    assert sorted(os.listdir(str(tmp_path))) == ['snapshot_epoch_1']


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130),
                                            (signal.SIGTERM, 143)])
def test_predict_interrupted_is_one_line(tmp_path, fresh_model_path, signum,
                                         status):
    from PIL import Image
    image = tmp_path / 'digit.png'
    pixels = numpy.zeros((28, 28), numpy.uint8)
    pixels[6:22, 12:16] = 255  # a 1
    Image.fromarray(pixels).save(str(image))
    process = start('predict.py', '--load', fresh_model_path, '-b', '1',
                    *[image] * 2000)
    wait_for(lambda: process.stdout.readline() != '', process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert one_error_line(err) == 'error: interrupted'


@pytest.mark.slow
@needs_mnist
def test_sweep_terminated_stops_its_run(tmp_path):
    out = tmp_path / 'sweep'
    process = start('experiments.py', 'table1', '--epoch', '50', '--trials',
                    '1', '--rows', 'r1', '--out', out, '--data-dir', MNIST,
                    '--train-size', '150', '--test-size', '50', '-b', '50')
    run = out / 'r1-trial0'
    wait_for(lambda: (run / 'snapshot_epoch_1').exists(), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert one_error_line(err).startswith('error: interrupted; run the same')
    assert not (out / files.LOCK_NAME).exists()
    assert not (run / files.LOCK_NAME).exists()  # train.py ended too
    assert leftovers(str(run)) == []


# --------------------------------------------------------------------------
# 4. Divergence
# --------------------------------------------------------------------------

@needs_mnist
def test_divergence_is_one_line_with_advice(tmp_path, monkeypatch, capsys):
    update = ext.AugmentingUpdater.update_core

    def diverge(self):
        update(self)
        if self.iteration >= 1:
            self.get_optimizer('main').target.conv1.W.array[0] = numpy.nan
    monkeypatch.setattr(ext.AugmentingUpdater, 'update_core',
                        diverge)
    assert cli.run_main(train.main, ['--data-dir', MNIST, *TINY, '-e', '1',
                                     '-o', str(tmp_path / 'out')]) == 1
    line = one_error_line(capsys.readouterr().err)
    for fragment in ('diverged: a parameter became NaN or inf (found at '
                     'epoch 0.67, iteration 2)',
                     'lower --alpha (now 0.001)', '--resume'):
        assert fragment in line, line


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


# --------------------------------------------------------------------------
# 5. Ranges and memory
# --------------------------------------------------------------------------

@pytest.mark.parametrize('args, fragments', [
    (['--seed', '-1'], ['--seed', "must be an integer from 0 to 4294967293, "
                                  "got '-1'"]),
    (['--seed', '4294967294'], ['--seed', 'must be an integer from 0']),
    (['--leaky-slope', '7'], ["must be a number from -1 to 1, got '7'"]),
    (['--max-shift', '28'], ['--max-shift', 'below --input-size (28)']),
    (['--input-size', '4000'], ['needs about', 'GB of memory',
                                'lower --input-size']),
], ids=['seed-negative', 'seed-too-large', 'leaky-slope', 'max-shift',
        'input-size'])
def test_train_numbers_out_of_range(run_tool, tmp_path, args, fragments):
    status, _, err = run_tool(train.main, ['-o', tmp_path / 'out'] + args)
    assert status in (1, 2)
    line = one_error_line(err)
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / 'out').exists()


def test_experiments_seed_range(run_tool, tmp_path):
    import experiments
    status, _, err = run_tool(experiments.main, [
        'table1', '--epoch', '1', '--out', tmp_path, '--seed', '4294967293',
        '--trials', '2'])
    assert status == 2
    assert 'gives seeds above 4294967293' in one_error_line(err)


def test_inference_batches_are_split_to_fit(fresh_model_path, monkeypatch):
    from capsnet import devices
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    monkeypatch.setattr(devices, 'physical_memory', lambda: 4 * 10 ** 9)
    said = []
    assert devices.inference_batch(model, 100, say=said.append) == 100
    assert said == []
    chunk = devices.inference_batch(model, 10 ** 9, say=said.append)
    assert 100 < chunk < 5000
    assert said == ['a batch of 1000000000 examples would take about '
                    '3037312.0 GB, more than 25% of the 4.0 GB of memory; it '
                    'is evaluated in chunks of {} (the results are the '
                    'same)'.format(chunk)]


def test_inference_batches_on_a_gpu_fit_the_gpu_memory(fresh_model_path):
    """On CuPy the chunk is judged from the GPU's memory, not the RAM's (a
    stand-in model reports a 2 GB GPU; no GPU is needed)."""
    from capsnet import devices
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)

    class OnGpu:
        xp = object()   # anything but numpy
        device = type('D', (), {'device': type('C', (), {
            'mem_info': (10 ** 9, 2 * 10 ** 9)})()})()
        inference_bytes_per_example = model.inference_bytes_per_example
    said = []
    gpu_chunk = devices.inference_batch(OnGpu(), 10 ** 9, say=said.append)
    per_example = devices.inference_bytes_per_example(model)
    assert gpu_chunk == 2 * 10 ** 9 // 4 // per_example
    assert 'of the 2.0 GB of GPU memory' in said[0]

    class Broken(OnGpu):
        device = None   # a CuPy error: no limit rather than a traceback
    assert devices.inference_batch(Broken(), 123) == 123


def test_a_huge_eval_batchsize_is_not_refused():
    """Evaluation runs in chunks, so --eval-batchsize alone never makes
    train.py refuse a run (it did: 'needs about N GB of memory')."""
    huge = train.parse_settings(['--eval-batchsize', '100000000'])  # no error
    small = train.parse_settings(['--eval-batchsize', '200'])

    def estimate(settings):
        return nets.memory_estimate(
            settings.arch, settings.model_options(), settings.batchsize,
            settings.eval_batchsize, devices.physical_memory(),
            devices.INFERENCE_SHARE)
    assert estimate(huge) >= estimate(small)


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


@needs_mnist
def test_evaluate_and_predict_split_a_huge_batch(run_tool, fresh_model_path,
                                                 tmp_path, monkeypatch):
    """-b larger than memory allows: said once, and the figures are those
    of a small batch."""
    from capsnet import devices
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    per_example = devices.inference_bytes_per_example(model)
    flags = ['--load', fresh_model_path, '--data-dir', MNIST, '--test-size',
             '30', '--json']
    status, small, _ = run_tool(evaluate.main, flags + [
        '-o', tmp_path / 'a', '-b', '7'])
    assert status == 0
    monkeypatch.setattr(devices, 'physical_memory', lambda: 4 * 7 *
                        per_example + 3)
    status, chunked, err = run_tool(evaluate.main, flags + [
        '-o', tmp_path / 'b', '-b', '100000'])
    assert status == 0
    assert err.count('it is evaluated in chunks of 7') == 1, err
    assert 'a batch of 30 examples' in err
    small, chunked = json.loads(small), json.loads(chunked)
    assert small.pop('model') == chunked.pop('model') == fresh_model_path
    assert small == chunked

    from PIL import Image
    image = tmp_path / 'digit.png'
    pixels = numpy.zeros((28, 28), numpy.uint8)
    pixels[6:22, 12:16] = 255
    Image.fromarray(pixels).save(str(image))
    status, out, err = run_tool(predict.main, [
        '--load', fresh_model_path, '--json', '-b', '1000'] + [image] * 9)
    assert status == 0 and len(out.splitlines()) == 9
    assert one_line(err).endswith('it is evaluated in chunks of 7 (the '
                                  'results are the same)')


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.slow
@needs_mnist
def test_train_evaluates_a_huge_eval_batch_in_chunks(tmp_path, monkeypatch,
                                                     run_tool):
    """--eval-batchsize 100000000 is no longer refused: the test set is
    evaluated in chunks (said once), with exactly the figures of
    --eval-batchsize 7."""
    from capsnet import devices

    def run(out, eval_batchsize):
        status, stdout, err = run_tool(train.main, [
            '--data-dir', MNIST, *TINY, '-e', '1', '-o', out,
            '--eval-batchsize', eval_batchsize])
        assert status == 0, err
        with open(str(out / 'log')) as f:
            return stdout, json.load(f)[-1]
    _, small = run(tmp_path / 'small', 7)
    monkeypatch.setattr(devices, 'inference_bytes_per_example',
                        lambda model: devices.physical_memory() // 4 // 7)
    stdout, chunked = run(tmp_path / 'chunked', 100000000)
    assert stdout.count('evaluated in chunks of 7') == 1, stdout
    assert 'a batch of 50 examples' in stdout
    for key in ('test/main/loss', 'test/main/accuracy'):
        assert chunked[key] == small[key], key


# --------------------------------------------------------------------------
# 6. Resume: settings, an epoch already passed, damaged snapshots
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory):
    """A TINY run of two epochs: snapshot_epoch_1 and _2 in its --out."""
    if not os.path.isdir(MNIST):
        pytest.skip('no MNIST')
    out = tmp_path_factory.mktemp('resume') / 'out'
    train.main(['--data-dir', MNIST, *TINY, '-e', '2', '-o', str(out)])
    return out


def copy_run(two_epochs, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(str(two_epochs), str(out))
    return out


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('flags, fragment', [
    (['-b', '30'], 'batchsize=50 in the snapshot, 30 asked'),
    (['--seed', '5'], 'seed=0 in the snapshot, 5 asked'),
    (['--alpha', '0.01'], 'alpha=0.001 in the snapshot, 0.01 asked'),
    (['--train-size', '100'], 'train_size=150 in the snapshot, 100 asked'),
    (['-e', '1'], 'is at epoch 2, beyond --epoch 1; pass --epoch 2'),
], ids=['batchsize', 'seed', 'alpha', 'train-size', 'epoch-passed'])
def test_resume_with_other_settings_is_refused(two_epochs, tmp_path,
                                               run_tool, flags, fragment):
    out = copy_run(two_epochs, tmp_path)
    argv = ['--data-dir', MNIST, *TINY, '-e', '3', '-o', out, '--autoload']
    argv[argv.index('-b') + 1] = '50'
    status, _, err = run_tool(train.main, argv + flags)
    assert status == 1
    assert fragment in one_error_line(err)
    assert not (out / 'snapshot_epoch_3').exists()


@pytest.mark.slow
@needs_mnist
def test_autoload_skips_a_damaged_newest_snapshot(two_epochs, tmp_path,
                                                  run_tool):
    out = copy_run(two_epochs, tmp_path)
    newest = out / 'snapshot_epoch_2'
    newest.write_bytes(newest.read_bytes()[:5000])
    status, stdout, err = run_tool(train.main, [
        '--data-dir', MNIST, *TINY, '-e', '2', '-o', out, '--autoload'])
    assert status == 0, err
    assert 'skipping the damaged snapshot {}'.format(newest) in stdout
    assert 'resumed from {} at epoch 1'.format(out / 'snapshot_epoch_1') \
        in stdout
    summary = json.loads((out / 'final.json').read_text())
    assert summary['resumed_from'] == str(out / 'snapshot_epoch_1')
    assert summary['batchsize'] == 50 and summary['alpha'] == 0.001
    assert snapshots.readable_snapshot(str(newest)) is None  # written again


# --------------------------------------------------------------------------
# 7. One process per --out
# --------------------------------------------------------------------------

def dead_pid():
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def test_a_live_lock_refuses_a_second_run(tmp_path, run_tool):
    out = tmp_path / 'out'
    out.mkdir()
    (out / files.LOCK_NAME).write_text('{} train.py\n'.format(os.getppid()))
    status, _, err = run_tool(train.main, ['-o', out, '--data-dir', MNIST])
    assert status == 1
    assert 'is in use by process {} (train.py)'.format(os.getppid()) in \
        one_error_line(err)


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / files.LOCK_NAME).write_text('{} experiments.py\n'.format(pid))
    path = files.lock_folder(str(tmp_path), 'train.py')
    assert 'taking over the stale lock of process {} (experiments.py)' \
        .format(pid) in capsys.readouterr().out
    assert files.read_lock(path) == (os.getpid(), 'train.py')
    files.unlock(path)
    assert not os.path.exists(path)


def test_two_sweeps_on_one_out(tmp_path):
    out = tmp_path / 'sweep'
    out.mkdir()
    (out / files.LOCK_NAME).write_text('{} experiments.py\n'.format(os.getppid()))
    result = subprocess.run(
        [sys.executable, 'experiments.py', 'table1', '--epoch', '1',
         '--trials', '1', '--rows', 'r1', '--out', str(out)],
        cwd=REPO, capture_output=True, text=True)
    assert_one_error(result, 'is in use by process', status=1)


# --------------------------------------------------------------------------
# --save that is a folder
# --------------------------------------------------------------------------

def test_save_to_a_folder_is_refused_up_front(run_tool, tmp_path):
    status, _, err = run_tool(train.main, ['-o', tmp_path / 'out', '--save',
                                           tmp_path])
    assert status == 1
    assert 'is a folder; give a file name' in one_error_line(err)
    assert not (tmp_path / 'out').exists()


def test_a_zombie_holder_counts_as_dead():
    """After kill -9 of an mpiexec, its ranks can stay zombies for a while
    (reparented, not yet reaped): their locks are stale, not live."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    deadline = time.time() + 30
    while time.time() < deadline:   # exited, not yet waited for
        with open('/proc/{}/stat'.format(child.pid)) as f:
            if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                break
        time.sleep(0.05)
    assert not files._alive(child.pid)
    child.wait()
    assert files._alive(os.getpid())
