"""The `maskaq` command.

Each subcommand lives next to the code it drives, in a module that exposes
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together.
"""
import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `maskaq --help` is fast.
COMMANDS = {
    "demo": ("maskaq.commands.demo", "run MaskAQ end to end on the bundled teacher (no downloads)"),
    "quantize": ("maskaq.commands.quantize", "data-free quantization of a ViT: synthesize, distill, evaluate, save"),
    "synthesize": ("maskaq.commands.synthesize", "only synthesize calibration images"),
    "eval": ("maskaq.commands.eval", "top-1/top-5 accuracy of a model on Fashion-MNIST or an ImageFolder"),
    "train-teacher": ("maskaq.commands.train_teacher", "train the bundled Fashion-MNIST ViT teacher"),
    "bench": ("maskaq.commands.bench", "latency of FP, fake-quant and integer models"),
    "export": ("maskaq.commands.export", "a saved student as an ONNX QDQ graph or a maskaq integer model"),
}


class CliError(Exception):
    """Bad user input: printed as one line, exit status 2."""


def _available_commands():
    found = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # this subcommand's module is not part of this build
            raise
        found[name] = (module, help_text)
    return found


def build_parser():
    parser = argparse.ArgumentParser(prog="maskaq", description=__doc__.splitlines()[0]
                                     + " Data-free quantization of Vision Transformers (MaskAQ).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in _available_commands().items():
        command_parser = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CliError as exc:
        print(f"maskaq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run as `python -m maskaq.cli`: this file is __main__, so the CliError the subcommands raise
    # (maskaq.cli.CliError) is another class than ours; go through the imported module.
    from maskaq.cli import main as _main

    sys.exit(_main())
