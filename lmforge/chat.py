"""Chat templates and ``lmforge chat``, the terminal chat.

A chat template turns a conversation into the prompt a decoder continues. It lives in the run
directory as ``chat_template.json``: either ``system``/``user``/``assistant`` formats with
``{content}`` and the ``generation_prompt`` that opens the answer, or (an imported model's own)
a Jinja template under ``jinja``, rendered as Hugging Face's ``apply_chat_template`` renders it;
with ``stop`` strings and an ``end_token`` that end an answer. Without a file,
:data:`DEFAULT_CHAT_TEMPLATE` is used. ``lmforge serve``, ``lmforge chat`` and the support app
render alike.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

from lmforge.errors import UserError

# Each message on its own lines after a role marker, then the assistant marker; generation stops
# at the next role marker.
DEFAULT_CHAT_TEMPLATE = {"system": "### System:\n{content}\n\n", "user": "### User:\n{content}\n\n",
                         "assistant": "### Assistant:\n{content}\n\n", "generation_prompt": "### Assistant:\n",
                         "stop": ["### User:", "### System:"]}


# The tasks that teach a decoder to answer in its chat template.
CHAT_TASKS = ("sft", "dpo")
NOT_CHAT_TRAINED = ("was never trained on conversations (no --task sft or dpo in its history, no chat template of "
                    "its own): its chat answers will read like its training text, or be empty; instruction-tune "
                    "it first (lmforge train --task sft --init RUN --data CHATS.jsonl)")


def chat_trained(run_dir: str | Path, depth: int = 8) -> bool:
    """Whether a run's decoder learned to answer in its chat template: it was instruction- or
    preference-tuned, was imported with a template of its own (an instruct model's Jinja), or
    continues (``task.init``) a run that was."""
    from lmforge.runs import RunDir

    rd = RunDir(run_dir)
    if not rd.is_run():
        return False
    cfg = rd.load_config()
    if cfg.task.name in CHAT_TASKS or "jinja" in load_chat_template(run_dir):
        return True
    init = getattr(cfg.task, "init", None)
    return bool(init) and depth > 0 and chat_trained(init, depth - 1)


def load_chat_template(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "chat_template.json"
    if not path.is_file():
        return DEFAULT_CHAT_TEMPLATE
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(template, dict):
        raise UserError(f"{path}: not a JSON object")
    if "jinja" in template:
        if not isinstance(template["jinja"], str):
            raise UserError(f"{path}: 'jinja' must be a string")
        _compiled(template["jinja"], str(path))
        return template
    missing = [k for k in ("system", "user", "assistant", "generation_prompt") if not isinstance(template.get(k), str)]
    if missing:
        raise UserError(f"{path}: missing string field(s) {', '.join(missing)}")
    return template


def jinja_chat_template(template: dict) -> str:
    """The same template as a Jinja chat template (what Hugging Face's ``apply_chat_template`` and
    vLLM-style servers use): ``messages`` with ``role`` and ``content``, and ``add_generation_prompt``.
    It renders exactly what :func:`render_chat` renders; a ``developer`` message renders as ``system``."""
    if "jinja" in template:
        return template["jinja"]
    def jinja(fmt: str) -> str:  # literal text as Jinja string expressions: no character of it is syntax
        parts = []
        for literal, field, _, _ in string.Formatter().parse(fmt):
            if literal:
                parts.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
            if field is not None:
                parts.append("{{ message['content'] }}")
        return "".join(parts)
    branches = "".join(f"{'{% if' if k == 0 else '{% elif'} role == '{role}' %}}{jinja(template[role])}"
                       for k, role in enumerate(("system", "user", "assistant")))
    return ("{% for message in messages %}{% set role = 'system' if message['role'] == 'developer' "
            "else message['role'] %}" + branches + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + jinja(template["generation_prompt"]) + "{% endif %}")


def save_chat_template(run_dir: str | Path, template: dict | None = None) -> None:
    """Store the chat template in the run directory (edit the file to change how chats render)."""
    from lmforge.fsutil import write_json

    write_json(Path(run_dir) / "chat_template.json", template or DEFAULT_CHAT_TEMPLATE)


def render_chat(template: dict, messages: list[dict], generation_prompt: bool = True) -> str:
    """The prompt for ``messages`` (dicts with ``role`` and ``content``), ending with the answer's
    opening (without it when ``generation_prompt`` is false: a finished conversation, to train on)."""
    if "jinja" in template:
        try:
            return _compiled(template["jinja"]).render(
                messages=messages, add_generation_prompt=generation_prompt, tools=None, documents=None,
                **{k: template.get(k, "") for k in ("bos_token", "eos_token")})
        except UserError:
            raise
        except Exception as e:  # the template's own raise_exception, or a bad field it reads
            raise UserError(f"the chat template cannot render these messages: {e}") from None
    return "".join(template[m["role"]].format(content=m["content"]) for m in messages) + \
        (template["generation_prompt"] if generation_prompt else "")


def end_token_id(template: dict, tokenizer) -> int | None:
    """The id of the token that ends an answer: the template's ``end_token`` (an imported chat
    model's end of turn, e.g. ``<|im_end|>``), else the end-of-text token; None if neither exists."""
    from lmforge.data.tokenizer import EOT

    return tokenizer.token_to_id(template.get("end_token") or EOT)


_jinja_cache: dict[str, object] = {}


def _compiled(source: str, where: str = "the chat template"):
    """A Jinja template compiled in a sandbox (a template from a downloaded file runs no Python),
    with the environment Hugging Face's ``apply_chat_template`` gives one."""
    if source not in _jinja_cache:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise UserError(f"the chat template refuses these messages: {message}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            _jinja_cache[source] = env.from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"{where}: not a valid Jinja template ({e})") from None
    return _jinja_cache[source]


def chat_loop(run_dir: str | Path, temperature: float = 0.8, max_tokens: int = 200, system: str | None = None,
              seed: int | None = None, top_p: float | None = None, stdin=None, stdout=None,
              compile: bool = False) -> int:
    """Read user turns from ``stdin`` and stream the answers to ``stdout`` until EOF or ``/quit``.

    ``/reset`` starts a new conversation. The oldest turns are dropped when the conversation no
    longer fits the model's context with room for ``max_tokens``. ``compile``: the decode step is
    compiled (at the first answer), as for ``lmforge generate --compile``.
    """
    from lmforge.generate import SamplingParams, stream_text
    from lmforge.runs import load_run

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    run = load_run(run_dir)
    if not run.model.can_generate or getattr(run.model.config, "num_labels", 0):
        raise UserError(f"{run_dir} is not a text generator (chat needs a decoder run: GPT or Llama)")
    template = load_chat_template(run_dir)
    if not chat_trained(run_dir):
        from lmforge.progress import status

        status(f"warning: {Path(run_dir).name} {NOT_CHAT_TRAINED}")
    eot = end_token_id(template, run.tokenizer)
    context = run.model.config.block_size
    interactive = stdin.isatty()
    history: list[dict] = []
    if interactive:
        print(f"lmforge chat · {Path(run_dir).name} (context {context} tokens) — /reset starts over, /quit or "
              f"Ctrl-D ends", file=stdout)
    turn = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            history = []
            print("(new conversation)", file=stdout)
            continue
        history.append({"role": "user", "content": text})
        head = [{"role": "system", "content": system}] if system else []
        while True:  # drop the oldest turns until the prompt leaves room for the answer
            ids = run.tokenizer.encode(render_chat(template, head + history), add_special_tokens=False).ids
            if len(ids) + min(max_tokens, context // 2) <= context or len(history) == 1:
                break
            history = history[2:] if len(history) > 2 else history[-1:]
        ids = ids[-(context - 1):]
        stdout.write("assistant> " if interactive else "")
        pieces = []
        gen = stream_text(run.model, run.tokenizer, "", SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=None if seed is None else seed + turn,
            eos_id=eot, stop=tuple(template.get("stop", []))), prompt_ids=ids, compile=compile)
        for piece in gen:
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
