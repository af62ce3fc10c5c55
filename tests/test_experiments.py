"""experiments.py: Table 1, MultiMNIST, the affine test and Figure 5, every
run in process through capsnet.training.loop.fit (replaced by a fake that
writes a finished run's final.json, but for the tiny real runs): the row
specs, run folders, refused conflicts, kept finished runs, the resume of an
interrupted sweep, the tables, --dry-run's train.py commands, results the
experiments wrote before the shared loop, and bad input in one line. The
run-folder convention itself is tested in test_training_runs.py."""
import json
import os
import shlex
import signal
import subprocess
import sys

import numpy
import pytest

import nets  # first: it brings capsnet.compat before chainer
from capsnet import files
from capsnet.data import paper
from capsnet.errors import CapsNetError
from capsnet.training import runs
import experiments
import train
from conftest import (REPO, assert_one_error, leftovers, needs_mnist,
                      needs_no_cupy, one_error_line, run_script, start,
                      wait_for)
from conftest import MNIST_DIR as MNIST
from test_data_paper import affnist_file

ROWS = ['baseline', 'r1', 'r1-recon', 'r3', 'r3-recon']


def flag(words, name):
    return words[words.index(name) + 1]


def table1_args(*argv):
    return experiments.build_parser().parse_args(['table1', *argv])


@pytest.fixture
def fake_fit(monkeypatch):
    """loop.fit replaced by one that writes the final.json of a finished
    run (test error 0.003 + 0.001 * seed) at once; no network is built and
    no data read. The list of the Settings it was called with."""
    calls = []

    def fit(settings, model, train_set, evaluations, device, **kwargs):
        calls.append(settings)
        os.makedirs(settings.out, exist_ok=True)
        final = dict(settings.record(), epochs=settings.epoch,
                     final_epoch=settings.epoch, parameters=123,
                     final_test_error=0.003 + 0.001 * settings.seed)
        files.write_text(os.path.join(settings.out, 'final.json'),
                         json.dumps(final))
        return final
    monkeypatch.setattr(experiments.loop, 'fit', fit)
    monkeypatch.setattr(experiments.nets, 'build',
                        lambda arch, recipe, **options: arch)
    monkeypatch.setattr(experiments.mnist, 'get_mnist_like',
                        lambda *args, **kwargs: (range(1000), None,
                                                 range(10)))
    return calls


def folders(calls):
    return [os.path.basename(settings.out) for settings in calls]


# -- Table 1 -----------------------------------------------------------------

def test_row_specs_match_the_paper():
    specs = experiments.row_specs()
    assert [s['name'] for s in specs] == ROWS
    by_name = {s['name']: s for s in specs}
    assert by_name['baseline']['settings'] == dict(arch='baseline')
    assert by_name['baseline']['paper_error_pct'] == 0.39
    assert by_name['baseline']['paper_std_pct'] is None
    assert (by_name['r1']['routing'], by_name['r1']['reconstruct']) == (
        1, False)
    assert by_name['r3-recon']['paper_error_pct'] == 0.25
    assert by_name['r3-recon']['paper_std_pct'] == 0.005
    assert by_name['r1-recon']['settings'] == dict(routing=1,
                                                   reconstruct=True)
    assert by_name['r3']['settings'] == dict(routing=3)


def test_run_command():
    args = table1_args('--epochs', '7', '--trials', '2', '--out', 'D',
                       '--seed', '10', '-g', '0', '--data-dir', 'data',
                       '--train-size', '500', '--dataset', 'fashion-mnist')
    words = shlex.split(experiments.run_command('r3-recon', 1, args))
    assert words[:2] == ['python', 'train.py']
    assert flag(words, '--epoch') == '7'
    assert flag(words, '--seed') == '11'
    assert flag(words, '--out') == os.path.join('D', 'r3-recon-trial1')
    assert flag(words, '--dataset') == 'fashion-mnist'
    assert flag(words, '--device') == '@cupy:0'  # from the old -g 0
    assert flag(words, '--data-dir') == 'data'
    assert flag(words, '--train-size') == '500'
    assert flag(words, '--batchsize') == '100'   # the paper recipe's
    assert '--test-size' not in words
    assert '--no-progress' in words and '--autoload' in words
    assert '--reconstruct' in words and '--routing' not in words  # r = 3
    assert flag(shlex.split(experiments.run_command('r1', 0, args)),
                '--routing') == '1'
    args.device = '@numpy'
    assert '--device' not in experiments.run_command('r1', 0, args)


@pytest.mark.parametrize('row', ROWS)
def test_run_command_is_the_runs_settings(row):
    """train.py given the printed command trains the very run the sweep
    trains (every setting alike)."""
    args = table1_args('--epochs', '2', '--out', 'D', '--seed', '4',
                       '--train-size', '300', '--recipe', 'official')
    words = shlex.split(experiments.run_command(row, 1, args))
    assert train.parse_settings(words[2:]) == \
        experiments.table1_settings(row, 1, args)


def sweep(out, *extra):
    return experiments.main(['table1', '--epochs', '2', '--trials', '2',
                             '--out', str(out), '--rows', 'r1,baseline']
                            + list(extra))


def test_sweep_runs_each_run_once_and_resumes(tmp_path, fake_fit):
    out = tmp_path / 'sweep'
    assert sweep(out) == 0
    # trials go round the rows, rows in the paper's order
    assert folders(fake_fit) == [
        'baseline-trial0', 'r1-trial0', 'baseline-trial1', 'r1-trial1']
    assert [(s.arch, s.routing, s.seed, s.epoch, s.autoload) for s in
            fake_fit] == [('baseline', 3, 0, 2, True), ('capsnet', 1, 0, 2,
                                                         True),
                          ('baseline', 3, 1, 2, True), ('capsnet', 1, 1, 2,
                                                        True)]
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert len(results['runs']) == 4
    assert {(r['row'], r['trial'], r['seed']) for r in results['runs']} == {
        ('baseline', 0, 0), ('baseline', 1, 1), ('r1', 0, 0), ('r1', 1, 1)}
    run0 = [r for r in results['runs'] if r['row'] == 'r1'][0]
    assert run0['final_test_error'] == pytest.approx(0.003)
    assert run0['wall_seconds'] >= 0 and run0['epochs'] == 2
    assert '--autoload' in run0['command']
    assert [s['row'] for s in results['summary']] == ['baseline', 'r1']
    assert results['summary'][1]['mean_error_pct'] == pytest.approx(0.35)
    assert results['meta']['command'].startswith('python experiments.py')
    table = (out / 'table.md').read_text()
    assert '0.35 ± 0.071 (n=2)' in table
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]

    del fake_fit[:]
    assert sweep(out) == 0
    assert fake_fit == []

    os.remove(out / 'r1-trial1' / 'final.json')
    assert sweep(out) == 0
    assert folders(fake_fit) == ['r1-trial1']
    with open(out / 'r1-trial1' / 'run.json') as f:
        info = json.load(f)
    assert info['invocations'] == 2 and info['wall_seconds'] >= 0

    # a longer budget continues every run (--autoload)
    del fake_fit[:]
    assert sweep(out, '--epochs', '3') == 0
    assert len(fake_fit) == 4


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path, fake_fit,
                                                      monkeypatch):
    """Ctrl-C in the third run: the same command again trains that run and
    the fourth, and no other; the interrupted run counts both
    invocations."""
    out = tmp_path / 'sweep'
    fit = experiments.loop.fit

    def interrupted(settings, *args, **kwargs):
        if settings.out.endswith('baseline-trial1'):
            raise KeyboardInterrupt
        return fit(settings, *args, **kwargs)
    monkeypatch.setattr(experiments.loop, 'fit', interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(out)
    assert folders(fake_fit) == ['baseline-trial0', 'r1-trial0']
    with open(out / 'results.json') as f:   # written after every run
        assert len(json.load(f)['runs']) == 2
    monkeypatch.setattr(experiments.loop, 'fit', fit)
    del fake_fit[:]
    assert sweep(out) == 0
    assert folders(fake_fit) == ['baseline-trial1', 'r1-trial1']
    with open(out / 'baseline-trial1' / 'run.json') as f:
        assert json.load(f)['invocations'] == 2
    with open(out / 'results.json') as f:
        assert len(json.load(f)['runs']) == 4


def test_a_failed_run_stops_the_sweep_in_one_line(tmp_path, fake_fit,
                                                  monkeypatch, run_tool):
    fit = experiments.loop.fit

    def failing(settings, *args, **kwargs):
        if settings.arch == 'capsnet':
            raise CapsNetError('the run failed (injected)')
        return fit(settings, *args, **kwargs)
    monkeypatch.setattr(experiments.loop, 'fit', failing)
    status, _, err = run_tool(experiments.main, [
        'table1', '--epochs', '2', '--trials', '2', '--out',
        tmp_path, '--rows', 'r1,baseline'])
    assert status == 1
    assert one_error_line(err) == 'error: the run failed (injected)'
    assert folders(fake_fit) == ['baseline-trial0']
    with open(tmp_path / 'results.json') as f:
        assert [r['row'] for r in json.load(f)['runs']] == ['baseline']
    with open(tmp_path / 'r1-trial0' / 'run.json') as f:
        assert json.load(f)['invocations'] == 1


def test_collect_only_tables_finished_runs_and_starts_none(tmp_path,
                                                          fake_fit):
    out = tmp_path / 'sweep'
    assert sweep(out) == 0                      # trials 0 and 1 of 2 rows
    assert sweep(out, '--trials', '3', '--rows', 'r1') == 0   # r1 trial 2
    del fake_fit[:]
    assert sweep(out, '--trials', '3', '--collect-only',
                 '--rows', 'baseline,r1,r3') == 0
    assert fake_fit == []
    with open(out / 'results.json') as f:
        summary = {s['row']: s for s in json.load(f)['summary']}
    assert summary['baseline']['n'] == 2 and summary['r1']['n'] == 3
    assert summary['r1']['mean_error_pct'] == pytest.approx(0.4)
    assert summary['r3']['n'] == 0
    table = (out / 'table.md').read_text()
    assert '0.40 ± 0.100 (n=3)' in table and 'not run (n=0)' in table


def test_sweep_refuses_other_settings(tmp_path, fake_fit, run_tool):
    out = tmp_path / 'sweep'
    assert sweep(out) == 0
    del fake_fit[:]
    status, _, err = run_tool(experiments.main, [
        'table1', '--epochs', '2', '--trials', '2', '--out', out, '--rows',
        'r1,baseline', '--train-size', '100'])
    assert status == 2 and fake_fit == []
    line = one_error_line(err)
    assert 'made with other settings' in line
    assert 'train_size None there, 100 now' in line
    # a folder that trained past --epochs is not reused either
    os.makedirs(out / 'r3-trial0')
    (out / 'r3-trial0' / 'final.json').write_text(json.dumps(dict(
        epochs=5, final_epoch=5, final_test_error=0.01)))
    status, _, err = run_tool(experiments.main, [
        'table1', '--epochs', '2', '--trials', '1', '--out', out, '--rows',
        'r3'])
    assert status == 2 and fake_fit == []
    assert 'already trained 5 epochs' in one_error_line(err)


def test_dry_run_prints_the_train_commands(tmp_path, capsys, fake_fit):
    out = tmp_path / 'dry'
    argv = ['table1', '--epochs', '3', '--trials', '1', '--out', str(out)]
    assert experiments.main(argv + ['--dry-run']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    for line, row in zip(lines, ROWS):
        assert line.startswith('python train.py ') and '--no-progress' in line
        assert os.path.join(str(out), row + '-trial0') in line
    assert 'baseline' in lines[0] and '--reconstruct' in lines[2]
    assert fake_fit == [] and not out.exists()
    # finished runs and folders it cannot use are commented out
    assert experiments.main(argv + ['--rows', 'r1']) == 0
    os.makedirs(out / 'r3-trial0')
    (out / 'r3-trial0' / 'run.json').write_text(json.dumps(dict(
        config=dict(seed=7))))
    capsys.readouterr()
    assert experiments.main(argv + ['--dry-run']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith('# finished: python train.py ')
    assert lines[3].startswith('# cannot run (') and 'seed 7 there' in \
        lines[3]
    assert lines[0].startswith('python train.py ')


def test_unknown_row_is_an_error(capsys):
    with pytest.raises(CapsNetError) as info:
        experiments.main(['table1', '--epochs', '1', '--out', 'x',
                          '--rows', 'r2'])
    assert 'unknown row' in str(info.value) and info.value.status == 2


def test_real_tiny_sweep(tmp_path, mnist_dir):
    """One real run through loop.fit: r1, 1 epoch, 100 / 50 examples."""
    out = tmp_path / 'tiny'
    assert experiments.main([
        'table1', '--rows', 'r1', '--epochs', '1', '--trials', '1',
        '--train-size', '100', '--test-size', '50', '--batchsize', '50',
        '--data-dir', mnist_dir, '--out', str(out)]) == 0
    folder = out / 'r1-trial0'
    assert runs.is_finished(str(folder), 1)
    assert (folder / 'model.npz').exists()
    assert (folder / 'snapshot_epoch_1').exists()  # the newest is kept
    with open(folder / 'log') as f:
        assert [entry['epoch'] for entry in json.load(f)] == [1]
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert [r['row'] for r in results['runs']] == ['r1']
    assert results['runs'][0]['parameters'] == 8215568 - 1411344  # no decoder
    assert '100 / 50' in (out / 'table.md').read_text()
    assert not (out / files.LOCK_NAME).exists()
    assert not (folder / files.LOCK_NAME).exists()


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



# -- MultiMNIST, the affine test, Figure 5 -----------------------------------

@pytest.mark.parametrize('argv, fragment', [
    (['multimnist', '--epoch', '1', '--out', 'x', '--pairs-per-digit', '0'],
     "argument --pairs-per-digit: must be an integer > 0, got '0'"),
    (['multimnist', '--epoch', '1', '--out', 'x', '--rows', 'r3'],
     'unknown row(s) r3; choose from capsnet,baseline'),
    (['affnist', '--epoch', '0', '--out', 'x'],
     "must be an integer > 0, got '0'"),
])
def test_bad_flags_are_one_line(run_tool, argv, fragment):
    status, _, err = run_tool(experiments.main, argv)
    assert status == 2
    assert fragment in one_error_line(err)


def test_a_missing_affnist_file_is_one_line(run_tool, tmp_path):
    status, _, err = run_tool(experiments.main, [
        'affnist', '--epoch', '1', '--out', tmp_path / 'o', '--affnist',
        tmp_path / 'nope.mat'])
    assert status == 1
    assert 'affNIST file' in one_error_line(err)


def test_figure5_refuses_a_model_that_is_not_the_multimnist_capsnet(
        run_tool, tmp_path, no_decoder_model_path):
    status, _, err = run_tool(experiments.main, [
        'figure5', '--load', no_decoder_model_path, '--out', tmp_path])
    assert status == 1
    assert 'figure5 needs the MultiMNIST CapsNet' in one_error_line(err)


def test_figure5_rows_are_right_then_wrong_and_starred_is_neither():
    """Figure 5's rows: the correctly classified examples first, then the
    wrong ones; the starred column's class is neither a label nor a
    prediction."""
    numpy.random.seed(0)
    model = nets.TwoDigitCapsNet()
    rs = numpy.random.RandomState(0)
    data = dict(x=rs.randint(0, 256, (6, 36, 36)).astype(numpy.uint8),
                t1=numpy.array([0, 1, 2, 3, 4, 5]),
                t2=numpy.array([6, 7, 8, 9, 0, 1]))
    best = nets.top2(model.predict(paper.to_float(data['x']))[1])
    data['t1'][:2], data['t2'][:2] = best[:2, 1], best[:2, 0]  # 2 right
    tiles, rows = experiments.figure5_rows(model, data, 3, 3)
    # 2 right of 3 asked, then 3 wrong of the 4
    assert [r['correct'] for r in rows] == [True, True, False, False, False]
    assert tiles.shape == (5 * 4, 36, 36, 3)
    assert 0 <= tiles.min() and tiles.max() <= 1
    for r in rows:
        assert r['forced'] not in r['labels'] + r['predicted']
        assert r['predicted'] == [int(c) for c in best[r['index']]]


def test_matched_epochs_takes_each_network_where_both_reach_the_target():
    def final(expanded, affine):
        return dict(history=[
            dict(epoch=e + 1, expanded_accuracy=x, affine_accuracy=a)
            for e, (x, a) in enumerate(zip(expanded, affine))])
    finals = dict(capsnet={0: final([0.90, 0.97, 0.99], [0.5, 0.7, 0.8])},
                  cnn={0: final([0.95, 0.98, 0.96], [0.4, 0.6, 0.55])})
    m = experiments.matched_epochs(finals, 0)
    # the CNN's best is 98%: the CapsNet reaches it first at epoch 3
    assert m['target'] == 0.98
    assert m['capsnet']['epoch'] == 3 and m['capsnet']['affine_accuracy'] \
        == 0.8
    assert m['cnn']['epoch'] == 2 and m['cnn']['affine_accuracy'] == 0.6
    # a trial with one network missing, or runs without history: none
    assert experiments.matched_epochs(finals, 1) is None
    finals['cnn'][0].pop('history')
    assert experiments.matched_epochs(finals, 0) is None


def test_results_of_the_earlier_experiments_still_read(tmp_path, run_tool,
                                                       fake_fit):
    """A MultiMNIST run folder as the experiments wrote it before the
    shared loop (final.json {config, test_error} and model.npz) counts as
    finished: it is tabled and not trained again."""
    folder = tmp_path / 'capsnet-trial0'
    folder.mkdir()
    (folder / 'final.json').write_text(json.dumps(dict(
        config=dict(row='capsnet', trial=0, seed=0, epochs=2,
                    pairs_per_digit=2), test_error=0.052,
        parameters=11361808, train_size=60, test_size=20)))
    (folder / 'model.npz').write_bytes(b'kept as it is')
    status, out, err = run_tool(experiments.main, [
        'multimnist', '--epoch', '2', '--out', tmp_path, '--rows',
        'capsnet', '--data-dir', tmp_path / 'no-mnist-needed'])
    assert status == 0, err
    assert fake_fit == [] and '===' not in out
    with open(tmp_path / 'results.json') as f:
        row = json.load(f)['summary'][0]
    assert row['n'] == 1 and row['errors_pct'] == [pytest.approx(5.2)]
    assert (row['parameters'], row['train_examples'],
            row['test_examples']) == (11361808, 60, 20)
    assert '5.20 ± 0.00 (n=1)' in (tmp_path / 'table.md').read_text()
    assert (folder / 'model.npz').read_bytes() == b'kept as it is'


@needs_mnist
@pytest.mark.slow
def test_multimnist_end_to_end_resumes_and_refuses_other_settings(
        run_tool, tmp_path, mnist_dir):
    out = tmp_path / 'mm'
    argv = ['multimnist', '--epoch', '1', '--out', out, '--data-dir',
            mnist_dir, '--train-digits', '30', '--pairs-per-digit', '2',
            '--test-digits', '20', '--test-pairs-per-digit', '1',
            '--rows', 'capsnet', '--batchsize', '20']
    status, out_text, err = run_tool(experiments.main, argv)
    assert status == 0, err
    result = json.load(open(out / 'results.json'))
    row = result['summary'][0]
    assert row['n'] == 1 and row['parameters'] == 11361808
    assert row['train_examples'] == 60 and row['test_examples'] == 20
    assert 'MultiMNIST' in open(out / 'table.md').read()
    model = files.load_model(str(out / 'capsnet-trial0' / 'model.npz'),
                             nets.ARCHITECTURES)
    assert model.arch == 'capsnet-multimnist'
    # run again: finished, nothing trained
    status, out_text, _ = run_tool(experiments.main, argv)
    assert status == 0 and '=== capsnet' not in out_text
    # the same row with other data settings meets its folder: one line
    status, _, err = run_tool(experiments.main, argv + ['--data-seed', '1'])
    assert status == 2
    assert 'made with other settings' in one_error_line(err)
    # figure 5 from the trained model
    status, out_text, err = run_tool(experiments.main, [
        'figure5', '--load', out / 'capsnet-trial0' / 'model.npz', '--out',
        out, '--data-dir', mnist_dir, '--test-digits', '30'])
    assert status == 0, err
    assert os.path.isfile(out / 'figure5.png')
    figure = json.load(open(out / 'figure5.json'))
    assert all(r['forced'] not in r['labels'] + r['predicted']
               for r in figure['rows'])


@needs_mnist
@pytest.mark.slow
def test_affnist_end_to_end_with_a_real_structured_file(
        run_tool, tmp_path, mnist_dir):
    rs = numpy.random.RandomState(0)
    affnist_file(tmp_path / 'test.mat',
                 rs.randint(0, 256, (10, 40, 40)).astype(numpy.uint8),
                 numpy.arange(10))
    out = tmp_path / 'af'
    status, _, err = run_tool(experiments.main, [
        'affnist', '--out', out, '--data-dir', mnist_dir,
        '--train-size', '20', '--test-size', '10', '--epoch', '2',
        '--affnist', tmp_path / 'test.mat', '--batchsize', '10'])
    assert status == 0, err
    result = json.load(open(out / 'results.json'))
    assert result['meta']['affine_is_generated'] is False
    assert [row['n'] for row in result['summary']] == [1, 1]
    table = open(out / 'table.md').read()
    assert 'measured on the real affNIST file' in table
    # per-epoch history of both test sets, the matched comparison from it,
    # and the newest snapshot alone kept once a run has finished
    for row in ('capsnet', 'cnn'):
        final = json.load(open(out / (row + '-trial0') / 'final.json'))
        assert [h['epoch'] for h in final['history']] == [1, 2]
        assert final['affine_accuracy'] == final['history'][-1][
            'affine_accuracy']
        assert sorted(n for n in os.listdir(out / (row + '-trial0'))
                      if n.startswith('snapshot')) == ['snapshot_epoch_2']
    matched = result['meta']['matched'][0]
    assert matched['target'] == min(
        max(h['expanded_accuracy'] for h in json.load(open(
            out / (row + '-trial0') / 'final.json'))['history'])
        for row in ('capsnet', 'cnn'))
    assert '## At matched expanded-MNIST accuracy' in table
    # a file of another structure: one line
    (tmp_path / 'bad.mat').write_bytes(b'not a mat file')
    status, _, err = run_tool(experiments.main, [
        'affnist', '--epoch', '1', '--out', tmp_path / 'af2', '--data-dir',
        mnist_dir, '--train-size', '20', '--rows', 'capsnet', '--affnist',
        tmp_path / 'bad.mat'])
    assert status == 1
    assert 'is not an affNIST .mat file' in one_error_line(err)


# -- interrupts, locks and bad input, as a user meets them -------------------

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
    assert not (run / files.LOCK_NAME).exists()  # the run ended too
    assert leftovers(str(run)) == []


def test_experiments_seed_range(run_tool, tmp_path):
    status, _, err = run_tool(experiments.main, [
        'table1', '--epoch', '1', '--out', tmp_path, '--seed', '4294967293',
        '--trials', '2'])
    assert status == 2
    assert 'gives seeds above 4294967293' in one_error_line(err)


def test_two_sweeps_on_one_out(tmp_path):
    out = tmp_path / 'sweep'
    out.mkdir()
    (out / files.LOCK_NAME).write_text('{} experiments.py\n'.format(os.getppid()))
    result = subprocess.run(
        [sys.executable, 'experiments.py', 'table1', '--epoch', '1',
         '--trials', '1', '--rows', 'r1', '--out', str(out)],
        cwd=REPO, capture_output=True, text=True)
    assert_one_error(result, 'is in use by process', status=1)


def test_experiments_missing_dataset_file(tmp_path):
    """The run's own error, in one line: the sweep trains in process."""
    out = tmp_path / 'sweep'
    result = run_script('experiments.py', 'table1', '--epochs', '1',
                        '--trials', '1', '--rows', 'r1', '--out', out,
                        '--data-dir', tmp_path / 'nowhere')
    assert_one_error(result, '--data-dir {} does not exist'.format(
        tmp_path / 'nowhere'), status=1)
    assert not (out / 'r1-trial0' / 'final.json').exists()


@pytest.mark.parametrize('flags, fragments', [
    (['-b', '0'], ['--batchsize', 'must be an integer > 0']),
    (['--epochs', '-1'], ['--epochs', 'must be an integer > 0']),
    (['--dataset', 'cifar'], ['--dataset', 'invalid choice']),
], ids=['batchsize-0', 'negative-epochs', 'unknown-dataset'])
def test_experiments_bad_flags(tmp_path, flags, fragments):
    out = tmp_path / 'sweep'
    argv = ['table1', '--epochs', '1', '--out', out] + flags
    assert_one_error(run_script('experiments.py', *argv), *fragments, status=2)
    assert not out.exists()


@needs_no_cupy
def test_experiments_gpu_without_cupy(tmp_path):
    out = tmp_path / 'sweep'
    result = run_script('experiments.py', 'table1', '--epochs', '1',
                        '--trials', '1', '--rows', 'r1', '--out', out, '-g',
                        '0', '--data-dir', tmp_path / 'nowhere')
    assert_one_error(result, '@cupy:0', 'CuPy cannot be used here',
                     status=1)
    assert not (out / 'r1-trial0').exists()


def test_experiments_unwritable_out(blocker):
    assert_one_error(run_script('experiments.py', 'table1', '--epochs', '1',
                                '--trials', '1', '--rows', 'r1',
                                '--out', blocker / 'sweep'), str(blocker))
    assert blocker.read_text() == 'keep me'


def test_affnist_file_that_is_a_folder(tmp_path):
    """It said 'affNIST file D does not exist'."""
    assert_one_error(run_script('experiments.py', 'affnist', '--epoch', '1', '--out',
                                tmp_path / 'o', '--affnist', tmp_path),
                     'affNIST file {} is a folder; pass the .mat file'.format(
                         tmp_path), status=1)
