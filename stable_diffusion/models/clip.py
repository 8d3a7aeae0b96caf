"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection).

Attribute names mirror transformers' so its state dicts load key for key."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import TextEncoderConfig
from .layers import GELU, LayerNorm, Linear, QuickGELU, attention

ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": GELU}


@dataclass
class TextEncoderOutput:
    last_hidden_state: mx.array
    # Input of the last layer; SDXL (and "clip skip") conditions on it.
    penultimate_hidden_state: mx.array
    # Final hidden state at the end-of-text token, projected when the model has a projection.
    pooled: mx.array
    # As transformers' `hidden_states`: the embeddings, then each layer's output (the last one
    # before the final layer norm); for "clip skip".
    hidden_states: tuple[mx.array, ...] = ()


class CLIPAttention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(dims, dims)
        self.k_proj = Linear(dims, dims)
        self.v_proj = Linear(dims, dims)
        self.out_proj = Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]()

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        dims, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = LayerNorm(dims, eps=eps)
        self.self_attn = CLIPAttention(dims, config.num_attention_heads)
        self.layer_norm2 = LayerNorm(dims, eps=eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.vocab_size = config.vocab_size
        # Textual-inversion vectors, under the ids after the vocabulary's; kept apart from the
        # (possibly quantized) table, and out of the parameters (the leading underscore).
        self._added_tokens: mx.array | None = None

    def add_tokens(self, vectors: mx.array) -> list[int]:
        """Append (n, hidden_size) token vectors; returns their ids."""
        first = self.vocab_size + (0 if self._added_tokens is None else len(self._added_tokens))
        vectors = vectors.astype(mx.float32)
        self._added_tokens = (
            vectors if self._added_tokens is None else mx.concatenate([self._added_tokens, vectors])
        )
        return list(range(first, first + len(vectors)))

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])
        if self._added_tokens is None:
            tokens = self.token_embedding(input_ids)
        else:
            added = input_ids >= self.vocab_size
            tokens = self.token_embedding(mx.where(added, 0, input_ids))
            extra = self._added_tokens[mx.where(added, input_ids - self.vocab_size, 0)]
            tokens = mx.where(added[..., None], extra.astype(tokens.dtype), tokens)
        return tokens + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Text encoder config: unsupported hidden_act {config.hidden_act!r}")
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array, dtype: mx.Dtype | None = None) -> TextEncoderOutput:
        """The hidden states of `input_ids`, computed in `dtype` (default: the weights')."""
        x = self.text_model.embeddings(input_ids)
        x = x.astype(dtype or x.dtype)
        hidden_states = [x]
        for layer in self.text_model.encoder.layers:
            hidden_states.append(layer(hidden_states[-1]))
        last = self.text_model.final_layer_norm(hidden_states[-1])

        # transformers' rule: configs with the legacy eos id 2 pool at the highest
        # id (the end-of-text token; textual-inversion ids, above it, excepted); others at
        # the first end-of-text token.
        if self.config.eos_token_id == 2:
            vocabulary_ids = mx.where(input_ids < self.config.vocab_size, input_ids, -1)
            eos_position = mx.argmax(vocabulary_ids, axis=-1)
        else:
            eos_position = mx.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = last[mx.arange(last.shape[0]), eos_position]
        if self.config.with_projection:
            pooled = self.text_projection(pooled)
        return TextEncoderOutput(last, hidden_states[-2], pooled, tuple(hidden_states))
