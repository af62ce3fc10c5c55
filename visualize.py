#!/usr/bin/env python
"""Draw what a trained CapsNet's decoder makes of its digit capsules.

    python visualize.py -g 0 --load model --out vis
    python visualize.py --load model --range 0.25 --step 0.05   # CPU

Writes into --out (default ``vis``), every figure titled, white digits on
black, each image pixel drawn as --scale x --scale screen pixels (default
4, so a 28 x 28 digit is 112 x 112):

- ``vis.png``: the first two test examples of every class (20 images), each
  headed with its true and predicted class (red when wrong) and directly
  above its reconstruction from the PREDICTED class's capsule (4 rows x 10
  columns: inputs, reconstructions, inputs, reconstructions).
- ``vis_all.png``: one test example per class as columns; the top row is the
  input (headed true / predicted), row 1 + j its reconstruction through
  digit capsule j alone (labelled ``capsule j``): 11 rows x 10 columns.
- ``vis_tweaked0.png`` ... ``vis_tweaked9.png``: for one example of each
  class, the capsule of its TRUE label (the paper's Figure 4) with one of its
  16 dimensions perturbed per row (``dim d``) by -range ... +range in steps
  of --step (columns, headed with the value added); the unperturbed column
  is framed in red: 16 rows x (2 * round(range / step) + 1) columns.
- with ``--html [FILE]``: the capsule explorer (docs/explorer.md), one
  self-contained HTML page with the decoder's weights and --html-digits
  test digits; a bare ``--html`` writes ``explorer.html`` into --out.

The model needs the decoder, i.e. it must have been trained with
``train.py --reconstruct``.

The figure helpers are in capsnet/figures.py, the device helpers in
capsnet/devices.py, the explorer page in capsnet/explorer.py.
"""
import os
import sys

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import numpy

from capsnet.data import mnist
from capsnet import devices
from capsnet import files
import nets
from capsnet.devices import inference_mode, to_cpu
from capsnet import explorer
from capsnet import figures

MAX_STEPS = 50  # at most 2 * 50 + 1 columns in a tweak figure
MAX_SCALE = 16  # --scale: screen pixels per image pixel
MAX_HTML_DIGITS = 1000  # --html-digits (each adds S*S + J*D + J floats)
HTML_NAME = 'explorer.html'


# --------------------------------------------------------------------------
# Running the network
# --------------------------------------------------------------------------

def digit_capsules(model, x, device, batchsize=100):
    """Images (N, 1, S, S) numpy -> digit capsules v (N, 10, 16) numpy."""
    out = []
    with inference_mode(model):
        for i in range(0, len(x), batchsize):
            v = model.capsules(device.send(numpy.asarray(x[i:i + batchsize])))
            out.append(to_cpu(v.array))
    return numpy.concatenate(out) if out else numpy.zeros(
        (0, model.n_classes, nets.DIGIT_DIM), numpy.float32)


def decode(model, masked, device, batchsize=500):
    """Masked capsules (N, 10 * 16) numpy -> reconstructions (N, S, S).

    ``masked`` holds one class's 16 values at [16 j, 16 j + 16) and zeros
    elsewhere (what nets.mask makes); any values may be put there.
    """
    side = model.input_size
    out = []
    with inference_mode(model):
        for i in range(0, len(masked), batchsize):
            h = device.send(numpy.ascontiguousarray(
                masked[i:i + batchsize], dtype=numpy.float32))
            out.append(to_cpu(model.decoder(h).array))
    if not out:
        return numpy.zeros((0, side, side), numpy.float32)
    return numpy.concatenate(out).reshape(-1, side, side)


def masked_capsules(v, labels):
    """v (N, J, D), labels (N,) -> (N, J * D) keeping only each label's
    capsule (numpy twin of nets.mask)."""
    v = numpy.asarray(v)
    keep = nets.one_hot(numpy.asarray(labels), v.shape[1], numpy, v.dtype)
    return (v * keep[:, :, None]).reshape(len(v), -1)


def reconstruct(model, v, labels, device):
    """v (N, J, D) numpy, labels (N,) -> (N, S, S) from label's capsule."""
    return decode(model, masked_capsules(v, labels), device)


def pick_examples(labels, per_class=2, n_classes=10):
    """Indices (n_classes, per_class): the first examples of each class.

    Raises ValueError naming the classes with too few examples.
    """
    labels = numpy.asarray(labels)
    picked, short = [], []
    for c in range(n_classes):
        found = numpy.flatnonzero(labels == c)[:per_class]
        if len(found) < per_class:
            short.append(c)
        picked.append(found)
    if short:
        raise ValueError('the test set has fewer than {} examples of class '
                         '{}'.format(per_class,
                                     ', '.join(str(c) for c in short)))
    return numpy.stack(picked)


def tweak_deltas(range_, step):
    """The perturbations -range ... +range: step * (-n ... n),
    n = round(range / step); (2n + 1,) float32."""
    n = int(round(range_ / step))
    return (step * numpy.arange(-n, n + 1)).astype(numpy.float32)


def tweaked_capsules(capsule, label, deltas, n_classes=10):
    """Masked inputs (D * C, J * D) for the decoder: row d * C + k is the
    capsule (D,) of class ``label`` with dimension d moved by deltas[k]."""
    dim, n_cols = len(capsule), len(deltas)
    tweaked = numpy.repeat(numpy.asarray(capsule, numpy.float32)[None, None],
                           dim * n_cols, axis=0).reshape(dim, n_cols, dim)
    for d in range(dim):
        tweaked[d, :, d] += deltas
    masked = numpy.zeros((dim * n_cols, n_classes, dim), numpy.float32)
    masked[:, label] = tweaked.reshape(dim * n_cols, dim)
    return masked.reshape(dim * n_cols, n_classes * dim)


# --------------------------------------------------------------------------
# The figures (white digits on black, figures.SCALE screen px per pixel)
# --------------------------------------------------------------------------

def class_label(label, predicted, scale):
    """'true 3, pred 5' (short 't3 p5' below scale 4, where tiles are
    narrow)."""
    text = 'true {}, pred {}' if scale >= 4 else 't{} p{}'
    return text.format(int(label), int(predicted))


def class_colors(labels, predicted):
    """Black for a correct prediction, red for a wrong one."""
    return [figures.WRONG_COLOR if int(t) != int(p) else 'black'
            for t, p in zip(labels, predicted)]


def reconstruction_figure(x, recon, labels, predicted, model_name,
                          scale=figures.SCALE, cols=10):
    """vis.png: inputs (N, S, S) and their reconstructions (N, S, S) from
    the predicted class's capsule, N a multiple of cols: each row of inputs
    (headed with the true and the predicted class, red when wrong) directly
    above a row of their reconstructions. Returns (Figure, Layout)."""
    n = len(x)
    images, tile_labels, colors = [], [], []
    for i in range(0, n, cols):
        part = slice(i, i + cols)
        images += [x[part], recon[part]]
        tile_labels += [class_label(t, p, scale) for t, p in
                        zip(labels[part], predicted[part])] + [None] * cols
        colors += class_colors(labels[part], predicted[part]) + \
            ['black'] * cols
    return figures.mosaic_figure(
        numpy.concatenate(images), cols,
        'Reconstructions from the predicted class\'s digit capsule\n'
        '{}: MNIST test digits (red: misclassified)'.format(model_name),
        scale=scale, row_labels=['input', 'reconstruction'] * (n // cols),
        tile_labels=tile_labels, tile_colors=colors)


def all_capsules_figure(x, recon_all, labels, predicted, model_name,
                        scale=figures.SCALE):
    """vis_all.png: inputs (C, S, S) (one per class) on top, below them
    recon_all (J, C, S, S): row j the reconstructions through capsule j
    alone. (1 + J) x C tiles. Returns (Figure, Layout)."""
    n_caps, n_examples = recon_all.shape[:2]
    images = numpy.concatenate([x[None], recon_all]).reshape(
        (1 + n_caps) * n_examples, *recon_all.shape[2:])
    tile_labels = [class_label(t, p, scale)
                   for t, p in zip(labels, predicted)]
    colors = class_colors(labels, predicted)
    n_rest = n_caps * n_examples
    return figures.mosaic_figure(
        images, n_examples,
        'One test digit per class (columns) reconstructed from each digit '
        'capsule alone (rows)\n{}'.format(model_name), scale=scale,
        row_labels=['input'] + ['capsule {}'.format(j)
                                for j in range(n_caps)],
        row_title='decoder input: the capsule of class',
        tile_labels=tile_labels + [None] * n_rest,
        tile_colors=colors + ['black'] * n_rest)


def tweak_labels(deltas):
    """Column labels of a tweak figure: '-0.25' ... '0' ... '+0.25'."""
    return ['0' if d == 0 else '{:+.3g}'.format(d) for d in deltas]


def tweak_figure(images, deltas, label, predicted, index, model_name,
                 scale=figures.SCALE):
    """vis_tweaked<c>.png (the paper's Figure 4): reconstructions
    (D * len(deltas), S, S), row d = capsule dimension d, column k = that
    dimension moved by deltas[k]; the unperturbed column framed in red.
    Returns (Figure, Layout)."""
    n_cols = len(deltas)
    n_rows = len(images) // n_cols
    centre = int(numpy.argmin(numpy.abs(deltas)))
    return figures.mosaic_figure(
        images, n_cols,
        'Digit capsule of class {} (test digit {}, true {}, predicted {}),'
        ' one dimension perturbed per row\n{}; red frame: unperturbed'
        .format(label, index, label, predicted, model_name), scale=scale,
        row_labels=['dim {}'.format(d) for d in range(n_rows)],
        row_title='capsule dimension',
        col_labels=tweak_labels(deltas),
        col_title='value added to the dimension',
        frames=[(r, centre) for r in range(n_rows)])


def build_parser():
    parser = cli.ArgumentParser(
        description="Draw a CapsNet's reconstructions (vis.png, "
                    'vis_all.png, vis_tweaked0-9.png) and, with --html, '
                    'the capsule explorer page')
    add = parser.add_argument
    add('--load', required=True,
        help='model file written by train.py --save (with --reconstruct)')
    add('--out', '-o', default='vis', help='folder for the PNG files')
    add('--dataset', default='mnist', choices=mnist.dataset_names(),
        help='which dataset (its test set for the evaluation)')
    add('--data-dir', default=None,
        help='read the four *-ubyte.gz files from here (no download)')
    add('--range', type=cli.non_negative_float, default=0.25, dest='range_',
        metavar='RANGE',
        help='perturb each capsule dimension by -RANGE ... +RANGE')
    add('--step', type=cli.positive_float, default=0.05,
        help='perturbation step')
    add('--scale', type=cli.int_in(1, MAX_SCALE), default=figures.SCALE,
        help='screen pixels per image pixel in the figures')
    add('--html', nargs='?', const=HTML_NAME, default=None, metavar='FILE',
        help='also write the capsule explorer, one self-contained HTML '
             'page (docs/explorer.md); a bare --html writes {} into --out'
             .format(HTML_NAME))
    add('--html-digits', type=cli.int_in(1, MAX_HTML_DIGITS), default=20,
        metavar='N', help='test digits in the explorer page (the first '
                          'ones of each class in turn)')
    cli.add_device_arguments(parser)
    return parser


def describe_model(path, model):
    """'loaded model.npz: capsnet (reconstruct=True, routing=3, ...)'."""
    return 'loaded {}: {} ({})'.format(path, model.arch, ', '.join(
        '{}={}'.format(k, val) for k, val in sorted(model.options.items())))


def html_path(args):
    """Where --html writes: a bare --html (or a bare name) goes into --out."""
    if args.html == HTML_NAME or os.path.dirname(args.html) == '':
        return os.path.join(args.out, args.html)
    return args.html


def explorer_digits(labels, n, n_classes):
    """Test indices (n,) for the explorer: the first examples of class 0,
    1, ..., 9, then the second ones, ... (every class shown)."""
    per_class = -(-n // n_classes)
    return pick_examples(labels, per_class, n_classes).T.reshape(-1)[:n]


def write_html(path, model, x, labels, device, title):
    """The capsule explorer for images x (N, 1, S, S) and their labels."""
    v = digit_capsules(model, x, device)
    lengths = numpy.sqrt((v * v).sum(axis=2))
    layers = [(to_cpu(W.array), to_cpu(b.array))
              for W, b in model.decoder.layers()]
    explorer.write_explorer(path, layers, x[:, 0], v, labels,
                            lengths.argmax(axis=1), lengths, title=title)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    ratio = args.range_ / args.step
    if not numpy.isfinite(ratio) or round(ratio) > MAX_STEPS:
        parser.error('--range / --step must be at most {} (that is {} '
                     'columns), got {:g}'.format(
                         MAX_STEPS, 2 * MAX_STEPS + 1, ratio))

    model = files.load_model_or_fail(args.load, nets.ARCHITECTURES,
                                     need_decoder=True,
                                     purpose='visualize.py')
    device = devices.select_device(args)
    cli.check_writable(args.out)
    if args.html:
        cli.check_writable(os.path.dirname(os.path.abspath(html_path(args))),
                           '--html file')
    try:
        _, _, test = mnist.get_mnist_like(
            args.dataset, data_dir=args.data_dir,
            input_size=model.input_size, need_train=False)
    except mnist.DatasetError as e:
        cli.fail(e)
    x_all, t_all = mnist.to_arrays(test)
    try:
        picked = pick_examples(t_all, per_class=2, n_classes=model.n_classes)
        shown = explorer_digits(t_all, args.html_digits, model.n_classes) \
            if args.html else None
    except ValueError as e:
        cli.fail(e)
    model.to_device(device)
    side = model.input_size
    name = os.path.basename(args.load)
    scale = args.scale

    # vis.png: the 20 inputs above their reconstructions (predicted class)
    order = picked.T.reshape(-1)  # first examples of 0-9, then second ones
    x = x_all[order]
    labels = t_all[order].astype(numpy.int64)
    v = digit_capsules(model, x, device)
    lengths = numpy.sqrt((v * v).sum(axis=2))
    predicted = lengths.argmax(axis=1)
    recon = reconstruct(model, v, predicted, device)
    written = []

    def save(path, figure):
        try:
            figures.save_figure(path, figure)
        except OSError as e:
            cli.fail('cannot write {} ({}); choose another --out'.format(
                path, e.strerror or e))
        written.append(path)

    save(os.path.join(args.out, 'vis.png'), reconstruction_figure(
        x[:, 0], recon, labels, predicted, name, scale)[0])

    # vis_all.png: one example per class through every capsule
    n_classes = v.shape[1]
    first, v_first = x[:n_classes, 0], v[:n_classes]
    recon_all = numpy.stack([
        reconstruct(model, v_first, numpy.full(n_classes, j), device)
        for j in range(n_classes)])
    save(os.path.join(args.out, 'vis_all.png'), all_capsules_figure(
        first, recon_all, labels[:n_classes], predicted[:n_classes], name,
        scale)[0])

    # vis_tweaked<c>.png: the true class's capsule, one dimension per row
    deltas = tweak_deltas(args.range_, args.step)
    for c in range(n_classes):
        label = int(labels[c])
        masked = tweaked_capsules(v_first[c, label], label, deltas,
                                  n_classes)
        images = decode(model, masked, device)
        save(os.path.join(args.out, 'vis_tweaked{}.png'.format(c)),
             tweak_figure(images, deltas, label, int(predicted[c]),
                          int(order[c]), name, scale)[0])

    if args.html:
        path = html_path(args)
        try:
            write_html(path, model, x_all[shown], t_all[shown], device,
                       'CapsNet capsule explorer: {}'.format(name))
        except OSError as e:
            cli.fail('cannot write {} ({}); choose another --html file'
                     .format(path, e.strerror or e))
        written.append(path)

    print('{}; {} test set'.format(describe_model(args.load, model),
                                   args.dataset))
    print('examples (test indices) {}'.format(' '.join(
        str(i) for i in order)))
    print('labels     {}'.format(' '.join(str(int(t)) for t in labels)))
    print('predicted  {}'.format(' '.join(str(int(p)) for p in predicted)))
    print('tweaks: {} columns, {:+.3g} ... {:+.3g} (step {:g}); {}x{} '
          'pixel digits drawn at {}x'.format(
              len(deltas), deltas[0], deltas[-1], args.step, side, side,
              scale))
    for path in written:
        print('wrote {}'.format(path))
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
