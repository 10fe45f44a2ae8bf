"""The Cortex-M harness of the kernel cores: firmware sources and their test vectors
(`gen_vectors` command line; `synthetic_vectors` and `real_cases` build the cases with
`cases` and `c_emitter`)."""
