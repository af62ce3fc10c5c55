"""Training plots people read, and a report that suits a pipe.

Trainer extensions that redraw a PNG in the trainer's ``out`` folder at
every epoch end from the ``LogReport`` log (written atomically through
``figures.save_figure``; an empty log, or one without the keys yet, writes
nothing and raises nothing):

- ``ErrorPlot`` (``error.png``): the test error in % per epoch on a log
  scale, the training error beside it, and the paper's 0.25% (Sabour et
  al. 2017, Table 1: CapsNet, 3 routing iterations, with the reconstruction
  loss) as a dashed reference line;
- ``LossPlot`` (``loss.png``): the training and the test loss per epoch,
  log scale;
- ``AccuracyPlot`` (``accuracy.png``): the training and the test accuracy
  in % per epoch.

Every plot has a title, axis labels, a legend and whole-number epoch ticks.

``PrintReport`` is Chainer's PrintReport without the terminal control code
(``ESC [J``, erase to the end of the screen) it writes before every line
when its output is not a terminal (a pipe, a log file).

    trainer.extend(extensions.LogReport())
    trainer.extend(plots.ErrorPlot())
    trainer.extend(plots.LossPlot())
    trainer.extend(plots.AccuracyPlot())
    trainer.extend(plots.PrintReport(entries))
"""
import math
import os
import sys

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
from chainer.training import extension
from chainer.training import extensions
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, \
    NullFormatter

from capsnet import cli
from capsnet import figures

#: the paper's MNIST test error in %, Table 1 (CapsNet, r = 3, with the
#: reconstruction loss)
PAPER_TEST_ERROR = 0.25
#: a 0% error cannot sit on a log scale: drawn at this many %
ERROR_FLOOR = 0.01
SIZE = (8.0, 5.0)   # inches at figures.DPI: 800 x 500 pixels
TEST_COLOR = 'tab:blue'
TRAIN_COLOR = 'tab:orange'


def series(log, key, transform=float):
    """([epochs], [transform(value)]) of the log entries that hold ``key``
    with a finite value (a log of LogReport: dicts with 'epoch')."""
    epochs, values = [], []
    for entry in log or ():
        value = entry.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if 'epoch' not in entry or not math.isfinite(value):
            continue
        epochs.append(entry['epoch'])
        values.append(transform(value))
    return epochs, values


def error_percent(accuracy):
    """Accuracy (a fraction) -> error in %, at least ERROR_FLOOR."""
    return max(100.0 * (1.0 - accuracy), ERROR_FLOOR)


def _epoch_axis(ax, epochs):
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    first, last = min(epochs), max(epochs)
    if first == last:   # one epoch: a point in the middle
        first, last = first - 0.5, last + 0.5
    ax.set_xlim(first, last)
    ax.grid(True, which='major', alpha=0.3)


def _log_axis(ax, values):
    """Log y axis labelled with plain numbers (0.2, 0.5, 1, 2, ...)."""
    ax.set_yscale('log')
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda value, _: '{:g}'.format(value)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    low, high = min(values), max(values)
    ax.set_ylim(low / 1.5, high * 1.5)


def error_figure(log, key='test/main/accuracy', train_key='main/accuracy',
                 reference=PAPER_TEST_ERROR, title='Test error per epoch'):
    """The figure ErrorPlot saves, or None when the log has no ``key``."""
    epochs, errors = series(log, key, error_percent)
    if not epochs:
        return None
    figure = Figure(figsize=SIZE, dpi=figures.DPI)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(epochs, errors, marker='o', color=TEST_COLOR, label='test error')
    shown = list(errors)
    if train_key:
        train_epochs, train_errors = series(log, train_key, error_percent)
        if train_epochs:
            ax.plot(train_epochs, train_errors, marker='.', linestyle=':',
                    color=TRAIN_COLOR, label='training error')
            shown += train_errors
    if reference is not None:
        ax.axhline(reference, color='black', linestyle='--', linewidth=1,
                   label='paper: {:g}%'.format(reference))
        shown.append(reference)
    _log_axis(ax, shown)
    _epoch_axis(ax, epochs)
    ax.set_ylabel('error (%, log scale)')
    ax.set_title('{} (last: {:.2f}% at epoch {})'.format(
        title, errors[-1], epochs[-1]))
    ax.legend(loc='upper right')
    figure.tight_layout()
    return figure


def curves_figure(log, keys, labels, title, ylabel, transform=float,
                  log_scale=False):
    """A figure of log ``keys`` per epoch (one line each, named ``labels``),
    or None when the log holds none of them."""
    figure = Figure(figsize=SIZE, dpi=figures.DPI)
    ax = figure.add_subplot(1, 1, 1)
    all_epochs, all_values = [], []
    for key, label, color in zip(keys, labels, (TRAIN_COLOR, TEST_COLOR)):
        epochs, values = series(log, key, transform)
        if log_scale:
            epochs, values = zip(*[(e, v) for e, v in zip(epochs, values)
                                   if v > 0]) or ((), ())
        if epochs:
            ax.plot(epochs, values, marker='o', color=color, label=label)
            all_epochs += list(epochs)
            all_values += list(values)
    if not all_epochs:
        return None
    if log_scale:
        _log_axis(ax, all_values)
    _epoch_axis(ax, all_epochs)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    return figure


class EpochPlot(extension.Extension):
    """Redraw ``file_name`` in trainer.out from the LogReport's log at
    every epoch end (after LogReport, which runs as a writer first)."""

    trigger = (1, 'epoch')
    priority = extension.PRIORITY_READER

    def __init__(self, file_name, log_report='LogReport'):
        self.file_name = file_name
        self._log_report = log_report

    def log(self, trainer):
        """The LogReport's log; [] when there is no LogReport (yet)."""
        report = self._log_report
        if isinstance(report, str):
            try:
                report = trainer.get_extension(report)
            except ValueError:
                return []
        return list(getattr(report, 'log', None) or [])

    def figure(self, log):
        raise NotImplementedError

    def __call__(self, trainer):
        figure = self.figure(self.log(trainer))
        if figure is not None:
            figures.save_figure(os.path.join(trainer.out, self.file_name),
                                figure)


class ErrorPlot(EpochPlot):
    """error.png: the test error in % per epoch (log scale), the training
    error, and the paper's 0.25% as a dashed line.

    Args:
        file_name: the PNG in trainer.out.
        key: the log's test accuracy (a fraction); train_key: the training
            accuracy (None: leave it out).
        reference: the dashed line in % (None: none).
        log_report: the LogReport's name (or the LogReport itself).
    """

    def __init__(self, file_name='error.png', key='test/main/accuracy',
                 train_key='main/accuracy', reference=PAPER_TEST_ERROR,
                 log_report='LogReport'):
        super().__init__(file_name, log_report)
        self.key, self.train_key, self.reference = key, train_key, reference

    def figure(self, log):
        return error_figure(log, self.key, self.train_key, self.reference)


class LossPlot(EpochPlot):
    """loss.png: the training and the test loss per epoch (log scale)."""

    def __init__(self, file_name='loss.png',
                 keys=('main/loss', 'test/main/loss'),
                 log_report='LogReport'):
        super().__init__(file_name, log_report)
        self.keys = keys

    def figure(self, log):
        return curves_figure(log, self.keys, ('training loss', 'test loss'),
                             'Loss per epoch', 'loss (log scale)',
                             log_scale=True)


class AccuracyPlot(EpochPlot):
    """accuracy.png: the training and the test accuracy in % per epoch."""

    def __init__(self, file_name='accuracy.png',
                 keys=('main/accuracy', 'test/main/accuracy'),
                 log_report='LogReport'):
        super().__init__(file_name, log_report)
        self.keys = keys

    def figure(self, log):
        return curves_figure(log, self.keys,
                             ('training accuracy', 'test accuracy'),
                             'Accuracy per epoch', 'accuracy (%)',
                             transform=lambda a: 100.0 * a)


class _WithoutEraseCodes:
    """A text stream that drops ESC [J (erase below) from what it writes."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(text.replace('\033[J', ''))

    def flush(self):
        flush = getattr(self._stream, 'flush', None)
        if flush is not None:
            flush()


class PrintReport(extensions.PrintReport):
    """Chainer's PrintReport; on an output that is not a terminal it leaves
    out the ``ESC [J`` it writes before each line. ``out=None`` (the
    default) prints to the sys.stdout of the moment (so a redirected or
    captured stdout is honoured)."""

    def __init__(self, entries, log_report='LogReport', out=None):
        super().__init__(entries, log_report=log_report, out=out)

    def __call__(self, trainer):
        given = self._out
        stream = given if given is not None else sys.stdout
        self._out = stream if cli.interactive(stream) else \
            _WithoutEraseCodes(stream)
        try:
            super().__call__(trainer)
        finally:
            self._out = given
