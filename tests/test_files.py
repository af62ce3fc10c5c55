"""capsnet/files.py: atomic writes (a full disk keeps the old file), the
cleanup of interrupted writes (only the names the project makes), a fresh
run refusing a folder holding another run, the locks of --out, and model
files: damaged, foreign, unreadable, non-finite or a folder, each one line
in every tool that reads them; a model file written before the
restructure (tests/fixtures) still loads."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import cli, files
from capsnet.errors import CapsNetError
from capsnet.training import snapshots
import evaluate
import nets
import predict
import train
import visualize
from conftest import (assert_one_error, leftovers, needs_mnist, one_error_line,
                      run_script)
from conftest import MNIST_DIR as MNIST


# --------------------------------------------------------------------------
# Deleting only what is ours
# --------------------------------------------------------------------------

def users_files(out):
    """A --out-like folder holding a user's look-alikes of temp names."""
    (out / 'tmp').mkdir(parents=True)
    (out / 'tmp' / 'precious.txt').write_text('mine')
    (out / 'tmpfoo').mkdir()
    (out / 'tmpsnapshot_epoch_3abcdefgh').mkdir()   # Chainer's old pattern
    (out / '.x.tmp').write_text('mine')
    (out / 'notes.tmp').write_text('mine')
    (out / '.final.json.k2j3abcd.tmp').write_text('mine')  # old pattern
    (out / '.capsnet-notes.tmp').write_text('mine')   # no random part
    (out / '.capsnet-tmp-mine').mkdir()                # not 8 characters
    (out / '.capsnet-tmp-mine' / 'keep').write_text('mine')
    (out / '.lock').write_text('not a pid\n')
    return sorted(os.listdir(out))


def interrupted_write(path, monkeypatch):
    """Run files.atomic_write on ``path`` and stop it just before its rename,
    as a kill -9 would: the temp file stays."""
    def killed(src, dst):
        raise SystemExit('killed')
    monkeypatch.setattr(os, 'replace', killed)
    monkeypatch.setattr(os, 'remove', lambda p: None)  # no cleanup either
    with pytest.raises(SystemExit):
        files.write_text(str(path), 'half')
    monkeypatch.undo()


def test_remove_leftovers_keeps_the_users_files(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    kept = users_files(out)
    interrupted_write(out / 'final.json', monkeypatch)
    monkeypatch.setattr(files.shutil, 'rmtree', lambda *a, **k: None)
    with files.temp_folder(str(out)) as left_folder:  # killed: it stays
        os.makedirs(os.path.join(left_folder, 'inner'))
    monkeypatch.undo()
    ours = sorted(set(os.listdir(out)) - set(kept))
    assert len(ours) == 2, ours
    assert any(n.startswith('.capsnet-final.json.') and n.endswith('.tmp')
               for n in ours)
    assert os.path.basename(left_folder) in ours
    removed = files.remove_leftovers(str(out))
    assert sorted(os.path.basename(p) for p in removed) == ours
    assert sorted(os.listdir(out)) == kept
    assert (out / 'tmp' / 'precious.txt').read_text() == 'mine'
    assert (out / '.capsnet-tmp-mine' / 'keep').read_text() == 'mine'


def test_remove_leftovers_follows_no_link(tmp_path):
    """A link named as our temp folder is not ours to empty."""
    target = tmp_path / 'elsewhere'
    target.mkdir()
    (target / 'precious.txt').write_text('mine')
    out = tmp_path / 'out'
    out.mkdir()
    os.symlink(target, out / '.capsnet-tmp-abcd1234')
    os.symlink(target / 'precious.txt', out / '.capsnet-x.abcd1234.tmp')
    assert files.remove_leftovers(str(out)) == []
    assert (target / 'precious.txt').read_text() == 'mine'


def test_atomic_write_names_its_temp_file_with_the_marker(tmp_path,
                                                          monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real(src, dst)
    monkeypatch.setattr(os, 'replace', spy)
    files.write_text(str(tmp_path / 'log'), '[]')
    assert len(seen) == 1 and files.TEMP_FILE.match(seen[0]), seen
    assert os.listdir(tmp_path) == ['log']


def test_temp_folder_is_removed_after_use(tmp_path):
    with files.temp_folder(str(tmp_path)) as folder:
        assert files.TEMP_FOLDER.match(os.path.basename(folder))
        open(os.path.join(folder, 'x'), 'w').close()
    assert os.listdir(tmp_path) == []


def test_the_lock_has_the_projects_name(tmp_path):
    """A user's own .lock in --out is neither taken for ours nor removed."""
    (tmp_path / '.lock').write_text('1 something else\n')
    path = files.lock_folder(str(tmp_path), 'train.py')
    assert os.path.basename(path) == files.LOCK_NAME
    assert files.LOCK_NAME.startswith('.capsnet')
    files.unlock(path)
    assert sorted(os.listdir(tmp_path)) == ['.lock']


# --------------------------------------------------------------------------
# A fresh run refuses another run's folder
# --------------------------------------------------------------------------

def a_run(out, *names):
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == 'log':
            path.write_text(json.dumps([{'epoch': 1, 'main/loss': 0.1}]))
        else:
            path.write_bytes(b'x')


@pytest.mark.parametrize('names', [
    ['log'], ['final.json'], ['snapshot_epoch_3'], ['loss.png'],
    ['accuracy.png'], ['model_best_val.npz'], ['rank1/snapshot_epoch_2'],
    ['log', 'final.json', 'snapshot_epoch_1', 'loss.png'],
])
def test_a_fresh_run_refuses_another_runs_folder(tmp_path, names):
    out = tmp_path / 'out'
    a_run(out, *names)
    before = {n: (out / n).read_bytes() for n in names}
    with pytest.raises(CapsNetError) as caught:
        files.check_fresh_out(str(out), resuming=False)
    message = str(caught.value)
    assert '\n' not in message
    assert str(out) in message and '--autoload' in message
    assert 'another --out' in message or 'new --out' in message
    assert names[0].split('/')[0] in message
    assert {n: (out / n).read_bytes() for n in names} == before
    files.check_fresh_out(str(out), resuming=True)   # continuing is fine


@pytest.mark.parametrize('names', [
    [], ['notes.txt', 'tmp/precious.txt', 'data.csv'],
    ['log'],    # a user's file named log that is no training log
    ['snapshot_epoch_x', 'rank1/notes.txt', 'rankings/snapshot_epoch_1'],
    ['.lock', '.capsnet-lock'],
])
def test_an_empty_or_unrelated_folder_is_fine(tmp_path, names):
    out = tmp_path / 'out'
    a_run(out, *names)
    if names == ['log']:
        (out / 'log').write_text('my own notes\n')
    files.check_fresh_out(str(out), resuming=False)
    files.check_fresh_out(str(tmp_path / 'absent'), resuming=False)


def test_the_run_names_follow_what_train_writes():
    """The names check_fresh_out knows are the ones the trainer writes."""
    from capsnet.training import extensions as ext
    assert files.RUN_FILE.match(ext.SNAPSHOT_PREFIX + '12')
    assert files.RUN_FILE.match('final.json')
    assert not files.RUN_FILE.match(ext.SNAPSHOT_PREFIX + '12.txt')


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


@pytest.mark.parametrize('program', ['visualize.py', 'evaluate.py',
                                     'predict.py'])
def test_npz_file_that_is_not_a_model_of_this_project(program, tmp_path):
    path = tmp_path / 'weights.npz'
    numpy.savez(str(path), W=numpy.zeros(3, numpy.float32))
    argv = ['--load', path]
    argv += [tmp_path / 'x.png'] if program == 'predict.py' else [
        '-o', tmp_path / 'out']
    assert_one_error(run_script(program, *argv), str(path),
                     'neither a model file nor a training snapshot of this '
                     'project',
                     status=2 if program == 'predict.py' else 1)


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
    assert_one_error(run_script(tool, *argv), '{} is a folder, not a model file; '
                     'pass the file given to train.py --save, e.g. {}'.format(
                         folder, folder / 'model.npz'))
    if tool != 'experiments.py':  # figure5 makes --out first
        assert not (tmp_path / 'o').exists()


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


@pytest.mark.parametrize('tool', ['visualize.py', 'evaluate.py',
                                  'predict.py'])
@pytest.mark.parametrize('content', [None, b'', b'not a model', 'half'],
                         ids=['missing', 'empty', 'garbage', 'truncated'])
def test_an_unusable_model_file_is_one_line(
        tool, content, tmp_path, fresh_model_path, run_tool):
    path = tmp_path / 'model.npz'
    if content == 'half':
        data = open(fresh_model_path, 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    main = {'visualize.py': visualize.main, 'evaluate.py': evaluate.main,
            'predict.py': predict.main}[tool]
    argv = ['--load', path]
    argv += [tmp_path / 'x.png'] if tool == 'predict.py' else [
        '--data-dir', tmp_path, '--out', tmp_path / 'out']
    status, out, err = run_tool(main, argv)
    assert status == (2 if tool == 'predict.py' else 1)
    assert out == ''
    assert str(path) in one_error_line(err)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
@needs_mnist
def test_a_training_snapshot_loads_as_the_model_it_holds(tmp_path):
    """--load takes a run's snapshot_epoch_N as well as its model.npz: the
    same network, options and weights."""
    out = tmp_path / 'run'
    assert train.main(['--data-dir', MNIST, '--train-size', '20',
                       '--test-size', '10', '-b', '10', '-e', '1',
                       '--routing', '1', '--no-progress', '-o',
                       str(out)]) == 0
    from_snapshot = files.load_model(str(out / 'snapshot_epoch_1'),
                                     nets.ARCHITECTURES)
    from_model = files.load_model(str(out / 'model.npz'), nets.ARCHITECTURES)
    assert from_snapshot.options == from_model.options
    for (name, a), (_, b) in zip(sorted(from_snapshot.namedparams()),
                                 sorted(from_model.namedparams())):
        numpy.testing.assert_array_equal(a.array, b.array, err_msg=name)


def test_single_digit_tools_refuse_a_multimnist_model(tmp_path, capsys):
    numpy.random.seed(0)
    path = str(tmp_path / 'm.npz')
    files.save_model(path, nets.TwoDigitCapsNet(reconstruct=False))
    with pytest.raises(CapsNetError) as e:
        files.load_model_or_fail(path, nets.ARCHITECTURES,
                                 purpose='predict.py')
    assert e.value.status == 1
    message = str(e.value)
    assert message.count('\n') == 0
    assert 'MultiMNIST model' in message
    assert 'predict.py works on single' in message


# -- a model file written before the restructure (tests/fixtures) ----------

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'fixtures')


def test_a_model_file_of_the_code_before_the_restructure_loads():
    """model_io.save_model of commit 9283104 (the weights zeroed: small)."""
    model = files.load_model(os.path.join(FIXTURES, 'old_model.npz'),
                             nets.ARCHITECTURES)
    assert type(model) is nets.CapsNet and model.arch == 'capsnet'
    assert model.options == dict(
        routing=3, reconstruct=False, activation='relu', leaky_slope=0.01,
        share_weights=False, input_size=28, n_classes=10)
    assert not hasattr(model, 'decoder')
    assert nets.count_parameters(model) == 8215568 - 1411344
    assert all(not p.array.any() for p in model.params())


def test_load_errors_are_one_clear_line(tmp_path):
    missing = str(tmp_path / 'nope.npz')
    with pytest.raises(files.ModelFileError, match='does not exist'):
        files.load_model(missing, nets.ARCHITECTURES)
    path = str(tmp_path / 'model.npz')
    files.save_model(path, nets.CapsNet(routing=1))
    data = open(path, 'rb').read()
    truncated = str(tmp_path / 'truncated.npz')
    with open(truncated, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(files.ModelFileError, match='truncated or corrupt') \
            as error:
        files.load_model(truncated, nets.ARCHITECTURES)
    assert '\n' not in str(error.value)
    foreign = str(tmp_path / 'foreign.npz')
    numpy.savez(foreign, W=numpy.zeros(3))
    with pytest.raises(files.ModelFileError,
                       match='neither a model file nor a training snapshot'):
        files.load_model(foreign, nets.ARCHITECTURES)
    with pytest.raises(files.ModelFileError, match='routing=1 in the file'):
        files.load_model(path, nets.ARCHITECTURES, expected_options={'routing': 3})


def test_interrupted_save_leaves_the_earlier_model_intact(tmp_path,
                                                          monkeypatch):
    path = str(tmp_path / 'model.npz')
    files.save_model(path, nets.CapsNet(routing=1))
    before = open(path, 'rb').read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing')

    monkeypatch.setattr(numpy, 'savez_compressed', crash)
    with pytest.raises(KeyboardInterrupt):
        files.save_model(path, nets.CapsNet(routing=2))
    assert open(path, 'rb').read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.npz']
    assert files.load_model(path, nets.ARCHITECTURES).options['routing'] == 1
