# Copyright (c) fairseq_dp contributors. MIT license.
"""A plain PyTorch encoder with fairseq RoBERTa's shape, built only from
modules Opacus has per-example gradient rules for (Embedding, Linear,
LayerNorm), so the peer row runs the same work through Opacus.

Same structure as ``--arch roberta``: learned positions offset past the
padding index, embedding LayerNorm, post-LayerNorm layers with separate q, k,
v, out projections and a GELU FFN, dropout 0.1 (attention 0.1, pooler 0), and
the sentence-classification head (dense, tanh, out) on the first token.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

PADDING_IDX = 1


class PostLNEncoderLayer(nn.Module):
    def __init__(self, hidden, heads, ffn, dropout=0.1, attention_dropout=0.1):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.self_attn_layer_norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.final_layer_norm = nn.LayerNorm(hidden)
        self.dropout = dropout
        self.attention_dropout = attention_dropout

    def forward(self, x):  # (B, T, C)
        batch, length, hidden = x.shape

        def split(t):
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attn = self.out_proj(attn.transpose(1, 2).reshape(batch, length, hidden))
        x = self.self_attn_layer_norm(x + F.dropout(attn, self.dropout, self.training))
        h = self.fc2(F.gelu(self.fc1(x)))
        return self.final_layer_norm(x + F.dropout(h, self.dropout, self.training))


class PostLNEncoderClassifier(nn.Module):
    def __init__(self, *, vocab, max_positions, layers, hidden, heads, ffn, num_classes, dropout=0.1):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden, padding_idx=PADDING_IDX)
        self.embed_positions = nn.Embedding(max_positions + PADDING_IDX + 1, hidden, padding_idx=PADDING_IDX)
        self.layernorm_embedding = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(PostLNEncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_classes)
        self.dropout = dropout
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)  # BERT's initialization, as fairseq's

    def forward(self, tokens):  # (B, T) without padding
        positions = torch.arange(tokens.shape[1], device=tokens.device) + PADDING_IDX + 1
        x = self.embed_tokens(tokens) + self.embed_positions(positions).unsqueeze(0)
        x = F.dropout(self.layernorm_embedding(x), self.dropout, self.training)
        for layer in self.layers:
            x = layer(x)
        return self.out_proj(torch.tanh(self.dense(x[:, 0])))
