"""Roofline cost model of one ``select`` call on a GPU, per backend (modelled, not measured).

Each backend's work is a list of :class:`Phase` s (bytes moved, FLOPs, dependent steps, kernels,
host-issued framework ops, host synchronisations). A phase's device time is

    max(HBM bytes / HBM rate, L2 bytes / L2 rate, shared-memory bytes / smem rate, FLOPs / peak)
    + its dependent latency (steps x a per-step cost) + kernels x a per-kernel cost,

where every rate is scaled down to the SMs the phase can keep busy (tiles, images, blocks). A call's
bound is ``max(host issue time, device time) + host syncs x sync cost``: the host issues framework
ops asynchronously, so issue and device work overlap, except at a host synchronisation.

Figures (:data:`H100`, :data:`H200`, :data:`LATENCY`; vendor peaks, the rest stated assumptions):
- H100 SXM: HBM 3.35 TB/s, fp16 dense tensor cores 989 TFLOP/s, fp32 (SIMT FMA) 67 TFLOP/s,
  fp64 67 TFLOP/s, L2 50 MB, 132 SMs, 227 KB opt-in shared memory per block. H200: HBM 4.8 TB/s,
  the rest the same die and clocks. A100 SXM (:data:`A100`, for ranking on such a device): HBM
  2.04 TB/s, fp16 312, fp32 19.5, fp64 9.7 TFLOP/s, L2 40 MB, 108 SMs, 163 KB, no clusters.
- Assumed: L2 7 TB/s over all SMs (no vendor figure; about twice H100's HBM); one SM pulls at most
  110 GB/s from L2/HBM (64 B/clock at ~1.75 GHz) and 250 GB/s from its shared memory (128 B/clock);
  host-to-device copies of pageable memory 25 GB/s.
- Latencies (:class:`Latency`): a framework op costs the host 4 us to issue (eager dispatch plus
  cudaLaunchKernel; a host-looped op chain is launch-bound); a host synchronisation (``.item()``,
  ``bool(tensor)``) 10 us; a kernel at least 1 us on the device (launch latency and ramp/tail, with
  the host running ahead); one dependent greedy step inside one thread block 1 us (block-wide
  argmax: warp shuffles and a barrier, ~0.3 us, then a dependent L2/HBM load of the chosen row,
  ~0.5 us, and the update's barrier; the step's arithmetic and traffic are counted on top); across
  a thread-block cluster 1.5 us (a cluster barrier and a distributed-shared-memory exchange of the
  argmax on top); a dependent global-memory round trip inside a loop 0.5 us. A step of the public
  loop or of the torch greedy is a chain of framework ops instead (launch-bound).
- select's glue (:data:`SELECT_HOST_SYNCS`): one host synchronisation per call, the input check's
  read, issued after the selection so that it waits for the finished call (tests/test_host_sync.py
  holds select to one). With ``check=False`` the per-image scale is computed on the device instead
  (~14 small ops; meant for CUDA-graph capture, where they cost only device time) and nothing is
  read; the model covers the default, ``check=True``.

Tensor cores run only fp16 products that keep fp32-level accuracy: the Triton similarity's hi/lo
split of fp16 input and the Triton kernel matrix's split-fp16 G (three products). Every other fp32
GEMM (cuBLAS ``sgemm`` through torch with TF32 off, Triton ``input_precision="ieee"``) runs at the
fp32 SIMT rate. The public
release's loop (:func:`estimate` with backend ``"official"``) is modelled with the same figures.

The ``cuda`` backend is modelled on the launch its code makes (:func:`cuda_launch_plan`, transcribed
from csrc/greedy_kernel.cuh and csrc/greedy_cuda.cu): Cholesky rows in one block's shared memory, in
a thread-block cluster's, or in global memory. :data:`DESIGN_STATUS` says which designs exist.

A measured table overrides the model for backend ranking (:func:`load_measurements`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Gpu:
    """Peak figures of one GPU (bytes/s, FLOP/s, bytes)."""

    name: str
    hbm_bw: float
    l2_bw: float
    l2_bytes: float
    sms: int
    sm_bw: float  # one SM's L2/HBM traffic
    smem_bytes: int  # opt-in shared memory per block
    smem_bw: float  # one SM's shared-memory traffic
    fp16_tc: float
    fp32: float
    fp64: float
    h2d_bw: float  # pageable host-to-device copies
    cc_major: int = 9  # compute capability major (thread-block clusters from 9 on)


H100 = Gpu("H100 SXM", hbm_bw=3.35e12, l2_bw=7e12, l2_bytes=50e6, sms=132, sm_bw=110e9,
           smem_bytes=227 * 1024, smem_bw=250e9, fp16_tc=989e12, fp32=67e12, fp64=67e12, h2d_bw=25e9)
H200 = replace(H100, name="H200", hbm_bw=4.8e12)
# A100 SXM 80 GB: vendor peaks; per-SM rates scaled to its 1.41 GHz boost clock (64 B and 128 B per
# clock, as assumed for H100), L2 assumed at twice its HBM rate; compute capability 8: no clusters.
A100 = Gpu("A100 SXM", hbm_bw=2.039e12, l2_bw=4e12, l2_bytes=40e6, sms=108, sm_bw=90e9, smem_bytes=163 * 1024,
           smem_bw=180e9, fp16_tc=312e12, fp32=19.5e12, fp64=9.7e12, h2d_bw=25e9, cc_major=8)
GPUS = (H100, H200)  # the targets' GPUs: every report and verdict is for these


@dataclass(frozen=True)
class Latency:
    """Fixed costs in seconds (module docstring says why these values)."""

    launch_s: float = 4e-6
    host_sync_s: float = 10e-6
    kernel_s: float = 1e-6
    block_step_s: float = 1e-6
    cluster_step_s: float = 1.5e-6
    round_trip_s: float = 0.5e-6


LATENCY = Latency()

# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Phase:
    """One stage of a call. Bytes and FLOPs are totals over the batch.

    sms: SMs the phase can keep busy (None: all). steps / latency_s: dependent steps on the device's
    critical path and their total cost. kernels: device launches; host_ops: framework ops the host
    issues; host_syncs: host waits for the device.
    """

    name: str
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    smem_bytes: float = 0.0
    h2d_bytes: float = 0.0
    flops: float = 0.0
    unit: str = "fp32"  # "fp16_tc", "fp32" or "fp64"
    sms: Optional[int] = None
    steps: int = 0
    latency_s: float = 0.0
    kernels: int = 0
    host_ops: int = 0
    host_syncs: int = 0

    def device_s(self, gpu: Gpu, lat: Latency = LATENCY) -> float:
        sms = gpu.sms if self.sms is None else max(1, min(gpu.sms, self.sms))
        share = sms / gpu.sms
        reach = sms * gpu.sm_bw
        work = max(
            self.hbm_bytes / min(gpu.hbm_bw, reach),
            self.l2_bytes / min(gpu.l2_bw, reach),
            self.smem_bytes / (sms * gpu.smem_bw),
            self.flops / (getattr(gpu, self.unit) * share),
        )
        return work + self.h2d_bytes / gpu.h2d_bw + self.latency_s + self.kernels * lat.kernel_s


@dataclass(frozen=True)
class Estimate:
    """A backend's modelled call: its design in words and its phases on one GPU."""

    backend: str
    design: str
    phases: Tuple[Phase, ...]
    gpu: Gpu
    lat: Latency = field(default=LATENCY)

    def _sum(self, attr: str) -> float:
        return sum(getattr(p, attr) for p in self.phases)

    hbm_bytes = property(lambda self: self._sum("hbm_bytes") + self._sum("h2d_bytes"))
    onchip_bytes = property(lambda self: self._sum("l2_bytes") + self._sum("smem_bytes"))
    flops = property(lambda self: self._sum("flops"))
    steps = property(lambda self: int(self._sum("steps")))
    host_ops = property(lambda self: int(self._sum("host_ops")))
    host_syncs = property(lambda self: int(self._sum("host_syncs")))

    @property
    def device_s(self) -> float:
        return sum(p.device_s(self.gpu, self.lat) for p in self.phases)

    @property
    def host_s(self) -> float:
        return self.host_ops * self.lat.launch_s

    @property
    def seconds(self) -> float:
        """The modelled lower bound of one call."""
        return max(self.host_s, self.device_s) + self.host_syncs * self.lat.host_sync_s


@dataclass(frozen=True)
class Shape:
    """One call: B images of N tokens, d features, k picks each, input dtype name."""

    B: int
    N: int
    d: int
    k: int
    dtype: str = "float16"

    def __post_init__(self):
        for name in ("B", "N", "d", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.k > self.N:
            raise ValueError(f"k={self.k} exceeds N={self.N}")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"dtype must be one of {tuple(_ITEMSIZE)}, got {self.dtype!r}")


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
F32 = 4

# -------------------------------------------------------------------------------- shared pieces


def _acc(shape: Shape) -> Tuple[int, str]:
    """(bytes, FLOP unit) of the accumulation dtype: float64 stays float64, the rest fp32."""
    return (8, "fp64") if shape.dtype == "float64" else (F32, "fp32")


def _cached(nbytes: float, gpu: Gpu) -> bool:
    """Whether a working set of ``nbytes`` stays in L2 between its reads."""
    return nbytes <= gpu.l2_bytes


def _tiles(n: int, tile: int, triangle: bool) -> Tuple[int, float]:
    """(output tiles, share of the full N x N product computed) of an N x N GEMM output."""
    t = -(-n // tile)
    return (t * (t + 1) // 2, (t + 1) / (2 * t)) if triangle else (t * t, 1.0)


def triton_gemm_block(batch: int, n: int, fp16: bool, gpu: Gpu) -> int:
    """The Triton triangle GEMMs' tile edge (otprune/triton_kernels/_env.py gemm_block, transcribed;
    a test keeps them equal): 128 for fp16 operands while the batch's 128-tiles cover the SMs, else 64."""
    t = -(-n // 128)
    return 128 if fp16 and batch * t * (t + 1) // 2 >= gpu.sms else 64


# Host synchronisations of one select call outside the greedy (its input check).
SELECT_HOST_SYNCS = 1
# Framework ops of the check on a GPU without lengths (otprune._validate.select_probe: the (2, B)
# output's allocation and one per-image min/max reduction kernel writing into it; a test counts
# them). The host reads it only after the selection has been issued, so the one sync comes last and
# max(host, device) + sync bounds the call.
SELECT_CHECK_OPS = 2
SELECT_CHECK_KERNELS = 1


def _validation(shape: Shape) -> Phase:
    """select's input check: each image's min and max (one reduction over x) gathered into one
    tensor, read by the host at the end of the call."""
    B, N, d = shape.B, shape.N, shape.d
    return Phase("validate", hbm_bytes=B * N * d * _ITEMSIZE[shape.dtype], kernels=SELECT_CHECK_KERNELS,
                 host_ops=SELECT_CHECK_OPS, host_syncs=SELECT_HOST_SYNCS)


def _similarity_torch(shape: Shape, gpu: Gpu) -> Phase:
    """otprune.kernel.similarity on a GPU: normalise in the accumulation dtype (8 elementwise /
    reduction ops, ~4 passes over the upcast copy), then one full batched cuBLAS GEMM (no tensor
    cores; split-K lets it fill every SM)."""
    B, N, d = shape.B, shape.N, shape.d
    acc, unit = _acc(shape)
    x = B * N * d
    return Phase("similarity (torch: upcast, normalise, GEMM)",
                 hbm_bytes=x * _ITEMSIZE[shape.dtype] + 4 * x * acc + B * N * N * acc,
                 flops=2.0 * B * N * N * d, unit=unit, kernels=9, host_ops=9)


def _similarity_triton(shape: Shape, gpu: Gpu) -> Phase:
    """otprune.triton_kernels.similarity: the scales kernel (column sums of squares and the operand
    scales, the fp16 split's powers of two included), then one 64 x 64-tile GEMM over the upper block
    triangle (no split-K: its tiles bound the SMs it uses; each tile reads its 2 x tile rows of X
    from L2; tiles of 64 or 128, :func:`triton_gemm_block`); fp16 input: two fp16 tensor-core
    products (hi + lo split), other dtypes: fp32 (ieee) products. Host: 2 launches and 4
    allocations (mask or placeholder, two scale vectors, S)."""
    B, N, d = shape.B, shape.N, shape.d
    fp16 = shape.dtype == "float16"
    tile = triton_gemm_block(B, N, fp16, gpu)
    tiles, share = _tiles(N, tile, triangle=True)
    flops = (2 if fp16 else 1) * 2.0 * B * N * N * d * share
    item = _ITEMSIZE[shape.dtype]
    return Phase(f"similarity (Triton: fused normalisation, triangle GEMM, {tile}-tiles)",
                 hbm_bytes=2 * B * N * d * item + B * N * N * F32, l2_bytes=B * tiles * 2 * tile * d * item,
                 flops=flops, unit="fp16_tc" if fp16 else "fp32", sms=B * tiles, kernels=2, host_ops=6)


def _rows_gemm(shape: Shape, unit: str, tile: Optional[int], triangle: bool, products: int, what: str,
               elem: int = F32) -> Phase:
    """G = gamma S S^T precomputed: read S, write G (B N^2 elem-byte values each), 2 N^3 FLOPs per
    product. tile: output tile edge of a kernel without split-K (its tiles bound the SMs it uses;
    each tile reads its 2 x tile rows of S from L2); None for cuBLAS, which splits K to fill every
    SM."""
    B, N = shape.B, shape.N
    tiles, share = _tiles(N, tile or 1, triangle)
    return Phase(f"kernel rows: G = gamma S S^T ({what})", hbm_bytes=2 * B * N * N * elem,
                 l2_bytes=B * tiles * 2 * tile * N * elem if tile else 0.0,
                 flops=products * 2.0 * B * N ** 3 * share, unit=unit, sms=B * tiles if tile else None,
                 kernels=2, host_ops=2)


def _rows_split(shape: Shape, gpu: Gpu) -> Phase:
    """G by otprune.triton_kernels.kernel_matrix: three split-fp16 tensor-core products over the
    upper block triangle, tiles of :func:`triton_gemm_block`."""
    tile = triton_gemm_block(shape.B, shape.N, True, gpu)
    return _rows_gemm(shape, "fp16_tc", tile, True, 3, f"Triton split-fp16 tensor-core triangle GEMM, {tile}-tiles")


def _sort(shape: Shape) -> Phase:
    """The output sort on (B, k) int64: one sort (no lengths, as in every modelled shape; with
    lengths, sort_picks' where, sort, where)."""
    return Phase("sort picks", hbm_bytes=2 * shape.B * shape.k * 8, kernels=1, host_ops=1)


def _c_traffic(shape: Shape) -> float:
    """Bytes of the previous Cholesky rows C[:t] read over all steps t = 1 .. k-1: B N 4 sum(t)."""
    k = shape.k
    return shape.B * shape.N * F32 * (k - 1) * (k - 2) / 2


# ---------------------------------------------------------------------- the CUDA launcher's plan
# csrc/greedy_kernel.cuh (greedy_plan, greedy_cluster_plan, launch_plan) transcribed;
# tests/test_cost_model.py compares them with the compiled header (tests/simt/driver.cpp --plan,
# --launch).

CUDA_WARP = 32
CUDA_MAX_THREADS = 1024
CUDA_MAX_CLUSTER = 16


@dataclass(frozen=True)
class CudaPlan:
    """A launch of the CUDA greedy (GreedyPlan): threads per block, dynamic shared memory bytes per
    block, whether the Cholesky rows live in shared memory, blocks per image (cluster, 1 = one
    block) and items each block owns (slice)."""

    threads: int
    smem_bytes: int
    rows_on_chip: bool
    cluster: int
    slice: int


def _argmax_scratch_bytes(elem: int) -> int:
    return 2 * (CUDA_MAX_THREADS // CUDA_WARP + 1) * (elem + 4)


def _block_threads(items: int) -> int:
    per = -(-items // CUDA_MAX_THREADS)
    return -(-(-(-items // per)) // CUDA_WARP) * CUDA_WARP


def cuda_block_plan(n: int, k_max: int, elem: int, smem_limit: int) -> CudaPlan:
    """One block per image: the Cholesky rows in shared memory when they fit ``smem_limit`` bytes."""
    rows = max(k_max - 1, 1)
    base = _argmax_scratch_bytes(elem) + n * elem
    with_rows = base + rows * n * elem
    on_chip = with_rows <= smem_limit
    return CudaPlan(_block_threads(n), with_rows if on_chip else base, on_chip, 1, n)


def cuda_cluster_plan(n: int, k_max: int, elem: int, smem_limit: int,
                      max_cluster: int = CUDA_MAX_CLUSTER) -> Optional[CudaPlan]:
    """The smallest power-of-two cluster (2 .. max_cluster blocks) whose blocks hold their share of
    the Cholesky rows in ``smem_limit`` bytes; None when none does."""
    rows = max(k_max - 1, 1)
    cs = 2
    while cs <= min(max_cluster, CUDA_MAX_CLUSTER):
        part = -(-n // cs)
        nbytes = _argmax_scratch_bytes(elem) + (rows + part + rows * part) * elem
        if nbytes <= smem_limit:
            return CudaPlan(_block_threads(part), nbytes, True, cs, part)
        cs *= 2
    return None


def cuda_launch_plan(batch: int, n: int, k_max: int, elem: int, gpu: Gpu) -> CudaPlan:
    """The launch the CUDA greedy makes on ``gpu`` (its opt-in shared memory, SMs, compute
    capability): one block per image with the rows in shared memory when they fit; else, from sm_90
    on, one cluster per image while batch x cluster <= SMs; else one block per image with the rows in
    global memory (csrc/greedy_kernel.cuh launch_plan; tests/test_cost_model.py compares the two
    through the compiled header). Not modelled: the launcher's fall-back to one block per image
    when cudaOccupancyMaxActiveClusters finds no room for such a cluster."""
    plan = cuda_block_plan(n, k_max, elem, gpu.smem_bytes)
    if not plan.rows_on_chip and gpu.cc_major >= 9:
        split = cuda_cluster_plan(n, k_max, elem, gpu.smem_bytes)
        if split is not None and batch * split.cluster <= gpu.sms:
            return split
    return plan


def _cuda_where(plan: CudaPlan) -> str:
    if plan.cluster > 1:
        return f"cluster of {plan.cluster} blocks per image, Cholesky rows in shared memory"
    return "one block per image, Cholesky rows in " + ("shared memory" if plan.rows_on_chip else "global memory")


# --------------------------------------------------------------------------------- the greedies


def _greedy_cuda(shape: Shape, gpu: Gpu, lat: Latency, rows: str, plan: CudaPlan) -> Phase:
    """csrc/greedy_cuda.cu's one launch under ``plan`` (:func:`cuda_launch_plan`): ``plan.cluster``
    blocks per image (one SM each), the image's items split among them; the Cholesky rows in shared
    memory (a cluster also copies the pivot's column C[:t, j] from its owner's shared memory every
    step) or, off chip, in a global workspace (L2 while the batch's rows fit it); rows "full" (row j
    of G read per step) or "lazy" (gamma S[j, :] S formed per step, plus the diagonal pass: k N^2
    reads of S per image)."""
    B, N, k = shape.B, shape.N, shape.k
    elem, unit = _acc(shape)
    sms = B * plan.cluster
    waves = -(-sms // gpu.sms)
    c = _c_traffic(shape) * elem / F32
    hbm = l2 = smem = 0.0
    if plan.rows_on_chip:
        smem += c + (B * plan.cluster * elem * (k - 1) * (k - 2) / 2 if plan.cluster > 1 else 0.0)
    elif _cached(B * k * N * elem, gpu):
        l2 += c
    else:
        hbm += c
    flops = 2.0 * c / elem
    g_cached = _cached(B * N * N * elem, gpu)  # G (full) or S (lazy), re-read every step
    reads = B * (k - 1) * N * elem if rows == "full" else B * k * N * N * elem
    if rows == "lazy":
        flops += 2.0 * B * k * N * N
    if g_cached:
        l2 += reads
    else:
        hbm += reads
    step = lat.block_step_s if plan.cluster == 1 else lat.cluster_step_s
    steps = waves * (k - 1)
    return Phase(f"greedy ({_cuda_where(plan)}, rows {rows})", hbm_bytes=hbm + B * N * elem, l2_bytes=l2,
                 smem_bytes=smem, flops=flops, unit=unit, sms=sms, steps=steps, latency_s=steps * step, kernels=1,
                 host_ops=3)


def _greedy_legacy(shape: Shape, gpu: Gpu, lat: Latency) -> Phase:
    """The one-block kernel before the redesign: re-reads all of S every step, C rows in global."""
    B, N, k = shape.B, shape.N, shape.k
    acc, unit = _acc(shape)
    s_reads = B * k * N * N * acc  # the diagonal pass plus k - 1 row formations
    c = _c_traffic(shape) * acc / F32
    hit = _cached(B * N * N * acc, gpu)
    return Phase("greedy (one block per image, S re-read every step)",
                 hbm_bytes=0.0 if hit else s_reads, l2_bytes=(s_reads if hit else 0.0) + c,
                 flops=2.0 * B * k * N * N, unit=unit, sms=B, steps=k - 1, latency_s=(k - 1) * lat.block_step_s,
                 kernels=1, host_ops=3)


# The Triton greedy's tiling (otprune/triton_kernels/greedy.py: BLOCK_T, MAX_BLOCK_N; a test keeps
# these equal): rows of C per dependent inner-loop iteration, columns per chunk.
TRITON_BLOCK_T = 16
TRITON_MAX_BLOCK_N = 1024


def _greedy_triton(shape: Shape, gpu: Gpu, lat: Latency, rows: str) -> Phase:
    """One program per image; C rows and d2 in a global scratch; per step and column chunk the row
    of L (read, or formed from S in tiles of TRITON_BLOCK_T rows: "lazy"), then C[:t] in tiles of
    TRITON_BLOCK_T rows, each tile one dependent load."""
    B, N, k = shape.B, shape.N, shape.k
    col_chunks = -(-N // TRITON_MAX_BLOCK_N)
    tiles = col_chunks * sum(-(-t // TRITON_BLOCK_T) for t in range(1, k - 1))
    c = _c_traffic(shape)
    hbm = l2 = 0.0
    if _cached(B * k * N * F32, gpu):
        l2 += c
    else:
        hbm += c
    flops = 2.0 * c / F32
    if rows == "full":
        l2 += B * (k - 1) * N * F32
    else:
        tiles += (k - 1) * col_chunks * -(-N // TRITON_BLOCK_T)
        s_reads = B * (k - 1) * N * N * F32
        if _cached(B * N * N * F32, gpu):
            l2 += s_reads
        else:
            hbm += s_reads
        flops += 2.0 * B * (k - 1) * N * N
    return Phase(f"greedy (Triton, one program per image, rows {rows})", hbm_bytes=hbm + B * N * F32,
                 l2_bytes=l2, flops=flops, sms=B, steps=(k - 1) + tiles,
                 latency_s=(k - 1) * lat.block_step_s + tiles * lat.round_trip_s, kernels=1, host_ops=4)


# Framework ops per step of otprune.greedy.greedy_picks on a GPU (index arithmetic, row fetch,
# gather + baddbmm of C, rsqrt, scale, the residual update with its floor at 1 (clamp_max, addcmul,
# maximum), index_fill, max writing the next pick in place); "lazy" adds the bmm that forms the row.
# tests/test_cost_model.py counts them on the real loop.
TORCH_STEP_OPS = {"full": 11, "lazy": 12}


def _greedy_torch(shape: Shape, gpu: Gpu, lat: Latency, rows: str) -> Phase:
    """otprune.greedy.greedy_picks: a host loop of small ops per step, no host sync."""
    B, N, k = shape.B, shape.N, shape.k
    acc, unit = _acc(shape)
    ops = (k - 1) * TORCH_STEP_OPS[rows] + 6
    c = _c_traffic(shape) * acc / F32
    s_reads = B * (k - 1) * N * N * acc if rows == "lazy" else B * (k - 1) * N * acc
    hit = _cached(B * N * N * acc, gpu)
    return Phase(f"greedy (torch host loop, rows {rows})", hbm_bytes=0.0 if hit else s_reads,
                 l2_bytes=c + (s_reads if hit else 0.0), flops=2.0 * c / acc, unit=unit, sms=B,
                 steps=k - 1, kernels=ops, host_ops=ops)


def _torch_rows(shape: Shape) -> str:
    """The torch greedy's lazy/full rule (otprune.greedy.kernel_rows_strategy) for this shape."""
    from .greedy import FULL_ROWS_MAX_BYTES, FULL_ROWS_MIN_N, FULL_ROWS_MIN_SHARE

    acc, _ = _acc(shape)
    fits = shape.B * shape.N * shape.N * acc <= FULL_ROWS_MAX_BYTES
    return "full" if fits and (shape.N >= FULL_ROWS_MIN_N or shape.k >= FULL_ROWS_MIN_SHARE * shape.N) else "lazy"


def _official(shape: Shape, gpu: Gpu, lat: Latency) -> List[Phase]:
    """The public release's loop, image after image: fp32 GEMMs for S and L (its identity built on
    the host and copied over), then per step 9 ops and 2 host syncs (.item(), the epsilon test)."""
    B, N, d, k = shape.B, shape.N, shape.d, shape.k
    x = N * d
    per_image = [
        Phase("normalise + S (fp32 GEMM)", hbm_bytes=x * _ITEMSIZE[shape.dtype] + 2 * x * F32 + N * N * F32,
              flops=2.0 * N * N * d, kernels=4, host_ops=4),
        Phase("L = I + gamma S S^T (fp32 GEMM, eye copied from the host)", hbm_bytes=4 * N * N * F32,
              h2d_bytes=N * N * F32, flops=2.0 * N ** 3, kernels=4, host_ops=4),
        Phase("greedy (host loop, 2 syncs per step)", l2_bytes=N * F32 * k * (k - 1) / 2 + k * N * F32,
              flops=float(N * k * (k - 1)), sms=1, steps=k - 1, kernels=9 * (k - 1) + 4,
              host_ops=9 * (k - 1) + 4, host_syncs=2 * (k - 1) + 2),
    ]
    return [replace(p, hbm_bytes=B * p.hbm_bytes, h2d_bytes=B * p.h2d_bytes, l2_bytes=B * p.l2_bytes,
                    flops=B * p.flops, steps=B * p.steps, kernels=B * p.kernels, host_ops=B * p.host_ops,
                    host_syncs=B * p.host_syncs) for p in per_image]


def _cuda_rows(shape: Shape) -> str:
    """The cuda backend's kernel-row form (otprune.backends.cuda_ext.rows_strategy): "full" while G,
    (B, N, N) in the accumulation dtype, fits otprune.greedy.FULL_ROWS_MAX_BYTES, else "lazy"."""
    from .greedy import FULL_ROWS_MAX_BYTES

    return "full" if shape.B * shape.N * shape.N * _acc(shape)[0] <= FULL_ROWS_MAX_BYTES else "lazy"


def _cuda_design(stage1: str, g_unit: str) -> Callable[[Shape, Gpu, Latency], List[Tuple[str, List[Phase]]]]:
    """Builder of a cuda-backend design: select's check, a similarity, G if the rows are "full",
    the greedy launched as :func:`cuda_launch_plan` says, the sort.

    stage1: "torch" (otprune.kernel.similarity) or "triton" (otprune.triton_kernels.similarity).
    g_unit: "fp32" (cuBLAS GEMM through torch, TF32 off) or "fp16_tc" (the Triton split-fp16
    tensor-core triangle GEMM, otprune.triton_kernels.kernel_matrix). float64 input keeps the torch
    similarity and an fp64 G whatever they say.
    """
    stages = {"torch": _similarity_torch, "triton": _similarity_triton}

    def build(shape: Shape, gpu: Gpu, lat: Latency) -> List[Tuple[str, List[Phase]]]:
        elem, unit = _acc(shape)
        rows = _cuda_rows(shape)
        plan = cuda_launch_plan(shape.B, shape.N, shape.k, elem, gpu)
        stage = _similarity_torch if shape.dtype == "float64" else stages[stage1]  # Triton's takes no float64
        phases = [_validation(shape), stage(shape, gpu)]
        if rows == "full":
            if g_unit == "fp16_tc" and unit == "fp32":
                phases.append(_rows_split(shape, gpu))
            else:
                phases.append(_rows_gemm(shape, unit, None, False, 1, f"{unit} cuBLAS GEMM", elem=elem))
        phases += [_greedy_cuda(shape, gpu, lat, rows, plan), _sort(shape)]
        return [(f"rows {rows}, {_cuda_where(plan)}", phases)]

    return build


def _design_cuda_legacy(shape: Shape, gpu: Gpu, lat: Latency) -> List[Tuple[str, List[Phase]]]:
    return [("torch similarity, one block per image re-reading S",
             [_validation(shape), _similarity_torch(shape, gpu), _greedy_legacy(shape, gpu, lat), _sort(shape)])]


# The Triton greedy keeps the whole L only while B N^2 fp32 fit this many bytes
# (otprune/triton_kernels/greedy.py: FULL_L_BUDGET_BYTES; a test keeps them equal).
TRITON_FULL_L_BUDGET_BYTES = 1 << 30


def _design_triton(shape: Shape, gpu: Gpu, lat: Latency) -> List[Tuple[str, List[Phase]]]:
    """Triton similarity, then L precomputed by the Triton triangle GEMM ("full", while it fits the
    budget) or rows formed in the greedy ("lazy"); its launcher picks the cheaper by a model of its
    own (choose_strategy), the same physics as here."""
    out = [("Triton similarity, rows lazy, one program per image",
            [_validation(shape), _similarity_triton(shape, gpu), _greedy_triton(shape, gpu, lat, "lazy"), _sort(shape)])]
    if F32 * shape.B * shape.N * shape.N <= TRITON_FULL_L_BUDGET_BYTES:
        out.append(("Triton similarity, full L, one program per image",
                    [_validation(shape), _similarity_triton(shape, gpu),
                     _rows_split(shape, gpu),
                     _greedy_triton(shape, gpu, lat, "full"), _sort(shape)]))
    return out


def _design_torch(shape: Shape, gpu: Gpu, lat: Latency) -> List[Tuple[str, List[Phase]]]:
    rows = _torch_rows(shape)
    phases = [_validation(shape), _similarity_torch(shape, gpu)]
    if rows == "full":
        elem, unit = _acc(shape)
        phases.append(_rows_gemm(shape, unit, None, False, 1, f"torch {unit} GEMM", elem=elem))
    phases += [_greedy_torch(shape, gpu, lat, rows), _sort(shape)]
    return [(f"torch ops, rows {rows}, host loop", phases)]


def _design_official(shape: Shape, gpu: Gpu, lat: Latency) -> List[Tuple[str, List[Phase]]]:
    return [("public release's loop, image after image", _official(shape, gpu, lat))]


# Design name -> builder of its variants [(description, phases)]; a design with several variants is
# rated by its fastest one (its launcher is meant to choose the same).
DESIGNS = {
    "cuda-legacy": _design_cuda_legacy,
    "cuda-fp32-rows": _cuda_design("torch", "fp32"),
    "cuda-tc-similarity-tc-rows": _cuda_design("triton", "fp16_tc"),
    "triton": _design_triton,
    "torch": _design_torch,
    "official": _design_official,
}
# What each design is, in the code as it stands (update with the code).
DESIGN_STATUS = {
    "cuda-legacy": "replaced: the CUDA greedy before its redesign",
    "cuda-fp32-rows": "implemented: the cuda backend where Triton is not usable (torch similarity, fp32 "
                      "cuBLAS G)",
    "cuda-tc-similarity-tc-rows": "implemented (cuda backend): Triton tensor-core similarity, G by the Triton "
                                  "split-fp16 triangle GEMM, the CUDA greedy",
    "triton": "implemented (triton backend)",
    "torch": "implemented (torch backend)",
    "official": "public loop (reference)",
}
# The design each GPU backend's code implements (update with the code: auto ranks by it). The cuda
# backend without a usable Triton runs "cuda-fp32-rows"; then triton is unusable too, and that
# design ranks before torch at every modelled shape as well (tests/test_cost_model.py).
BACKEND_DESIGN = {"cuda": "cuda-tc-similarity-tc-rows", "triton": "triton", "torch": "torch"}
GPU_BACKENDS = tuple(BACKEND_DESIGN)


def estimate(name: str, shape: Shape, gpu: Gpu = H100, lat: Latency = LATENCY) -> Estimate:
    """The modelled call of a GPU backend (``GPU_BACKENDS``, through ``BACKEND_DESIGN``) or a
    design (``DESIGNS``) for ``shape`` on ``gpu``: its fastest variant."""
    design = BACKEND_DESIGN.get(name, name)
    if design not in DESIGNS:
        raise ValueError(f"name must be one of {GPU_BACKENDS + tuple(DESIGNS)}, got {name!r}")
    ests = [Estimate(name, text, tuple(phases), gpu, lat) for text, phases in DESIGNS[design](shape, gpu, lat)]
    return min(ests, key=lambda e: e.seconds)


# ------------------------------------------------------------------------- ranking and override


def gpu_for(device_name: str) -> Gpu:
    """The figures used for a CUDA device name: an H200's, an A100's (both by name), an H100's for
    every other GPU (the ranking, not the absolute time, is what ``auto`` uses)."""
    name = device_name.upper()
    return H200 if "H200" in name else A100 if "A100" in name else H100


Measurements = Dict[Tuple[str, str, int, int, int, int, str], float]


def load_measurements(path: str) -> Measurements:
    """A measured table from ``python -m bench select``'s CSV: (device, backend, B, N, d, k, dtype)
    -> p50 seconds of the latest row. Providers other than ``otprune-<backend>`` are ignored."""
    out: Measurements = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            prov = r.get("provider", "")
            if not prov.startswith("otprune-"):
                continue
            key = (r["device"], prov[len("otprune-"):], int(r["B"]), int(r["N"]), int(r["d"]), int(r["k"]), r["dtype"])
            out[key] = float(r["p50_ms"]) * 1e-3
    return out


MEASURED_ENV = "OTPRUNE_MEASURED"


@lru_cache(maxsize=None)
def _measured_from_env(path: str) -> Measurements:
    return load_measurements(path) if path else {}


@lru_cache(maxsize=4096)
def _modelled(name: str, shape: Shape, gpu: Gpu) -> float:
    return estimate(name, shape, gpu).seconds


def rank(names: Sequence[str], shape: Shape, device_name: str,
         measured: Optional[Measurements] = None) -> List[str]:
    """``names`` (GPU backends) from fastest to slowest for ``shape`` on the named CUDA device.

    Measured times are used when every one of ``names`` has a row for this device and shape in
    ``measured`` (default: the CSV named by the environment variable ``OTPRUNE_MEASURED``);
    otherwise the model's bounds (model and measurement are never mixed in one ranking).
    Ties keep the order of ``names``.
    """
    if measured is None:
        measured = _measured_from_env(os.environ.get(MEASURED_ENV, ""))
    keys = [(device_name, n, shape.B, shape.N, shape.d, shape.k, shape.dtype) for n in names]
    if measured and all(k in measured for k in keys):
        times = [measured[k] for k in keys]
    else:
        gpu = gpu_for(device_name)
        times = [_modelled(n, shape, gpu) for n in names]
    order = sorted(range(len(names)), key=lambda i: (times[i], i))
    return [names[i] for i in order]


def round_budget(ratio: float, n: int) -> int:
    """k for a keep ratio, as select computes it (Python's round, at least 1)."""
    return max(1, min(n, int(round(ratio * n))))


def speedup(shape: Shape, backend: str, gpu: Gpu) -> float:
    """Modelled public-loop time over ``backend``'s for the same batch."""
    return estimate("official", shape, gpu).seconds / estimate(backend, shape, gpu).seconds


__all__ = ["A100", "CudaPlan", "Estimate", "Gpu", "GPUS", "GPU_BACKENDS", "H100", "H200", "LATENCY", "Latency", "Phase",
           "Shape", "BACKEND_DESIGN", "DESIGN_STATUS", "DESIGNS", "cuda_block_plan", "cuda_cluster_plan",
           "cuda_launch_plan", "estimate", "gpu_for", "load_measurements", "rank", "round_budget", "speedup"]
