"""The `maskaq` command.

Each subcommand lives next to the code it drives, in a module that exposes
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together.
"""
import argparse
import importlib
import importlib.util
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Prints a command's docstring as written (its example command lines stay lines) and an
    option's default only where it has one: no "(default: None)" after a required or optional
    value, nor "(default: False)" after a flag."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class CliError(Exception):
    """Bad user input: printed as one line, exit status 2."""


def _available_commands():
    """name -> (module name, help) of the subcommands this build has, found without importing them."""
    found = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            present = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # a parent package is missing from this build
            present = False
        if present:
            found[name] = (module_name, help_text)
    return found


def build_parser(command=None):
    """The parser; only `command`'s module is imported and adds its options (all of them when
    `command` is None), so `maskaq --help` and each subcommand start without the others' imports."""
    parser = argparse.ArgumentParser(prog="maskaq", description=__doc__.splitlines()[0]
                                     + " Data-free quantization of Vision Transformers (MaskAQ).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in _available_commands().items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text,
                                        formatter_class=HelpFormatter)
        if command is None or name == command:
            module = importlib.import_module(module_name)
            command_parser.description = (module.__doc__ or help_text).strip()
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def _command_in(argv):
    """The subcommand `argv` names (its first item that is not an option), or None."""
    for item in argv:
        if not item.startswith("-"):
            return item if item in COMMANDS else None
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser(command) if command else build_parser(command="")  # "": no module imported
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
