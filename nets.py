"""CapsNet of "Dynamic Routing Between Capsules" (Sabour, Frosst, Hinton 2017).

Shapes use B for the batch, I for the primary capsules (1152 for 28x28 input),
J for the digit capsules (10), K = 8 for a primary capsule's dimensions and
D = 16 for a digit capsule's.

Two implementations of the same network share one set of parameters:
- the plain path, built from stock Chainer functions (runs on NumPy or CuPy);
- the fast path (`capsnet.kernels`), custom FunctionNodes laid out so that the
  BLAS does the work and Chainer has few nodes to run: on the CPU every
  layer; on the GPU all but the convolutions (the prediction vectors with
  the routing, squash, the margin loss with the lengths, the mask, the
  decoder and the reconstruction error are one node each). It is
  chosen by default; ``fast=False`` keeps the plain path selectable for
  comparison.
"""
import contextlib

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
import chainer.functions as F
import chainer.links as L
from chainer import backend, reporter

from capsnet import kernels
from capsnet.errors import CapsNetError
from capsnet.kernels import convolution, heads, routing

EPSILON = 1e-7
N_PRIMARY_TYPES = 32
PRIMARY_DIM = 8
DIGIT_DIM = 16
M_PLUS, M_MINUS, LAMBDA_ABSENT = 0.9, 0.1, 0.5
RECONSTRUCTION_WEIGHT = 0.0005

# The two recipes' model options (train.py --recipe). 'paper' is the paper
# as written (and this project's behaviour before recipes existed);
# 'official' follows the authors' released code (Sarasra/models,
# research/capsules), point by point in docs/model.md:
# - digit_bias: models/layers/layers.py, capsule() and _update_routing():
#   a bias b_j (J, D) added to s_j in every routing iteration;
# - primary_scale: layers.py, conv_slim_capsule() with num_routing=1 and
#   input_dim=1: the softmax over the 32 capsule types makes every coupling
#   1/32, so the primary capsules' pre-activation is conv(x)/32 + bias;
# - init: truncated normals and 0.1 biases, layers.py (variables.
#   weight_variable / bias_variable, reconstruction()) and
#   models/capsule_model.py, inference() (conv1's sigma 0.05);
# - margin_scale: layers.py, _margin_loss() and evaluate(): 0.5 * Eq. 4's
#   terms, averaged over the classes as well as the batch, i.e. 0.5 / J =
#   0.05 of the paper's sum over the classes (the reconstruction term stays
#   0.0005 x the pixel sum averaged over the batch, capsule_model.py,
#   _remake()).
RECIPES = {
    'paper': dict(digit_bias=False, primary_scale=1.0, init='paper',
                  margin_scale=1.0),
    'official': dict(digit_bias=True, primary_scale=1 / N_PRIMARY_TYPES,
                     init='official', margin_scale=0.5 / 10),
}
RECIPE_DEFAULTS = RECIPES['paper']


class TruncatedNormal(chainer.initializer.Initializer):
    """TensorFlow's truncated normal: N(0, sigma^2) redrawn outside two
    sigmas (scipy.stats.truncnorm, from NumPy's global generator, so that
    numpy.random.seed fixes it as it fixes Chainer's own initializers)."""

    def __init__(self, scale, dtype=None):
        self.scale = scale
        super().__init__(dtype)

    def __call__(self, array):
        import scipy.stats
        values = scipy.stats.truncnorm.rvs(-2, 2, scale=self.scale,
                                           size=array.shape)
        array[...] = backend.get_array_module(array).asarray(
            values, dtype=array.dtype)


def initializers(init):
    """The initializers of each layer for ``init`` 'paper' (Chainer's
    defaults: LeCun normal, zero biases; W_ij N(0, 0.01^2)) or 'official'
    (the authors' truncated normals and 0.1 biases): the layers' keyword
    arguments, and W_ij's and the digit capsules' bias b_j's initializer."""
    def layer(initialW=None, initial_bias=None):
        return dict(initialW=initialW, initial_bias=initial_bias)
    if init == 'paper':
        return dict(conv1=layer(), primary=layer(), decoder=layer(),
                    W=chainer.initializers.Normal(0.01), digit_b=None)
    if init == 'official':
        bias = chainer.initializers.Constant(0.1)
        return dict(conv1=layer(TruncatedNormal(0.05), bias),
                    primary=layer(TruncatedNormal(0.1), bias),
                    decoder=layer(TruncatedNormal(0.1), bias),
                    W=TruncatedNormal(0.1), digit_b=bias)
    raise ValueError("init must be 'paper' or 'official', got {!r}"
                     .format(init))


# --------------------------------------------------------------------------
# The paper's named units
# --------------------------------------------------------------------------

def safe_norm(x, axis=-1, keepdims=False):
    """Euclidean norm along ``axis`` with an epsilon inside the root.

    The epsilon keeps the gradient finite at the zero vector, where the plain
    norm's gradient x/|x| is 0/0.
    """
    return F.sqrt(F.sum(x * x, axis=axis, keepdims=keepdims) + EPSILON)


def squash(s, axis=-1):
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along ``axis``.

    Args:
        s: (..., n) capsule inputs.
    Returns:
        (..., n) outputs with the same direction and length in [0, 1).
        A zero vector maps to zero with finite gradients.
    """
    squared = F.sum(s * s, axis=axis, keepdims=True)
    scale = squared / ((1 + squared) * F.sqrt(squared + EPSILON))
    return F.broadcast_to(scale, s.shape) * s


def dynamic_routing(u_hat, n_iterations, bias=None):
    """Procedure 1: routing by agreement.

    Args:
        u_hat: (B, I, J, D) prediction vectors u_hat_{j|i}, computed once.
        n_iterations: r >= 1.
        bias: None (the paper), or b_j (J, D) added to s_j in every
            iteration (the authors' code: the official recipe).
    Returns:
        v: (B, J, D) digit capsules; c: (B, I, J) the last coupling
        coefficients (softmax of the logits b_ij over j, per sample).
    """
    batch, n_in, n_out, _ = u_hat.shape
    xp = backend.get_array_module(u_hat)
    logits = xp.zeros((batch, n_in, n_out), dtype=u_hat.dtype)
    for iteration in range(n_iterations):
        c = F.softmax(logits, axis=2)
        s = F.sum(F.broadcast_to(c[:, :, :, None], u_hat.shape) * u_hat,
                  axis=1)
        if bias is not None:
            s = s + F.broadcast_to(bias, s.shape)
        v = squash(s)
        if iteration < n_iterations - 1:
            agreement = F.sum(
                u_hat * F.broadcast_to(v[:, None], u_hat.shape), axis=3)
            logits = logits + agreement
    return v, c


def prediction_vectors(u, W):
    """u_hat_{j|i} = W_ij u_i.

    Args:
        u: (B, I, K) primary capsules.
        W: (I, J, D, K) one matrix per primary capsule i and digit capsule j.
    Returns:
        (B, I, J, D)
    """
    n_in, n_out, dim_out, dim_in = W.shape
    batch = u.shape[0]
    # batched over i: (I, B, K) @ (I, K, J*D)
    W_i = F.reshape(F.transpose(W, (0, 3, 1, 2)),
                    (n_in, dim_in, n_out * dim_out))
    u_hat = F.matmul(F.transpose(u, (1, 0, 2)), W_i)
    u_hat = F.reshape(u_hat, (n_in, batch, n_out, dim_out))
    return F.transpose(u_hat, (1, 0, 2, 3))


def margin_loss(lengths, t, m_plus=M_PLUS, m_minus=M_MINUS,
                lambda_absent=LAMBDA_ABSENT):
    """Eq. 4, summed over the classes and averaged over the batch.

    Args:
        lengths: (B, J) digit capsule lengths.
        t: (B,) int32 labels.
    Returns:
        scalar Variable.
    """
    present = one_hot(t, lengths.shape[1], backend.get_array_module(lengths),
                      lengths.dtype)
    return margin_loss_present(lengths, present, m_plus, m_minus,
                               lambda_absent)


def margin_loss_present(lengths, present, m_plus=M_PLUS, m_minus=M_MINUS,
                        lambda_absent=LAMBDA_ABSENT):
    """Eq. 4 with any set of present classes (T_k = present[:, k]).

    Args:
        lengths: (B, J) digit capsule lengths.
        present: (B, J) array of 0 / 1, e.g. ``two_hot`` for MultiMNIST.
    Returns:
        scalar Variable: summed over the classes, averaged over the batch.
    """
    loss = (present * F.square(F.relu(m_plus - lengths))
            + lambda_absent * (1 - present)
            * F.square(F.relu(lengths - m_minus)))
    return F.sum(loss) / lengths.shape[0]


def one_hot(t, n_classes, xp=numpy, dtype=numpy.float32):
    """(B, J) with a one at each label of t (B,)."""
    return xp.eye(n_classes, dtype=dtype)[t]


def two_hot(t1, t2, n_classes, xp=numpy, dtype=numpy.float32):
    """(B, J) with ones at t1 and t2 (labels (B,), t1 != t2 for MultiMNIST;
    a single one where they are equal)."""
    eye = xp.eye(n_classes, dtype=dtype)
    return xp.maximum(eye[t1], eye[t2])


def top2(lengths):
    """(B, 2) the classes of the two longest capsules, longest first, of an
    array (B, J); ties go to the lower class."""
    xp = backend.get_array_module(lengths)
    order = xp.argsort(-lengths, axis=1, kind='stable')
    return order[:, :2]


def pair_correct(lengths, t1, t2):
    """(B,) bool: the two longest capsules are exactly {t1, t2} (the paper's
    MultiMNIST criterion; the order does not matter)."""
    best = top2(lengths)
    return (((best[:, 0] == t1) & (best[:, 1] == t2))
            | ((best[:, 0] == t2) & (best[:, 1] == t1)))


def forced_class(lengths, t1, t2, prediction):
    """Figure 5's starred column: per example, the class with the longest
    capsule among those that are neither a label nor predicted.

    Args:
        lengths: (B, J) capsule lengths (or scores); t1, t2: (B,) labels;
            prediction: (B, K) predicted classes (top2(lengths)).
    Returns:
        (B,) int: the longest remaining capsule; ties go to the lower class.
    Raises:
        ValueError: J leaves no class outside labels and prediction.
    """
    xp = backend.get_array_module(lengths)
    b, j = lengths.shape
    taken = xp.zeros((b, j), bool)
    rows = xp.arange(b)
    for classes in (t1, t2) + tuple(xp.asarray(prediction).T):
        taken[rows, xp.asarray(classes)] = True
    if bool(taken.all(axis=1).any()):
        raise ValueError('no class is left outside the labels and the '
                         'prediction among {}'.format(j))
    return xp.where(taken, -xp.inf, xp.asarray(lengths, float)).argmax(
        axis=1)


def reconstruction_loss(reconstruction, x):
    """Sum of squared pixel errors per image, averaged over the batch.

    Args:
        reconstruction: (B, P) decoder output; x: (B, ...) with P pixels.
    Returns:
        scalar Variable, not yet scaled by the 0.0005 of the paper.
    """
    x = x.reshape(reconstruction.shape)
    return F.sum(F.square(reconstruction - x)) / x.shape[0]


def mask(v, labels):
    """Keep only the capsule of each sample's label.

    Args:
        v: (B, J, D); labels: (B,) int.
    Returns:
        (B, J * D), zero except for the label's D entries.
    """
    xp = backend.get_array_module(v)
    keep = one_hot(labels, v.shape[1], xp, v.dtype)
    return F.reshape(v * F.broadcast_to(keep[:, :, None], v.shape),
                     (v.shape[0], -1))


class Decoder(chainer.Chain):
    """Fig. 2: FC 512 ReLU, FC 1024 ReLU, FC n_pixels sigmoid.

    Input (B, J * D) masked digit capsules; output (B, n_pixels) in (0, 1).
    """

    def __init__(self, n_in, n_pixels, initialW=None, initial_bias=None):
        super().__init__()
        init = dict(initialW=initialW, initial_bias=initial_bias)
        with self.init_scope():
            self.fc1 = L.Linear(n_in, 512, **init)
            self.fc2 = L.Linear(512, 1024, **init)
            self.fc3 = L.Linear(1024, n_pixels, **init)

    def layers(self):
        """[(W, b)] of the three layers, first to last."""
        return [(layer.W, layer.b) for layer in (self.fc1, self.fc2,
                                                 self.fc3)]

    def forward(self, h):
        h = F.relu(self.fc1(h))
        h = F.relu(self.fc2(h))
        return F.sigmoid(self.fc3(h))


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------

def primary_grid(input_size):
    """Side of the PrimaryCaps grid: 28 -> 6, 36 -> 10, 40 -> 12."""
    return ((input_size - 8) - 9) // 2 + 1


class CapsNet(chainer.Chain):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) [-> decoder].

    ``CapsNet()`` is the paper's MNIST model (8,215,568 parameters).

    Args:
        routing: r, the number of routing iterations (>= 1).
        reconstruct: add the decoder and its loss.
        activation: 'relu' or 'leaky_relu' for Conv1.
        leaky_slope: negative slope of the leaky ReLU.
        share_weights: one W_ij per capsule type, shared over the grid, as the
            older Chainer implementation did (6.8M parameters).
        input_size: side of the square input (28 MNIST; 36, 40 padded).
        n_classes: J.
        fast: use the fast kernels (``capsnet.kernels``): on the CPU all of them,
            on the GPU all but the convolutions. None (the default) picks
            them on both; False keeps the plain path. Not part of the
            architecture and not saved.
        digit_bias, primary_scale, init, margin_scale: the recipe's points
            (``RECIPES``); the defaults are the paper's. Options that keep
            their default are left out of ``options`` (model files and
            snapshots from before recipes existed have none of them).
    """

    arch = 'capsnet'

    def __init__(self, routing=3, reconstruct=True, activation='relu',
                 leaky_slope=0.01, share_weights=False, input_size=28,
                 n_classes=10, fast=None, digit_bias=False, primary_scale=1.0,
                 init='paper', margin_scale=1.0):
        super().__init__()
        if routing < 1:
            raise ValueError('routing must be >= 1, got {}'.format(routing))
        if activation not in ('relu', 'leaky_relu'):
            raise ValueError("activation must be 'relu' or 'leaky_relu', "
                             'got {!r}'.format(activation))
        if input_size < 28:
            raise ValueError('input_size must be >= 28, got {}'
                             .format(input_size))
        self.options = dict(
            routing=int(routing), reconstruct=bool(reconstruct),
            activation=activation, leaky_slope=float(leaky_slope),
            share_weights=bool(share_weights), input_size=int(input_size),
            n_classes=int(n_classes))
        recipe = dict(digit_bias=bool(digit_bias),
                      primary_scale=float(primary_scale), init=init,
                      margin_scale=float(margin_scale))
        self.options.update({key: value for key, value in recipe.items()
                             if value != RECIPE_DEFAULTS[key]})
        self.digit_bias = recipe['digit_bias']
        self.primary_scale = recipe['primary_scale']
        self.margin_scale = recipe['margin_scale']
        init = initializers(init)
        self.routing = routing
        self.reconstruct = reconstruct
        self.input_size = input_size
        self.n_classes = n_classes
        self.fast = fast
        # the kernels' optional pieces (not saved; train.py's flags)
        self.kernel_options = kernels.DEFAULT
        self.grid = primary_grid(input_size)
        self.n_primary = N_PRIMARY_TYPES * self.grid * self.grid
        w_rows = N_PRIMARY_TYPES if share_weights else self.n_primary
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 256, 9, **init['conv1'])
            self.primary = L.Convolution2D(
                256, N_PRIMARY_TYPES * PRIMARY_DIM, 9, stride=2,
                **init['primary'])
            self.W = chainer.Parameter(
                init['W'], (w_rows, n_classes, DIGIT_DIM, PRIMARY_DIM))
            if self.digit_bias:
                self.digit_b = chainer.Parameter(init['digit_b'],
                                                 (n_classes, DIGIT_DIM))
            if reconstruct:
                self.decoder = Decoder(n_classes * DIGIT_DIM,
                                       input_size * input_size,
                                       **init['decoder'])

    # -- pieces ------------------------------------------------------------

    def _use_fast(self):
        """Whether the fast kernels run: all of it on the CPU; on the GPU all but
        its convolutions (see ``_hwbc_convolutions``)."""
        if self.fast is None:
            return True
        return bool(self.fast)

    def _activation(self, h):
        if self.options['activation'] == 'leaky_relu':
            return F.leaky_relu(h, slope=self.options['leaky_slope'])
        return F.relu(h)

    def digit_weights(self):
        """(I, J, D, K): W_ij for every primary capsule (expanded if shared)."""
        if self.W.shape[0] == self.n_primary:
            return self.W
        cells = self.grid * self.grid
        W = F.broadcast_to(self.W[:, None], (N_PRIMARY_TYPES, cells)
                           + self.W.shape[1:])
        return F.reshape(W, (self.n_primary,) + self.W.shape[1:])

    def primary_weights(self):
        """PrimaryCaps' kernel as the convolution uses it: scaled by
        ``primary_scale`` (the official recipe's one-iteration routing over
        the 32 types, so that its pre-activation is conv(x)/32 + bias)."""
        if self.primary_scale == 1:
            return self.primary.W
        return self.primary.W * self.primary.W.dtype.type(self.primary_scale)

    def _hwbc_convolutions(self):
        """Whether the convolutions are capsnet.kernels' own (the fast path on the
        CPU); on the GPU the fast path keeps Chainer's convolutions."""
        return self._use_fast() and self.xp is numpy

    def primary_capsules(self, x):
        """(B, 1, S, S) images -> (B, I, K) squashed primary capsules.

        Capsule i = type * grid^2 + row * grid + column.
        """
        batch, grid = x.shape[0], self.grid
        if self._hwbc_convolutions():
            side = self.input_size
            # the fast kernels work on (H, W, B, C) arrays
            h = F.reshape(F.transpose(F.reshape(x, (batch, side, side)),
                                      (1, 2, 0)), (side, side, batch, 1))
            h = convolution.conv2d_hwbc(h, self.conv1.W, self.conv1.b)
            h = convolution.conv2d_hwbc(self._activation(h),
                                     self.primary_weights(), self.primary.b,
                                     stride=2, method='dft')
            # (grid, grid, B, types, K) -> (B, types, grid, grid, K)
            split = (grid, grid, batch, N_PRIMARY_TYPES, PRIMARY_DIM)
            axes = (2, 3, 0, 1, 4)
        else:
            if self._use_fast() and self.kernel_options.gpu_convolutions:
                h = convolution.conv2d_nchw(x, self.conv1.W, self.conv1.b)
                h = convolution.conv2d_nchw(
                    self._activation(h), self.primary_weights(),
                    self.primary.b, stride=self.primary.stride[0])
            elif self.primary_scale == 1:
                h = self.primary(self._activation(self.conv1(x)))
            else:
                h = F.convolution_2d(
                    self._activation(self.conv1(x)), self.primary_weights(),
                    self.primary.b, stride=self.primary.stride)
            # (B, types, K, grid, grid) -> (B, types, grid, grid, K)
            split = (batch, N_PRIMARY_TYPES, PRIMARY_DIM, grid, grid)
            axes = (0, 1, 3, 4, 2)
        capsules = (batch, self.n_primary, PRIMARY_DIM)
        if self._use_fast():
            return heads.squash_capsules(h, split, axes, capsules,
                                         self.kernel_options)
        return squash(F.reshape(F.transpose(F.reshape(h, split), axes),
                                capsules))

    def digit_capsules(self, u):
        """(B, I, K) -> v (B, J, D) and the last coupling c (B, I, J)."""
        bias = self.digit_b if self.digit_bias else None
        if self._use_fast():
            return routing.digit_capsules(u, self.digit_weights(),
                                          self.routing, bias,
                                          self.kernel_options)
        return dynamic_routing(prediction_vectors(u, self.digit_weights()),
                               self.routing, bias)

    def capsules(self, x):
        """(B, 1, S, S) images -> v (B, J, D) digit capsules."""
        v, _ = self.digit_capsules(self.primary_capsules(x))
        return v

    def lengths(self, v):
        """(B, J, D) -> (B, J) capsule lengths, the class probabilities."""
        return safe_norm(v, axis=2)

    def reconstruction(self, v, labels):
        """Decoder output (B, S*S) for v (B, J, D) masked by labels (B,)."""
        if self._use_fast():
            return heads.decoder(heads.mask(v, labels),
                                    self.decoder.layers())
        return self.decoder(mask(v, labels))

    def _margin_loss(self, v, present):
        """(Eq. 4 as a scalar Variable, the lengths (B, J) as an array) for
        v (B, J, D) and the present classes (B, J)."""
        if self._use_fast():
            loss, lengths = heads.margin_loss(v, present, M_PLUS, M_MINUS,
                                                 LAMBDA_ABSENT)
        else:
            lengths = self.lengths(v)
            loss, lengths = margin_loss_present(lengths, present), \
                lengths.array
        if self.margin_scale != 1:
            loss = loss * loss.dtype.type(self.margin_scale)
        return loss, lengths

    def _reconstruction_loss(self, reconstruction, x):
        if self._use_fast():
            return heads.squared_error(reconstruction, x)
        return reconstruction_loss(reconstruction, x)

    def inference_bytes_per_example(self):
        """Rough bytes one example takes in an inference pass."""
        return bytes_per_example(self.arch, self.options, training=False)

    def inference(self):
        """Context for inference over many batches with fixed weights."""
        if self._hwbc_convolutions():
            return convolution.fixed_weights()
        return contextlib.nullcontext()

    def predict(self, x):
        """(B, 1, S, S) -> (predictions (B,), lengths (B, J)) as arrays."""
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', False), \
                self.inference():
            lengths = self.lengths(self.capsules(x)).array
        return lengths.argmax(axis=1), lengths

    # -- training objective ------------------------------------------------

    def forward(self, x, t):
        """Total loss for images x (B, 1, S, S) and labels t (B,).

        The decoder sees the true label's capsule in training and the
        predicted one at test time.
        """
        v = self.capsules(x)
        present = one_hot(t, self.n_classes, self.xp, v.dtype)
        loss, lengths = self._margin_loss(v, present)
        prediction = lengths.argmax(axis=1)
        observation = {'margin_loss': loss,
                       'accuracy': (prediction == t).mean()}
        if self.reconstruct:
            labels = t if chainer.config.train else prediction
            recon = self._reconstruction_loss(
                self.reconstruction(v, labels), x)
            observation['reconstruction_loss'] = recon
            loss = loss + RECONSTRUCTION_WEIGHT * recon
        observation['loss'] = loss
        reporter.report(observation, self)
        return loss


class TwoDigitCapsNet(CapsNet):
    """CapsNet for MultiMNIST (Section 6): 36 x 36 input (a 10 x 10 primary
    grid, 3200 primary capsules), 11,361,808 parameters with the decoder.

    The margin loss has both classes present; the decoder reconstructs each
    digit from its own capsule against that digit's own image (x1, x2), the
    two squared errors summed, scaled by 0.0005. Training masks with the
    true labels; at test time with the two longest capsules. The prediction
    is the two longest capsules; an example is right when they are exactly
    its two labels. Same arguments as CapsNet, input_size 36 by default.
    """

    arch = 'capsnet-multimnist'
    two_digits = True

    def __init__(self, routing=3, reconstruct=True, activation='relu',
                 leaky_slope=0.01, share_weights=False, input_size=36,
                 n_classes=10, fast=None, **recipe):
        super().__init__(routing=routing, reconstruct=reconstruct,
                         activation=activation, leaky_slope=leaky_slope,
                         share_weights=share_weights, input_size=input_size,
                         n_classes=n_classes, fast=fast, **recipe)

    def predict(self, x):
        """(B, 1, S, S) -> (the two longest classes (B, 2), lengths (B, J))."""
        _, lengths = super().predict(x)
        return top2(lengths), lengths

    def forward(self, x, t1, t2, x1=None, x2=None):
        """Total loss for merged images x (B, 1, S, S), labels t1, t2 (B,)
        and, with the decoder, the digits' own images x1, x2 (B, 1, S, S).
        """
        v = self.capsules(x)
        present = two_hot(t1, t2, self.n_classes, self.xp, v.dtype)
        loss, lengths = self._margin_loss(v, present)
        observation = {'margin_loss': loss, 'accuracy': pair_correct(
            lengths, t1, t2).mean()}
        if self.reconstruct:
            if chainer.config.train:
                first, second = t1, t2
            else:
                best = top2(lengths)
                # the predicted capsule that is t2 (or is not t1) goes to x2
                swap = (best[:, 0] == t2) | (best[:, 1] == t1)
                first = self.xp.where(swap, best[:, 1], best[:, 0])
                second = self.xp.where(swap, best[:, 0], best[:, 1])
            recon = (self._reconstruction_loss(
                self.reconstruction(v, first), x1)
                + self._reconstruction_loss(
                    self.reconstruction(v, second), x2))
            observation['reconstruction_loss'] = recon
            loss = loss + RECONSTRUCTION_WEIGHT * recon
        observation['loss'] = loss
        reporter.report(observation, self)
        return loss


# --------------------------------------------------------------------------
# The baseline CNN (Section 5)
# --------------------------------------------------------------------------
#
# The paper: "The baseline is a standard CNN with three convolutional layers
# of 256, 256, 128 channels. Each has 5x5 kernels and stride of 1. The last
# convolutional layers are followed by two fully connected layers of size
# 328, 192. The last fully connected layer is connected with dropout to a 10
# class softmax layer with cross entropy loss." and "In terms of number of
# parameters the baseline has 35.4M compared to 8.2M of CapsNet".

CONV_CHANNELS = (256, 256, 128)
KERNEL = 5
PAD = 2  # 'same' padding for the 5x5 kernels: the side stays input_size
FC_SIZES = (328, 192)


class BaselineCNN(chainer.Chain):
    """Conv 256, Conv 256, Conv 128, FC 328, FC 192, dropout, FC 10 softmax.

    Every convolution is 5x5, stride 1, pad 2 ('same'), followed by ReLU;
    FC 328 and FC 192 are followed by ReLU too. Dropout sits between FC 192
    and the 10-way layer, i.e. on the 192 features that feed the softmax
    ("the last fully connected layer is connected with dropout to a 10 class
    softmax layer"); it is active only in training (chainer.config.train).

    ``BaselineCNN()`` (28x28 MNIST, 10 classes) has exactly 35,445,522
    parameters, the paper's "35.4M":

        conv1  1*256*25 + 256          =      6,656
        conv2  256*256*25 + 256        =  1,638,656
        conv3  256*128*25 + 128        =    819,328
        fc1    (28*28*128)*328 + 328   = 32,915,784   (100,352 inputs)
        fc2    328*192 + 192           =     63,168
        fc3    192*10 + 10             =      1,930
        total                          = 35,445,522

    The paper gives neither padding nor pooling; it is 'same' padding and no
    pooling that reproduce its 35.4M: the 128 feature maps stay 28x28, and
    their 100,352 features into FC 328 hold 93% of the parameters. (Valid
    padding would leave 16x16x128 = 32,768 features, 10,748,232 parameters
    in FC 328 and 13,277,970 in all; a 2x2 pooling anywhere would cut FC
    328's inputs by 4.)

    The paper does not give the dropout rate; 0.5 is the default here.

    Args:
        input_size: side of the square input (28 MNIST; 36, 40 padded).
            FC 328 grows with it: 128 * input_size**2 inputs.
        pad: padding of the convolutions, 2 ('same', the default) or 0
            (valid: the side shrinks by 4 per convolution); the earlier
            MultiMNIST baseline (nets.LegacyTwoDigitBaselineCNN) uses 0.
        n_classes: size of the softmax layer.
        dropout: dropout ratio before the softmax layer (0 disables it).
        fast: use the fast CPU kernels of ``fast_ops`` (None: on the CPU).
            Not part of the architecture and not saved.
    """

    arch = 'baseline'

    def _setup(self, input_size, n_classes, dropout, fast, pad, minimum):
        """What every CNN here starts with: the checks of its arguments,
        its options (what a model file stores) and its attributes."""
        chainer.Chain.__init__(self)
        if input_size < minimum:
            raise ValueError('input_size must be >= {}, got {}'.format(
                minimum, input_size))
        if not 0 <= dropout < 1:
            raise ValueError('dropout must be in [0, 1), got {}'
                             .format(dropout))
        self.fast, self.pad = fast, int(pad)
        self.options = dict(input_size=int(input_size),
                            n_classes=int(n_classes), dropout=float(dropout))
        self.input_size = int(input_size)
        self.n_classes = int(n_classes)
        self.dropout = float(dropout)

    def __init__(self, input_size=28, n_classes=10, dropout=0.5, fast=None,
                 pad=PAD):
        self._setup(input_size, n_classes, dropout, fast, pad, 1)
        side = input_size + 3 * (2 * self.pad - KERNEL + 1)
        if side < 1:
            raise ValueError('input_size {} is too small for unpadded '
                             'convolutions'.format(input_size))
        c1, c2, c3 = CONV_CHANNELS
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, c1, KERNEL, stride=1,
                                         pad=self.pad)
            self.conv2 = L.Convolution2D(c1, c2, KERNEL, stride=1,
                                         pad=self.pad)
            self.conv3 = L.Convolution2D(c2, c3, KERNEL, stride=1,
                                         pad=self.pad)
            self.fc1 = L.Linear(c3 * side * side, FC_SIZES[0])
            self.fc2 = L.Linear(FC_SIZES[0], FC_SIZES[1])
            self.fc3 = L.Linear(FC_SIZES[1], n_classes)

    def _use_fast(self):
        if self.fast and self.xp is not numpy:
            raise RuntimeError("the baseline's fast kernels are CPU-only; "
                               'use the plain path (fast=None or False) on '
                               'the GPU')
        if self.fast is None:
            return self.xp is numpy
        return self.fast

    def inference_bytes_per_example(self):
        """Rough bytes one example takes in an inference pass."""
        return bytes_per_example(self.arch, self.options, training=False)

    def inference(self):
        """Context for inference over many batches with fixed weights."""
        if self._use_fast():
            return convolution.fixed_weights()
        return contextlib.nullcontext()

    def features(self, x):
        """(B, 1, S, S) images -> (B, 128, S, S) after the three convolutions.
        """
        side = self.input_size
        batch = x.shape[0]
        convolutions = (self.conv1, self.conv2, self.conv3)
        if not self._use_fast():
            h = F.reshape(x, (batch, 1, side, side))
            for conv in convolutions:
                h = F.relu(conv(h))
            return h
        # (H, W, B, C) arrays; the 5x5 'same' convolutions on 256 channels
        # cost far fewer multiply-adds per frequency than per tap
        h = F.reshape(F.transpose(F.reshape(x, (batch, side, side)),
                                  (1, 2, 0)), (side, side, batch, 1))
        for conv in convolutions:
            p = self.pad
            if p:
                h = F.pad(h, ((p, p), (p, p), (0, 0), (0, 0)), 'constant')
            method = 'im2col' if conv is self.conv1 else 'dft'
            h = F.relu(convolution.conv2d_hwbc(h, conv.W, conv.b,
                                            method=method))
        return F.transpose(h, (2, 3, 0, 1))

    def logits(self, x):
        """(B, 1, S, S) images (or (B, S*S)) -> (B, n_classes) logits."""
        h = self.features(x)
        h = F.relu(self.fc1(h))  # Linear flattens (B, 128, S, S)
        h = F.relu(self.fc2(h))
        if self.dropout > 0:
            h = F.dropout(h, ratio=self.dropout)
        return self.fc3(h)

    def predict(self, x):
        """(B, 1, S, S) -> (predictions (B,), probabilities (B, J)) arrays.

        Runs in inference mode (no dropout, no graph).
        """
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', False), \
                self.inference():
            probabilities = F.softmax(self.logits(x), axis=1).array
        return probabilities.argmax(axis=1), probabilities

    def forward(self, x, t):
        """Softmax cross entropy (averaged over the batch) for x and t (B,).

        Reports ``loss`` and ``accuracy``, the keys CapsNet reports.
        """
        y = self.logits(x)
        loss = F.softmax_cross_entropy(y, t)
        accuracy = (y.array.argmax(axis=1) == t).mean()
        reporter.report({'loss': loss, 'accuracy': accuracy}, self)
        return loss


class PoolingCNN(BaselineCNN):
    """The CNN of the affine-robustness comparison (Section 5.2): "a
    traditional convolutional model with a similar number of parameters"
    that uses max pooling and dropout; the paper gives no layers, so these
    are the baseline's with a 2 x 2 max pooling after conv1 and conv2 and
    FC 768 in place of FC 328 (docs/experiments.md):

        conv 256 5x5 'same', ReLU, max pool 2 -> conv 256 5x5, ReLU,
        max pool 2 -> conv 128 5x5, ReLU -> FC 768 ReLU -> FC 192 ReLU ->
        dropout -> FC 10 softmax

    On 40 x 40 input it has 12,445,386 parameters (CapsNet on 40 x 40:
    11,227,904 without the decoder, 13,475,648 with it).
    """

    arch = 'cnn-pool'
    FC = (768, 192)

    def __init__(self, input_size=40, n_classes=10, dropout=0.5, fast=None):
        self._setup(input_size, n_classes, dropout, fast, PAD, 4)
        c1, c2, c3 = CONV_CHANNELS
        side = self.input_size // 2 // 2
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, c1, KERNEL, stride=1, pad=PAD)
            self.conv2 = L.Convolution2D(c1, c2, KERNEL, stride=1, pad=PAD)
            self.conv3 = L.Convolution2D(c2, c3, KERNEL, stride=1, pad=PAD)
            self.fc1 = L.Linear(c3 * side * side, self.FC[0])
            self.fc2 = L.Linear(self.FC[0], self.FC[1])
            self.fc3 = L.Linear(self.FC[1], n_classes)

    def _use_fast(self):
        # the fast path pools by reshaping, which needs even sides at both
        # poolings (Chainer's cover_all pooling differs on odd sides)
        return (super()._use_fast() and self.input_size % 4 == 0)

    def features(self, x):
        """(B, 1, S, S) images -> (B, 128, S/4, S/4) feature maps."""
        side, batch = self.input_size, x.shape[0]
        if not self._use_fast():
            h = F.reshape(x, (batch, 1, side, side))
            h = F.max_pooling_2d(F.relu(self.conv1(h)), 2)
            h = F.max_pooling_2d(F.relu(self.conv2(h)), 2)
            return F.relu(self.conv3(h))
        # (H, W, B, C) arrays as in BaselineCNN.features: conv2 on 20 x 20
        # x 256 channels is most of the cost, and the DFT path is ~4x faster
        # on the CPU than Chainer's im2col there
        h = F.reshape(F.transpose(F.reshape(x, (batch, side, side)),
                                  (1, 2, 0)), (side, side, batch, 1))
        for conv, method, pool in ((self.conv1, 'im2col', True),
                                   (self.conv2, 'dft', True),
                                   (self.conv3, 'dft', False)):
            p = self.pad
            h = F.pad(h, ((p, p), (p, p), (0, 0), (0, 0)), 'constant')
            h = F.relu(convolution.conv2d_hwbc(h, conv.W, conv.b,
                                            method=method))
            if pool:
                height, width, _, channels = h.shape
                h = F.max(F.reshape(h, (height // 2, 2, width // 2, 2,
                                        batch, channels)), axis=(1, 3))
        return F.transpose(h, (2, 3, 0, 1))


class _TwoDigitScores:
    """The MultiMNIST objective of a CNN: a sigmoid cross entropy against
    the two present classes (summed over the classes, averaged over the
    batch); the prediction is the two largest logits, scored like the
    CapsNet's."""

    two_digits = True

    def predict(self, x):
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', False), \
                self.inference():
            logits = self.logits(x).array
        return top2(logits), logits

    def forward(self, x, t1, t2, x1=None, x2=None):
        y = self.logits(x)
        present = two_hot(t1, t2, self.n_classes, self.xp, numpy.int32)
        # summed over the classes, averaged over the batch
        loss = F.sigmoid_cross_entropy(y, present, normalize=False)
        accuracy = pair_correct(y.array, t1, t2).mean()
        reporter.report({'loss': loss, 'accuracy': accuracy}, self)
        return loss


class TwoDigitBaselineCNN(_TwoDigitScores, BaselineCNN):
    """The baseline CNN for MultiMNIST, as the authors' released code builds
    it: ``ConvModel.inference`` and ``ConvModel._add_convs`` of
    research/capsules/models/conv_model.py (Sarasra/models, also in
    tensorflow/models), with their SAME padding, on 36 x 36:

        conv 512 5x5 SAME, ReLU, max pool 2x2 stride 2 SAME   36 -> 18
        conv 256 5x5 SAME, ReLU, max pool 2x2 stride 2 SAME   18 -> 9
        FC 1024, ReLU -> FC 10 (logits); no dropout

    ``TwoDigitBaselineCNN()`` has 24,535,306 parameters (the paper: 24.56M):

        conv1  1*512*25 + 512        =     13,312
        conv2  512*256*25 + 256      =  3,277,056
        fc1    (9*9*256)*1024 + 1024 = 21,234,688
        fc2    1024*10 + 10          =     10,250

    Its file's arch is 'baseline-multimnist-conv'; files of the earlier
    MultiMNIST baseline ('baseline-multimnist') load as
    LegacyTwoDigitBaselineCNN.

    Args:
        input_size: side of the square input; a pooling of an odd side
            keeps the last row and column (TF's SAME: ceil(side / 2)).
        dropout: before FC 10 (0: none, as the authors' code).
        fast: the fast CPU kernels (None: on the CPU when input_size is a
            multiple of 4). Not saved.
    """

    arch = 'baseline-multimnist-conv'
    CHANNELS = (512, 256)
    FC = 1024

    def __init__(self, input_size=36, n_classes=10, dropout=0.0, fast=None):
        self._setup(input_size, n_classes, dropout, fast, PAD, 1)
        c1, c2 = self.CHANNELS
        side = -(-(-(-self.input_size // 2)) // 2)   # ceil twice
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, c1, KERNEL, stride=1, pad=PAD)
            self.conv2 = L.Convolution2D(c1, c2, KERNEL, stride=1, pad=PAD)
            self.fc1 = L.Linear(c2 * side * side, self.FC)
            self.fc2 = L.Linear(self.FC, n_classes)

    def _use_fast(self):
        # pooling by reshape needs even sides at both poolings
        return super()._use_fast() and self.input_size % 4 == 0

    def features(self, x):
        """(B, 1, S, S) images -> (B, 256, S/4, S/4) feature maps."""
        side, batch = self.input_size, x.shape[0]
        if not self._use_fast():
            h = F.reshape(x, (batch, 1, side, side))
            h = F.max_pooling_2d(F.relu(self.conv1(h)), 2)
            return F.max_pooling_2d(F.relu(self.conv2(h)), 2)
        # (H, W, B, C) arrays as in PoolingCNN.features
        h = F.reshape(F.transpose(F.reshape(x, (batch, side, side)),
                                  (1, 2, 0)), (side, side, batch, 1))
        for conv, method in ((self.conv1, 'im2col'), (self.conv2, 'dft')):
            p = self.pad
            h = F.pad(h, ((p, p), (p, p), (0, 0), (0, 0)), 'constant')
            h = F.relu(convolution.conv2d_hwbc(h, conv.W, conv.b,
                                               method=method))
            height, width, _, channels = h.shape
            h = F.max(F.reshape(h, (height // 2, 2, width // 2, 2, batch,
                                    channels)), axis=(1, 3))
        return F.transpose(h, (2, 3, 0, 1))

    def logits(self, x):
        """(B, 1, S, S) images -> (B, n_classes) logits."""
        h = F.relu(self.fc1(self.features(x)))
        if self.dropout > 0:
            h = F.dropout(h, ratio=self.dropout)
        return self.fc2(h)


class LegacyTwoDigitBaselineCNN(_TwoDigitScores, BaselineCNN):
    """The earlier MultiMNIST baseline, kept so that its model files
    (arch 'baseline-multimnist') still load: BaselineCNN's layers on
    36 x 36 with valid (unpadded) convolutions, 26,712,850 parameters.
    New runs use TwoDigitBaselineCNN (the authors' layers)."""

    arch = 'baseline-multimnist'

    def __init__(self, input_size=36, n_classes=10, dropout=0.5, pad=0,
                 fast=None):
        super().__init__(input_size=input_size, n_classes=n_classes,
                         dropout=dropout, pad=pad, fast=fast)
        self.options['pad'] = int(pad)


ARCHITECTURES = {'capsnet': CapsNet, 'baseline': BaselineCNN,
                 'capsnet-multimnist': TwoDigitCapsNet,
                 'baseline-multimnist-conv': TwoDigitBaselineCNN,
                 'baseline-multimnist': LegacyTwoDigitBaselineCNN,
                 'cnn-pool': PoolingCNN}
SINGLE_DIGIT_ARCHITECTURES = ('baseline', 'capsnet')


def build(arch, recipe='paper', **options):
    """The network ``arch`` of ``ARCHITECTURES`` with ``options``; a CapsNet
    also takes the recipe's points (``RECIPES``). A CapsNetError names an
    option the network cannot take."""
    network = ARCHITECTURES[arch]
    if issubclass(network, CapsNet):
        options = dict(RECIPES[recipe], **options)
    try:
        return network(**options)
    except ValueError as e:
        raise CapsNetError(str(e))


# --------------------------------------------------------------------------
# Model arithmetic: parameter counts and memory, from the shapes alone
# --------------------------------------------------------------------------

def count_parameters(model):
    """Parameters of a built network."""
    return sum(p.size for p in model.params())


def _capsnet_shapes(options):
    """(parameters, primary capsules I) of a CapsNet's options."""
    side = options.get('input_size', 28)
    grid = primary_grid(side)
    n_primary = N_PRIMARY_TYPES * grid * grid
    params = (256 * 81 + 256 * 256 * 81 + 10 * 16 * 8 *
              (N_PRIMARY_TYPES if options.get('share_weights') else
               n_primary))
    if options.get('reconstruct', True):
        params += 160 * 512 + 512 * 1024 + 1024 * side * side
    return params, n_primary


def bytes_per_example(arch, options, training=True):
    """Rough bytes one example's activations take in a training step
    (forward and backward) or an inference pass, from the shapes alone."""
    side = options.get('input_size', 28)
    if arch.startswith('capsnet'):
        _, n_primary = _capsnet_shapes(options)
        if training:
            return 4 * (8 * n_primary * 160 + 3 * 256 * (side - 8) ** 2 +
                        2 * side * side)
        return 4 * (3 * n_primary * 160 + 2 * 256 * (side - 8) ** 2 +
                    2 * side * side)
    return 4 * 3 * (256 + 256 + 128 + 1) * side * side


def memory_estimate(arch, options, batchsize, eval_batchsize, memory=None,
                    inference_share=0.25):
    """Rough bytes a training run needs (parameters with their gradients and
    Adam's two moments, one step's activations and one evaluation batch's,
    the latter at most ``inference_share`` of ``memory``: a larger one is
    evaluated in chunks), from the shapes alone: nothing is allocated."""
    side = options.get('input_size', 28)
    if arch.startswith('capsnet'):
        params, _ = _capsnet_shapes(options)
    else:
        params = 128 * side * side * 328 + 256 * 256 * 25 + 256 * 128 * 25
    evaluation = bytes_per_example(arch, options) // 2 * eval_batchsize
    if memory:
        evaluation = min(evaluation, int(memory * inference_share))
    return 16 * params + bytes_per_example(arch, options) * batchsize + \
        evaluation
