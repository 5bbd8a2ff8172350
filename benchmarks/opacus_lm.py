# Copyright (c) fairseq_dp contributors. MIT license.
"""A plain PyTorch causal language model with the shape the speed benchmark
gives fairseq's ``transformer_lm`` in GPT-2 form, built only from modules
Opacus has per-example gradient and ghost-norm rules for (Embedding, Linear,
LayerNorm), so the Opacus rows do the same work as the fairseq ones.

Same structure as ``--arch transformer_lm --decoder-learned-pos
--no-scale-embedding --activation-fn gelu_accurate --decoder-normalize-before``
without ``--share-decoder-input-output-embed``: token embedding plus learned
positions offset past the padding index (unscaled), dropout, pre-LayerNorm
layers with causal self-attention through separate q, k, v, out projections
(attention dropout on the weights) and a tanh-GELU FFN, a final LayerNorm,
and an output projection without bias that has its own weight. Opacus's ghost
clipping refuses a weight used twice ("Parameter tying is not supported"),
which is why the head is untied here as in the ``dp_full_ghost`` row.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

PADDING_IDX = 1


class PreLNDecoderLayer(nn.Module):
    def __init__(self, hidden, heads, ffn, dropout=0.1, attention_dropout=0.1):
        super().__init__()
        self.heads = heads
        self.self_attn_layer_norm = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.final_layer_norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.dropout = dropout
        self.attention_dropout = attention_dropout

    def forward(self, x):  # (B, T, C)
        batch, length, hidden = x.shape

        def split(t):
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        h = self.self_attn_layer_norm(x)
        attn = F.scaled_dot_product_attention(
            split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)),
            dropout_p=self.attention_dropout if self.training else 0.0, is_causal=True,
        )
        attn = self.out_proj(attn.transpose(1, 2).reshape(batch, length, hidden))
        x = x + F.dropout(attn, self.dropout, self.training)
        h = self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)), approximate="tanh"))
        return x + F.dropout(h, self.dropout, self.training)


class PreLNCausalLM(nn.Module):
    def __init__(self, *, vocab, max_positions, layers, hidden, heads, ffn, dropout=0.1, attention_dropout=0.1):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden, padding_idx=PADDING_IDX)
        self.embed_positions = nn.Embedding(max_positions + PADDING_IDX + 1, hidden, padding_idx=PADDING_IDX)
        self.layers = nn.ModuleList(
            PreLNDecoderLayer(hidden, heads, ffn, dropout, attention_dropout) for _ in range(layers)
        )
        self.layer_norm = nn.LayerNorm(hidden)
        self.output_projection = nn.Linear(hidden, vocab, bias=False)
        self.dropout = dropout
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens):  # (B, T) without padding -> logits (B, T, vocab)
        batch, length = tokens.shape
        # positions as a (B, T) input, not a broadcast (T,): Opacus takes the
        # batch dimension of each module's input as the example index
        positions = (torch.arange(length, device=tokens.device) + PADDING_IDX + 1).repeat(batch, 1)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        x = F.dropout(x, self.dropout, self.training)
        for layer in self.layers:
            x = layer(x)
        return self.output_projection(self.layer_norm(x))
