"""otprune benchmark harness (run from a source checkout): `python -m bench <what> [--quick] [--out DIR]`.

Subcommands: select (selection latency vs the official loop), e2e (LLaVA prefill / first token /
decode with pruning), quality (what the selection keeps), exact-vs-official (numerics comparison).
"""
