"""experiments.py: the Table 1 sweep, its resume logic and its table."""
import json
import os
import sys

import pytest

import experiments
from capsnet.errors import CapsNetError
import train

ROWS = ['baseline', 'r1', 'r1-recon', 'r3', 'r3-recon']


def write_final(folder, epochs, final_epoch=None, error=0.01, **extra):
    os.makedirs(folder, exist_ok=True)
    final = dict(epochs=epochs, final_epoch=epochs if final_epoch is None
                 else final_epoch, final_test_error=error, parameters=123)
    final.update(extra)
    with open(os.path.join(folder, 'final.json'), 'w') as f:
        json.dump(final, f)


def flag(command, name):
    return command[command.index(name) + 1]


@pytest.fixture
def fake_launch(monkeypatch):
    """Replace the train.py process by one that writes final.json."""
    calls = []

    def launch(command, log_path):
        folder = os.path.dirname(log_path)
        assert folder == flag(command, '--out')
        calls.append(command)
        seed = int(flag(command, '--seed'))
        write_final(folder, int(flag(command, '--epoch')),
                    error=0.003 + 0.001 * seed, dataset=flag(command,
                                                             '--dataset'))
        with open(log_path, 'a') as log:
            log.write('fake run\n')
        return 0, 1.5

    monkeypatch.setattr(experiments, 'launch', launch)
    return calls


def test_row_specs_match_the_paper():
    specs = experiments.row_specs()
    assert [s['name'] for s in specs] == ROWS
    by_name = {s['name']: s for s in specs}
    assert by_name['baseline']['train_args'] == ['--arch', 'baseline']
    assert by_name['baseline']['paper_error_pct'] == 0.39
    assert by_name['baseline']['paper_std_pct'] is None
    assert (by_name['r1']['routing'], by_name['r1']['reconstruct']) == (
        1, False)
    assert by_name['r3-recon']['paper_error_pct'] == 0.25
    assert by_name['r3-recon']['paper_std_pct'] == 0.005
    assert '--reconstruct' in by_name['r1-recon']['train_args']
    assert '--reconstruct' not in by_name['r3']['train_args']


def test_run_command():
    args = experiments.build_parser().parse_args(
        ['table1', '--epochs', '7', '--trials', '2', '--out', 'D',
         '--seed', '10', '-g', '0', '--data-dir', 'data', '--train-size',
         '500', '--dataset', 'fashion-mnist'])
    command = experiments.run_command('r3-recon', 1, args)
    assert command[:2] == [sys.executable, experiments.TRAIN_SCRIPT]
    assert flag(command, '--epoch') == '7'
    assert flag(command, '--seed') == '11'
    assert flag(command, '--out') == os.path.join('D', 'r3-recon-trial1')
    assert flag(command, '--save') == os.path.join(
        'D', 'r3-recon-trial1', 'model.npz')
    assert flag(command, '--routing') == '3'
    assert flag(command, '--dataset') == 'fashion-mnist'
    assert flag(command, '--device') == '@cupy:0'  # from the old -g 0
    assert flag(command, '--data-dir') == 'data'
    assert flag(command, '--train-size') == '500'
    assert '--test-size' not in command
    assert '--no-progress' in command and '--autoload' in command
    assert '--reconstruct' in command
    args.device = '@numpy'
    assert '--device' not in experiments.run_command('r1', 0, args)


def test_run_command_parses_in_train():
    args = experiments.build_parser().parse_args(
        ['table1', '--epochs', '2', '--out', 'D'])
    for row in ROWS:
        parsed = train.build_parser().parse_args(
            experiments.run_command(row, 0, args)[2:])
        assert parsed.arch == ('baseline' if row == 'baseline'
                               else 'capsnet')
        assert parsed.epoch == 2 and parsed.autoload
        if row != 'baseline':
            assert parsed.routing == int(row[1])
            assert parsed.reconstruct == row.endswith('recon')


def test_is_finished(tmp_path):
    folder = str(tmp_path / 'run')
    assert not experiments.is_finished(folder, 3)
    write_final(folder, 3)
    assert experiments.is_finished(folder, 3)
    assert not experiments.is_finished(folder, 4)   # another budget
    write_final(folder, 3, final_epoch=2)
    assert not experiments.is_finished(folder, 3)   # stopped early
    write_final(folder, 3, error=None)
    assert not experiments.is_finished(folder, 3)
    with open(os.path.join(folder, 'final.json'), 'w') as f:
        f.write('{"epochs": 3, "fin')                # truncated
    assert not experiments.is_finished(folder, 3)


def run(error, trial, row='r1', epochs=5, **extra):
    record = dict(row=row, trial=trial, final_test_error=error,
                  epochs=epochs, parameters=8215568, dataset='mnist',
                  train_size=60000, test_size=10000, wall_seconds=10.0)
    record.update(extra)
    return record


def test_summarize():
    runs = [run(0.0050, 2), run(0.0030, 0), run(0.0040, 1),
            run(0.0039, 0, row='baseline', parameters=35445522)]
    summary = experiments.summarize(runs, rows=['r3'])
    assert [s['row'] for s in summary] == ['baseline', 'r1', 'r3']
    base, r1, r3 = summary
    assert base['n'] == 1
    assert base['mean_error_pct'] == pytest.approx(0.39)
    assert base['std_error_pct'] == 0
    assert base['paper_error_pct'] == 0.39
    assert base['paper_std_pct'] is None
    assert base['parameters'] == [35445522]
    assert r1['n'] == 3 and r1['trials'] == [0, 1, 2]
    assert r1['mean_error_pct'] == pytest.approx(0.40)
    assert r1['std_error_pct'] == pytest.approx(0.10)   # ddof=1
    assert 'ddof=1' in r1['std_kind']
    assert r1['errors_pct'] == pytest.approx([0.30, 0.40, 0.50])
    assert (r1['paper_error_pct'], r1['paper_std_pct']) == (0.34, 0.032)
    assert r1['epochs'] == [5] and r1['wall_seconds'] == 30.0
    assert r3['n'] == 0 and r3['mean_error_pct'] is None


def test_summarize_fashion_has_no_paper_figures():
    summary = experiments.summarize([run(0.1, 0, dataset='fashion-mnist')])
    assert summary[0]['paper_error_pct'] is None
    assert summary[0]['paper_std_pct'] is None


def test_render_table():
    runs = [run(0.0050, 2), run(0.0030, 0), run(0.0040, 1),
            run(0.0039, 0, row='baseline')]
    summary = experiments.summarize(runs, rows=['r3-recon'])
    meta = dict(dataset='mnist', epochs=5, trials=3, command='python '
                'experiments.py table1 --epochs 5', date='2024-01-01',
                machine='TestOS, 2 CPUs', device='CPU')
    text = experiments.render_table(summary, meta)
    lines = text.splitlines()
    assert lines[0].startswith('# Table 1') and 'MNIST' in lines[0]
    assert 'python experiments.py table1 --epochs 5' in text
    assert '2024-01-01' in text and 'TestOS, 2 CPUs' in text
    assert 'final epoch' in text and 'not comparable' in text
    rows = [line for line in lines
            if line.startswith('| ') and not line.startswith('| ---')]
    assert len(rows) == 1 + 3    # header, baseline, r1, r3-recon
    assert 'Paper %' in rows[0] and 'Epochs' in rows[0]
    assert rows[1].split('|')[1:5] == [
        ' Baseline CNN ', ' — ', ' no ', ' 0.39 ± 0.000 (n=1) ']
    assert '| 0.39 |' in rows[1]
    assert '0.40 ± 0.100 (n=3)' in rows[2]
    assert '0.34 ± 0.032' in rows[2]
    assert '| 1 | no |' in rows[2]
    assert '| 5 | 60000 / 10000 |' in rows[2]
    assert 'not run (n=0)' in rows[3] and '0.25 ± 0.005' in rows[3]
    assert '| 3 | yes |' in rows[3]


def test_render_table_fashion_and_subset():
    summary = experiments.summarize(
        [run(0.1, 0, dataset='fashion-mnist', train_size=100,
             test_size=50)])
    text = experiments.render_table(summary, dict(
        dataset='fashion-mnist', epochs=5, train_size=100, test_size=50))
    assert 'Fashion-MNIST' in text.splitlines()[0]
    row = [line for line in text.splitlines() if '10.00' in line][0]
    assert '| — |' in row and '100 / 50' in row


def sweep(out, *extra):
    return experiments.main(['table1', '--epochs', '2', '--trials', '2',
                             '--out', str(out), '--rows', 'r1,baseline']
                            + list(extra))


def test_sweep_runs_each_run_once_and_resumes(tmp_path, fake_launch):
    out = tmp_path / 'sweep'
    assert sweep(out) == 0
    folders = [flag(c, '--out') for c in fake_launch]
    # trials go round the rows, rows in the paper's order
    assert [os.path.basename(f) for f in folders] == [
        'baseline-trial0', 'r1-trial0', 'baseline-trial1', 'r1-trial1']
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert len(results['runs']) == 4
    assert {(r['row'], r['trial'], r['seed']) for r in results['runs']} == {
        ('baseline', 0, 0), ('baseline', 1, 1), ('r1', 0, 0), ('r1', 1, 1)}
    run0 = [r for r in results['runs'] if r['row'] == 'r1'][0]
    assert run0['final_test_error'] == pytest.approx(0.003)
    assert run0['wall_seconds'] == 1.5 and run0['epochs'] == 2
    assert '--autoload' in run0['command']
    assert [s['row'] for s in results['summary']] == ['baseline', 'r1']
    assert results['summary'][1]['mean_error_pct'] == pytest.approx(0.35)
    assert results['meta']['command'].startswith('python experiments.py')
    table = (out / 'table.md').read_text()
    assert '0.35 ± 0.071 (n=2)' in table
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]

    del fake_launch[:]
    assert sweep(out) == 0
    assert fake_launch == []

    os.remove(out / 'r1-trial1' / 'final.json')
    assert sweep(out) == 0
    assert [flag(c, '--out') for c in fake_launch] == [
        str(out / 'r1-trial1')]
    with open(out / 'r1-trial1' / 'run.json') as f:
        info = json.load(f)
    assert info['invocations'] == 2 and info['wall_seconds'] == 3.0

    # a longer budget continues every run (train.py --autoload)
    del fake_launch[:]
    assert sweep(out, '--epochs', '3') == 0
    assert len(fake_launch) == 4


def test_collect_only_tables_finished_runs_and_starts_none(tmp_path,
                                                          fake_launch):
    out = tmp_path / 'sweep'
    assert sweep(out) == 0                      # trials 0 and 1 of 2 rows
    assert sweep(out, '--trials', '3', '--rows', 'r1') == 0   # r1 trial 2
    del fake_launch[:]
    assert sweep(out, '--trials', '3', '--collect-only',
                 '--rows', 'baseline,r1,r3') == 0
    assert fake_launch == []
    with open(out / 'results.json') as f:
        summary = {s['row']: s for s in json.load(f)['summary']}
    assert summary['baseline']['n'] == 2 and summary['r1']['n'] == 3
    assert summary['r1']['mean_error_pct'] == pytest.approx(0.4)
    assert summary['r3']['n'] == 0
    table = (out / 'table.md').read_text()
    assert '0.40 ± 0.100 (n=3)' in table and 'not run (n=0)' in table


def test_sweep_refuses_other_settings(tmp_path, fake_launch, capsys):
    out = tmp_path / 'sweep'
    assert sweep(out) == 0
    del fake_launch[:]
    assert sweep(out, '--train-size', '100') == 2
    assert fake_launch == []
    assert 'other settings' in capsys.readouterr().err
    # a folder that trained past --epochs is not reused either
    os.makedirs(out / 'r3-trial0')
    open(out / 'r3-trial0' / 'snapshot_epoch_5', 'w').close()
    assert experiments.main(['table1', '--epochs', '2', '--trials', '1',
                             '--out', str(out), '--rows', 'r3']) == 2
    assert 'already trained 5 epochs' in capsys.readouterr().err
    assert fake_launch == []


def test_sweep_goes_on_after_a_failed_run(tmp_path, monkeypatch):
    calls = []

    def launch(command, log_path):
        calls.append(command)
        if 'baseline' in flag(command, '--out'):
            return 1, 0.1
        write_final(os.path.dirname(log_path), 2)
        return 0, 0.1

    monkeypatch.setattr(experiments, 'launch', launch)
    assert sweep(tmp_path) == 1
    assert len(calls) == 4
    with open(tmp_path / 'results.json') as f:
        assert len(json.load(f)['runs']) == 2


def test_dry_run_lists_five_rows(tmp_path, capsys, fake_launch):
    out = tmp_path / 'dry'
    assert experiments.main(['table1', '--epochs', '3', '--trials', '1',
                             '--out', str(out), '--dry-run']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    for line, row in zip(lines, ROWS):
        assert 'train.py' in line and '--no-progress' in line
        assert os.path.join(str(out), row + '-trial0') in line
    assert 'baseline' in lines[0] and '--reconstruct' in lines[2]
    assert fake_launch == [] and not out.exists()


def test_unknown_row_is_an_error(capsys):
    with pytest.raises(CapsNetError) as info:
        experiments.main(['table1', '--epochs', '1', '--out', 'x',
                          '--rows', 'r2'])
    assert 'unknown row' in str(info.value) and info.value.status == 2


def test_real_tiny_sweep(tmp_path, mnist_dir):
    """One real train.py process: r1, 1 epoch, 100 / 50 examples."""
    out = tmp_path / 'tiny'
    assert experiments.main([
        'table1', '--rows', 'r1', '--epochs', '1', '--trials', '1',
        '--train-size', '100', '--test-size', '50', '--batchsize', '50',
        '--data-dir', mnist_dir, '--out', str(out)]) == 0
    folder = out / 'r1-trial0'
    assert experiments.is_finished(str(folder), 1)
    assert (folder / 'model.npz').exists()
    assert 'final-epoch test error' in (folder / 'train.log').read_text()
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert [r['row'] for r in results['runs']] == ['r1']
    assert results['runs'][0]['parameters'] == 8215568 - 1411344  # no decoder
    assert '100 / 50' in (out / 'table.md').read_text()
