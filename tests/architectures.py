"""Hand-written test architectures, one per structural pattern the graph converter must follow.

`ARCHITECTURES` maps a name to a function returning ``(model, example_inputs)``. Every model is
tiny (a few thousand parameters), deterministic for a given seed, and made only of torch code, so
other tests can import them too (pruning, criteria, formats).
"""

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn(cin, cout, kernel=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class UNetSmall(nn.Module):
    """Encoder-decoder with a skip connection concatenated to the upsampled path."""

    def __init__(self):
        super().__init__()
        self.enc1 = _conv_bn(3, 8)
        self.enc2 = _conv_bn(8, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = _conv_bn(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        skip = self.enc1(x)
        deep = self.enc2(F.max_pool2d(skip, 2))
        up = self.up(deep)
        return self.head(self.dec(torch.cat([up, skip], dim=1)))


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1, then concatenated 1x1 and 3x3 expands."""

    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)


class SqueezeNetSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.fire1 = Fire(16, 4, 8)
        self.fire2 = Fire(16, 4, 8)
        self.classifier = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = self.fire2(self.fire1(x))
        return F.adaptive_avg_pool2d(self.classifier(x), 1).flatten(1)


class SEBlock(nn.Module):
    """Residual block with squeeze-and-excitation channel gating (x * sigmoid(fc(pool(x))))."""

    def __init__(self, width, reduction=4):
        super().__init__()
        self.conv1 = _conv_bn(width, width)
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.fc1 = nn.Linear(width, width // reduction)
        self.fc2 = nn.Linear(width // reduction, width)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(out.mean((2, 3))))))
        return F.relu(x + out * gate[:, :, None, None])


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.block = SEBlock(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_hidden, channel_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, token_hidden)
        self.token_fc2 = nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, channel_hidden)
        self.channel_fc2 = nn.Linear(channel_hidden, dim)

    def forward(self, x):  # x: [batch, tokens, dim]
        y = self.norm1(x).transpose(1, 2)
        y = self.token_fc2(F.gelu(self.token_fc1(y))).transpose(1, 2)
        x = x + y
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class MLPMixer(nn.Module):
    """MLP-Mixer: patch embedding, token-mixing Linear over the token axis, channel mixing."""

    def __init__(self, image=16, patch=4, dim=12, depth=2, classes=5):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 8, 16) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT with class token, learned positional embedding and nn.MultiheadAttention."""

    def __init__(self, image=16, patch=4, dim=16, heads=2, depth=2, classes=5):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class FusedQKVAttention(nn.Module):
    """Hand-written attention: one Linear to 3E, reshape to heads, softmax(q k^T) v, proj.

    ``attention="sdpa"`` splits q/k/v by ``chunk`` + ``view`` and calls
    F.scaled_dot_product_attention; ``attention="einsum"`` writes the products with einsum.
    """

    def __init__(self, dim, heads, attention="matmul"):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        if self.attention == "sdpa":
            q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2)
                       for t in self.qkv(x).chunk(3, dim=-1))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        else:
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            scale = (dim // self.heads) ** -0.5
            if self.attention == "einsum":
                attn = torch.einsum("bhid,bhjd->bhij", q, k) * scale
                out = torch.einsum("bhij,bhjd->bihd", attn.softmax(-1), v)
            else:
                out = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
                out = out.transpose(1, 2)
        return self.proj(out.reshape(batch, tokens, dim))


class FusedQKVTransformer(nn.Module):
    def __init__(self, dim=16, heads=4, classes=3):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = FusedQKVAttention(dim, heads)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # x: [batch, features=6, tokens] -> tokens last for the embed
        x = self.embed(x.transpose(1, 2))
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


class TextCNN(nn.Module):
    """Embedding of token ids, Conv1d over the sequence, global max pool, Linear."""

    def __init__(self, vocab=30, dim=8, width=12, classes=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.embedding(tokens).transpose(1, 2)
        return self.fc(F.relu(self.conv(x)).amax(-1))


class NormZoo(nn.Module):
    """GroupNorm and InstanceNorm (affine, with running statistics) on conv channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.conv3 = nn.Conv1d(8, 6, 1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.inorm(self.conv2(x)))
        x = self.conv3(x.flatten(2)).mean(-1)
        return self.fc(self.ln(x))


class VGGSmall(nn.Module):
    """VGG: conv stages, then flatten -> Linear (each input channel feeds H*W weights)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 8), nn.MaxPool2d(2), _conv_bn(8, 16), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 20), nn.ReLU(), nn.Dropout(), nn.Linear(20, 5),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNetSmall(nn.Module):
    """DenseNet: pre-activation layers whose inputs are the concatenation of all before."""

    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(*[DenseLayer(8 + i * growth, growth) for i in range(3)])
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1),
                                        nn.AvgPool2d(2))
        self.block2 = nn.Sequential(*[DenseLayer(10 + i * growth, growth) for i in range(2)])
        self.norm = nn.BatchNorm2d(18)
        self.fc = nn.Linear(18, 5)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2Small(nn.Module):
    """MobileNetV2: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes match."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ResidualMLP(nn.Module):
    """MLP with residual blocks, BatchNorm1d and LayerNorm."""

    def __init__(self, features=10, width=16, classes=3):
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(3)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(self.norm(x))


class Decoder(nn.Module):
    """ConvTranspose2d decoder: Linear -> reshape to a map -> transposed convs (one grouped)."""

    def __init__(self, latent=6):
        super().__init__()
        self.fc = nn.Linear(latent, 8 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1, output_padding=1)

    def forward(self, z):
        x = self.fc(z).view(-1, 8, 4, 4)
        return torch.sigmoid(self.up2(F.relu(self.bn(self.up1(x)))))


class CifarBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # 1x1 projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: widths 16/32/64, 1x1 projection shortcuts."""

    def __init__(self, depth=56, classes=10):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        layers, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(CifarBasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def _image(size=16):
    return (torch.randn(2, 3, size, size),)


ARCHITECTURES = {
    "unet": lambda: (UNetSmall(), _image()),
    "squeezenet_fire": lambda: (SqueezeNetSmall(), _image(32)),
    "se_block": lambda: (SENet(), _image(8)),
    "mlp_mixer": lambda: (MLPMixer(), _image()),
    "vit_mha": lambda: (ViT(), _image()),
    "fused_qkv": lambda: (FusedQKVTransformer(), (torch.randn(2, 6, 5),)),
    "text_cnn": lambda: (TextCNN(), (torch.randint(0, 30, (2, 7)),)),
    "group_instance_norm": lambda: (NormZoo(), _image(8)),
    "vgg_flatten": lambda: (VGGSmall(), _image()),
    "densenet": lambda: (DenseNetSmall(), _image(8)),
    "mobilenetv2": lambda: (MobileNetV2Small(), _image()),
    "residual_mlp": lambda: (ResidualMLP(), (torch.randn(4, 10),)),
    "conv_transpose": lambda: (Decoder(), (torch.randn(2, 6),)),
    "resnet20": lambda: (CifarResNet(20), _image(8)),
}


def build(name: str, seed: int = 0):
    """``(model, example_inputs)`` of architecture `name`, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model, inputs = ARCHITECTURES[name]()
    for module in model.modules():  # random running stats and affine, so a mix-up shows
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
        if is_norm and module.running_mean is not None:
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
        if getattr(module, "weight", None) is not None and isinstance(
            module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        ):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval(), inputs
