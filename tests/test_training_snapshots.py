"""capsnet/training/snapshots.py: the one snapshot format and resume:
atomic writes, settings and options checked before loading (a snapshot of
another network or other settings is refused in one line), damaged and
unreadable snapshots, --resume of a folder, --autoload skipping damaged
ones, and a snapshot written before the restructure (tests/fixtures)
still resumes."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy
import pytest

from capsnet import cli
from capsnet.training import snapshots
import train
from conftest import (REPO, TINY_TRAIN, Unchanged, assert_one_error,
                      needs_mnist, one_error_line, run_script)
from conftest import MNIST_DIR as MNIST


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


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory):
    """A TINY_TRAIN run of two epochs: snapshot_epoch_1 and _2 in its --out."""
    if not os.path.isdir(MNIST):
        pytest.skip('no MNIST')
    out = tmp_path_factory.mktemp('resume') / 'out'
    train.main(['--data-dir', MNIST, *TINY_TRAIN, '-e', '2', '-o', str(out)])
    return out


def copy_run(two_epochs, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(str(two_epochs), str(out))
    return out


# what a resume of two_epochs is refused with: (flags, the line's words)
REFUSED = {
    'batchsize': (['-b', '30'], 'batchsize=50 in the snapshot, 30 asked'),
    'seed': (['--seed', '5'], 'seed=0 in the snapshot, 5 asked'),
    'alpha': (['--alpha', '0.01'], 'alpha=0.001 in the snapshot, 0.01 '
              'asked'),
    'train-size': (['--train-size', '100'], 'train_size=150 in the '
                   'snapshot, 100 asked'),
    'epoch-passed': (['-e', '1'], 'is at epoch 2, beyond --epoch 1; pass '
                     '--epoch 2'),
}


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('case', sorted(REFUSED))
def test_resume_with_other_settings_is_refused(two_epochs, tmp_path,
                                               run_tool, case):
    flags, fragment = REFUSED[case]
    out = copy_run(two_epochs, tmp_path)
    argv = ['--data-dir', MNIST, *TINY_TRAIN, '-e', '3', '-o', out, '--autoload']
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
        '--data-dir', MNIST, *TINY_TRAIN, '-e', '2', '-o', out, '--autoload'])
    assert status == 0, err
    assert 'skipping the damaged snapshot {}'.format(newest) in stdout
    assert 'resumed from {} at epoch 1'.format(out / 'snapshot_epoch_1') \
        in stdout
    summary = json.loads((out / 'final.json').read_text())
    assert summary['resumed_from'] == str(out / 'snapshot_epoch_1')
    assert summary['batchsize'] == 50 and summary['alpha'] == 0.001
    assert snapshots.readable_snapshot(str(newest)) is None  # written again


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
    assert_one_error(run_script('train.py', *train_args(
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
    assert_one_error(run_script('train.py', *train_args(
        mnist_dir, out, '--resume', snapshot, '--save',
        tmp_path / 'model.npz', *flags)),
        'cannot resume from', str(snapshot), problem,
        'the snapshot was made with other options', status=1)
    kept.check()


def test_train_resume_with_another_routing_count(resumable_run, mnist_dir):
    kept = Unchanged(resumable_run / 'final.json')
    result = run_script('train.py', *train_args(mnist_dir, resumable_run,
                                         '--routing', '3', '--autoload'))
    assert_one_error(result, 'routing=1 in the snapshot, 3 asked',
                     str(resumable_run / 'snapshot_epoch_1'), status=1)
    kept.check()


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
    assert_one_error(run_script('train.py', '--data-dir', mnist_dir, '--train-size',
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


# -- a snapshot written before the restructure (tests/fixtures) -------------

OLD_SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            'fixtures', 'old_snapshot_epoch_1.gz')


@needs_mnist
def test_a_snapshot_of_the_code_before_the_restructure_resumes(tmp_path,
                                                               run_tool):
    """train.py of commit 9283104 wrote snapshot_epoch_1 (one MNIST image,
    weights zero-initialised, --alpha 1e-30): today's train.py continues
    it to epoch 2 with the same flags."""
    snapshot = tmp_path / 'snapshot_epoch_1'
    with gzip.open(OLD_SNAPSHOT, 'rb') as f:
        snapshot.write_bytes(f.read())
    out = tmp_path / 'out'
    status, stdout, err = run_tool(train.main, [
        '--data-dir', MNIST, '--train-size', '1', '--test-size', '1', '-b',
        '1', '--alpha', '1e-30', '--no-progress', '--resume', snapshot,
        '-e', '2', '-o', out])
    assert status == 0, err
    assert 'resumed from {} at epoch 1'.format(snapshot) in stdout
    final = json.loads((out / 'final.json').read_text())
    assert final['resumed_from'] == str(snapshot)
    assert final['final_epoch'] == final['epochs'] == 2
    assert [h['epoch'] for h in final['history']] == [1, 2]
    assert (out / 'snapshot_epoch_2').exists()
