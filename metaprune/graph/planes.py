"""Channel label planes: which graph node each entry of a traced tensor belongs to.

While the converter runs one forward pass, every tensor carries a tuple of *planes*. A plane is an
int64 tensor of the same rank as the tensor, of size 1 along the axes it does not vary on, whose
entries are node ids (-1: no known node). A feature map ``[N, C, H, W]`` coming out of a
convolution carries one plane of shape ``[1, C, 1, 1]``; after ``flatten(1)`` it becomes one plane
``[1, C*H*W]`` in which every node id repeats H*W times; the output of an MLP-Mixer token-mixing
Linear carries two planes, one along the channel axis and one along the token axis.

Planes are applied the very operation the model applies (view, permute, cat, getitem, ...), so
the channel bookkeeping is exact for any composition of data-movement operators.
"""

import torch

PLANES_ATTR = "_metaprune_planes"
POISON_ATTR = "_metaprune_poison"  # set when an operator scrambled channels in an unknown way
PARAM_ATTR = "_metaprune_free_param"  # set on tensors derived from a free parameter by views


def planes_of(tensor) -> tuple[torch.Tensor, ...]:
    return getattr(tensor, PLANES_ATTR, ())


def set_planes(tensor: torch.Tensor, planes) -> None:
    """Attach planes, at most one per signature: the first wins (e.g. after flattening an
    input labelled along two axes, its channel axis keeps the labelling)."""
    kept: dict[tuple, torch.Tensor] = {}
    for plane in planes:
        kept.setdefault(signature(plane), plane)
    setattr(tensor, PLANES_ATTR, tuple(kept.values()))


def poison_of(tensor) -> str | None:
    return getattr(tensor, POISON_ATTR, None)


def signature(plane: torch.Tensor) -> tuple[int, ...]:
    """The axes along which a plane varies."""
    return tuple(axis for axis, size in enumerate(plane.shape) if size > 1)


def compress(plane: torch.Tensor) -> torch.Tensor:
    """Shrink to size 1 every axis along which the plane is constant."""
    for axis in range(plane.dim()):
        if plane.shape[axis] > 1:
            first = plane.narrow(axis, 0, 1)
            if bool((plane == first).all()):
                plane = first
    return plane.clone()


def expand_full(plane: torch.Tensor, shape) -> torch.Tensor:
    """The plane materialised at the tensor's full shape."""
    return plane.expand(tuple(shape)).contiguous()


def along(ndim: int, axis: int, nodes: torch.Tensor) -> torch.Tensor:
    """A plane that labels axis `axis` of a rank-`ndim` tensor with `nodes`."""
    shape = [1] * ndim
    shape[axis] = nodes.numel()
    return nodes.reshape(shape)


def pad_left(plane: torch.Tensor, ndim: int) -> torch.Tensor:
    """Align a plane to a higher-rank broadcast result (broadcasting aligns trailing axes)."""
    return plane.reshape((1,) * (ndim - plane.dim()) + tuple(plane.shape))


def channel_labels(tensor: torch.Tensor, axis: int) -> torch.Tensor | None:
    """Node id of each index along `axis` (-1 where unknown), or None when no plane labels it.

    Only a plane that varies along `axis` alone qualifies: a plane that also varies along other
    axes means a channel holds different upstream channels at different positions.
    """
    size = tensor.shape[axis]
    best = None
    for plane in planes_of(tensor):
        sig = signature(plane)
        if sig == (axis,):
            return plane.reshape(-1)
        if sig == () and best is None:
            best = plane.reshape(-1).expand(size)
    return None if best is None else best.clone()
