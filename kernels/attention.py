"""Flash attention with RoPE fused in: Triton forward and backward.

Shapes: q [B, S, Hq, D], k and v [B, S, Hkv, D] (any strides), cos and sin fp32 [S' >= S, D / 2],
Hq = GROUP * Hkv (grouped-query attention: query head h reads kv head h // GROUP; k and v are
never repeated in memory). D is even, at most 256.

RoPE (half-split): for a row x at position p, with x1 = x[:D/2], x2 = x[D/2:], c = cos[p], s = sin[p],
    rot(x) = [x1 * c - x2 * s,  x2 * c + x1 * s]
Every row is rotated once per call: k (and, in the backward, q) by the prep kernel into a transient
workspace rot(x) [B, H, S, D_PAD] in the input dtype, halves at columns 0 and HALF_PAD; the forward
rotates its q block in the kernel's prologue (no extra pass over q). The loops then load plain tiles
and form each score block with one dot over the padded head dim (issue 16 item 1: the forward that
rotated K per (query block, key block) pair spent the registers, barriers and shared-memory round
trips the loop of a plain flash forward does not).

Forward, per (batch, query head), with scale = 1 / sqrt(D):
    S2 = (rot(q) rot(k)^T) * (scale * log2(e))   (base 2; S2[i, j] = -inf where j > i when causal)
    O = softmax(S2 in base 2) v
computed by the online softmax over key blocks in base 2 (exp2 replaces exp), the running max m
and sum l rescaled per block. The forward saves the row statistics stats fp32 [2, B, Hq, S]:
m2_i = max_j S2[i, j] and log2l_i = log2(sum_j exp2(S2[i, j] - m2_i)), apart (csrc/llama_fast.h;
natural LSE = (m2 + log2l) * ln 2). One fp32 LSE = m + log(l) lost the low bits of S - m when |m|
is large (issue 13 item 6: dV wrong by 1e9 at q, k x1e4).
Causal tiling: key blocks wholly above the diagonal are never loaded; blocks wholly below it run
without a mask; only the blocks that straddle the diagonal (or the sequence end) pay for one.

Backward (the flash recipe), with P = exp2((S2 - m2) - log2l) recomputed from the saved stats, S2
formed exactly as the forward forms it (one dot over the same padded rotated rows, the same fp32
scale, a product that is never fused into the subtraction: _mul_rn in both), so bitwise the
forward's in the interpreter and S2 - m2 exact near the row max (on a GPU the tensor cores sum a
dot in their own order, so bitwise is not promised there; tests/test_attention_large_logits.py
measures what that costs):
    delta_i = sum_d dO[i, d] * O[i, d]     (fp32 inputs: sum_j P[i, j] * dP[i, j], see below)
    dV = P^T dO                            summed over the query heads of a group
    dP = dO V^T
    dS = P * (dP - delta)
    dQr = dS rot(K) * scale,   dKr = dS^T rot(Q) * scale   (gradients wrt the rotated q, k)
and the gradient wrt the unrotated inputs is the inverse rotation (by -theta):
    dx1 = dxr1 * c + dxr2 * s,   dx2 = dxr2 * c - dxr1 * s
Three kernels (four launches for fp32 inputs), all deterministic (no atomics):
  1. prep, per block of rows: rot(q) and rot(k) rounded to the input dtype (as the forward feeds
     them to its matmuls) into a workspace [B, H, S, D_PAD], and delta for the q rows in the same
     pass over them. For fp32 inputs delta comes instead from a first launch of the q kernel
     (DELTA_PASS) as rowsum(P * dP) of the very dP the other launches subtract it from: on near
     one-hot rows dP - delta then cancels bitwise, as eager's softmax backward does, where
     rowsum(dO * O) left dq 1e-4 off at q, k std 100 (issue 13 item 6).
  2. kv, one program per key block: holds rot(K) and V, streams the rot(Q) and dO tiles of every
     query block of every query head of the group, accumulates dK and dV.
  3. q, one program per query block: holds rot(Q) and dO, streams rot(K) and V tiles, accumulates dQ.
Why the workspace: rotating in the inner loops (the kv kernel re-rotates a q tile for every key
block, the q kernel a k tile for every query block) keeps fp32 cos / sin tiles and fp32 halves in
registers beside the accumulators, and the compiled kernels spilled (an offline compile for sm_80
and sm_90 at D = 128: hundreds to thousands of bytes of stack per thread). Rotating once, as the CUDA
backward (csrc/cuda/attention_backward.cu) does, leaves plain tile loads in the inner loops and
costs a workspace the size of q and k (head dim padded) for the duration of the backward. Only the
epilogues read cos / sin: they split the dK / dQ accumulator into its halves and apply the inverse rotation.
The workspace stores each rotated row as [xr1, 0 pad, xr2, 0 pad] (halves at columns 0 and
HALF_PAD): a product over the head dim does not depend on the column order, so rot(Q), rot(K) and
the dQ, dK accumulators keep that order and the epilogue's halves are a reshape away, while V, dO
and dV keep the natural one.

Matmuls take operands in the input dtype with fp32 accumulation; rotation, softmax and all
row statistics are fp32. Head dims that are not a power of two are padded (masked) to the next one.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# ------------------------------------------------------------------------------------------------
# Launch heuristics: the one place where block sizes, warps and pipeline stages are chosen.
# ------------------------------------------------------------------------------------------------
# (block_m, block_n, num_warps, num_stages) per GPU generation and padded head dim, for 16-bit
# inputs. Each kernel's block_m / block_n keep their meaning in that kernel (see its arguments); the
# larger must be a multiple of the smaller (the causal split walks a diagonal block in steps).
# Forward (issue 16 item 1: rot(K) from a workspace, Q rotated in the prologue, one QK dot), untimed.
# Picked by an offline compile (benchmarks/compile_attention_configs.py --kernel fwd; --packed for the
# packed tables) under triton 3.6 and 3.9, bf16, GROUP 4, causal: zero stack under both first, then at least 2 stages, the larger
# block_m * block_n, more stages. Registers 3.6 / 3.9, shared memory, wgmma per key-loop iteration:
#   contiguous launches (what real models pass; _contiguous_launch), sm_90a:
#     D 128 (128, 128, 8, 2): 255 / 234, 160 KB, 16 HGMMA.64x128x16, 2 / 3 barriers (the rotating
#       loop at (128, 32, 8, 3): 8 HGMMA.64x32x16 + 2 HGMMA.64x128x16, 6 barriers, 3 fences).
#       (128, 128, 8, 3) also compiles spill-free but takes 224 of the 227 KB.
#     D 64 (128, 128, 8, 3): 210 / 210, 112 KB.
#   contiguous, sm_80 (mma.sync): D 128 (128, 64, 8, 3) 252 / 224, 96 KB; D 64 (128, 64, 8, 3) 198 / 191.
#   general (strided q or v), sm_90a: D 128 (128, 64, 8, 2) 251 / 250, 80 KB ((128, 128, 8, *) 80 / 424 B
#     of stack, (128, 64, 8, 3) 24 B under 3.9); D 64 (128, 128, 8, 2) 254 / 248.
#   general, sm_80: D 128 (128, 32, 8, 3) 255 / 244 ((128, 64, 8, 2 / 3) 40 / 88 B under 3.9);
#     D 64 (128, 64, 8, 3) 250 / 244.
# Head dim 256 (padded sizes over 128) is sized for correctness within shared memory only.
_FORWARD_CONFIGS = {  # block_m queries per program, block_n keys per step; general (strided) launches
    9: {64: (128, 128, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 4, 2)},
    8: {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 16, 4, 1)},
}
_FORWARD_CONTIGUOUS_CONFIGS = {
    9: {64: (128, 128, 8, 3), 128: (128, 128, 8, 2), 256: (64, 32, 4, 2)},
    8: {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 16, 4, 1)},
}
# Packed documents (SEGMENTED: the bounds' loads and masks cost registers) on sm_90a, where the batched
# entries spill: contiguous D 128 (128, 128, 8, 2) 40 B under 3.9 -> (128, 64, 8, 3), 0 / 0; general
# D 64 (128, 128, 8, 2) 40 / 40 B -> (128, 64, 8, 3), 0 / 0; general D 128 keeps (128, 64, 8, 2)
# (0 / 24 B; no 128-row entry with 64 keys or more is spill-free there).
_FORWARD_PACKED_CONFIGS = {**_FORWARD_CONFIGS, 9: {**_FORWARD_CONFIGS[9], 64: (128, 64, 8, 3)}}
_FORWARD_PACKED_CONTIGUOUS_CONFIGS = {**_FORWARD_CONTIGUOUS_CONFIGS,
                                      9: {**_FORWARD_CONTIGUOUS_CONFIGS[9], 128: (128, 64, 8, 3)}}


def _forward_table(contiguous: bool, packed: bool) -> dict:
    """The forward's launch table for a launch's layout and whether it carries packed documents."""
    if packed:
        return _FORWARD_PACKED_CONTIGUOUS_CONFIGS if contiguous else _FORWARD_PACKED_CONFIGS
    return _FORWARD_CONTIGUOUS_CONFIGS if contiguous else _FORWARD_CONFIGS
# Backward kv and q kernels: untimed. Picked from an offline compile of every candidate (kv: block_m
# 16 / 32 / 64, block_n 32 / 64 / 128; q: block_m 32 / 64 / 128, block_n 16 / 32 / 64; 4 or 8 warps,
# 1 to 3 stages; bf16, GROUP 4, causal) by triton 3.6 and 3.9 to sm_90a and sm_80 cubins, with only
# pointers and strides specialized as 16-byte aligned (the general case), reading the stack (spill)
# bytes cuobjdump reports: zero stack under both triton versions first, then the larger
# block_m * block_n, then more stages, then the larger per-program block (fewer bytes streamed per
# FLOP); kv needs block_n % block_m == 0, q block_m % block_n == 0; shared memory within 227 KB
# (sm_90) and 163 KB (sm_80). Every entry below has zero stack on its arch under both versions, and
# again as a contiguous launch specializes it (head-dim strides 1, D and S multiples of 16: loads
# vectorize and more of them go through shared memory). The kernels that rotated tiles in their
# loops had 24 to 5992 bytes of stack at the same entries. Shared memory, general 3.6 / 3.9, then
# specialized (both versions):
#   kv  sm_90: D 64 33 / 33, 41 KB; D 128 45 / 49, 51 KB    sm_80: D 64 41 / 41, 41 KB; D 128 49 / 49, 51 KB
#   q   sm_90: D 64 64 / 64, 80 KB; D 128 96 / 96, 128 KB   sm_80: D 64 44 / 44, 48 KB; D 128 72 / 80, 104 KB
#   D 256 (a few small candidates compiled, not the sweep), both archs: kv 45 / 49, 49 KB; q 68 / 80, 98 KB.
# The price of zero stack for every layout: kv at D 128 on sm_90 multiplies with mma.sync, not wgmma
# (its 32-row key block is under wgmma's 64). These tables serve only the general (strided) launches;
# the contiguous ones take the tables below (_contiguous_launch decides).
# Re-picked for issue 13 item 6 (dK accumulated by halves, scores as two half-dots; since issue 16 one
# dot over the head dim and one dK accumulator), triton 3.9,
# general case only (not yet under 3.6 nor specialized): kv sm_90 D 64 (32, 64, 8, 3) then spilled
# 64 B, sm_80 D 128 (16, 64, 8, 3) 120 B. Candidates (stack bytes; sm_90 at D 64 / D 32):
#   sm_80 D 128: (16, 64, 8, 2) 88, (16, 64, 8, 1) 16, (16, 32, 8, 3) 0, (32, 32, 8, 3) 0 -> (32, 32, 8, 3)
#   sm_90 D 64: (32, 64, 8, 2) 64 / 0, (32, 32, 8, 3) 152 / 8, (16, 128, 8, 3) 40 / 0, (16, 64, 8, 3) 0 / 0
#               -> (16, 64, 8, 3)
_BACKWARD_KV_CONFIGS = {  # block_m queries per step, block_n keys per program
    9: {64: (16, 64, 8, 3), 128: (32, 32, 8, 3), 256: (16, 16, 8, 3)},
    8: {64: (16, 128, 8, 3), 128: (32, 32, 8, 3), 256: (16, 16, 8, 3)},
}
# Re-picked for issue 13 item 6 (scores as two half-dots like the forward, dQ accumulated by halves;
# since issue 16 one dot and one dQ accumulator),
# m2 and log2l loaded per query block): q at D 128 then spilled under triton 3.9 (general case):
# sm_80 (64, 64, 8, 3) 1784 B; sm_90 (64, 64, 8, 3) 0 B but 32 B at GROUP 1 not causal. Candidates
# compiled the same way (triton 3.9 only, general case; not yet under 3.6 nor specialized):
#   sm_80: (64, 32, 8, 3) 184 B, (64, 32, 8, 2) 40 B, (32, 32, 8, 3) 0, (64, 16, 8, 3) 0  -> (64, 16, 8, 3)
#   sm_90: (64, 32, 8, 3) 0 / 0 (GROUP 4 causal / GROUP 1 not), (64, 64, 8, 2) 0 / 32, (64, 32, 8, 2) 0 / 0
#          -> (64, 32, 8, 3)
_BACKWARD_Q_CONFIGS = {  # block_m queries per program, block_n keys per step
    9: {64: (128, 64, 8, 3), 128: (64, 32, 8, 3), 256: (32, 32, 8, 3)},
    8: {64: (128, 32, 8, 3), 128: (64, 16, 8, 3), 256: (32, 32, 8, 3)},
}
# Backward kv and q kernels, contiguous launches (head-dim strides 1, the other strides, S, D and D / 2
# multiples of 16, aligned data: what real models pass; _contiguous_launch), untimed. The same sweep (q
# also with block_n 128) compiled as the JIT specializes such a launch: head-dim strides the constant 1
# and every other integer a multiple of 16 but the head counts (tests/test_triton_compile.py compiles
# it so), by triton 3.6 (the GPU machine's) for every candidate and 3.9 for the zero-stack ones; then
# each entry again with the head counts multiples of 16 too: zero stack in both under both versions
# (benchmarks/compile_attention_configs.py runs this sweep; rerun it after a change to these kernels).
# Order: zero stack under both versions, then at least 2 stages (at ~240 registers an SM holds one
# program, and one stage leaves every load's latency exposed), then the larger block_m * block_n,
# more stages, the larger per-program block; and on sm_90 at D 64 and 128, wgmma (HGMMA in the
# SASS), which tests/test_triton_compile.py checks. Measured on the kernels that load the saved row
# statistics (m2, log2l; issue 13 item 6), registers 3.6 / 3.9 and shared memory:
#   sm_90a D 128: kv (16, 64, 8, 2): 232 / 252 registers, 48 KB, 70 HGMMA. Wider blocks spill under one
#       version or both: (16, 64, 8, 3) 48 B (3.9); (16, 128, 8, 2 / 3) 48 / 80 B, (32, 64, 8, 2 / 3)
#       40 / 32 B, (32, 128, 8, 1-3) 40-232 B, (64, 64 or 128, 8, *) 72-728 B (3.6). block_m 16 makes
#       each wgmma of S^T and dP^T 16 wide (N); the 64 keys of a program are the M of every wgmma.
#       (Before the row statistics, (16, 128, 8, 2) compiled spill-free under both; with S not a multiple
#       of 16, a general launch, it had 96 B of stack under 3.6.)
#     q (128, 64, 8, 3): 213 / 212 registers, 160 KB, 48 HGMMA; (128, 128, 8, 2) had 8 B of stack under
#       3.9 and 72 B at 1 stage under 3.6 (before the row statistics).
#   sm_90a D 64: kv (16, 128, 8, 3) 245 / 247 registers, 44 KB, 22 HGMMA ((32, 128, 8, 2) 0 / 40 B,
#       (32, 128, 8, 3) 8 / 56 B); q (128, 128, 8, 3) 232 / 229, 128 KB, 48 HGMMA.
#   D 256 keeps the general entries (no wgmma: 16- and 32-row blocks).
#   sm_80 (mma.sync on any layout) D 128: kv (16, 128, 8, 2) 255 / 255, 72 KB ((16, 128, 8, 3) 88 B under
#       3.6); q (128, 32, 8, 3) 245 / 246, 96 KB (both twice the general entries' block). D 64: the
#       general entries, kv (16, 128, 8, 3) 255 / 212, 40 KB; q (128, 32, 8, 3) 180 / 174, 48 KB.
_BACKWARD_KV_CONTIGUOUS_CONFIGS = {
    9: {64: (16, 128, 8, 3), 128: (16, 64, 8, 2), 256: (16, 16, 8, 3)},
    8: {64: (16, 128, 8, 3), 128: (16, 128, 8, 2), 256: (16, 16, 8, 3)},
}
_BACKWARD_Q_CONTIGUOUS_CONFIGS = {
    9: {64: (128, 128, 8, 3), 128: (128, 64, 8, 3), 256: (32, 32, 8, 3)},
    8: {64: (128, 32, 8, 3), 128: (128, 32, 8, 3), 256: (32, 32, 8, 3)},
}
# Tried in order after the tuned entry when a GPU rejects it for shared memory or registers
# (fp32 inputs double every tile; consumer GPUs have less shared memory). The backward's: zero
# stack at D 64 and 128 on both archs under both versions, general and specialized, but for kv
# (16, 16, 8, 1) on sm_80 under triton 3.9 (16 bytes at D 128 general, 8 at D 64 specialized); in
# falling shared memory (D 128, general: kv 40, 29, 20 KB; q 48, 24, 16 KB).
_FORWARD_FALLBACKS = [(64, 32, 4, 1), (32, 16, 4, 1)]
_BACKWARD_KV_FALLBACKS = [(32, 32, 8, 1), (16, 32, 8, 2), (16, 16, 8, 1)]
_BACKWARD_Q_FALLBACKS = [(64, 32, 8, 1), (32, 16, 8, 2), (16, 16, 8, 1)]
# The CPU interpreter runs every block op as a numpy call: few, mid-sized blocks are fastest.
_INTERPRETER_FORWARD = (64, 32, 4, 1)
_INTERPRETER_BACKWARD_KV = (32, 64, 4, 1)
_INTERPRETER_BACKWARD_Q = (64, 32, 4, 1)
# The backward's prep kernel (elementwise: rotation and delta) takes [rows, D_PAD] tiles of this many
# elements (4 warps, no spilling).
_PREP_TILE = 4096


def _prep_rows(d_pad: int) -> int:
    return _PREP_TILE // d_pad


def _padded(head_dim: int) -> tuple[int, int]:
    """(padded head dim, padded half dim): powers of two, at least 16 (the tl.dot minimum)."""
    half = max(16, triton.next_power_of_2(head_dim // 2))
    return 2 * half, half


def _qk_scale(head_dim: int) -> float:
    """The factor from the raw score to base-2 units, the one value the forward and every backward use
    (it reaches the kernels as the same fp32 number, so the backward's S2 equals the forward's)."""
    return LOG2E / math.sqrt(head_dim)


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs multiply in full fp32 (as the reference does), not tf32."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _configs(table: dict, fallbacks: list, interpreter_config: tuple, device: torch.device, d_pad: int) -> list:
    """Configurations to try in order: the tuned one for this GPU and head dim, then smaller ones."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return [interpreter_config]
    major = torch.cuda.get_device_capability(device)[0]
    per_dim = table[9 if major >= 9 else 8]
    return [per_dim[min(256, max(64, d_pad))], *fallbacks]


def _contiguous_launch(head_dim: int, seq_len: int, cos: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a launch is one the contiguous table entries were compiled for: every strided input
    (forward: q, v; backward: v, dO; the outputs and workspaces are allocated contiguous) with head-dim stride 1, its
    other strides multiples of 16 elements and its data 16-byte aligned, and the sizes the kernels take
    (S, D, D / 2, the rotary tables' row stride) multiples of 16. Triton's JIT then specializes the
    kernels as the offline compile did (strides of 1 become constants, multiples of 16 and aligned
    pointers let loads vectorize and go through shared memory as wgmma wants them); any other launch
    takes the general (strided) entries. (The sizes matter: at S = 1000 the kv kernel's sm_90 D 128
    entry has 96 bytes of stack under triton 3.6.)"""
    if head_dim % 32 != 0 or seq_len % 16 != 0 or cos.stride(0) % 16 != 0:
        return False
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 != 0 or any(s % 16 != 0 for s in t.stride()[:-1]):
            return False
    return True


def _launch_first_fitting(configs: list, launch) -> None:
    """Calls launch(*config) with each configuration until one fits the GPU (a compile-time check,
    so a rejected configuration has run nothing)."""
    from triton.runtime.errors import OutOfResources

    for i, config in enumerate(configs):
        try:
            launch(*config)
            return
        except OutOfResources:
            if i == len(configs) - 1:
                raise


# ------------------------------------------------------------------------------------------------
# Shared building blocks
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_rotated(
    base,  # pointer to element [0, 0] of one head: x[b, 0, h, 0]
    stride_s, stride_d,  # element strides of x along the sequence and the head dim
    cos_ptr, sin_ptr, stride_cs,  # rotary tables and their row stride (columns contiguous)
    offs_s,  # [BLOCK] int64 positions of the rows to load
    seq_len, HALF, HALF_PAD: tl.constexpr,
):
    """Loads rows offs_s of one head as its two halves and rotates them: returns fp32 (xr1, xr2).

    Rows past seq_len and columns past HALF read as zero."""
    offs_h = tl.arange(0, HALF_PAD)
    row_ok = offs_s < seq_len
    mask = row_ok[:, None] & (offs_h[None, :] < HALF)
    ptr1 = base + offs_s[:, None] * stride_s + offs_h[None, :] * stride_d  # [BLOCK, HALF_PAD]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    cs_off = offs_s[:, None] * stride_cs + offs_h[None, :]
    c = tl.load(cos_ptr + cs_off, mask=mask, other=0.0)
    s = tl.load(sin_ptr + cs_off, mask=mask, other=0.0)
    # The roundings written out, as the CUDA backwards write them (csrc/cuda/common.cuh rotate_pair): left to
    # the compilers, the second half fused differently in Triton and in nvcc, and the CUDA backward's rot(q),
    # rot(k) were not always the forward's operands bit for bit.
    return tl.fma(x1, c, -(x2 * s)), tl.fma(x2, c, x1 * s)


@triton.jit
def _load_rows(
    base, stride_s, stride_d,  # element [0, 0] of one head and its strides along the sequence and head dim
    offs_s,  # [BLOCK] int64 positions of the rows to load
    seq_len, D, D_PAD: tl.constexpr,
):
    """Rows offs_s of one head as a [BLOCK, D_PAD] tile in the stored dtype; rows past seq_len and
    columns past D read as zero."""
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_s < seq_len)[:, None] & (offs_d[None, :] < D)
    return tl.load(base + offs_s[:, None] * stride_s + offs_d[None, :] * stride_d, mask=mask, other=0.0)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _join_halves(a, b, BLOCK: tl.constexpr, HALF_PAD: tl.constexpr):
    """[BLOCK, HALF_PAD] halves side by side as one [BLOCK, 2 * HALF_PAD] tile: the workspace's row order."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BLOCK, 2 * HALF_PAD))


@triton.jit
def _split_halves(x, BLOCK: tl.constexpr, HALF_PAD: tl.constexpr):
    """The inverse of _join_halves: a [BLOCK, 2 * HALF_PAD] tile as its two halves."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK, 2, HALF_PAD)), (0, 2, 1)))


@triton.jit
def _load_workspace(base, offs_s, seq_len, D_PAD: tl.constexpr):
    """Rows offs_s of one head of a rotated workspace [S, D_PAD] (contiguous; rows past seq_len read as zero)."""
    offs_d = tl.arange(0, D_PAD)
    return tl.load(base + offs_s[:, None] * D_PAD + offs_d[None, :], mask=(offs_s < seq_len)[:, None], other=0.0)


@triton.jit
def _forward_block(
    acc, m_i, l_i, q,  # running output, max (base 2), sum; rot(q) [BLOCK_M, D_PAD] (input dtype, halves apart)
    kr_base, v_base, stride_vs, stride_vd,  # rot(k) rows of this kv head (workspace) and v
    offs_m, start_n, seq_len, qk_scale,
    MASK: tl.constexpr,  # apply the causal / sequence-end mask (diagonal and tail blocks only)
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D, D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    seg_m=None,  # packed documents: [BLOCK_M] first token of each query row's document (MASK blocks only)
):
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    k = _load_workspace(kr_base, offs_n, seq_len, D_PAD)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # one dot over the (padded) head dim
    # [BLOCK_M, BLOCK_N], log2 units: the rounded product, never fused into exp2's subtraction (with FP
    # fusion LLVM made fma(qk, scale, -m) of it in the unmasked blocks, so l summed exp2 of the product's
    # rounding error where the backward, and the row max, see the rounded S2: the contract broke).
    qk = _mul_rn(qk, qk_scale, _INTERPRETED)
    if MASK:
        keep = offs_n[None, :] < seq_len
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if seg_m is not None:
            keep = keep & (offs_n[None, :] >= seg_m[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = m_new
    if seg_m is not None and MASK:  # a row may have seen no key yet: keep exp2 away from -inf - -inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, stride_vs, stride_vd, offs_n, seq_len, D, D_PAD)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_forward_kernel(
    q_ptr,  # q [B, S, Hq, D], any strides
    kr_ptr,  # rot(k) in the input dtype, [B, Hkv, S, D_PAD] contiguous, halves at columns 0 and HALF_PAD
    v_ptr,  # v [B, S, Hkv, D], any strides
    o_ptr,  # output [B, S, Hq, D], contiguous
    stats_ptr,  # output row statistics fp32 [2, B, Hq, S] contiguous: m2, then log2(l) (csrc/llama_fast.h)
    stats_half,  # B * Hq * S: where log2(l) starts
    cos_ptr, sin_ptr,  # fp32 rotary tables [S', D/2], columns contiguous
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_cs,  # row stride of cos and sin
    num_heads, seq_len, D, HALF,  # Hq, S, head dim, head dim / 2
    qk_scale,  # softmax scale times log2(e)
    seg_ptr,  # packed documents (SEGMENTED): int32 [S], the first token of each token's document
    GROUP: tl.constexpr,  # Hq // Hkv
    CAUSAL: tl.constexpr,
    SEGMENTED: tl.constexpr,  # B = 1 and S tokens of packed documents, each attending causally to itself
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per inner step; BLOCK_M % BLOCK_N == 0
    D_PAD: tl.constexpr,  # head dim padded to a power of two
    HALF_PAD: tl.constexpr,  # D_PAD // 2
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs (no tf32), else "tf32" (unused)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    kr_base = kr_ptr + (pid_bh // GROUP) * seq_len * D_PAD  # (b * Hkv + kv head) rows of the workspace
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    # Q rotated once, here: one [BLOCK_M, D_PAD] tile in the workspace's column order (halves apart),
    # so each key block costs one dot over the head dim against rot(K).
    qr1, qr2 = _load_rotated(q_base, stride_qs, stride_qd, cos_ptr, sin_ptr, stride_cs, offs_m, seq_len, HALF, HALF_PAD)
    q = _join_halves(qr1.to(q_ptr.dtype.element_ty), qr2.to(q_ptr.dtype.element_ty), BLOCK_M, HALF_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Key blocks every query of this block sees in full: no mask.
    if CAUSAL:
        unmasked_end = start_m
    else:
        unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
    unmasked_start = 0
    seg_m = None
    if SEGMENTED:
        # Rows see keys from their document's first token on: key blocks before the last row's document
        # start straddle a boundary (masked); none before the first row's document start is loaded. Many
        # short documents in one query block cost their key blocks once, not once per document.
        seg_m = tl.load(seg_ptr + offs_m, mask=offs_m < seq_len, other=seq_len)
        first_doc = tl.load(seg_ptr + start_m)
        last_doc = tl.load(seg_ptr + tl.minimum(start_m + BLOCK_M, seq_len) - 1)
        unmasked_start = tl.minimum(tl.cdiv(last_doc, BLOCK_N) * BLOCK_N, unmasked_end)
        for start_n in range((first_doc // BLOCK_N) * BLOCK_N, unmasked_start, BLOCK_N):
            acc, m_i, l_i = _forward_block(
                acc, m_i, l_i, q, kr_base, v_base, stride_vs, stride_vd, offs_m, start_n, seq_len, qk_scale,
                True, CAUSAL, BLOCK_N, D, D_PAD, PRECISION, seg_m,
            )
    for start_n in range(unmasked_start, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _forward_block(
            acc, m_i, l_i, q, kr_base, v_base, stride_vs, stride_vd, offs_m, start_n, seq_len, qk_scale,
            False, CAUSAL, BLOCK_N, D, D_PAD, PRECISION,
        )
    # The diagonal blocks (causal) or the sequence tail (not causal): masked. Every query row
    # keeps at least one key (its own position, or key 0), so no row is all -inf.
    if CAUSAL:
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        masked_end = seq_len
    for start_n in range(unmasked_end, masked_end, BLOCK_N):
        acc, m_i, l_i = _forward_block(
            acc, m_i, l_i, q, kr_base, v_base, stride_vs, stride_vd, offs_m, start_n, seq_len, qk_scale,
            True, CAUSAL, BLOCK_N, D, D_PAD, PRECISION, seg_m,
        )

    acc = acc / l_i[:, None]
    row_ok = offs_m < seq_len
    offs_d = tl.arange(0, D_PAD)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    # The row max and the log of the row sum stay apart: m2 + log2(l) in one fp32 would lose the low
    # bits of S2 - m2 the backward needs when |m2| is large (issue 13 item 6).
    tl.store(stats_ptr + pid_bh * seq_len + offs_m, m_i, mask=row_ok)
    tl.store(stats_ptr + stats_half + pid_bh * seq_len + offs_m, tl.math.log2(l_i), mask=row_ok)


def _refuse_interpreted_bf16(q: torch.Tensor, what: str) -> None:
    """The CPU interpreter's bf16 tl.dot returns garbage without an error (issue 13 item 7): refuse."""
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" and q.device.type == "cpu":
        raise NotImplementedError(
            f"attention {what}: bf16 does not run in the Triton CPU interpreter (TRITON_INTERPRET=1), whose bf16 "
            "tl.dot gives wrong results; llama_fast.ops.attention takes its math path for bf16 there"
        )


def attention_forward(q, k, v, cos, sin, causal: bool = True, doc_start=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward: returns (O [B, S, Hq, D] contiguous in q.dtype, stats fp32 [2, B, Hq, S]:
    the row max m2 of the base-2 scores and log2 of the row sum; natural LSE = (m2 + log2l) * ln 2).

    ``doc_start`` (int32 [S], with B = 1 and causal): packed documents; token s attends to tokens
    doc_start[s]..s. Inputs are assumed validated (llama_fast.ops.attention checks them).

    K is rotated once per row, by the backward's prep kernel, into a transient workspace rot(k)
    [B, Hkv, S, D_PAD] in the input dtype (the rounding the backward recomputes): its traffic is one
    read of k and one write and read of the workspace, 2 * B * S * Hkv * D_PAD * itemsize bytes more
    than reading k in the loop (67 MB at B8 S2048 Hkv8 D128 bf16, ~25 us at 2.7 TB/s; 4x that
    without grouped heads). The key loop then loads plain tiles and makes one QK dot over the head
    dim: no cos / sin tiles, no fp32 rotation and no shared-memory round trip per (query block,
    key block) pair."""
    _refuse_interpreted_bf16(q, "forward")
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    out = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, B, Hq, S), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, stats
    d_pad, half_pad = _padded(D)
    kr = _rotate_into_workspace(k, cos, sin, d_pad, half_pad)

    def launch(block_m, block_n, warps, stages):
        _attention_forward_kernel[(triton.cdiv(S, block_m), B * Hq)](
            q, kr, v, out, stats, B * Hq * S, cos, sin,
            *q.stride(), *v.stride(), *out.stride(), cos.stride(0),
            Hq, S, D, D // 2, _qk_scale(D), doc_start,
            GROUP=Hq // Hkv, CAUSAL=causal, SEGMENTED=doc_start is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            D_PAD=d_pad, HALF_PAD=half_pad, PRECISION=_precision(q), num_warps=warps, num_stages=stages,
        )

    table = _forward_table(_contiguous_launch(D, S, cos, q, v), doc_start is not None)
    _launch_first_fitting(_configs(table, _FORWARD_FALLBACKS, _INTERPRETER_FORWARD, q.device, d_pad), launch)
    return out, stats


def _rotate_into_workspace(x, cos, sin, d_pad, half_pad, out=None, dout=None, delta=None) -> torch.Tensor:
    """rot(x) [B, H, S, D_PAD] in x's dtype, halves at columns 0 and HALF_PAD (the prep kernel; with
    out, dout and delta also delta = rowsum(dO * O) for x = q)."""
    B, S, H, D = x.shape
    xr = torch.empty((B, H, S, d_pad), dtype=x.dtype, device=x.device)
    with_delta = delta is not None
    o, do = (out, dout) if with_delta else (x, x)
    rows = _prep_rows(d_pad)
    _backward_prep_kernel[(triton.cdiv(S, rows), B * H)](
        x, xr, o, do, delta if with_delta else cos, cos, sin, *x.stride(), *o.stride(), *do.stride(), cos.stride(0),
        H, S, D, D // 2, DELTA=with_delta, BLOCK_M=rows, D_PAD=d_pad, HALF_PAD=half_pad,
    )
    return xr


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_row_stats(stats_base, stats_half, delta_base, offs_m, seq_len):
    """m2, log2(l) and delta of query rows offs_m of one head (fp32, [BLOCK]), each loaded once per
    query block. Rows past the sequence end get log2(l) = +inf, which makes their P exactly 0."""
    row_ok = offs_m < seq_len
    m2 = tl.load(stats_base + offs_m, mask=row_ok, other=0.0)
    log2l = tl.load(stats_base + stats_half + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    return m2, log2l, delta


_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _mul_rn(a, b, INTERPRETED: tl.constexpr):
    """a * b rounded to fp32, never fused into a following add: the backward's S2 must be the rounded
    product the forward's row max was taken over (an FMA of S2 - m2 would leave the product's rounding
    error, up to ulp(S2) / 2, where the forward had an exact 0). PTX mul.rn is never contracted; the
    interpreter (numpy) does not contract."""
    if INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _probs_and_ds(
    a, b,  # score operands, rotated rows [*, D_PAD] in the input dtype: S = a b^T, summed as the forward sums it
    x, y,  # dP operands: dP = x y^T
    m2, log2l, delta,  # fp32 row statistics, broadcastable to S (queries along rows or along columns)
    keep,  # bool, broadcastable to S: False where P must be 0 (used only when MASK)
    qk_scale, MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """P = exp2((S2 - m2) - log2l) and dS = P * (dP - delta), both fp32. The q kernel passes
    (rot(q), rot(k), dO, V) and gets P and dS [BLOCK_M, BLOCK_N]; the kv kernel passes
    (rot(k), rot(q), V, dO) and gets their transposes [BLOCK_N, BLOCK_M].

    S2 is formed exactly as the forward forms it: one dot over the same padded rotated rows, then the
    same fp32 scale (a transposed product sums the same terms in the same order), so S2 - m2 is exact
    near the row max however large the scores are; m2 is subtracted before log2l (the row-statistics
    contract, csrc/llama_fast.h)."""
    s2 = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    p = tl.math.exp2((_mul_rn(s2, qk_scale, _INTERPRETED) - m2) - log2l)
    if MASK:
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(x, tl.trans(y), input_precision=PRECISION)
    return p, p * (dp - delta)


@triton.jit
def _store_unrotated(
    base, stride_s, stride_d, cos_ptr, sin_ptr, stride_cs, offs_s, seq_len, HALF,
    g,  # fp32 gradient wrt the rotated rows, [BLOCK, D_PAD] in the workspace's column order (halves apart)
    BLOCK: tl.constexpr, HALF_PAD: tl.constexpr,
):
    """Applies the inverse rotation (by -theta) to g and stores rows offs_s of one head."""
    g1, g2 = _split_halves(g, BLOCK, HALF_PAD)
    offs_h = tl.arange(0, HALF_PAD)
    mask = (offs_s < seq_len)[:, None] & (offs_h[None, :] < HALF)
    cs_off = offs_s[:, None] * stride_cs + offs_h[None, :]
    c = tl.load(cos_ptr + cs_off, mask=mask, other=0.0)
    s = tl.load(sin_ptr + cs_off, mask=mask, other=0.0)
    ptr1 = base + offs_s[:, None] * stride_s + offs_h[None, :] * stride_d
    tl.store(ptr1, (g1 * c + g2 * s).to(base.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF * stride_d, (g2 * c - g1 * s).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _backward_prep_kernel(
    x_ptr,  # q [B, S, Hq, D] or k [B, S, Hkv, D], any strides
    xr_ptr,  # output rot(x) in x's dtype, [B, H, S, D_PAD] contiguous, halves at columns 0 and HALF_PAD
    o_ptr, do_ptr,  # O and dO [B, S, Hq, D], any strides (read only when DELTA)
    delta_ptr,  # output fp32 [B, Hq, S]: rowsum(dO * O) (written only when DELTA)
    cos_ptr, sin_ptr,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_ds, stride_dh, stride_dd,  # strides of dO
    stride_cs,
    num_heads, seq_len, D, HALF,  # H (of x), S, head dim, head dim / 2
    DELTA: tl.constexpr,  # x is q: also compute delta for its rows
    BLOCK_M: tl.constexpr,  # rows per program
    D_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    """One program per (row block, batch, head): rot(x) rows into the workspace (and delta)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = offs_m < seq_len
    # Padding columns (past HALF in each half) read as zero and are stored as zero.
    xr1, xr2 = _load_rotated(x_ptr + b * stride_xb + h * stride_xh, stride_xs, stride_xd, cos_ptr, sin_ptr,
                             stride_cs, offs_m, seq_len, HALF, HALF_PAD)
    offs_h = tl.arange(0, HALF_PAD)
    xr_ptrs = xr_ptr + (pid_bh * seq_len + offs_m[:, None]) * D_PAD + offs_h[None, :]  # [BLOCK_M, HALF_PAD]
    tl.store(xr_ptrs, xr1.to(xr_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(xr_ptrs + HALF_PAD, xr2.to(xr_ptr.dtype.element_ty), mask=row_ok[:, None])
    if DELTA:
        o = _load_rows(o_ptr + b * stride_ob + h * stride_oh, stride_os, stride_od, offs_m, seq_len, D, D_PAD)
        do = _load_rows(do_ptr + b * stride_db + h * stride_dh, stride_ds, stride_dd, offs_m, seq_len, D, D_PAD)
        tl.store(delta_ptr + pid_bh * seq_len + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _backward_kv_block(
    dk, dv, k, v,  # fp32 accumulators (dK in the workspace's column order) and this program's rot(k) and v
    qr_base, do_base, stats_base, stats_half, delta_base,  # one query head: rot(q) (workspace), dO, stats, delta
    stride_ds, stride_dd,
    offs_n, start_m, seq_len, qk_scale, D,
    MASK: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    seg_end_n=None,  # packed documents: [BLOCK_N] end (exclusive) of each key's document (MASK blocks only)
):
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    q = _load_workspace(qr_base, offs_m, seq_len, D_PAD)
    do = _load_rows(do_base, stride_ds, stride_dd, offs_m, seq_len, D, D_PAD)
    m2, log2l, delta = _load_row_stats(stats_base, stats_half, delta_base, offs_m, seq_len)
    # Transposed: keys along rows, queries along columns, [BLOCK_N, BLOCK_M]. Rows past the
    # sequence end need no mask: their P is 0 (queries) or their dK, dV are not stored (keys).
    keep = offs_m[None, :] >= offs_n[:, None]
    if seg_end_n is not None:
        keep = keep & (offs_m[None, :] < seg_end_n[:, None])
    pt, dst = _probs_and_ds(k, q, v, do, m2[None, :], log2l[None, :], delta[None, :], keep, qk_scale,
                            MASK, PRECISION)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_backward_kv_kernel(
    qr_ptr, kr_ptr,  # workspace rot(q) [B, Hq, S, D_PAD] and rot(k) [B, Hkv, S, D_PAD] (input dtype)
    v_ptr, do_ptr,  # v and dO, any strides
    stats_ptr, stats_half,  # fp32 [2, B, Hq, S] (m2, log2l) and B * Hq * S
    delta_ptr,  # fp32 [B, Hq, S]
    dk_ptr, dv_ptr,  # outputs [B, S, Hkv, D]
    cos_ptr, sin_ptr,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,  # strides of dO
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of dk and dv (same layout)
    stride_cs,
    num_kv_heads, seq_len, D, HALF, qk_scale, sm_scale,
    seg_end_ptr,  # packed documents (SEGMENTED): int32 [S], the end (exclusive) of each token's document
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # key rows per program; BLOCK_N % BLOCK_M == 0
    D_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key block, batch, kv head): dK and dV summed over the group's query heads."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * Hkv + kv head
    b = pid_bh // num_kv_heads
    kv_h = pid_bh % num_kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    k = _load_workspace(kr_ptr + pid_bh * seq_len * D_PAD, offs_n, seq_len, D_PAD)
    v = _load_rows(v_ptr + b * stride_vb + kv_h * stride_vh, stride_vs, stride_vd, offs_n, seq_len, D, D_PAD)

    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    if CAUSAL:
        masked_end = tl.minimum(start_n + BLOCK_N, seq_len)
        first_m = start_n  # query blocks before the key block see none of it
    else:
        masked_end = 0
        first_m = 0
    unmasked_end = seq_len
    straddle_end = seq_len
    seg_end_n = None
    if SEGMENTED:
        # Queries see a key up to its document's end: query blocks from the first key's document end
        # (rounded down) to the last key's straddle a boundary (masked); none past that is loaded.
        seg_end_n = tl.load(seg_end_ptr + offs_n, mask=offs_n < seq_len, other=0)
        first_end = tl.load(seg_end_ptr + start_n)
        straddle_end = tl.load(seg_end_ptr + tl.minimum(start_n + BLOCK_N, seq_len) - 1)
        unmasked_end = tl.maximum((first_end // BLOCK_M) * BLOCK_M, masked_end)
    for g in range(GROUP):
        bh = pid_bh * GROUP + g  # b * Hq + query head
        qr_base = qr_ptr + bh * seq_len * D_PAD
        do_base = do_ptr + b * stride_db + (kv_h * GROUP + g) * stride_dh
        # Query blocks on the diagonal of this key block: masked.
        for start_m in range(first_m, masked_end, BLOCK_M):
            dk, dv = _backward_kv_block(
                dk, dv, k, v, qr_base, do_base, stats_ptr + bh * seq_len, stats_half,
                delta_ptr + bh * seq_len, stride_ds, stride_dd, offs_n, start_m, seq_len, qk_scale, D,
                True, BLOCK_M, D_PAD, PRECISION, seg_end_n,
            )
        # Query blocks below the diagonal (or all of them, not causal): no mask.
        for start_m in range(tl.maximum(masked_end, first_m), unmasked_end, BLOCK_M):
            dk, dv = _backward_kv_block(
                dk, dv, k, v, qr_base, do_base, stats_ptr + bh * seq_len, stats_half,
                delta_ptr + bh * seq_len, stride_ds, stride_dd, offs_n, start_m, seq_len, qk_scale, D,
                False, BLOCK_M, D_PAD, PRECISION,
            )
        if SEGMENTED:  # query blocks that straddle the end of a key's document: masked
            for start_m in range(tl.maximum(unmasked_end, first_m), straddle_end, BLOCK_M):
                dk, dv = _backward_kv_block(
                    dk, dv, k, v, qr_base, do_base, stats_ptr + bh * seq_len, stats_half,
                    delta_ptr + bh * seq_len, stride_ds, stride_dd, offs_n, start_m, seq_len, qk_scale, D,
                    True, BLOCK_M, D_PAD, PRECISION, seg_end_n,
                )

    g_off = b * stride_gb + kv_h * stride_gh
    _store_unrotated(dk_ptr + g_off, stride_gs, stride_gd, cos_ptr, sin_ptr, stride_cs, offs_n, seq_len,
                     HALF, dk * sm_scale, BLOCK_N, HALF_PAD)
    offs_d = tl.arange(0, D_PAD)
    tl.store(dv_ptr + g_off + offs_n[:, None] * stride_gs + offs_d[None, :] * stride_gd,
             dv.to(dv_ptr.dtype.element_ty), mask=(offs_n < seq_len)[:, None] & (offs_d[None, :] < D))


@triton.jit
def _backward_q_block(
    dq, q, do, m2, log2l, delta,  # fp32 accumulator (workspace column order) and this program's query block
    kr_base, v_base, stride_vs, stride_vd,  # one kv head: rot(k) (workspace) and v
    offs_m, start_n, seq_len, qk_scale, D,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    DELTA_PASS: tl.constexpr,  # dq is the [BLOCK_M] sum of P * dP (delta is 0): accumulate it, no dQ
    seg_m=None,  # packed documents: [BLOCK_M] first token of each query row's document (MASK blocks only)
):
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    k = _load_workspace(kr_base, offs_n, seq_len, D_PAD)
    v = _load_rows(v_base, stride_vs, stride_vd, offs_n, seq_len, D, D_PAD)
    keep = offs_n[None, :] < seq_len
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if seg_m is not None:
        keep = keep & (offs_n[None, :] >= seg_m[:, None])
    p, ds = _probs_and_ds(q, k, do, v, m2[:, None], log2l[:, None], delta[:, None], keep, qk_scale, MASK, PRECISION)
    # One return: Triton compiles both sides of a constexpr branch that returns early.
    if DELTA_PASS:
        dq = dq + tl.sum(ds, 1)
    else:
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_backward_q_kernel(
    qr_ptr, kr_ptr,  # workspace rot(q) [B, Hq, S, D_PAD] and rot(k) [B, Hkv, S, D_PAD] (input dtype)
    v_ptr, do_ptr,
    stats_ptr, stats_half,  # fp32 [2, B, Hq, S] (m2, log2l) and B * Hq * S
    delta_ptr,
    dq_ptr,  # output [B, S, Hq, D]
    cos_ptr, sin_ptr,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of dq
    stride_cs,
    num_heads, seq_len, D, HALF, qk_scale, sm_scale,
    seg_start_ptr,  # packed documents (SEGMENTED): int32 [S], the first token of each token's document
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per inner step; BLOCK_M % BLOCK_N == 0
    D_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PRECISION: tl.constexpr,
    DELTA_PASS: tl.constexpr = False,  # write delta = rowsum(P * dP) to delta_ptr instead of dQ (fp32 inputs)
):
    """One program per (query block, batch, query head): dQ over every key block it attends to (or,
    with DELTA_PASS, delta from the same P and dP the dQ pass subtracts it from)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * Hq + query head
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    q = _load_workspace(qr_ptr + pid_bh * seq_len * D_PAD, offs_m, seq_len, D_PAD)
    do = _load_rows(do_ptr + b * stride_db + h * stride_dh, stride_ds, stride_dd, offs_m, seq_len, D, D_PAD)
    # (The delta pass has no delta yet: it reads the stats in its place and then uses 0.)
    m2, log2l, delta = _load_row_stats(stats_ptr + pid_bh * seq_len, stats_half,
                                       (stats_ptr if DELTA_PASS else delta_ptr) + pid_bh * seq_len, offs_m, seq_len)
    kv_bh = pid_bh // GROUP  # b * Hkv + kv head
    kr_base = kr_ptr + kv_bh * seq_len * D_PAD
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh

    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)
        dq = tl.zeros([BLOCK_M], tl.float32)
    else:
        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if CAUSAL:
        unmasked_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    unmasked_start = 0
    seg_m = None
    if SEGMENTED:  # as the forward: key blocks before the last row's document start straddle a boundary
        seg_m = tl.load(seg_start_ptr + offs_m, mask=offs_m < seq_len, other=seq_len)
        first_doc = tl.load(seg_start_ptr + start_m)
        last_doc = tl.load(seg_start_ptr + tl.minimum(start_m + BLOCK_M, seq_len) - 1)
        unmasked_start = tl.minimum(tl.cdiv(last_doc, BLOCK_N) * BLOCK_N, unmasked_end)
        for start_n in range((first_doc // BLOCK_N) * BLOCK_N, unmasked_start, BLOCK_N):
            dq = _backward_q_block(
                dq, q, do, m2, log2l, delta, kr_base, v_base, stride_vs, stride_vd, offs_m, start_n,
                seq_len, qk_scale, D, True, CAUSAL, BLOCK_N, D_PAD, PRECISION, DELTA_PASS, seg_m,
            )
    for start_n in range(unmasked_start, unmasked_end, BLOCK_N):
        dq = _backward_q_block(
            dq, q, do, m2, log2l, delta, kr_base, v_base, stride_vs, stride_vd, offs_m, start_n,
            seq_len, qk_scale, D, False, CAUSAL, BLOCK_N, D_PAD, PRECISION, DELTA_PASS,
        )
    for start_n in range(unmasked_end, masked_end, BLOCK_N):
        dq = _backward_q_block(
            dq, q, do, m2, log2l, delta, kr_base, v_base, stride_vs, stride_vd, offs_m, start_n,
            seq_len, qk_scale, D, True, CAUSAL, BLOCK_N, D_PAD, PRECISION, DELTA_PASS, seg_m,
        )
    if DELTA_PASS:
        tl.store(delta_ptr + pid_bh * seq_len + offs_m, dq, mask=offs_m < seq_len)
    else:
        _store_unrotated(dq_ptr + b * stride_gb + h * stride_gh, stride_gs, stride_gd, cos_ptr, sin_ptr, stride_cs,
                         offs_m, seq_len, HALF, dq * sm_scale, BLOCK_M, HALF_PAD)


def check_stats(stats: torch.Tensor, q: torch.Tensor) -> None:
    """A clear error for row statistics that are not the forward's fp32 [2, B, Hq, S]."""
    B, S, Hq, _ = q.shape
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.float32 or tuple(stats.shape) != (2, B, Hq, S):
        got = f"{stats.dtype} {tuple(stats.shape)}" if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError(
            f"attention backward: stats must be float32 [2, {B}, {Hq}, {S}] (row max m2 and log2 of the row sum, "
            f"as the forward saves them), got {got}"
        )
    if stats.device != q.device:
        raise ValueError(f"attention backward: stats must be on the device of q ({q.device}), got {stats.device}")


def attention_backward(dout, q, k, v, out, stats, cos, sin, causal: bool = True, doc_start=None, doc_end=None):
    """Launches the backward: returns (dq, dk, dv), contiguous, in the dtypes and shapes of q, k, v.

    Saved tensors are the unrotated q, k, v, the output O and the forward's row statistics
    (fp32 [2, B, Hq, S]: m2 and log2l). Packed documents (B = 1, causal): ``doc_start`` and ``doc_end``,
    int32 [S], each token's document's first token and end (exclusive)."""
    _refuse_interpreted_bf16(q, "backward")
    check_stats(stats, q)
    stats = stats.contiguous()
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, S, Hkv, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    d_pad, half_pad = _padded(D)
    # Workspace: rot(q), rot(k) in the input dtype (freed on return) and delta.
    delta = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    # delta = rowsum(dO * O) in the prep pass; for fp32 inputs rowsum(P * dP) from a pass of the q
    # kernel over the same P and dP instead (below): dS = P * (dP - delta) then cancels bitwise on
    # near one-hot rows as eager's softmax backward does (issue 13 item 6: dq at q, k std 100 was
    # 1e-4 off where eager's is exact), for one more QK and dO V^T product per tile (fp32 only).
    delta_pass = q.dtype == torch.float32
    qr = _rotate_into_workspace(q, cos, sin, d_pad, half_pad, *((None, None, None) if delta_pass else (out, dout, delta)))
    kr = _rotate_into_workspace(k, cos, sin, d_pad, half_pad)
    sm_scale = 1.0 / math.sqrt(D)
    args = (cos, sin, *v.stride(), *dout.stride())
    scalars = (S, D, D // 2, _qk_scale(D), sm_scale)
    common = dict(GROUP=Hq // Hkv, CAUSAL=causal, SEGMENTED=doc_start is not None, D_PAD=d_pad, HALF_PAD=half_pad,
                  PRECISION=_precision(q))

    def launch_kv(block_m, block_n, warps, stages):
        _attention_backward_kv_kernel[(triton.cdiv(S, block_n), B * Hkv)](
            qr, kr, v, dout, stats, B * Hq * S, delta, dk, dv, *args, *dk.stride(), cos.stride(0), Hkv, *scalars,
            doc_end, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
        )

    def launch_q(block_m, block_n, warps, stages, delta_only=False):
        _attention_backward_q_kernel[(triton.cdiv(S, block_m), B * Hq)](
            qr, kr, v, dout, stats, B * Hq * S, delta, dq, *args, *dq.stride(), cos.stride(0), Hq, *scalars,
            doc_start, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, DELTA_PASS=delta_only,
            **common,
        )

    device = q.device
    contiguous = _contiguous_launch(D, S, cos, v, dout)
    kv_table = _BACKWARD_KV_CONTIGUOUS_CONFIGS if contiguous else _BACKWARD_KV_CONFIGS
    q_table = _BACKWARD_Q_CONTIGUOUS_CONFIGS if contiguous else _BACKWARD_Q_CONFIGS
    kv_configs = _configs(kv_table, _BACKWARD_KV_FALLBACKS, _INTERPRETER_BACKWARD_KV, device, d_pad)
    q_configs = _configs(q_table, _BACKWARD_Q_FALLBACKS, _INTERPRETER_BACKWARD_Q, device, d_pad)
    if delta_pass:
        _launch_first_fitting(q_configs, lambda *config: launch_q(*config, delta_only=True))
    _launch_first_fitting(kv_configs, launch_kv)
    _launch_first_fitting(q_configs, launch_q)
    return dq, dk, dv
