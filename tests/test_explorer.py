"""capsnet/explorer.py: the self-contained capsule explorer page.

Unit part (always): the page embeds the decoder and the digits exactly
(decoded back from the HTML here), loads nothing from the network, and
``decode`` matches a plain NumPy forward of the three layers on the masked
capsules; bad shapes give ValueError.

Browser part: headless Chromium (Debian's ``chromium``), driven over the
DevTools protocol on --remote-debugging-pipe with the standard library
only: load the file:// page, select a digit, move a slider (value + an
``input`` event), then compare the canvas bytes and the page's ``pixels()``
hook with ``decode``; a screenshot is saved to tmp_path. Skipped, with one
reason, where Chromium is not installed. Synthetic data: random weights
(seed 0) of small sizes, a few random 28x28 digits.
"""
import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time

import numpy
import pytest

from capsnet import explorer

S, J, D = 28, 10, 16
H1, H2 = 24, 40     # the real decoder: 512, 1024
N = 5
TIMEOUT = 60


def make_data(seed=0, S=S, H1=H1, H2=H2, n=N):
    rng = numpy.random.RandomState(seed)
    sizes = [(H1, J * D), (H2, H1), (S * S, H2)]
    layers = [((rng.randn(o, i) / numpy.sqrt(i) * 2).astype(numpy.float32),
               (rng.randn(o) * 0.1).astype(numpy.float32)) for o, i in sizes]
    images = rng.rand(n, S, S).astype(numpy.float32)
    s_j = rng.randn(n, J, D) * 0.3
    norm2 = (s_j ** 2).sum(-1, keepdims=True)
    capsules = (s_j * numpy.sqrt(norm2) / (1 + norm2)).astype(  # squash
        numpy.float32)
    lengths = numpy.sqrt((capsules ** 2).sum(-1)).astype(numpy.float32)
    labels = rng.randint(0, J, n)
    predictions = lengths.argmax(1)
    return layers, images, capsules, labels, predictions, lengths


def plain_forward(layers, v, j):
    """The decoder on the masked (J*D,) input, float64."""
    x = numpy.zeros(J * D)
    x[j * D:(j + 1) * D] = v
    (W1, b1), (W2, b2), (W3, b3) = [(W.astype(float), b.astype(float))
                                    for W, b in layers]
    h = numpy.maximum(x @ W1.T + b1, 0)
    h = numpy.maximum(h @ W2.T + b2, 0)
    return 1 / (1 + numpy.exp(-(h @ W3.T + b3)))


def embedded(html_text):
    """The page's JSON data and its arrays, decoded back in Python."""
    m = re.search(r'<script type="application/json" id="capsnet-data">'
                  r'(.*?)</script>', html_text, re.S)
    assert m, 'no embedded data block'
    data = json.loads(m.group(1))

    def arr(b64, shape):
        return numpy.frombuffer(base64.b64decode(b64), '<f4').reshape(shape)
    layers = [(arr(lay['W'], (lay['out'], lay['in'])),
               arr(lay['b'], (lay['out'],))) for lay in data['layers']]
    n, s, j, d = data['N'], data['S'], data['J'], data['D']
    return data, layers, {
        'images': arr(data['images'], (n, s, s)),
        'capsules': arr(data['capsules'], (n, j, d)),
        'lengths': arr(data['lengths'], (n, j))}


@pytest.fixture
def page(tmp_path):
    args = make_data()
    path = str(tmp_path / 'explorer.html')
    assert explorer.write_explorer(path, *args, title='Test <explorer>') \
        == path
    return path, args


# ---------------------------------------------------------------- unit part

def test_page_embeds_arrays_exactly(page):
    path, (layers, images, capsules, labels, predictions, lengths) = page
    with open(path, encoding='utf-8') as f:
        text = f.read()
    data, got_layers, arrays = embedded(text)
    for (W, b), (gW, gb) in zip(layers, got_layers):
        numpy.testing.assert_array_equal(gW, W)
        numpy.testing.assert_array_equal(gb, b)
    numpy.testing.assert_array_equal(arrays['images'], images)
    numpy.testing.assert_array_equal(arrays['capsules'], capsules)
    numpy.testing.assert_array_equal(arrays['lengths'], lengths)
    assert data['labels'] == labels.tolist()
    assert data['predictions'] == predictions.tolist()
    assert (data['S'], data['J'], data['D'], data['N']) == (S, J, D, N)
    assert (data['range'], data['step']) == (0.25, 0.01)
    assert '<title>Test &lt;explorer&gt;</title>' in text


def test_page_is_self_contained(page):
    path, _ = page
    with open(path, encoding='utf-8') as f:
        text = f.read()
    low = text.lower()
    for bad in ('http://', 'https://', '<script src', '<link', '@import',
                'url(', '<iframe', '<img'):
        assert bad not in low, bad
    assert text.count('<script') == 2    # the data block and the code
    folder = os.path.dirname(path)
    assert os.listdir(folder) == ['explorer.html']   # no temp file left


def test_decode_matches_plain_forward():
    layers = make_data()[0]
    rng = numpy.random.RandomState(1)
    for j in (0, 3, 9):
        v = rng.randn(D) * 0.3
        got = explorer.decode(layers, v, j)
        assert got.shape == (S * S,) and got.dtype == numpy.float64
        numpy.testing.assert_allclose(got, plain_forward(layers, v, j),
                                      rtol=1e-12, atol=1e-12)


def test_any_image_size(tmp_path):
    args = make_data(S=12, n=2)
    path = str(tmp_path / 'small.html')
    explorer.write_explorer(path, *args)
    with open(path, encoding='utf-8') as f:
        data, _, arrays = embedded(f.read())
    assert data['S'] == 12
    numpy.testing.assert_array_equal(arrays['images'], args[1])


@pytest.mark.parametrize('change, message', [
    (lambda a: a.__setitem__(0, a[0][:2]), 'three'),
    (lambda a: a.__setitem__(0, [a[0][0], (a[0][1][0].T, a[0][1][1])]
                             + a[0][2:]), 'fc2 W'),
    (lambda a: a.__setitem__(0, [(a[0][0][0], a[0][0][1][:-1])]
                             + a[0][1:]), 'fc1 b'),
    (lambda a: a.__setitem__(1, a[1][:, :20, :20]), 'fc3 W has 784'),
    (lambda a: a.__setitem__(1, a[1][:, :, :20]), 'square'),
    (lambda a: a.__setitem__(2, a[2][:, :, :8]), 'fc1 W has 160'),
    (lambda a: a.__setitem__(2, a[2][:-1]), 'capsules'),
    (lambda a: a.__setitem__(3, a[3] + 10), 'labels must be classes'),
    (lambda a: a.__setitem__(4, a[4][:2]), 'predictions must have shape'),
    (lambda a: a.__setitem__(5, a[5][:, :9]), 'lengths'),
    (lambda a: a.__setitem__(1, a[1][:0]), 'at least one'),
    (lambda a: a[1].__setitem__((0, 0, 0), numpy.nan), 'not finite'),
])
def test_bad_shapes(tmp_path, change, message):
    args = list(make_data())
    change(args)
    path = str(tmp_path / 'bad.html')
    with pytest.raises(ValueError, match=re.escape(message)):
        explorer.write_explorer(path, *args)
    assert os.listdir(str(tmp_path)) == []


def test_decode_bad_input():
    layers = make_data()[0]
    with pytest.raises(ValueError, match='class j'):
        explorer.decode(layers, numpy.zeros(D), 10)
    with pytest.raises(ValueError, match='one capsule'):
        explorer.decode(layers, numpy.zeros((2, D)), 0)


# ------------------------------------------------------------- browser part

def find_chromium():
    if os.path.exists('/usr/bin/chromium'):
        return '/usr/bin/chromium'
    return shutil.which('chromium')


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe (fds 3, 4):
    NUL-terminated JSON messages of the DevTools protocol."""

    FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
             '--no-first-run', '--disable-background-networking',
             '--disable-component-update', '--disable-sync',
             '--remote-debugging-pipe']

    def __init__(self, binary, profile, deadline):
        self.deadline = deadline
        self.next_id = 0
        self.events = []
        self.buffer = b''
        to_browser = os.pipe()      # (read: browser's fd 3, write: ours)
        from_browser = os.pipe()    # (read: ours, write: browser's fd 4)
        # the child's ends at fds >= 10, so that dup2 onto 3 and 4 cannot
        # overwrite one of them; close-on-exec, as all of Python's fds
        r = fcntl.fcntl(to_browser[0], fcntl.F_DUPFD_CLOEXEC, 10)
        w = fcntl.fcntl(from_browser[1], fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser[0])
        os.close(from_browser[1])
        self.write_fd, self.read_fd = to_browser[1], from_browser[0]

        def pipe_fds():     # in the child: the only fds passed on are 0-4
            os.dup2(r, 3)
            os.dup2(w, 4)
        try:
            self.proc = subprocess.Popen(
                [binary] + self.FLAGS +
                ['--user-data-dir=' + profile, 'about:blank'],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=False,
                preexec_fn=pipe_fds, start_new_session=True)
        finally:
            os.close(r)
            os.close(w)

    def close(self):
        """Ask the browser to quit, then kill what is left of its process
        group (its own session, started here) and reap it."""
        try:
            if self.proc.poll() is None:
                self.deadline = min(self.deadline, time.time() + 5)
                try:
                    self.send('Browser.close')
                    self.proc.wait(5)
                except Exception:
                    pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            os.close(self.write_fd)
            os.close(self.read_fd)

    def _message(self):
        while b'\0' not in self.buffer:
            left = self.deadline - time.time()
            if left <= 0:
                raise TimeoutError('Chromium did not answer within {} s'
                                   .format(TIMEOUT))
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError('Chromium closed the DevTools pipe '
                                       '(exit status {})'
                                       .format(self.proc.poll()))
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b'\0', 1)
        return json.loads(raw)

    def send(self, method, session=None, **params):
        if time.time() > self.deadline:
            raise TimeoutError('the browser test ran past {} s'
                               .format(TIMEOUT))
        self.next_id += 1
        msg = {'id': self.next_id, 'method': method, 'params': params}
        if session:
            msg['sessionId'] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b'\0')
        while True:
            reply = self._message()
            if reply.get('id') == self.next_id:
                if 'error' in reply:
                    raise RuntimeError('{}: {}'.format(method,
                                                       reply['error']))
                return reply['result']
            self.events.append(reply)

    def evaluate(self, session, expression):
        result = self.send('Runtime.evaluate', session,
                           expression=expression, returnByValue=True,
                           awaitPromise=True)
        if 'exceptionDetails' in result:
            raise RuntimeError('{} -> {}'.format(
                expression, result['exceptionDetails']))
        return result['result'].get('value')


CHROMIUM = find_chromium()


@pytest.fixture
def browser():
    if not CHROMIUM:
        pytest.skip('chromium not installed: apt-get install chromium '
                    '(Debian) to run the explorer in a headless browser')
    profile = tempfile.mkdtemp(prefix='capsnet-chromium-')
    b = Browser(CHROMIUM, profile, time.time() + TIMEOUT)
    try:
        yield b
    finally:
        try:
            b.close()
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def open_page(b, url):
    """A new tab with the page loaded; its DevTools session id."""
    target = b.send('Target.createTarget', url='about:blank')['targetId']
    session = b.send('Target.attachToTarget', targetId=target,
                     flatten=True)['sessionId']
    b.send('Network.enable', session)
    b.send('Runtime.enable', session)
    b.send('Emulation.setDeviceMetricsOverride', session, width=1100,
           height=800, deviceScaleFactor=1, mobile=False)
    b.send('Page.navigate', session, url=url)
    while b.evaluate(session, 'document.readyState') != 'complete':
        time.sleep(0.05)
    if not b.evaluate(session, '!!window.capsnetExplorer'):
        errors = [e['params']['exceptionDetails'] for e in b.events
                  if e.get('method') == 'Runtime.exceptionThrown']
        pytest.fail('the page did not start: {}'.format(errors))
    return session


CANVAS_BYTES = '''(() => {
  const c = document.getElementById("capsnet-reconstruction");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  return {w: c.width, h: c.height, rgba: Array.from(d)};
})()'''

MOVE_SLIDER = '''(() => {
  const s = document.getElementById("capsnet-dim-%d");
  s.value = "%s";
  s.dispatchEvent(new Event("input", {bubbles: true}));
  return s.value;
})()'''


def check_reconstruction(b, session, layers, u, j):
    """The canvas and pixels() against decode(layers, u, j)."""
    want = explorer.decode(layers, u, j)
    got = numpy.array(b.evaluate(session, 'capsnetExplorer.pixels()'))
    assert got.shape == (S * S,)
    numpy.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    canvas = b.evaluate(session, CANVAS_BYTES)
    scale = explorer.SCALE
    assert (canvas['w'], canvas['h']) == (S * scale, S * scale)
    rgba = numpy.array(canvas['rgba'], numpy.int32).reshape(
        S, scale, S, scale, 4)
    # every block of scale x scale screen pixels is one gray level
    assert (rgba == rgba[:, :1, :, :1]).all()
    block = rgba[:, 0, :, 0]
    assert (block[..., 3] == 255).all()
    assert (block[..., 0] == block[..., 1]).all()
    assert (block[..., 0] == block[..., 2]).all()
    gray = numpy.round(255 * want).reshape(S, S)
    assert numpy.abs(block[..., 0] - gray).max() <= 1


def test_explorer_in_headless_chromium(browser, page, tmp_path):
    path, (layers, images, capsules, labels, predictions, lengths) = page
    b = browser
    url = 'file://' + os.path.abspath(path)
    session = open_page(b, url)

    # digit 0 on load: v_j of its predicted class, unperturbed
    state = b.evaluate(session, 'capsnetExplorer.state()')
    assert state['index'] == 0 and state['j'] == int(predictions[0])
    check_reconstruction(b, session, layers, capsules[0, predictions[0]],
                         int(predictions[0]))

    # pick digit 3 by clicking its thumbnail, then move slider d = 5
    i, d, delta = 3, 5, '0.13'
    b.evaluate(session, 'document.getElementById("capsnet-thumb-%d")'
                        '.click()' % i)
    j = int(predictions[i])
    assert b.evaluate(session, 'capsnetExplorer.state()')['j'] == j
    assert b.evaluate(session, MOVE_SLIDER % (d, delta)) == delta
    u = capsules[i, j].astype(numpy.float64)
    u[d] += float(delta)
    assert b.evaluate(session, 'capsnetExplorer.capsule()') == u.tolist()
    check_reconstruction(b, session, layers, u, j)
    shown = b.evaluate(session, 'document.getElementById("capsnet-dims")'
                                '.children[%d].children[2].textContent' % d)
    assert shown == '{:.3f}'.format(u[d])

    # a second slider to its end, through the hook: both perturbations
    b.evaluate(session, 'capsnetExplorer.setDimension(0, %r)'
               % (float(u[0]) - 0.25))
    u[0] -= 0.25
    check_reconstruction(b, session, layers, u, j)

    # the screenshot, before the reset (perturbed reconstruction)
    shot = base64.b64decode(b.send('Page.captureScreenshot', session,
                                   format='png')['data'])
    shot_path = tmp_path / 'explorer.png'
    shot_path.write_bytes(shot)
    import PIL.Image    # matplotlib's dependency (requirements.txt)
    with PIL.Image.open(shot_path) as im:
        assert im.format == 'PNG'
        pixels = numpy.asarray(im.convert('RGB'))
    assert pixels.shape[:2] == (800, 1100)
    colours = numpy.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 50, 'the screenshot is nearly one colour'

    # reset: back to v_j; another class through the hook
    b.evaluate(session, 'document.getElementById("capsnet-reset").click()')
    check_reconstruction(b, session, layers, capsules[i, j], j)
    k = (j + 1) % J
    b.evaluate(session, 'capsnetExplorer.setClass(%d)' % k)
    check_reconstruction(b, session, layers, capsules[i, k], k)

    # the lengths table: 10 rows, the predicted class marked
    rows = b.evaluate(session, '''Array.from(document.querySelectorAll(
        "#capsnet-lengths tr")).map(r => [r.className,
        r.lastChild.textContent])''')
    assert len(rows) == J
    assert 'pred' in rows[j][0]
    assert [float(t) for _, t in rows] == pytest.approx(
        lengths[i].tolist(), abs=6e-4)

    # nothing was fetched but the page itself
    urls = [e['params']['request']['url'] for e in b.events
            if e.get('method') == 'Network.requestWillBeSent']
    assert urls and set(urls) == {url}
