"""capsnet/training/loop.py: the Trainer's pieces; the reports drawn
atomically; final.json's errors counted from whole examples; fit, the
experiments' path through the same loop."""
import json
import types

import numpy

from capsnet.training import loop, plots
from capsnet.training import extensions as ext
from capsnet.training.settings import Settings
import nets
import train


def test_train_writes_its_plots_atomically():
    from chainer.training import extensions
    added = []
    trainer = types.SimpleNamespace(extend=lambda e, **kw: added.append(e))
    loop.add_reports(trainer, Settings(no_progress=True),
                     types.SimpleNamespace(reconstruct=False, arch='capsnet'),
                     {'test': None})
    drawn = [e for e in added if isinstance(e, plots.EpochPlot)]
    assert sorted(e.file_name for e in drawn) == [
        'accuracy.png', 'error.png', 'loss.png']
    assert not any(isinstance(e, extensions.PlotReport) for e in added)


def test_final_json_errors_are_counted(tmp_path):
    """final.json's errors come from counts: 59 of 10000 is 0.0059, not
    1 - float32 accuracy = 0.005900013446807861."""
    settings = train.parse_settings(['-o', str(tmp_path)])
    final = ext.FinalReport('test/main/accuracy')
    final.history = [(1, float(numpy.float32(0.9912))),
                     (2, float(numpy.float32(0.9941))),
                     (3, float(numpy.float32(0.9937)))]
    loop.finish(settings, nets.CapsNet(routing=1, reconstruct=False), final,
                (60000, 0, 10000), 1, log=lambda line: None)
    text = (tmp_path / 'final.json').read_text()
    summary = json.loads(text)
    assert summary['final_test_errors'] == 63
    assert summary['best_on_test_errors'] == 59
    assert '"final_test_error": 0.0063,' in text
    assert '"best_on_test_error": 0.0059,' in text
