"""The fast kernels: convolutions, the routing node, the capsule heads."""
