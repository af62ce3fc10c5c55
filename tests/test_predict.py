"""predict.py: MNIST-style preprocessing, per-file errors, JSON output.

Fixtures (mnist_dir, fresh_model_path, no_decoder_model_path, run_tool) are
in conftest.py.
"""
import json
import os
import signal

import numpy
import pytest
import scipy.ndimage
from PIL import Image

from capsnet import figures, files
from capsnet.data import mnist
import nets
import predict
from conftest import (Unchanged, assert_one_error, needs_mnist, needs_no_cupy,
                      one_error_line, run_script, start, tile_shape, wait_for)


def bar_image(height=100, width=60, value=1.0, background=0.0):
    """(100, 60) float: a thick bar, 60 x 15 px, off-centre (top left)."""
    image = numpy.full((height, width), background, numpy.float64)
    image[10:70, 5:20] = value
    return image


def bounding_box(image, threshold=0):
    rows = numpy.flatnonzero((image > threshold).any(axis=1))
    cols = numpy.flatnonzero((image > threshold).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def save_png(path, gray):
    """Save (H, W) values in [0, 1] as an 8-bit grayscale PNG."""
    Image.fromarray(numpy.round(numpy.asarray(gray) * 255).astype(
        numpy.uint8)).save(str(path))
    return str(path)


# -- preprocessing -----------------------------------------------------------

def test_an_off_centre_bar_is_scaled_to_20_px_and_centred():
    out = predict.preprocess(bar_image())
    assert out.shape == (28, 28) and out.dtype == numpy.float32
    assert out.min() >= 0 and out.max() <= 1
    h, w = bounding_box(out)
    assert max(h, w) == 20
    assert w == 5  # 60 x 15 keeps its aspect ratio
    cy, cx = scipy.ndimage.center_of_mass(out)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_dark_on_bright_is_inverted_automatically():
    white_on_black = predict.preprocess(bar_image())
    black_on_white = bar_image(value=0.0, background=1.0)
    assert predict.needs_inversion(black_on_white)
    assert not predict.needs_inversion(bar_image())
    numpy.testing.assert_allclose(predict.preprocess(black_on_white),
                                  white_on_black, atol=1e-6)
    numpy.testing.assert_allclose(
        predict.preprocess(black_on_white, invert='yes'), white_on_black,
        atol=1e-6)


def test_invert_no_keeps_the_polarity():
    kept = predict.preprocess(bar_image(value=0.0, background=1.0),
                              invert='no')
    # the bright background is taken as the "digit": a white block with
    # the dark bar in it, not the white bar of the inverted image
    assert kept.mean() > predict.preprocess(bar_image()).mean() * 2
    assert kept.max() == 1
    # and --invert yes on a white-on-black image makes that same block
    numpy.testing.assert_allclose(
        predict.preprocess(bar_image(), invert='yes'), kept, atol=1e-6)


def test_grey_noisy_paper_is_cleaned_to_a_black_background():
    rng = numpy.random.RandomState(0)
    photo = numpy.clip(0.8 + 0.04 * rng.randn(100, 60), 0, 1)
    photo[10:70, 5:20] = 0.1  # a dark bar on grey, noisy paper
    out = predict.preprocess(photo)
    assert max(bounding_box(out)) == 20 and bounding_box(out)[1] <= 6
    cy, cx = scipy.ndimage.center_of_mass(out)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_larger_model_input_is_padded_centred():
    small = predict.preprocess(bar_image())
    large = predict.preprocess(bar_image(), input_size=36)
    assert large.shape == (36, 36)
    numpy.testing.assert_array_equal(large[4:32, 4:32], small)
    assert large.sum() == pytest.approx(small.sum())


def test_blank_image_is_an_error():
    with pytest.raises(predict.ImageError, match='blank'):
        predict.preprocess(numpy.ones((30, 30)))
    with pytest.raises(predict.ImageError, match='blank'):
        predict.preprocess(numpy.zeros((30, 30)))


def test_transparent_canvas_with_dark_strokes(tmp_path):
    rgba = numpy.zeros((100, 60, 4), numpy.uint8)  # transparent black
    rgba[10:70, 5:20] = [0, 0, 0, 255]  # opaque black strokes
    path = tmp_path / 'drawn.png'
    Image.fromarray(rgba, 'RGBA').save(str(path))
    numpy.testing.assert_allclose(predict.load_image(str(path)),
                                  predict.preprocess(bar_image()), atol=1e-6)


def test_colour_jpeg_is_read_as_gray(tmp_path):
    rgb = numpy.zeros((100, 60, 3), numpy.uint8)
    rgb[10:70, 5:20] = [255, 255, 255]
    path = tmp_path / 'digit.jpg'
    Image.fromarray(rgb, 'RGB').save(str(path), quality=95)
    out = predict.load_image(str(path))
    assert out.shape == (28, 28)
    assert numpy.abs(out - predict.preprocess(bar_image())).mean() < 0.03


def test_mnist_test_images_round_trip_through_png(tmp_path, mnist_dir):
    _, _, test = mnist.get_mnist_like('mnist', data_dir=mnist_dir,
                                         test_size=20)
    x = mnist.to_arrays(test)[0][:, 0]
    exact = 0
    for i, image in enumerate(x):
        out = predict.load_image(save_png(tmp_path / '{}.png'.format(i),
                                          image))
        diff = numpy.abs(out - image).max()
        assert diff < 0.05, i
        exact += diff < 1e-6
    assert exact >= 15  # the others differ by a slight contrast stretch


# -- the tool ----------------------------------------------------------------

@pytest.fixture
def images(tmp_path, mnist_dir):
    """Two MNIST PNGs (one dark on bright) in tmp/digits, plus a text file,
    an empty file and the test arrays."""
    _, _, test = mnist.get_mnist_like('mnist', data_dir=mnist_dir,
                                         test_size=3)
    x = mnist.to_arrays(test)[0][:, 0]
    folder = tmp_path / 'digits'
    folder.mkdir()
    good = [save_png(folder / 'a.png', x[0]),
            save_png(folder / 'b.png', 1 - x[1])]
    (folder / 'notes.txt').write_text('not an image')
    text = tmp_path / 'text.png'
    text.write_text('hello, not a PNG')
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    return {'good': good, 'folder': str(folder), 'text': str(text),
            'empty': str(empty), 'x': x[:2]}


def test_json_lines_and_per_file_errors(images, fresh_model_path, run_tool):
    argv = ['--load', fresh_model_path, '--json', images['good'][0],
            images['text'], images['empty'], images['good'][1],
            images['text'] + '.missing']
    status, out, err = run_tool(predict.main, argv)
    assert status == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert [r['file'] for r in records] == argv[3:]
    for i in (0, 3):
        assert set(records[i]) == {'file', 'prediction', 'lengths'}
        assert isinstance(records[i]['prediction'], int)
        lengths = numpy.array(records[i]['lengths'])
        assert lengths.shape == (10,)
        assert ((0 <= lengths) & (lengths < 1)).all()
        assert records[i]['prediction'] == lengths.argmax()
    for i, reason in ((1, 'not an image'), (2, 'empty'),
                      (4, 'no such file')):
        assert set(records[i]) == {'file', 'error'}
        assert reason in records[i]['error']
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 3 and 'Traceback' not in err
    assert err_lines[0] == 'error: {}: {}'.format(images['text'],
                                                  records[1]['error'])


def test_predictions_match_the_model_on_the_preprocessed_images(
        images, fresh_model_path, run_tool):
    status, out, _ = run_tool(predict.main, [
        '--load', fresh_model_path, '--json', '--batchsize', '1',
        images['folder']])
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    # the folder's image files, sorted; notes.txt is skipped
    assert [os.path.basename(r['file']) for r in records] == ['a.png',
                                                             'b.png']
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    prediction, lengths = model.predict(images['x'][:, None])
    assert [r['prediction'] for r in records] == prediction.tolist()
    numpy.testing.assert_allclose([r['lengths'] for r in records], lengths,
                                  rtol=1e-4, atol=1e-6)


def test_text_output_has_the_class_and_ten_lengths(images, fresh_model_path,
                                                    run_tool):
    status, out, err = run_tool(predict.main, [
        '--load', fresh_model_path] + images['good'])
    assert status == 0 and err == ''
    lines = out.splitlines()
    assert len(lines) == 2
    for path, line in zip(images['good'], lines):
        name, rest = line.split(': ', 1)
        assert name == path
        fields = rest.split()
        assert fields[0].isdigit() and fields[1] == 'lengths'
        assert len(fields) == 12


def test_reconstruct_writes_input_beside_reconstruction(
        tmp_path, images, fresh_model_path, run_tool):
    out_png = tmp_path / 'recon.png'
    status, _, err = run_tool(predict.main, [
        '--load', fresh_model_path, '--reconstruct', out_png,
        images['good'][0], images['text'], images['good'][1]])
    assert status == 1
    assert err.count('error: ') == 1
    png = numpy.asarray(Image.open(str(out_png)).convert('RGB'))
    # the same figure drawn here: its layout, and the inputs' pixels
    inputs = [predict.load_image(path) for path in images['good']]
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    predicted, _ = model.predict(numpy.stack(inputs)[:, None])
    shown = [(path, p, x, x) for path, p, x in zip(images['good'],
                                                   predicted, inputs)]
    figure, layout = predict.reconstruction_figure(shown, fresh_model_path)
    assert png.shape[:2] == (layout.height, layout.width)
    scale = figures.SCALE
    assert layout.mosaic[2:] == tile_shape(2, 2, 28 * scale,
                                           figures.border_px(scale))
    for row, x in enumerate(inputs):
        top, left, bottom, right = layout.tile_box(row, 0)
        numpy.testing.assert_array_equal(
            png[top:bottom, left:right, 0],
            numpy.round(255 * figures.upscale(x[None], scale)[0]))
    texts = figures.figure_texts(figure)
    assert 'input' in texts and 'reconstruction' in texts
    assert 'a.png: {}'.format(int(predicted[0])) in texts
    assert predict.row_label('/x/' + 'n' * 40 + '.png', 3) == \
        '...' + 'n' * 21 + '.png: 3'


def test_scale_sets_the_size_of_the_reconstruct_figure(
        tmp_path, images, fresh_model_path, run_tool):
    out_png = tmp_path / 'recon.png'
    status, _, err = run_tool(predict.main, [
        '--load', fresh_model_path, '--reconstruct', out_png, '--scale',
        '1', images['good'][0]])
    assert status == 0, err
    x = predict.load_image(images['good'][0])
    _, layout = predict.reconstruction_figure(
        [(images['good'][0], 0, x, x)], fresh_model_path, scale=1)
    assert layout.mosaic[2:] == tile_shape(1, 2, 28)
    with Image.open(str(out_png)) as image:
        assert image.size == (layout.width, layout.height)


def test_reconstruct_needs_a_decoder(tmp_path, images,
                                     no_decoder_model_path, run_tool):
    status, out, err = run_tool(predict.main, [
        '--load', no_decoder_model_path, '--reconstruct',
        tmp_path / 'r.png', images['good'][0]])
    assert status == 2 and out == ''
    assert '--reconstruct' in one_error_line(err)
    assert not (tmp_path / 'r.png').exists()


def test_folder_without_images_and_usage_errors(tmp_path, fresh_model_path,
                                                run_tool):
    empty_folder = tmp_path / 'nothing'
    empty_folder.mkdir()
    status, _, err = run_tool(predict.main, ['--load', fresh_model_path,
                                             empty_folder])
    assert status == 1
    assert 'no image files' in one_error_line(err)
    status, _, err = run_tool(predict.main, ['--load', fresh_model_path])
    assert status == 2
    one_error_line(err)
    status, _, err = run_tool(predict.main, [
        '--load', fresh_model_path, '--invert', 'maybe', 'x.png'])
    assert status == 2
    assert '--invert' in one_error_line(err)


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130),
                                            (signal.SIGTERM, 143)])
def test_predict_interrupted_is_one_line(tmp_path, fresh_model_path, signum,
                                         status):
    from PIL import Image
    image = tmp_path / 'digit.png'
    pixels = numpy.zeros((28, 28), numpy.uint8)
    pixels[6:22, 12:16] = 255  # a 1
    Image.fromarray(pixels).save(str(image))
    process = start('predict.py', '--load', fresh_model_path, '-b', '1',
                    *[image] * 2000)
    wait_for(lambda: process.stdout.readline() != '', process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert one_error_line(err) == 'error: interrupted'


def test_predict_reconstruct_rejects_a_baseline_model(
        tmp_path, small_baseline_path):
    kept = Unchanged(tmp_path / 'r.png')
    result = run_script('predict.py', '--load', small_baseline_path,
                        '--reconstruct', tmp_path / 'r.png', tmp_path / 'x.png')
    assert_one_error(result, small_baseline_path, 'no decoder', status=2)
    assert result.stdout == ''
    kept.check()


def test_predict_model_with_an_input_smaller_than_mnist(
        tmp_path, small_baseline_path):
    from PIL import Image
    image = numpy.zeros((28, 28), numpy.uint8)
    image[5:20, 10:14] = 255
    Image.fromarray(image).save(str(tmp_path / 'digit.png'))
    assert_one_error(run_script('predict.py', '--load', small_baseline_path,
                                tmp_path / 'digit.png'), small_baseline_path,
                     'smaller than the 28 x 28', status=2)


def test_predict_batchsize_zero(tmp_path, fresh_model_path):
    assert_one_error(run_script('predict.py', '--load', fresh_model_path, '-b', '0',
                                tmp_path / 'x.png'),
                     '--batchsize', 'must be an integer > 0', status=2)


@needs_no_cupy
def test_predict_gpu_without_cupy(tmp_path, fresh_model_path):
    assert_one_error(run_script('predict.py', '--load', fresh_model_path, '-g', '0',
                                tmp_path / 'x.png'),
                     '@cupy:0', 'CuPy cannot be used here', status=2)


def test_predict_unwritable_reconstruct(tmp_path, blocker, fresh_model_path):
    assert_one_error(run_script('predict.py', '--load', fresh_model_path,
                                '--reconstruct', blocker / 'r.png',
                                tmp_path / 'x.png'),
                     'cannot write to', '--reconstruct', status=2)
    assert blocker.read_text() == 'keep me'


def test_predict_reconstruct_to_a_folder(tmp_path, fresh_model_path):
    """Found out only after classifying every input."""
    assert_one_error(run_script('predict.py', '--load', fresh_model_path,
                                '--reconstruct', tmp_path, tmp_path / 'x.png'),
                     '--reconstruct {} is a folder; give a file name, e.g. '
                     '{}'.format(tmp_path, tmp_path / 'recon.png'), status=2)
