"""lmforge chat: chat with a generator run in the terminal."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import DECODE_COMPILE_HELP
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "chat with a GPT run in the terminal"


@dataclass
class Options:
    run_dir: str = flag(positional=True)
    temperature: float = flag(0.8)
    top_p: float | None = flag()
    max_tokens: int = flag(200)
    system: str | None = flag(help="a system message opening every conversation")
    seed: int | None = flag()
    compile: bool = flag(False, help=DECODE_COMPILE_HELP)


def run(o: Options) -> int:
    """Chat with a GPT run in the terminal (the run's chat template, answers streamed as they come).
    Reads one user turn per line; /reset starts a new conversation, /quit or Ctrl-D ends."""
    from lmforge.chat import chat_loop

    if not 0 <= o.temperature <= 2:
        raise UserError(f"--temperature must be in 0..2, got {o.temperature}")
    if o.max_tokens <= 0:
        raise UserError("--max-tokens must be positive")
    return chat_loop(o.run_dir, o.temperature, o.max_tokens, o.system, o.seed, o.top_p, compile=o.compile)
