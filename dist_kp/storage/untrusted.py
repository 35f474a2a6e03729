"""Reading torch files that come from outside this process: checkpoints, weights files."""

from __future__ import annotations

import pickle
import re
from typing import IO, Any

import torch


class UnsafeFileError(RuntimeError):
    """A torch file holding something other than tensors and plain data (possibly code run on loading)."""


def load_untrusted(f: IO[bytes] | str) -> Any:
    """torch.load limited to tensors and plain data (weights_only): a file may run code when unpickled.

    PyTorch's refusal advises loading the file anyway (weights_only=False, allowlisting its globals);
    for an untrusted file that means running its code, so only what the file tried to load is kept.
    """
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        operand = re.search(r"Unsupported operand (\w+)", text)
        cause = (f"it loads {named.group(1)}" if named else f"pickle instruction {operand.group(1)}" if operand
                 else "an unsupported pickle instruction")
        raise UnsafeFileError("refused: it holds objects other than tensors and plain data, which may run code "
                              f"when loaded ({cause})") from None
