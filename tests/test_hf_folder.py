"""HuggingFace folders (config.json + safetensors) through load_model / prune / save_model.

Models are built from a config here (never downloaded) and saved with ``save_pretrained``.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import tiny_llama_folder  # noqa: E402

from metaprune import load_model, prune, save_model  # noqa: E402
from metaprune.errors import ModelFormatError  # noqa: E402


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("hf") / "llama")


def test_llama_folder_prunes_2x_with_whole_heads(llama_folder, tmp_path):
    model, inputs = load_model(llama_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and inputs[0].dtype == torch.long
    result = prune(model, inputs, speedup=2.0, latency=False)
    assert abs(result.report["speedup"] / 2 - 1) <= 0.02
    heads = result.report["kept_heads"]
    assert heads and all(total == 4 and kept in (2, 4) for kept, total in heads.values())
    attention = result.model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 2 * attention.k_proj.out_features  # 2:1 GQA kept
    # layers pruned to different widths: the config cannot say so, and the error says why
    with pytest.raises(ModelFormatError, match="config cannot state"):
        save_model(result.model, inputs, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()
    # any widths go to .pt2 (transformers' vmap-built mask replaced while exporting), read
    # back through the strict intake, with a dynamic batch
    save_model(result.model, inputs, tmp_path / "pruned.pt2")
    exported, _ = load_model(tmp_path / "pruned.pt2")
    three = (torch.randint(0, 96, (3, inputs[0].shape[1])),)
    for tokens in (inputs, three):
        with torch.no_grad():
            assert torch.allclose(exported(*tokens)["logits"], _logits(result.model, tokens),
                                  atol=1e-5)


def test_uniform_widths_save_pretrained_and_reload(llama_folder, tmp_path):
    model, inputs = load_model(llama_folder)
    policy = {"model.embed_tokens": 0.5, "model.layers.0.mlp.gate_proj": 0.5,
              "model.layers.1.mlp.gate_proj": 0.5}
    result = prune(model, inputs, policy=policy, latency=False)
    save_model(result.model, inputs, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (16, 32)
    reloaded, _ = load_model(tmp_path / "pruned")
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "pruned", local_files_only=True, trust_remote_code=False)
    expected = _logits(result.model, inputs)
    assert torch.allclose(_logits(reloaded, inputs), expected, atol=1e-5)
    assert torch.allclose(_logits(direct.eval(), inputs), expected, atol=1e-5)


def test_bert_masked_lm_folder_prunes_heads_and_keeps_the_decoder_tied(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=32)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    model, inputs = load_model(tmp_path / "bert")
    result = prune(model, inputs, policy={"bert.encoder.layer.0.attention.self.query": 0.5},
                   latency=False)
    assert result.report["kept_heads"]["bert.encoder.layer.0.attention.self"] == [2, 4]
    assert result.model.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert _logits(result.model, inputs).shape == (2, 16, 96)
    pruned = prune(model, inputs, speedup=1.5, latency=False).model
    assert pruned.cls.predictions.decoder.weight is pruned.bert.embeddings.word_embeddings.weight


def test_folders_asking_for_remote_code_or_pickles_are_refused(llama_folder, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((llama_folder / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    (remote / "model.safetensors").write_bytes((llama_folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelFormatError, match="remote code"):
        load_model(remote)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFormatError, match="no .safetensors"):
        load_model(pickled)


def test_vit_graph_round_trip_prunes_2x_and_round_trips(tmp_path):
    from metaprune import to_graph

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=10,
        attn_implementation="eager")).eval()
    images = (torch.randn(2, 3, 32, 32),)
    assert torch.equal(_logits(to_graph(model, images).write_back(), images),
                       _logits(model, images))  # exact graph round trip
    result = prune(model, images, speedup=2.0, allocation="uniform", latency=False)
    assert abs(result.report["speedup"] / 2 - 1) <= 0.02
    assert all(kept < total for kept, total in result.report["kept_heads"].values())
    save_model(result.model, images, tmp_path / "vit.pt2")
    exported, _ = load_model(tmp_path / "vit.pt2")
    with torch.no_grad():
        assert torch.allclose(exported(*images)["logits"], _logits(result.model, images),
                              atol=1e-5)
    save_model(result.model, images, tmp_path / "vit")  # uniform widths: save_pretrained
    direct = transformers.ViTForImageClassification.from_pretrained(
        tmp_path / "vit", local_files_only=True, trust_remote_code=False).eval()
    assert torch.allclose(_logits(direct, images), _logits(result.model, images), atol=1e-5)


def test_gpt2_conv1d_addmm_is_traced_like_a_linear(tmp_path):
    from metaprune import to_graph

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        attn_implementation="eager", use_cache=False)).eval()
    tokens = (torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0)),)
    assert torch.equal(_logits(to_graph(model, tokens).write_back(), tokens),
                       _logits(model, tokens))  # Conv1D's [in, out] weights, exactly
    result = prune(model, tokens, speedup=2.0, latency=False)
    assert abs(result.report["speedup"] / 2 - 1) <= 0.02 and not result.report["left_alone"]
    assert all(kept < total for kept, total in result.report["kept_heads"].values())
    pruned = result.model
    assert pruned.lm_head.weight is pruned.transformer.wte.weight  # still tied
    mlp = pruned.transformer.h[0].mlp
    assert mlp.c_fc.nf == mlp.c_fc.weight.shape[1] == mlp.c_proj.weight.shape[0]
    save_model(pruned, tokens, tmp_path / "gpt2.pt2")
    exported, _ = load_model(tmp_path / "gpt2.pt2")
    with torch.no_grad():
        assert torch.allclose(exported(*tokens)["logits"], _logits(pruned, tokens), atol=1e-5)
    assert "hidden_size / num_attention_heads" in result.report["save_pretrained"]["why_not"]
