"""Probe optional packages and devices once, keeping the reason for messages.

``import espnet_mha`` never fails because flash-attn (or a GPU) is missing:
everything optional is looked up here, lazily, and cached.
"""

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch


@dataclass(frozen=True)
class FlashAttn:
    """What the ``flash-attn`` package offers in this process.

    Attributes:
        module: the imported ``flash_attn`` module, or None.
        version: its ``__version__`` (None if not importable).
        reason: why it is unusable ("" when usable).
        custom_ops: whether its kernels are registered as torch custom ops
            (``torch.ops.flash_attn``), which lets ``torch.compile`` trace the
            call without a graph break (flash-attn PR #1139, 2.7+).
    """

    module: Any
    version: Optional[str]
    reason: str
    custom_ops: bool

    @property
    def available(self):
        return self.module is not None and not self.reason


_FLASH_ATTN = []  # the cached probe; a plain list so torch.compile can read it (see flash_attn)


def flash_attn():
    """Import ``flash_attn`` once and describe it (see :class:`FlashAttn`).

    The cache is a plain module global rather than ``functools.lru_cache``:
    dynamo cannot trace a call through ``lru_cache`` (it breaks the graph), and
    the flash-attn kernel call inside a compiled function reads this probe.
    The first call (always eager: backend selection probes before any
    compiled call) does the import.
    """
    if not _FLASH_ATTN:
        _FLASH_ATTN.append(_probe_flash_attn())
    return _FLASH_ATTN[0]


def _probe_flash_attn():
    try:
        module = importlib.import_module("flash_attn")
    except Exception as exc:  # ImportError, or a broken CUDA build raising OSError
        return FlashAttn(None, None, f"flash-attn is not importable ({exc!r})", False)
    version = getattr(module, "__version__", None)
    missing = [
        name
        for name in ("flash_attn_func", "flash_attn_varlen_func")
        if not callable(getattr(module, name, None))
    ]
    if missing:
        return FlashAttn(
            module, version, f"flash_attn {version} lacks {', '.join(missing)}", False
        )
    # Detect the custom-op registration at run time rather than trusting a version.
    custom_ops = hasattr(torch.ops, "flash_attn") and hasattr(
        torch.ops.flash_attn, "_flash_attn_forward"
    )
    return FlashAttn(module, version, "", custom_ops)


@functools.lru_cache(maxsize=None)
def cuda_capability(device_index):
    """Compute capability ``(major, minor)`` of a CUDA device, cached per index."""
    return torch.cuda.get_device_capability(device_index)


def device_capability(device):
    """``(major, minor)`` for a CUDA ``torch.device``, None for other devices."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_capability(index)


def reset():
    """Forget cached probes (tests install a stand-in ``flash_attn`` module)."""
    _FLASH_ATTN.clear()
    cuda_capability.cache_clear()


def versions():
    """Versions of the stack, for benchmark ``extra_info`` and bug reports."""
    import espnet

    info = flash_attn()
    return {
        "torch": torch.__version__,
        "espnet": getattr(espnet, "__version__", "?"),
        "flash_attn": info.version if info.available else None,
        "cuda": torch.version.cuda,
    }


def capability_str(capability: Optional[Tuple[int, int]]):
    return "n/a" if capability is None else f"sm{capability[0]}{capability[1]}"
