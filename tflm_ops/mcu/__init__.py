"""The Cortex-M harness of the kernel cores: test vectors (`gen_vectors`) and firmware sources."""
