"""Reading a Lightning checkpoint as data: tensors and plain containers only, every fault one line.

A checkpoint handed over by someone else is untrusted: ``torch.load(weights_only=True)`` refuses a pickle
payload (nothing runs), and every way a file can fail to be a checkpoint (not one, cut off, a folder, a payload,
no ``state_dict``) becomes one :class:`~replugchar.core.data.DataError` naming the file instead of a 30-line trace.
"""

from __future__ import annotations

from pathlib import Path

from ..core.data import DataError


def load_checkpoint(path: str | Path, *, option: str = "--ckpt_path") -> dict:
    """The checkpoint dict of ``path`` (tensors on the CPU), checked to hold a ``state_dict``."""
    import torch

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found ({option})")
    if not path.is_file():
        raise DataError(f"{path}: not a checkpoint file ({option})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as err:  # UnpicklingError (payload refused), RuntimeError (not a zip / cut off), EOFError
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {first[:160]}) ({option})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(f"{path}: not a Lightning checkpoint (no 'state_dict') ({option})")
    return ckpt
