"""The `dgst` command line: one module per command, `main` dispatches (see `dgst --help`)."""
from dgst_tf.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
