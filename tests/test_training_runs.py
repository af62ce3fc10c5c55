"""capsnet/training/runs.py: the one run-folder convention and sweep runner:
when a run counts as finished (also as the experiments wrote it before
the shared loop), folders made with other settings refused up front and
named, run.json's record over invocations, the tables written atomically,
mean and sample standard deviation."""
import json
import os

import pytest

from capsnet.training import runs


def write_final(folder, epochs, final_epoch=None, error=0.01, **extra):
    os.makedirs(folder, exist_ok=True)
    final = dict(epochs=epochs, final_epoch=epochs if final_epoch is None
                 else final_epoch, final_test_error=error, parameters=123)
    final.update(extra)
    with open(os.path.join(folder, 'final.json'), 'w') as f:
        json.dump(final, f)


def test_is_finished(tmp_path):
    folder = str(tmp_path / 'run')
    assert not runs.is_finished(folder, 3)
    write_final(folder, 3)
    assert runs.is_finished(folder, 3)
    assert not runs.is_finished(folder, 4)   # another budget
    write_final(folder, 3, final_epoch=2)
    assert not runs.is_finished(folder, 3)   # stopped early
    write_final(folder, 3, error=None)
    assert not runs.is_finished(folder, 3)
    with open(os.path.join(folder, 'final.json'), 'w') as f:
        f.write('{"epochs": 3, "fin')                # truncated
    assert not runs.is_finished(folder, 3)


def test_a_run_the_experiments_wrote_before_is_finished(tmp_path):
    """final.json {config: {..., epochs}, test_error} with model.npz."""
    folder = tmp_path / 'capsnet-trial0'
    folder.mkdir()
    (folder / 'final.json').write_text(json.dumps(dict(
        config=dict(seed=0, epochs=2), test_error=0.05)))
    assert not runs.is_finished(str(folder), 2)    # no model.npz yet
    (folder / 'model.npz').write_bytes(b'')
    assert runs.is_finished(str(folder), 2)
    assert not runs.is_finished(str(folder), 3)
    job = runs.Job(str(tmp_path), 'capsnet', 0, dict(seed=0))
    assert runs.finished([job], 2) == [(job, json.loads(
        (folder / 'final.json').read_text()))]


def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    job = runs.Job(str(tmp_path), 'capsnet', 0, dict(seed=0, batchsize=10))
    assert job.folder == str(tmp_path / 'capsnet-trial0')
    assert runs.conflict(job, 1) is None           # nothing there yet
    os.makedirs(job.folder)
    with open(os.path.join(job.folder, 'run.json'), 'w') as f:
        json.dump(dict(config=dict(seed=1, batchsize=10)), f)
    problem = runs.conflict(job, 1)
    assert 'made with other settings (seed 1 there, 0 now)' in problem
    assert 'use another --out or remove that folder' in problem
    write_final(job.folder, 5)
    job.config = dict(seed=1, batchsize=10)
    assert 'already trained 5 epochs, more than --epoch 2' in runs.conflict(
        job, 2)
    assert runs.conflict(job, 5) is None


def jobs_of(out, n):
    return [runs.Job(str(out), 'row', k, dict(seed=k)) for k in range(n)]


def test_sweep_refuses_every_conflict_before_running_anything(tmp_path):
    jobs = jobs_of(tmp_path, 3)
    for job in jobs[1:]:
        os.makedirs(job.folder)
        with open(os.path.join(job.folder, 'run.json'), 'w') as f:
            json.dump(dict(config=dict(seed=9)), f)
    trained = []
    with pytest.raises(runs.RunConflict) as info:
        runs.sweep(jobs, 1, trained.append, 'cmd')
    assert info.value.status == 2 and trained == []
    assert str(info.value).count('made with other settings') == 2
    assert jobs[1].folder in str(info.value) and jobs[2].folder in str(
        info.value)


def test_sweep_keeps_finished_runs_and_records_every_invocation(tmp_path):
    jobs = jobs_of(tmp_path, 3)
    write_final(jobs[0].folder, 2)
    trained, tabled, said = [], [], []

    def train(job):
        trained.append(job.trial)
        if job.trial == 2 and trained.count(2) == 1:
            raise KeyboardInterrupt     # interrupted the first time
        write_final(job.folder, 2)
    with pytest.raises(KeyboardInterrupt):
        runs.sweep(jobs, 2, train, 'python x.py', log=said.append,
                   after_each=lambda: tabled.append(len(trained)))
    assert trained == [1, 2] and tabled == [1]
    assert said == ['=== row trial 1 in {}'.format(jobs[1].folder),
                    '=== row trial 2 in {}'.format(jobs[2].folder)]
    runs.sweep(jobs, 2, train, 'python x.py', log=said.append)
    assert trained == [1, 2, 2]
    info = runs.read_json(os.path.join(jobs[2].folder, 'run.json'))
    assert info['invocations'] == 2 and info['wall_seconds'] >= 0
    assert (info['config'], info['command'], info['epochs']) == (
        dict(seed=2), 'python x.py', 2)
    assert not os.path.exists(os.path.join(jobs[0].folder, 'run.json'))


def test_read_json_is_none_for_what_is_not_an_object(tmp_path):
    path = tmp_path / 'x.json'
    assert runs.read_json(str(path)) is None
    for text, value in (('[1]', None), ('{"a": 1', None), ('{"a": 1}',
                                                            {'a': 1})):
        path.write_text(text)
        assert runs.read_json(str(path)) == value


def test_mean_std_is_the_sample_standard_deviation():
    assert runs.mean_std([]) == (None, None)
    assert runs.mean_std([0.3]) == (0.3, 0.0)
    mean, std = runs.mean_std([0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.1)


def test_write_tables_writes_both_files_atomically(tmp_path):
    runs.write_tables(str(tmp_path), dict(table='t'), [dict(row='r')],
                      '# T\n', runs=[dict(trial=0)])
    assert json.loads((tmp_path / 'results.json').read_text()) == dict(
        meta=dict(table='t'), summary=[dict(row='r')], runs=[dict(trial=0)])
    assert (tmp_path / 'table.md').read_text() == '# T\n'
    runs.write_tables(str(tmp_path), {}, [], '')
    assert 'runs' not in json.loads((tmp_path / 'results.json').read_text())
    assert sorted(os.listdir(tmp_path)) == ['results.json', 'table.md']
    assert 'CPUs, Python' in runs.machine_description()
