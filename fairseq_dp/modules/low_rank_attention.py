# Copyright (c) fairseq_dp contributors. MIT license.
"""Multihead attention whose four projections are :class:`LowRankLinear`."""

from fairseq.modules import MultiheadAttention

from .low_rank_linear import LowRankLinear


class LowRankMultiheadAttention(MultiheadAttention):
    """fairseq's ``MultiheadAttention`` with q, k, v and out projections
    reparametrized separately (each E×E with its own rank-r carriers).

    fairseq's fast path hands the projection weights to
    ``F.multi_head_attention_forward`` and never calls the projection modules,
    so their inputs and output gradients would never be seen; the slow path
    (forced below) calls every projection.
    """

    def __init__(self, embed_dim, num_heads, *, rank, reference_projection=False, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(
                self,
                name,
                LowRankLinear.from_linear(
                    getattr(self, name),
                    rank=rank,
                    batch_dim=1,  # fairseq encoder layers are time-major (T, B, C)
                    reference_projection=reference_projection,
                ),
            )
        self._set_skip_embed_dim_check()
