"""The ``lmforge`` command line: one module per verb, one table of verbs.

Each verb module declares ``HELP``, an ``Options`` dataclass (its flags, declared once:
``cli/options.py``) and ``run(opts) -> exit code``; a verb with actions (``bench train``,
``support init``) declares ``ACTIONS = {name: (Options, run, help)}`` instead. Verb modules import
nothing heavy at the top, so ``lmforge --help`` is instant. Bad input raises
:class:`~lmforge.errors.UserError`, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge.cli.options import add_options, from_args
from lmforge.errors import UserError

# verb -> the module that implements it (imported when the parser is built)
VERBS = {
    "prepare": "lmforge.cli.prepare",
    "train": "lmforge.cli.train",
    "eval": "lmforge.cli.eval",
    "predict": "lmforge.cli.predict",
    "generate": "lmforge.cli.generate",
    "embed": "lmforge.cli.embed",
    "explain": "lmforge.cli.explain",
    "compress": "lmforge.cli.compress",
    "export": "lmforge.cli.export",
    "federate": "lmforge.cli.federate",
    "serve": "lmforge.cli.serve",
    "chat": "lmforge.cli.chat",
    "quickstart": "lmforge.cli.quickstart",
    "import-hf": "lmforge.cli.hf",
    "export-hf": "lmforge.cli.hf",
    "import-gguf": "lmforge.cli.hf",
    "export-gguf": "lmforge.cli.hf",
    "merge-lora": "lmforge.cli.lora",
    "bench": "lmforge.cli.bench",
    "support": "lmforge.cli.support",
    "keys": "lmforge.cli.keys",
}


def _verb_module(verb: str):
    return importlib.import_module(VERBS[verb])


def _add(sub, name: str, options: type, run, help_: str, description: str | None) -> None:
    p = sub.add_parser(name, help=help_, description=description or help_)
    add_options(p, options)
    p.set_defaults(_options=options, _run=run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="From raw data to a trained, evaluated, served "
                                "model: prepare, train, eval, generate, serve, and the apps on top.")
    p.add_argument("--version", action="version", version=f"lmforge {__import__('lmforge').__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        m = _verb_module(verb)
        spec = getattr(m, "VERB_SPECS", {}).get(verb)  # a module serving several verbs
        if spec is not None:
            options, run, help_ = spec
            _add(sub, verb, options, run, help_, run.__doc__)
        elif hasattr(m, "ACTIONS"):
            v = sub.add_parser(verb, help=m.HELP, description=m.__doc__.split("\n\n")[0])
            act = v.add_subparsers(dest="action", metavar="ACTION", required=True)
            for name, (options, run, help_) in m.ACTIONS.items():
                _add(act, name, options, run, help_, run.__doc__)
        else:
            _add(sub, verb, m.Options, m.run, m.HELP, m.run.__doc__)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(from_args(args._options, args)) or 0
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
