"""The support app's store: one SQLite database holds everything the app keeps — settings, the FAQ
with its embeddings, customers, conversations and messages.

All access goes through one connection guarded by a lock, and every change is one transaction, so
concurrent conversations never interleave half-written state: each message is stored exactly
once, with a per-conversation sequence number that gives its order.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lmforge.apps.support.faq import FaqEntry
from lmforge.errors import UserError

DB_FILE = "support.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS faq (
    id TEXT PRIMARY KEY, question TEXT NOT NULL, answer TEXT NOT NULL, category TEXT NOT NULL DEFAULT '',
    digest TEXT NOT NULL, q_vector BLOB NOT NULL, qa_vector BLOB NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS customers (id TEXT PRIMARY KEY, name TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, customer_id TEXT NOT NULL REFERENCES customers(id),
    status TEXT NOT NULL CHECK (status IN ('assistant', 'human')),
    failures INTEGER NOT NULL DEFAULT 0, handoff_reason TEXT, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL REFERENCES conversations(id),
    seq INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('customer', 'assistant', 'agent')),
    text TEXT NOT NULL, faq_ids TEXT, confidence REAL, created REAL NOT NULL, client_message_id TEXT,
    UNIQUE (conversation_id, seq));
CREATE INDEX IF NOT EXISTS conversations_by_customer ON conversations (customer_id, updated);
CREATE INDEX IF NOT EXISTS conversations_by_status ON conversations (status, updated);
"""


class NotFound(Exception):
    """An unknown conversation or customer id (HTTP 404)."""


class Store:
    def __init__(self, app_dir: str | Path, create: bool = False):
        path = Path(app_dir) / DB_FILE
        if not create and not path.is_file():
            raise UserError(f"not a support app directory (no {DB_FILE}): {app_dir} — run `lmforge support init`")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(messages)")}
        if "client_message_id" not in columns:  # a database made before idempotency keys
            self.db.execute("ALTER TABLE messages ADD COLUMN client_message_id TEXT")
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS messages_by_client_id ON messages (client_message_id) "
                        "WHERE client_message_id IS NOT NULL")
        self.lock = threading.RLock()

    @contextmanager
    def transaction(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # --------------------------------------------------------------------------------- settings
    def get(self, key: str, default=None):
        with self.lock:
            row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set(self, key: str, value) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, json.dumps(value)))

    # -------------------------------------------------------------------------------------- FAQ
    def faq_digests(self) -> dict[str, str]:
        with self.lock:
            return {r["id"]: r["digest"] for r in self.db.execute("SELECT id, digest FROM faq")}

    def sync_faq(self, entries: list[FaqEntry], vectors: dict[str, tuple[np.ndarray, np.ndarray]],
                 reembedded: bool = False) -> dict:
        """Make the FAQ table equal ``entries``: insert new ids, update changed ones (whose vectors
        are in ``vectors``; all of them when ``reembedded`` by another encoder), delete the rest.
        Conversations are untouched. Returns the counts."""
        old = self.faq_digests()
        new_ids = {e.id for e in entries}
        counts = {"added": 0, "changed": 0, "removed": 0, "unchanged": 0}
        now = time.time()
        with self.transaction() as db:
            for e in entries:
                if old.get(e.id) == e.digest and not reembedded:
                    counts["unchanged"] += 1
                    continue
                q, qa = vectors[e.id]
                counts["changed" if e.id in old else "added"] += 1
                db.execute("INSERT INTO faq (id, question, answer, category, digest, q_vector, qa_vector, updated) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET question = excluded.question, "
                           "answer = excluded.answer, category = excluded.category, digest = excluded.digest, "
                           "q_vector = excluded.q_vector, qa_vector = excluded.qa_vector, updated = excluded.updated",
                           (e.id, e.question, e.answer, e.category, e.digest, q.astype("<f4").tobytes(),
                            qa.astype("<f4").tobytes(), now))
            for id_ in set(old) - new_ids:
                db.execute("DELETE FROM faq WHERE id = ?", (id_,))
                counts["removed"] += 1
        return counts

    def faq(self) -> tuple[list[FaqEntry], np.ndarray, np.ndarray]:
        """All entries (by id) with their question and question+answer vectors, (N, D) each."""
        with self.lock:
            rows = self.db.execute("SELECT * FROM faq ORDER BY id").fetchall()
        entries = [FaqEntry(r["id"], r["question"], r["answer"], r["category"]) for r in rows]
        if not rows:
            return entries, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        q = np.stack([np.frombuffer(r["q_vector"], dtype="<f4") for r in rows])
        qa = np.stack([np.frombuffer(r["qa_vector"], dtype="<f4") for r in rows])
        return entries, q, qa

    # ---------------------------------------------------------------------- customers, messages
    def customer(self, customer_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM customers WHERE id = ?", (customer_id,)).fetchone()
        return dict(row) if row else None

    def open_conversation(self, customer_id: str, conversation_id: str | None) -> dict:
        """The customer's conversation ``conversation_id`` (it must be theirs), or a new one."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT INTO customers (id, created) VALUES (?, ?) ON CONFLICT(id) DO NOTHING", (customer_id, now))
            if conversation_id is not None:
                row = db.execute("SELECT * FROM conversations WHERE id = ? AND customer_id = ?",
                                 (conversation_id, customer_id)).fetchone()
                if row is None:
                    raise NotFound(f"no conversation {conversation_id!r} for customer {customer_id!r}")
                return dict(row)
            cid = uuid.uuid4().hex
            db.execute("INSERT INTO conversations (id, customer_id, status, created, updated) VALUES (?, ?, 'assistant', ?, ?)",
                       (cid, customer_id, now, now))
            return dict(db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchone())

    def conversation(self, conversation_id: str) -> dict:
        with self.lock:
            row = self.db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return dict(row)

    def add_message(self, conversation_id: str, role: str, text: str, faq_ids: list[str] | None = None,
                    confidence: float | None = None, **conversation_update) -> dict:
        """Append a message (its seq is the conversation's next) and update the conversation's
        fields (``status``, ``failures``, ``handoff_reason``) in the same transaction."""
        return self.add_messages(conversation_id, [{"role": role, "text": text, "faq_ids": faq_ids,
                                                    "confidence": confidence, "update": conversation_update}])[0]

    def add_messages(self, conversation_id: str, messages: list[dict], customer_id: str | None = None,
                     customer_name: str | None = None) -> list[dict]:
        """Append ``messages`` (dicts of ``role``, ``text`` and optionally ``faq_ids``,
        ``confidence``, ``client_message_id`` and the conversation ``update`` it makes) in one
        transaction, with the customer's name when one was learned: all of them or none."""
        now = time.time()
        added = []
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise NotFound(f"no conversation {conversation_id!r}")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation_id = ?",
                             (conversation_id,)).fetchone()[0]
            for m in messages:
                seq += 1
                faq_ids = m.get("faq_ids")
                db.execute("INSERT INTO messages (conversation_id, seq, role, text, faq_ids, confidence, created, "
                           "client_message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (conversation_id, seq, m["role"], m["text"],
                            json.dumps(faq_ids) if faq_ids is not None else None, m.get("confidence"), now,
                            m.get("client_message_id")))
                self._update(db, conversation_id, now, **(m.get("update") or {}))
                added.append({"seq": seq, "role": m["role"], "text": m["text"], "faq_ids": faq_ids,
                              "confidence": m.get("confidence"), "created": now})
            if customer_name and customer_id:
                db.execute("UPDATE customers SET name = ? WHERE id = ?", (customer_name, customer_id))
        return added

    def first_key(self, customer_id: str) -> str | None:
        """The idempotency key of the customer's first message (None without one)."""
        with self.lock:
            row = self.db.execute("SELECT m.client_message_id FROM messages m JOIN conversations c ON "
                                  "c.id = m.conversation_id WHERE c.customer_id = ? ORDER BY m.id LIMIT 1",
                                  (customer_id,)).fetchone()
        return row[0] if row else None

    def exchange(self, customer_id: str, client_message_id: str) -> dict | None:
        """What a customer message with this idempotency key stored: the conversation (with its
        status and handoff reason now), the message and the replies after it (up to the next
        customer message); None if none was stored. Another customer's key is not found."""
        with self.lock:
            row = self.db.execute("SELECT m.conversation_id, m.seq FROM messages m JOIN conversations c ON "
                                  "c.id = m.conversation_id WHERE m.client_message_id = ? AND c.customer_id = ?",
                                  (client_message_id, customer_id)).fetchone()
        if row is None:
            return None
        cid, seq = row["conversation_id"], row["seq"]
        after = self.messages(cid, seq - 1)
        mine = [after[0], *itertools.takewhile(lambda m: m["role"] != "customer", after[1:])]
        conv = self.conversation(cid)
        return {"conversation_id": cid, "status": conv["status"], "messages": mine,
                "handoff_reason": conv["handoff_reason"] if conv["status"] == "human" else None}

    def update_conversation(self, conversation_id: str, **fields) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise NotFound(f"no conversation {conversation_id!r}")
            self._update(db, conversation_id, time.time(), **fields)

    @staticmethod
    def _update(db, conversation_id: str, now: float, **fields) -> None:
        allowed = {"status", "failures", "handoff_reason"}
        if set(fields) - allowed:
            raise ValueError(f"unknown conversation fields {set(fields) - allowed}")
        sets = "".join(f", {k} = ?" for k in fields)
        db.execute(f"UPDATE conversations SET updated = ?{sets} WHERE id = ?", (now, *fields.values(), conversation_id))

    def messages(self, conversation_id: str, after: int = 0) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT seq, role, text, faq_ids, confidence, created FROM messages "
                                   "WHERE conversation_id = ? AND seq > ? ORDER BY seq", (conversation_id, after)).fetchall()
        return [{**dict(r), "faq_ids": json.loads(r["faq_ids"]) if r["faq_ids"] else None} for r in rows]

    def conversations_of(self, customer_id: str) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM conversations WHERE customer_id = ? ORDER BY created",
                                   (customer_id,)).fetchall()
        return [dict(r) for r in rows]

    def queue(self) -> list[dict]:
        """Conversations handed to a human, oldest first, with their customer's name."""
        with self.lock:
            rows = self.db.execute("SELECT c.*, u.name AS customer_name, (SELECT text FROM messages m WHERE "
                                   "m.conversation_id = c.id AND m.role = 'customer' ORDER BY seq DESC LIMIT 1) "
                                   "AS last_customer_message FROM conversations c JOIN customers u ON u.id = c.customer_id "
                                   "WHERE c.status = 'human' ORDER BY c.updated").fetchall()
        return [dict(r) for r in rows]
