"""experiments.py multimnist / affnist / figure5 (paper_experiments.py):
bad input in one line, and tiny end-to-end runs on the real MNIST."""
import json
import os

import numpy
import pytest

import experiments
from capsnet import files
import nets
import paper_experiments
from conftest import one_error_line, needs_mnist


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


def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    folder = str(tmp_path / 'capsnet-trial0')
    assert paper_experiments.prepare_run(folder, dict(seed=0)) is None
    with pytest.raises(paper_experiments.RunConflict) as e:
        paper_experiments.prepare_run(folder, dict(seed=1))
    assert 'seed 0 there, 1 now' in str(e.value)


def test_figure5_rows_are_right_then_wrong():
    numpy.random.seed(0)
    model = nets.TwoDigitCapsNet()
    rs = numpy.random.RandomState(0)
    data = dict(x=rs.randint(0, 256, (6, 36, 36)).astype(numpy.uint8),
                t1=numpy.array([0, 1, 2, 3, 4, 5]),
                t2=numpy.array([6, 7, 8, 9, 0, 1]))
    _, scores = paper_experiments.predict_all(
        model, data['x'][:, None].astype(numpy.float32) / 255)
    best = nets.top2(scores)
    data['t1'][:2], data['t2'][:2] = best[:2, 1], best[:2, 0]  # 2 right
    mosaic, rows = paper_experiments.figure5(model, data, 3, 3)
    # 2 right of 3 asked, then 3 wrong of the 4
    assert [r['correct'] for r in rows] == [True, True, False, False, False]
    assert mosaic.shape == (5 * 38 + 2, 4 * 38 + 2, 3)
    assert all(r['forced'] not in r['labels'] for r in rows)


@needs_mnist
@pytest.mark.slow
def test_multimnist_end_to_end_resumes_and_refuses_another_cache(
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
    assert status == 0 and 'finished before' in out_text
    # another row with other data settings meets the old cache: one line
    status, _, err = run_tool(experiments.main, argv[:-4] + [
        '--rows', 'baseline', '--data-seed', '1'])
    assert status == 1
    assert 'made with other settings' in one_error_line(err)
    # figure 5 from the trained model
    status, out_text, err = run_tool(experiments.main, [
        'figure5', '--load', out / 'capsnet-trial0' / 'model.npz', '--out',
        out, '--data-dir', mnist_dir, '--test-digits', '30'])
    assert status == 0, err
    assert os.path.isfile(out / 'figure5.png')


@needs_mnist
@pytest.mark.slow
def test_affnist_end_to_end_with_a_real_structured_file(
        run_tool, tmp_path, mnist_dir):
    from test_data_paper import affnist_file
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
    # and no snapshot left once a run has finished
    for row in ('capsnet', 'cnn'):
        final = json.load(open(out / (row + '-trial0') / 'final.json'))
        assert [h['epoch'] for h in final['history']] == [1, 2]
        assert final['affine_accuracy'] == final['history'][-1][
            'affine_accuracy']
        assert not os.path.exists(out / (row + '-trial0') / 'snapshot.npz')
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


def _tiny_training(snapshot, epochs, log=None):
    """A small dropout CNN trained by paper_experiments.train on random
    data: dropout draws from NumPy's global generator, so an exact resume
    needs every piece of state the snapshot keeps."""
    numpy.random.seed(3)
    model = nets.PoolingCNN(input_size=8, dropout=0.5)
    rs = numpy.random.RandomState(0)
    x = rs.rand(12, 1, 8, 8).astype(numpy.float32)
    t = rs.randint(0, 10, 12).astype(numpy.int32)
    seen = []

    def evaluate():
        return dict(accuracy=paper_experiments.accuracy(model, x, t))
    history = paper_experiments.train(
        model, 12, lambda i, e: (x[i], t[i]), epochs, 5, 7, 4,
        log=log or seen.append, snapshot=snapshot, evaluate=evaluate)
    return model, history, seen


def test_an_interrupted_run_resumes_from_its_snapshot_to_the_same_result(
        tmp_path):
    whole, whole_history, _ = _tiny_training(None, 3)
    snapshot = str(tmp_path / paper_experiments.SNAPSHOT)
    _tiny_training(snapshot, 2)          # "interrupted" after epoch 2
    resumed, history, said = _tiny_training(snapshot, 3)
    assert any('resumed from' in line and 'after epoch 2' in line
               for line in said)
    assert [h['epoch'] for h in history] == [1, 2, 3]
    for a, b in zip(history, whole_history):
        assert a['train_loss'] == b['train_loss']
        assert a['accuracy'] == b['accuracy']
    for (name, p), (_, q) in zip(sorted(resumed.namedparams()),
                                 sorted(whole.namedparams())):
        assert numpy.array_equal(p.array, q.array), name


def test_a_damaged_snapshot_is_said_and_training_starts_again(tmp_path):
    whole, whole_history, _ = _tiny_training(None, 2)
    snapshot = tmp_path / paper_experiments.SNAPSHOT
    snapshot.write_bytes(b'PK\x03\x04 truncated')
    model, history, said = _tiny_training(str(snapshot), 2)
    assert any('is damaged' in line and 'training from epoch 1' in line
               for line in said)
    assert [h['train_loss'] for h in history] == [
        h['train_loss'] for h in whole_history]
    # a snapshot of another network (other shapes) changes nothing either
    other = tmp_path / 'other.npz'
    numpy.savez(other, step=numpy.array(1), history=numpy.array('[]'))
    model, history, said = _tiny_training(str(other), 1)
    assert any('is missing or has another shape' in line for line in said)
    assert history[0]['train_loss'] == whole_history[0]['train_loss']


def test_pair_error_is_counted():
    """errors / n, so 59 wrong of 10,000 is 0.0059 exactly (1 - accuracy
    gave 0.005900000000000016)."""
    class Scores:
        device = type('D', (), {'send': staticmethod(lambda a: a)})()

        def predict(self, x):
            scores = numpy.zeros((len(x), 10), numpy.float32)
            scores[:, 0] = scores[:, 1] = 1     # predicts {0, 1}
            return scores.argmax(axis=1), scores
    n = 10000
    t1, t2 = numpy.zeros(n, int), numpy.ones(n, int)
    t2[:59] = 2                                # 59 pairs are {0, 2}
    x = numpy.zeros((n, 1), numpy.float32)
    assert paper_experiments.pair_error(Scores(), x, t1, t2) == 0.0059


def test_matched_epochs_takes_each_network_where_both_reach_the_target():
    def final(trial, expanded, affine):
        return dict(config=dict(trial=trial), history=[
            dict(epoch=e + 1, expanded_accuracy=x, affine_accuracy=a)
            for e, (x, a) in enumerate(zip(expanded, affine))])
    runs = dict(capsnet=[final(0, [0.90, 0.97, 0.99], [0.5, 0.7, 0.8])],
                cnn=[final(0, [0.95, 0.98, 0.96], [0.4, 0.6, 0.55])])
    m = paper_experiments.matched_epochs(runs, 0)
    # the CNN's best is 98%: the CapsNet reaches it first at epoch 3
    assert m['target'] == 0.98
    assert m['capsnet']['epoch'] == 3 and m['capsnet']['affine_accuracy'] \
        == 0.8
    assert m['cnn']['epoch'] == 2 and m['cnn']['affine_accuracy'] == 0.6
    # a trial with one network missing, or runs without history: none
    assert paper_experiments.matched_epochs(runs, 1) is None
    runs['cnn'][0].pop('history')
    assert paper_experiments.matched_epochs(runs, 0) is None
