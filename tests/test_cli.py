"""cli.py and the convention every tool shares: one parser class, one
message shape for bad numbers, --device/-d (with --gpu/-g), and one line for
an unusable model file."""
import argparse

import pytest

from capsnet import cli
import evaluate
import experiments
import export
import predict
import train
import visualize
from conftest import one_error_line

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


@pytest.mark.parametrize('tool', ['visualize.py', 'evaluate.py',
                                  'predict.py'])
@pytest.mark.parametrize('content', [None, b'', b'not a model', 'half'],
                         ids=['missing', 'empty', 'garbage', 'truncated'])
def test_an_unusable_model_file_is_one_line(
        tool, content, tmp_path, fresh_model_path, run_tool):
    path = tmp_path / 'model.npz'
    if content == 'half':
        data = open(fresh_model_path, 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    main = {'visualize.py': visualize.main, 'evaluate.py': evaluate.main,
            'predict.py': predict.main}[tool]
    argv = ['--load', path]
    argv += [tmp_path / 'x.png'] if tool == 'predict.py' else [
        '--data-dir', tmp_path, '--out', tmp_path / 'out']
    status, out, err = run_tool(main, argv)
    assert status == (2 if tool == 'predict.py' else 1)
    assert out == ''
    assert str(path) in one_error_line(err)
    assert not (tmp_path / 'out').exists()


class CUDARuntimeError(RuntimeError):
    """Named as CuPy's; its text is what cupy raises."""


@pytest.mark.parametrize('text', [
    'cudaErrorInsufficientDriver: CUDA driver version is insufficient for '
    'CUDA runtime version',
    'cudaErrorNoDevice: no CUDA-capable device is detected'])
def test_no_gpu_at_all_is_said_instead_of_a_driver_update(text,
                                                          monkeypatch):
    from capsnet import devices
    error = CUDARuntimeError(text)
    line = devices.device_failure('@cupy:0', error, gpu_present=False)
    assert line.startswith('cannot use device @cupy:0: ' + text + '; ')
    assert 'no NVIDIA GPU found' in line and '-d @numpy' in line
    assert 'driver' not in line.rpartition('; ')[2]
    # with a GPU device file, the driver is to blame
    assert 'install an NVIDIA driver' in devices.device_failure(
        '@cupy:0', error, gpu_present=True)
    # by default it looks for /dev/nvidia*
    monkeypatch.setattr(devices.glob, 'glob', lambda pattern: [])
    assert 'no NVIDIA GPU found' in devices.device_failure('@cupy:0', error)
    monkeypatch.setattr(devices.glob, 'glob',
                        lambda pattern: ['/dev/nvidia0'])
    assert 'install an NVIDIA driver' in devices.device_failure('@cupy:0',
                                                                error)
