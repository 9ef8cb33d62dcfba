"""Tiny transformers models built from a config (never downloaded), shared by the HF tests."""

import torch


def tiny_llama_folder(folder, *, vocab: int = 96, length: int = 32):
    """A 2-layer LlamaForCausalLM (4 query / 2 key-value heads) saved with save_pretrained."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_bert(vocab: int, *, length: int = 32):
    """A 2-layer BertForMaskedLM (4 heads of 8), eager attention."""
    import transformers

    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=length, attn_implementation="eager"))
