"""The verb list is part of the interface: adding or removing one must be deliberate."""

import subprocess
import sys

from lmforge.cli import VERBS, build_parser

EXPECTED_VERBS = ["prepare", "train", "eval", "predict", "generate", "embed", "explain", "compress", "export", "federate", "serve", "chat",
                  "quickstart", "import-hf", "export-hf", "import-gguf", "export-gguf", "merge-lora", "bench", "support", "keys"]


def test_verbs_are_pinned():
    assert list(VERBS) == EXPECTED_VERBS
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert list(sub.choices) == EXPECTED_VERBS


def test_help_lists_every_verb_and_each_verb_has_help():
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in EXPECTED_VERBS:
        assert verb in out.stdout
        r = subprocess.run([sys.executable, "-m", "lmforge", verb, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: lmforge " + verb in r.stdout


def test_loading_the_commands_and_models_leaves_dynamo_unimported():
    # Importing torch._dynamo costs ~1.4 s, which every command would pay. Only compiling
    # (lmforge.device.compile_fn) may import it.
    code = ("import sys, pkgutil, importlib, lmforge.cli, lmforge.models, lmforge.generate, lmforge.train.trainer\n"
            "for m in pkgutil.iter_modules(lmforge.models.__path__): importlib.import_module('lmforge.models.' + m.name)\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
