"""Language models pruned on the offline text corpus: perplexity before/after in the report.

Tiny HF LLaMA (next token) and BERT (masked tokens) are built from a config (never downloaded),
trained briefly on ``sklearn-descr`` with the library's own loop, then pruned 2x with one epoch
of recovery by ``prune(data="sklearn-descr")``.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import tiny_bert  # noqa: E402

from metaprune import load_model, prune, save_model  # noqa: E402
from metaprune.data.text_corpus import load_text_corpus, text_loaders  # noqa: E402
from metaprune.finetune import perplexity, train  # noqa: E402
from metaprune.report import format_summary  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTH = 32
RECOVERY = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0}


def _trained_and_pruned(model, objective: str, well_below: float, exclude=()):
    """Two AdamW epochs on the corpus, then `prune` 2x (uniform) with one epoch of recovery;
    the perplexity before and after must stay below `well_below` (a uniform guess: vocab)."""
    train_loader, test_loader = text_loaders(length=LENGTH, masked=objective != "next-token")
    train(model, train_loader, epochs=2, progress=False,
          config={"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0})
    trained, tokens = perplexity(model.eval(), test_loader), next(iter(test_loader))[0][:2]
    assert trained < well_below
    result = prune(model, (tokens,), speedup=2.0, allocation="uniform", data="sklearn-descr",
                   finetune_epochs=1, finetune=RECOVERY, latency=False, exclude=exclude)
    report = result.report
    assert abs(report["speedup"] / 2 - 1) <= 0.02
    assert report["perplexity_objective"] == objective
    assert report["perplexity_before"] == pytest.approx(trained, rel=1e-6)
    assert report["perplexity_after"] < well_below
    return result, tokens


@pytest.fixture(scope="module")
def vocab():
    return load_text_corpus().vocab_size


def _assert_reloads(model, tokens, folder, auto_class):
    """The saved folder gives the pruned model's logits through from_pretrained and load_model."""
    direct = auto_class.from_pretrained(folder, local_files_only=True,
                                        trust_remote_code=False).eval()
    reloaded, _ = load_model(folder)
    expected = _logits(model, (tokens,))
    assert torch.allclose(_logits(direct, (tokens,)), expected, atol=1e-5)
    assert torch.allclose(_logits(reloaded, (tokens,)), expected, atol=1e-5)


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits


@pytest.mark.slow  # trains (about 10 s with one thread)
def test_llama_uniform_2x_reports_perplexity_and_reloads_with_from_pretrained(vocab, tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
        attn_implementation="eager", use_cache=False))
    result, tokens = _trained_and_pruned(model, "next-token", vocab / 4)
    report = result.report
    assert "perplexity" in format_summary(report)
    # uniform: every block keeps the same widths, so the config states them
    assert report["save_pretrained"] == {"possible": True, "why_not": None}
    save_model(result.model, (tokens,), tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    layer = result.model.model.layers[0]
    assert config["intermediate_size"] == layer.mlp.gate_proj.out_features < 64
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    _assert_reloads(result.model, tokens, tmp_path / "pruned",
                    transformers.AutoModelForCausalLM)


@pytest.mark.slow
def test_bert_masked_perplexity_and_from_pretrained_through_pruned_heads(vocab, tmp_path):
    model = tiny_bert(vocab + 1, length=LENGTH)  # + the mask token
    # the hidden size kept (BertConfig derives the head size from it): heads removed per layer
    # are stated as config.pruned_heads, the intermediate size is equal in every layer
    result, tokens = _trained_and_pruned(model, "masked-tokens", vocab / 2,
                                         exclude=("bert.embeddings",))
    assert result.report["save_pretrained"] == {"possible": True, "why_not": None}
    assert [kept for kept, _ in result.report["kept_heads"].values()] == [2, 2]
    save_model(result.model, (tokens,), tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["pruned_heads"] == {"0": [2, 3], "1": [2, 3]}
    _assert_reloads(result.model, tokens, tmp_path / "pruned",
                    transformers.AutoModelForMaskedLM)


def test_bert_pruned_hidden_size_says_why_the_config_cannot_state_it(vocab, tmp_path):
    model = tiny_bert(vocab + 1, length=LENGTH)  # + the mask token
    tokens = torch.randint(0, vocab, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    result = prune(model.eval(), (tokens,), speedup=2.0, allocation="uniform", latency=False)
    note = result.report["save_pretrained"]
    assert not note["possible"] and "hidden_size / num_attention_heads" in note["why_not"]
    save_model(result.model, (tokens,), tmp_path / "pruned.pt2")  # any widths: .pt2
    reloaded, _ = load_model(tmp_path / "pruned.pt2")
    with torch.no_grad():
        out = reloaded(tokens)
    out = out["logits"] if isinstance(out, dict) else out  # the exported output's fields
    assert torch.allclose(out, _logits(result.model, (tokens,)), atol=1e-4)


def test_text_corpus_needs_token_inputs_and_a_large_enough_vocabulary():
    from metaprune.data.errors import DatasetRequestError

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    with pytest.raises(DatasetRequestError, match="at least"):
        prune(model, (torch.zeros(2, 8, dtype=torch.long),), speedup=1.5,
              data="sklearn-descr", latency=False)
    with pytest.raises(DatasetRequestError, match="token ids"):
        prune(torch.nn.Linear(8, 4), (torch.randn(2, 8),), speedup=1.5, data="sklearn-descr",
              latency=False)
