"""gpu_check.py: its CPU dry run goes through every step and writes the
summary; bad flags are one line."""
import json
import os
import subprocess
import sys

import pytest

from conftest import assert_one_error, needs_mnist, MNIST_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'gpu_check.py')]
                          + [str(a) for a in args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@needs_mnist
def test_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / 'check'
    result = run_check('--dry-run', '--data-dir', MNIST_DIR, '--out', out,
                       '--batchsizes', '8', '--budget-minutes', '10')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['dry_run'] and summary['device'] == '@numpy'
    steps = summary['steps']
    assert set(steps) == {'environment', 'benchmark-8', 'gpu_tests', 'train',
                          'evaluate', 'visualize'}
    assert all(step['status'] == 0 for step in steps.values()), steps
    assert 'passed' in steps['gpu_tests']['result']
    assert summary['environment']['chainer'] == '7.8.1'
    row = summary['benchmark']['8']
    assert row['train_samples_per_s'] > 0 and row['profile']['functions_ms']
    assert summary['training']['epochs_done'] == 1
    assert len(summary['training']['test_error_percent']) == 1
    report = (out / 'summary.md').read_text()
    assert '| 8 |' in report and '| epoch | seconds | test error % |' in report


@pytest.mark.parametrize('flags, fragment', [
    (['--batchsizes', '100,x'], '--batchsizes'),
    (['--batchsizes', '0'], '--batchsizes'),
    (['--budget-minutes', '0'], '--budget-minutes'),
    (['--max-epochs', '-1'], '--max-epochs'),
    (['--data-dir', '/nonexistent/mnist'], '--data-dir'),
])
def test_bad_flags_are_one_line(flags, fragment, tmp_path):
    args = ['--data-dir', str(tmp_path), '--out', str(tmp_path / 'o')]
    result = run_check(*(args + flags))
    assert_one_error(result, fragment, status=2)
