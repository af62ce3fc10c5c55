"""The baseline CNN of "Dynamic Routing Between Capsules" (Section 5).

The paper: "The baseline is a standard CNN with three convolutional layers
of 256, 256, 128 channels. Each has 5x5 kernels and stride of 1. The last
convolutional layers are followed by two fully connected layers of size
328, 192. The last fully connected layer is connected with dropout to a 10
class softmax layer with cross entropy loss." and "In terms of number of
parameters the baseline has 35.4M compared to 8.2M of CapsNet".

This module imports Chainer and ``fast_ops`` (not ``nets``), because ``nets``
imports it to register the network as ``nets.ARCHITECTURES['baseline']``.
"""
import contextlib

import numpy

import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
import chainer.functions as F
import chainer.links as L
from chainer import reporter

import fast_ops

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
            (valid: the side shrinks by 4 per convolution); the MultiMNIST
            baseline (nets.TwoDigitBaselineCNN) uses 0.
        n_classes: size of the softmax layer.
        dropout: dropout ratio before the softmax layer (0 disables it).
        fast: use the fast CPU kernels of ``fast_ops`` (None: on the CPU).
            Not part of the architecture and not saved.
    """

    arch = 'baseline'

    def __init__(self, input_size=28, n_classes=10, dropout=0.5, fast=None,
                 pad=PAD):
        super().__init__()
        self.fast = fast
        self.pad = int(pad)
        if input_size < 1:
            raise ValueError('input_size must be >= 1, got {}'
                             .format(input_size))
        if not 0 <= dropout < 1:
            raise ValueError('dropout must be in [0, 1), got {}'
                             .format(dropout))
        side = input_size + 3 * (2 * self.pad - KERNEL + 1)
        if side < 1:
            raise ValueError('input_size {} is too small for unpadded '
                             'convolutions'.format(input_size))
        self.options = dict(input_size=int(input_size),
                            n_classes=int(n_classes), dropout=float(dropout))
        self.input_size = int(input_size)
        self.n_classes = int(n_classes)
        self.dropout = float(dropout)
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

    def inference(self):
        """Context for inference over many batches with fixed weights."""
        if self._use_fast():
            return fast_ops.fixed_weights()
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
            h = F.relu(fast_ops.conv2d_hwbc(h, conv.W, conv.b,
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
        chainer.Chain.__init__(self)
        if input_size < 4:
            raise ValueError('input_size must be >= 4, got {}'
                             .format(input_size))
        if not 0 <= dropout < 1:
            raise ValueError('dropout must be in [0, 1), got {}'
                             .format(dropout))
        self.fast = fast
        self.pad = PAD
        self.options = dict(input_size=int(input_size),
                            n_classes=int(n_classes), dropout=float(dropout))
        self.input_size = int(input_size)
        self.n_classes = int(n_classes)
        self.dropout = float(dropout)
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
            h = F.relu(fast_ops.conv2d_hwbc(h, conv.W, conv.b,
                                            method=method))
            if pool:
                height, width, _, channels = h.shape
                h = F.max(F.reshape(h, (height // 2, 2, width // 2, 2,
                                        batch, channels)), axis=(1, 3))
        return F.transpose(h, (2, 3, 0, 1))
