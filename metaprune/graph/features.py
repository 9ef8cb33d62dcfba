"""The fixed feature layout of graph nodes and edges, shared by every architecture.

Node features (`data.x`, shape `[num_nodes, NUM_NODE_FEATURES]`, the model's parameter dtype):

=====================  =========================================================================
columns                meaning
=====================  =========================================================================
``PARAM_SLOTS`` (6)    read from parameters/buffers: ``bias`` of the layer that created the
                       channel, then ``norm_weight``, ``norm_bias``, ``norm_running_mean``,
                       ``norm_running_var`` of the normalisation folded into the channel, and
                       ``scale``: a free per-channel parameter the activations are multiplied
                       by (layer scale), held by the product's ``merge_mul`` channels.
                       ``data.x_param_mask[n, s]`` is True exactly where slot ``s`` of node ``n``
                       came from a parameter; ``write_back`` reads those entries and no others.
``NODE_KINDS`` (12)    structural one-hot: which rule created the node (model input, conv, ...).
``NORM_KINDS`` (5)     structural one-hot: the normalisation folded into the node, if any.
``log2_kernel``        structural: log2 of the creating layer's kernel size (0 for linear).
``grouped``            structural: 1 when the creating convolution has groups > 1.
``depth``              structural: the layer's longest-path depth, divided by the deepest.
``is_input``           structural: 1 for the model's input channels.
``is_output``          structural: 1 for the channels of the model's output.
=====================  =========================================================================

Structural columns carry no parameter; ``write_back`` ignores them.

Edges are grouped by the length of their feature (``k`` = weights per edge: the kernel size of a
convolution, 1 for a linear layer, H*W for a flatten->Linear, 0 for identity edges of residual
adds, gating products and folded-norm copies). Edges of one group are consecutive in
``edge_index``; ``data.edge_attr`` is ONE flat tensor holding, group after group, each edge's ``k``
weights (so its memory equals the parameter count, never ``num_edges * max_k``). Group ``g`` has
``data.edge_group_size[g]`` edges of ``data.edge_group_k[g]`` weights each; its features are the
next ``size * k`` flat entries viewed as ``[size, k]``. `metaprune.graph.edge_groups(data)` (also
on a PyG ``Batch``, whose groups are simply every graph's groups in turn) returns these views.
"""

PARAM_SLOTS = (
    "bias", "norm_weight", "norm_bias", "norm_running_mean", "norm_running_var", "scale",
)
SLOT = {name: index for index, name in enumerate(PARAM_SLOTS)}

NODE_KINDS = (
    "input",  # a channel of the model's input
    "vocabulary",  # a row of an embedding table (one token of the vocabulary)
    "position",  # an input feature no traced channel explains (token mixing, untracked source)
    "conv",
    "conv_transpose",
    "linear",
    "embedding",
    "attention_in",  # the q/k/v projection outputs of an attention block
    "norm",  # a normalisation that could not be folded into its input channels
    "merge_add",  # the output channels of a residual add / subtraction
    "merge_mul",  # the output channels of a channel gating product / division
    "merge_other",  # other elementwise combinations (maximum, where, ...)
)
NORM_KINDS = ("none", "batch", "layer", "group", "instance")
SCALAR_FEATURES = ("log2_kernel", "grouped", "depth", "is_input", "is_output")

NUM_PARAM_SLOTS = len(PARAM_SLOTS)
KIND_OFFSET = NUM_PARAM_SLOTS
NORM_OFFSET = KIND_OFFSET + len(NODE_KINDS)
SCALAR_OFFSET = NORM_OFFSET + len(NORM_KINDS)
NUM_NODE_FEATURES = SCALAR_OFFSET + len(SCALAR_FEATURES)
SCALAR = {name: SCALAR_OFFSET + index for index, name in enumerate(SCALAR_FEATURES)}
