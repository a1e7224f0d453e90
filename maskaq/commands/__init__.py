"""The `maskaq` subcommands: one module each, with its argparse (`add_arguments(parser)`), its
printing and `run(args) -> int`. Core modules never import this package or `maskaq.cli`
(tests/test_layers.py checks the import graph); the command line turns their exceptions into
one-line errors."""
