#!/usr/bin/env python
"""Draw what a trained CapsNet's decoder makes of its digit capsules.

    python visualize.py -g 0 --load model --out vis
    python visualize.py --load model --range 0.25 --step 0.05   # CPU

Writes into --out (default ``vis``):

- ``vis.png``: the first two test examples of every class (20 images), each
  directly above its reconstruction (blue) from the PREDICTED class's
  capsule (4 rows x 10 columns: inputs, reconstructions, inputs,
  reconstructions).
- ``vis_all.png``: one test example per class as columns; the top row is the
  input (green), row 1 + i its reconstruction through digit capsule i alone
  (blue): 11 rows x 10 columns.
- ``vis_tweaked0.png`` ... ``vis_tweaked9.png``: for one example of each
  class, the capsule of its TRUE label (the paper's Figure 4) with one of its
  16 dimensions perturbed per row by -range ... +range in steps of --step
  (columns); the unperturbed column is framed in red: 16 rows x
  (2 * round(range / step) + 1) columns.

The mosaics are saved pixel for pixel (one image pixel per PNG pixel, tiles
separated by a 2 px grey border). The model needs the decoder, i.e. it must
have been trained with ``train.py --reconstruct``.

The mosaic and PNG helpers are in figures.py, the device helpers in
devices.py.
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
from capsnet.figures import BLUE, GREEN, save_image, tile, tint

MAX_STEPS = 50  # at most 2 * 50 + 1 columns in a tweak figure


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
# The three figures
# --------------------------------------------------------------------------

def reconstruction_grid(x, recon, cols=10):
    """Inputs (N, S, S) and reconstructions (N, S, S), N a multiple of cols,
    -> mosaic of 2 * N / cols rows: each row of inputs directly above a row
    of their reconstructions (reconstructions tinted blue)."""
    n = len(x)
    rows = []
    for i in range(0, n, cols):
        rows.append(tint(x[i:i + cols], (1, 1, 1)))
        rows.append(tint(recon[i:i + cols], BLUE))
    return tile(numpy.concatenate(rows), 2 * ((n + cols - 1) // cols), cols)


def all_capsules_grid(x, recon_all):
    """Inputs (C, S, S) (one per class) and recon_all (J, C, S, S), row j the
    reconstructions through capsule j -> mosaic of (1 + J) x C tiles:
    inputs on top in green, reconstructions below in blue."""
    n_caps, n_examples = recon_all.shape[:2]
    images = numpy.concatenate([tint(x, GREEN)[None],
                                tint(recon_all, BLUE)]).reshape(
        (1 + n_caps) * n_examples, *recon_all.shape[2:], 3)
    return tile(images, 1 + n_caps, n_examples)


def tweak_grid(images, n_rows, n_cols, centre):
    """Reconstructions (n_rows * n_cols, S, S), row = capsule dimension,
    column = perturbation -> mosaic with column ``centre`` (no perturbation)
    framed in red."""
    return tile(images, n_rows, n_cols,
                frames=[(r, centre) for r in range(n_rows)])


def build_parser():
    parser = cli.ArgumentParser(
        description="Draw a CapsNet's reconstructions (vis.png, "
                    'vis_all.png, vis_tweaked0-9.png)')
    add = parser.add_argument
    add('--load', required=True,
        help='model file written by train.py --save (with --reconstruct)')
    add('--out', '-o', default='vis', help='folder for the PNG files')
    add('--dataset', default='mnist', choices=mnist.dataset_names(),
        help='which dataset (its test set for the evaluation)')
    add('--data-dir', default=None,
        help='read the four *-ubyte.gz files from here (no download)')
    add('--range', type=cli.non_negative_float, default=0.25, dest='range_',
        help='perturb each capsule dimension by -RANGE ... +RANGE')
    add('--step', type=cli.positive_float, default=0.05,
        help='perturbation step')
    cli.add_device_arguments(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    ratio = args.range_ / args.step
    if not numpy.isfinite(ratio) or round(ratio) > MAX_STEPS:
        parser.error('--range / --step must be at most {} (that is {} '
                     'columns), got {:g}'.format(
                         MAX_STEPS, 2 * MAX_STEPS + 1, ratio))

    model = files.load_model_or_fail(args.load, nets.ARCHITECTURES, need_decoder=True,
                                       purpose='visualize.py')
    device = devices.select_device(args)
    cli.check_writable(args.out)
    try:
        _, _, test = mnist.get_mnist_like(
            args.dataset, data_dir=args.data_dir,
            input_size=model.input_size)
    except mnist.DatasetError as e:
        cli.fail(e)
    x_all, t_all = mnist.to_arrays(test)
    try:
        picked = pick_examples(t_all, per_class=2, n_classes=model.n_classes)
    except ValueError as e:
        cli.fail(e)
    model.to_device(device)
    side = model.input_size

    # vis.png: the 20 inputs above their reconstructions (predicted class)
    order = picked.T.reshape(-1)  # first examples of 0-9, then second ones
    x = x_all[order]
    v = digit_capsules(model, x, device)
    lengths = numpy.sqrt((v * v).sum(axis=2))
    predicted = lengths.argmax(axis=1)
    recon = reconstruct(model, v, predicted, device)
    written = []

    def save(name, image):
        path = os.path.join(args.out, name)
        try:
            save_image(path, image)
        except OSError as e:
            cli.fail('cannot write {} ({}); choose another --out'.format(
                path, e.strerror or e))
        written.append(path)

    save('vis.png', reconstruction_grid(x[:, 0], recon))

    # vis_all.png: one example per class through every capsule
    n_classes = v.shape[1]
    first, v_first = x[:n_classes, 0], v[:n_classes]
    recon_all = numpy.stack([
        reconstruct(model, v_first, numpy.full(n_classes, j), device)
        for j in range(n_classes)])
    save('vis_all.png', all_capsules_grid(first, recon_all))

    # vis_tweaked<c>.png: the true class's capsule, one dimension per row
    deltas = tweak_deltas(args.range_, args.step)
    centre = len(deltas) // 2
    dim = v.shape[2]
    for c in range(n_classes):
        label = int(t_all[order[c]])
        masked = tweaked_capsules(v_first[c, label], label, deltas,
                                  n_classes)
        images = decode(model, masked, device)
        save('vis_tweaked{}.png'.format(c),
             tweak_grid(images, dim, len(deltas), centre))

    print('model {} ({}), {} test set'.format(
        args.load, ', '.join('{}={}'.format(k, val) for k, val in
                             sorted(model.options.items())), args.dataset))
    print('examples (test indices) {}'.format(' '.join(
        str(i) for i in order)))
    print('labels     {}'.format(' '.join(str(int(t)) for t in
                                           t_all[order])))
    print('predicted  {}'.format(' '.join(str(int(p)) for p in predicted)))
    print('tweaks: {} columns, {:+.3g} ... {:+.3g} (step {:g}); {}x{} '
          'pixel tiles'.format(len(deltas), deltas[0], deltas[-1],
                               args.step, side, side))
    for path in written:
        print('wrote {}'.format(path))
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
