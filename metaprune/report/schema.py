"""The report's schema: every key a pruning report holds, in order, with what it means.

`build_report` fills exactly these keys (null where a figure was not measured), so readers —
the CLI summary, the service, `tune`, the benchmarks — can rely on them. A later feature adds
its key here (one `ReportField` line) and passes it to `build_report`; `REPORT_FORMAT` counts
incompatible changes (a key renamed or removed), not additions.
"""

from dataclasses import dataclass

REPORT_FORMAT = 2  # 1: DESIGN §5's keys; 2: macs_* (flops_* deprecated aliases), §6's keys


@dataclass(frozen=True)
class ReportField:
    name: str  # the JSON key
    meaning: str  # one line for the reader of the schema
    required: bool = False  # build_report refuses to run without it; others default to null


REPORT_FIELDS = (
    ReportField("report_format", "schema version of this report (REPORT_FORMAT)"),
    ReportField("version", "metaprune package version that made the report", True),
    ReportField("macs_before", "MACs of one sample (batch 1) before pruning", True),
    ReportField("macs_after", "MACs of one sample (batch 1) after pruning", True),
    ReportField("params_before", "parameter count before pruning", True),
    ReportField("params_after", "parameter count after pruning", True),
    ReportField("speedup", "macs_before / macs_after (derived)"),
    ReportField("kept", "module name -> [kept, total] output channels", True),
    ReportField("kept_heads", "attention module name -> [kept, total] heads"),
    ReportField("excluded", "module names the request left unpruned"),
    ReportField("left_alone", "module -> why its channels could not be pruned (an operator the "
                              "pruner cannot follow), the rest of the model pruned"),
    ReportField("save_pretrained", "a transformers model: whether its config can state the "
                                   "pruned widths (save_pretrained / from_pretrained), and why "
                                   "not; null for other models"),
    ReportField("input_adaptation", "how data samples were reshaped to the model's input "
                                    "(size-1 dimensions inserted or removed), or null"),
    ReportField("accuracy_before", "top-1 accuracy in [0, 1] before pruning (null: no data)"),
    ReportField("accuracy_after", "top-1 accuracy in [0, 1] after pruning (null: no data)"),
    ReportField("perplexity_before", "exp(mean cross-entropy) on the held-out text before "
                                     "pruning (null unless data is a text corpus)"),
    ReportField("perplexity_after", "the same after pruning and fine-tuning"),
    ReportField("perplexity_objective", "what the perplexity scores: \"next-token\" "
                                        "(decoders) or \"masked-tokens\" (BERT-style)"),
    ReportField("latency_ms_before", "median CPU latency (ms) at latency_batch; null when "
                                     "latency=False"),
    ReportField("latency_ms_after", "median CPU latency (ms) at latency_batch after pruning"),
    ReportField("latency_speedup", "measured latency before / after: the median of per-round "
                                   "ratios, dense and pruned timed interleaved"),
    ReportField("latency_batch", "batch size of the latency measurement"),
    ReportField("latency_threads", "torch intra-op threads during the latency measurement"),
    ReportField("latency_spread", "quartiles of before_ms, after_ms and speedup over the "
                                  "interleaved rounds, their number, the clock read and the "
                                  "C allocator's settings"),
    ReportField("cpu", "the CPU the latency was measured on"),
    ReportField("latency_ms_onnxruntime_before", "median latency (ms) in ONNX Runtime at "
                                                 "latency_batch, when onnxruntime is installed"),
    ReportField("latency_ms_onnxruntime_after", "the same after pruning"),
    ReportField("round_to", "kept channel counts are multiples of this (round_to, or what "
                            "\"auto\" measured), or null"),
    ReportField("target", "for a latency target or a target rounding kept from: what was asked, "
                          "what was reached, and why not (null: a MACs/params target met)"),
    ReportField("finetune", "fine-tune epochs after the metanetwork / after pruning and their "
                            "history, or null"),
    ReportField("finetune_skipped_reason", "why the pruned model was not fine-tuned, or null"),
    ReportField("method", "the method asked for", True),
    ReportField("criterion", "the importance criterion used", True),
    ReportField("allocation", "the allocation used (global, uniform, metanet, policy, ...)",
                True),
    ReportField("metanet", "the metanetwork checkpoint used: name, sha256, scope and why it "
                           "was chosen (absent for a loaded object); allocation_choice: the "
                           "candidates tried (uniform, the head's and the measured allocation "
                           "at a strength), each one's loss on training batches or why it was "
                           "dropped, and the one used (metanet_choice); null without a "
                           "metanetwork"),
    ReportField("seed", "the fine-tuning seed (FinetuneConfig.seed); data loaders use seed 0"),
    ReportField("seconds", "phase -> wall seconds", True),
)

# Old key -> its replacement. Written beside the new key for one release (README: deprecated).
DEPRECATED_ALIASES = {"flops_before": "macs_before", "flops_after": "macs_after"}

REPORT_KEYS = tuple(f.name for f in REPORT_FIELDS) + tuple(DEPRECATED_ALIASES)
