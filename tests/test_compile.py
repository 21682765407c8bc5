"""torch.compile(fullgraph=True) over otprune.select / otprune.prune: one graph, no graph break,
eager results; the custom op ``otprune::select`` passes torch.library.opcheck (fake vs real)."""

import pytest
import torch
from torch._dynamo.utils import counters

import otprune
from otprune import _ops
from helpers import features

X = features(40, 12, 3, b=2)


def _compile(fn, backend):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, fullgraph=True, backend=backend)


def test_prune_compiles_with_inductor_without_graph_break():
    def fn(x):
        return otprune.prune(x, 0.2, lengths=[40, 13])

    kept, idx = _compile(fn, "inductor")(X)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    want_kept, want_idx = fn(X)
    assert torch.equal(idx, want_idx) and torch.equal(kept, want_kept)


def test_select_variants_compile_without_graph_break():
    """Unbatched input, a count, a lengths tensor (static output width) and check=False."""

    def fn(x, lens):
        one = otprune.select(x[0], 5, normalize="token")
        many = otprune.select(x, 0.2, lengths=lens, check=False, backend="torch")
        return one, many

    lens = torch.tensor([40, 9])
    got = _compile(fn, "aot_eager")(X, lens)
    assert not counters["graph_break"]
    for g, w in zip(got, fn(X, lens)):
        assert torch.equal(g, w)


@pytest.mark.parametrize(
    "args",
    [
        (X, 0.2, False, 0.01, "feature", None, None, "", "auto", True),
        (X, 5.0, True, 0.01, "token", torch.tensor([40, 9]), None, "", "torch", False),
        (X, 0.2, False, 0.01, "feature", None, [40, 13], "", "auto", True),
    ],
    ids=["ratio", "count-lengths-tensor-unchecked", "lengths-list"],
)
def test_custom_op_opcheck(args):
    result = torch.library.opcheck(_ops.select_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
