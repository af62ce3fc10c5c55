"""cli.py and the convention every tool shares: one parser class, one
message shape for bad numbers, --device/-d (with --gpu/-g), and one line for
an unusable model file."""
import argparse

import pytest

from capsnet import cli
import evaluate
import experiments
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
