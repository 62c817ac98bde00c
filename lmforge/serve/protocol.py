"""The OpenAI request schemas ``lmforge serve`` accepts (pydantic mirrors of OpenAI's, plus vLLM's
tokenizer endpoints), and the OpenAI parameters it refuses rather than silently ignores."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmforge.explain import METHODS
from lmforge.serve.common import APIError
from lmforge.serve.logprobs import MAX_LOGPROBS


def check_text(value, where: str) -> None:
    """Raise (a 400, through the validation handler) if a string in ``value`` is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: not valid Unicode text (a lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{where}.{i}")


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with no choices and the request's usage


# OpenAI parameters this server does not implement, with the values that ask for nothing: any other
# value is refused (400) rather than silently ignored. Fields not named anywhere (``user``,
# ``metadata``, ...) change nothing about the answer and are ignored.
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
               "response_format": (None, {"type": "text"}), "logit_bias_type": (None,)}


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked against UNSUPPORTED

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension: the k likeliest tokens (-1, 0: all)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100 added to its logit
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what torch's generators take
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _text_is_unicode(self):
        """Every string of the request must be encodable text: JSON can carry lone surrogates
        (``"\\ud800"``), which no tokenizer takes."""
        check_text(self.model_dump(exclude={"model_extra"}), "body")
        return self

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name} is not supported by this server (send {UNSUPPORTED[name][-1]!r} "
                                    "or leave it out)", param=name, code="unsupported_parameter")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids, one prompt or several
    echo: bool = False  # the prompt comes back before the completion (with its logprobs if asked)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # alternatives per token


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer "system"
    content: str | list[dict]  # text, or content parts of which only {"type": "text"} is supported

    def text(self, k: int) -> str:
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{k}].content[{j}]: only text parts are supported "
                                    f"(got type {part.get('type')!r})", param=f"messages.{k}.content")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = False
    model: str | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[int]
    model: str | None = None


MAX_INPUTS = 256  # texts per embeddings / classify request
MAX_SEQUENCES_PER_REQUEST = 64  # prompts x n per completion request


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64


class ClassifyRequest(BaseModel):
    """Texts (``input``) for a text classifier; images (``images``: base64 or ``data:`` URLs of
    PNG/JPEG/BMP/WebP files) for an image classifier."""

    model: str
    input: str | list[str] | None = Field(default=None, min_length=1)
    images: list[str] | None = Field(default=None, min_length=1)


MAX_EXPLAIN_TOKENS = 64  # tokens of a decoder's greedy answer an explanation may generate


class ExplainRequest(BaseModel):
    """One input to explain: a text (classifiers) or a prompt (decoders) as ``input``, or one image
    (``images``, image classifiers). ``label``: the class to explain (default: the predicted one);
    ``answer`` (decoders): the text whose likelihood to explain, else the model's greedy
    continuation of ``max_tokens``; ``messages`` (generators, instead of ``input``): a conversation,
    rendered by the chat template with the assistant's turn opened, as the prompt;
    ``faithfulness``: also each method's deletion/insertion AOPC against random order."""

    model: str
    input: str | None = Field(default=None, min_length=1, max_length=100_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # generators: the chat as prompt
    images: list[str] | None = Field(default=None, min_length=1, max_length=1)
    label: str | None = None
    answer: str | None = Field(default=None, min_length=1, max_length=100_000)
    max_tokens: int = Field(default=16, ge=1, le=MAX_EXPLAIN_TOKENS)
    methods: list[Literal[METHODS]] = Field(default=["ig"], min_length=1, max_length=len(METHODS))
    faithfulness: bool = False
