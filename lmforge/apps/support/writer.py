"""Answers written by a decoder from the retrieved FAQ entries, and the check that lets a sentence
reach the customer only when the FAQ says what it says (:func:`grounded`).

Concurrent conversations write together: each is one row of the decoder's shared engine
(:func:`lmforge.generate.stream_text`).
"""

from __future__ import annotations

import contextlib
import re
import time

from lmforge.errors import UserError

GROUNDING_ENTRIES = 2  # FAQ entries a decoder's answer is grounded in (a 135M model reads few well)



class Writer:
    """A decoder run that writes the answer from the retrieved FAQ entries (greedy, bounded): the
    entries go into the prompt, and the stored message names the ones it was given."""

    def __init__(self, run_dir, seconds: float = 20.0):
        from lmforge.chat import load_chat_template
        from lmforge.runs import load_run

        self.seconds = seconds  # the longest a customer waits for a written answer
        self.run = load_run(run_dir)
        if not self.run.model.can_generate or self.run.model.config.num_labels:
            raise UserError(f"--generate needs a decoder run (GPT or Llama); {run_dir} is {self.run.config.arch}")
        self.template = load_chat_template(run_dir)

    def prompt(self, question: str, entries: list) -> str:
        from lmforge.chat import render_chat

        context = "\n\n".join(f"Q: {e.question}\nA: {e.answer}" for e in entries)
        return render_chat(self.template, [{"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"
                                            "\n\nAnswer the question using only the context."}])

    def pieces(self, question: str, entries: list):
        """The decoder's answer to ``question`` from the FAQ ``entries``, as text pieces while it
        writes them (greedy, bounded); nothing when the prompt leaves no room. The caller closes it."""
        from lmforge.chat import end_token_id
        from lmforge.generate import SamplingParams, stream_text

        ids = self.run.tokenizer.encode(self.prompt(question, entries), add_special_tokens=False).ids
        room = self.run.model.config.block_size - len(ids)
        if room < 16:
            return iter(())
        return stream_text(self.run.model, self.run.tokenizer, "", SamplingParams(
            max_tokens=min(120, room), temperature=0.0, eos_id=end_token_id(self.template, self.run.tokenizer),
            stop=tuple(self.template.get("stop", []) + ECHOES)), prompt_ids=ids)

    @contextlib.contextmanager
    def _writing(self, question: str, entries: list):
        """(the answer's text pieces, the monotonic time by which it must be written); closed after."""
        pieces = self.pieces(question, entries)
        try:
            yield pieces, time.monotonic() + self.seconds
        finally:
            getattr(pieces, "close", lambda: None)()

    def write(self, question: str, entries: list) -> str | None:
        """The decoder's whole answer as written, checked by nothing (None when the prompt leaves no
        room or the answer takes longer than ``seconds``): what ``support eval --generate`` measures."""
        text = ""
        with self._writing(question, entries) as (pieces, deadline):
            for piece in pieces:
                text += piece
                if time.monotonic() > deadline:  # too slow for a customer waiting
                    return None
        return unlabelled(text).strip() or None

    def stream(self, question: str, entries: list):
        """The answer the customer is given, sentence by sentence as the decoder writes it
        (:func:`released`), within ``seconds``. Nothing released: the caller gives the best
        entry's answer."""
        with self._writing(question, entries) as (pieces, deadline):
            yield from released(pieces, sources_of(question, entries), deadline)

    def rephrase(self, question: str, entries: list, on_text=None) -> str:
        """The grounded answer :meth:`stream` releases ("" when it releases nothing), each sentence
        also given to ``on_text`` as it is released (the page shows the answer while it is written)."""
        text = ""
        for sentence in self.stream(question, entries):
            if on_text is not None:
                on_text(sentence)
            text += sentence
        return text.strip()


def released(pieces, sources: list[str], deadline: float | None = None):
    """The sentences of a written answer (its text ``pieces`` as they come) that may reach the
    customer: each only when the answer up to and including it is :func:`grounded` in
    ``sources``. The first sentence that is not (a small model asked about a product it never saw
    invents commands) ends the answer, and so does passing ``deadline`` (``time.monotonic()``);
    the sentences released before stand, each checked with all before it."""
    done, pending = "", ""
    for piece in pieces:
        if deadline is not None and time.monotonic() > deadline:
            return
        pending += piece
        if not done and pending.lstrip().startswith("Q:"):  # the prompt's question, echoed
            if "\n" not in pending:
                continue
            pending = pending.split("\n", 1)[1]
        for sentence in complete_sentences(pending):
            pending = pending[len(sentence):]
            candidate = done + sentence if done else unlabelled(sentence)
            if not candidate.strip():  # only a label ("A:")
                continue
            if not grounded(candidate.strip(), sources):
                return
            yield candidate[len(done):]
            done = candidate
    candidate = done + pending if done else unlabelled(pending)
    if pending.strip() and grounded(candidate.strip(), sources):  # the last sentence, unterminated
        yield candidate[len(done):]


SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


def complete_sentences(text: str) -> list[str]:
    """The complete sentences at the start of ``text``, each with the spaces after it: ended by a
    full stop, question or exclamation mark before a space, or by a line end — never inside a
    `code span` (whose dots are a file name's or a version's) nor before a content word."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(text):
        end = m.end()
        while end < len(text) and text[end] in " \t\n":
            end += 1
        piece = text[start:end]
        if _words(piece) and piece.count("`") % 2 == 0:  # "1. " (a list's number) is not a sentence
            out.append(piece)
            start = end
    return out


def unlabelled(text: str) -> str:
    """``text`` without the prompt's own labels, when the decoder echoes them ("Q: …\nA: …")."""
    return re.sub(r"^\s*(?:Q:[^\n]*\n)?(?:A|Answer):\s*", "", text)


def sources_of(question: str, entries: list) -> list[str]:
    """What a written answer may say: the question and the entries it was given."""
    return [question] + [f"{e.question} {e.answer}" for e in entries]


ECHOES = ["Question:", "Context:", "\nQ:"]  # the model starting the prompt's pattern over: the answer is done
SUPPORTED = 0.8  # the share of a generated answer's words the FAQ entries must contain
STOPWORDS = set("the a an and or of to in on for with is are be it its this that you your can do does i my "
                "we our use using as at by from if not no yes so will would should could how what which".split())


def _words(text: str) -> list[str]:
    """Content words, crudely stemmed (``installs`` and ``install`` are one word)."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS and len(w) > 2]
    return [re.sub(r"(ing|ed|es|s)$", "", w) or w for w in words]


def grounded(answer: str, sources: list[str]) -> bool:
    """Whether ``answer`` says only what ``sources`` say: ``SUPPORTED`` of its words occur in them
    and every `code span` (a command, a flag, a path) occurs in them verbatim."""
    return supported(answer, sources) >= SUPPORTED and all(
        any(span in s for s in sources) for span in re.findall(r"`([^`]+)`", answer))


def supported(answer: str, sources: list[str]) -> float:
    """The share of ``answer``'s content words that occur in ``sources`` (0 for an answer without any)."""
    words = _words(answer)
    if not words:
        return 0.0
    known = {w for s in sources for w in _words(s)}
    return sum(w in known for w in words) / len(words)
