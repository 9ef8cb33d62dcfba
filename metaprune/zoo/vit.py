"""`vit`: a tiny Vision Transformer over 1-D sequences (Conv1d patches) or 2-D images.

The embedding width is the residual stream, coupled across the patch embedding, the class token,
the positional embedding, every attention and MLP output, the norms and the head, so it is one
number; each block's head count and MLP hidden width are free.
"""

import torch
from torch import nn

from metaprune.zoo.config import (
    MAX_TOKENS,
    ConfigReader,
    Family,
    as_int,
    as_list,
    as_record,
    fail,
)
from metaprune.zoo.layers import conv

BLOCK_FIELDS = ("heads", "mlp")


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        # dim: the embedding width (divisible by heads).
        # hidden: the MLP's inner width (0: the MLP branch was emptied by depth pruning and
        #   adds fc2's bias to the stream; Linear layers without features compute exactly that).
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding (conv, stride = patch) → tokens + positions → encoder blocks → head.

    Example::

        config = {"input_shape": [1, 40], "patch_size": 4, "embed_dim": 32,
                  "blocks": [{"heads": 4, "mlp": 64}] * 2, "pool": "mean"}
        model = build("vit", config)                 # 10 tokens of width 32
        model(torch.randn(8, 1, 40)).shape           # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        patch_size: int,
        embed_dim: int,
        blocks: list[dict],
        pool: str,
    ):
        # input_shape: (channels, length) or (channels, height, width); sides are cut down to a
        #   multiple of patch_size (the conv's stride drops the remainder).
        # patch_size: side of a square (or length of a 1-D) patch.
        # embed_dim: token width, shared by every block.
        # blocks: one {"heads", "mlp"} dict per encoder block.
        # pool: "cls" (a learned class token) or "mean" (average of the patch tokens).
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.pool_kind = pool
        dims = len(input_shape) - 1
        self.patch_embed = conv(
            dims, input_shape[0], embed_dim, patch_size, stride=patch_size, padding=0, bias=True
        )
        tokens = 1
        for side in input_shape[1:]:
            tokens *= side // patch_size
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            tokens += 1
        else:
            self.cls_token = None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, embed_dim) * 0.02)
        self.blocks = nn.Sequential(
            *(EncoderBlock(embed_dim, block["heads"], block["mlp"]) for block in blocks)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = torch.flatten(self.patch_embed(x), 2).transpose(1, 2)  # (batch, tokens, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)

    def read_config(self) -> dict:
        return {
            "input_shape": [self.patch_embed.in_channels, *self.input_shape[1:]],
            "num_classes": self.head.out_features,
            "patch_size": self.patch_embed.kernel_size[0],
            "embed_dim": self.patch_embed.out_channels,
            "blocks": [
                {"heads": block.attn.num_heads, "mlp": block.fc1.out_features}
                for block in self.blocks
            ],
            "pool": self.pool_kind,
        }


def default_patch_size(input_shape: list[int]) -> int:
    """4 when every side allows at least two patches of 4, else the largest side that does."""
    smallest = min(input_shape[1:])
    return max(1, min(4, smallest // 2))


def complete(reader: ConfigReader) -> dict:
    patch_size = reader.integer("patch_size", default_patch_size(reader.input_shape), high=1024)
    if patch_size > min(reader.input_shape[1:]):
        reader.fail("patch_size", f"exceeds a side of input {reader.input_shape}", patch_size)
    tokens = 1
    for side in reader.input_shape[1:]:
        tokens *= side // patch_size
    if tokens > MAX_TOKENS:
        reader.fail("patch_size", f"makes {tokens} tokens, more than {MAX_TOKENS}", patch_size)
    embed_dim = reader.integer("embed_dim", 64)
    where = reader.where("blocks")
    default_blocks = [{"heads": 4, "mlp": 2 * embed_dim} for _ in range(4)]
    blocks = []
    for i, raw in enumerate(as_list(reader.raw("blocks", default_blocks), where)):
        block = as_record(raw, f"{where}[{i}]", BLOCK_FIELDS)
        heads = as_int(block.get("heads", 4), f"{where}[{i}].heads", high=embed_dim)
        if embed_dim % heads:
            fail(f"{where}[{i}].heads", f"must divide embed_dim {embed_dim}", heads)
        # an MLP width of 0: the branch was emptied (depth pruning), the block adds a constant
        mlp = as_int(block.get("mlp", 2 * embed_dim), f"{where}[{i}].mlp", low=0)
        blocks.append({"heads": heads, "mlp": mlp})
    pool = reader.choice("pool", "cls", ("cls", "mean"))
    return {"patch_size": patch_size, "embed_dim": embed_dim, "blocks": blocks, "pool": pool}


FAMILY = Family(
    id="vit",
    module_class=ViT,
    keys=("patch_size", "embed_dim", "blocks", "pool"),
    spatial_dims=(1, 2),
    default_input_shape=(3, 32, 32),
    complete=complete,
    read=ViT.read_config,
)
