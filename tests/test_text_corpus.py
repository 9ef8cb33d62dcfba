"""The offline text corpus (scikit-learn's dataset descriptions, character tokens)."""

import torch

from metaprune.data.text_corpus import CORPUS_ID, load_text_corpus


def test_corpus_is_offline_text_with_a_held_out_tail():
    corpus = load_text_corpus()
    assert CORPUS_ID == "sklearn-descr"
    assert 60 <= corpus.vocab_size <= 128 and "e" in corpus.vocabulary
    assert corpus.train.numel() > 30_000 and corpus.validation.numel() > 3_000
    assert corpus.train.numel() > 8 * corpus.validation.numel()
    text = "".join(corpus.vocabulary[i] for i in corpus.train[:2000].tolist())
    assert "dataset" in text.lower()
    inputs, targets = corpus.batch("train", batch=4, length=32,
                                   generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # next-token pairs
    windows = corpus.windows("validation", length=64)
    assert windows.shape[1] == 64 and int(windows.max()) < corpus.vocab_size
