"""Batch prefetching for training: the next batches are gathered while the current one trains.

The datasets live in memory as uint8 tensors, so a batch is an index gather plus a host-to-device
copy. ``prefetch_batches`` runs the gathers in ``workers`` background threads (torch releases the GIL
while it copies), keeps up to ``depth`` batches in flight, pins them in page-locked memory when the
destination is a GPU and starts their copies asynchronously (``non_blocking``), so on a GPU the copy of
batch b+1 overlaps the computation on batch b. The batches are exactly those of a plain loop, in the
same order: what is trained does not depend on ``workers``.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import torch

__all__ = ["prefetch_batches"]


def _gather(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xb, yb = x[idx], y[idx]
    if pin:
        xb, yb = xb.pin_memory(), yb.pin_memory()
    return xb, yb


def prefetch_batches(x: torch.Tensor, y: torch.Tensor, batches: Iterable[torch.Tensor], device: torch.device | str,
                     *, workers: int = 2, depth: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x[idx], y[idx])`` on ``device`` for every index tensor in ``batches``, in order.

    ``workers=0`` gathers in the calling thread (no prefetching). Stopping the iteration early (or an
    error in a gather, which is re-raised here) cancels the batches not yet started.
    """
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    it = iter(batches)
    if workers <= 0:
        for idx in it:
            xb, yb = _gather(x, y, idx, pin)
            yield xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="energylens-loader")
    pending: collections.deque = collections.deque()
    try:
        for idx in it:
            pending.append(pool.submit(_gather, x, y, idx, pin))
            if len(pending) >= depth:
                break
        while pending:
            xb, yb = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_gather, x, y, nxt, pin))
            yield xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
