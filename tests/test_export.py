"""export.py: the conftest's fresh CapsNet exported to ONNX and run with
ONNX Runtime matches model.predict; errors are one line."""
import sys

import numpy
import pytest

import nets  # noqa: F401  (first: capsnet.compat before chainer)
import export
from capsnet import files
from capsnet import onnx_export
from conftest import one_error_line

RTOL, ATOL = 1e-4, 1e-5


def digits(n=8, seed=0):
    """(n, 1, 28, 28) float32 stand-ins for MNIST digits: blurred strokes
    in [0, 1] (no MNIST needed)."""
    rng = numpy.random.RandomState(seed)
    x = numpy.zeros((n, 1, 28, 28), numpy.float32)
    for k in range(n):
        top, left = rng.randint(4, 12, 2)
        x[k, 0, top:top + 12, left:left + 4] = 1
        x[k, 0, top:top + 3, left:left + 12] = rng.rand()
    return x


def test_export_runs_in_onnx_runtime_like_the_model(tmp_path,
                                                   fresh_model_path,
                                                   run_tool):
    pytest.importorskip('onnx', reason='export.py needs the onnx package')
    ort = pytest.importorskip(
        'onnxruntime', reason='onnxruntime is not installed (pip install '
                              'onnxruntime, requirements-dev.txt)')
    out = tmp_path / 'model.onnx'
    status, stdout, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', out])
    assert status == 0, err
    assert 'wrote {}: x (batch, 1, 28, 28) -> lengths (batch, 10), v ' \
        '(batch, 10, 16), reconstruction (batch, 784), opset 17'.format(
            out) in stdout
    x = digits()
    session = ort.InferenceSession(str(out),
                                   providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {'x': x})))
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    predictions, lengths = model.predict(x)
    numpy.testing.assert_allclose(got['lengths'], lengths, rtol=RTOL,
                                  atol=ATOL)
    numpy.testing.assert_array_equal(got['lengths'].argmax(axis=1),
                                     predictions)
    assert got['reconstruction'].shape == (len(x), 784)


def test_no_decoder_and_opset(tmp_path, fresh_model_path, run_tool):
    onnx = pytest.importorskip('onnx', reason='needs the onnx package')
    out = tmp_path / 'lengths.onnx'
    status, _, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', out, '--no-decoder',
        '--opset', '13'])
    assert status == 0, err
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == ['lengths', 'v']
    assert proto.opset_import[0].version == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lengths.onnx']


def test_a_baseline_model_is_one_line(tmp_path, small_baseline_path,
                                      run_tool):
    pytest.importorskip('onnx', reason='needs the onnx package')
    status, out, err = run_tool(export.main, [
        '--load', small_baseline_path, '--onnx', tmp_path / 'm.onnx'])
    assert status == 1 and out == ''
    line = one_error_line(err)
    assert 'not a CapsNet' in line and 'export.py' in line
    assert not (tmp_path / 'm.onnx').exists()


def test_missing_onnx_says_pip_install(tmp_path, fresh_model_path,
                                       run_tool, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnx', None)   # import onnx fails
    status, _, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', tmp_path / 'm.onnx'])
    assert status == 1
    assert 'pip install onnx' in one_error_line(err)
    assert not (tmp_path / 'm.onnx').exists()


def test_unwritable_output_is_one_line(tmp_path, fresh_model_path,
                                       run_tool):
    pytest.importorskip('onnx', reason='needs the onnx package')
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    status, _, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', blocker / 'm.onnx'])
    assert status == 1
    assert '--onnx' in one_error_line(err)
    status, _, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', tmp_path])
    assert status == 2
    assert 'is a folder' in one_error_line(err)


def test_bad_flags_are_usage_errors(tmp_path, fresh_model_path, run_tool):
    pytest.importorskip('onnx', reason='needs the onnx package')
    status, _, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', tmp_path / 'm.onnx',
        '--opset', '12'])
    assert status == 2
    assert "--opset: must be an integer >= {}, got '12'".format(
        onnx_export.MIN_OPSET) in one_error_line(err)
    status, _, err = run_tool(export.main, [
        '--load', fresh_model_path, '--onnx', tmp_path / 'm.onnx',
        '--opset', '999'])
    assert status == 1
    assert 'opset must be in' in one_error_line(err)
    status, _, err = run_tool(export.main, ['--load', fresh_model_path])
    assert status == 2
    assert '--onnx' in one_error_line(err)
