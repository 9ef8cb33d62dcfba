"""An offline English text corpus for language models: scikit-learn's dataset descriptions.

scikit-learn (a PyPI package MetaPrune already depends on) ships the reference text of its
bundled datasets as reStructuredText under ``sklearn/datasets/descr/`` (about 43 kB of English
prose, tables and references). Nothing is downloaded. The corpus id is ``sklearn-descr``.

Tokens are characters: the vocabulary is the sorted set of characters of the corpus, so a
uniform guess has a perplexity equal to the vocabulary size. The last 10 % of the text (files
in sorted order, joined by blank lines) is held out for validation.

As pruning data (``prune(..., data="sklearn-descr")``) the corpus becomes `text_loaders`:
windows of the model's sequence length whose labels are the next tokens (a decoder) or the
original tokens at masked positions, -100 elsewhere (a masked language model such as BERT; the
mask token is id ``vocab_size``, one past the characters).

Example::

    corpus = load_text_corpus()
    corpus.vocab_size, corpus.train.numel(), corpus.validation.numel()
    inputs, targets = corpus.batch("train", batch=16, length=64, generator=g)  # next-token
    train_loader, test_loader = text_loaders(length=64, masked=True)          # BERT-style
"""

from dataclasses import dataclass
from importlib import resources

import torch
from torch.utils.data import DataLoader, TensorDataset

CORPUS_ID = "sklearn-descr"
VALIDATION_FRACTION = 0.1
MASK_FRACTION = 0.15  # share of positions a masked-LM window hides (BERT's figure)
IGNORED = -100  # label of a position that is not scored (torch's cross_entropy default)


@dataclass
class TextCorpus:
    """Character-level token ids of the corpus, split into train and validation."""

    vocabulary: str  # character i of the vocabulary is token id i
    train: torch.Tensor  # int64 token ids
    validation: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def batch(self, split: str, *, batch: int, length: int, generator: torch.Generator):
        """`batch` random windows of `length` tokens and the tokens that follow each position."""
        tokens = self.train if split == "train" else self.validation
        starts = torch.randint(0, tokens.numel() - length - 1, (batch,), generator=generator)
        windows = torch.stack([tokens[s:s + length + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def windows(self, split: str, *, length: int) -> torch.Tensor:
        """Every non-overlapping window of `length` tokens of a split (for evaluation)."""
        tokens = self.train if split == "train" else self.validation
        count = tokens.numel() // length
        return tokens[:count * length].view(count, length)


def load_text_corpus() -> TextCorpus:
    """The ``sklearn-descr`` corpus (read from the installed scikit-learn package)."""
    folder = resources.files("sklearn.datasets") / "descr"
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".rst"))
    text = "\n\n".join((folder / name).read_text(encoding="utf-8") for name in names)
    vocabulary = "".join(sorted(set(text)))
    index = {char: i for i, char in enumerate(vocabulary)}
    tokens = torch.tensor([index[char] for char in text], dtype=torch.long)
    split = int(tokens.numel() * (1 - VALIDATION_FRACTION))
    return TextCorpus(vocabulary, tokens[:split], tokens[split:])


def masked_windows(windows: torch.Tensor, mask_id: int, generator: torch.Generator):
    """``(inputs, labels)``: MASK_FRACTION of positions replaced by `mask_id` in the inputs and
    labelled with their token; every other position labelled IGNORED."""
    chosen = torch.rand(windows.shape, generator=generator) < MASK_FRACTION
    labels = torch.where(chosen, windows, torch.full_like(windows, IGNORED))
    return torch.where(chosen, torch.full_like(windows, mask_id), windows), labels


def text_loaders(*, length: int, masked: bool, batch_size: int = 32, seed: int = 0
                 ) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` of ``(token ids [B, length], labels [B, length])``.

    Args:
        length: tokens per window (the model's example-input sequence length).
        masked: False: labels are the next tokens (a decoder); True: MASK_FRACTION of the
            input tokens become the mask id ``vocab_size`` and only those are labelled (a
            masked language model). The masks are drawn once from `seed` (train) and from
            ``seed + 1`` (test), so every evaluation scores the same positions.
        batch_size: windows per batch.
        seed: the order of training windows and the masks.

    Training windows start every ``length // 2`` tokens; test windows do not overlap.
    """
    corpus = load_text_corpus()
    splits = []
    for split, stride, offset in (("train", max(1, length // 2), 0), ("validation", length, 1)):
        tokens = corpus.train if split == "train" else corpus.validation
        span = length if masked else length + 1
        windows = tokens.unfold(0, span, stride).contiguous()
        if masked:
            inputs, labels = masked_windows(windows, corpus.vocab_size,
                                            torch.Generator().manual_seed(seed + offset))
        else:
            inputs, labels = windows[:, :-1], windows[:, 1:]
        splits.append(TensorDataset(inputs.contiguous(), labels.contiguous()))
    order = torch.Generator().manual_seed(seed)
    return (DataLoader(splits[0], batch_size=batch_size, shuffle=True, generator=order),
            DataLoader(splits[1], batch_size=batch_size))
