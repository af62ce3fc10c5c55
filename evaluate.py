#!/usr/bin/env python
"""Evaluate a trained model on the MNIST (or Fashion-MNIST) test set.

    python evaluate.py --load model                     # CPU, 10,000 images
    python evaluate.py -d @cupy:0 --load model --out eval --json

Prints the test error with its count (``test error 0.52% (52 of 10000)``),
a per-class error table and the mean digit-capsule length of the true class
and of the runner-up (the longest other capsule), over all test examples and
over the misclassified ones. Writes into --out (default ``eval``):

- ``confusion.png``: the 10 x 10 confusion matrix (rows true, columns
  predicted) with the counts, coloured by count on a log scale (colour
  bar; empty cells white);
- ``misclassified.png``: up to 100 misclassified test images, white on
  black, each headed ``true 2, pred 7``, in test-set order, 10 per row,
  each image pixel drawn as --scale x --scale screen pixels (default 4);
- ``evaluation.json``: everything above (see ``evaluate``); ``--json`` also
  prints it as one line on stdout (and the human-readable report goes to
  stderr).

A baseline CNN model (train.py --arch baseline) is evaluated too; its
"lengths" are its softmax probabilities (``"score": "probability"``).
"""
import json
import os
import sys

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import numpy

import matplotlib
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from capsnet.data import mnist
from capsnet import devices
from capsnet import figures
from capsnet import files
import nets
from capsnet.cli import fail

MAX_SHOWN = 100
SHOWN_COLS = 10


def run_model(model, x, device, batchsize, say=None):
    """Images (N, 1, S, S) numpy -> predictions (N,) int and scores (N, 10)
    numpy: the capsule lengths of a CapsNet, the softmax probabilities of
    the baseline. A batch too large for memory is split (said through
    ``say``, see devices.inference_batch)."""
    predictions, scores = [], []
    batchsize = devices.inference_batch(model, min(batchsize, len(x)),
                                        say=say)
    with devices.inference_mode(model):
        for i in range(0, len(x), batchsize):
            p, s = model.predict(device.send(x[i:i + batchsize]))
            predictions.append(devices.to_cpu(p))
            scores.append(devices.to_cpu(s))
    return (numpy.concatenate(predictions).astype(numpy.int64),
            numpy.concatenate(scores).astype(numpy.float64))


def _mean(values):
    return float(numpy.mean(values)) if len(values) else None


def evaluate(predictions, scores, t, n_classes=10):
    """Error statistics of predictions (N,), scores (N, J), labels t (N,).

    Returns:
        dict with ``n``, ``errors``, ``test_error`` (errors / n, a
        fraction), ``test_error_percent``, ``confusion`` (J x J counts,
        [true][predicted]), ``per_class_n``, ``per_class_errors``,
        ``per_class_error`` (fraction per true class; None for a class
        without examples), ``mean_length_true`` / ``mean_length_runner_up``
        (mean score of the true class / of the highest other class) and the
        same over the misclassified examples (``..._misclassified``, None
        when there are none), and ``misclassified`` (test indices).
    """
    predictions = numpy.asarray(predictions)
    scores = numpy.asarray(scores)
    t = numpy.asarray(t).astype(numpy.int64)
    n = len(t)
    confusion = numpy.zeros((n_classes, n_classes), numpy.int64)
    numpy.add.at(confusion, (t, predictions), 1)
    wrong = predictions != t
    per_class_n = confusion.sum(axis=1)
    per_class_errors = per_class_n - numpy.diag(confusion)
    true_score = scores[numpy.arange(n), t]
    others = scores.copy()
    others[numpy.arange(n), t] = -numpy.inf
    runner_up = others.max(axis=1) if n else numpy.zeros(0)
    errors = int(wrong.sum())
    return {
        'n': int(n),
        'errors': errors,
        'test_error': errors / n if n else None,
        'test_error_percent': 100.0 * errors / n if n else None,
        'confusion': confusion.tolist(),
        'per_class_n': per_class_n.tolist(),
        'per_class_errors': per_class_errors.tolist(),
        'per_class_error': [int(e) / int(c) if c else None
                            for e, c in zip(per_class_errors, per_class_n)],
        'mean_length_true': _mean(true_score),
        'mean_length_runner_up': _mean(runner_up),
        'mean_length_true_misclassified': _mean(true_score[wrong]),
        'mean_length_runner_up_misclassified': _mean(runner_up[wrong]),
        'misclassified': numpy.flatnonzero(wrong).tolist(),
    }


def confusion_figure(confusion, title):
    """Figure of a (J, J) count matrix, rows true, columns predicted; the
    colour is the count on a log scale (so that a handful of errors shows
    beside a diagonal of a thousand), empty cells white, with a colour bar;
    every cell also holds its count."""
    confusion = numpy.asarray(confusion)
    n_classes = len(confusion)
    figure = Figure(figsize=(6.4, 5.6), dpi=figures.DPI)
    ax = figure.add_subplot(1, 1, 1)
    shown = numpy.ma.masked_less(confusion.astype(numpy.float64), 1)
    norm = LogNorm(vmin=1, vmax=max(2, int(confusion.max()))) \
        if confusion.size else None
    cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation='nearest')
    bar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label('test examples (log scale; white: none)')
    bar.locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    bar.formatter = FuncFormatter(lambda value, _: '{:g}'.format(value))
    bar.update_ticks()
    for i in range(n_classes):
        for j in range(n_classes):
            count = int(confusion[i, j])
            dark = count >= 1 and norm is not None and norm(count) < 0.6
            ax.text(j, i, str(count), ha='center', va='center', fontsize=7,
                    color='white' if dark else 'black')
    ax.set_xticks(range(n_classes))
    ax.set_yticks(range(n_classes))
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    ax.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def misclassified_title(shown, errors, model_path):
    return ('Misclassified test digits: the first {} of {}, in test-set '
            'order\n{}'.format(shown, errors, os.path.basename(model_path)))


def misclassified_figure(images, predictions, labels, title,
                         scale=figures.SCALE, cols=SHOWN_COLS):
    """Figure of images (N, S, S), white on black, each headed 'true 2,
    pred 7'; a figure that says so when N is 0. Returns (Figure, Layout or
    None)."""
    n = len(images)
    if n == 0:
        figure = Figure(figsize=(4, 1), dpi=figures.DPI)
        figure.text(0.5, 0.7, title, ha='center', va='center', fontsize=9)
        figure.text(0.5, 0.3, 'no misclassified test examples',
                    ha='center', va='center')
        return figure, None
    return figures.mosaic_figure(
        images, min(cols, n), title, scale=scale,
        tile_labels=['true {}, pred {}'.format(t, p) if scale >= 4 else
                     't{} p{}'.format(t, p)
                     for t, p in zip(labels, predictions)])


def build_parser():
    parser = cli.ArgumentParser(
        description='Test error, confusion matrix and misclassified '
                    'examples of a trained model')
    add = parser.add_argument
    add('--load', required=True, help='model file written by train.py '
                                      '--save')
    add('--dataset', default='mnist', choices=mnist.dataset_names(),
        help='which dataset (its test set for the evaluation)')
    add('--data-dir', default=None,
        help='read the four *-ubyte.gz files from here (no download)')
    add('--test-size', type=cli.positive_int, default=None,
        help='use the first N test examples (default: all)')
    add('--out', '-o', default='eval',
        help='folder for confusion.png, misclassified.png, evaluation.json')
    add('--batchsize', '-b', type=cli.positive_int, default=200,
        help='examples per forward pass')
    add('--scale', type=cli.int_in(1, 16), default=figures.SCALE,
        help='screen pixels per image pixel in misclassified.png')
    add('--json', action='store_true',
        help='print evaluation.json as one line on stdout (the report goes '
             'to stderr)')
    cli.add_device_arguments(parser)
    return parser


def json_text(result):
    """JSON of a dict, one top-level key per line (values compact)."""
    return '{\n' + ',\n'.join(
        ' {}: {}'.format(json.dumps(key), json.dumps(result[key]))
        for key in sorted(result)) + '\n}\n'


def _fmt(value, digits=3):
    return 'n/a' if value is None else '{:.{}f}'.format(value, digits)


def report_lines(result):
    """The human-readable report of an evaluation dict, as lines."""
    score = 'length' if result['score'] == 'length' else 'probability'
    lines = ['loaded {}: {}; {} test set'.format(
        result['model'], result['arch'], result['dataset']),
        'test error {:.2f}% ({} of {})'.format(
            result['test_error_percent'], result['errors'], result['n']),
        '', 'class      n  errors   error']
    for c, (n, e, rate) in enumerate(zip(result['per_class_n'],
                                         result['per_class_errors'],
                                         result['per_class_error'])):
        lines.append('{:>5} {:>6} {:>7} {:>7}'.format(
            c, n, e, 'n/a' if rate is None else '{:.2f}%'.format(100 * rate)))
    lines += ['', 'mean {} of the true class {}, of the runner-up {} (all '
              '{} examples)'.format(score, _fmt(result['mean_length_true']),
                                    _fmt(result['mean_length_runner_up']),
                                    result['n']),
              'mean {} of the true class {}, of the runner-up {} ({} '
              'misclassified)'.format(
                  score, _fmt(result['mean_length_true_misclassified']),
                  _fmt(result['mean_length_runner_up_misclassified']),
                  result['errors'])]
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    model = files.load_model_or_fail(args.load, nets.ARCHITECTURES, need_capsnet=False,
                                       purpose='evaluate.py')
    device = devices.select_device(args)
    cli.check_writable(args.out)
    try:
        _, _, test = mnist.get_mnist_like(
            args.dataset, data_dir=args.data_dir, test_size=args.test_size,
            input_size=model.input_size, need_train=False)
    except mnist.DatasetError as e:
        fail(e)
    x, t = mnist.to_arrays(test)
    model.to_device(device)

    report = sys.stderr if args.json else sys.stdout
    predictions, scores = run_model(
        model, x, device, args.batchsize,
        say=lambda line: print(line, file=report, flush=True))
    result = {
        'model': args.load,
        'arch': model.arch,
        'options': model.options,
        'dataset': args.dataset,
        'score': 'length' if model.arch == 'capsnet' else 'probability',
    }
    result.update(evaluate(predictions, scores, t, n_classes=scores.shape[1]))

    wrong = numpy.asarray(result['misclassified'][:MAX_SHOWN], numpy.int64)
    result['misclassified_shown'] = [
        {'index': int(i), 'prediction': int(predictions[i]),
         'label': int(t[i])} for i in wrong]
    paths = {name: os.path.join(args.out, name) for name in
             ('confusion.png', 'misclassified.png', 'evaluation.json')}
    title = ('Confusion matrix: {} on {} test ({} examples), {:.2f}% '
             'error'.format(os.path.basename(args.load), args.dataset,
                            result['n'], result['test_error_percent']))
    text = json.dumps(result, sort_keys=True)
    try:
        figures.save_figure(paths['confusion.png'], confusion_figure(
            result['confusion'], title))
        figures.save_figure(paths['misclassified.png'], misclassified_figure(
            x[wrong, 0], predictions[wrong], t[wrong], misclassified_title(
                len(wrong), result['errors'], args.load), args.scale)[0])
        files.write_text(paths['evaluation.json'], json_text(result))
    except OSError as e:
        fail('cannot write into {} ({}); choose another --out'.format(
            args.out, e.strerror or e))

    for line in report_lines(result):
        print(line, file=report)
    for path in paths.values():
        print('wrote {}'.format(path), file=report)
    if args.json:
        print(text)
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
