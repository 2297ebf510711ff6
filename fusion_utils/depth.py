"""Layer indices as the whole package counts them: 0-based decoder layers, negative indices from the end, and the
layer at the same relative depth in a model of another depth. The engine's plans and the methods both read them."""
from __future__ import annotations


def layer_index(layer: int, n_layers: int) -> int:
    """``layer`` as a 0-based index into ``n_layers`` decoder layers (``-1`` is the last).

    >>> layer_index(-1, 32)
    31
    """
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"Layer must be an int, got {type(layer).__name__}.")
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise ValueError(f"Layer {layer} is out of range: this model has {n_layers} decoder layers "
                         f"(0 to {n_layers - 1}).")
    return idx


def scaled_layer(layer_of_32: int, n_layers: int, lowest: int = 0) -> int:
    """The layer at the same relative depth as ``layer_of_32`` in a 32-layer model (the paper's and the baselines'
    layer choices are given for 7B models of 32 layers), clipped to ``[lowest, n_layers - 1]``.

    >>> scaled_layer(14, 32), scaled_layer(14, 8), scaled_layer(28, 8)
    (14, 4, 7)
    """
    return int(min(n_layers - 1, max(lowest, round(layer_of_32 / 32 * n_layers))))


__all__ = ["layer_index", "scaled_layer"]
