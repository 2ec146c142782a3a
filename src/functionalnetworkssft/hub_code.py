"""No code from the Hub runs unless the user asks for it, as with --trust_remote_code for model code.

Two libraries fetch compiled kernels from the Hub on their own: transformers 5 swaps layers of every model it loads for
`kernels-community` kernels, and bitsandbytes' CPU backend fetches one as it is imported (PEFT imports bitsandbytes
whenever it is installed, so every run did, quantized or not). Offline, the first fails a GPU run at its first step
and the second prints a warning into every run; online, both run binaries nobody chose. USE_HUB_KERNELS=YES in the
environment (transformers' own switch) opts back in to both.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys

SWITCH = "USE_HUB_KERNELS"


def allowed() -> bool:
    return os.environ.get(SWITCH, "NO").strip().lower() in ("1", "y", "yes", "true", "on")


def keep_hub_kernels_out() -> None:
    """transformers reads the switch each time it loads a model; an explicit setting of the user's wins."""
    os.environ.setdefault(SWITCH, "NO")


def keep_bitsandbytes_from_the_hub() -> None:
    """Whenever bitsandbytes is first imported in this process (PEFT and transformers import it as they load), it is
    imported with the `kernels` package out of its reach, so that its CPU backend falls back to its own kernel instead
    of fetching one. Costs nothing until then; does nothing if bitsandbytes is already loaded or the user opted in."""
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesFinder())


class _BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes through the other finders and wraps its loader; stays in place until the package is really
    loaded (libraries ask importlib.util.find_spec whether it is installed long before they import it)."""

    def __init__(self):
        self.busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes" or self.busy or allowed():
            return None
        self.busy = True  # the lookup below asks every finder again, this one included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutKernels(spec.loader, self)
        return spec


class _WithoutKernels(importlib.abc.Loader):
    def __init__(self, loader, finder: _BitsandbytesFinder):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name):  # everything else (resource readers, get_code, ...) is the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)  # loaded once per process: the hook has done its work
        missing = object()
        saved = sys.modules.get("kernels", missing)
        sys.modules["kernels"] = None  # type: ignore[assignment]  # `import kernels` now fails at once
        cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = cpu_ops.level
        cpu_ops.setLevel(logging.ERROR)  # its notice that the Hub kernel could not be loaded: that is the point
        try:
            self.loader.exec_module(module)
        finally:
            cpu_ops.setLevel(level)
            if saved is missing:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = saved
