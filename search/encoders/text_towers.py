"""The torch modules `clipdex.search.encoders.text_export` hands to `torch.onnx.export` (imported only when exporting)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, text_global_pool


class FullTextTower(torch.nn.Module):
    """open_clip's own `encode_text(normalize=True)`, for tokens of the full context length."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


def trimmable(model: Any) -> bool:
    """A standard open_clip CLIP text tower: causal mask, pooled at the end token, plain attention blocks."""
    if not isinstance(model, CLIP) or getattr(model, "attn_mask", None) is None:
        return False
    if model.text_pool_type not in ("argmax", "eos") or not model.transformer.batch_first:
        return False
    return all(
        type(block) is ResidualAttentionBlock and isinstance(block.attn, torch.nn.MultiheadAttention)
        and block.attn._qkv_same_embed_dim and block.attn.in_proj_bias is not None and not hasattr(block, "ln_1_kv")
        for block in model.transformer.resblocks
    )


def hf_text_tower(model: Any) -> bool:
    """A Hugging Face text tower (multilingual models): it masks the pad tokens out of attention
    and pooling, so tokens cut after the longest text's end give the same vectors."""
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)


class TrimmedTextTower(torch.nn.Module):
    """open_clip's `CLIP.encode_text(normalize=True)` for tokens cut after the end token.

    The text transformer is causal and pools at the end token, so positions after it
    cannot change the result; running only the first `length` positions saves most of
    the work on short queries. Attention is written out here because the tracing
    exporter fixes `nn.MultiheadAttention`'s sequence length to the traced one. Only for
    models where `trimmable` holds; `clipdex.search.encoders.text_export` verifies the result against
    open_clip's `encode_text` on the full context.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        length = tokens.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        mask = model.attn_mask[:length, :length].to(cast_dtype)
        for block in model.transformer.resblocks:
            x = x + block.ls_1(_attention(block.attn, block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = model.ln_final(x)
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
        return F.normalize(x, dim=-1)


def _attention(attention: torch.nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`nn.MultiheadAttention(x, x, x, attn_mask=mask)` (batch first) with no fixed sequence length."""
    batch, _, width = x.shape
    heads = attention.num_heads
    query, key, value = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    query, key, value = (part.reshape(batch, -1, heads, width // heads).transpose(1, 2) for part in (query, key, value))
    scores = torch.matmul(query, key.transpose(-1, -2)) * (width // heads) ** -0.5 + mask
    mixed = torch.matmul(scores.softmax(dim=-1), value).transpose(1, 2).reshape(batch, -1, width)
    return attention.out_proj(mixed)
