"""Small models shared by several test modules."""
import torch
from torch import nn


class ChunkCat(nn.Module):
    """Chunk a conv's output into two convs, then concatenate (Torch-Pruning mishandles it)."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.ca, self.cb = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(12, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a, b = torch.relu(self.c0(x)).chunk(2, dim=1)
        return self.fc(self.c2(torch.cat([self.ca(a), self.cb(b)], 1)).mean((2, 3)))


class Detached(nn.Module):
    """A forward that leaves autograd after conv1 (cannot be traced)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv1(x).detach()
        return self.fc(self.conv2(x).mean((2, 3)))


def tiny_llama(*, layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=64,
               tie=False, use_cache=True, seed=0):
    """A Hugging Face LLaMA causal LM built from a config (random init, seeded, eval mode), with
    grouped-query attention by default (``heads`` query heads over ``kv_heads`` KV heads)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=64, tie_word_embeddings=tie, use_cache=use_cache)
    return transformers.LlamaForCausalLM(cfg).eval()


class Encoder(nn.Module):
    """Linear in → nn.TransformerEncoder (2 layers, MHA + LayerNorm) → Linear head."""

    def __init__(self, d=32, heads=4, ff=64, layers=2):
        super().__init__()
        self.inp = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


class GhostSE(nn.Module):
    """GhostNet's ghost module and squeeze-and-excitation, in small: ``primary``'s 4 channels
    are concatenated with their depthwise ``cheap`` copies (8), and the SE's ``expand`` (8
    rows) multiplies the concat, so it sits in ``primary``'s group making twice its channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.primary = nn.Conv2d(6, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        p = self.primary(x)
        y = torch.cat([p, self.cheap(p)], 1)
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.head(y).mean((2, 3))
