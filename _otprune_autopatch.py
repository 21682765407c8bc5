"""Interpreter-start hook of otprune's environment-variable route (run by ``otprune_autopatch.pth``).

Standard library only, so that the ``.pth`` costs nothing measurable: it runs only when
``BASELINE=OURS`` or ``OTPRUNE_KEEP`` is set, and then merely puts a finder on ``sys.meta_path``.
When LLaVA's model code (``llava.model.llava_arch``) is imported later, the finder lets it load
normally and then calls :func:`otprune.autopatch.patch_llava` on it (see that module for the
variables and their meaning). Each process of a multi-process launch runs its own ``.pth``.
"""

import os
import sys

TARGET = "llava.model.llava_arch"


def enabled(environ=None) -> bool:
    """True when the environment asks for pruning (BASELINE=OURS or OTPRUNE_KEEP set)."""
    env = os.environ if environ is None else environ
    return env.get("BASELINE") == "OURS" or bool(env.get("OTPRUNE_KEEP"))


class _Loader:
    """Runs the real loader, then patches the freshly executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from otprune.autopatch import patch_llava

        patch_llava(module)

    def __getattr__(self, name):  # get_source, get_code, is_package, ...
        return getattr(self._loader, name)


class _Finder:
    """A ``sys.meta_path`` finder that only answers for :data:`TARGET`, by asking the others."""

    otprune_autopatch = True

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Arm the hook (idempotent); patch at once if LLaVA's model code is already imported."""
    if not enabled():
        return
    if TARGET in sys.modules:
        from otprune.autopatch import patch_llava

        patch_llava(sys.modules[TARGET])
        return
    if not any(getattr(f, "otprune_autopatch", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
