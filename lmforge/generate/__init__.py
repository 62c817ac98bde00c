"""Decoding: sampling parameters (sampling.py), the one decoding engine (engine.py) and streaming
text (text.py). What callers use is re-exported here."""

from lmforge.generate.engine import ContinuousBatcher, DecodeStep, MatVecLinear, engine_for, generate_ids
from lmforge.generate.sampling import (GREEDY_BELOW, PromptScores, Sampler, SamplingParams, Scored, sample_next,
                                       score_rows)
from lmforge.generate.text import stream_text, text_pieces

__all__ = ["ContinuousBatcher", "DecodeStep", "MatVecLinear", "engine_for", "generate_ids", "GREEDY_BELOW",
           "PromptScores", "Sampler", "SamplingParams", "Scored", "sample_next", "score_rows", "stream_text",
           "text_pieces"]
