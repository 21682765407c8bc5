"""Interpreter-start hook of otprune's environment-variable route (run by ``otprune_autopatch.pth``).

Standard library only, so that the ``.pth`` costs nothing measurable: it runs only when
``BASELINE=OURS`` or ``OTPRUNE_KEEP`` is set, and then merely puts a finder on ``sys.meta_path``.
When one of the model modules in :data:`TARGETS` is imported later (the original LLaVA codebase's
``llava.model.llava_arch``, transformers' LLaVA / LLaVA-NeXT / Qwen-VL modelling files), the finder lets it
load normally and then calls :func:`otprune.autopatch.patch_module` on it (see that module for the
variables and their meaning). Each process of a multi-process launch runs its own ``.pth``.
"""

import os
import sys
import threading

TARGETS = (
    "llava.model.llava_arch",
    "transformers.models.llava.modeling_llava",
    "transformers.models.llava_next.modeling_llava_next",
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
)


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
        from otprune.autopatch import patch_module

        patch_module(module)

    def __getattr__(self, name):  # get_source, get_code, is_package, ...
        return getattr(self._loader, name)


class _Finder:
    """A ``sys.meta_path`` finder that only answers for :data:`TARGETS`, by asking the others.

    Another finder that defers to the others (loops ``sys.meta_path`` or calls
    ``importlib.util.find_spec``) asks this one back while it is looking a name up: that nested
    lookup of the same name, in the same thread, gets None, so the lookup ends and the loader is
    wrapped once.
    """

    otprune_autopatch = True

    def __init__(self):
        self._local = threading.local()  # .busy: the names this thread is looking up

    def find_spec(self, name, path=None, target=None):
        busy = self._local.__dict__.setdefault("busy", set())
        if name not in TARGETS or name in busy:
            return None
        busy.add(name)
        try:
            return self._find_wrapped(name, path, target)
        finally:
            busy.discard(name)

    def _find_wrapped(self, name, path, target):
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
    """Arm the hook (idempotent); patch at once the target modules already imported."""
    if not enabled():
        return
    loaded = [sys.modules[name] for name in TARGETS if name in sys.modules]
    if loaded:
        from otprune.autopatch import patch_module

        for module in loaded:
            patch_module(module)
    if not any(getattr(f, "otprune_autopatch", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
