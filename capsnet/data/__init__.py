"""Data: MNIST and Fashion-MNIST (mnist), the paper's other data sets (paper)."""
