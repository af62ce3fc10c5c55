"""capsnet/errors.py: the library's typed errors, one line each, with the
exit status a tool gives them (2 for usage errors, as argparse's)."""
import pytest

from capsnet import cli
from capsnet.errors import CapsNetError, UsageError


def test_a_message_is_one_line_and_the_status_is_kept():
    error = CapsNetError('cannot write out/log:\n  disk   full', status=3)
    assert str(error) == 'cannot write out/log: disk full'
    assert error.status == 3
    assert CapsNetError('x').status == 1


def test_a_usage_error_is_a_capsnet_error_of_status_2():
    error = UsageError('argument --epoch: must be an integer > 0')
    assert isinstance(error, CapsNetError) and error.status == 2
    assert UsageError('x', status=1).status == 1


@pytest.mark.parametrize('error, status', [
    (CapsNetError('one\nline'), 1), (UsageError('bad flag'), 2)])
def test_run_main_prints_the_line_and_returns_the_status(error, status,
                                                         capsys):
    def main(argv):
        raise error
    assert cli.run_main(main, []) == status
    assert capsys.readouterr().err == 'error: {}\n'.format(error)
