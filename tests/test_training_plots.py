"""capsnet/training/plots.py: the training plots (error.png, loss.png,
accuracy.png) and the printed report, on a fake trainer; a full disk
keeps the previous plot."""
import errno
import io
import os
import sys
import types

import numpy
import pytest
from PIL import Image

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from capsnet import cli, figures
from capsnet.training import plots
from conftest import leftovers


class FakeLogReport:
    def __init__(self, log):
        self.log = log


def fake_trainer(tmp_path, log):
    report = FakeLogReport(log)

    def get_extension(name):
        if name != 'LogReport' or log is None:
            raise ValueError('extension {} not found'.format(name))
        return report
    return types.SimpleNamespace(out=str(tmp_path),
                                 get_extension=get_extension)


LOG = [{'epoch': e, 'iteration': 600 * e, 'main/loss': 0.2 / e,
        'test/main/loss': 0.25 / e, 'main/accuracy': 1 - 0.04 / e,
        'test/main/accuracy': 1 - 0.03 / e} for e in range(1, 6)]


def test_error_plot_draws_test_error_in_percent_on_a_log_scale(tmp_path):
    plots.ErrorPlot()(fake_trainer(tmp_path, LOG))
    path = tmp_path / 'error.png'
    with Image.open(path) as image:
        assert image.size == (800, 500)
    assert sorted(os.listdir(tmp_path)) == ['error.png']  # no temp file
    figure = plots.error_figure(LOG)
    (ax,) = figure.axes
    assert ax.get_yscale() == 'log'
    assert ax.get_xlabel() == 'epoch' and '%' in ax.get_ylabel()
    assert ax.get_title() == 'Test error per epoch (last: 0.60% at epoch 5)'
    test_line, train_line, reference = ax.get_lines()
    numpy.testing.assert_allclose(test_line.get_xdata(), [1, 2, 3, 4, 5])
    numpy.testing.assert_allclose(test_line.get_ydata(),
                                  [3.0, 1.5, 1.0, 0.75, 0.6])
    numpy.testing.assert_allclose(train_line.get_ydata()[0], 4.0)
    numpy.testing.assert_allclose(reference.get_ydata(), 0.25)
    assert reference.get_linestyle() == '--'
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ['test error', 'training error', 'paper: 0.25%']
    low, high = ax.get_ylim()
    assert low < 0.25 < 3.0 < high
    ticks = ax.xaxis.get_major_locator().tick_values(1, 5)
    assert all(float(t).is_integer() for t in ticks)


def test_a_zero_error_is_drawn_at_the_floor_of_the_log_scale():
    log = [{'epoch': 1, 'test/main/accuracy': 1.0}]
    figure = plots.error_figure(log, train_key=None)
    (ax,) = figure.axes
    assert ax.get_lines()[0].get_ydata()[0] == plots.ERROR_FLOOR
    assert ax.get_ylim()[0] > 0


@pytest.mark.parametrize('log', [None, [], [{'epoch': 1, 'main/loss': 1.0}],
                                 [{'epoch': 1, 'main/accuracy': float('nan'),
                                   'test/main/accuracy': None}]])
def test_plots_of_an_empty_log_write_nothing_and_raise_nothing(tmp_path,
                                                               log):
    trainer = fake_trainer(tmp_path, log)
    plots.ErrorPlot()(trainer)
    plots.AccuracyPlot()(trainer)
    names = sorted(os.listdir(tmp_path))
    assert 'error.png' not in names and 'accuracy.png' not in names


def test_loss_and_accuracy_plots(tmp_path):
    trainer = fake_trainer(tmp_path, LOG)
    plots.LossPlot()(trainer)
    plots.AccuracyPlot()(trainer)
    assert sorted(os.listdir(tmp_path)) == ['accuracy.png', 'loss.png']
    figure = plots.curves_figure(LOG, ('main/accuracy', 'test/main/accuracy'),
                                 ('training accuracy', 'test accuracy'),
                                 'Accuracy per epoch', 'accuracy (%)',
                                 transform=lambda a: 100 * a)
    (ax,) = figure.axes
    train, test = ax.get_lines()
    numpy.testing.assert_allclose(test.get_ydata()[0], 97.0)
    assert ax.get_ylabel() == 'accuracy (%)'
    texts = figures.figure_texts(figure)
    assert 'Accuracy per epoch' in texts and 'test accuracy' in texts
    figure = plots.LossPlot().figure(LOG)
    assert figure.axes[0].get_yscale() == 'log'
    assert 'Loss per epoch' in figures.figure_texts(figure)


def test_plot_extensions_run_after_the_log_report_each_epoch():
    from chainer.training import extension
    for plot in (plots.ErrorPlot(), plots.LossPlot(), plots.AccuracyPlot()):
        assert plot.trigger == (1, 'epoch')
        assert plot.priority < extension.PRIORITY_WRITER


class FakeTty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize('stream, erases', [(io.StringIO(), False),
                                            (FakeTty(), True)])
def test_print_report_writes_erase_codes_only_to_a_terminal(
        tmp_path, stream, erases):
    trainer = fake_trainer(tmp_path, LOG[:2])
    report = plots.PrintReport(['epoch', 'main/loss'], out=stream)
    report(trainer)
    text = stream.getvalue()
    assert ('\033[J' in text) == erases
    lines = text.replace('\033[J', '').splitlines()
    assert lines[0].split() == ['epoch', 'main/loss']
    assert [line.split()[0] for line in lines[1:]] == ['1', '2']


def test_print_report_follows_the_current_stdout(tmp_path, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, 'stdout', stream)
    plots.PrintReport(['epoch'])(fake_trainer(tmp_path, LOG[:1]))
    assert stream.getvalue().split() == ['epoch', '1']


def plot_once(out, value):
    """One LossPlot('loss.png') call, as the trainer makes it."""
    log = types.SimpleNamespace(log=[{'epoch': 1, 'main/loss': value}])
    plots.LossPlot(keys=['main/loss'], log_report=log)(
        types.SimpleNamespace(out=str(out)))


def test_plots_on_a_full_disk_keep_the_previous_png(tmp_path, monkeypatch):
    """loss.png / accuracy.png: a disk that fills during the write, or has
    no room up front, leaves the previous plot and no temporary file."""
    plot_once(tmp_path, 1.0)
    before = (tmp_path / 'loss.png').read_bytes()
    assert before.startswith(b'\x89PNG') and leftovers(str(tmp_path)) == []

    def no_room(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    with monkeypatch.context() as patch:
        patch.setattr(os, 'fsync', no_room)
        with pytest.raises(cli.DiskFullError, match='loss.png is intact'):
            plot_once(tmp_path, 2.0)
    assert (tmp_path / 'loss.png').read_bytes() == before
    assert leftovers(str(tmp_path)) == []
    monkeypatch.setattr(cli, 'free_bytes', lambda folder: 10)
    with pytest.raises(cli.DiskFullError, match='not enough free space'):
        plot_once(tmp_path, 3.0)
    assert (tmp_path / 'loss.png').read_bytes() == before
    assert sorted(os.listdir(str(tmp_path))) == ['loss.png']
