"""Placeholder until the compiled backend lands (issue 3)."""

raise ImportError("backend not built yet")
