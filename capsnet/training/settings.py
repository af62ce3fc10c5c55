"""Every training setting, named once: type, default, help, and what it is.

``Settings`` is the one list. The parser (``add_arguments``), the resume
check (``recorded()``: a snapshot made with other training settings is
refused), the model's options (``model_options()``), ``final.json``
(``record()``) and the experiments' rows (``Settings(**row)``) are derived
from it; adding a training flag is adding one field here.

Kinds:
- 'model': the network's options (saved in model files and snapshots);
- 'training': what a run's result depends on besides the network; a resume
  with other values is refused;
- 'run': how and where this run goes (epochs, paths, device-side choices):
  free to change between a run and its resume.

Recipes: ``recipe`` picks the defaults of the settings left unset
(``RECIPE_SETTINGS``; the model's side of a recipe is ``nets.RECIPES``).
"""
import argparse
import dataclasses
from typing import Optional

from capsnet import cli
from capsnet.data import mnist
from capsnet.errors import UsageError
from capsnet.training import distributed

# The training side of each recipe; a flag given on the command line wins.
# 'official' follows the authors' experiment.py: train() reads batches of
# 128, and default_hparams() with models/model.py decay Adam's 1e-3 by
# 0.96 ** (step / 2000), with no floor.
RECIPE_SETTINGS = {
    'paper': dict(batchsize=100, decay=0.95, decay_steps=None,
                  alpha_floor=1e-5),
    'official': dict(batchsize=128, decay=0.96, decay_steps=2000,
                     alpha_floor=0.0),
}
# set by the recipe when not given: the field's default is None
FROM_RECIPE = frozenset(RECIPE_SETTINGS['paper'])


def setting(default, help, flags=(), kind='training', type=None,
            choices=None, action=None):
    """A dataclass field with what the parser needs in its metadata."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, flags=tuple(flags), kind=kind, type=type,
        choices=choices, action=action))


@dataclasses.dataclass
class Settings:
    """One training run's settings (train.py's flags, the experiments'
    rows). Defaults are the paper's MNIST run."""

    # -- the network (model options) --------------------------------------
    arch: str = setting('capsnet', 'network to train', kind='model')
    routing: int = setting(3, 'routing iterations r (-r is --resume, as '
                           'in Chainer)', kind='model',
                           type=cli.positive_int)
    reconstruct: bool = setting(
        False, 'add the decoder and its 0.0005-scaled reconstruction loss',
        ('--reconstruct', '--recon'), kind='model', action='store_true')
    activation: str = setting('relu', 'Conv1 activation', kind='model',
                              choices=('relu', 'leaky_relu'))
    leaky_slope: float = setting(0.01, 'slope of leaky_relu below 0',
                                 kind='model', type=cli.number_in(-1, 1))
    share_weights: bool = setting(
        False, 'share W_ij over the 6x6 grid (the older implementation)',
        kind='model', action='store_true')
    input_size: int = setting(
        mnist.IMAGE_SIZE, 'side of the (zero-padded) input images',
        kind='model', type=cli.int_at_least(mnist.IMAGE_SIZE))

    # -- what the result depends on (a resume must match) -----------------
    recipe: str = setting(
        'paper', "paper: the paper as written; official: the authors' "
        'released code (loss scaling, learning-rate schedule and batch, '
        'initialisation and biases; docs/model.md)',
        choices=tuple(sorted(RECIPE_SETTINGS)))
    batchsize: Optional[int] = setting(
        None, 'examples per training step (paper recipe: 100, official: '
        '128)', ('--batchsize', '-b'), type=cli.positive_int)
    seed: int = setting(0, 'seed of the initialisation, the shuffling and '
                        'the shifts', ('--seed', '-s'), type=cli.seed)
    alpha: float = setting(1e-3, "Adam's learning rate",
                           type=cli.positive_float)
    decay: Optional[float] = setting(
        None, "factor of Adam's alpha per epoch, or per --decay-steps steps "
        '(1: constant; paper recipe: 0.95 per epoch, official: 0.96 per '
        '2000 steps)', type=cli.fraction)
    decay_steps: Optional[int] = setting(
        None, 'decay alpha continuously, by --decay every this many steps '
        "(the authors' schedule), instead of once per epoch",
        type=cli.positive_int)
    alpha_floor: Optional[float] = setting(
        None, 'alpha never decays below this (paper recipe: 1e-5, '
        'official: 0)', type=cli.non_negative_float)
    dataset: str = setting('mnist', 'which dataset (its test set for the '
                           'evaluation)', choices=tuple(mnist.dataset_names()))
    train_size: Optional[int] = setting(
        None, 'use the first N training examples (default: all)',
        type=cli.positive_int)
    test_size: Optional[int] = setting(
        None, 'use the first N test examples (default: all)',
        type=cli.positive_int)
    validation: int = setting(
        0, 'hold out the last N training examples to choose a best model',
        type=cli.non_negative_int)
    max_shift: int = setting(
        2, 'training images are shifted by up to this many pixels',
        type=cli.non_negative_int)

    # -- this run: length, paths, device-side choices ---------------------
    epoch: int = setting(30, 'epochs to train', ('--epoch', '--epochs', '-e'),
                         kind='run', type=cli.positive_int)
    out: str = setting('result', 'folder for the log, plots, snapshots, '
                       'final.json and the model', ('--out', '-o'),
                       kind='run')
    save: Optional[str] = setting(
        None, 'write the trained model to this file instead of '
        'OUT/model.npz', kind='run')
    resume: Optional[str] = setting(
        None, 'continue from this snapshot (a snapshot_epoch_N in --out)',
        ('--resume', '-r'), kind='run')
    autoload: bool = setting(
        False, 'continue from the newest snapshot in --out, if any',
        kind='run', action='store_true')
    data_dir: Optional[str] = setting(
        None, 'read the four *-ubyte.gz files from here (default: '
        '$CAPSNET_DATA, else the remembered folder, else a download)',
        kind='run')
    impl: str = setting(
        'auto', 'fast kernels (capsnet.kernels: every layer on the CPU, all '
        'but the convolutions on the GPU) or stock Chainer functions '
        '(plain); auto: fast, except for the baseline on the GPU',
        kind='run', choices=('auto', 'fast', 'plain'))
    gpu_kernels: bool = setting(
        False, "on the GPU, squash, the routing's softmax and its "
        'contractions with u_hat through CuPy kernels (off until timed on '
        'a GPU; no effect on the CPU)', kind='run', action='store_true')
    gpu_convolutions: bool = setting(
        False, "on the GPU, the convolutions through the NCHW node instead "
        "of Chainer's (off until timed on a GPU; no effect on the CPU)",
        kind='run', action='store_true')
    cuda_graph: bool = setting(
        False, 'the static training step (same buffers every step, the '
        "schedule and Adam's bias correction from a step counter on the "
        'device, sums on the device) and, on a GPU, the whole step captured '
        'as one CUDA graph and replayed (docs/gpu.md; not yet run on a GPU)',
        kind='run', action='store_true')
    eval_batchsize: int = setting(200, 'examples per evaluation step',
                                  kind='run', type=cli.positive_int)
    snapshot_keep: int = setting(2, 'how many epoch snapshots to keep',
                                 kind='run', type=cli.positive_int)
    snapshot_every: Optional[int] = setting(
        None, 'also snapshot every N steps (into snapshot_epoch_E, E the '
        'epochs completed), so that a long epoch resumes mid-way',
        kind='run', type=cli.positive_int)
    no_progress: bool = setting(
        False, 'no progress bar (a line per epoch is printed either way)',
        kind='run', action='store_true')
    communicator: Optional[str] = setting(
        None, 'data-parallel training with ChainerMN over MPI, launched as '
        'mpiexec -n N python train.py --communicator naive ...; -b is then '
        'the batch of each process (naive on the CPU; pure_nccl, flat, ... '
        'on GPUs, one per process)', kind='run',
        choices=tuple(distributed.COMMUNICATORS))
    device: str = setting('@numpy', 'see cli.add_device_arguments',
                          kind='device')

    # -- checks no single flag can make ------------------------------------

    def check(self):
        """UsageError for settings that do not go together."""
        gpu_pieces = [flag for flag, on in (
            ('--gpu-kernels', self.gpu_kernels),
            ('--gpu-convolutions', self.gpu_convolutions)) if on]
        if gpu_pieces and (self.impl == 'plain' or
                           not self.arch.startswith('capsnet')):
            raise UsageError('{}: for the CapsNet fast path on the GPU; '
                             'leave {} out with --impl plain or a CNN '
                             '--arch'.format(' and '.join(gpu_pieces),
                                             'them' if len(gpu_pieces) > 1
                                             else 'it'))
        if self.cuda_graph and (self.communicator or
                                not self.arch.startswith('capsnet')):
            raise UsageError('--cuda-graph: for a CapsNet in one process; '
                             'leave it out with --communicator or a CNN '
                             "--arch (a captured step would freeze the "
                             "CNN's dropout masks)")
        if self.max_shift >= self.input_size:
            raise UsageError('argument --max-shift: must be an integer below '
                             '--input-size ({}), got {!r}'.format(
                                 self.input_size, str(self.max_shift)))
        if self.save is not None and not self.save.strip():
            raise UsageError('argument --save: needs a file name, got an '
                             'empty one (leave the flag out for '
                             'OUT/model.npz)')

    def check_device(self, device):
        """UsageError for settings the chosen device cannot run."""
        if self.impl == 'fast' and self.arch == 'baseline' and \
                device.xp.__name__ != 'numpy':
            raise UsageError("--impl fast: the baseline's fast kernels are "
                             'CPU-only; use --impl auto or plain on the GPU')

    # -- derived views ----------------------------------------------------

    @classmethod
    def fields_of(cls, kind):
        return [f for f in dataclasses.fields(cls)
                if f.metadata['kind'] == kind]

    def model_options(self):
        """The network's options (``nets.build(arch, recipe, **these)``);
        a CNN takes the input size alone."""
        if self.arch != 'capsnet':
            return dict(input_size=self.input_size)
        return {f.name: getattr(self, f.name)
                for f in self.fields_of('model') if f.name != 'arch'}

    def recorded(self):
        """The settings a snapshot fixes besides the network: resuming with
        others is refused."""
        return {f.name: getattr(self, f.name)
                for f in self.fields_of('training')}

    def record(self):
        """Every setting, for final.json."""
        return dataclasses.asdict(self)

    def resolved(self):
        """A copy with the settings left unset filled from the recipe."""
        chosen = RECIPE_SETTINGS[self.recipe]
        return dataclasses.replace(self, **{
            key: chosen[key] for key in FROM_RECIPE
            if getattr(self, key) is None and chosen[key] is not None})

    # -- the command line -------------------------------------------------

    @classmethod
    def add_arguments(cls, parser, arch_choices):
        """Every setting as a flag of ``parser`` (the device's through
        cli.add_device_arguments, the convention every tool shares)."""
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta['kind'] == 'device':
                cli.add_device_arguments(parser)
                continue
            flags = meta['flags'] or ('--' + f.name.replace('_', '-'),)
            options = dict(help=meta['help'], dest=f.name)
            if meta['action']:
                options.update(action=meta['action'])
            else:
                options.update(type=meta['type'], default=f.default)
                choices = arch_choices if f.name == 'arch' else \
                    meta['choices']
                if choices:
                    options['choices'] = list(choices)
            parser.add_argument(*flags, **options)

    @classmethod
    def from_args(cls, args):
        """Settings from parsed flags, the recipe's defaults filled in."""
        values = vars(args) if isinstance(args, argparse.Namespace) else args
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items()
                      if k in names}).resolved()
