"""capsnet/cli.py and the convention every tool shares: one parser class,
one message shape for bad numbers, --device/-d (with --gpu/-g), --out that
is a file; run_main's one line for a full disk, no memory, Ctrl-C and
SIGTERM (while importing and at work, leaving no temporary file)."""
import argparse
import errno
import os
import subprocess
import sys

import numpy
import pytest

from capsnet import cli, files
import evaluate
import experiments
import export
import nets
import predict
import train
import visualize
from conftest import (REPO, assert_one_error, leftovers_below, needs_mnist,
                      one_error_line, run_script)
from conftest import MNIST_DIR as MNIST

PARSERS = {
    'train.py': (train.build_parser, []),
    'visualize.py': (visualize.build_parser, ['--load', 'm']),
    'evaluate.py': (evaluate.build_parser, ['--load', 'm']),
    'predict.py': (predict.build_parser, ['--load', 'm', 'x.png']),
    'experiments.py': (experiments.build_parser,
                       ['table1', '--epoch', '1', '--out', 'o']),
}

# every tool, for the help tests (export.py has no device flags)
TOOLS = dict(PARSERS, **{'export.py': (export.build_parser,
                                       ['--load', 'm', '--onnx', 'o'])})


@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_help_shows_the_defaults_that_mean_something(tool):
    build, required = TOOLS[tool]
    parser = build()
    parsers = [parser]
    if tool == 'experiments.py':
        parsers += list(parser._subparsers._group_actions[0].choices
                        .values())
    for p in parsers:
        text = ' '.join(p.format_help().split())
        for bad in ('default: None', 'default: False', 'default: True',
                    'default: []'):
            assert bad not in text, (tool, p.prog, bad)
        for action in p._actions:
            default = action.default
            if not action.option_strings or default is None or \
                    isinstance(default, bool) or default == '' or \
                    default == argparse.SUPPRESS:
                continue
            help_text = ' '.join(
                p._get_formatter()._expand_help(action).split())
            assert 'default' in help_text.lower(), (p.prog, action.dest)
            if 'default' not in (action.help or '').lower():
                assert '(default: {})'.format(default) in help_text


def test_the_help_formatter_leaves_out_empty_defaults():
    parser = cli.ArgumentParser(prog='tool')
    parser.add_argument('--rate', type=float, default=0.25, help='a rate')
    parser.add_argument('--name', default=None, help='a name')
    parser.add_argument('--flag', action='store_true', help='a flag')
    parser.add_argument('--size', default=8, help='a size (default 8)')
    parser.add_argument('--count', default=3, help='a count')
    parser.add_argument('files', nargs='*', help='files')
    text = ' '.join(parser.format_help().split())
    assert '--rate RATE a rate (default: 0.25)' in text
    assert '--name NAME a name --flag a flag' in text
    assert 'a size (default 8) --count COUNT a count (default: 3)' in text
    assert text.count('default') == 3


class FakeTerminal:
    def isatty(self):
        return True


class Broken:
    def isatty(self):
        raise ValueError('I/O operation on closed file')


@pytest.mark.parametrize('stream, expected', [
    (FakeTerminal(), True), (Broken(), False), (object(), False)])
def test_interactive_is_true_only_on_a_terminal(stream, expected):
    assert cli.interactive(stream) is expected


def test_interactive_defaults_to_stdout(monkeypatch):
    import io
    import sys
    monkeypatch.setattr(sys, 'stdout', io.StringIO())
    assert cli.interactive() is False
    monkeypatch.setattr(sys, 'stdout', FakeTerminal())
    assert cli.interactive() is True


@pytest.mark.parametrize('parse, text, what', [
    (cli.positive_int, '0', 'an integer > 0'),
    (cli.positive_int, 'abc', 'an integer > 0'),
    (cli.positive_int, '1.5', 'an integer > 0'),
    (cli.non_negative_int, '-1', 'an integer >= 0'),
    (cli.integer, 'x', 'an integer'),
    (cli.int_at_least(28), '27', 'an integer >= 28'),
    (cli.number, 'nan', 'a number'),
    (cli.positive_float, '0', 'a number > 0'),
    (cli.positive_float, 'inf', 'a number > 0'),
    (cli.non_negative_float, '-0.5', 'a number >= 0'),
    (cli.fraction, '1.5', 'a number in (0, 1]'),
    (cli.fraction, 'rate', 'a number in (0, 1]'),
    (predict.threshold_value, '1', 'a number in [0, 1)'),
])
def test_a_bad_number_has_one_message_shape(parse, text, what):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value) == 'must be {}, got {!r}'.format(what, text)


@pytest.mark.parametrize('parse, text, value', [
    (cli.positive_int, '3', 3), (cli.non_negative_int, '0', 0),
    (cli.integer, '-2', -2), (cli.int_at_least(28), '28', 28),
    (cli.number, '-0.5', -0.5), (cli.fraction, '1', 1.0),
    (predict.threshold_value, '0', 0.0)])
def test_a_good_number_is_converted(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize('tool', sorted(PARSERS))
@pytest.mark.parametrize('flags, spec', [
    ([], '@numpy'),
    (['-d', '@cupy:1'], '@cupy:1'), (['--device', '@numpy'], '@numpy'),
    (['-d', '2'], '@cupy:2'), (['--device', '-1'], '@numpy'),
    (['-g', '0'], '@cupy:0'), (['--gpu', '-1'], '@numpy'),
])
def test_every_tool_takes_device_and_the_old_gpu_flag(tool, flags, spec):
    build, required = PARSERS[tool]
    parser = build()
    assert isinstance(parser, cli.ArgumentParser)
    args = parser.parse_args(required + flags)
    assert cli.device_spec(args.device) == spec


@pytest.mark.parametrize('tool', sorted(PARSERS))
def test_the_same_things_have_the_same_flags(tool):
    build, _ = PARSERS[tool]
    parser = build()
    if tool == 'experiments.py':  # its flags are those of 'table1'
        parser = parser._subparsers._group_actions[0].choices['table1']
    names = {option: action.option_strings
             for action in parser._actions for option in action.option_strings}
    assert names['--device'] == ['--device', '-d']
    assert names['--gpu'] == ['--gpu', '-g']
    for flag, spelling in (('--batchsize', ['--batchsize', '-b']),
                           ('--out', ['--out', '-o']),
                           ('--epoch', ['--epoch', '--epochs', '-e'])):
        if flag in names:
            assert names[flag] == spelling, tool
    assert '--epochs' not in names or '--epoch' in names


def test_old_spellings_still_parse():
    args = train.build_parser().parse_args(
        ['--epochs', '4', '--recon', '-g', '1'])
    assert (args.epoch, args.reconstruct, args.device) == (4, True,
                                                           '@cupy:1')
    args = experiments.build_parser().parse_args(
        ['table1', '--epochs', '4', '--out', 'o', '-g', '0'])
    assert (args.epoch, args.device) == (4, '@cupy:0')


def test_run_main_maps_enospc_to_one_line(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, 'No space left on device', 'out/log')
    assert cli.run_main(main) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'no space left on the disk while writing out/log' in line


SIGNALS = [('INT', 130), ('TERM', 143)]


SIGNAL_TOOLS = ['train.py', 'visualize.py', 'evaluate.py', 'predict.py',
         'experiments.py', 'dev/benchmark.py', 'dev/gpu_check.py']


def interrupt(point, signame, tool, *argv):
    """Run ``tool`` under tests/interrupt_at.py, which sends it SIGsigname
    at ``point``; the finished process."""
    return subprocess.run(
        [sys.executable, os.path.join('tests', 'interrupt_at.py'), point,
         signame, tool, *[str(a) for a in argv]], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))


@pytest.mark.parametrize('signame, status', SIGNALS)
@pytest.mark.parametrize('tool', SIGNAL_TOOLS)
def test_a_signal_while_a_tool_imports_is_one_line(tool, signame, status):
    """Ctrl-C or SIGTERM while the tool is still importing (NumPy for most;
    benchmark.py and gpu_check.py import only the standard library at the
    top, so json there): one line and 130 / 143, not a traceback (nor a
    silent death by SIGTERM)."""
    module = 'json' if tool in ('dev/benchmark.py', 'dev/gpu_check.py') else \
        'numpy'
    result = interrupt('import:' + module, signame, tool, '--help')
    assert result.returncode == status, result.stderr
    assert one_error_line(result.stderr) == 'error: interrupted'
    assert result.stdout == ''


@pytest.fixture(scope='module')
def multimnist_model_path(tmp_path_factory):
    state = numpy.random.get_state()
    numpy.random.seed(0)
    path = str(tmp_path_factory.mktemp('models') / 'two.npz')
    files.save_model(path, nets.TwoDigitCapsNet())
    numpy.random.set_state(state)
    return path


EXPERIMENTS_INTERRUPTED = ('error: interrupted; run the same command again '
                           'to continue the sweep')


# (tool and its flags, where the signal comes, the message, files that an
# uninterrupted run writes into OUT and this one must not)
SIGNAL_POINTS = {
    'evaluate': (['evaluate.py', '--test-size', '20'], 'write',
                 'error: interrupted', ['confusion.png', 'evaluation.json']),
    'visualize': (['visualize.py'], 'write', 'error: interrupted',
                  ['vis.png']),
    'benchmark': (['dev/benchmark.py', '-b', '2', '--repeats', '1', '--warmup',
                   '0'], 'call:chainer.optimizers:Adam.update',
                  'error: interrupted', []),
    'multimnist': (['experiments.py', 'multimnist', '--epoch', '1',
                    '--train-digits', '30', '--pairs-per-digit', '2',
                    '--test-digits', '20', '--test-pairs-per-digit', '1',
                    '--rows', 'capsnet', '--batchsize', '20'], 'write',
                   EXPERIMENTS_INTERRUPTED,
                   ['capsnet-trial0/final.json', 'results.json']),
    'affnist': (['experiments.py', 'affnist', '--epoch', '1',
                 '--train-size', '20', '--test-size', '10', '--rows',
                 'capsnet', '--batchsize', '10'],
                'call:chainer.optimizers:Adam.update',
                EXPERIMENTS_INTERRUPTED, ['capsnet-trial0/final.json']),
    'figure5': (['experiments.py', 'figure5', '--test-digits', '30'],
                'write', EXPERIMENTS_INTERRUPTED, ['figure5.json']),
}


@needs_mnist
@pytest.mark.parametrize('signame, status', SIGNALS)
@pytest.mark.parametrize('case', sorted(SIGNAL_POINTS))
def test_a_signal_at_work_is_one_line_and_leaves_no_temp_files(
        tmp_path, fresh_model_path, multimnist_model_path, case, signame,
        status):
    """SIGINT / SIGTERM sent at a chosen point of each tool's work (in the
    middle of its first atomic write, or in a training step): one line,
    130 / 143, no temporary file or lock left, nothing half-written."""
    argv, point, message, not_written = SIGNAL_POINTS[case]
    out = tmp_path / 'out'
    if case != 'benchmark':
        argv = argv + ['--out', out, '--data-dir', MNIST]
    if case in ('evaluate', 'visualize'):
        argv += ['--load', fresh_model_path]
    elif case == 'figure5':
        argv += ['--load', multimnist_model_path]
    result = interrupt(point, signame, *argv)
    assert result.returncode == status, result.stderr
    assert one_error_line(result.stderr) == message
    assert leftovers_below(tmp_path) == []
    for name in not_written:
        assert not (out / name).exists(), name


@pytest.mark.parametrize('argv', [
    ['train.py', '--no-progress'], ['evaluate.py', '--load', 'M'],
    ['visualize.py', '--load', 'M'],
    ['experiments.py', 'table1', '--epoch', '1', '--rows', 'r1'],
    ['dev/gpu_check.py', '--dry-run', '--data-dir', '.']],
    ids=['train', 'evaluate', 'visualize', 'experiments', 'gpu_check'])
def test_out_that_is_a_file(blocker, fresh_model_path, argv):
    """It said '(File exists)'; gpu_check.py printed a traceback."""
    argv = [fresh_model_path if a == 'M' else a for a in argv]
    assert_one_error(run_script(*argv, '--out', blocker), 'cannot write to {}: it '
                     'is a file, not a folder; choose another --out'.format(
                         blocker), status=1)
    assert blocker.read_text() == 'keep me'


def test_running_out_of_memory_is_one_line(capsys):
    """benchmark.py -b 1000000000 printed NumPy's MemoryError traceback;
    any tool under cli.run_main now says it in one line."""
    from capsnet import cli

    def main(argv):
        raise MemoryError('Unable to allocate 5.70 TiB for an array')
    assert cli.run_main(main) == 1
    err = capsys.readouterr().err
    assert err == ('error: out of memory (Unable to allocate 5.70 TiB for an '
                   'array); use smaller batches (--batchsize/-b, '
                   '--eval-batchsize) or a smaller --input-size\n')
