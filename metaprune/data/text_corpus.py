"""An offline English text corpus for language models: scikit-learn's dataset descriptions.

scikit-learn (a PyPI package MetaPrune already depends on) ships the reference text of its
bundled datasets as reStructuredText under ``sklearn/datasets/descr/`` (about 43 kB of English
prose, tables and references). Nothing is downloaded. The corpus id is ``sklearn-descr``.

Tokens are characters: the vocabulary is the sorted set of characters of the corpus, so a
uniform guess has a perplexity equal to the vocabulary size. The last 10 % of the text (files
in sorted order, joined by blank lines) is held out for validation.

Example::

    corpus = load_text_corpus()
    corpus.vocab_size, corpus.train.numel(), corpus.validation.numel()
    inputs, targets = corpus.batch("train", batch=16, length=64, generator=g)  # next-token
"""

from dataclasses import dataclass
from importlib import resources

import torch

CORPUS_ID = "sklearn-descr"
VALIDATION_FRACTION = 0.1


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
