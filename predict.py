#!/usr/bin/env python
"""Classify your own digit images with a trained CapsNet.

    python predict.py --load model digit.png more/          # CPU
    python predict.py -d @cupy:0 --load model --json scans/*.jpg
    python predict.py --load model --reconstruct recon.png digit.png

Each IMAGE is a PNG/JPEG/... file, or a folder whose image files (by
extension, sorted by name, not recursive) are all taken. Every image is
brought into MNIST's form (see ``preprocess``): grayscale, a white digit on
black (inverted automatically when the background is bright; ``--invert``),
cropped to the digit, scaled so that its larger side is 20 pixels, and pasted
into 28 x 28 with its centre of mass at the centre (14, 14); for a model
with a larger input it is then zero-padded, centred, to S x S.

Output, one line per input in the order given:

    digit.png: 7  lengths 0.021 0.013 ... 0.934 ...

(the predicted class and the length of each of the 10 digit capsules; for a
baseline CNN model, its softmax probabilities). With ``--json`` each line is
a JSON object ``{"file", "prediction", "lengths"}`` (``probabilities`` for
the baseline), or ``{"file", "error"}`` for an input that failed.

``--reconstruct OUT.png`` (a CapsNet trained with a decoder) also writes a
figure with one row per classified input, labelled ``file: predicted
class``: the preprocessed input as the model sees it beside its
reconstruction from the predicted class's capsule, white on black, each
image pixel drawn as --scale x --scale screen pixels (default 4).

An input that is missing, empty, not an image or blank gives one line
``error: FILE: reason`` on stderr; the others are still classified. Exit
status: 0 if every input was classified, 1 if any failed, 2 for usage
errors and unusable models.
"""
import json
import os
import sys

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import numpy
import scipy.ndimage
from PIL import Image

from capsnet import devices
from capsnet import figures
from capsnet import files
from capsnet.images import ImageError, read_gray
import nets
from capsnet.cli import fail

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff',
                    '.webp', '.pgm', '.ppm', '.pbm', '.pnm')
MNIST_SIDE = 28
BOX = 20  # MNIST's digits are scaled to fit a 20 x 20 box
NOISE_SPREADS = 8  # background noise floor, see preprocess
USAGE = 2  # exit status for usage errors and unusable models


# --------------------------------------------------------------------------
# Reading and MNIST-style preprocessing
# --------------------------------------------------------------------------

def _describe(e):
    text = ' '.join(str(e).split())
    return text or type(e).__name__


def border_pixels(gray):
    """Pixels of the outer ring (5% of the smaller side, >= 1 px) of
    (H, W) gray, as a flat array."""
    h, w = gray.shape
    width = max(1, int(round(0.05 * min(h, w))))
    mask = numpy.ones((h, w), bool)
    mask[width:h - width, width:w - width] = False
    return gray[mask]


def needs_inversion(gray):
    """True when (H, W) gray looks like a dark digit on a bright background:
    the border is bright (mean > 0.5), or, if the border is exactly half,
    the whole image is."""
    ring = border_pixels(gray).mean()
    if ring != 0.5:
        return bool(ring > 0.5)
    return bool(gray.mean() > 0.5)


def preprocess(gray, invert='auto', threshold=0.0, input_size=MNIST_SIDE):
    """Bring a (H, W) gray image in [0, 1] into MNIST's form.

    1. polarity: MNIST is a white digit on black; ``invert`` 'yes', 'no' or
       'auto' (invert when ``needs_inversion``);
    2. background: the level ``median + 8 * (75th percentile - median)``
       of the border's pixels (the paper's grey plus its noise) is mapped
       to 0, values below clip to 0, then the brightest pixel is scaled to
       1, so a grey paper or a faint pen look like MNIST's black and white
       (an image with a black border and a white stroke is left as it is;
       a level of 0.5 or more, i.e. a bright border kept by
       ``invert='no'``, is not removed);
    3. crop to the bounding box of the pixels > ``threshold``;
    4. scale (PIL, Lanczos antialiasing) so the larger side is 20 px,
       keeping the aspect ratio;
    5. paste into 28 x 28 so that the centre of mass
       (``scipy.ndimage.center_of_mass``) lies at (14, 14) (shifted by whole
       pixels, rounded; kept inside the frame, which
       ``scipy.ndimage.shift`` would not do: it cuts);
    6. zero-pad, centred, to input_size x input_size (as capsnet.data.mnist pads).

    Returns:
        float32 (input_size, input_size) in [0, 1].
    Raises:
        ImageError: the image is blank (no pixel above the threshold).
    """
    gray = numpy.asarray(gray, dtype=numpy.float64)
    if invert == 'yes' or (invert == 'auto' and needs_inversion(gray)):
        gray = 1 - gray
    ring = border_pixels(gray)
    background = float(numpy.median(ring))
    noise = float(numpy.percentile(ring, 75)) - background
    floor = background + NOISE_SPREADS * noise
    if 0 < floor < 0.5:  # a bright "background" (--invert no) is kept
        gray = numpy.clip((gray - floor) / (1 - floor), 0, 1)
    peak = gray.max()
    if peak <= 0:
        raise ImageError('image is blank (no digit: no pixel differs from '
                         'the background)')
    gray = gray / peak

    ink = gray > threshold
    rows = numpy.flatnonzero(ink.any(axis=1))
    cols = numpy.flatnonzero(ink.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    h, w = crop.shape
    scale = BOX / max(h, w)
    new_h = min(BOX, max(1, int(round(h * scale))))
    new_w = min(BOX, max(1, int(round(w * scale))))
    if (new_h, new_w) != (h, w):
        resized = Image.fromarray(crop.astype(numpy.float32))  # mode F
        resized = resized.resize((new_w, new_h), Image.Resampling.LANCZOS)
        crop = numpy.clip(numpy.asarray(resized, dtype=numpy.float64), 0, 1)
    if crop.sum() <= 0:
        raise ImageError('image is blank after scaling to 20 px')

    cy, cx = scipy.ndimage.center_of_mass(crop)
    centre = MNIST_SIDE // 2
    top = int(numpy.clip(numpy.floor(centre - cy + 0.5), 0,
                         MNIST_SIDE - new_h))
    left = int(numpy.clip(numpy.floor(centre - cx + 0.5), 0,
                          MNIST_SIDE - new_w))
    out = numpy.zeros((input_size, input_size), numpy.float32)
    pad = (input_size - MNIST_SIDE) // 2
    out[pad + top:pad + top + new_h, pad + left:pad + left + new_w] = crop
    return out


def load_image(path, invert='auto', threshold=0.0, input_size=MNIST_SIDE):
    """Read and preprocess one file -> float32 (input_size, input_size)."""
    return preprocess(read_gray(path), invert, threshold, input_size)


def expand_inputs(paths):
    """Replace each folder by its image files (sorted); keep files.

    Returns:
        list of (path, error or None): a folder with no image file is one
        entry with its error.
    """
    out = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                out.append((path, 'cannot list the folder ({})'.format(
                    e.strerror or _describe(e))))
                continue
            found = [os.path.join(path, name) for name in names
                     if name.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, name))]
            if not found:
                out.append((path, 'folder holds no image files ({})'.format(
                    ', '.join(IMAGE_EXTENSIONS))))
            out.extend((f, None) for f in found)
        else:
            out.append((path, None))
    return out


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

threshold_value = cli.number_type(float, 'a number in [0, 1)',
                                  lambda value: 0 <= value < 1)


def build_parser():
    parser = cli.ArgumentParser(
        description='Classify digit images with a trained CapsNet')
    add = parser.add_argument
    add('images', nargs='+', metavar='IMAGE',
        help='image files, or folders whose image files are all taken')
    add('--load', required=True, help='model file written by train.py '
                                      '--save')
    add('--invert', default='auto', choices=['auto', 'yes', 'no'],
        help='make a dark digit on a bright background white on black '
             '(auto: when the border is bright)')
    add('--threshold', type=threshold_value, default=0.0,
        help='pixels above this level (after background removal, in [0, 1))'
             ' make the bounding box of the digit')
    add('--json', action='store_true',
        help='print one JSON object per line and input')
    add('--reconstruct', metavar='OUT.png', default=None,
        help='write each preprocessed input beside its reconstruction '
             '(needs a model trained with --reconstruct)')
    add('--scale', type=cli.int_in(1, 16), default=figures.SCALE,
        help='screen pixels per image pixel in the --reconstruct figure')
    add('--batchsize', '-b', type=cli.positive_int, default=100,
        help='examples per forward pass')
    cli.add_device_arguments(parser)
    return parser


def row_label(path, prediction, width=28):
    """'digit.png: 7', the file name shortened to ``width`` characters
    ('...' in front)."""
    name = os.path.basename(path)
    if len(name) > width:
        name = '...' + name[-(width - 3):]
    return '{}: {}'.format(name, int(prediction))


def reconstruction_figure(shown, model_path, scale=figures.SCALE):
    """The --reconstruct figure: one row per input, the preprocessed input
    (as the model sees it) beside the reconstruction from the predicted
    class's capsule, each row labelled 'file: predicted class'.

    shown: [(path, prediction, input (S, S), reconstruction (S, S))].
    Returns (Figure, figures.Layout).
    """
    images = numpy.stack([image for _, _, x, recon in shown
                          for image in (x, recon)])
    return figures.mosaic_figure(
        images, 2, 'Inputs as the model sees them and their '
        'reconstructions\n{}'.format(os.path.basename(model_path)),
        scale=scale, row_labels=[row_label(path, p)
                                 for path, p, _, _ in shown],
        row_title='file: predicted class',
        col_labels=['input', 'reconstruction'])


def main(argv=None):
    args = build_parser().parse_args(argv)
    model = files.load_model_or_fail(
        args.load, nets.ARCHITECTURES, need_capsnet=False,
        need_decoder=bool(args.reconstruct),
        status=USAGE,
        purpose='predict.py --reconstruct' if args.reconstruct else
        'predict.py')
    is_capsnet = model.arch == 'capsnet'
    if model.input_size < MNIST_SIDE:
        fail('{} takes {} x {} images, smaller than the {} x {} MNIST digits '
             'predict.py prepares; use a model trained with train.py '
             '(--input-size >= {})'.format(
                 args.load, model.input_size, model.input_size, MNIST_SIDE,
                 MNIST_SIDE, MNIST_SIDE), USAGE)
    if args.reconstruct and os.path.isdir(args.reconstruct):
        fail('--reconstruct {} is a folder; give a file name, e.g. {}'.format(
            args.reconstruct, os.path.join(args.reconstruct, 'recon.png')),
            USAGE)
    if args.reconstruct:
        cli.check_writable(
            os.path.dirname(os.path.abspath(args.reconstruct)),
            '--reconstruct file', USAGE)
    device = devices.select_device(args, USAGE)
    model.to_device(device)
    side = model.input_size
    key = 'lengths' if is_capsnet else 'probabilities'

    inputs = expand_inputs(args.images)
    failed = 0
    shown = []  # (path, prediction, input, reconstruction), --reconstruct

    def report_error(path, reason):
        print('error: {}: {}'.format(path, reason), file=sys.stderr)
        if args.json:
            print(json.dumps({'file': path, 'error': reason}), flush=True)

    batchsize = devices.inference_batch(   # said on stderr: stdout is
        model, min(args.batchsize, len(inputs)),   # one line per input
        say=lambda line: print(line, file=sys.stderr, flush=True))
    with devices.inference_mode(model):
        for start in range(0, len(inputs), batchsize):
            chunk = inputs[start:start + batchsize]
            images, errors = [], []
            for path, error in chunk:
                if error is None:
                    try:
                        images.append(load_image(path, args.invert,
                                                 args.threshold, side))
                    except ImageError as e:
                        error = str(e)
                errors.append(error)
            results = []
            if images:
                x = numpy.stack(images)[:, None]
                if is_capsnet:
                    v = model.capsules(device.send(x))
                    scores = devices.to_cpu(model.lengths(v).array)
                    predictions = scores.argmax(axis=1)
                    if args.reconstruct:
                        recon = devices.to_cpu(model.reconstruction(
                            v, device.send(predictions.astype(numpy.int32))
                        ).array).reshape(-1, side, side)
                        read = [p for (p, _), e in zip(chunk, errors)
                                if e is None]
                        shown.extend(zip(read, predictions, x[:, 0], recon))
                else:
                    predictions, scores = model.predict(device.send(x))
                    predictions = devices.to_cpu(predictions)
                    scores = devices.to_cpu(scores)
                results = list(zip(predictions, scores))
            for (path, _), error in zip(chunk, errors):
                if error is not None:
                    failed += 1
                    report_error(path, error)
                    continue
                prediction, score = results.pop(0)
                if args.json:
                    print(json.dumps({'file': path,
                                      'prediction': int(prediction),
                                      key: [float(s) for s in score]}))
                else:
                    print('{}: {}  {} {}'.format(
                        path, int(prediction), key,
                        ' '.join('{:.3f}'.format(s) for s in score)))
            sys.stdout.flush()

    if args.reconstruct:
        if shown:
            figure, _ = reconstruction_figure(shown, args.load, args.scale)
            try:
                figures.save_figure(args.reconstruct, figure)
            except OSError as e:
                fail('cannot write {} ({}); choose another --reconstruct '
                     'file'.format(args.reconstruct, e.strerror or e), USAGE)
            print('wrote {} (one row per input: preprocessed input, '
                  'reconstruction)'.format(args.reconstruct),
                  file=sys.stderr if args.json else sys.stdout)
        else:
            print('error: nothing to reconstruct, no input was classified; '
                  '{} not written'.format(args.reconstruct), file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
