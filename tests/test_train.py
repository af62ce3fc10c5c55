"""train.py end to end on real MNIST: accuracy, outputs, resume, bad input."""
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
from capsnet.data import mnist
from capsnet.kernels import KernelOptions
from capsnet import figures, files
import nets
import train
from capsnet.training import extensions as ext
import visualize
from conftest import MNIST_DIR as MNIST
from conftest import assert_one_error, needs_mnist

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


def test_newest_snapshot_picks_the_highest_epoch(tmp_path):
    for epoch in (2, 10, 9):
        (tmp_path / 'snapshot_epoch_{}'.format(epoch)).write_bytes(b'')
    (tmp_path / 'snapshot_epoch_x').write_bytes(b'')
    newest = ext.newest_snapshot
    assert newest(str(tmp_path)).endswith('snapshot_epoch_10')
    assert newest(str(tmp_path / 'none')) is None


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
