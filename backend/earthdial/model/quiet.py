"""Log lines a user cannot act on, dropped where the model is loaded.

Loading a checkpoint imports transformers, which imports torchao when it is installed (the `[quantize]`
extra). Each in-process run (`earthdial ask --model`, `earthdial detect` without a server) and each
`serve` then printed:
- transformers: "You are using a model of type `internvl_chat` to instantiate a model of type ``": the
  published config is read as it is and converted in memory (checkpoint.native_config), as intended;
- torchao: "Failed to load .../_C_*.so": optional C++ kernels built for another Python or torch, which
  EarthDial never calls (its int8 and NF4 paths are plain PyTorch), and the missing-Triton note that
  comes with them;
- torch: "register_constant() on Enum subclasses is deprecated", from torchao's import.
Only these messages are dropped, each on the logger that emits it; every other warning still shows.
"""

from __future__ import annotations

import logging

NOISE: dict[str, tuple[str, ...]] = {
    "transformers.configuration_utils": ("You are using a model of type `internvl_chat` to instantiate",),
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("register_constant() on Enum subclasses is deprecated",),
}


class _Drop(logging.Filter):
    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


def quiet_model_loading() -> None:
    """Drop the NOISE messages from now on (a filter on each emitting logger; idempotent)."""
    for name, needles in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(needles))
