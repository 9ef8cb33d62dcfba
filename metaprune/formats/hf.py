"""HuggingFace ``transformers`` folders (``config.json`` + safetensors weights) in and out.

Only local files are read and only classes that ship inside ``transformers`` are built:
``trust_remote_code=False`` and ``local_files_only=True`` always, a ``config.json`` that asks for
remote code (``auto_map``) or names an architecture ``transformers`` does not have is refused,
and weights must be safetensors (a ``pytorch_model.bin`` pickle is never read). Attention is
built with ``attn_implementation="eager"`` so the channel graph can follow its matrix products.

Example::

    from metaprune.formats.hf import load_hf_folder, save_hf_folder
    model, example_inputs = load_hf_folder("tiny-llama/")        # LlamaForCausalLM, token ids
    result = metaprune.prune(model, example_inputs, speedup=2.0)
    save_hf_folder(result.model, "tiny-llama-pruned/")   # or a ModelFormatError saying why
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from metaprune.errors import ModelFormatError

_SEQUENCE_LENGTH = 16  # example inputs: a batch of 2 sequences of this many tokens


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A directory holding a ``config.json`` (what `load_model` treats as a HF folder)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ModelFormatError(
            "reading a HuggingFace folder needs the transformers package "
            "(pip install 'metaprune[hf]')") from error
    return transformers


def load_hf_folder(path: str | os.PathLike, *, max_params: int = 100_000_000
                   ) -> tuple[nn.Module, tuple]:
    """A model folder (``config.json`` + ``*.safetensors``) as ``(module, example_inputs)``.

    Args:
        path: the folder ``save_pretrained`` wrote.
        max_params: most parameters accepted.

    Example inputs are token ids ``[2, 16]`` (``[2, C, H, W]`` images for vision configs).
    """
    path = Path(path)
    try:
        config_json = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelFormatError(f"{path}/config.json is not readable JSON ({error})") from error
    if not isinstance(config_json, dict):
        raise ModelFormatError(f"{path}/config.json is not a JSON object")
    if "auto_map" in config_json:
        raise ModelFormatError("config.json asks for remote code (auto_map); only architectures "
                               "that ship with transformers are loaded")
    if "quantization_config" in config_json:
        raise ModelFormatError("config.json asks for a quantized model (quantization_config), "
                               "which is not read")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelFormatError(f"{path} holds no .safetensors weights (pickled weights are "
                               "never read)")
    declared = _declared_parameters(weights)
    if declared > max_params:  # counted from the headers, before any tensor is allocated
        raise ModelFormatError(f"{declared} parameters, more than the limit {max_params}")
    transformers = _transformers()
    architectures = config_json.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if not isinstance(model_class, type) or not issubclass(model_class,
                                                           transformers.PreTrainedModel):
        raise ModelFormatError(f"config.json names architecture {architectures!r}, which "
                               "transformers does not provide")
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=False)
        config._attn_implementation = "eager"
        config.use_cache = False  # logits only: no key/value cache object in the outputs
        model = model_class.from_pretrained(
            path, config=config, local_files_only=True, trust_remote_code=False,
            use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelFormatError(f"cannot load the HuggingFace folder {path} ({error})") from error
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        raise ModelFormatError(f"{params} parameters, more than the limit {max_params}")
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise ModelFormatError(f"parameter {name!r} holds NaN or Inf")
    return model.eval(), example_inputs_for(model.config)


@contextlib.contextmanager
def export_patches(model: nn.Module):
    """While torch.export captures a transformers model: its eager attention mask built by
    broadcasting instead of ``torch.vmap`` (whose ``flat_apply`` nodes torch.export cannot
    serialise). Nothing changes for any other model."""
    if not type(model).__module__.startswith("transformers."):
        yield
        return
    from transformers import masking_utils

    if "cache_position" not in inspect.signature(masking_utils.eager_mask).parameters:
        yield  # transformers 5 builds the eager mask without vmap unless asked to
        return

    with mock.patch.dict(masking_utils.AttentionMaskInterface._global_mapping,
                         {"eager": _broadcast_eager_mask}):
        yield


def _broadcast_eager_mask(batch_size, cache_position, kv_length, kv_offset=0,
                          mask_function=None, attention_mask=None, dtype=torch.float32,
                          **ignored):
    """transformers' eager mask (0 where a query may attend, the dtype's minimum elsewhere,
    ``[batch, 1, queries, keys]``), with `mask_function` evaluated on broadcast index tensors
    rather than under vmap. Padding is already folded into `mask_function`."""
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    device = cache_position.device
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    query = cache_position[None, None, :, None]
    key = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    allowed = mask_function(batch, head, query, key).expand(batch_size, 1, -1, -1)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                       torch.finfo(dtype).min)


def is_masked_language_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers masked language model (BERT-style: it predicts hidden
    tokens rather than the next one), by transformers' own task table; False for any other
    module (transformers is not imported for a model that does not come from it)."""
    if not type(model).__module__.startswith("transformers."):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def _declared_parameters(files: list[Path]) -> int:
    """Entries of every tensor the safetensors headers declare (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in files:
        try:
            with safe_open(file, framework="pt") as weights:
                for key in weights.keys():
                    shape = weights.get_slice(key).get_shape()
                    count = 1
                    for size in shape:
                        count *= int(size)
                    total += count
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelFormatError(f"{file.name} is not a valid safetensors file ({error})") \
                from None
    return total


def example_inputs_for(config) -> tuple[torch.Tensor]:
    """Inputs of one forward pass of a model with this config (token ids or images)."""
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size
        return (torch.randn(2, config.num_channels, size, size),)
    length = min(_SEQUENCE_LENGTH, getattr(config, "max_position_embeddings", _SEQUENCE_LENGTH))
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, config.vocab_size, (2, length), generator=generator),)


def pruned_config(model: nn.Module):
    """The config a pruned model's shapes need, or ``(None, why not)``.

    Widths are read from the model (embedding width, the intermediate Linear of every layer,
    head counts of every attention module). The result is checked by building a fresh model
    from it: every parameter must have the pruned model's shape, so a non-uniform allocation or
    a head size the config cannot state is reported rather than saved wrongly.
    """
    config = model.config.__class__.from_dict(model.config.to_dict())
    old = model.config
    hidden = _embedding_width(model.get_input_embeddings())
    if hidden is None:
        return None, "the model's input embedding has no width this reader knows"
    if hasattr(old, "head_dim") and getattr(old, "head_dim", None):
        config.head_dim = old.head_dim  # stated explicitly: the hidden size no longer implies it
    widths = {"hidden_size": hidden}
    pruned_shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    vocab = getattr(old, "vocab_size", None)  # None: a vision model
    for key in ("intermediate_size", "n_inner"):
        before = getattr(old, key, None)
        if before:  # the rows of every parameter the old config sized by it
            rows = {pruned_shapes[name][0] for name, shape in _shapes_from(old, model).items()
                    if shape and shape[0] == before and name in pruned_shapes
                    and len(shape) > 1 and shape[1] != vocab and before != vocab}
            if len(rows) == 1:
                widths[key] = rows.pop()
    from metaprune.pruning.graph_groups import attention_heads  # the traced head axes

    # head counts an attention module states (refreshed by head removal; the trace sees no
    # head axis where one head is left), then the traced head axes
    heads = {path: count for path, module in model.named_modules()
             if path and type(vars(module).get("num_attention_heads")) is int
             for count in [vars(module)["num_attention_heads"]]}
    heads.update(attention_heads(model, example_inputs_for(old)))
    if heads and _states_pruned_heads(model, old, hidden):
        # the hidden size is intact: whole heads removed per layer go into config.pruned_heads,
        # which from_pretrained removes again (any heads: the saved weights fill the rest)
        config.pruned_heads = _pruned_heads(heads, old)
    elif heads:
        counts = sorted(set(heads.values()))
        if len(counts) != 1:
            return None, f"attention modules keep different head counts {counts}"
        widths["num_attention_heads"] = counts[0]
        if getattr(old, "num_key_value_heads", None):
            ratio = old.num_attention_heads // old.num_key_value_heads
            widths["num_key_value_heads"] = counts[0] // ratio
    derived_head = not getattr(old, "head_dim", None) and "num_attention_heads" in widths
    head_size = old.hidden_size // old.num_attention_heads if derived_head else None
    if derived_head and hidden != widths["num_attention_heads"] * head_size:
        hint = " (or keep the hidden size, e.g. exclude the embeddings: heads then go into " \
               "config.pruned_heads)" if hasattr(model.base_model, "_prune_heads") else ""
        return None, (
            f"{type(old).__name__} derives the head size as hidden_size / num_attention_heads, "
            f"so a pruned hidden size must equal kept heads x head size "
            f"({widths['num_attention_heads']} x {head_size} = "
            f"{widths['num_attention_heads'] * head_size}), but it is {hidden}{hint}")
    for key, value in widths.items():
        setattr(config, key, value)
    try:
        expected = _shapes_from(config, model)
    except ValueError as error:  # the config class refuses the combination itself
        return None, f"the config refuses the pruned widths ({error})"
    actual = pruned_shapes
    wrong = [n for n in actual if expected.get(n) != actual[n]]
    if wrong:
        name = wrong[0]
        return None, (f"the config cannot state the pruned shapes (e.g. {name}: pruned "
                      f"{actual[name]}, config gives {expected.get(name)}); widths differ "
                      "between layers or a head size changed")
    return config, None


def _embedding_width(embedding: nn.Module) -> int | None:
    """The hidden size an input embedding produces: a token table's width, or the output
    channels of the first layer of a patch embedding (ViT)."""
    if isinstance(embedding, nn.Embedding):
        return embedding.embedding_dim
    for layer in embedding.modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            return layer.out_channels
        if isinstance(layer, nn.Linear):
            return layer.out_features
    return None


def _states_pruned_heads(model: nn.Module, old, hidden: int) -> bool:
    """Whether removed heads are stated as ``config.pruned_heads`` (transformers' own head
    pruning): the config derives the head size from an unchanged hidden size, and the model
    class can prune heads."""
    return (not getattr(old, "head_dim", None) and hidden == old.hidden_size
            and not getattr(old, "pruned_heads", None)
            and hasattr(model.base_model, "_prune_heads"))  # transformers 5 dropped head pruning


def _pruned_heads(heads: dict[str, int], old) -> dict[int, list[int]]:
    """Layer index -> heads to remove, from module path -> heads kept (the layer index is the
    first number in the path, ``bert.encoder.layer.1.attention.self`` -> 1). A layer the trace
    does not list kept all its heads."""
    kept = {}
    for path, count in heads.items():
        index = next((int(part) for part in path.split(".") if part.isdigit()), None)
        if index is not None:
            kept[index] = count
    total = old.num_attention_heads
    return {layer: list(range(kept.get(layer, total), total))
            for layer in range(old.num_hidden_layers) if kept.get(layer, total) < total}


def save_pretrained_note(model: nn.Module) -> dict | None:
    """For the report: whether `save_hf_folder` can write this (pruned) transformers model, and
    why not; None for a model that is not a transformers model."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        return None
    config, why_not = pruned_config(model)
    return {"possible": config is not None, "why_not": why_not}


def _shapes_from(config, model: nn.Module) -> dict[str, tuple]:
    """Parameter shapes a fresh model of `model`'s class gets from `config` (built on meta)."""
    pruned_heads = dict(getattr(config, "pruned_heads", None) or {})
    if pruned_heads:
        config.pruned_heads = {}  # removed below: head pruning picks indices, which meta cannot
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    finally:
        if pruned_heads:
            config.pruned_heads = pruned_heads
    if pruned_heads:
        fresh.prune_heads(pruned_heads)
    return {n: tuple(p.shape) for n, p in fresh.state_dict().items()}


def save_hf_folder(model: nn.Module, path: str | os.PathLike) -> None:
    """``save_pretrained`` the pruned model when its config can state its shapes.

    Raises:
        ModelFormatError: saying why the config cannot (nothing is written then).
    """
    if not hasattr(model, "save_pretrained"):
        raise ModelFormatError("only a transformers model can be saved as a HuggingFace folder")
    config, why_not = pruned_config(model)
    if config is None:
        raise ModelFormatError(f"cannot save_pretrained: {why_not} (a .pt2 output keeps any widths "
                               "where torch.export can capture the model)")
    model.config = config
    model.save_pretrained(path, safe_serialization=True)
