"""The capsule explorer: one self-contained HTML page to play with Figure 4.

``write_explorer`` writes a page that shows a grid of test digits; for the
picked digit it shows the input image, the true and the predicted class,
the 10 capsule lengths ||v_j|| and one range slider per dimension d of the
digit capsule v_j of the predicted class j. Moving a slider perturbs
v_{j,d} by -0.25 ... +0.25 (step 0.01; the paper's Figure 4 uses the same
range in steps of 0.05) and the page redraws the decoder's reconstruction
at once, computed in JavaScript from the embedded decoder weights.

The page needs no server and no network: the decoder's three (W, b) and
the digits are embedded as base64 of little-endian float32 and decoded in
the page with ``atob`` and a ``DataView``. The page's test hook is
``window.capsnetExplorer`` (``select(i)``, ``setClass(j)``,
``setDimension(d, value)``, ``reset()``, ``pixels()``, ``capsule()``,
``state()``); the reconstruction is drawn on the canvas with the id
``capsnet-reconstruction`` (S*SCALE pixels square, one gray level
round(255 x) per image pixel, white digit on black).

``decode`` computes in NumPy (float64) what the page computes (JavaScript
numbers are float64 too), for the tests.

Standard library and NumPy, plus ``capsnet.files`` for the atomic write.
"""
import base64
import html
import json
import os

import numpy

from capsnet import files

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'explorer_template.html')
DEFAULT_TITLE = 'CapsNet capsule explorer'
#: each slider perturbs v_{j,d} by -SLIDER_RANGE ... +SLIDER_RANGE
SLIDER_RANGE = 0.25
SLIDER_STEP = 0.01
#: screen pixels per image pixel: the big canvases, the gallery
SCALE = 8
THUMB_SCALE = 2


def _float32(name, a, ndim):
    a = numpy.asarray(a)
    if a.ndim != ndim:
        raise ValueError('{} must have {} dimensions, got shape {}'.format(
            name, ndim, a.shape))
    if a.size and not numpy.all(numpy.isfinite(a)):
        raise ValueError('{} has values that are not finite'.format(name))
    return numpy.ascontiguousarray(a, dtype='<f4')


def check_decoder(decoder_layers):
    """The three (W, b) of the decoder as little-endian float32 arrays.

    decoder_layers: [(W1, b1), (W2, b2), (W3, b3)], Chainer's Linear layout:
    W1 (H1, J*D), b1 (H1,); W2 (H2, H1), b2 (H2,); W3 (P, H2), b3 (P,)
    (H1 = 512, H2 = 1024, P = 784, J*D = 160 in the paper).
    Raises ValueError for other shapes.
    """
    layers = list(decoder_layers)
    if len(layers) != 3:
        raise ValueError('decoder_layers must be three (W, b) pairs '
                         '(fc1, fc2, fc3), got {}'.format(len(layers)))
    out = []
    n_in = None
    for k, pair in enumerate(layers, 1):
        if len(pair) != 2:
            raise ValueError('decoder layer fc{} must be a (W, b) pair'
                             .format(k))
        W = _float32('fc{} W'.format(k), pair[0], 2)
        b = _float32('fc{} b'.format(k), pair[1], 1)
        if n_in is not None and W.shape[1] != n_in:
            raise ValueError('fc{} W has shape {}: expected {} inputs (the '
                             'outputs of fc{})'.format(k, W.shape, n_in,
                                                       k - 1))
        if b.shape != (W.shape[0],):
            raise ValueError('fc{} b has shape {}, expected ({},) for W of '
                             'shape {}'.format(k, b.shape, W.shape[0],
                                               W.shape))
        n_in = W.shape[0]
        out.append((W, b))
    return out


def decode(decoder_layers, capsule_vector, j):
    """The reconstruction from v_j alone, as the explorer page computes it.

    decoder_layers: see ``check_decoder``; capsule_vector: (D,) the
    (perturbed) digit capsule v_j of class j; the masked decoder input is
    zero except its entries j*D ... j*D+D-1, so only W1[:, j*D:(j+1)*D]
    is used. Returns (P,) float64: sigmoid(fc3(relu(fc2(relu(fc1(.)))))),
    computed in float64 from the float32 weights like the page's
    JavaScript.
    """
    (W1, b1), (W2, b2), (W3, b3) = check_decoder(decoder_layers)
    v_j = numpy.asarray(capsule_vector, dtype=numpy.float64)
    if v_j.ndim != 1 or v_j.size == 0 or W1.shape[1] % v_j.size:
        raise ValueError('capsule_vector must be one capsule (D,) with D '
                         'dividing the {} inputs of fc1, got shape {}'
                         .format(W1.shape[1], v_j.shape))
    D = v_j.size
    J = W1.shape[1] // D
    if not (0 <= int(j) < J and int(j) == j):
        raise ValueError('class j must be in 0..{}, got {}'.format(J - 1, j))
    j = int(j)
    W1_j = W1[:, j * D:(j + 1) * D].astype(numpy.float64)
    h = numpy.maximum(W1_j @ v_j + b1, 0)
    h = numpy.maximum(W2.astype(numpy.float64) @ h + b2, 0)
    a = W3.astype(numpy.float64) @ h + b3
    with numpy.errstate(over='ignore'):
        return 1 / (1 + numpy.exp(-a))


def _classes(name, a, n, J):
    a = numpy.asarray(a)
    if a.shape != (n,):
        raise ValueError('{} must have shape ({},), got {}'.format(
            name, n, a.shape))
    if not numpy.issubdtype(a.dtype, numpy.integer):
        if not (numpy.all(numpy.isfinite(a)) and numpy.all(a == a // 1)):
            raise ValueError('{} must be whole class numbers'.format(name))
    a = a.astype(numpy.int64)
    if a.size and (a.min() < 0 or a.max() >= J):
        raise ValueError('{} must be classes in 0..{}, got {}..{}'.format(
            name, J - 1, a.min(), a.max()))
    return [int(c) for c in a]


def _check_digits(layers, images, capsules, labels, predictions, lengths):
    """Shapes of the digits against each other and against the decoder.

    images (N, S, S), capsules (N, J, D), labels and predictions (N,),
    lengths (N, J); fc1 takes J*D inputs and fc3 gives S*S pixels.
    """
    images = _float32('images', images, 3)
    capsules = _float32('capsules', capsules, 3)
    lengths = _float32('lengths', lengths, 2)
    N, S = images.shape[0], images.shape[1]
    if N == 0:
        raise ValueError('images must hold at least one digit')
    if images.shape != (N, S, S):
        raise ValueError('images must be square (N, S, S), got shape {}'
                         .format(images.shape))
    if capsules.shape[0] != N or capsules.shape[1] < 1 or \
            capsules.shape[2] < 1:
        raise ValueError('capsules must have shape (N, J, D) = ({}, 10, 16),'
                         ' got {}'.format(N, capsules.shape))
    J, D = capsules.shape[1:]
    W1, W3 = layers[0][0], layers[2][0]
    if W1.shape[1] != J * D:
        raise ValueError('fc1 W has {} inputs but the capsules give J*D = '
                         '{}*{} = {}'.format(W1.shape[1], J, D, J * D))
    if W3.shape[0] != S * S:
        raise ValueError('fc3 W has {} outputs but the images have S*S = '
                         '{}*{} = {} pixels'.format(W3.shape[0], S, S, S * S))
    if lengths.shape != (N, J):
        raise ValueError('lengths must have shape (N, J) = ({}, {}), got {}'
                         .format(N, J, lengths.shape))
    labels = _classes('labels', labels, N, J)
    predictions = _classes('predictions', predictions, N, J)
    return images, capsules, labels, predictions, lengths


def _b64(a):
    """base64 (ASCII) of the array's little-endian float32 bytes."""
    return base64.b64encode(
        numpy.ascontiguousarray(a, dtype='<f4').tobytes()).decode('ascii')


def page_data(decoder_layers, images, capsules, labels, predictions,
              lengths):
    """The dict the page reads (JSON): sizes, base64 arrays, classes.

    Keys: S, J, D, N, scale, thumb_scale, range, step; layers: three
    {out, in, W, b} (W row-major (out, in)); images (N*S*S), capsules
    (N*J*D), lengths (N*J) in base64; labels, predictions: lists of int.
    """
    layers = check_decoder(decoder_layers)
    images, capsules, labels, predictions, lengths = _check_digits(
        layers, images, capsules, labels, predictions, lengths)
    N, J, D = capsules.shape
    return {
        'S': images.shape[1], 'J': J, 'D': D, 'N': N,
        'scale': SCALE, 'thumb_scale': THUMB_SCALE,
        'range': SLIDER_RANGE, 'step': SLIDER_STEP,
        'layers': [{'out': W.shape[0], 'in': W.shape[1],
                    'W': _b64(W), 'b': _b64(b)} for W, b in layers],
        'images': _b64(images), 'capsules': _b64(capsules),
        'lengths': _b64(lengths),
        'labels': labels, 'predictions': predictions,
    }


def _script_json(obj):
    """JSON safe inside <script>: no '<', '>' or '&' left as such."""
    text = json.dumps(obj, separators=(',', ':'))
    return (text.replace('<', '\\u003c').replace('>', '\\u003e')
            .replace('&', '\\u0026'))


def render(data, title=DEFAULT_TITLE):
    """The page's HTML text for ``page_data``'s dict."""
    with open(TEMPLATE, encoding='utf-8') as f:
        template = f.read()
    for key in ('{{TITLE}}', '{{DATA}}'):
        if key not in template:
            raise RuntimeError('{} lacks {}'.format(TEMPLATE, key))
    return (template.replace('{{TITLE}}', html.escape(str(title)))
            .replace('{{DATA}}', _script_json(data)))


def write_explorer(path, decoder_layers, images, capsules, labels,
                   predictions, lengths, title=DEFAULT_TITLE):
    """Write the capsule explorer, one self-contained HTML file, to path.

    decoder_layers: [(W1, b1), (W2, b2), (W3, b3)] NumPy arrays, Chainer's
    Linear layout: W1 (512, J*D), W2 (1024, 512), W3 (S*S, 1024);
    images: (N, S, S) in [0, 1]; capsules: (N, J, D) the digit capsules
    v_j (J = 10, D = 16); labels, predictions: (N,) classes; lengths:
    (N, J) the capsule lengths ||v_j||; title: the page's title.
    The page is written atomically (``files.write_text``: a temporary file
    beside it, then a rename). Raises ValueError for shapes that do not fit
    together, cli.DiskFullError for a disk without room. Returns path.
    """
    data = page_data(decoder_layers, images, capsules, labels, predictions,
                     lengths)
    files.write_text(path, render(data, title))
    return path
