"""Images streamed to a model (every stage that reads images: embedding,
scoring, the masking check, the spurious-region assignment, Stage 2 and
evaluation).

An *item* is a picklable callable ``item(ds, i)`` that decodes and
preprocesses image ``i`` of a dataset (e.g. :class:`~.embed.RoiItem`); a
:func:`stream` runs it through a ``torch.utils.data.DataLoader`` and yields
lists of items in order. With ``compute.workers`` > 0 the items are made in
that many worker processes while the model works on the previous batch; 0
makes them in this process. Either way the order and the values are the
same, so results do not depend on the number of workers. Only one batch
(times the loader's prefetch) is in memory at a time, whatever the size of
the dataset.

An item that fails on bad input (an unreadable image, a box with no area)
is raised here as the same one-line :class:`~ravl_pipeline.config.InputError`,
not as a worker-process traceback. The loader draws its worker seeds from
its own generator, so streaming never moves the global random state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from ..compute import CPU, Compute
from ..config import USER_OS_ERRORS, InputError, RegionsConfig

__all__ = ["Item", "stream"]

Item = Callable[[Any, int], Any]
PREFETCH_FACTOR = 2  # batches each worker prepares ahead


@dataclass(frozen=True)
class _Failed:
    """Bad input met in a worker, carried back to be raised in the main process."""

    kind: type
    message: str


class _Items(torch.utils.data.Dataset):
    def __init__(self, ds, item: Item, indices: Sequence[int] | None):
        self.ds, self.item, self.indices = ds, item, indices

    def __len__(self) -> int:
        return len(self.ds) if self.indices is None else len(self.indices)

    def __getitem__(self, k: int):
        i = int(k if self.indices is None else self.indices[k])
        try:
            return self.item(self.ds, i)
        except (InputError, *USER_OS_ERRORS) as exc:
            return _Failed(type(exc), str(exc))


def _as_list(items: list) -> list:
    return items


def stream(ds, item: Item, *, indices: Sequence[int] | None = None, batch_size: int = RegionsConfig.batch_size,
           batches: Iterable[Sequence[int]] | None = None, compute: Compute = CPU) -> Iterator[list]:
    """Lists of ``item(ds, i)``: for ``indices`` (default: every row) in
    batches of ``batch_size``, or for each list of row indices ``batches``
    gives (consumed lazily, e.g. a training run's batches); in order, made
    in ``compute.workers`` processes (module docstring)."""
    data = _Items(ds, item, None if batches is not None else indices)
    workers = int(compute.workers)
    options: dict[str, Any] = {"num_workers": workers, "collate_fn": _as_list, "pin_memory": compute.pin_memory,
                               "generator": torch.Generator().manual_seed(0)}
    if workers:
        options["prefetch_factor"] = PREFETCH_FACTOR
    if batches is not None:
        loader = DataLoader(data, batch_sampler=batches, **options)
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, **options)
    for batch in loader:
        for x in batch:
            if isinstance(x, _Failed):
                raise x.kind(x.message)
        yield batch
