"""The names a pruning request may use (DESIGN.md §5 and §6), as plain tuples.

Every layer that checks a request — `prune()`, the CLI, the gRPC client and server, `tune` —
reads them from here, so a name added once is accepted everywhere at once.
"""

# Classic channel-importance criteria (`metaprune.criteria` implements each one).
CRITERIA = ("l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "fpgm", "random")
# Criteria whose importance needs gradients of the loss, hence data (never a silent fallback).
DATA_CRITERIA = ("taylor", "hessian")
DATA_FREE_CRITERIA = tuple(name for name in CRITERIA if name not in DATA_CRITERIA)
# `method`: the metanetwork path, or a criterion on its own.
METHODS = ("metanet", *CRITERIA)
# How removed channels are shared out between layers. "latency" spends a measured per-layer
# latency model (DESIGN §6); "latency-depth" does too and may also empty a residual branch
# (depth pruning); a policy (dict or JSON file) is accepted as well, beside these.
ALLOCATIONS = ("global", "uniform", "metanet", "latency", "latency-depth")
# Built-in dataset ids (a folder or an .npz file is accepted by the library too).
DATASETS = ("mnist1d", "digits", "fashion-mnist", "cifar10")
# Offline text corpora for language models (`metaprune.data.text_corpus`): the report then
# holds perplexity before/after (next-token for decoders, masked tokens for BERT-style models).
TEXT_DATASETS = ("sklearn-descr",)
# Model files: what a model is read from, and what a pruned model may be written to.
# "hf": a HuggingFace folder (config.json + safetensors); to the service, a .tar of it
INPUT_FORMATS = ("pt2", "safetensors", "hf")
OUTPUT_FORMATS = ("pt2", "safetensors", "onnx")
# Fine-tuning choices (`metaprune.finetune.FinetuneConfig`).
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
# `round_to` takes a positive int or this word (a multiple chosen from the machine).
ROUND_TO_AUTO = "auto"
