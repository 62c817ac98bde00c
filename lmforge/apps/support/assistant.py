"""The assistant: building an app directory from an FAQ, and answering customer messages.

An app directory holds ``support.sqlite`` (everything the app keeps: :mod:`lmforge.apps.support.store`),
``index.npz`` (the FAQ embedding index the retriever loads) and ``encoder/`` (the lmforge encoder
run used for embeddings, all-MiniLM-L6-v2 by default) unless another encoder run was named.

How a customer message is handled (:meth:`Assistant.handle`):

1. personal data is masked before the message is stored;
2. a name the customer gives ("my name is Ana", "I'm Ana") is remembered for the customer;
3. if a human has the conversation, the message waits for them (no automatic answer);
4. an explicit request for a person, or a second "that did not help", hands the conversation off;
5. otherwise the FAQ is searched (hybrid dense + BM25); a short follow-up is also searched together
   with the customer's previous question, and the better match wins. At or above the threshold
   the FAQ answer is given (rephrased by a decoder with ``--generate``), recording which entries
   it used and the confidence; below it the conversation is handed off.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.apps.support.adapt import ADAPTED, adapt_encoder, faq_digest
from lmforge.apps.support.faq import read_faq
from lmforge.data.pii import KINDS, mask
from lmforge.apps.support.retrieval import LEXICAL_WEIGHT, Hit, QueryLikelihood, Retriever, load_encoder
from lmforge.apps.support.store import NotFound, Store
from lmforge.apps.support.writer import GROUNDING_ENTRIES, Writer
from lmforge.errors import UserError
from lmforge.progress import status

DEFAULT_THRESHOLD = 0.55  # until `lmforge support eval` fits one on labelled questions
MAX_MESSAGE_CHARS = 2000
FAILURES_BEFORE_HANDOFF = 2

HUMAN_REQUEST = re.compile(
    r"\b(?:talk|speak|chat|connect me|put me through|transfer me|hand me over)\b.{0,20}?\b(?:human|person|agent|"
    r"someone|somebody|representative|operator|staff|team)\b"
    r"|\b(?:want|need|get|give me|have)\b.{0,12}?\b(?:human|real person|agent|representative|operator)\b"
    r"|^\W*(?:human|agent|operator|representative|real person)(?: please)?\W*$", re.I)
NOT_HELPFUL = re.compile(r"\b(did ?n[o']?t help|does ?n[o']?t help|not helpful|not what i (?:asked|meant|need)|"
                         r"wrong answer|that'?s wrong|that is wrong|useless|does ?n[o']?t answer|you misunderstood)\b", re.I)
NAME = re.compile(r"\b(?i:my name is|my name's|i am|i'm|call me|this is)\s+([A-Z][a-zA-Z'-]{1,30})\b")
NOT_NAMES = {"Not", "Looking", "Trying", "Having", "Using", "Getting", "Sorry", "Fine", "Good", "Here", "Just", "So",
             "Still", "Unable", "New", "Confused", "Stuck", "Happy", "Interested", "The", "A", "An", "On", "In"}
GREETING = re.compile(r"^\W*(hi|hello|hey|good (?:morning|afternoon|evening)|thanks|thank you)\b", re.I)

HANDOFF_TEXT = {
    "requested": "Of course — I'm passing you to a member of our team. They will reply here shortly.",
    "low_confidence": "I'm not sure I can answer that correctly, so I've passed your question to a member of "
                      "our team. They will reply here shortly.",
    "repeated_failures": "Sorry that my answers did not help. I've passed the conversation to a member of our "
                         "team; they will reply here shortly.",
}


def base_encoder_dir(app_dir: Path, store: Store) -> Path:
    """The encoder the app was built from: ``encoder/`` (all-MiniLM-L6-v2) or the ``--encoder`` run."""
    name = store.get("encoder")
    return Path(name) if name and Path(name).is_absolute() else Path(app_dir) / (name or "encoder")


def encoder_dir_of(app_dir: Path, store: Store) -> Path:
    """The encoder the index is built with: the one adapted to the FAQ when init kept it, else the base."""
    if (store.get("adaptation") or {}).get("adapted"):
        return Path(app_dir) / ADAPTED
    return base_encoder_dir(app_dir, store)


NEAR_DUPLICATE = 0.95  # question embeddings this similar are reported as nearly the same question


def near_duplicates(entries, q_vectors: np.ndarray, limit: int = 20) -> list[dict]:
    """Pairs of entries whose questions' embeddings have cosine ≥ ``NEAR_DUPLICATE``, most similar
    first: questions a customer could mean either way, which the FAQ's owner may want to merge."""
    sim = np.triu(q_vectors @ q_vectors.T, 1)
    i, j = np.nonzero(sim >= NEAR_DUPLICATE)
    order = np.argsort(-sim[i, j], kind="stable")[:limit]
    return [{"ids": [entries[i[k]].id, entries[j[k]].id], "questions": [entries[i[k]].question, entries[j[k]].question],
             "cosine": round(float(sim[i[k], j[k]]), 4)} for k in order]


DEFAULT_ADAPT_SECONDS = 300.0


def init_app(faq_file: str | Path, app_dir: str | Path, encoder: str | Path | None = None,
             mask_kinds: list[str] | None = None, columns: dict[str, str] | None = None,
             on_duplicate: str = "first", adapt_seconds: float = DEFAULT_ADAPT_SECONDS,
             reranker: str | Path | None = None) -> dict:
    """Create or update an app directory from ``faq_file``; returns what changed, the repeated
    questions (handled as ``on_duplicate`` says: :func:`~lmforge.apps.support.faq.read_faq`), the
    nearly identical ones and the encoder's adaptation to the FAQ
    (:mod:`~lmforge.apps.support.adapt`, within ``adapt_seconds``; 0: none). ``reranker`` names a
    decoder run whose query likelihood reranks the best entries once ``support eval`` has fitted
    its weight (``"none"``: drop the app's reranker).

    The FAQ is read and validated first, so a bad file changes nothing. Re-running with a changed
    FAQ inserts, updates and deletes entries (re-embedding only those that changed — all of them
    when the encoder is adapted again) and keeps every conversation.
    """
    from lmforge.fsutil import atomic_path
    from lmforge.interop.hf_dir import default_encoder_dir, import_hf

    faq = read_faq(faq_file, **(columns or {}), on_duplicate=on_duplicate)
    entries = faq.entries
    app_dir = Path(app_dir)
    if app_dir.exists() and not app_dir.is_dir():
        raise UserError(f"{app_dir} exists and is not a directory")
    if app_dir.is_dir() and any(app_dir.iterdir()) and not (app_dir / "support.sqlite").is_file():
        raise UserError(f"{app_dir} exists, is not empty and is not a support app directory")
    if encoder is not None and not (Path(encoder) / "config.yaml").is_file():
        raise UserError(f"--encoder must be an lmforge encoder run directory (no config.yaml in {encoder})")
    if adapt_seconds < 0:
        raise UserError(f"--adapt-seconds must be 0 (no adaptation) or positive, got {adapt_seconds}")
    if reranker not in (None, "none"):
        QueryLikelihood(reranker)  # a run that cannot rerank is refused before anything is written
    store = Store(app_dir, create=True)
    try:
        previous = store.get("encoder")
        previous_dir = encoder_dir_of(app_dir, store) if previous is not None else None
        wanted = str(Path(encoder).resolve()) if encoder is not None else previous or "encoder"
        if wanted == "encoder" and not (app_dir / "encoder" / "config.yaml").is_file():
            status("importing the default encoder (all-MiniLM-L6-v2) into the app")
            import_hf(default_encoder_dir(), app_dir / "encoder")
        store.set("encoder", wanted)
        named = None if reranker in (None, "none") else str(Path(reranker).resolve())
        if reranker is not None and named != store.get("reranker"):
            store.set("reranker", named)
            store.set("rerank_weight", 0.0)  # until `support eval` fits one for it
        adaptation, readapted = store.get("adaptation"), False
        if adapt_seconds == 0:
            adaptation = {"adapted": False, "reason": "not asked for (--adapt-seconds 0)"}
        elif (adaptation or {}).get("faq") != faq_digest(entries) or adaptation.get("base") != wanted:
            adaptation = {**adapt_encoder(entries, base_encoder_dir(app_dir, store), app_dir, adapt_seconds),
                          "faq": faq_digest(entries), "base": wanted}
            readapted = adaptation["adapted"]
        store.set("adaptation", adaptation)
        # Every vector is recomputed when the encoder that made them is not the one in use now.
        new_encoder = previous is not None and (readapted or wanted != previous
                                                or encoder_dir_of(app_dir, store) != previous_dir)
        if mask_kinds is not None:
            store.set("mask", mask_kinds)
        elif store.get("mask") is None:
            store.set("mask", list(KINDS))
        if store.get("threshold") is None:
            store.set("threshold", DEFAULT_THRESHOLD)
        old = {} if new_encoder else store.faq_digests()
        todo = [e for e in entries if old.get(e.id) != e.digest]
        vectors = {}
        if todo:
            status(f"embedding {len(todo)} FAQ entries")
            embed = load_encoder(encoder_dir_of(app_dir, store))
            q = embed([e.question for e in todo])
            qa = embed([f"{e.question}\n{e.answer}" for e in todo])
            vectors = {e.id: (q[i], qa[i]) for i, e in enumerate(todo)}
        counts = store.sync_faq(entries, vectors, reembedded=new_encoder)
        if new_encoder and store.get("threshold") != DEFAULT_THRESHOLD:
            status("the encoder changed: the threshold and weights `support eval` fitted belong to the previous "
                   "one; run `lmforge support eval` again")
        if new_encoder or counts["added"] or counts["changed"] or counts["removed"]:
            store.set("faq_version", store.get("faq_version", 0) + 1)  # a running server reloads the FAQ
        all_entries, qv, qav = store.faq()
        with atomic_path(app_dir / "index.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=np.array([e.id for e in all_entries]), q=qv, qa=qav)
        if not adaptation["adapted"] and (app_dir / ADAPTED).is_dir():  # an earlier FAQ's, now unused
            shutil.rmtree(app_dir / ADAPTED, ignore_errors=True)
        return {"app_dir": str(app_dir), "entries": len(entries), **counts, "encoder": wanted,
                "threshold": store.get("threshold"), "mask": store.get("mask"), "on_duplicate": on_duplicate,
                "duplicates": faq.duplicates, "near_duplicates": near_duplicates(all_entries, qv),
                "adaptation": adaptation, "reranker": store.get("reranker")}
    finally:
        store.close()


@dataclass
class Reply:
    conversation_id: str
    status: str  # "assistant" or "human"
    messages: list[dict]  # what this call added: the customer's message, then any reply
    handoff_reason: str | None = None
    customer_token: str | None = None  # issued on a customer's first contact: required from then on


class Forbidden(Exception):
    """A customer read or write without that customer's token (HTTP 403)."""


def customer_token(secret: str, customer_id: str, kind: str = "site") -> str:
    """The token that proves a session speaks for ``customer_id``: HMAC-SHA256 under the app's
    secret. ``site`` tokens are what a deploying site signs for the customers it knows
    (``lmforge support token``); ``issued`` ones the app gives a new customer at first contact.
    Only site tokens may come in the page's address (``?customer=ID&token=T``), so that a link
    cannot seat a visitor in a conversation its author reads."""
    import hashlib
    import hmac

    return hmac.new(secret.encode(), f"{kind}:{customer_id}".encode(), hashlib.sha256).hexdigest()[:32]


class Assistant:
    """One app directory, loaded: the store, the retriever and (optionally) a decoder that rephrases."""

    def __init__(self, app_dir: str | Path, generate_run: str | Path | None = None):
        self.app_dir = Path(app_dir)
        self.store = Store(app_dir)
        self._encoders: dict[tuple, object] = {}
        self._rerankers: dict[str, QueryLikelihood] = {}
        self._version, self._retriever = None, None
        if not self.retriever.entries:
            raise UserError(f"{app_dir}: the FAQ is empty — run `lmforge support init`")
        self.mask_kinds = tuple(self.store.get("mask", list(KINDS)))
        self.generator = Writer(generate_run) if generate_run else None
        self.on_event = lambda kind, value=None: None  # set by the web app (metrics)
        self.secret = app_secret(self.store)
        self._hash_personal_ids()

    def _hash_personal_ids(self) -> None:
        """A store from before customer ids were checked for personal data may hold e-mail
        addresses or phone numbers as ids: each becomes its :meth:`stored_id` (its customer row
        and its conversations), all in one transaction, once."""
        with self.store.transaction() as db:
            for row in db.execute("SELECT id, name, created FROM customers").fetchall():
                new = self.stored_id(row["id"])
                if new == row["id"]:
                    continue
                db.execute("INSERT OR IGNORE INTO customers (id, name, created) VALUES (?, ?, ?)",
                           (new, row["name"], row["created"]))
                db.execute("UPDATE conversations SET customer_id = ? WHERE customer_id = ?", (new, row["id"]))
                db.execute("DELETE FROM customers WHERE id = ?", (row["id"],))

    @property
    def retriever(self) -> Retriever:
        """The retriever over the FAQ as the store has it now: ``support init`` run again while the
        server runs (a changed FAQ, another encoder) is picked up at the next message, and so is a
        lexical weight ``support eval`` saved."""
        version = self.store.get("faq_version", 0)
        if self._retriever is None or version != self._version:
            entries, q, qa = self.store.faq()
            # The adaptation's record changes when init adapted the encoder again (at the same path).
            encoder = (encoder_dir_of(self.app_dir, self.store), json.dumps(self.store.get("adaptation")))
            if encoder not in self._encoders:
                self._encoders = {encoder: load_encoder(encoder[0])}  # the previous one is not needed again
            self._retriever, self._version = Retriever(entries, q, qa, self._encoders[encoder]), version
        r = self._retriever
        r.lexical_weight = float(self.store.get("lexical_weight", LEXICAL_WEIGHT))
        r.rerank_weight = float(self.store.get("rerank_weight", 0.0))
        reranker = self.store.get("reranker")
        if reranker and (r.reranker is None or r.reranker.path != reranker):
            r.reranker = self._rerankers.get(reranker) or self._rerankers.setdefault(reranker, QueryLikelihood(reranker))
        elif not reranker:
            r.reranker = None
        return r

    def token(self, customer_id: str, kind: str = "site") -> str:
        return customer_token(self.secret, customer_id, kind)

    def stored_id(self, customer_id: str) -> str:
        """What the store keeps (and agents see) for a customer id: the id itself, or — when it
        is personal data (an e-mail address, a phone number: what the masker finds) — a keyed
        hash of it, so that the database and the agent page hold no address."""
        if mask(customer_id, KINDS) == customer_id:
            return customer_id
        return "h-" + customer_token(self.secret, customer_id, "id")[:24]

    def check_customer(self, customer_id: str, token: str | None, from_address: bool = False) -> str:
        """``customer_id`` (validated) if ``token`` is its own — a site token, or (not from the page's
        address) the token the app issued; else :class:`Forbidden`."""
        import hmac

        customer_id = validate_id(customer_id, "customer_id")
        kinds = ("site",) if from_address else ("site", "issued")
        if not token or not any(hmac.compare_digest(token, self.token(customer_id, k)) for k in kinds):
            raise Forbidden(f"this request needs customer {customer_id!r}'s token (X-Customer-Token)")
        return customer_id

    @property
    def threshold(self) -> float:
        return float(self.store.get("threshold", DEFAULT_THRESHOLD))

    def mask(self, text: str) -> str:
        return mask(text, self.mask_kinds)

    # ----------------------------------------------------------------------------- customers
    def handle(self, customer_id: str, text: str, conversation_id: str | None = None,
               client_message_id: str | None = None, token: str | None = None, from_address: bool = False,
               check: bool = False, on_text=None) -> Reply:
        """Store the customer's message and the reply to it — together, in one transaction, so a
        kill never leaves a question unanswered. A retry with the same ``client_message_id`` (the
        client's idempotency key) returns what the first attempt stored instead of storing it twice.
        With ``check`` (the web API): a known customer must bring their ``token``
        (:meth:`check_customer`); a new one is issued theirs in the reply. ``on_text`` is given a
        written answer's text while the decoder writes it (``--generate``; the stored reply is
        what the call returns)."""
        text = validate_text(text)
        customer_id = validate_id(customer_id, "customer_id")
        sid = self.stored_id(customer_id)
        key = None
        if client_message_id is not None:  # stored per customer: two customers may use the same keys
            key = f"{sid}/{validate_id(client_message_id, 'client_message_id')}"
        issued = None
        if check and (token or self.store.customer(sid) is not None):
            try:
                self.check_customer(customer_id, token, from_address)
            except Forbidden:
                # The retry of a customer's very first message, whose reply (with the token) was
                # lost: its idempotency key proves it is the same client.
                if key is None or self.store.first_key(sid) != key:
                    raise
                issued = self.token(customer_id, "issued")
        elif check:
            issued = self.token(customer_id, "issued")
        reply = self._handle(sid, text, conversation_id, key, on_text)
        reply.customer_token = issued
        return reply

    def _handle(self, customer_id: str, text: str, conversation_id: str | None, key: str | None,
                on_text=None) -> Reply:
        """:meth:`handle` once the customer is known: ``customer_id`` is the stored id."""
        if key is not None:
            stored = self.store.exchange(customer_id, key)
            if stored is not None:
                return Reply(**stored)
        conv = self.store.open_conversation(customer_id, conversation_id)
        cid = conv["id"]
        earlier = self.store.messages(cid)
        masked = self.mask(text)
        name = find_name(text)
        replies, status, reason = self._reply(customer_id, conv, earlier, text, masked, name, on_text)
        customer = {"role": "customer", "text": masked, "client_message_id": key}
        try:
            added = self.store.add_messages(cid, [customer] + replies, customer_id=customer_id, customer_name=name)
        except sqlite3.IntegrityError:  # the same key arrived twice at once: the other one was stored
            if key is None:
                raise
            return Reply(**self.store.exchange(customer_id, key))
        self.on_event("customer_message")
        if reason:
            self.on_event("handoff", reason)
        elif replies and replies[-1].get("faq_ids") and status == "assistant":
            self.on_event("answered", replies[-1]["confidence"])
        return Reply(cid, status, added, reason)

    def _reply(self, customer_id: str, conv: dict, earlier: list[dict], text: str, masked: str,
               name: str | None, on_text=None) -> tuple[list[dict], str, str | None]:
        """(the replies to store after the customer's message, the conversation's status, the
        handoff reason or None) — nothing is written here."""
        if conv["status"] == "human":
            return [], "human", None
        if HUMAN_REQUEST.search(text):
            return self._handoff("requested"), "human", "requested"
        if NOT_HELPFUL.search(text):
            failures = conv["failures"] + 1
            if failures >= FAILURES_BEFORE_HANDOFF:
                return self._handoff("repeated_failures", failures=failures), "human", "repeated_failures"
            return [{"role": "assistant", "text": "Sorry about that. Could you tell me a bit more about what you "
                     "need, in other words?", "update": {"failures": failures}}], "assistant", None
        rest = NAME.sub("", GREETING.sub("", text)).strip(" ,.!?-")
        if (name or GREETING.match(text)) and len(rest.split()) < 3:
            who = name or (self.store.customer(customer_id) or {}).get("name")
            return [{"role": "assistant", "text": f"Hello{' ' + who if who else ''}! What can I help you with?"}], \
                "assistant", None
        previous = [m for m in earlier if m["role"] == "customer"]
        hits = self.retriever.search(masked)
        if previous and hits and hits[0].score < self.threshold and len(masked.split()) <= 8:
            # A short follow-up ("and on Windows?") read together with the previous question.
            joined = self.retriever.search(previous[-1]["text"] + " " + masked)
            if joined and joined[0].score > hits[0].score:
                hits = joined
        if not hits or hits[0].score < self.threshold:
            return self._handoff("low_confidence", hits=hits), "human", "low_confidence"
        answered_before = any(m["role"] == "assistant" and m["faq_ids"] and m["confidence"] is not None
                              and m["confidence"] >= self.threshold for m in earlier)
        answer, used = self._answer(customer_id, text, hits, first=not answered_before, name=name, on_text=on_text)
        return [{"role": "assistant", "text": answer, "faq_ids": [h.entry.id for h in used],
                 "confidence": hits[0].score}], "assistant", None

    def _answer(self, customer_id: str, question: str, hits: list[Hit], first: bool,
                name: str | None = None, on_text=None) -> tuple[str, list[Hit]]:
        """(the answer, the entries it came from): the best entry's answer, or (with
        ``--generate``) the decoder's answer from the best entries over the threshold as far as it
        is grounded in them (given to ``on_text`` sentence by sentence while it is written); with
        the customer's name on the first answer."""
        answer, used = hits[0].entry.answer, hits[:1]
        name = name or (self.store.customer(customer_id) or {}).get("name")
        greeting = f"Thanks, {name}. " if name and first else ""
        if self.generator is not None:
            given = [h for h in hits[:GROUNDING_ENTRIES] if h.score >= self.threshold]
            shown = []

            def show(sentence: str) -> None:
                if on_text is not None:
                    on_text(("" if shown else greeting) + sentence)
                shown.append(sentence)
            try:
                written = self.generator.rephrase(question, [h.entry for h in given], on_text=show)
            except Exception as e:  # noqa: BLE001 - a failing decoder must not cost the customer the answer
                import sys

                print(f"[lmforge] support: generation failed ({type(e).__name__}: {e}); answering from the FAQ",
                      file=sys.stderr, flush=True)
                self.on_event("generation_failed")
                written = ""
            if written:
                answer, used = written, given
        return greeting + answer, used

    @staticmethod
    def _handoff(reason: str, hits: list[Hit] | None = None, **extra) -> list[dict]:
        best = hits[0] if hits else None
        return [{"role": "assistant", "text": HANDOFF_TEXT[reason], "faq_ids": [best.entry.id] if best else None,
                 "confidence": best.score if best else None,
                 "update": {"status": "human", "handoff_reason": reason, **extra}}]

    def conversation(self, conversation_id: str, customer_id: str | None = None, after: int = 0) -> dict:
        conv = self.store.conversation(validate_id(conversation_id, "conversation id"))
        if customer_id is not None and conv["customer_id"] != self.stored_id(customer_id):
            raise NotFound(f"no conversation {conversation_id!r} for customer {customer_id!r}")
        return {**conv, "messages": self.store.messages(conv["id"], after)}

    def history(self, customer_id: str) -> dict:
        customer_id = validate_id(customer_id, "customer_id")
        sid = self.stored_id(customer_id)
        customer = self.store.customer(sid) or {"id": sid, "name": None}
        return {"customer_id": customer_id, "name": customer.get("name"),
                "conversations": [{**c, "customer_id": customer_id, "messages": self.store.messages(c["id"])}
                                  for c in self.store.conversations_of(sid)]}

    # -------------------------------------------------------------------------------- agents
    def agent_reply(self, conversation_id: str, text: str) -> dict:
        text = validate_text(text)
        conv = self.store.conversation(validate_id(conversation_id, "conversation id"))
        # An agent's reply is stored as written (agents may need to quote details back).
        msg = self.store.add_message(conv["id"], "agent", text, status="human")
        self.on_event("agent_message")
        return msg

    def hand_back(self, conversation_id: str) -> dict:
        conv = self.store.conversation(validate_id(conversation_id, "conversation id"))
        return self.store.add_message(conv["id"], "assistant", "You're back with the assistant — ask me anything.",
                                      status="assistant", failures=0, handoff_reason=None)

    def export(self, conversation_id: str) -> dict:
        """A conversation with masking applied again (in case the settings became stricter)."""
        conv = self.conversation(conversation_id)
        customer = self.store.customer(conv["customer_id"]) or {}
        return {"conversation_id": conv["id"], "customer_id": conv["customer_id"], "customer_name": customer.get("name"),
                "status": conv["status"], "handoff_reason": conv["handoff_reason"], "created": conv["created"],
                "messages": [{**m, "text": self.mask(m["text"])} for m in conv["messages"]]}


def app_secret(store: Store) -> str:
    """The app's secret for customer tokens, made once and kept in its store."""
    import secrets

    secret = store.get("customer_secret")
    if not secret:
        secret = secrets.token_hex(32)
        store.set("customer_secret", secret)
    return secret


def find_name(text: str) -> str | None:
    m = NAME.search(text)
    return m.group(1) if m and m.group(1) not in NOT_NAMES else None


def validate_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the message is empty")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValueError(f"the message has {len(text)} characters; at most {MAX_MESSAGE_CHARS}")
    return text.strip()


def validate_id(value, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,128}", value):
        raise ValueError(f"{what} must be 1-128 letters, digits or _.:@-")
    return value
