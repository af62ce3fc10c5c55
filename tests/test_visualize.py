"""visualize.py: mosaics, the figures of a fresh model on real MNIST, errors.

Fixtures (mnist_dir, fresh_model_path, no_decoder_model_path, run_tool) are
in conftest.py.
"""
import os

import numpy
import pytest
from PIL import Image

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer
from capsnet import figures, files
from capsnet.data import mnist
import nets
import visualize
from conftest import (Unchanged, assert_missing_data_dir, assert_one_error,
                      needs_no_cupy, one_error_line, run_script, tile_shape)

B = figures.BORDER


def read_png(path):
    """(H, W, C) uint8 of a PNG file."""
    with Image.open(path) as image:
        return numpy.asarray(image.convert('RGB'))


# -- mosaics ---------------------------------------------------------------

def test_tile_places_images_row_by_row_with_borders():
    images = numpy.arange(6, dtype=numpy.float32).reshape(6, 1, 1) / 10
    images = numpy.broadcast_to(images, (6, 3, 4)).copy()
    grid = figures.tile(images, 2, 3, border=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1, 3)
    for k in range(6):
        r, c = divmod(k, 3)
        top, left = 1 + r * 4, 1 + c * 5
        numpy.testing.assert_allclose(grid[top:top + 3, left:left + 4],
                                      k / 10, rtol=1e-6)
    numpy.testing.assert_allclose(grid[0], 0.5)  # the border row
    numpy.testing.assert_allclose(grid[:, 0], 0.5)


def test_tile_shape_helper_and_frames_touch_only_the_border():
    images = numpy.ones((6, 5, 5), numpy.float32)
    plain = figures.tile(images, 2, 3)
    framed = figures.tile(images, 2, 3, frames=[(0, 1), (1, 1)])
    assert plain.shape[:2] == tile_shape(2, 3, 5)
    changed = numpy.any(plain != framed, axis=2)
    assert changed.any()
    # the tiles themselves are untouched, only border pixels turn red
    assert (framed[changed] == numpy.array(figures.FRAME_COLOR)).all()
    for k in range(6):
        r, c = divmod(k, 3)
        top, left = B + r * (5 + B), B + c * (5 + B)
        assert not changed[top:top + 5, left:left + 5].any()
    # the framed column's left and right borders are red, column 0's not
    left1 = B + 1 * (5 + B)
    assert changed[B:B + 5, left1 - B:left1].all()
    assert changed[B:B + 5, left1 + 5:left1 + 5 + B].all()
    assert not changed[:, :B].any()


def test_tint_colours_white_and_keeps_black():
    images = numpy.array([[[0.0, 1.0]]], numpy.float32)
    tinted = figures.tint(images, figures.GREEN)
    assert tinted.shape == (1, 1, 2, 3)
    numpy.testing.assert_allclose(tinted[0, 0, 0], 0)
    numpy.testing.assert_allclose(tinted[0, 0, 1], figures.GREEN)


def texts(figure):
    return figures.figure_texts(figure)


def test_figure_builders_have_the_layout_and_the_labels():
    side, scale = 28, figures.SCALE
    big, border = side * scale, figures.border_px(scale)
    x = numpy.zeros((10, side, side), numpy.float32)
    labels = numpy.arange(10)
    predicted = numpy.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    recon_all = numpy.zeros((10, 10, side, side), numpy.float32)
    figure, layout = visualize.all_capsules_figure(
        x, recon_all, labels, predicted, 'm.npz')
    assert layout.mosaic[2:] == (tile_shape(11, 10, big, border)[0]
                                 + layout.label_h, tile_shape(
                                     11, 10, big, border)[1])
    drawn = texts(figure)
    assert 'input' in drawn and 'capsule 9' in drawn
    assert 'true 9, pred 0' in drawn and 'true 3, pred 3' in drawn
    assert any('m.npz' in t for t in drawn)
    wrong = [t for t in figure.texts if t.get_text() == 'true 9, pred 0']
    assert wrong[0].get_color() == figures.WRONG_COLOR

    x20 = numpy.zeros((20, side, side))
    figure, layout = visualize.reconstruction_figure(
        x20, x20, numpy.tile(labels, 2), numpy.tile(predicted, 2), 'm.npz')
    assert (layout.rows, layout.cols) == (4, 10)
    assert layout.mosaic[3] == tile_shape(4, 10, big, border)[1]
    assert texts(figure).count('reconstruction') == 2
    assert texts(figure).count('true 9, pred 0') == 2

    deltas = visualize.tweak_deltas(0.25, 0.05)
    figure, layout = visualize.tweak_figure(
        numpy.zeros((16 * 11, side, side)), deltas, 3, 5, 18, 'm.npz')
    assert layout.mosaic[2:] == tile_shape(16, 11, big, border)
    drawn = texts(figure)
    assert visualize.tweak_labels(deltas) == [
        '-0.25', '-0.2', '-0.15', '-0.1', '-0.05', '0', '+0.05', '+0.1',
        '+0.15', '+0.2', '+0.25']
    for label in visualize.tweak_labels(deltas) + ['dim 0', 'dim 15']:
        assert label in drawn
    assert any('class 3' in t and 'predicted 5' in t for t in drawn)
    assert visualize.class_label(3, 5, 1) == 't3 p5'


def test_tweak_deltas_and_tweaked_capsules():
    deltas = visualize.tweak_deltas(0.25, 0.05)
    assert len(deltas) == 11
    numpy.testing.assert_allclose(deltas, numpy.linspace(-0.25, 0.25, 11),
                                  atol=1e-6)
    assert len(visualize.tweak_deltas(0.1, 0.05)) == 5
    assert len(visualize.tweak_deltas(0, 0.05)) == 1
    capsule = numpy.arange(16, dtype=numpy.float32) / 100
    masked = visualize.tweaked_capsules(capsule, 3, deltas)
    assert masked.shape == (16 * 11, 160)
    per = masked.reshape(16, 11, 10, 16)
    assert not per[:, :, [0, 1, 2, 4, 5, 6, 7, 8, 9]].any()
    for d in range(16):
        expected = numpy.repeat(capsule[None], 11, axis=0)
        expected[:, d] += deltas
        numpy.testing.assert_allclose(per[d, :, 3], expected, atol=1e-7)
    numpy.testing.assert_allclose(per[:, 5, 3], capsule[None].repeat(16, 0))


def test_pick_examples_takes_the_first_of_each_class():
    labels = numpy.array([3, 1, 0, 1, 2, 0, 3, 2, 3])
    picked = visualize.pick_examples(labels, per_class=2, n_classes=4)
    assert picked.tolist() == [[2, 5], [1, 3], [4, 7], [0, 6]]
    with pytest.raises(ValueError, match='of class 2$'):
        visualize.pick_examples(labels[:7], per_class=2, n_classes=4)


def test_decode_matches_the_models_reconstruction(fresh_model_path):
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    device = chainer.get_device('@numpy')
    rng = numpy.random.RandomState(0)
    v = rng.uniform(-0.3, 0.3, (4, 10, 16)).astype(numpy.float32)
    labels = numpy.array([0, 3, 9, 3], numpy.int32)
    ours = visualize.reconstruct(model, v, labels, device)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        theirs = model.reconstruction(v, labels).array.reshape(4, 28, 28)
    assert ours.shape == (4, 28, 28)
    numpy.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# -- the tool ----------------------------------------------------------------

def test_main_writes_every_figure_with_the_grid_sizes(
        tmp_path, mnist_dir, fresh_model_path, run_tool):
    out = tmp_path / 'vis'
    status, stdout, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', out, '--data-dir', mnist_dir])
    assert status == 0, err
    names = ['vis.png', 'vis_all.png'] + [
        'vis_tweaked{}.png'.format(c) for c in range(10)]
    assert sorted(os.listdir(out)) == sorted(names)  # no temp files left
    scale = figures.SCALE
    big, border = 28 * scale, figures.border_px(scale)
    # the same figures, drawn here from the same inputs: same layout
    _, _, test = mnist.get_mnist_like('mnist', data_dir=mnist_dir)
    x_all, t_all = mnist.to_arrays(test)
    order = visualize.pick_examples(t_all).T.reshape(-1)
    labels = t_all[order]
    predicted = [int(p) for p in stdout.split('predicted')[1].split(
        '\n')[0].split()]
    assert len(predicted) == 20
    zeros = numpy.zeros((20, 28, 28))
    _, layout = visualize.reconstruction_figure(
        zeros, zeros, labels, predicted, os.path.basename(fresh_model_path))
    vis = read_png(out / 'vis.png')
    assert vis.shape[:2] == (layout.height, layout.width)
    assert layout.mosaic[3] == tile_shape(4, 10, big, border)[1]
    # rows 0 and 2: the inputs, white on black, scale x scale per pixel
    for k in range(20):
        row = 2 * (k // 10)
        t, left, bottom, right = layout.tile_box(row, k % 10)
        expected = numpy.round(255 * figures.upscale(
            x_all[order[k]][None, 0], scale)[0])
        numpy.testing.assert_array_equal(vis[t:bottom, left:right, 1],
                                         expected)
    _, layout = visualize.all_capsules_figure(
        zeros[:10], numpy.zeros((10, 10, 28, 28)), labels[:10],
        predicted[:10], os.path.basename(fresh_model_path))
    vis_all = read_png(out / 'vis_all.png')
    assert vis_all.shape[:2] == (layout.height, layout.width)
    t, left, bottom, right = layout.tile_box(0, 0)
    top = vis_all[t:bottom, left:right].astype(int)
    assert top.max() > 200 and top.min() == 0   # white digit on black
    assert (top[..., 0] == top[..., 1]).all() and \
        (top[..., 1] == top[..., 2]).all()      # gray, no tint
    deltas = visualize.tweak_deltas(0.25, 0.05)
    _, layout = visualize.tweak_figure(
        numpy.zeros((16 * 11, 28, 28)), deltas, 0, 0, 0,
        os.path.basename(fresh_model_path))
    assert layout.mosaic[2:] == tile_shape(16, 11, big, border)
    for c in range(10):
        tweaked = read_png(out / 'vis_tweaked{}.png'.format(c))
        assert tweaked.shape[:2] == (layout.height, layout.width)
    # the unperturbed column (5 of 11) is framed in red
    t, left, bottom, right = layout.tile_box(0, 5)
    frame = tweaked[t:bottom, left - border:left]
    assert (frame == [255, 0, 0]).all()
    assert 'wrote' in stdout and 'predicted' in stdout
    assert 'model model' not in stdout and 'loaded {}: capsnet ('.format(
        fresh_model_path) in stdout


def test_scale_sets_the_size_of_the_digits(
        tmp_path, mnist_dir, fresh_model_path, run_tool):
    out = tmp_path / 'vis'
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', out, '--data-dir', mnist_dir,
        '--scale', '1', '--range', '0', '--step', '0.05'])
    assert status == 0, err
    deltas = visualize.tweak_deltas(0, 0.05)
    _, layout = visualize.tweak_figure(
        numpy.zeros((16, 28, 28)), deltas, 0, 0, 0,
        os.path.basename(fresh_model_path), scale=1)
    assert layout.mosaic[2:] == tile_shape(16, 1, 28)
    assert read_png(out / 'vis_tweaked0.png').shape[:2] == (
        layout.height, layout.width)


def test_range_and_step_set_the_number_of_columns(
        tmp_path, mnist_dir, fresh_model_path, run_tool):
    out = tmp_path / 'vis'
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', out, '--data-dir', mnist_dir,
        '--range', '0.1', '--step', '0.05'])
    assert status == 0, err
    _, layout = visualize.tweak_figure(
        numpy.zeros((16 * 5, 28, 28)), visualize.tweak_deltas(0.1, 0.05), 0,
        0, 0, os.path.basename(fresh_model_path))
    assert layout.cols == 5
    assert read_png(out / 'vis_tweaked0.png').shape[:2] == (
        layout.height, layout.width)


def test_model_without_decoder_is_one_clear_line(
        tmp_path, no_decoder_model_path, run_tool):
    status, _, err = run_tool(visualize.main, [
        '--load', no_decoder_model_path, '--out', tmp_path / 'vis',
        '--data-dir', tmp_path])
    assert status != 0
    assert '--reconstruct' in one_error_line(err)
    assert not (tmp_path / 'vis').exists()


def test_missing_dataset_is_one_line(tmp_path, fresh_model_path, run_tool):
    assert_missing_data_dir(run_tool, visualize.main, [
        '--load', fresh_model_path, '--out', tmp_path / 'vis'],
        tmp_path / 'nowhere')


def test_unwritable_output_is_one_line(tmp_path, fresh_model_path,
                                       run_tool):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', blocker / 'vis',
        '--data-dir', tmp_path])
    assert status != 0
    assert '--out' in one_error_line(err)


@pytest.mark.parametrize('flags, fragment', [
    (['--step', '0'], "--step: must be a number > 0, got '0'"),
    (['--range', '-1'], "--range: must be a number >= 0, got '-1'"),
    (['--step', '0.001'], '--range / --step must be at most 50'),
    (['--range', '1e308', '--step', '1e-308'],
     '--range / --step must be at most 50'),
    (['--step', 'nan'], "--step: must be a number > 0, got 'nan'"),
    (['--scale', '0'], "--scale: must be an integer from 1 to 16, got '0'"),
    (['--html-digits', '0'], '--html-digits: must be an integer from 1'),
    (['--dataset', 'cifar'], "--dataset: invalid choice: 'cifar'")])
def test_bad_options_are_usage_errors(tmp_path, fresh_model_path, run_tool,
                                      flags, fragment):
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', tmp_path / 'vis'] + flags)
    assert status == 2
    assert fragment in one_error_line(err)


def test_html_writes_the_explorer_with_the_models_decoder(
        tmp_path, mnist_dir, fresh_model_path, run_tool):
    from test_explorer import embedded
    out = tmp_path / 'vis'
    status, stdout, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', out, '--data-dir', mnist_dir,
        '--html', '--html-digits', '12', '--range', '0'])
    assert status == 0, err
    page = out / 'explorer.html'
    assert 'wrote {}'.format(page) in stdout
    data, layers, arrays = embedded(page.read_text(encoding='utf-8'))
    model = files.load_model(fresh_model_path, nets.ARCHITECTURES)
    for (W, b), (got_W, got_b) in zip(model.decoder.layers(), layers):
        numpy.testing.assert_array_equal(got_W, W.array)
        numpy.testing.assert_array_equal(got_b, b.array)
    assert data['N'] == 12
    # the first test digits of class 0 ... 9, then the second of 0 and 1
    _, _, test = mnist.get_mnist_like('mnist', data_dir=mnist_dir)
    x_all, t_all = mnist.to_arrays(test)
    shown = visualize.explorer_digits(t_all, 12, 10)
    assert data['labels'] == [int(t) for t in t_all[shown]]
    assert data['labels'][:10] == list(range(10))
    numpy.testing.assert_array_equal(arrays['images'], x_all[shown, 0])
    device = chainer.get_device('@numpy')
    v = visualize.digit_capsules(model, x_all[shown], device)
    numpy.testing.assert_allclose(arrays['capsules'], v, rtol=1e-5,
                                  atol=1e-6)
    lengths = numpy.sqrt((v * v).sum(axis=2))
    numpy.testing.assert_allclose(arrays['lengths'], lengths, rtol=1e-5,
                                  atol=1e-6)
    assert data['predictions'] == lengths.argmax(axis=1).tolist()


def test_html_file_may_be_named_anywhere(tmp_path, mnist_dir,
                                         fresh_model_path, run_tool):
    page = tmp_path / 'pages' / 'mine.html'
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', tmp_path / 'vis',
        '--data-dir', mnist_dir, '--html', page, '--html-digits', '1',
        '--range', '0'])
    assert status == 0, err
    assert page.exists() and not (tmp_path / 'vis' / 'explorer.html').exists()


def test_visualize_rejects_a_baseline_model(tmp_path, small_baseline_path):
    kept = Unchanged(tmp_path / 'vis' / 'vis.png')
    assert_one_error(run_script('visualize.py', '--load', small_baseline_path,
                                '-o', tmp_path / 'vis'),
                     'holds the baseline network, not a CapsNet', status=1)
    kept.check()


@needs_no_cupy
def test_visualize_gpu_without_cupy(tmp_path, fresh_model_path):
    kept = Unchanged(tmp_path / 'vis' / 'vis.png')
    assert_one_error(run_script('visualize.py', '--load', fresh_model_path, '-g', '0',
                                '-o', tmp_path / 'vis'),
                     '@cupy:0', 'CuPy cannot be used here', status=1)
    kept.check()
