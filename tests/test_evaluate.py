"""evaluate.py: error statistics, figures, JSON and error handling.

Fixtures (mnist_dir, fresh_model_path, run_tool) are in conftest.py.
"""
import contextlib
import io
import json
import os
import re

import numpy
import pytest

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import figures
import evaluate
from conftest import (Unchanged, assert_missing_data_dir, assert_one_error,
                      one_error_line, run_script, tile_shape)

KEYS = {'test_error', 'errors', 'n', 'per_class_error', 'confusion',
        'mean_length_true', 'mean_length_runner_up', 'model', 'options',
        'dataset'}


# -- the statistics ----------------------------------------------------------

def test_evaluate_counts_by_hand():
    t = numpy.array([0, 0, 1, 1, 2])
    predictions = numpy.array([0, 1, 1, 1, 0])
    scores = numpy.array([[0.9, 0.2, 0.1],
                          [0.3, 0.6, 0.1],
                          [0.1, 0.8, 0.0],
                          [0.2, 0.7, 0.5],
                          [0.4, 0.1, 0.3]])
    r = evaluate.evaluate(predictions, scores, t, n_classes=3)
    assert r['n'] == 5 and r['errors'] == 2
    assert r['test_error'] == pytest.approx(0.4)
    assert r['confusion'] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r['per_class_error'] == [0.5, 0.0, 1.0]
    assert r['misclassified'] == [1, 4]
    # true: 0.9 0.3 0.8 0.7 0.3; runner-up: 0.2 0.6 0.1 0.5 0.4
    assert r['mean_length_true'] == pytest.approx(3.0 / 5)
    assert r['mean_length_runner_up'] == pytest.approx(1.8 / 5)
    assert r['mean_length_true_misclassified'] == pytest.approx(0.3)
    assert r['mean_length_runner_up_misclassified'] == pytest.approx(0.5)


def test_no_errors_gives_none_for_the_misclassified_means():
    r = evaluate.evaluate(numpy.array([1, 0]),
                          numpy.array([[0.1, 0.9], [0.8, 0.2]]),
                          numpy.array([1, 0]), n_classes=2)
    assert r['errors'] == 0 and r['test_error'] == 0
    assert r['mean_length_true_misclassified'] is None
    assert r['per_class_error'] == [0.0, 0.0]


# -- the tool ----------------------------------------------------------------

@pytest.fixture(scope='module')
def evaluation(tmp_path_factory, mnist_dir, fresh_model_path):
    """evaluate.py --json on the first 200 MNIST test examples, twice."""
    runs = []
    for k in range(2):
        out = tmp_path_factory.mktemp('eval{}'.format(k))
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            status = evaluate.main([
                '--load', fresh_model_path, '--data-dir', mnist_dir,
                '--test-size', '200', '--batchsize', '64',
                '--out', str(out), '--json'])
        runs.append({'status': status, 'out': out,
                     'stdout': stdout.getvalue(),
                     'stderr': stderr.getvalue()})
    return runs


def test_json_has_the_keys_and_is_consistent(evaluation, fresh_model_path):
    run = evaluation[0]
    assert run['status'] == 0, run['stderr']
    lines = run['stdout'].splitlines()
    assert len(lines) == 1  # --json: one line on stdout
    result = json.loads(lines[0])
    assert KEYS <= set(result)
    with open(os.path.join(run['out'], 'evaluation.json')) as f:
        assert json.load(f) == result
    assert result['n'] == 200 and result['dataset'] == 'mnist'
    assert result['model'] == fresh_model_path
    assert result['options']['routing'] == 3
    confusion = numpy.array(result['confusion'])
    assert confusion.shape == (10, 10) and confusion.sum() == 200
    off_diagonal = confusion.sum() - numpy.trace(confusion)
    assert result['errors'] == off_diagonal
    assert result['test_error'] == pytest.approx(result['errors'] / 200)
    assert result['test_error_percent'] == pytest.approx(
        100 * result['errors'] / 200)
    per_class = numpy.array(result['per_class_error'])
    rows = confusion.sum(axis=1)
    numpy.testing.assert_allclose(
        per_class, (rows - numpy.diag(confusion)) / rows)
    assert len(result['misclassified']) == result['errors']
    assert len(result['misclassified_shown']) == min(100, result['errors'])
    for key in ('mean_length_true', 'mean_length_runner_up'):
        assert 0 <= result[key] < 1
    # the report went to stderr
    assert 'test error {:.2f}% ({} of 200)'.format(
        result['test_error_percent'], result['errors']) in run['stderr']


def test_figures_exist(evaluation):
    for name in ('confusion.png', 'misclassified.png', 'evaluation.json'):
        path = os.path.join(evaluation[0]['out'], name)
        assert os.path.getsize(path) > 0
    assert sorted(os.listdir(evaluation[0]['out'])) == [
        'confusion.png', 'evaluation.json', 'misclassified.png']


def read_png(path):
    from PIL import Image
    with Image.open(path) as image:
        return numpy.asarray(image.convert('RGB'))


def test_misclassified_png_has_the_digits_white_on_black_and_labelled(
        evaluation, mnist_dir):
    """The PNG has the layout of the same figure drawn here, and the
    digits' pixels at --scale (default)."""
    from capsnet.data import mnist
    run = evaluation[0]
    result = json.loads(run['stdout'])
    shown = result['misclassified_shown']
    assert shown   # a fresh model gets most of them wrong
    _, _, test = mnist.get_mnist_like('mnist', data_dir=mnist_dir,
                                      test_size=200)
    x, _ = mnist.to_arrays(test)
    images = x[[s['index'] for s in shown], 0]
    figure, layout = evaluate.misclassified_figure(
        images, [s['prediction'] for s in shown],
        [s['label'] for s in shown], evaluate.misclassified_title(
            len(shown), result['errors'], result['model']))
    png = read_png(os.path.join(run['out'], 'misclassified.png'))
    assert png.shape[:2] == (layout.height, layout.width)
    scale = figures.SCALE
    assert layout.mosaic[3] == tile_shape(1, 10, 28 * scale,
                                          figures.border_px(scale))[1]
    for k in (0, len(shown) - 1):
        top, left, bottom, right = layout.tile_box(*divmod(k, 10))
        numpy.testing.assert_array_equal(
            png[top:bottom, left:right, 0],
            numpy.round(255 * figures.upscale(images[k:k + 1], scale)[0]))
    texts = figures.figure_texts(figure)
    assert 'true {}, pred {}'.format(shown[0]['label'],
                                     shown[0]['prediction']) in texts


def test_confusion_figure_has_a_colour_bar_labels_and_counts():
    confusion = numpy.array([[50, 2, 0], [0, 40, 1], [3, 0, 45]])
    figure = evaluate.confusion_figure(confusion, 'the title')
    ax, bar = figure.axes
    assert 'log scale' in bar.get_ylabel()
    assert ax.get_xlabel() == 'predicted class'
    assert ax.get_ylabel() == 'true class'
    texts = figures.figure_texts(figure)
    assert 'the title' in texts
    cells = [t.get_text() for t in ax.texts]
    assert cells == [str(c) for c in confusion.ravel()]
    image = ax.get_images()[0]
    assert image.get_array().mask[0, 2]    # an empty cell: white
    assert not image.get_array().mask[0, 1]


def test_no_misclassified_digits_is_said_in_the_figure():
    figure, layout = evaluate.misclassified_figure(
        numpy.zeros((0, 28, 28)), [], [], 'title')
    assert layout is None
    assert 'no misclassified test examples' in figures.figure_texts(figure)


def test_two_evaluations_are_identical(evaluation):
    first, second = (json.loads(run['stdout']) for run in evaluation)
    for result in (first, second):
        result.pop('model')
    assert first == second


def test_text_report(tmp_path, mnist_dir, fresh_model_path, run_tool):
    status, out, err = run_tool(evaluate.main, [
        '--load', fresh_model_path, '--data-dir', mnist_dir,
        '--test-size', '20', '--out', tmp_path / 'e'])
    assert status == 0 and err == ''
    assert ' of 20)' in out
    table = [line for line in out.splitlines()
             if re.match(r'^\s+\d\s+\d+\s+\d+\s+(\d+\.\d\d%|n/a)$', line)]
    assert len(table) == 10  # one row per class (n/a: none in the 20)
    assert 'runner-up' in out
    assert 'loaded {}: capsnet;'.format(fresh_model_path) in out


# -- errors ------------------------------------------------------------------

def test_unknown_dataset_is_a_usage_error(tmp_path, fresh_model_path,
                                          run_tool):
    status, _, err = run_tool(evaluate.main, [
        '--load', fresh_model_path, '--dataset', 'cifar10'])
    assert status == 2
    assert 'cifar10' in one_error_line(err)


def test_missing_data_is_one_line(tmp_path, fresh_model_path, run_tool):
    assert_missing_data_dir(run_tool, evaluate.main, [
        '--load', fresh_model_path, '--out', tmp_path / 'e'],
        tmp_path / 'nowhere')


def test_too_large_test_size_is_one_line(tmp_path, mnist_dir,
                                         fresh_model_path, run_tool):
    status, _, err = run_tool(evaluate.main, [
        '--load', fresh_model_path, '--data-dir', mnist_dir,
        '--test-size', '20000', '--out', tmp_path / 'e'])
    assert status != 0
    assert '--test-size 20000 is beyond the data: mnist has 10000 test ' \
        'examples; use at most 10000' in one_error_line(err)


def test_unwritable_out_is_one_line(tmp_path, mnist_dir, fresh_model_path,
                                    run_tool):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    status, _, err = run_tool(evaluate.main, [
        '--load', fresh_model_path, '--data-dir', mnist_dir,
        '--out', blocker / 'e'])
    assert status != 0
    assert '--out' in one_error_line(err)


def test_gpu_without_cupy_is_one_line(tmp_path, fresh_model_path, run_tool):
    from chainer.backends import cuda
    if cuda.available:
        pytest.skip('CuPy is available here')
    status, _, err = run_tool(evaluate.main, [
        '--load', fresh_model_path, '-g', '0', '--out', tmp_path / 'e'])
    assert status != 0
    assert 'CuPy' in one_error_line(err)


def test_evaluate_bad_model_overwrites_nothing(tmp_path, fresh_model_path):
    half = tmp_path / 'half.npz'
    with open(fresh_model_path, 'rb') as f:
        data = f.read()
    half.write_bytes(data[:len(data) // 2])
    out = tmp_path / 'eval'
    kept = Unchanged(out / 'confusion.png', out / 'misclassified.png',
                     out / 'evaluation.json')
    assert_one_error(run_script('evaluate.py', '--load', half, '-o', out),
                     str(half), 'truncated or corrupt', status=1)
    kept.check()


def test_evaluate_batchsize_zero(tmp_path, fresh_model_path):
    assert_one_error(run_script('evaluate.py', '--load', fresh_model_path, '-b', '0',
                                '-o', tmp_path / 'e'),
                     '--batchsize', 'must be an integer > 0', status=2)
    assert not (tmp_path / 'e').exists()
