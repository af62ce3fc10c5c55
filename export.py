#!/usr/bin/env python
"""Export a trained CapsNet's inference as an ONNX file (docs/onnx.md).

    python export.py --load model --onnx model.onnx
    python export.py --load model --onnx lengths.onnx --no-decoder --opset 13

The graph (built by capsnet/onnx_export.py with the ``onnx`` package):
input ``x`` (batch, 1, S, S) float32, MNIST-style images in [0, 1];
outputs ``lengths`` (batch, 10), the digit-capsule lengths (the predicted
class is the longest), ``v`` (batch, 10, 16), the digit capsules, and,
for a model trained with --reconstruct and without --no-decoder,
``reconstruction`` (batch, S*S), the decoder's output for the longest
capsule. The routing iterations are unrolled; ``batch`` is symbolic.

Errors are one line: a model file that is not a CapsNet, the onnx package
missing (``pip install onnx``), an output that cannot be written, an opset
the installed onnx does not know.
"""
import os
import sys

from capsnet import cli
if __name__ == '__main__':  # before the slow imports: see cli.py
    cli.exit_on_signals_while_importing()

import nets
from capsnet import files
from capsnet import onnx_export
from capsnet.cli import fail

DEFAULT_OPSET = 17


def build_parser():
    parser = cli.ArgumentParser(
        description="Export a trained CapsNet's inference as an ONNX file")
    add = parser.add_argument
    add('--load', required=True, help='model file written by train.py '
                                      '--save')
    add('--onnx', required=True, metavar='OUT.onnx',
        help='the ONNX file to write')
    add('--no-decoder', action='store_true',
        help='leave out the reconstruction output (lengths and v only)')
    add('--opset', type=cli.int_at_least(onnx_export.MIN_OPSET),
        default=DEFAULT_OPSET, help='ONNX opset version')
    return parser


def check_onnx():
    """The onnx package, or one line saying how to install it."""
    try:
        import onnx
    except ImportError as e:
        fail('export.py needs the onnx package ({}); install it with: '
             'python -m pip install onnx'.format(
                 ' '.join(str(e).split()) or 'ImportError'))
    return onnx


def describe(proto):
    """'x (batch, 1, 28, 28) -> lengths (batch, 10), ...' of a graph."""
    def shape(value):
        dims = value.type.tensor_type.shape.dim
        return '{} ({})'.format(value.name, ', '.join(
            d.dim_param or str(d.dim_value) for d in dims))
    graph = proto.graph
    return '{} -> {}'.format(', '.join(shape(v) for v in graph.input),
                             ', '.join(shape(v) for v in graph.output))


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_onnx()
    if os.path.isdir(args.onnx):
        fail('--onnx {} is a folder; give a file name, e.g. {}'.format(
            args.onnx, os.path.join(args.onnx, 'model.onnx')), 2)
    cli.check_writable(os.path.dirname(os.path.abspath(args.onnx)),
                       '--onnx file')
    model = files.load_model_or_fail(args.load, nets.ARCHITECTURES,
                                     purpose='export.py')
    try:
        proto = onnx_export.export_onnx(
            model, args.onnx, decoder=not args.no_decoder, opset=args.opset)
    except ValueError as e:
        fail('cannot export {}: {}'.format(args.load, e))
    except OSError as e:
        fail('cannot write {} ({}); choose another --onnx file'.format(
            args.onnx, e.strerror or e))
    print('wrote {}: {}, opset {}, {} routing iterations unrolled'.format(
        args.onnx, describe(proto), args.opset, model.routing))
    return 0


if __name__ == '__main__':
    sys.exit(cli.run_main(main))
