"""Bad input to the command-line tools, run as real processes.

Each case runs ``python TOOL.py ...`` and checks what a user sees: a non-zero
exit status, ONE line ``error: ...`` on stderr, no traceback, and, where the
tool was given an output path, that a file already there is left unchanged.
These are the rows of the README's "Bad input" table that no other test file
covers; the others are named in that table.

None of these runs trains: every bad input is rejected before the first
training step. The one exception is the ``resumable_run`` fixture, which
needs a real snapshot and makes it with ONE step on ONE image.

Fixtures mnist_dir, fresh_model_path and small_baseline_path are in
conftest.py.
"""
import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from chainer.backends import cuda

from conftest import MNIST_FILES, assert_one_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_no_cupy = pytest.mark.skipif(
    cuda.available, reason='CuPy is installed here; these cases check the '
                           'message for a machine without it')


def run(script, *args, env=None):
    """Run ``python REPO/script args`` (or ``python -m module args`` for a
    script '-m module') -> CompletedProcess (text)."""
    environment = dict(os.environ, **(env or {}))
    program = script.split() if script.startswith('-m ') else [
        os.path.join(REPO, script)]
    return subprocess.run(
        [sys.executable] + program + [str(a) for a in args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env=environment)


def md5(path):
    with open(str(path), 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


class Unchanged:
    """Files written before a run, to check afterwards that none changed."""

    def __init__(self, *paths):
        self.before = {}
        for path in paths:
            path = str(path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                with open(path, 'wb') as f:
                    f.write(b'written before the run: ' + path.encode())
            self.before[path] = (md5(path), os.stat(path).st_mtime_ns)

    def check(self):
        for path, (digest, mtime) in self.before.items():
            assert os.path.exists(path), path + ' was removed'
            assert (md5(path), os.stat(path).st_mtime_ns) == (digest, mtime), \
                path + ' was changed'


def link_or_copy(source, target):
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copy(source, target)


def data_dir_with(folder, mnist_dir, name, content):
    """A --data-dir holding the real MNIST files but ``name`` = content."""
    os.makedirs(str(folder))
    for fname in MNIST_FILES:
        target = os.path.join(str(folder), fname)
        if fname == name:
            with open(target, 'wb') as f:
                f.write(content)
        else:
            link_or_copy(os.path.join(mnist_dir, fname), target)
    return str(folder)


@pytest.fixture
def truncated_data(tmp_path, mnist_dir):
    """train-images cut to its first 100,000 bytes."""
    name = 'train-images-idx3-ubyte.gz'
    with open(os.path.join(mnist_dir, name), 'rb') as f:
        head = f.read(100000)
    return data_dir_with(tmp_path / 'truncated', mnist_dir, name, head), name


@pytest.fixture
def wrong_md5_data(tmp_path, mnist_dir):
    """train-labels replaced by a valid IDX file (60,000 zeros) whose md5
    is not the published one."""
    name = 'train-labels-idx1-ubyte.gz'
    content = gzip.compress(struct.pack('>II', 2049, 60000) + bytes(60000))
    return data_dir_with(tmp_path / 'wrong-md5', mnist_dir, name,
                         content), name


@pytest.fixture
def blocker(tmp_path):
    """A plain file: any path below it cannot be created."""
    path = tmp_path / 'a-file'
    path.write_text('keep me')
    return path


# -- dataset files -------------------------------------------------------------

def data_command(program, data_dir, out, model):
    """(argv, files that must stay unchanged) for a tool reading MNIST."""
    if program == 'train.py':
        return (['--no-progress', '--data-dir', data_dir, '-o', out,
                 '--save', out / 'model.npz'],
                [out / 'model.npz'])   # a final.json would be another run's
    if program == 'visualize.py':
        return (['--load', model, '--data-dir', data_dir, '-o', out],
                [out / 'vis.png'])
    if program == 'evaluate.py':
        return (['--load', model, '--data-dir', data_dir, '-o', out],
                [out / 'confusion.png', out / 'evaluation.json'])
    return ['--data-dir', data_dir], []


PROGRAMS_READING_MNIST = ['train.py', 'visualize.py', 'evaluate.py',
                          '-m capsnet.data.mnist']


@pytest.mark.parametrize('program', PROGRAMS_READING_MNIST)
@pytest.mark.parametrize('bad_data, fragments', [
    # the expected md5 is the published one of the file
    ('truncated_data', ['md5 is', 'truncated',
                        'f68b3c2dcbeaaa9fbdd348bbdeb94873']),
    ('wrong_md5_data', ['md5 is', 'expected d53e105ee54ea40749a09fcbcd1e9432']),
], ids=['truncated', 'wrong-md5'])
def test_bad_dataset_file(program, bad_data, fragments, tmp_path, request,
                          fresh_model_path):
    data_dir, name = request.getfixturevalue(bad_data)
    argv, outputs = data_command(program, data_dir, tmp_path / 'out',
                                 fresh_model_path)
    kept = Unchanged(*outputs + [os.path.join(data_dir, name)])
    assert_one_error(run(program, *argv), name, data_dir, *fragments)
    kept.check()


@pytest.mark.parametrize('program', ['-m capsnet.data.mnist', 'train.py'])
def test_unusable_dataset_cache_folder(program, tmp_path, blocker):
    """No --data-dir: the download cache under CHAINER_DATASET_ROOT cannot
    be created (reported before any download is tried)."""
    argv = ['--no-progress', '-o', tmp_path / 'out'] \
        if program == 'train.py' else []
    result = run(program, *argv,
                 env={'CHAINER_DATASET_ROOT': str(blocker / 'root')})
    assert_one_error(result, 'cannot create the cache folder',
                     'CHAINER_DATASET_ROOT')
    assert 'downloading' not in result.stdout
    assert blocker.read_text() == 'keep me'


def test_datasets_cli_unknown_dataset():
    assert_one_error(run('-m capsnet.data.mnist', '--dataset', 'cifar'),
                     "unknown dataset 'cifar'", 'mnist, fashion-mnist',
                     status=1)


def test_experiments_missing_dataset_file(tmp_path):
    """The sweep reports the failed run in one line; train.py's own error
    line is in its output (stdout) and in the run's train.log."""
    out = tmp_path / 'sweep'
    result = run('experiments.py', 'table1', '--epochs', '1', '--trials',
                 '1', '--rows', 'r1', '--out', out,
                 '--data-dir', tmp_path / 'nowhere')
    assert_one_error(result, 'did not finish', 'train.log', status=1)
    line = 'error: --data-dir {} does not exist'.format(tmp_path / 'nowhere')
    assert line in result.stdout
    assert line in (out / 'r1-trial0' / 'train.log').read_text()


# -- model files -----------------------------------------------------------------

def test_visualize_rejects_a_baseline_model(tmp_path, small_baseline_path):
    kept = Unchanged(tmp_path / 'vis' / 'vis.png')
    assert_one_error(run('visualize.py', '--load', small_baseline_path,
                         '-o', tmp_path / 'vis'),
                     'holds the baseline network, not a CapsNet', status=1)
    kept.check()


def test_predict_reconstruct_rejects_a_baseline_model(
        tmp_path, small_baseline_path):
    kept = Unchanged(tmp_path / 'r.png')
    result = run('predict.py', '--load', small_baseline_path,
                 '--reconstruct', tmp_path / 'r.png', tmp_path / 'x.png')
    assert_one_error(result, small_baseline_path, 'no decoder', status=2)
    assert result.stdout == ''
    kept.check()


def test_predict_model_with_an_input_smaller_than_mnist(
        tmp_path, small_baseline_path):
    from PIL import Image
    image = numpy.zeros((28, 28), numpy.uint8)
    image[5:20, 10:14] = 255
    Image.fromarray(image).save(str(tmp_path / 'digit.png'))
    assert_one_error(run('predict.py', '--load', small_baseline_path,
                         tmp_path / 'digit.png'), small_baseline_path,
                     'smaller than the 28 x 28', status=2)


@pytest.mark.parametrize('program', ['visualize.py', 'evaluate.py',
                                     'predict.py'])
def test_npz_file_that_is_not_a_model_of_this_project(program, tmp_path):
    path = tmp_path / 'weights.npz'
    numpy.savez(str(path), W=numpy.zeros(3, numpy.float32))
    argv = ['--load', path]
    argv += [tmp_path / 'x.png'] if program == 'predict.py' else [
        '-o', tmp_path / 'out']
    assert_one_error(run(program, *argv), str(path),
                     'not a model file of this project',
                     status=2 if program == 'predict.py' else 1)


def test_evaluate_bad_model_overwrites_nothing(tmp_path, fresh_model_path):
    half = tmp_path / 'half.npz'
    with open(fresh_model_path, 'rb') as f:
        data = f.read()
    half.write_bytes(data[:len(data) // 2])
    out = tmp_path / 'eval'
    kept = Unchanged(out / 'confusion.png', out / 'misclassified.png',
                     out / 'evaluation.json')
    assert_one_error(run('evaluate.py', '--load', half, '-o', out),
                     str(half), 'truncated or corrupt', status=1)
    kept.check()


def train_args(mnist_dir, out, *extra):
    return ['--no-progress', '--data-dir', mnist_dir, '--train-size', '1',
            '--test-size', '1', '-b', '1', '--eval-batchsize', '1',
            '-e', '1', '-o', out] + list(extra)


@pytest.mark.parametrize('kind', ['model-file', 'truncated'])
def test_train_resume_from_a_file_that_is_not_a_snapshot(
        kind, tmp_path, mnist_dir, fresh_model_path):
    """--resume given a model file (train.py --save's output) or a
    truncated file."""
    path = fresh_model_path
    if kind == 'truncated':
        path = tmp_path / 'snapshot_epoch_1'
        with open(fresh_model_path, 'rb') as f:
            data = f.read()
        path.write_bytes(data[:len(data) // 2])
    out = tmp_path / 'out'
    kept = Unchanged(out / 'final.json', tmp_path / 'model.npz')
    assert_one_error(run('train.py', *train_args(
        mnist_dir, out, '--resume', path, '--save', tmp_path / 'model.npz')),
        'cannot resume from', str(path), status=1)
    kept.check()


# Train one step on one image, saving without compression (this only makes
# the fixture fast; the files are read the same way).
_ONE_STEP = '''
import sys
import numpy
numpy.savez_compressed = numpy.savez
import train
train.main(sys.argv[1:])
'''


@pytest.fixture(scope='module')
def resumable_run(tmp_path_factory, mnist_dir):
    """An --out folder holding snapshot_epoch_1 of a CapsNet(routing=1,
    reconstruct=False)."""
    out = tmp_path_factory.mktemp('resumable') / 'run'
    result = subprocess.run(
        [sys.executable, '-c', _ONE_STEP]
        + [str(a) for a in train_args(mnist_dir, out, '--routing', '1')],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert (out / 'snapshot_epoch_1').exists()
    return out


@pytest.mark.parametrize('flags, problem', [
    (['--routing', '1', '--reconstruct'],
     'reconstruct=False in the snapshot, True asked'),
    (['--routing', '1', '--share-weights'],
     'share_weights=False in the snapshot, True asked'),
    (['--arch', 'baseline'], 'arch=capsnet in the snapshot, baseline asked'),
], ids=['with-decoder', 'shared-W', 'baseline'])
def test_train_resume_from_a_snapshot_of_another_network(
        resumable_run, mnist_dir, tmp_path, flags, problem):
    snapshot = resumable_run / 'snapshot_epoch_1'
    out = tmp_path / 'out'
    kept = Unchanged(out / 'final.json', tmp_path / 'model.npz')
    assert_one_error(run('train.py', *train_args(
        mnist_dir, out, '--resume', snapshot, '--save',
        tmp_path / 'model.npz', *flags)),
        'cannot resume from', str(snapshot), problem,
        'the snapshot was made with other options', status=1)
    kept.check()


def test_train_resume_with_another_routing_count(resumable_run, mnist_dir):
    kept = Unchanged(resumable_run / 'final.json')
    result = run('train.py', *train_args(mnist_dir, resumable_run,
                                         '--routing', '3', '--autoload'))
    assert_one_error(result, 'routing=1 in the snapshot, 3 asked',
                     str(resumable_run / 'snapshot_epoch_1'), status=1)
    kept.check()


# -- flags -------------------------------------------------------------------------

def test_evaluate_batchsize_zero(tmp_path, fresh_model_path):
    assert_one_error(run('evaluate.py', '--load', fresh_model_path, '-b', '0',
                         '-o', tmp_path / 'e'),
                     '--batchsize', 'must be an integer > 0', status=2)
    assert not (tmp_path / 'e').exists()


def test_predict_batchsize_zero(tmp_path, fresh_model_path):
    assert_one_error(run('predict.py', '--load', fresh_model_path, '-b', '0',
                         tmp_path / 'x.png'),
                     '--batchsize', 'must be an integer > 0', status=2)


@pytest.mark.parametrize('flags, fragments', [
    (['-b', '0'], ['--batchsize', 'must be an integer > 0']),
    (['--epochs', '-1'], ['--epochs', 'must be an integer > 0']),
    (['--dataset', 'cifar'], ['--dataset', 'invalid choice']),
], ids=['batchsize-0', 'negative-epochs', 'unknown-dataset'])
def test_experiments_bad_flags(tmp_path, flags, fragments):
    out = tmp_path / 'sweep'
    argv = ['table1', '--epochs', '1', '--out', out] + flags
    assert_one_error(run('experiments.py', *argv), *fragments, status=2)
    assert not out.exists()


def test_benchmark_batchsize_zero():
    assert_one_error(run('dev/benchmark.py', '-b', '0'), '--batchsize',
                     'must be an integer > 0', status=2)


@pytest.mark.parametrize('flags, fragments', [
    (['--routing', '0'], ['argument --routing:', "an integer > 0, got '0'"]),
    (['--eval-batchsize', '-5'], ['argument --eval-batchsize:',
                                  "an integer > 0, got '-5'"]),
    (['--threads', '0'], ['argument --threads:', "an integer > 0, got '0'"]),
    (['--warmup', '-1'], ['argument --warmup:', "an integer >= 0, got '-1'"]),
    (['--repeats', 'abc'], ['argument --repeats:',
                            "an integer > 0, got 'abc'"])],
    ids=['routing-0', 'eval-batchsize-negative', 'threads-0',
         'warmup-negative', 'repeats-not-a-number'])
def test_benchmark_other_bad_numbers(flags, fragments):
    assert_one_error(run('dev/benchmark.py', '-b', '1', '--repeats', '1',
                         '--no-plain', *flags), *fragments, status=2)


# -- GPU without CuPy --------------------------------------------------------------

@needs_no_cupy
def test_visualize_gpu_without_cupy(tmp_path, fresh_model_path):
    kept = Unchanged(tmp_path / 'vis' / 'vis.png')
    assert_one_error(run('visualize.py', '--load', fresh_model_path, '-g', '0',
                         '-o', tmp_path / 'vis'),
                     '@cupy:0', 'CuPy cannot be used here', status=1)
    kept.check()


@needs_no_cupy
def test_predict_gpu_without_cupy(tmp_path, fresh_model_path):
    assert_one_error(run('predict.py', '--load', fresh_model_path, '-g', '0',
                         tmp_path / 'x.png'),
                     '@cupy:0', 'CuPy cannot be used here', status=2)


@needs_no_cupy
def test_experiments_gpu_without_cupy(tmp_path):
    out = tmp_path / 'sweep'
    result = run('experiments.py', 'table1', '--epochs', '1', '--trials',
                 '1', '--rows', 'r1', '--out', out, '-g', '0',
                 '--data-dir', tmp_path / 'nowhere')
    assert_one_error(result, 'did not finish', status=1)
    assert 'CuPy cannot be used here' in result.stdout  # train.py's line


@needs_no_cupy
def test_benchmark_gpu_without_cupy():
    """benchmark.py had a device message of its own ('(...); check
    --device'); it now takes the other tools' line."""
    assert_one_error(run('dev/benchmark.py', '-d', '@cupy:0', '--repeats', '1'),
                     '@cupy:0', 'CuPy cannot be used here', status=1)


def cupy_without_a_gpu():
    """CuPy is installed but reaches no GPU (no driver, or no device)."""
    if not cuda.available:
        return False
    try:
        return cuda.cupy.cuda.runtime.getDeviceCount() == 0
    except Exception:  # CuPy's CUDARuntimeError, and whatever else fails
        return True


@pytest.mark.skipif(not cupy_without_a_gpu(), reason=(
    'needs CuPy installed on a machine without a usable GPU (CI installs '
    'CuPy in its current stack for these after the suite)'))
@pytest.mark.parametrize('tool', ['train.py', 'dev/benchmark.py'])
def test_cupy_without_a_usable_gpu_names_the_driver(tool, tmp_path):
    """Chainer sees CuPy but CUDA cannot start: the line names the driver
    and the CPU, not --device."""
    result = run(tool, '-d', '@cupy:0', *(
        ['--no-progress', '-o', tmp_path / 'out'] if tool == 'train.py'
        else ['--repeats', '1']))
    line = assert_one_error(result, 'cannot use device @cupy:0',
                            'NVIDIA', '-d @numpy', status=1)   # driver,
    # or 'no NVIDIA GPU found' where there is no /dev/nvidia* at all
    assert 'check --device' not in line
    assert not (tmp_path / 'out').exists()


class CUDARuntimeError(RuntimeError):
    """Named as CuPy's; its text is what cupy raises in each case."""


@pytest.mark.parametrize('text, fix', [
    # CuPy installed, no NVIDIA driver, or one older than CuPy's CUDA
    ('cudaErrorInsufficientDriver: CUDA driver version is insufficient for '
     'CUDA runtime version', 'install an NVIDIA driver'),
    ('cudaErrorNoDevice: no CUDA-capable device is detected',
     'install an NVIDIA driver'),
    # a GPU number the machine does not have
    ('cudaErrorInvalidDevice: invalid device ordinal', 'check --device/-d'),
])
def test_a_device_that_fails_names_the_fix_for_its_cause(text, fix):
    from capsnet import devices
    line = devices.device_failure('@cupy:1', CUDARuntimeError(text),
                                  gpu_present=True)
    problem, _, remedy = line.rpartition('; ')
    assert problem == 'cannot use device @cupy:1: ' + text
    assert fix in remedy
    assert ('check --device/-d' in remedy) != ('NVIDIA driver' in remedy)


def test_train_unknown_device_specifier(tmp_path):
    assert_one_error(run('train.py', '--no-progress', '--device', 'foo',
                         '-o', tmp_path / 'out'),
                     'cannot use device foo', '--device', status=1)
    assert not (tmp_path / 'out').exists()


# -- unwritable output -------------------------------------------------------------

def test_train_empty_save_is_refused_up_front(tmp_path):
    """--save '' trained for the whole run and then kept no model."""
    assert_one_error(run('train.py', '--save', '', '-o', tmp_path / 'out'),
                     "argument --save: needs a file name, got an empty one")
    assert not (tmp_path / 'out').exists()


def test_train_unwritable_save(tmp_path, blocker):
    assert_one_error(run('train.py', '--no-progress', '-o', tmp_path / 'out',
                         '--save', blocker / 'model.npz'),
                     'cannot write to', str(blocker), status=1)
    assert blocker.read_text() == 'keep me'


def test_predict_unwritable_reconstruct(tmp_path, blocker, fresh_model_path):
    assert_one_error(run('predict.py', '--load', fresh_model_path,
                         '--reconstruct', blocker / 'r.png',
                         tmp_path / 'x.png'),
                     'cannot write to', '--reconstruct', status=2)
    assert blocker.read_text() == 'keep me'


def test_experiments_unwritable_out(blocker):
    assert_one_error(run('experiments.py', 'table1', '--epochs', '1',
                         '--trials', '1', '--rows', 'r1',
                         '--out', blocker / 'sweep'), str(blocker))
    assert blocker.read_text() == 'keep me'


# -- a new user's paths: folders for files, files for folders (issue 14) --------

@pytest.mark.parametrize('tool', ['evaluate.py', 'visualize.py', 'predict.py',
                                  'figure5'])
def test_load_of_a_folder_names_the_model_inside(tmp_path, fresh_model_path,
                                                 tool):
    """It said 'not a readable model file (IsADirectoryError: …); it may be
    truncated or corrupt, so train again'."""
    folder = tmp_path / 'run'
    folder.mkdir()
    shutil.copy(fresh_model_path, str(folder / 'model.npz'))
    argv = ['--load', folder, '--out', tmp_path / 'o']
    if tool == 'predict.py':
        argv = ['--load', folder, tmp_path / 'x.png']
    elif tool == 'figure5':
        tool, argv = 'experiments.py', ['figure5'] + argv
    assert_one_error(run(tool, *argv), '{} is a folder, not a model file; '
                     'pass the file given to train.py --save, e.g. {}'.format(
                         folder, folder / 'model.npz'))
    if tool != 'experiments.py':  # figure5 makes --out first
        assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('argv', [
    ['train.py', '--no-progress'], ['evaluate.py', '--load', 'M'],
    ['visualize.py', '--load', 'M'],
    ['experiments.py', 'table1', '--epoch', '1', '--rows', 'r1'],
    ['dev/gpu_check.py', '--dry-run', '--data-dir', '.']],
    ids=['train', 'evaluate', 'visualize', 'experiments', 'gpu_check'])
def test_out_that_is_a_file(blocker, fresh_model_path, argv):
    """It said '(File exists)'; gpu_check.py printed a traceback."""
    argv = [fresh_model_path if a == 'M' else a for a in argv]
    assert_one_error(run(*argv, '--out', blocker), 'cannot write to {}: it '
                     'is a file, not a folder; choose another --out'.format(
                         blocker), status=1)
    assert blocker.read_text() == 'keep me'


def test_predict_reconstruct_to_a_folder(tmp_path, fresh_model_path):
    """Found out only after classifying every input."""
    assert_one_error(run('predict.py', '--load', fresh_model_path,
                         '--reconstruct', tmp_path, tmp_path / 'x.png'),
                     '--reconstruct {} is a folder; give a file name, e.g. '
                     '{}'.format(tmp_path, tmp_path / 'recon.png'), status=2)


@pytest.mark.parametrize('what', ['file', 'missing'])
def test_data_dir_that_is_not_a_folder(blocker, tmp_path, what):
    """It said 'train-images-idx3-ubyte.gz not found in F'."""
    data_dir = blocker if what == 'file' else tmp_path / 'nowhere'
    assert_one_error(run('train.py', '--data-dir', data_dir, '-o',
                         tmp_path / 'out'), '--data-dir {} {}; pass the '
                     'folder holding the four mnist files'.format(
                         data_dir, 'is a file, not a folder'
                         if what == 'file' else 'does not exist'), status=1)


def test_train_size_beyond_what_validation_leaves(mnist_dir, tmp_path):
    """It said 'train_size must be between 1 and 1', without naming the
    hold-out that left one example nor the flag."""
    assert_one_error(run('train.py', '--data-dir', mnist_dir, '-o',
                         tmp_path / 'out', '--validation', '59999',
                         '--train-size', '100'),
                     '--train-size 100 is beyond the data: mnist has 60000 '
                     'training examples (1 with --validation 59999 held '
                     'out); use at most 1', status=1)


@pytest.mark.parametrize('holds', ['nothing', 'snapshots'])
def test_train_resume_of_a_folder(mnist_dir, tmp_path, holds):
    """It said '(IsADirectoryError: …); it is not a snapshot of this
    configuration'."""
    folder = tmp_path / 'run'
    folder.mkdir()
    hint = '(snapshot_epoch_N in the --out of a run)'
    if holds == 'snapshots':
        (folder / 'snapshot_epoch_2').write_bytes(b'x')
        hint = '(the newest there is {}), or continue with --out {} ' \
               '--autoload'.format(folder / 'snapshot_epoch_2', folder)
    assert_one_error(run('train.py', '--data-dir', mnist_dir, '--train-size',
                         '10', '--test-size', '10', '-b', '10', '-o',
                         tmp_path / 'out', '--resume', folder),
                     '--resume {} is a folder; pass a snapshot file {}'.format(
                         folder, hint), status=1)


def test_autoload_without_an_intact_snapshot_says_it_starts_afresh(
        tmp_path, capsys):
    from capsnet.training import snapshots
    (tmp_path / 'snapshot_epoch_1').write_bytes(b'junk')
    (tmp_path / 'snapshot_epoch_2').mkdir()
    assert snapshots.autoload_path(str(tmp_path)) is None
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(' (')[0] for line in lines] == [
        'skipping the damaged snapshot {}'.format(tmp_path / 'snapshot_epoch_2'),
        'skipping the damaged snapshot {}'.format(tmp_path / 'snapshot_epoch_1'),
        'no intact snapshot in {}; starting from epoch 0'.format(tmp_path)]


def test_affnist_file_that_is_a_folder(tmp_path):
    """It said 'affNIST file D does not exist'."""
    assert_one_error(run('experiments.py', 'affnist', '--epoch', '1', '--out',
                         tmp_path / 'o', '--affnist', tmp_path),
                     'affNIST file {} is a folder; pass the .mat file'.format(
                         tmp_path), status=1)


def test_running_out_of_memory_is_one_line(capsys):
    """benchmark.py -b 1000000000 printed NumPy's MemoryError traceback;
    any tool under cli.run_main now says it in one line."""
    from capsnet import cli

    def main(argv):
        raise MemoryError('Unable to allocate 5.70 TiB for an array')
    assert cli.run_main(main) == 1
    err = capsys.readouterr().err
    assert err == ('error: out of memory (Unable to allocate 5.70 TiB for an '
                   'array); use smaller batches (--batchsize/-b, '
                   '--eval-batchsize) or a smaller --input-size\n')


def test_an_unreadable_model_file(fresh_model_path, monkeypatch, run_tool):
    """Permission denied (simulated: the tests may run as root): not 'it may
    be truncated or corrupt, so train again'."""
    import evaluate
    from capsnet import files

    def denied(path, mode='r'):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(files, 'open', denied, raising=False)
    status, _, err = run_tool(evaluate.main, ['--load', fresh_model_path])
    assert status == 1
    assert err == 'error: cannot read model file {} (Permission denied); ' \
        'check its permissions\n'.format(fresh_model_path)


def test_an_unreadable_snapshot(mnist_dir, tmp_path, monkeypatch, run_tool):
    import train
    from capsnet.training import snapshots
    snapshot = tmp_path / 'snapshot_epoch_1'
    snapshot.write_bytes(b'x')

    def denied(path, mode='r'):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(snapshots, 'open', denied, raising=False)
    status, _, err = run_tool(train.main, [
        '--data-dir', mnist_dir, '--train-size', '10', '--test-size', '10',
        '-b', '10', '-o', tmp_path / 'out', '--resume', snapshot])
    assert status == 1
    assert err == 'error: cannot read snapshot {} (Permission denied); ' \
        'check its permissions\n'.format(snapshot)
