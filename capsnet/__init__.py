"""The library beneath the tools and ``nets.py``: compatibility (compat),
the command-line convention (cli, errors), data, kernels, training, files,
figures and devices. Nothing here imports a top-level file
(tests/test_layering.py checks it).

The package itself imports nothing, so ``from capsnet import cli`` stays
quick (the tools catch Ctrl-C before the slow imports). A script of one's
own imports ``nets`` or ``capsnet.compat`` before ``chainer``: compat lets
Chainer 7.8.1 run on NumPy 2 and Python 3.12+.
"""
