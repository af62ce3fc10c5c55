"""The fast kernels: convolutions, the routing node, the capsule heads.

Which optional pieces run is not a module setting but a ``KernelOptions``
handed to the model (``model.kernel_options``), which hands it to each
node: two models in one process can run different kernels.
"""
from typing import NamedTuple, Optional


class KernelOptions(NamedTuple):
    """The kernels' optional pieces (all off by default).

    gpu_kernels: CuPy kernels for squash, the routing's softmax and its
        contractions with u_hat (routing.py), instead of NumPy-API forms.
    gpu_convolutions: on the GPU, convolution.conv2d_nchw instead of
        Chainer's convolution.
    einsum: the routing's contractions through einsum (True), broadcasts
        (False) or einsum on the CPU only (None).
    """
    gpu_kernels: bool = False
    gpu_convolutions: bool = False
    einsum: Optional[bool] = None


DEFAULT = KernelOptions()
