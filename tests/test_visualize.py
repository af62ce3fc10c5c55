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

from capsnet import figures
from capsnet import files
import nets
import visualize
from conftest import one_error_line, tile_shape

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


def test_grid_builders_have_the_figures_layout():
    side = 28
    x = numpy.zeros((10, side, side), numpy.float32)
    recon_all = numpy.zeros((10, 10, side, side), numpy.float32)
    assert visualize.all_capsules_grid(x, recon_all).shape[:2] == \
        tile_shape(11, 10, side)
    assert visualize.reconstruction_grid(
        numpy.zeros((20, side, side)), numpy.zeros((20, side, side))
    ).shape[:2] == tile_shape(4, 10, side)
    assert visualize.tweak_grid(numpy.zeros((16 * 11, side, side)), 16, 11,
                                5).shape[:2] == tile_shape(
        16, 11, side)


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
    assert read_png(out / 'vis.png').shape[:2] == tile_shape(
        4, 10, 28)
    vis_all = read_png(out / 'vis_all.png')
    assert vis_all.shape[:2] == tile_shape(11, 10, 28)
    for c in range(10):
        tweaked = read_png(out / 'vis_tweaked{}.png'.format(c))
        assert tweaked.shape[:2] == tile_shape(16, 11, 28)
    # vis_all's top row: the inputs, green (no red or blue in the digits)
    top = vis_all[B:B + 28, B:B + 28].astype(int)
    assert top[..., 1].max() > 200
    assert (top[..., 1] >= top[..., 0]).all() and \
        (top[..., 1] >= top[..., 2]).all()
    # the unperturbed column (5 of 11) is framed in red
    left = B + 5 * (28 + B)
    frame = tweaked[B:B + 28, left - B:left]
    assert (frame == [255, 0, 0]).all()
    assert 'wrote' in stdout and 'predicted' in stdout


def test_range_and_step_set_the_number_of_columns(
        tmp_path, mnist_dir, fresh_model_path, run_tool):
    out = tmp_path / 'vis'
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', out, '--data-dir', mnist_dir,
        '--range', '0.1', '--step', '0.05'])
    assert status == 0, err
    assert read_png(out / 'vis_tweaked0.png').shape[:2] == \
        tile_shape(16, 5, 28)


def test_model_without_decoder_is_one_clear_line(
        tmp_path, no_decoder_model_path, run_tool):
    status, _, err = run_tool(visualize.main, [
        '--load', no_decoder_model_path, '--out', tmp_path / 'vis',
        '--data-dir', tmp_path])
    assert status != 0
    assert '--reconstruct' in one_error_line(err)
    assert not (tmp_path / 'vis').exists()


def test_missing_dataset_is_one_line(tmp_path, fresh_model_path, run_tool):
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', tmp_path / 'vis',
        '--data-dir', tmp_path / 'nowhere'])
    assert status != 0
    assert '--data-dir {} does not exist'.format(tmp_path / 'nowhere') in \
        one_error_line(err)


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
    (['--dataset', 'cifar'], "--dataset: invalid choice: 'cifar'")])
def test_bad_options_are_usage_errors(tmp_path, fresh_model_path, run_tool,
                                      flags, fragment):
    status, _, err = run_tool(visualize.main, [
        '--load', fresh_model_path, '--out', tmp_path / 'vis'] + flags)
    assert status == 2
    assert fragment in one_error_line(err)
