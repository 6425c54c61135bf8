"""CPU TEST HARNESS ONLY - never on sys.path of a GPU job.

Import-only stand-in for torchvision. SGLang imports torchvision at module level (for vision
models), but PyPI torchvision wheels link the CUDA build of libtorch and fail next to the CPU
torch wheel. Text-only serving never calls into it: any attribute or submodule resolves to a
placeholder that can be subclassed or referenced in annotations, and that raises when called.

setup.sh appends this folder to the END of sys.path, so a real torchvision always wins. It has
no dist-info, so `importlib.metadata`-based checks (transformers' is_torchvision_available)
still report torchvision as absent.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+mopd.cpu.harness"


class _Placeholder:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is a CPU test-harness stand-in here; it cannot be used")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()

    def __mro_entries__(self, bases):
        # `class X(torchvision.something.Module)` -> plain object base.
        return (object,)


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import torchvision.<anything>` with an empty placeholder package."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_SubmoduleFinder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder()
