"""MLP block outputs over sample tokens, kept in a token reservoir of fixed size.

The matrix ICA needs is tokens x (layers x hidden) floats. Stored whole it grows with samples x length x layers x
hidden (tens of GB for 100 long samples on a 7B model); here every token row streams through a reservoir sample
(Algorithm R, seeded) of at most `max_tokens` rows, so memory is max_tokens x layers x hidden x 4 bytes, whatever
the data, and the same inputs and seed give the same rows.
"""

from __future__ import annotations

import numpy as np


class TokenReservoir:
    """A seeded uniform sample of at most `capacity` rows from a stream of rows."""

    def __init__(self, capacity: int, width: int, seed: int):
        self.rows = np.empty((capacity, width), dtype=np.float32)
        self.capacity, self.seen = capacity, 0
        self.rng = np.random.default_rng(seed)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def add(self, batch: np.ndarray) -> None:
        n = len(batch)
        fill = max(0, min(n, self.capacity - self.seen))
        if fill:
            self.rows[self.seen:self.seen + fill] = batch[:fill]
        if fill < n:
            # Row number g (0-based, over the whole stream) replaces a random slot with probability capacity/(g+1).
            positions = np.arange(self.seen + fill, self.seen + n)
            slots = self.rng.integers(0, positions + 1)
            for k in np.nonzero(slots < self.capacity)[0]:
                self.rows[slots[k]] = batch[fill + k]
        self.seen += n

    def matrix(self) -> np.ndarray:
        return self.rows[: min(self.seen, self.capacity)]


def collect_mlp_outputs(model, examples: list[list[int]], blocks, reservoir: TokenReservoir, progress=None) -> None:
    """Run each example (one at a time, so no padding is ever seen) and add its tokens' MLP outputs of the given
    blocks, side by side, to the reservoir."""
    import torch

    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def keep(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            captured[index] = value.detach()[0].float()
        return keep

    handles = [block.mlp.register_forward_hook(hook(block.index)) for block in blocks]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in examples:
                captured.clear()
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                rows = torch.cat([captured[block.index] for block in blocks], dim=1)
                reservoir.add(rows.cpu().numpy())
                if progress is not None:
                    progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
