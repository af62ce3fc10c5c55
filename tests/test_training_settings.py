"""capsnet/training/settings.py: every training setting named once; the
parser, the recipes' defaults, the kinds (model options, what a resume
must match, this run's choices), final.json's record and the checks no
single flag can make are derived from it."""
import dataclasses

import pytest

from capsnet import cli
from capsnet.errors import UsageError
from capsnet.training.settings import FROM_RECIPE, RECIPE_SETTINGS, Settings


def parse(*argv):
    parser = cli.ArgumentParser()
    Settings.add_arguments(parser, ['capsnet', 'baseline'])
    return Settings.from_args(parser.parse_args(list(argv)))


def test_every_setting_is_a_flag_with_its_default():
    settings = parse()
    assert settings == Settings().resolved()
    assert (settings.epoch, settings.seed, settings.out) == (30, 0, 'result')
    parsed = parse('-e', '3', '-b', '7', '--routing', '1', '--recon',
                   '-o', 'o', '-s', '5', '-r', 'snap', '-d', '@numpy')
    assert (parsed.epoch, parsed.batchsize, parsed.routing,
            parsed.reconstruct, parsed.out, parsed.seed, parsed.resume,
            parsed.device) == (3, 7, 1, True, 'o', 5, 'snap', '@numpy')


@pytest.mark.parametrize('recipe', sorted(RECIPE_SETTINGS))
def test_a_recipe_fills_what_is_not_given(recipe):
    settings = parse('--recipe', recipe)
    for key in FROM_RECIPE:
        if RECIPE_SETTINGS[recipe][key] is not None:
            assert getattr(settings, key) == RECIPE_SETTINGS[recipe][key]
    assert parse('--recipe', recipe, '-b', '3').batchsize == 3  # a flag wins
    assert parse('--recipe', recipe, '--decay', '1').decay == 1


def test_the_kinds_split_every_setting_once():
    names = [f.name for f in dataclasses.fields(Settings)]
    kinds = {kind: [f.name for f in Settings.fields_of(kind)]
             for kind in ('model', 'training', 'run', 'device')}
    assert sorted(sum(kinds.values(), [])) == sorted(names)
    assert {'routing', 'reconstruct', 'input_size'} <= set(kinds['model'])
    assert {'seed', 'batchsize', 'alpha', 'train_size'} <= set(
        kinds['training'])
    assert {'epoch', 'out', 'resume', 'autoload'} <= set(kinds['run'])


def test_model_options_recorded_settings_and_the_record():
    settings = parse('--routing', '1', '--seed', '3')
    assert settings.model_options()['routing'] == 1
    assert 'arch' not in settings.model_options()
    assert parse('--arch', 'baseline').model_options() == dict(
        input_size=28)
    assert settings.recorded()['seed'] == 3 and 'epoch' not in \
        settings.recorded()
    assert settings.record() == dataclasses.asdict(settings)


@pytest.mark.parametrize('argv, fragment', [
    (['--gpu-kernels', '--impl', 'plain'], '--gpu-kernels: for the CapsNet'),
    (['--max-shift', '28'], 'below --input-size (28)'),
    (['--save', ' '], 'argument --save: needs a file name'),
])
def test_settings_that_do_not_go_together_are_refused(argv, fragment):
    with pytest.raises(UsageError) as info:
        parse(*argv).check()
    assert fragment in str(info.value)
    parse().check()   # the defaults go together
