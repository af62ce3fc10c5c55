"""capsnet.files: the cleanup of interrupted writes touches only the names
the project makes, and a fresh run refuses a folder holding another run."""
import json
import os

import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import files
from capsnet.errors import CapsNetError


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
