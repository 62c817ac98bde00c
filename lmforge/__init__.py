"""lmforge: from raw text to a trained, evaluated and sampled language model, in one tool."""

__version__ = "0.1.0"
