"""Training: the loop's pieces (extensions), ChainerMN (distributed)."""
