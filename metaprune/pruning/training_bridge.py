"""Data, evaluation and fine-tuning for the pruning engine, imported only when data is given.

`metaprune.data` and `metaprune.finetune` own these; the engine reaches them through this one
module so that pruning without data never imports them.
"""

from importlib import import_module

from torch import nn

from metaprune.errors import InvalidTargetError, MetaPruneError
from metaprune.vocabulary import TEXT_DATASETS

DATA_BATCH_SIZE = 128
TEXT_BATCH_SIZE = 32  # windows of a text corpus per batch


def _component(module_name: str, attribute: str):
    try:
        return getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise MetaPruneError(
            f"{module_name}.{attribute} is not available in this build, so data cannot be used"
        ) from error


def resolve_data(data, example_inputs, *, seed: int = 0, model: nn.Module | None = None):
    """``((train_loader, test_loader), note)`` from a dataset id, a folder, or a loader pair,
    with inputs fitted to the model's example input by size-1 dimensions (`note` says how, or
    is None); ``(None, None)`` without data. A shape that does not fit raises before any work.

    A text corpus id (`TEXT_DATASETS`) gives windows of token ids as long as the example input,
    labelled for the model's objective (`text_objective`).
    """
    if data is None:
        return None, None
    if isinstance(data, str) and data in TEXT_DATASETS:
        return _text_loaders(model, example_inputs, seed), None
    loaders = _component("metaprune.data", "resolve_loaders")(data, batch_size=DATA_BATCH_SIZE,
                                                              seed=seed)
    return _component("metaprune.data.adapt", "adapt_loaders")(loaders, example_inputs)


def text_objective(model: nn.Module) -> str:
    """``"masked-tokens"`` for a masked language model (BERT-style), else ``"next-token"``."""
    from metaprune.formats.hf import is_masked_language_model

    return "masked-tokens" if is_masked_language_model(model) else "next-token"


def _text_loaders(model: nn.Module, example_inputs, seed: int):
    """Loaders of the text corpus for `model`: token windows as long as its example input."""
    from metaprune.data.errors import DatasetRequestError
    from metaprune.data.text_corpus import load_text_corpus, text_loaders

    tokens = example_inputs[0] if len(example_inputs) == 1 else None
    if tokens is None or tokens.dim() != 2 or tokens.is_floating_point():
        shapes = [tuple(t.shape) for t in example_inputs]
        raise DatasetRequestError(f"a text corpus feeds one tensor of token ids [batch, length]; "
                                  f"the model's example inputs are {shapes}")
    masked = text_objective(model) == "masked-tokens"
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else \
        next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    needed = load_text_corpus().vocab_size + int(masked)  # + the mask token
    if embedding is None or embedding.num_embeddings < needed:
        size = None if embedding is None else embedding.num_embeddings
        raise DatasetRequestError(
            f"the text corpus needs a token embedding of at least {needed} ids (its characters"
            f"{' and a mask token' if masked else ''}); the model's has {size}")
    return text_loaders(length=tokens.shape[1], masked=masked, batch_size=TEXT_BATCH_SIZE,
                        seed=seed)


def seed_of(config: dict | None) -> int:
    """The seed of data order and fine-tuning (`FinetuneConfig.seed`; 0 by default)."""
    seed = (config or {}).get("seed", 0)
    return seed if isinstance(seed, int) else 0


def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float(_component("metaprune.finetune", "evaluate")(model, loader))


def perplexity(model: nn.Module, loader) -> float:
    """exp(mean cross-entropy) over the labelled tokens of a text loader."""
    return float(_component("metaprune.finetune", "perplexity")(model, loader))


def finetune_config(config: dict | None):
    """The validated `FinetuneConfig` (bad settings fail before any pruning work)."""
    return _component("metaprune.finetune", "FinetuneConfig").from_dict(config)


def metanet_epochs(total: int, config: dict | None) -> int:
    """Epochs of the `total` fine-tune budget spent right after the metanetwork's rewrite.

    None by default: the whole budget follows pruning. With the rewrite off (the head-only
    checkpoint) half the budget before pruning cost 3-5 pts at 4 epochs on held-out models,
    and with a rewriting checkpoint (the previous one) it cost 4.0 +- 0.9 pts at 3x on the
    validation split (issue 12; `benchmarks/metanet.md`). ``config["metanet_epochs"]`` moves it.
    """
    chosen = finetune_config(config).metanet_epochs if config is not None else None
    epochs = 0 if chosen is None else chosen
    if epochs > total:
        raise InvalidTargetError(f"finetune metanet_epochs ({epochs}) exceeds finetune_epochs "
                             f"({total}), the whole budget")
    return epochs


def finetune(model: nn.Module, train_loader, *, epochs: int, config: dict | None,
             eval_loader=None, teacher: nn.Module | None = None) -> list[dict]:
    """Trains `model` in place for `epochs` (0: only BatchNorm recalibration, if configured).

    The teacher (the dense model) is used only when the config asks for distillation.
    """
    train = _component("metaprune.finetune", "train")
    settings = finetune_config(config)
    return list(train(model, train_loader, epochs=epochs, config=settings,
                      eval_loader=eval_loader, teacher=teacher if settings.distill else None))
