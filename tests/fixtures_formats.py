"""Small models and archive surgery shared by the formats tests."""

from __future__ import annotations

import io
import json
import zipfile

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv (grouped too) + BN + transposed conv + GroupNorm + Linear, flatten before the head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.norm = nn.GroupNorm(2, 6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(torch.relu(self.norm(self.up(x))))
        return self.fc(x.view(x.shape[0], -1))


class SmallCNN1d(nn.Module):
    """Embedding → Conv1d + BatchNorm1d → LayerNorm → Linear (token inputs)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.conv = nn.Conv1d(12, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)
        x = torch.relu(self.bn(self.conv(x))).transpose(1, 2)
        return self.fc(self.ln(x).mean(1))


class SmallMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.fc1(x.flatten(1))))
        return self.fc3(torch.relu(self.fc2(x)))


class SmallMHA(nn.Module):
    """Tokens → nn.MultiheadAttention block → classifier."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.proj(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


class FusedQKV(nn.Module):
    """Hand-written attention with a fused qkv projection and a baked reshape."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.proj(x)
        b, n, d = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1) @ v
        h = h + self.out(a.transpose(1, 2).reshape(b, n, d))
        return self.head(h.mean(1))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, then switch to eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def rewrite_archive(src, dst, replace=None, add=None, drop=()) -> None:
    """Copy a zip, replacing members (suffix match -> bytes or callable(bytes) -> bytes)."""
    replace = replace or {}
    add = add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info)
            if any(info.filename.endswith(s) for s in drop):
                continue
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)
        for rel, data in add.items():
            zout.writestr(f"{root}/{rel}", data)


def edit_json(edit):
    """A replace-callable that loads JSON, applies ``edit(obj)`` and dumps it again."""
    def apply(data: bytes) -> bytes:
        obj = json.loads(data)
        edit(obj)
        return json.dumps(obj).encode()
    return apply


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
