"""The paper's other two experiments, run in-process by experiments.py:

- ``multimnist``: CapsNet and the baseline CNN trained on MultiMNIST
  (Section 6); error = the two longest capsules (largest logits) are not
  exactly the two labels.
- ``affnist``: CapsNet and a pooling CNN trained on MNIST placed at random
  on 40 x 40 (Section 5.2), tested on that (expanded MNIST) and on affNIST
  (the real .mat file when given, else a generated affNIST-like set).
- ``figure5``: the paper's Figure 5 for a MultiMNIST CapsNet.

Each (row, trial) is a run folder OUT/<row>-trial<k> with ``run.json``
(settings), while training ``snapshot.npz`` (rewritten after every epoch;
a new start resumes from it), and when finished ``model.npz`` and
``final.json`` with the per-epoch history; a finished run is never
redone and a folder made with other settings is refused (RunConflict, one
line). OUT/results.json and OUT/table.md are rewritten
after every run.
"""
import json
import os
import time
import zipfile

import numpy

from capsnet import compat  # noqa: F401  (before chainer: NumPy 2 / Python 3.12)
import chainer

from capsnet import cli
from capsnet import figures
from capsnet import files
import nets
from capsnet.data import paper as pdata

ALPHA, ALPHA_FLOOR, DECAY = 1e-3, 1e-5, 0.95
# train.py multiplies alpha by 0.95 once per MNIST epoch: 600 steps of 100
MNIST_DECAY_STEPS = 600
# Section 6: "the learning rate decay steps [are] 10 times larger"
MULTIMNIST_DECAY_STEPS = 10 * MNIST_DECAY_STEPS

MULTIMNIST_ROWS = {
    # name: (title, factory, paper error %)
    'capsnet': ('CapsNet (r = 3, reconstruction)',
                lambda: nets.TwoDigitCapsNet(), 5.2),
    'baseline': ('Baseline CNN', lambda: nets.TwoDigitBaselineCNN(), 8.1),
}
AFFNIST_ROWS = {
    # name: (title, factory, paper expanded-MNIST acc %, paper affNIST acc %)
    'capsnet': ('CapsNet (r = 3, reconstruction)',
                lambda: nets.CapsNet(input_size=pdata.AFFNIST_CANVAS),
                99.23, 79.0),
    'cnn': ('CNN, max pooling and dropout', lambda: nets.PoolingCNN(),
            99.22, 66.0),
}


# per-run training state, rewritten after every epoch (train(snapshot=))
SNAPSHOT = 'snapshot.npz'


class RunConflict(Exception):
    """A run folder made with other settings; str() is one line."""


# --------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------

def _send(device, arrays):
    return arrays if device is None else tuple(device.send(a)
                                               for a in arrays)


def _rng_arrays(prefix, state):
    """A RandomState's get_state() tuple as npz arrays."""
    name, keys, pos, has_gauss, gauss = state
    return {prefix + 'keys': keys, prefix + 'numbers': numpy.array(
        [pos, has_gauss, gauss])}


def _rng_state(prefix, arrays):
    pos, has_gauss, gauss = arrays[prefix + 'numbers']
    return ('MT19937', arrays[prefix + 'keys'], int(pos), int(has_gauss),
            float(gauss))


def save_snapshot(path, model, optimizer, rs, step, history):
    """Everything train() needs to go on exactly where it stopped: the
    weights, Adam's state, the step, both random generators (the order of
    the examples and NumPy's global one, which dropout draws from) and the
    per-epoch history, in one npz written atomically."""
    arrays = {}
    serializer = chainer.serializers.DictionarySerializer(arrays)
    serializer['model'].save(model)
    serializer['optimizer'].save(optimizer)
    arrays.update(_rng_arrays('rng/order/', rs.get_state()))
    arrays.update(_rng_arrays('rng/global/', numpy.random.get_state()))
    arrays['step'] = numpy.array(step)
    arrays['history'] = numpy.array(json.dumps(history))
    files.atomic_write(path, lambda f: numpy.savez(f, **arrays))


def load_snapshot(path, model, optimizer, rs):
    """Restore what save_snapshot wrote; returns (step, history).

    The whole file is read and checked against the model and optimizer
    (every array present with its shape) before anything is restored, so
    a damaged file raises ValueError (or OSError) and changes nothing.
    """
    with numpy.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    expected = {}
    serializer = chainer.serializers.DictionarySerializer(expected)
    serializer['model'].save(model)
    serializer['optimizer'].save(optimizer)
    for key, value in expected.items():
        have = arrays.get(key)
        if have is None or numpy.shape(have) != numpy.shape(value):
            raise ValueError('{} is missing or has another shape'.format(key))
    history = json.loads(str(arrays['history']))
    if not isinstance(history, list):
        raise ValueError('no per-epoch history')
    step = int(arrays['step'])
    order_state = _rng_state('rng/order/', arrays)
    global_state = _rng_state('rng/global/', arrays)
    deserializer = chainer.serializers.NpzDeserializer(arrays)
    deserializer['model'].load(model)
    deserializer['optimizer'].load(optimizer)
    rs.set_state(order_state)
    numpy.random.set_state(global_state)
    return step, history


def _alpha(step, decay_steps):
    return max(ALPHA * DECAY ** (step / decay_steps), ALPHA_FLOOR)


def train(model, n_train, batch, epochs, batchsize, seed, decay_steps,
          log=print, device=None, snapshot=None, evaluate=None):
    """Adam (alpha 0.001 x 0.95 ** (step / decay_steps), floor 1e-5).

    batch(indices, epoch) returns the arguments of model(...) for those
    training examples. evaluate(), if given, is called after every epoch
    and returns a dict of figures for that epoch's history entry.

    snapshot: a file path. After every epoch the whole training state is
    written there (atomically); a later call with the same arguments
    resumes from it and ends with the same weights and history as a run
    that was never interrupted (on the CPU; CuPy's dropout generator is
    not saved). A damaged snapshot is said and training starts again.

    Returns the history: one dict per epoch with ``epoch``,
    ``train_loss``, ``seconds`` and evaluate()'s figures.
    """
    numpy.random.seed(seed)
    optimizer = chainer.optimizers.Adam(alpha=ALPHA)
    optimizer.setup(model)
    rs = numpy.random.RandomState(seed)
    step, history = 0, []
    if snapshot is not None and os.path.exists(snapshot):
        try:
            step, history = load_snapshot(snapshot, model, optimizer, rs)
        except (OSError, ValueError, KeyError, TypeError, EOFError,
                zipfile.BadZipFile) as e:
            log('{} is damaged ({}); training from epoch 1'.format(
                snapshot, (str(e).splitlines() or [type(e).__name__])[0]))
        else:
            optimizer.alpha = _alpha(step, decay_steps)
            log('resumed from {} after epoch {}'.format(snapshot,
                                                         len(history)))
    for epoch in range(len(history) + 1, epochs + 1):
        order = rs.permutation(n_train)
        total, start = 0.0, time.time()
        for i in range(0, n_train, batchsize):
            indices = order[i:i + batchsize]
            with chainer.using_config('train', True):
                loss = model(*_send(device, batch(indices, epoch)))
            model.cleargrads()
            loss.backward()
            optimizer.update()
            step += 1
            optimizer.alpha = _alpha(step, decay_steps)
            total += float(loss.array) * len(indices)
        entry = dict(epoch=epoch, train_loss=total / n_train,
                     seconds=time.time() - start)
        if evaluate is not None:
            entry.update(evaluate())
        history.append(entry)
        log('epoch {}: {}, alpha {:.6f}, {:.0f} s'.format(
            epoch, ', '.join('{} {:.4f}'.format(k.replace('_', ' '), v)
                             for k, v in entry.items()
                             if k not in ('epoch', 'seconds')),
            optimizer.alpha, entry['seconds']))
        if snapshot is not None:
            save_snapshot(snapshot, model, optimizer, rs, step, history)
    return history


def predict_all(model, x, batchsize=100):
    """model.predict over x in batches (on the model's device): NumPy
    (predictions, scores)."""
    predictions, scores = [], []
    for i in range(0, len(x), batchsize):
        p, s = model.predict(model.device.send(x[i:i + batchsize]))
        predictions.append(chainer.backend.CpuDevice().send(p))
        scores.append(chainer.backend.CpuDevice().send(s))
    return numpy.concatenate(predictions), numpy.concatenate(scores)


def pair_error(model, x, t1, t2, batchsize=100):
    """Fraction of examples whose top two are not exactly {t1, t2},
    counted (errors / n: 0.0059, not 1 - accuracy's 0.005900000000000016).
    """
    _, scores = predict_all(model, x, batchsize)
    wrong = int((~nets.pair_correct(scores, t1, t2)).sum())
    return wrong / len(x)


def accuracy(model, x, t, batchsize=100):
    predictions, _ = predict_all(model, x, batchsize)
    return float((predictions == t).mean())


# --------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def prepare_run(folder, config):
    """The final.json of a finished run with this config, else None (the
    folder is made and run.json written). RunConflict if the folder was
    made with another config."""
    info = _read_json(os.path.join(folder, 'run.json'))
    if info is not None and info.get('config') != config:
        raise RunConflict('{} was made with other settings ({}); use another '
                          '--out or remove that folder'.format(
                              folder, cli.differences(
                                  info.get('config') or {}, config)))
    final = _read_json(os.path.join(folder, 'final.json'))
    if final is not None and os.path.exists(os.path.join(folder,
                                                         'model.npz')):
        return final
    os.makedirs(folder, exist_ok=True)
    files.write_text(os.path.join(folder, 'run.json'),
                        json.dumps(dict(config=config), indent=2) + '\n')
    return None


def finish_run(folder, model, final):
    files.save_model(os.path.join(folder, 'model.npz'), model)
    files.write_text(os.path.join(folder, 'final.json'),
                        json.dumps(final, indent=2) + '\n')
    # the model and final.json hold all that is kept; the snapshot (weights
    # and Adam's moments, ~150 MB for these networks) only served a resume
    snapshot = os.path.join(folder, SNAPSHOT)
    if os.path.exists(snapshot):
        os.remove(snapshot)


def mean_std(values):
    if not values:
        return None, None
    mean = float(numpy.mean(values))
    std = float(numpy.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def fmt(mean, std, n):
    if not n:
        return 'not run (n=0)'
    return '{:.2f} ± {:.2f} (n={})'.format(mean, std, n)


# --------------------------------------------------------------------------
# MultiMNIST
# --------------------------------------------------------------------------

def multimnist_data(args, log=print):
    """(train, test) dicts of paper.multimnist, cached in
    OUT/data/ with their settings (DataError if a cache differs)."""
    arrays = pdata.load_mnist_arrays(args.data_dir)
    folder = os.path.join(args.out, 'data')
    os.makedirs(folder, exist_ok=True)
    out = []
    for split, n_digits, pairs in (
            ('train', args.train_digits, args.pairs_per_digit),
            ('test', args.test_digits, args.test_pairs_per_digit)):
        images, labels = arrays[split]
        n_digits = n_digits or len(images)
        settings = dict(pairs_per_digit=pairs, seed=args.data_seed,
                        split=split, n_digits=n_digits,
                        max_shift=pdata.MULTI_SHIFT,
                        canvas=pdata.MULTI_CANVAS)
        path = os.path.join(folder, 'multimnist-{}.npz'.format(split))
        log('MultiMNIST {}: {} digits x {} pairs ({})'.format(
            split, n_digits, pairs, path))
        out.append(pdata.cached_multimnist(
            path, images[:n_digits], labels[:n_digits], settings,
            write=files.atomic_write))
    return out


def multimnist_config(args, row, trial):
    return dict(experiment='multimnist', row=row, trial=trial,
                seed=args.seed + trial, epochs=args.epoch,
                batchsize=args.batchsize, data_seed=args.data_seed,
                pairs_per_digit=args.pairs_per_digit,
                test_pairs_per_digit=args.test_pairs_per_digit,
                train_digits=args.train_digits, test_digits=args.test_digits,
                decay_steps=MULTIMNIST_DECAY_STEPS)


def _jobs(args, config_of):
    """(folder, row, config) of every (row, trial) to run, trial by trial;
    a folder made with other settings is refused before any work."""
    jobs = []
    for trial in range(args.trials):
        for row in args.rows:
            folder = os.path.join(args.out, '{}-trial{}'.format(row, trial))
            config = config_of(args, row, trial)
            info = _read_json(os.path.join(folder, 'run.json'))
            if info is not None and info.get('config') != config:
                prepare_run(folder, config)   # raises RunConflict
            jobs.append((folder, row, config))
    return jobs


def run_multimnist(args, log=print):
    """Train every (row, trial) not yet finished; write the table."""
    jobs = _jobs(args, multimnist_config)
    train_set, test_set = multimnist_data(args, log)
    x = pdata.to_float(train_set['x'])
    x1, x2 = pdata.to_float(train_set['x1']), pdata.to_float(train_set['x2'])
    t1, t2 = train_set['t1'], train_set['t2']
    tx = pdata.to_float(test_set['x'])
    for folder, row, config in jobs:
        if prepare_run(folder, config) is not None:
            log('{}: finished before'.format(folder))
            continue
        numpy.random.seed(config['seed'])
        model = MULTIMNIST_ROWS[row][1]()
        model.to_device(args.chainer_device)
        log('{}: {} ({:,} parameters), {} training / {} test examples'
            .format(folder, model.arch, nets.count_parameters(model), len(x),
                    len(tx)))
        start = time.time()
        history = train(model, len(x), lambda i, e: (
            x[i], t1[i], t2[i], x1[i], x2[i]), args.epoch, args.batchsize,
            config['seed'], MULTIMNIST_DECAY_STEPS, log, args.chainer_device,
            snapshot=os.path.join(folder, SNAPSHOT))
        error = pair_error(model, tx, test_set['t1'], test_set['t2'])
        log('{}: MultiMNIST test error {:.2f}%'.format(folder, 100 * error))
        model.to_cpu()
        finish_run(folder, model, dict(
            config=config, test_error=error,
            train_losses=[h['train_loss'] for h in history],
            history=history, parameters=nets.count_parameters(model),
            train_examples=len(x), test_examples=len(tx),
            wall_seconds=time.time() - start))
        write_multimnist_table(args)
    return write_multimnist_table(args)


def _finished(args, rows, config_of):
    runs = {}
    for row in rows:
        for trial in range(args.trials):
            folder = os.path.join(args.out, '{}-trial{}'.format(row, trial))
            final = _read_json(os.path.join(folder, 'final.json'))
            if final is not None and final.get('config') == config_of(
                    args, row, trial):
                runs.setdefault(row, []).append(final)
    return runs


def write_multimnist_table(args):
    runs = _finished(args, MULTIMNIST_ROWS, multimnist_config)
    summary = []
    for row, (title, factory, paper) in MULTIMNIST_ROWS.items():
        mine = runs.get(row, [])
        errors = [100 * r['test_error'] for r in mine]
        mean, std = mean_std(errors)
        summary.append(dict(
            row=row, method=title, n=len(mine), errors_pct=errors,
            mean_error_pct=mean, std_error_pct=std, paper_error_pct=paper,
            parameters=mine[0]['parameters'] if mine else None,
            train_examples=mine[0]['train_examples'] if mine else None,
            test_examples=mine[0]['test_examples'] if mine else None))
    meta = dict(experiment='multimnist', command=args.command,
                epochs=args.epoch, trials=args.trials,
                pairs_per_digit=args.pairs_per_digit,
                test_pairs_per_digit=args.test_pairs_per_digit,
                train_digits=args.train_digits, test_digits=args.test_digits,
                data_seed=args.data_seed, date=args.date,
                machine=args.machine)
    lines = [
        '# MultiMNIST (Section 6): test error %', '',
        'Written {} by `{}` on {}.'.format(args.date, args.command,
                                          args.machine), '',
        '- Error: the two longest capsules (the two largest logits for the '
        'CNN) are not exactly the two labels; final epoch; mean ± sample '
        'std over trials (0 for one).',
        '- Budget: {} epoch(s); training set {} MNIST training digits x {} '
        'pairs each; test set {} MNIST test digits x {} pairs each; up to {} '
        'trial(s).'.format(args.epoch, args.train_digits or 60000,
                           args.pairs_per_digit, args.test_digits or 10000,
                           args.test_pairs_per_digit, args.trials),
        "- Paper: Sabour et al. 2017, Section 6: 60M training and 10M test "
        "pairs (1K per digit); CapsNet 5.2%, baseline 8.1%. **A smaller "
        "budget than the paper's is not comparable to its figures.**", '',
        '| Method | Parameters | Our error % (mean ± std, n) | Paper % | '
        'Train / test examples |',
        '| --- | ---: | ---: | ---: | ---: |']
    for row in summary:
        lines.append('| {} | {} | {} | {} | {} / {} |'.format(
            row['method'], '{:,}'.format(row['parameters'])
            if row['parameters'] else '—',
            fmt(row['mean_error_pct'], row['std_error_pct'], row['n']),
            row['paper_error_pct'], row['train_examples'] or '—',
            row['test_examples'] or '—'))
    _write_tables(args.out, meta, summary, lines)
    return summary


def _write_tables(out, meta, summary, lines):
    files.write_text(os.path.join(out, 'results.json'), json.dumps(
        dict(meta=meta, summary=summary), indent=2) + '\n')
    files.write_text(os.path.join(out, 'table.md'), '\n'.join(lines)
                        + '\n')


# --------------------------------------------------------------------------
# Affine robustness
# --------------------------------------------------------------------------

def affnist_config(args, row, trial):
    return dict(experiment='affnist', row=row, trial=trial,
                seed=args.seed + trial, epochs=args.epoch,
                batchsize=args.batchsize, train_size=args.train_size,
                test_size=args.test_size, affnist=args.affnist,
                affnist_size=args.affnist_size, data_seed=args.data_seed,
                decay_steps=MNIST_DECAY_STEPS)


def affnist_data(args, log=print):
    arrays = pdata.load_mnist_arrays(args.data_dir)
    images, labels = arrays['train']
    n = args.train_size or len(images)
    train = images[:n], labels[:n].astype(numpy.int32)
    test_images, test_labels = arrays['test']
    m = args.test_size or len(test_images)
    expanded = (pdata.to_float(pdata.expanded_mnist(test_images[:m],
                                                    args.data_seed)),
                test_labels[:m].astype(numpy.int32))
    if args.affnist:
        x, t = pdata.read_affnist(args.affnist)
        kind = 'affNIST ({})'.format(args.affnist)
    else:
        k = args.affnist_size or m
        x, _ = pdata.affnist_like(test_images[:k], args.data_seed)
        t = test_labels[:k]
        kind = ('generated affNIST-like (the first {} MNIST test digits, '
                'affNIST ranges; not affNIST)'.format(k))
    if args.affnist_size:
        x, t = x[:args.affnist_size], t[:args.affnist_size]
    log('affine test set: {}, {} images'.format(kind, len(x)))
    return train, expanded, (pdata.to_float(x), t.astype(numpy.int32)), kind


def run_affnist(args, log=print):
    jobs = _jobs(args, affnist_config)
    (images, labels), expanded, affine, kind = affnist_data(args, log)
    for folder, row, config in jobs:
        if prepare_run(folder, config) is not None:
            log('{}: finished before'.format(folder))
            continue
        numpy.random.seed(config['seed'])
        model = AFFNIST_ROWS[row][1]()
        model.to_device(args.chainer_device)
        log('{}: {} ({:,} parameters), {} training images'.format(
            folder, model.arch, nets.count_parameters(model), len(images)))
        placed = {}

        def batch(indices, epoch):
            # a new random placement of every digit each epoch
            if epoch not in placed:
                placed.clear()
                placed[epoch] = pdata.to_float(pdata.expanded_mnist(
                    images, config['seed'] * 1000 + epoch))
            return placed[epoch][indices], labels[indices]
        def evaluate():
            # both test sets after every epoch: the matched-accuracy
            # comparison picks its epochs from this history
            return dict(expanded_accuracy=accuracy(model, *expanded),
                        affine_accuracy=accuracy(model, *affine))
        start = time.time()
        history = train(model, len(images), batch, args.epoch,
                        args.batchsize, config['seed'], MNIST_DECAY_STEPS,
                        log, args.chainer_device,
                        snapshot=os.path.join(folder, SNAPSHOT),
                        evaluate=evaluate)
        last = history[-1]
        log('{}: expanded MNIST {:.2f}%, {} {:.2f}%'.format(
            folder, 100 * last['expanded_accuracy'], kind.split(' (')[0],
            100 * last['affine_accuracy']))
        model.to_cpu()
        finish_run(folder, model, dict(
            config=config, expanded_accuracy=last['expanded_accuracy'],
            affine_accuracy=last['affine_accuracy'], affine_set=kind,
            train_losses=[h['train_loss'] for h in history],
            history=history, parameters=nets.count_parameters(model),
            train_examples=len(images), expanded_test=len(expanded[0]),
            affine_test=len(affine[0]), wall_seconds=time.time() - start))
        write_affnist_table(args, kind)
    return write_affnist_table(args, kind)


def write_affnist_table(args, kind):
    runs = _finished(args, AFFNIST_ROWS, affnist_config)
    generated = not args.affnist
    label = 'generated affNIST-like' if generated else 'affNIST'
    summary = []
    for row, (title, factory, paper_exp, paper_aff) in AFFNIST_ROWS.items():
        mine = runs.get(row, [])
        exp = [100 * r['expanded_accuracy'] for r in mine]
        aff = [100 * r['affine_accuracy'] for r in mine]
        summary.append(dict(
            row=row, method=title, n=len(mine),
            expanded_accuracy_pct=exp, affine_accuracy_pct=aff,
            affine_set=kind, affine_is_generated=generated,
            mean_expanded_pct=mean_std(exp)[0],
            mean_affine_pct=mean_std(aff)[0],
            paper_expanded_pct=paper_exp, paper_affnist_pct=paper_aff,
            parameters=mine[0]['parameters'] if mine else None))
    meta = dict(experiment='affnist', command=args.command, epochs=args.epoch,
                trials=args.trials, train_size=args.train_size,
                test_size=args.test_size, affine_set=kind,
                affine_is_generated=generated, date=args.date,
                machine=args.machine)
    lines = [
        '# Robustness to affine transformations (Section 5.2): test '
        'accuracy %', '',
        'Written {} by `{}` on {}.'.format(args.date, args.command,
                                          args.machine), '',
        '- Training: the first {} MNIST training digits, each placed at a '
        'random position on a 40 x 40 black canvas (redrawn every epoch), '
        'no other augmentation; {} epoch(s); final epoch; up to {} '
        'trial(s).'.format(args.train_size or 60000, args.epoch,
                           args.trials),
        '- Expanded MNIST test: the first {} MNIST test digits placed at '
        'random on 40 x 40.'.format(args.test_size or 10000),
        '- Affine test set: {}.'.format(kind),
        ("- **Every number in the '{}' column was measured on a generated "
         "set, not on affNIST.**".format(label)) if generated else
        '- The affNIST column was measured on the real affNIST file.',
        "- Paper: Sabour et al. 2017, Section 5.2: trained to 99.23% "
        "(CapsNet) and 99.22% (CNN) on expanded MNIST, then 79% and 66% on "
        "affNIST. **A smaller budget than the paper's is not comparable to "
        "its figures.**", '',
        '| Method | Parameters | Expanded MNIST % | {} % | Paper: expanded '
        'MNIST / affNIST % | n |'.format(label),
        '| --- | ---: | ---: | ---: | ---: | ---: |']
    for row in summary:
        def pct(value):
            return '—' if value is None else '{:.2f}'.format(value)
        lines.append('| {} | {} | {} | {} | {} / {} | {} |'.format(
            row['method'], '{:,}'.format(row['parameters'])
            if row['parameters'] else '—', pct(row['mean_expanded_pct']),
            pct(row['mean_affine_pct']), row['paper_expanded_pct'],
            row['paper_affnist_pct'], row['n']))
    matched = [m for m in (matched_epochs(runs, trial)
                           for trial in range(args.trials)) if m]
    meta['matched'] = matched
    lines += [
        '', '## At matched expanded-MNIST accuracy', '',
        "The paper compares the two networks at the same expanded-MNIST "
        "accuracy (early stopping at 99.23% and 99.22%). Here, per trial, "
        "the target is the lower of the two networks' best per-epoch "
        "expanded-MNIST accuracy, and each network is taken at the first "
        "epoch that reaches it. The epochs are chosen on the expanded-MNIST "
        "test set itself (there is no separate validation set), as an "
        "early stop on it would.", '',
        '| Trial | Target % | CapsNet: epoch, expanded %, {0} % | CNN: '
        'epoch, expanded %, {0} % |'.format(label),
        '| ---: | ---: | ---: | ---: |']
    for m in matched:
        lines.append('| {} | {:.2f} | {}, {:.2f}, **{:.2f}** | {}, {:.2f}, '
                     '**{:.2f}** |'.format(
                         m['trial'], 100 * m['target'],
                         *(value for row in ('capsnet', 'cnn') for value in (
                             m[row]['epoch'],
                             100 * m[row]['expanded_accuracy'],
                             100 * m[row]['affine_accuracy']))))
    if not matched:
        lines.append('| — | not yet: needs both networks of a trial '
                     'finished | | |')
    _write_tables(args.out, meta, summary, lines)
    return summary


def matched_epochs(runs, trial):
    """The paper's comparison for one trial: both networks at the same
    expanded-MNIST accuracy.

    runs: {row: [final.json dicts]} with per-epoch ``history``. The target
    is the lower of the two rows' best expanded accuracy; each row is
    taken at its first epoch that reaches it. Returns {'trial', 'target',
    'capsnet': history entry, 'cnn': history entry}, or None when a row of
    that trial has not finished (or has no history).
    """
    histories = {}
    for row in ('capsnet', 'cnn'):
        final = next((r for r in runs.get(row, [])
                      if r['config']['trial'] == trial), None)
        if final is None or not final.get('history'):
            return None
        histories[row] = final['history']
    target = min(max(h['expanded_accuracy'] for h in history)
                 for history in histories.values())
    result = dict(trial=trial, target=target)
    for row, history in histories.items():
        result[row] = next(h for h in history
                           if h['expanded_accuracy'] >= target)
    return result


# --------------------------------------------------------------------------
# Figure 5
# --------------------------------------------------------------------------

RED = (1.0, 0.25, 0.25)


def figure5(model, data, n_right=4, n_wrong=4, batchsize=100):
    """The paper's Figure 5 as an RGB mosaic, and what each row shows.

    Every row is one example: the input; its two reconstructions from the
    two longest capsules (red: the longer, green: the other) on one
    canvas; the reconstructions forced from the two true labels' capsules
    (red t1, green t2); and a reconstruction forced from a chosen capsule
    of a class that is not present (blue), as the paper's starred columns.
    The first rows are correctly classified examples, then incorrect ones.

    Returns:
        (mosaic (H, W, 3) in [0, 1], list of dicts per row: index, labels,
        predicted, forced, correct).
    """
    x = pdata.to_float(data['x'])
    t1, t2 = data['t1'], data['t2']
    _, scores = predict_all(model, x, batchsize)
    right = nets.pair_correct(scores, t1, t2)
    chosen = (list(numpy.flatnonzero(right)[:n_right])
              + list(numpy.flatnonzero(~right)[:n_wrong]))
    side = model.input_size
    tiles, rows = [], []
    for k in chosen:
        best = nets.top2(scores[k:k + 1])[0]
        absent = next(c for c in range(10) if c not in (t1[k], t2[k]))
        with chainer.using_config('train', False), \
                chainer.using_config('enable_backprop', False):
            v = model.capsules(x[k:k + 1])

            def draw(label):
                return model.reconstruction(
                    v, numpy.array([label])).array.reshape(side, side)
            predicted = (figures.tint(draw(best[0]), RED)
                         + figures.tint(draw(best[1]), figures.GREEN))
            true = (figures.tint(draw(t1[k]), RED)
                    + figures.tint(draw(t2[k]), figures.GREEN))
            forced = figures.tint(draw(absent), figures.BLUE)
        tiles += [figures.tint(x[k, 0], (1, 1, 1)), predicted, true, forced]
        rows.append(dict(index=int(k), labels=[int(t1[k]), int(t2[k])],
                         predicted=[int(best[0]), int(best[1])],
                         forced=int(absent), correct=bool(right[k])))
    mosaic = figures.tile(numpy.clip(numpy.array(tiles), 0, 1), len(chosen),
                          4)
    return mosaic, rows
