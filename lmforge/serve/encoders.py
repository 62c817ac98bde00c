"""The encoder side of ``lmforge serve``: ``/v1/embeddings`` (an encoder run), ``/v1/classify``
(text and image classifiers) and ``/v1/explain`` (classifiers and generators). Each forward runs
off the event loop, one at a time per model (encoding sets the tokenizer's padding state)."""

from __future__ import annotations

import asyncio
import base64
import threading

from fastapi import FastAPI

from lmforge.errors import UserError
from lmforge.serve.common import APIError, Metrics
from lmforge.serve.protocol import MAX_INPUTS, ClassifyRequest, EmbeddingRequest, ExplainRequest
from lmforge.serve.served import ServedRun


class Encoders:
    """The endpoints that read inputs whole (no generation)."""

    def __init__(self, served: ServedRun, metrics: Metrics):
        self.served, self.metrics = served, metrics
        # Explanations of a generator run on a private copy of the model, one at a time: Integrated
        # Gradients hooks the embedding layer, which must never touch the batcher's forwards.
        self.explain_lock = threading.Lock()
        self.explain_run = None

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/v1/embeddings", self.embeddings, methods=["POST"])
        app.add_api_route("/v1/classify", self.classify, methods=["POST"])
        app.add_api_route("/v1/explain", self.explain, methods=["POST"])

    # ------------------------------------------------------------------------------- endpoints
    async def embeddings(self, req: EmbeddingRequest):
        s = self.served
        s.require("encoder", req.model, "embeddings")
        vectors, tokens = await asyncio.to_thread(self.embed, req)
        self.metrics.count_tokens(tokens)

        def encode(v):
            return base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
                else v.tolist()
        return {"object": "list", "model": s.name,
                "data": [{"object": "embedding", "index": k, "embedding": encode(v)} for k, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def classify(self, req: ClassifyRequest):
        s = self.served
        s.require("classifier", req.model, "classification")
        probs, tokens = await asyncio.to_thread(self.probabilities, req)
        self.metrics.count_tokens(tokens)
        return {"object": "list", "model": s.name,
                "data": [{"index": k, "label": s.labels[int(p.argmax())],
                          "probabilities": {name: float(x) for name, x in zip(s.labels, p)}}
                         for k, p in enumerate(probs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def explain(self, req: ExplainRequest):
        out = await asyncio.to_thread(self.explanation, req)
        return {"object": "explanation", "model": self.served.name, **out}

    # ------------------------------------------------------------------ the work, off the loop
    def encode_inputs(self, req: EmbeddingRequest | ClassifyRequest) -> tuple[list[str], int]:
        """The request's texts and their token count; 400 past the context or the input limit."""
        if req.input is None:
            raise APIError(400, "give the texts to classify as 'input'", param="input")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"{len(texts)} inputs; at most {MAX_INPUTS} per request", param="input")
        run = self.served.run
        context, tokens = run.model.config.block_size, 0
        for k, text in enumerate(texts):
            n = len(run.tokenizer.encode(text).ids)
            if n > context:
                raise APIError(400, f"input {k} has {n} tokens; this model's context is {context}",
                               param="input", code="context_length_exceeded")
            tokens += n
        return texts, tokens

    def embed(self, req: EmbeddingRequest):
        """(vectors, prompt tokens)."""
        from lmforge.embed import embed_texts

        with self.served.encoder_lock:
            texts, tokens = self.encode_inputs(req)
            return embed_texts(self.served.run.model, self.served.run.tokenizer, texts), tokens

    def decode_images(self, req: ClassifyRequest):
        """uint8 (N, H, W, C) of the request's images, converted and resized to the model's input;
        400 for anything that is not base64 of an image Pillow reads."""
        import binascii

        import numpy as np

        from lmforge.data.images import load_image_file

        if req.input is not None or not req.images:
            raise APIError(400, f"{self.served.name!r} classifies images: give them as 'images' (base64 or data "
                                "URLs)", param="images")
        if len(req.images) > MAX_INPUTS:
            raise APIError(400, f"{len(req.images)} images; at most {MAX_INPUTS} per request", param="images")
        m, out = self.served.run.model.config, []
        for k, item in enumerate(req.images):
            data = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
            try:
                out.append(load_image_file(base64.b64decode(data, validate=True), [m.height, m.width, m.in_channels]))
            except (binascii.Error, ValueError):
                raise APIError(400, f"images[{k}] is not base64", param="images") from None
            except UserError:
                raise APIError(400, f"images[{k}] is not an image Pillow can read", param="images") from None
        return np.stack(out)

    def probabilities(self, req: ClassifyRequest):
        """(class probabilities per input, prompt tokens)."""
        from lmforge.tasks.classify import predict_probs

        s = self.served
        if s.images:
            from lmforge.tasks.images import predict_images

            x = self.decode_images(req)
            with s.encoder_lock:
                return predict_images(s.run.model, x, s.run.device), 0
        if req.images is not None:
            raise APIError(400, f"{s.name!r} classifies texts: give them as 'input'", param="images")
        with s.encoder_lock:
            texts, tokens = self.encode_inputs(req)
            return predict_probs(s.run.model, s.run.tokenizer, texts, s.run.model.config.block_size,
                                 s.run.device), tokens

    def explanation(self, req: ExplainRequest) -> dict:
        """Attributions of one input by each requested method (and their faithfulness). Classifiers
        explain under the encoder lock (the hooks then touch no other request); generators on a
        private float copy of the model."""
        import copy
        import dataclasses

        from lmforge.explain import subjects

        s = self.served
        if s.kind == "encoder":
            raise APIError(400, f"{s.name!r} is an encoder: explanations cover classifiers and generators",
                           param="model", code="unsupported_model")
        s.require_model(req.model)
        try:
            if s.images:
                with s.encoder_lock:
                    x = self.decode_images(ClassifyRequest(model=req.model, images=req.images))
                    return self._explained(subjects.image_classifier(s.run, x[0], req.label), req)
            if req.messages is not None:
                if s.kind != "generator":
                    raise APIError(400, "'messages' applies to generators; give a classifier's text as 'input'",
                                   param="messages")
                if req.input is not None:
                    raise APIError(400, "give 'input' or 'messages', not both", param="messages")
                req = req.model_copy(update={"input": s.render_chat(req.messages)})
            if req.input is None or req.images is not None:
                raise APIError(400, "give the text to explain as 'input'", param="input")
            if s.kind == "classifier":
                with s.encoder_lock:
                    self.encode_inputs(ClassifyRequest(model=req.model, input=req.input))  # 400 past the context
                    return self._explained(subjects.text_classifier(s.run, req.input, req.label,
                                                                    s.run.model.config.block_size), req)
            if req.label is not None:
                raise APIError(400, "'label' applies to classifiers; a generator explains its 'answer'", param="label")
            with self.explain_lock:
                if self.explain_run is None:
                    self.explain_run = dataclasses.replace(s.run, model=copy.deepcopy(s.run.model).float())
                return self._explained(subjects.decoder_answer(self.explain_run, req.input, req.answer,
                                                               req.max_tokens), req)
        except UserError as e:
            raise APIError(400, str(e)) from None

    @staticmethod
    def _explained(subject, req: ExplainRequest) -> dict:
        from lmforge.evaluate import faithfulness
        from lmforge.explain.attribution import attribute

        attrs = {m: attribute(m, subject) for m in dict.fromkeys(req.methods)}
        out = {k: v for k, v in subject.meta.items() if k != "pixels"}
        out |= {"features": subject.names, "attributions": {m: a.per_feature.tolist() for m, a in attrs.items()}}
        if subject.spans:
            out["spans"] = [list(sp) for sp in subject.spans]
        if "ig" in attrs:
            out["ig_delta"] = attrs["ig"].delta
        if req.faithfulness:
            f = faithfulness.evaluate(subject, {m: a.per_feature for m, a in attrs.items()})
            out["faithfulness"] = {m: {k: v[k] for k in ("comprehensiveness", "sufficiency")} for m, v in f.items()}
        return out
