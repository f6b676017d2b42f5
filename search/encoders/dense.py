"""Patch-level outputs of an open_clip image tower, for explanations (`clipdex explain`).

A CLIP image tower pools a grid of local features into one vector; MaskCLIP (Zhou et al.,
"Extract Free Dense Labels from CLIP", ECCV 2022) showed that the pooling layer's value
path, applied to every grid position instead of the pooled one, gives a feature per
position that lies in the same space as the text vectors: its cosine with a query says how
much that part of the image answers it. `DenseTower` computes those features:

* ModifiedResNet (open_clip's RN50-style towers, the demo model): the attention pool's
  value and output projections (`v_proj`, `c_proj`) on every position of the last stage,
  with the pool's positional embedding resized to the grid. The last stage runs without
  its stride-2 average pool (its 3x3 convolutions already ran before that pool, so this
  only skips a 2x2 mean; later blocks of the stage get dilation 2 to keep their field of
  view), which doubles the grid's resolution for little cost, and the tower sees the image
  at EXPLAIN_SCALE times its usual side. Both were measured on the pointing game
  (benchmarks/README.md, "explain").
* VisionTransformer: the last block's value projection of every patch token (its attention
  and MLP left out, as MaskCLIP does), through `out_proj`, `ln_post` and `proj`, at the
  model's own input size.

Other towers (timm ConvNeXt and the like) raise `ExplainUnsupported`. torch is imported by
the functions here, never by importing the module.
"""

from __future__ import annotations

from typing import Any

from clipdex.search.errors import ClipdexError

# The ResNet towers see the image at this many times their input side for an explanation
# (rounded to a multiple of 16, the stride of the grid): 1.5 gives 0.875 on the pointing game against 0.72 at 1.0,
# for 1.5x to 1.8x the time of one embedding (benchmarks/README.md, "explain").
EXPLAIN_SCALE = 1.5


class ExplainUnsupported(ClipdexError):
    """This model's image tower has no patch-level output clipdex knows how to compute."""


def tower_kind(model: Any) -> str:
    """"resnet" or "vit" for the open_clip model's image tower; ExplainUnsupported for others."""
    visual = model.visual
    name = type(visual).__name__
    if name == "ModifiedResNet" and hasattr(visual, "attnpool"):
        return "resnet"
    if name == "VisionTransformer":
        last = visual.transformer.resblocks[-1]
        if getattr(visual, "attn_pool", None) is None and hasattr(last.attn, "in_proj_weight") and last.attn.in_proj_weight is not None:
            return "vit"
    raise ExplainUnsupported(f"explanations are not available for this model's image tower ({name}); "
                             "they work for open_clip's ViT and ModifiedResNet towers")


def explain_image_size(model: Any, image_size: int) -> int:
    """The side of the square the dense tower sees: the model's own for a ViT, EXPLAIN_SCALE times it for a ResNet."""
    if tower_kind(model) == "vit":
        return image_size
    return max(32, int(round(EXPLAIN_SCALE * image_size / 16.0)) * 16)


class DenseTower:
    """A torch module: pixels (N, 3, S, S) -> features (N, rows, cols, dim), not normalized.

    Built around a loaded open_clip model (`DenseTower(model)` returns the module), so
    that torch is imported only when one is made.
    """

    def __new__(cls, model: Any) -> Any:
        import torch
        import torch.nn.functional as F

        kind = tower_kind(model)
        visual = model.visual

        def bottleneck(block: Any, x: torch.Tensor, dilation: int) -> torch.Tensor:
            out = block.act1(block.bn1(block.conv1(x)))
            out = F.conv2d(out, block.conv2.weight, None, 1, dilation, dilation)
            out = block.act2(block.bn2(out))  # the block's avgpool left out: the stage keeps its resolution
            out = block.bn3(block.conv3(out))
            identity = x
            if block.downsample is not None:
                for name, part in block.downsample.named_children():
                    if name != "-1":  # open_clip names the downsample's average pool "-1"
                        identity = part(identity)
            return block.act3(out + identity)

        class ResNetDense(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.visual = visual
                self.side = int(round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5))

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                x = self.visual.stem(pixels.to(self.visual.conv1.weight.dtype))
                x = self.visual.layer3(self.visual.layer2(self.visual.layer1(x)))
                for index, block in enumerate(self.visual.layer4):
                    x = bottleneck(block, x, 1 if index == 0 else 2)
                pool = self.visual.attnpool
                batch, channels, rows, cols = x.shape[0], x.shape[1], int(x.shape[2]), int(x.shape[3])  # constants when traced
                position = pool.positional_embedding[1:]
                side = self.side
                if (rows, cols) != (side, side):
                    grid = position.reshape(1, side, side, channels).permute(0, 3, 1, 2)
                    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
                    position = grid.permute(0, 2, 3, 1).reshape(rows * cols, channels)
                tokens = x.flatten(2).permute(0, 2, 1) + position[None].to(x.dtype)
                features = pool.c_proj(pool.v_proj(tokens))
                return features.reshape(batch, rows, cols, features.shape[-1]).float()

        class VitDense(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.visual = visual

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                tower = self.visual
                x = tower._embeds(pixels.to(tower.conv1.weight.dtype))
                blocks = tower.transformer.resblocks
                batch_first = getattr(tower.transformer, "batch_first", True)
                if not batch_first:
                    x = x.transpose(0, 1)
                for block in blocks[:-1]:
                    x = block(x)
                if not batch_first:
                    x = x.transpose(0, 1)
                last = blocks[-1]
                width = x.shape[-1]
                value = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
                value = last.attn.out_proj(value)
                tokens = tower.ln_post(value[:, 1:])  # the class token left out
                if tower.proj is not None:
                    tokens = tokens @ tower.proj
                rows, cols = (int(side) for side in self.visual.grid_size)
                return tokens.reshape(tokens.shape[0], rows, cols, tokens.shape[-1]).float()

        module = ResNetDense() if kind == "resnet" else VitDense()
        return module.eval()
