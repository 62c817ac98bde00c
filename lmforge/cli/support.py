"""lmforge support: the customer-service assistant (FAQ answers, memory, human handoff).

Build it from an FAQ (``init``), evaluate it on labelled questions (``eval``), serve the customer
and agent pages (``serve``), export conversations (``export``), or all at once on the built-in FAQ
(``quickstart``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import AccessOptions, access_settings, check_port, print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "the customer-service assistant (FAQ answers, memory, human handoff)"
SUPPORT_DATA = Path(__file__).resolve().parent.parent / "apps" / "support" / "data"
ENCODER_HELP = "an lmforge encoder run (default: all-MiniLM-L6-v2, imported into the app)"
ADAPT_HELP = ("seconds to fine-tune the encoder on the FAQ's own text, kept only when it helps on held-out "
              "entries (default 300; 0: use the encoder as it is)")
MASK_HELP = ("personal data masked in stored messages (lmforge/data/pii.py): a comma-separated list of "
             "email, phone, card, iban, ip, url; all (the default) or none")


@dataclass
class InitOptions:
    faq: str = flag(None, required=True, help="question/answer rows (.csv/.jsonl) or '## question' Markdown")
    out: str = flag(None, required=True, help="the app directory (updated in place if it exists)")
    question_column: str = flag("question")
    answer_column: str = flag("answer")
    id_column: str = flag("id")
    category_column: str = flag("category")
    encoder: str | None = flag(help=ENCODER_HELP)
    mask: str | None = flag(help=MASK_HELP)
    adapt_seconds: float = flag(300.0, help=ADAPT_HELP)
    reranker: str | None = flag(metavar="DECODER_RUN", help="a decoder run (e.g. SmolLM2 from import-gguf) whose "
                                "query likelihood reranks the best entries, once `support eval` has fitted its "
                                "weight (kept only where it wins); none: remove it")
    on_duplicate: str = flag("first", choices=["first", "merge", "error"],
                             help="a question the FAQ repeats: keep the first entry (the default, with a warning), "
                                  "merge their answers into the first, or refuse the file")
    json: bool = flag(False)


@dataclass
class TokenOptions:
    app_dir: str = flag(positional=True)
    customer: str = flag(None, required=True, help="the customer id your site knows")
    json: bool = flag(False)


@dataclass
class QuickstartOptions:
    out: str = flag("runs/support", help="the app directory (default runs/support)")
    encoder: str | None = flag(help=ENCODER_HELP)
    adapt_seconds: float = flag(300.0, help=ADAPT_HELP)
    mask: str | None = flag(help=MASK_HELP)
    json: bool = flag(False)


@dataclass
class EvalOptions:
    app_dir: str = flag(positional=True)
    questions: str = flag(None, required=True, help='JSONL {"question": ..., "faq_id": ID | [IDS] | "none"}')
    no_save: bool = flag(False, help="do not save the fitted threshold to the app")
    generate: str | None = flag(metavar="DECODER_RUN", help="also write a reply to each answered question with this "
                                "decoder (as `support serve --generate` does) and report how faithful the replies "
                                "are to the entries they cite")
    json: bool = flag(False)


@dataclass
class ServeOptions(AccessOptions):
    app_dir: str = flag(positional=True)
    host: str = flag("127.0.0.1")
    port: int = flag(8100)
    api_key: str | None = flag(help="required on every customer endpoint but /health (default: $LMFORGE_API_KEY)")
    agent_key: str | None = flag(help="the agent pages' key (default: $LMFORGE_AGENT_KEY, else a random one printed)")
    generate: str | None = flag(metavar="RUN_DIR", help="a GPT run that rephrases the FAQ answers")
    max_concurrency: int = flag(32)
    allowed_host: list[str] | None = flag(append=True, metavar="NAME", help="also answer requests whose Host is "
                                          "NAME (bound to 127.0.0.1, only loopback names are answered otherwise)")


@dataclass
class ExportOptions:
    app_dir: str = flag(positional=True)
    conversation: str | None = flag(help="a conversation id")
    customer: str | None = flag(help="every conversation of this customer")
    out: str | None = flag(help="write to this file (default: stdout)")


def summary_line(r: dict) -> str:
    if r["top1"] is None:
        return f"no covered questions among {r['n_questions']}: nothing to rank, threshold and weight kept"
    stages = ", ".join(f"{k} {v['top1']:.3f}" for k, v in r["stages"].items())
    head = (f"top-1 {r['top1']:.3f} (5-fold cross-validated {r['top1_cv']:.3f}), MRR@5 {r['mrr5']:.3f} on "
            f"{r['n_covered']} covered questions; top-1 by stage: {stages} (lexical weight {r['lexical_weight']})")
    if r.get("handoff_precision") is None:
        return head + "; none uncovered: threshold and weight kept"
    return (f"{head}; handoff on {r['n_uncovered']} uncovered: precision {r['handoff_precision']:.3f}, recall "
            f"{r['handoff_recall']:.3f} at threshold {r['threshold']:.3f} (5-fold cross-validated: "
            f"{r['handoff_precision_cv']:.3f} / {r['handoff_recall_cv']:.3f})")


def _init(faq, out: str, encoder, mask, columns, as_json: bool, evaluate: bool, on_duplicate: str = "first",
          adapt_seconds: float = 300.0, reranker: str | None = None) -> int:
    from lmforge.apps.support.assistant import init_app
    from lmforge.data.pii import parse_kinds
    from lmforge.progress import status

    r = init_app(faq, out, encoder, parse_kinds(mask) if mask else None, columns, on_duplicate, adapt_seconds, reranker)
    for d in r["duplicates"]:
        status(f"{faq}: the question {d['question']!r} appears {len(d['lines'])} times (entries "
               f"{', '.join(map(str, d['lines']))}): {'merged into' if on_duplicate == 'merge' else 'kept'} "
               f"{d['kept']!r}, dropped {', '.join(repr(i) for i in d['dropped'])}")
    for n in r["near_duplicates"]:
        status(f"nearly the same question (cosine {n['cosine']:.3f}): {n['ids'][0]!r} {n['questions'][0]!r} and "
               f"{n['ids'][1]!r} {n['questions'][1]!r}")
    if evaluate:
        from lmforge.apps.support.evaluate import evaluate_support

        r["eval"] = evaluate_support(out, SUPPORT_DATA / "questions.jsonl")
        r["eval"].pop("questions")
    if as_json:
        print_json(r)
    else:
        print(f"support app {r['app_dir']}: {r['entries']} FAQ entries ({r['added']} added, {r['changed']} changed, "
              f"{r['removed']} removed, {r['unchanged']} unchanged); masking {', '.join(r['mask']) or 'off'}")
        a = r["adaptation"]
        print("encoder " + ("adapted to the FAQ" if a["adapted"] else f"not adapted: {a['reason']}")
              + (f" (held-out question -> answer MRR {a['held_out_mrr_before']:.3f} -> {a['held_out_mrr_after']:.3f})"
                 if "held_out_mrr_after" in a else "")
              + (f"; reranker {r['reranker']} (its weight is fitted by `support eval`)" if r["reranker"] else ""))
        if "eval" in r:
            print("evaluated on the built-in questions: " + summary_line(r["eval"]))
        print(f"serve it: lmforge support serve {r['app_dir']} --agent-key KEY   (customer page /, agents /agent)")
    return 0


def run_init(o: InitOptions) -> int:
    """Build (or update: added, changed and removed entries, conversations kept) an app directory from an FAQ."""
    columns = {"question_column": o.question_column, "answer_column": o.answer_column, "id_column": o.id_column,
               "category_column": o.category_column}
    return _init(o.faq, o.out, o.encoder, o.mask, columns, o.json, evaluate=False, on_duplicate=o.on_duplicate,
                 adapt_seconds=o.adapt_seconds, reranker=o.reranker)


def run_quickstart(o: QuickstartOptions) -> int:
    """An app from the built-in FAQ about lmforge, evaluated on its held-out questions."""
    return _init(SUPPORT_DATA / "faq.jsonl", o.out, o.encoder, o.mask, None, o.json, evaluate=True,
                 adapt_seconds=o.adapt_seconds)


def run_eval(o: EvalOptions) -> int:
    """Top-1, MRR@5 and the handoff threshold on labelled questions."""
    from lmforge.apps.support.evaluate import evaluate_support

    r = evaluate_support(o.app_dir, o.questions, save=not o.no_save, generate_run=o.generate)
    if o.json:
        print_json(r)
    else:
        g = r.get("generation")
        if g is not None:
            share = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"written replies on {g['n_answered']} answered questions: {share(g['written_share'])} written, "
                  f"{share(g['grounded_share'])} grounded (sent), content words supported by the cited entries "
                  f"{share(g['supported_mean'])} (verbatim answer: 1.000); cited entries include the expected one "
                  f"{share(g['cites_expected_share'])} (verbatim: {share(g['verbatim_expected_share'])})")
        for q in r["questions"]:
            if q["expected"] != "none" and (not q["top"] or q["top"][0] not in q["expected"]):
                print(f"  miss: {q['question']!r} -> {q['top'][:1]} (expected {q['expected']})")
        print(summary_line(r) + ("; weight and threshold saved" if r["threshold_saved"] else ""))
    return 0


def run_token(o: TokenOptions) -> int:
    """The token that lets a session speak for a customer your site knows: open the customer page
    as /?customer=ID&token=TOKEN (or send it as X-Customer-Token)."""
    from lmforge.apps.support.assistant import app_secret, customer_token, validate_id
    from lmforge.apps.support.store import Store

    try:
        customer = validate_id(o.customer, "--customer")
    except ValueError as e:
        raise UserError(str(e)) from None
    store = Store(o.app_dir)
    try:
        token = customer_token(app_secret(store), customer)
    finally:
        store.close()
    if o.json:
        print_json({"customer_id": customer, "token": token})
    else:
        print(token)
    return 0


def run_export(o: ExportOptions) -> int:
    """Conversations as JSON, with masking applied."""
    from lmforge.apps.support.assistant import Assistant
    from lmforge.apps.support.store import NotFound
    from lmforge.fsutil import write_json

    assistant = Assistant(o.app_dir)
    try:
        ids = [o.conversation] if o.conversation else \
            [c["id"] for c in assistant.history(o.customer)["conversations"]] if o.customer else None
        if ids is None:
            raise UserError("export needs --conversation ID or --customer ID")
        out = {"conversations": [assistant.export(i) for i in ids]}
    except (NotFound, ValueError) as e:
        raise UserError(str(e)) from None
    if o.out:
        write_json(o.out, out)
        print(f"exported {len(ids)} conversation(s) to {o.out}", file=sys.stderr)
    else:
        print_json(out)
    return 0


def run_serve(o: ServeOptions) -> int:
    """The customer page (/), the agent page (/agent), the JSON API, /health and /metrics."""
    from lmforge.apps.support.app import serve

    check_port(o.port, o.host)
    if o.max_concurrency <= 0:
        raise UserError("--max-concurrency must be positive")
    if not (Path(o.app_dir) / "support.sqlite").is_file():
        raise UserError(f"not a support app directory (no support.sqlite): {o.app_dir}")
    key = o.api_key or os.environ.get("LMFORGE_API_KEY") or None
    agent_key = o.agent_key or os.environ.get("LMFORGE_AGENT_KEY") or None
    access = access_settings(o)
    print(f"lmforge support: {o.app_dir} on {'https' if access['ssl'] else 'http'}://{o.host}:{o.port}/ "
          "(agents: /agent)", file=sys.stderr, flush=True)
    serve(o.app_dir, o.host, o.port, key, agent_key, o.generate, o.max_concurrency, o.allowed_host, **access)
    return 0


ACTIONS = {
    "init": (InitOptions, run_init, "build or update an app directory from an FAQ (.csv, .jsonl or .md)"),
    "quickstart": (QuickstartOptions, run_quickstart,
                   "an app from the built-in FAQ about lmforge, evaluated on its held-out questions"),
    "eval": (EvalOptions, run_eval, "top-1, MRR@5 and the handoff threshold on labelled questions"),
    "serve": (ServeOptions, run_serve, "customer chat (/), agent page (/agent), JSON API, /health, /metrics"),
    "export": (ExportOptions, run_export, "conversations as JSON, with masking applied"),
    "token": (TokenOptions, run_token, "the token a site gives the customer page for a customer it knows"),
}
