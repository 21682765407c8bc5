"""Pure-torch backend: runs everywhere torch runs (CPU, CUDA, any float dtype)."""

from ..greedy import greedy_picks
from ..kernel import similarity
from . import Backend

BACKEND = Backend(name="torch", devices=("cpu", "cuda"), similarity=similarity, greedy=greedy_picks)
