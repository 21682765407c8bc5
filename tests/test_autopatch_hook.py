"""The environment route's import hook (``_otprune_autopatch._Finder``) next to other meta-path finders.

Only ``find_spec`` runs: the target is a throwaway module written to a temporary folder, looked up
but never imported, so nothing is patched.
"""

import importlib.machinery
import sys
import threading

import pytest

import _otprune_autopatch

NAME = "otprune_hook_probe_target"


class _Deferring:
    """A finder that answers for any name by asking every other finder, with no guard of its own
    (as a naive import hook does); records what each other finder answered."""

    def __init__(self):
        self.answers = []

    def find_spec(self, name, path=None, target=None):
        if name != NAME:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            self.answers.append((type(finder).__name__, spec is not None))
            if spec is not None:
                return spec
        return None


@pytest.fixture()
def target(tmp_path, monkeypatch):
    (tmp_path / f"{NAME}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_otprune_autopatch, "TARGETS", (NAME,))
    monkeypatch.delitem(sys.modules, NAME, raising=False)


@pytest.mark.parametrize("hook_first", [True, False], ids=["hook-first", "deferring-first"])
def test_deferring_finder_does_not_recurse(target, monkeypatch, hook_first):
    hook, other = _otprune_autopatch._Finder(), _Deferring()
    path = [hook, other] if hook_first else [other, hook]
    monkeypatch.setattr(sys, "meta_path", path + [f for f in sys.meta_path if not hasattr(f, "otprune_autopatch")])
    spec = path[0].find_spec(NAME)
    assert spec is not None and spec.name == NAME
    # Wrapped exactly once, around the file loader.
    assert isinstance(spec.loader, _otprune_autopatch._Loader)
    assert isinstance(spec.loader._loader, importlib.machinery.SourceFileLoader)
    # The nested lookup of the same name asked the hook back and got None from it.
    assert ("_Finder", False) in other.answers


def test_guard_is_per_thread(target, monkeypatch):
    """A lookup in progress in one thread does not hide the name from another thread."""
    hook = _otprune_autopatch._Finder()
    monkeypatch.setattr(sys, "meta_path", [hook] + [f for f in sys.meta_path if not hasattr(f, "otprune_autopatch")])
    started, got = [], []

    class _OtherThread:
        def find_spec(self, name, path=None, target=None):
            if name == NAME and not started:
                started.append(True)
                t = threading.Thread(target=lambda: got.append(hook.find_spec(NAME)))
                t.start()
                t.join()
            return None

    sys.meta_path.insert(1, _OtherThread())
    assert hook.find_spec(NAME) is not None
    assert got and got[0] is not None and isinstance(got[0].loader, _otprune_autopatch._Loader)
