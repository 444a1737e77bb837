"""Triton's interpreter switch, and kernel modules loaded once per mode.

``triton.jit`` decides at decoration time whether a kernel is compiled or
interpreted, so each mode gets its own copy of a kernel module, loaded on first
use. Importing longctx (or triton) before setting ``TRITON_INTERPRET`` is
therefore harmless.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set now (read at every call)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def load_kernel_module(name: str, path: str) -> ModuleType:
    """The module at `path`, executed for the current mode under `name`_interp or `name`_jit."""
    full = name + ("_interp" if interpreting() else "_jit")
    mod = sys.modules.get(full)
    if mod is None:
        spec = importlib.util.spec_from_file_location(full, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(full, None)
            raise
    return mod
