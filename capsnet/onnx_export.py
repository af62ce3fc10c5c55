"""Export a trained CapsNet's inference as an ONNX graph (docs/onnx.md).

The graph is built with the ``onnx`` package itself (``onnx.helper`` and
``onnx.numpy_helper``), not with onnx-chainer, from the model's parameters
read as NumPy arrays. The arithmetic is that of ``nets.CapsNet`` (plain
path): Conv1 (ReLU or leaky ReLU) -> PrimaryCaps (conv, regroup, squash) ->
prediction vectors -> r routing iterations, unrolled -> lengths [-> mask by
the longest capsule -> decoder].

This module imports no top-level file of the project (no ``nets``) and
no Chainer of its own (only ``capsnet.files`` for the atomic write, which
applies ``compat`` first): the model is duck-typed (``options``,
``conv1``, ``primary``, ``digit_weights()``, ``routing``, ``grid``,
``input_size``, ``n_classes``, ``decoder.fc1/fc2/fc3``), and GPU arrays are
copied to the host through their ``get()``.
"""
import os

import numpy

from capsnet import files

EPSILON = 1e-7  # nets.EPSILON: inside the roots of squash and the lengths
MIN_OPSET = 13  # ReduceSum / Unsqueeze take their axes as an input from 13

INPUT = 'x'
OUTPUTS = ('lengths', 'v', 'reconstruction')


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError('ONNX export needs the onnx package: '
                          'python -m pip install onnx ({})'.format(e)) from e
    return onnx


def _host(value, what):
    """float32 NumPy copy of a Chainer parameter / Variable / array, on the
    CPU (CuPy arrays through their ``get()``)."""
    array = getattr(value, 'array', value)
    if array is None:
        raise ValueError('{} is not initialised'.format(what))
    if not isinstance(array, numpy.ndarray):
        get = getattr(array, 'get', None)
        if callable(get):
            array = get()
    return numpy.ascontiguousarray(numpy.asarray(array, dtype=numpy.float32))


def _pair(value):
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value), int(value))


class _Graph:
    """Nodes and initializers with unique names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []
        self._count = {}
        self._ints = {}

    def name(self, stem):
        n = self._count.get(stem, 0)
        self._count[stem] = n + 1
        return stem if n == 0 else '{}_{}'.format(stem, n)

    def const(self, stem, array):
        name = self.name(stem)
        self.initializers.append(
            self.onnx.numpy_helper.from_array(numpy.asarray(array), name))
        return name

    def ints(self, stem, values):
        """An int64 constant (shapes, axes), one per distinct value."""
        key = tuple(int(v) for v in values)
        if key not in self._ints:
            self._ints[key] = self.const(
                stem, numpy.asarray(key, dtype=numpy.int64))
        return self._ints[key]

    def scalar(self, stem, value):
        return self.const(stem, numpy.asarray(value, dtype=numpy.float32))

    def op(self, op_type, inputs, stem, output=None, **attrs):
        out = output or self.name(stem)
        self.nodes.append(self.onnx.helper.make_node(
            op_type, list(inputs), [out], name=self.name('n_' + stem),
            **attrs))
        return out


def _squash(g, s, eps, one, stem, output=None):
    """nets.squash along the last axis: s * |s|^2 / ((1 + |s|^2)
    sqrt(|s|^2 + eps))."""
    last = g.ints(stem + '_axis', [-1])
    squared = g.op('ReduceSum', [g.op('Mul', [s, s], stem + '_sq'), last],
                   stem + '_sqsum', keepdims=1)
    denominator = g.op('Mul', [
        g.op('Add', [one, squared], stem + '_1p'),
        g.op('Sqrt', [g.op('Add', [squared, eps], stem + '_sqeps')],
             stem + '_norm')], stem + '_den')
    scale = g.op('Div', [squared, denominator], stem + '_scale')
    return g.op('Mul', [scale, s], stem, output=output)


def _check_model(model):
    """(options dict) or ValueError for what cannot be exported."""
    if not hasattr(model, 'routing') or not callable(
            getattr(model, 'digit_weights', None)):
        raise ValueError('only CapsNet models export to ONNX, got {}'.format(
            getattr(model, 'arch', type(model).__name__)))
    options = dict(getattr(model, 'options', None) or {})
    activation = options.get('activation', 'relu')
    if activation not in ('relu', 'leaky_relu'):
        raise ValueError('cannot export the activation {!r} (relu or '
                         'leaky_relu)'.format(activation))
    if int(model.routing) < 1:
        raise ValueError('routing must be >= 1, got {}'.format(model.routing))
    for link in (model.conv1, model.primary):
        if _pair(getattr(link, 'dilate', 1)) != (1, 1) or int(
                getattr(link, 'groups', 1)) != 1:
            raise ValueError('cannot export a dilated or grouped '
                             'convolution')
    return options


def build_onnx(model, decoder=True, opset=17):
    """The ONNX ModelProto of ``model``'s inference (not written, not
    checked); see ``export_onnx``."""
    onnx = _onnx()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    options = _check_model(model)
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= latest:
        raise ValueError('opset must be in {} ... {} (this onnx), got {}'
                         .format(MIN_OPSET, latest, opset))
    opset = int(opset)

    side = int(model.input_size)
    grid = int(model.grid)
    routing = int(model.routing)
    W1, b1 = _host(model.conv1.W, 'conv1.W'), _host(model.conv1.b, 'conv1.b')
    W2, b2 = (_host(model.primary.W, 'primary.W'),
              _host(model.primary.b, 'primary.b'))
    W = _host(model.digit_weights(), 'W')  # (I, J, D, K)
    n_in, n_out, dim_out, dim_in = W.shape
    channels = W2.shape[0]
    if channels % dim_in or (channels // dim_in) * grid * grid != n_in:
        raise ValueError(
            'inconsistent CapsNet: {} primary channels of {}-dimensional '
            'capsules on a {} x {} grid do not make {} capsules'.format(
                channels, dim_in, grid, grid, n_in))
    types = channels // dim_in
    if int(getattr(model, 'n_classes', n_out)) != n_out:
        raise ValueError('inconsistent CapsNet: n_classes {} but W has {} '
                         'digit capsules'.format(model.n_classes, n_out))

    # the recipe's options (left out of ``options`` at their defaults):
    # PrimaryCaps' kernel scaled (not its bias), a bias b_j added to s_j
    scale = float(getattr(model, 'primary_scale',
                          options.get('primary_scale', 1.0)))
    if scale != 1.0:
        W2 = (W2 * numpy.float32(scale)).astype(numpy.float32)
    digit_b = None
    if getattr(model, 'digit_bias', options.get('digit_bias', False)):
        digit_b = _host(getattr(model, 'digit_b', None), 'digit_b')
        if digit_b.shape != (n_out, dim_out):
            raise ValueError('digit_b has shape {}, expected {}'.format(
                digit_b.shape, (n_out, dim_out)))

    two_digits = bool(getattr(model, 'two_digits', False))
    dec = getattr(model, 'decoder', None)
    with_decoder = bool(decoder) and dec is not None and not two_digits

    g = _Graph(onnx)
    eps = g.scalar('eps', EPSILON)
    one = g.scalar('one', 1.0)

    # Conv1 and its activation
    h = g.op('Conv', [INPUT, g.const('conv1_W', W1), g.const('conv1_b', b1)],
             'conv1', kernel_shape=list(W1.shape[2:]),
             strides=list(_pair(getattr(model.conv1, 'stride', 1))),
             pads=list(_pair(getattr(model.conv1, 'pad', 0))) * 2)
    if options.get('activation', 'relu') == 'leaky_relu':
        h = g.op('LeakyRelu', [h], 'conv1_act',
                 alpha=float(options.get('leaky_slope', 0.01)))
    else:
        h = g.op('Relu', [h], 'conv1_act')

    # PrimaryCaps: (B, types*K, G, G) -> capsules laid out (I, B, K), with
    # capsule i = type * G^2 + row * G + column and channel = type * K + k
    h = g.op('Conv', [h, g.const('primary_W', W2), g.const('primary_b', b2)],
             'primary', kernel_shape=list(W2.shape[2:]),
             strides=list(_pair(getattr(model.primary, 'stride', 1))),
             pads=list(_pair(getattr(model.primary, 'pad', 0))) * 2)
    h = g.op('Reshape', [h, g.ints('primary_split',
                                   [0, types, dim_in, grid, grid])],
             'primary_split')
    h = g.op('Transpose', [h], 'primary_perm', perm=[1, 3, 4, 0, 2])
    s = g.op('Reshape', [h, g.ints('primary_caps', [n_in, -1, dim_in])],
             'primary_caps')
    u = _squash(g, s, eps, one, 'u')  # (I, B, K)

    # prediction vectors, batched over i: (I, B, K) @ (I, K, J*D)
    W_i = W.transpose(0, 3, 1, 2).reshape(n_in, dim_in, n_out * dim_out)
    u_hat = g.op('MatMul', [u, g.const('W', numpy.ascontiguousarray(W_i))],
                 'u_hat_flat')
    u_hat = g.op('Reshape', [u_hat, g.ints('u_hat_shape',
                                           [0, 0, n_out, dim_out])],
                 'u_hat')  # (I, B, J, D)

    # routing (Procedure 1), unrolled; logits b_ij laid out (I, B, J)
    digit_bias = g.const('digit_b', digit_b) if digit_b is not None else None
    logits = None
    v = None
    for r in range(routing):
        stem = 'r{}_'.format(r + 1)
        if logits is None:
            # softmax of zero logits: c_ij = 1/J for every i and sample
            c = numpy.full((n_out, 1), numpy.float32(1) / numpy.float32(
                n_out), dtype=numpy.float32)
            weighted = g.op('Mul', [u_hat, g.const(stem + 'c', c)],
                            stem + 'cu')
        else:
            c = g.op('Softmax', [logits], stem + 'c', axis=2)
            weighted = g.op('Mul', [g.op('Unsqueeze', [c, g.ints(
                'axis_d', [3])], stem + 'c4'), u_hat], stem + 'cu')
        s = g.op('ReduceSum', [weighted, g.ints('axis_i', [0])], stem + 's',
                 keepdims=0)
        if digit_bias is not None:
            s = g.op('Add', [s, digit_bias], stem + 's_b')
        last = r == routing - 1
        v = _squash(g, s, eps, one, stem + 'v',
                    output='v' if last else None)  # (B, J, D)
        if not last:
            agreement = g.op('ReduceSum', [g.op('Mul', [u_hat, v],
                                                stem + 'uv'),
                                          g.ints('axis_d', [3])],
                             stem + 'agreement', keepdims=0)
            logits = agreement if logits is None else g.op(
                'Add', [logits, agreement], stem + 'logits')

    lengths = g.op('Sqrt', [g.op('Add', [
        g.op('ReduceSum', [g.op('Mul', [v, v], 'v_sq'), g.ints('axis_j',
                                                               [2])],
             'v_sqsum', keepdims=0), eps], 'v_sqeps')], 'lengths',
        output='lengths')

    outputs = [
        helper.make_tensor_value_info('lengths', TensorProto.FLOAT,
                                      ['batch', n_out]),
        helper.make_tensor_value_info('v', TensorProto.FLOAT,
                                      ['batch', n_out, dim_out]),
    ]
    if with_decoder:
        # mask: keep the longest capsule (the first on a tie, like argmax)
        prediction = g.op('ArgMax', [lengths], 'prediction', axis=1,
                          keepdims=0)
        keep = g.op('OneHot', [prediction, g.ints('depth', [n_out]),
                               g.const('off_on', numpy.asarray(
                                   [0, 1], dtype=numpy.float32))],
                    'keep', axis=-1)
        masked = g.op('Mul', [v, g.op('Unsqueeze', [keep, g.ints(
            'axis_last', [2])], 'keep3')], 'masked3')
        h = g.op('Reshape', [masked, g.ints('masked_shape',
                                            [0, n_out * dim_out])], 'masked')
        layers = [dec.fc1, dec.fc2, dec.fc3]
        for n, layer in enumerate(layers, 1):
            fc = 'fc{}'.format(n)
            Wl = _host(layer.W, 'decoder.{}.W'.format(fc))
            bl = _host(layer.b, 'decoder.{}.b'.format(fc))
            h = g.op('Gemm', [h, g.const(fc + '_W', Wl),
                              g.const(fc + '_b', bl)], fc, transB=1)
            if n < len(layers):
                h = g.op('Relu', [h], fc + '_relu')
        n_pixels = int(bl.shape[0])
        g.op('Sigmoid', [h], 'reconstruction', output='reconstruction')
        outputs.append(helper.make_tensor_value_info(
            'reconstruction', TensorProto.FLOAT, ['batch', n_pixels]))

    inputs = [helper.make_tensor_value_info(
        INPUT, TensorProto.FLOAT, ['batch', int(W1.shape[1]), side, side])]
    arch = str(getattr(model, 'arch', type(model).__name__))
    graph = helper.make_graph(
        g.nodes, 'capsnet', inputs, outputs, initializer=g.initializers,
        doc_string='{} inference: conv1, primary capsules, {} routing '
                   'iteration(s) unrolled{}'.format(
                       arch, routing, ', decoder' if with_decoder else ''))
    opset_imports = [helper.make_opsetid('', opset)]
    proto = helper.make_model(graph, opset_imports=opset_imports,
                              producer_name='capsnet-chainer',
                              doc_string=graph.doc_string)
    # the lowest IR version the opset allows, so older runtimes load it
    proto.ir_version = helper.find_min_ir_version_for(opset_imports)
    meta = {'arch': arch, 'routing': routing, 'input_size': side,
            'n_classes': n_out, 'decoder': with_decoder}
    meta.update({k: options[k] for k in sorted(options) if k not in meta})
    helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    return proto


def export_onnx(model, path, decoder=True, opset=17):
    """Write ``model``'s inference as an ONNX file and return its ModelProto.

    Args:
        model: a ``nets.CapsNet`` or ``nets.TwoDigitCapsNet`` (duck-typed);
            anything without routing (the baseline CNNs) raises ValueError.
        path: the .onnx file, written atomically (``files.atomic_write``:
            a temporary file in the same folder, then a rename).
        decoder: add the ``reconstruction`` output when the model has a
            decoder (single-digit models only; a model without one, or a
            TwoDigitCapsNet, exports lengths and v only).
        opset: the ONNX opset (13 up to what the installed onnx knows).

    Graph: input ``x`` (batch, 1, S, S) float32; outputs ``lengths``
    (batch, J), ``v`` (batch, J, D) and, with the decoder,
    ``reconstruction`` (batch, S*S), the decoder's output for the capsules
    masked by the longest one. ``batch`` is symbolic.
    """
    onnx = _onnx()
    proto = build_onnx(model, decoder=decoder, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    files.atomic_write(os.fspath(path), lambda f: f.write(data))
    return proto
