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


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: hidden from --help, stores into the new option's dest and
    prints one note naming the new spelling, so old command lines keep working for a release."""

    def __init__(self, option_strings, dest, new, nargs=None, **kwargs):
        kwargs["help"] = argparse.SUPPRESS
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new option's default stays
        self.new = new
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated and will be removed; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Accept ``old`` (hidden) for the option ``new`` already added to ``parser`` (or for ``dest``)."""
    dest = kwargs.pop("dest", None) or next(a.dest for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, **kwargs)


def continue_command(args) -> str:
    """The command line that continues the run ``args`` started: its own arguments, --resume
    instead of --overwrite (kept where it also replaces a file outside the run that is not
    written yet, ``args._keep_overwrite``: train-teacher's --export)."""
    import shlex

    keep = getattr(args, "_keep_overwrite", False)
    argv = [a for a in getattr(args, "_argv", []) if a != "--overwrite" or keep]
    if "--resume" not in argv:
        argv.append("--resume")
    return "maskaq " + shlex.join(argv)


def restart_command(args) -> str:
    """The command line that runs ``args`` again from the start: its own arguments, plus --overwrite
    where the stopped run left a partial result the new one must replace (``args._partial``)."""
    import shlex
    from pathlib import Path

    argv = list(getattr(args, "_argv", []))
    partial = getattr(args, "_partial", None)
    if partial is not None and Path(partial).exists() and "--overwrite" not in argv:
        argv.append("--overwrite")
    return "maskaq " + shlex.join(argv)


def continue_note(args):
    """What the user can do after a run stopped early, or None for a command that keeps nothing."""
    saved_in = getattr(args, "_checkpoint_dir", None)
    if saved_in is None:
        return None
    from pathlib import Path

    saved = Path(saved_in)
    if saved.is_file() or (saved.is_dir() and any(saved.iterdir())):
        return f"the run so far is kept in {saved_in}; `{continue_command(args)}` continues it"
    return f"nothing was saved yet; `{restart_command(args)}` starts the run again"


def interrupted_note(args) -> str:
    """What continues a command stopped by Ctrl-C: its checkpoint's note, or the command that
    starts it again (naming the partial result it left, which that command replaces)."""
    note = continue_note(args)
    if note is not None:
        return note
    partial = getattr(args, "_partial", None)
    from pathlib import Path

    if partial is not None and Path(partial).exists():
        return f"the results so far are in {partial}; `{restart_command(args)}` runs it again"
    return f"`{restart_command(args)}` runs it again"


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
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "models", None), list) and not any(a.startswith("-") for a in extra):
        args.models += extra  # argparse stops a list of positionals at the first option after it
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._argv = argv
    try:
        return int(args._run(args) or 0)
    except CliError as exc:
        print(f"maskaq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted_note(args)}", file=sys.stderr)
        return 130
    except Exception:
        note = continue_note(args)
        if note:  # the traceback follows: this line says the work is not lost
            print(f"maskaq {args.command}: {note}", file=sys.stderr)
        raise


if __name__ == "__main__":
    # Run as `python -m maskaq.cli`: this file is __main__, so the CliError the subcommands raise
    # (maskaq.cli.CliError) is another class than ours; go through the imported module.
    from maskaq.cli import main as _main

    sys.exit(_main())
