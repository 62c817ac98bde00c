"""Model definitions. Each file reads top to bottom: config, blocks, model.

``MODELS`` is the one table of model families: a new family is one model file plus one row here.
The spine never asks which family a model is; it asks the model: ``blocks()`` (FSDP units,
layer-wise learning rates), ``embeddings()``, ``classification_config(num_labels)`` and
``classifier_head``, and the capabilities ``can_generate`` / ``can_embed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gan import GAN, GANConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.llama import Llama, LlamaConfig
from lmforge.models.lstm import LSTM, LSTMConfig
from lmforge.models.vision import CNN, MLP, CNNConfig, MLPConfig


@dataclass(frozen=True)
class ModelSpec:
    config: type  # the family's config dataclass
    model: type  # nn.Module built from that config
    description: str


MODELS: dict[str, ModelSpec] = {
    "gpt": ModelSpec(GPTConfig, GPT, "GPT-2-style decoder (next-token LM, generation, last-token classifier)"),
    "llama": ModelSpec(LlamaConfig, Llama, "Llama-family decoder (RoPE, RMSNorm, SwiGLU, grouped-query "
                                           "attention; Llama, SmolLM, Qwen2 checkpoints)"),
    "lstm": ModelSpec(LSTMConfig, LSTM, "LSTM language model (embedding, stacked LSTM, tied output weights)"),
    "bert": ModelSpec(BertConfig, Bert, "BERT-style encoder (masked LM, embeddings, [CLS] classifier)"),
    "cnn": ModelSpec(CNNConfig, CNN, "convolutional image classifier (conv blocks, optional residual, dense head)"),
    "mlp": ModelSpec(MLPConfig, MLP, "multilayer perceptron on flattened pixels"),
    "gan": ModelSpec(GANConfig, GAN, "DCGAN generator and discriminator (images from noise, --task gan)"),
}


def build_model(arch: str, config) -> nn.Module:
    """A freshly initialised model of family ``arch`` from its config."""
    return MODELS[arch].model(config)

