"""train.py end to end on real MNIST: accuracy, outputs, resume, bad input."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import matplotlib.image
import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import cli, devices, figures, files
from capsnet.data import mnist
from capsnet.kernels import KernelOptions
from capsnet.training import loop, snapshots
from capsnet.training import extensions as ext
import nets
import train
import visualize
from conftest import (TINY_TRAIN, assert_one_error, leftovers, needs_mnist,
                      one_error_line, run_script, start, wait_for)
from conftest import MNIST_DIR as MNIST
from test_nets import PAPER_COUNT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# From a real run (2026-11-25, 2-core CPU, seed 0): 3,000 training examples,
# one epoch, batch 100, reconstruction, gave 70.4% accuracy on the first
# 1,000 test images; chance is 10%. The bound leaves room for BLAS and
# CPU differences.
ONE_EPOCH_MIN_ACCURACY = 0.5


def run_train(*args):
    return train.main(['--data-dir', MNIST, '--no-progress'] + list(args))


@pytest.mark.slow
@needs_mnist
def test_one_epoch_learns_and_writes_every_output(tmp_path):
    out, model_path = tmp_path / 'result', tmp_path / 'model.npz'
    run_train('--train-size', '3000', '--test-size', '1000', '-e', '1',
              '-b', '100', '--reconstruct', '-o', str(out),
              '--save', str(model_path))
    summary = json.loads((out / 'final.json').read_text())
    accuracy = 1 - summary['final_test_error']
    assert accuracy > ONE_EPOCH_MIN_ACCURACY, summary
    assert summary['final_epoch'] == 1 and summary['parameters'] == 8215568
    log = json.loads((out / 'log').read_text())
    assert log[-1]['epoch'] == 1
    for key in ('main/loss', 'main/margin_loss', 'main/reconstruction_loss',
                'main/accuracy', 'test/main/accuracy', 'alpha'):
        assert key in log[-1]
    for name in ('loss.png', 'accuracy.png', 'snapshot_epoch_1'):
        assert (out / name).exists(), name
    # snapshots are stored, not deflated (zlib cost seconds per epoch)
    with zipfile.ZipFile(out / 'snapshot_epoch_1') as snapshot:
        assert {entry.compress_type for entry in snapshot.infolist()} == {
            zipfile.ZIP_STORED}
    # the reported accuracy is the exact fraction of the 1,000 test images
    model = files.load_model(str(model_path), nets.ARCHITECTURES)
    _, _, test = mnist.get_mnist_like('mnist', data_dir=MNIST,
                                         test_size=1000)
    x, t = mnist.to_arrays(test)
    predictions = numpy.concatenate([model.predict(x[i:i + 250])[0]
                                     for i in range(0, 1000, 250)])
    assert (predictions == t).mean() == pytest.approx(
        log[-1]['test/main/accuracy'], abs=1e-6)

    # visualize.py on the model just trained: every figure, its grid of
    # digits at figures.SCALE screen pixels per image pixel (the layout
    # itself is test_visualize's)
    drawn = tmp_path / 'vis'
    assert visualize.main(['--load', str(model_path), '--out', str(drawn),
                           '--data-dir', MNIST]) == 0
    grids = {'vis.png': (4, 10), 'vis_all.png': (11, 10)}
    grids.update({'vis_tweaked{}.png'.format(c): (16, 11) for c in range(10)})
    for name, (rows, cols) in grids.items():
        height, width = matplotlib.image.imread(str(drawn / name)).shape[:2]
        assert height >= rows * 28 * figures.SCALE, name
        assert width >= cols * 28 * figures.SCALE, name


TINY = ['--train-size', '150', '--test-size', '50', '-b', '50',
        '--reconstruct', '--routing', '2']


def final_parameters(path):
    model = files.load_model(str(path), nets.ARCHITECTURES)
    return {name: p.array.copy() for name, p in model.namedparams()}


@pytest.mark.slow
@needs_mnist
def test_same_seed_gives_the_same_run(tmp_path):
    for name in ('a', 'b'):
        run_train(*TINY, '-e', '1', '-o', str(tmp_path / name),
                  '--save', str(tmp_path / name / 'model.npz'))
    a = final_parameters(tmp_path / 'a' / 'model.npz')
    b = final_parameters(tmp_path / 'b' / 'model.npz')
    for name in a:
        numpy.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
@needs_mnist
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """kill -9 in the middle of epoch 3; --autoload continues from the
    epoch 2 snapshot and ends with bit-identical parameters."""
    straight = tmp_path / 'straight'
    run_train(*TINY, '-e', '3', '-o', str(straight),
              '--save', str(straight / 'model.npz'))

    resumed = tmp_path / 'resumed'
    command = [sys.executable, os.path.join(REPO, 'train.py'),
               '--data-dir', MNIST, *TINY, '-e', '3', '-o', str(resumed),
               '--save', str(resumed / 'model.npz')]
    process = subprocess.Popen(command + ['--no-progress'], cwd=REPO,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    snapshot = resumed / 'snapshot_epoch_2'
    deadline = time.time() + 120
    while not snapshot.exists() and process.poll() is None:
        assert time.time() < deadline, 'no snapshot within 2 minutes'
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / 'model.npz').exists(), 'killed too late'
    assert snapshot.exists()

    run_train(*TINY, '-e', '3', '-o', str(resumed), '--autoload',
              '--save', str(resumed / 'model.npz'))
    a = final_parameters(straight / 'model.npz')
    b = final_parameters(resumed / 'model.npz')
    for name in a:
        numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
    log_a = json.loads((straight / 'log').read_text())
    log_b = json.loads((resumed / 'log').read_text())
    assert [e['main/loss'] for e in log_a] == [e['main/loss'] for e in log_b]


@needs_mnist
def test_gpu_fast_path_flags_reach_the_model(tmp_path, monkeypatch):
    """--gpu-kernels and --gpu-convolutions become the model's
    KernelOptions (no module setting; no effect on the CPU: the run trains
    as usual)."""
    built = []
    build = nets.build
    monkeypatch.setattr(nets, 'build', lambda *a, **k: built.append(
        build(*a, **k)) or built[-1])
    run_train('--train-size', '20', '--test-size', '10', '-e', '1', '-b',
              '10', '-o', str(tmp_path / 'result'), '--gpu-kernels',
              '--gpu-convolutions')
    assert built[0].kernel_options == KernelOptions(
        gpu_kernels=True, gpu_convolutions=True)
    assert (tmp_path / 'result' / 'final.json').exists()


# -- bad input: one line on stderr, non-zero exit, nothing overwritten ------

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'),
                           '--no-progress', *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args, fragments', [
    (['-b', '0'], ['--batchsize', 'must be an integer > 0']),
    (['-e', '-3'], ['--epoch', 'must be an integer > 0']),
    (['--dataset', 'cifar'], ['--dataset', 'invalid choice']),
    (['--routing', '0'], ['--routing', 'must be an integer > 0']),
    (['--decay', '1.5'], ['--decay', "a number in (0, 1], got '1.5'"]),
    (['--input-size', '20'], ['--input-size', "an integer >= 28, got '20'"]),
    (['--seed', 'x'], ['--seed', "must be an integer from 0 to 4294967293, got 'x'"]),
    (['--gpu-kernels', '--impl', 'plain'],
     ['--gpu-kernels: for the CapsNet fast path on the GPU', 'leave it out']),
    (['--gpu-kernels', '--gpu-convolutions', '--arch', 'baseline'],
     ['--gpu-kernels and --gpu-convolutions: for the CapsNet fast path',
      'leave them out with --impl plain or a CNN --arch']),
])
def test_bad_flags_give_one_clear_line(args, fragments):
    assert_one_error(run_cli(*args), *fragments)


def test_missing_dataset_file_gives_one_clear_line(tmp_path):
    result = run_cli('--data-dir', str(tmp_path), '-o', str(tmp_path / 'o'))
    assert_one_error(result, 'train-images-idx3-ubyte.gz', str(tmp_path))


def test_gpu_without_cupy_gives_one_clear_line(tmp_path):
    from chainer.backends import cuda
    if cuda.available:  # else this would start a 30-epoch run on the GPU
        pytest.skip('CuPy is installed here; this test needs a machine '
                    'without it')
    result = run_cli('-g', '0', '-o', str(tmp_path / 'o'))
    assert_one_error(result, 'CuPy')


def test_unwritable_out_gives_one_clear_line(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('keep me')
    result = run_cli('-o', str(blocker / 'sub'), '--data-dir', str(tmp_path))
    assert_one_error(result, 'cannot write')
    assert blocker.read_text() == 'keep me'


@needs_mnist
def test_resume_from_a_missing_or_foreign_snapshot(tmp_path):
    result = run_cli('--data-dir', MNIST, '--train-size', '100',
                     '--test-size', '50', '-o', str(tmp_path / 'o'),
                     '--resume', str(tmp_path / 'nope'))
    assert_one_error(result, 'does not exist')
    # -r is --resume (as in Chainer's examples); it was --routing once
    result = run_cli('--data-dir', MNIST, '--train-size', '100',
                     '--test-size', '50', '-o', str(tmp_path / 'o'),
                     '-r', '3')
    assert_one_error(result, 'snapshot 3 does not exist', '--routing 3')
    foreign = tmp_path / 'foreign.npz'
    numpy.savez(str(foreign), x=numpy.zeros(2))
    result = run_cli('--data-dir', MNIST, '--train-size', '100',
                     '--test-size', '50', '-o', str(tmp_path / 'o'),
                     '--resume', str(foreign))
    assert_one_error(result, 'cannot resume')


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('epochs, lost, plots', [
    (2, 'snapshot_epoch_2', False), (1, 'model.npz', False),
    (2, 'error.png', True)])
def test_train_on_a_disk_that_fills_keeps_the_last_epoch(
        tmp_path, monkeypatch, capsys, epochs, lost, plots):
    """The disk fills once epoch 1's snapshot is written: the next write
    (epoch 2's snapshot or the model without the plots, else epoch 2's
    error.png: the plots come before the snapshot) is one line naming it,
    and epoch 1's snapshot (and plot) is intact, so --autoload loses at
    most the epoch in progress."""
    out = tmp_path / 'out'
    first = out / 'snapshot_epoch_1'
    # in a child process (it crashed Python 3.12.1's garbage collector once
    # in-process, after the run): the disk is full once epoch 1's snapshot
    # exists, and without plots they are drawn nowhere
    prelude = (
        'import os, sys\n'
        'from capsnet import cli\n'
        'first = {!r}\n'
        'cli.free_bytes = lambda folder: 0 if os.path.exists(first) '
        'else 10 ** 12\n'.format(str(first)))
    if not plots:
        prelude += ('from capsnet.training import plots\n'
                    'plots.EpochPlot.__call__ = lambda self, trainer: None\n')
    code = prelude + ('import runpy\nsys.argv = ["train.py"] + sys.argv[1:]\n'
                      'runpy.run_path("train.py", run_name="__main__")\n')
    result = subprocess.run(
        [sys.executable, '-c', code, '--data-dir', MNIST, *TINY_TRAIN, '-e',
         str(epochs), '-o', str(out), '--save', str(out / 'model.npz')],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
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
    assert cli.run_main(train.main, ['--data-dir', MNIST, *TINY_TRAIN, '-e',
                                     '3', '-o', str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'the log or the plots in {}'.format(out) in line, line
    assert '--autoload from {}'.format(out / 'snapshot_epoch_1') in line
    assert leftovers(str(out)) == []


def test_train_refuses_a_disk_without_room_for_snapshots(tmp_path,
                                                         monkeypatch,
                                                         capsys):
    monkeypatch.setattr(cli, 'free_bytes', lambda folder: 10 ** 6)
    assert cli.run_main(train.main, ['--data-dir', MNIST, *TINY_TRAIN, '-e', '1',
                                     '-o', str(tmp_path / 'out')]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'not enough free space' in line and 'the snapshots' in line


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130),
                                            (signal.SIGTERM, 143)])
def test_train_interrupted_is_one_line_and_resumable(tmp_path, signum,
                                                     status):
    out = tmp_path / 'out'
    process = start('train.py', '--data-dir', MNIST, *TINY_TRAIN, '-e', '50',
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


@needs_mnist
def test_divergence_is_one_line_with_advice(tmp_path, monkeypatch, capsys):
    update = ext.AugmentingUpdater.update_core

    def diverge(self):
        update(self)
        if self.iteration >= 1:
            self.get_optimizer('main').target.conv1.W.array[0] = numpy.nan
    monkeypatch.setattr(ext.AugmentingUpdater, 'update_core',
                        diverge)
    assert cli.run_main(train.main, ['--data-dir', MNIST, *TINY_TRAIN, '-e', '1',
                                     '-o', str(tmp_path / 'out')]) == 1
    line = one_error_line(capsys.readouterr().err)
    for fragment in ('diverged: a parameter became NaN or inf (found at '
                     'epoch 0.67, iteration 2)',
                     'lower --alpha (now 0.001)', '--resume'):
        assert fragment in line, line


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
            '--data-dir', MNIST, *TINY_TRAIN, '-e', '1', '-o', out,
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


def test_save_to_a_folder_is_refused_up_front(run_tool, tmp_path):
    status, _, err = run_tool(train.main, ['-o', tmp_path / 'out', '--save',
                                           tmp_path])
    assert status == 1
    assert 'is a folder; give a file name' in one_error_line(err)
    assert not (tmp_path / 'out').exists()


def test_train_unknown_device_specifier(tmp_path):
    assert_one_error(run_script('train.py', '--no-progress', '--device', 'foo',
                                '-o', tmp_path / 'out'),
                     'cannot use device foo', '--device', status=1)
    assert not (tmp_path / 'out').exists()


def test_train_empty_save_is_refused_up_front(tmp_path):
    """--save '' trained for the whole run and then kept no model."""
    assert_one_error(run_script('train.py', '--save', '', '-o', tmp_path / 'out'),
                     "argument --save: needs a file name, got an empty one")
    assert not (tmp_path / 'out').exists()


def test_train_unwritable_save(tmp_path, blocker):
    assert_one_error(run_script('train.py', '--no-progress', '-o', tmp_path / 'out',
                                '--save', blocker / 'model.npz'),
                     'cannot write to', str(blocker), status=1)
    assert blocker.read_text() == 'keep me'


# -- the recipes' training settings ------------------------------------------

def test_the_recipes_training_settings_and_flags_that_win():
    paper = train.parse_settings([])
    assert (paper.recipe, paper.batchsize, paper.decay, paper.decay_steps,
            paper.alpha_floor) == ('paper', 100, 0.95, None, 1e-5)
    official = train.parse_settings(['--recipe', 'official'])
    assert (official.batchsize, official.decay, official.decay_steps,
            official.alpha_floor) == (128, 0.96, 2000, 0.0)
    mine = train.parse_settings(['--recipe', 'official', '-b', '64',
                                 '--decay', '0.9'])
    assert (mine.batchsize, mine.decay, mine.decay_steps) == (64, 0.9, 2000)
    assert mine.recorded()['recipe'] == 'official'


def test_the_official_schedule_at_chosen_steps():
    """models/model.py: tf.train.exponential_decay(1e-3, step, 2000, 0.96),
    not staircase: the step before the update is the exponent's."""
    decay = ext.StepDecay('alpha', 1e-3, 0.96, 2000)
    for step, expected in ((0, 1e-3), (1000, 1e-3 * 0.96 ** 0.5),
                           (2000, 0.96e-3), (6000, 1e-3 * 0.96 ** 3),
                           (470000, 1e-3 * 0.96 ** 235)):
        assert decay.value(step) == pytest.approx(expected, rel=1e-12)
    assert ext.StepDecay('alpha', 1e-3, 0.96, 2000, 1e-5).value(
        10 ** 6) == 1e-5


def test_train_flags_build_the_baseline():
    settings = train.parse_settings(['--arch', 'baseline'])
    assert settings.arch == 'baseline'
    assert settings.model_options() == dict(input_size=28)
    settings.input_size = 12  # small; the flag itself refuses sizes below 28
    m = nets.build(settings.arch, settings.recipe, **settings.model_options())
    assert isinstance(m, nets.BaselineCNN)
    assert m.options['input_size'] == 12


def test_train_end_to_end(tmp_path, monkeypatch, mnist_dir):
    out = str(tmp_path / 'run')
    # A 50-image step of the 35M network takes ~15 s on 2 cores, and a
    # snapshot (parameters and Adam's two moments, ~400 MB compressed)
    # ~10 s: keep the run tiny and skip the snapshot, which is train.py's
    # business and independent of the network.
    monkeypatch.setattr(loop.extensions, 'snapshot',
                        lambda *a, **k: (lambda trainer: None))
    train.main(['--arch', 'baseline', '--data-dir', mnist_dir,
                '--train-size', '10', '--test-size', '10',
                '--batchsize', '10', '--epoch', '1', '--no-progress',
                '--out', out])
    with open(os.path.join(out, 'final.json')) as f:
        final = json.load(f)
    assert final['arch'] == 'baseline'
    assert final['parameters'] == PAPER_COUNT
    assert final['epochs'] == final['final_epoch'] == 1
    assert 0 <= final['final_test_error'] <= 1
    log = open(os.path.join(out, 'log')).read()
    assert 'test/main/accuracy' in log and 'main/loss' in log
