"""Nested state dicts (optimizer, scheduler, EMA, callbacks) as safetensors + JSON, never pickle.

`flatten` swaps every tensor for a reference and returns (tensors, json-able tree); `unflatten` inverts it.
Non-string dict keys (torch optimizers key their state by int) and tuples survive the round trip.
"""

from __future__ import annotations

from typing import Any

import torch

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__dict_items__"


def flatten(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if torch.is_tensor(x):
            key = path or "root"
            tensors[key] = x.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {_ITEMS: [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path or 'root'} in a checkpoint (tensors and JSON values only)")

    tree = walk(obj, prefix)
    return tensors, tree


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            key = tree[_TENSOR]
            if key not in tensors:
                raise KeyError(f"checkpoint refers to tensor {key!r} which is not in its safetensors file")
            return tensors[key]
        if set(tree) == {_TUPLE}:
            return tuple(unflatten(v, tensors) for v in tree[_TUPLE])
        if set(tree) == {_ITEMS}:
            return {k: unflatten(v, tensors) for k, v in tree[_ITEMS]}
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree
