// Attention backward with RoPE fused in, flash-attention-2 style on the tensor cores
// (mma.sync m16n8k16, ldmatrix, cp.async; sm_80 and newer).
//
// Math (see llama_fast.h): P = exp2((S2 - m2) - log2l) with S2 = S * (scale * log2(e)) recomputed in
// fp32 from the operands the forward multiplies, and the forward's saved row statistics m2 (row max of
// S2) and log2l (log2 of the row sum), subtracted in that order (csrc/llama_fast.h; one saved LSE lost
// the low bits of S2 - m2 for large scores, issue 13 item 6); delta = rowsum(dO * O); dV = P^T dO;
// dP = dO V^T; dS = P * (dP - delta);
// dQ = rot^-1(dS rot(K)) * scale; dK = rot^-1(dS^T rot(Q)) * scale; dK, dV summed over a group.
//
// Layout: q, dout, out [B, S, Hq, D] and k, v [B, S, Hkv, D] with any batch / seq / head strides and
// a contiguous head dim; stats fp32 [2, B, Hq, S] (m2, then log2l); cos / sin fp32 [>= S, D / 2]
// (row stride cs_stride);
// dq, dk, dv contiguous.
// dtypes: fp16 or bf16 in and out. Matmul operands in the input dtype (as the forward and the
// reference use them), every accumulation in fp32 registers; rotation, softmax recomputation and
// dS in fp32, rounded to the input dtype only to feed the next matmul.
//
// Three steps:
//  1. prep: one warp per row: delta = rowsum(dO * O) and copies of m2 and log2l (fp32, rows padded to a
//     multiple of 64 with zeros), and rot(q) (and, deterministic, rot(k)) rounded to the input dtype,
//     [B, H, S, D], in the workspace. The main loops then stream plain tiles with cp.async instead of
//     rotating each tile every time it is loaded (a q tile is loaded once per key block).
//  2. kv kernel, one CTA per (batch, kv head, key block): WARPS warps, each owning 16 key rows (at
//     DP = 256 two warps own them, each half of dK's and dV's columns). It rotates its K block in the
//     prologue (each key row once). K
//     and V stay in shared memory; the group's query heads and the query blocks that can see the key
//     block (causal: from the diagonal down, blocks above it are never loaded) stream through a
//     two-stage cp.async pipeline. Per query block each warp forms S^T = K Q^T and dP^T = V dO^T in
//     registers, then P^T and dS^T (masked only on diagonal and tail blocks), and accumulates
//     dV += P^T dO and dK += dS^T Q with the probabilities fed straight from the accumulator registers
//     as the A operand. Not deterministic (default): dS^T goes to shared memory and the CTA adds
//     dQ += dS K into an fp32 accumulator with atomics; a last kernel scales and rotates it.
//  3. deterministic mode instead: q kernel, one CTA per (batch, query head, query block), each warp
//     owning 16 query rows, streams the key blocks up to the diagonal and accumulates dQ in registers.
//     No atomics anywhere, so every gradient is bitwise reproducible.
// Epilogues multiply by scale, rotate by -theta in fp32 (through shared memory) and store.
//
// Packed documents (issue 15; AttentionBackwardArgs::doc_start / doc_end, B = 1, causal): the tokens are
// one sequence and token t attends to keys doc_start[t] .. t. A key block loads the query blocks from its
// diagonal to the end of its last key's document; a query block the key blocks from its first query's
// document start to its diagonal, so neither loads a block of another document and many short documents
// cost their tokens. Tiles inside one document and below the diagonal run unmasked; the others get the
// element mask (tile_mask: per row, the visible columns). The prep and dq_finish kernels work on rows and
// do not see documents. nullptr bounds: the kernels as before (one test per tile that is masked anyway).
//
// Shared-memory tiles are [rows, DP] (head dim padded with zeros to DP in {64, 128, 256}) with an
// XOR swizzle of the 16-byte chunks of a row, so ldmatrix and cp.async are free of bank conflicts
// without padding. Blocks of 64 rows (32 for DP = 256; the kv kernel's query blocks 32 for DP >= 128,
// and the q kernel's 32 for DP = 128 on GPUs that allow a block under ~97 KB of shared memory; at
// DP = 256 two kv warps per 16 key rows, one per half of dK's and dV's columns; see Config): no
// kernel spills a register. Grids run the blocks of a head side by side so its tiles are shared in L2.
//
// Expected speed (a model, not yet measured): each warp owns 16 rows, so every warp reads the
// whole of the other operand from shared memory (~13 FLOP per byte); that caps this design near
// 400 TFLOP/s on an H100 and makes 250-300 the likely figure. Beyond it lie 2-D warp tiling or
// Hopper's wgmma.
#include <algorithm>

#include "common.cuh"
#include "mma.cuh"

namespace llama_fast {
namespace {

constexpr int kRowPad = 64;  // the workspace's delta / m2 / log2l rows are padded to a multiple of this

// Element offset of (row, col) in a swizzled [rows, COLS] tile of 16-bit elements: the 16-byte
// chunk index is XORed with the row (mod 8, or mod the chunks of a row if fewer).
template <int COLS>
__device__ __forceinline__ int swz(int row, int col) {
  constexpr int kChunks = COLS / 8;
  constexpr int kMask = (kChunks < 8 ? kChunks : 8) - 1;
  return row * COLS + ((((col >> 3) ^ (row & kMask)) << 3) | (col & 7));
}

// Tile shapes per padded head dim: BM query rows and BN key rows per block, 16 rows per warp.
// SMALL: 32-row query blocks in the q kernel for GPUs that allow a block under the 96.75 KB its DP = 128
// tiles need otherwise (the kv kernel needs 68.75 KB there); launch() picks it from the device's limit
// (sm_86, sm_89 and sm_120 allow 99 KB, so today only smaller limits take it).
// The kv kernel holds dK and dV for its 16 key rows per warp in registers (DP / 2 floats each per thread):
// beside them only 32-query blocks leave room without spills for DP >= 128 (KV_BM), and at DP = 256 the
// two accumulators alone are 256 registers, so two warps share each 16 key rows there, one per half of
// dK's and dV's columns (KV_SPLIT), both forming the same S^T and dP^T (1.4x the tensor work of D = 256,
// instead of ~1.1 KB of stack a thread). 0 spill bytes for every kernel on sm_80 and sm_90:
// tests/test_build.py::test_attention_backward_kernels_never_spill.
template <int DP, bool SMALL>
struct Config {
  static constexpr int BM = DP == 256 || SMALL ? 32 : 64;  // q kernel
  static constexpr int BN = DP == 256 ? 32 : 64;
  static constexpr int KV_BM = DP >= 128 ? 32 : 64;  // kv kernel's query blocks
  static constexpr int KV_SPLIT = DP == 256 ? 2 : 1;  // warps per 16 key rows in the kv kernel
  static constexpr int KV_THREADS = BN / 16 * KV_SPLIT * 32;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && KV_BM % 16 == 0 && DP % 16 == 0,
                "tiles are made of 16 x 16 mma operands");
};

// The workspace, carved out of one fp32 buffer (attention_backward_cuda_workspace).
template <typename T>
struct Workspace {
  float* delta;     // [B * Hq, S_pad]
  float* m2;        // [B * Hq, S_pad], row max of S2
  float* log2l;     // [B * Hq, S_pad], log2 of the row sum
  float* dq_accum;  // [B, S, Hq, D] fp32, non-deterministic mode only
  T* qr;            // rot(q) [B, Hq, S, D]
  T* kr;            // rot(k) [B, Hkv, S, D], deterministic mode only (the kv kernel rotates its K block itself)
};

__host__ __device__ inline int64_t padded_rows(int64_t seq_len) { return (seq_len + kRowPad - 1) / kRowPad * kRowPad; }
inline int64_t align4(int64_t floats) { return (floats + 3) / 4 * 4; }  // 16 bytes

// Offsets in floats of each part; the last entry is the total.
inline void workspace_layout(const AttentionBackwardArgs& a, int64_t (&off)[7]) {
  const int64_t rows = a.batch * a.num_heads * padded_rows(a.seq_len);
  const int64_t nq = a.batch * a.seq_len * a.num_heads * a.head_dim;
  const int64_t nk = a.batch * a.seq_len * a.num_kv_heads * a.head_dim;
  off[0] = 0;
  off[1] = off[0] + align4(rows);
  off[2] = off[1] + align4(rows);
  off[3] = off[2] + align4(rows);
  off[4] = off[3] + (a.deterministic ? 0 : align4(nq));
  off[5] = off[4] + align4((nq + 1) / 2);  // 16-bit elements, two per float
  off[6] = off[5] + (a.deterministic ? align4((nk + 1) / 2) : 0);
}

// Rows of the prep kernel: every (b, h, s) query row padded to kRowPad, then, for the q kernel of the
// deterministic mode, every (b, kv head, s) key row.
inline int64_t prep_row_count(const AttentionBackwardArgs& a) {
  return a.batch * a.num_heads * padded_rows(a.seq_len) + (a.deterministic ? a.batch * a.num_kv_heads * a.seq_len : 0);
}

template <typename T>
Workspace<T> carve(const AttentionBackwardArgs& a, float* base) {
  int64_t off[7];
  workspace_layout(a, off);
  return {base + off[0], base + off[1], base + off[2], a.deterministic ? nullptr : base + off[3],
          reinterpret_cast<T*>(base + off[4]), a.deterministic ? reinterpret_cast<T*>(base + off[5]) : nullptr};
}

// ---------------------------------------------------------------------------------------------
// Step 1: delta, m2 and log2l and the rotated q (and k). One warp per row; rows [0, B*Hq*S_pad)
// are query rows (padding rows get zeros); in the deterministic mode the following B*Hkv*S rows are key
// rows (prep_row_count), for the q kernel. In the non-deterministic mode a query row also zeroes its row
// of dq_accum (once a cudaMemsetAsync of its own).
// HBM bytes of the work outside the main loop at B8 H32 (Hkv 32) S2048 D128 bf16, 1 MB = 1e6 B;
// n = 8 * 2048 * 32 * 128 = 67,108,864 elements of q (and of k, v, o, dO, dq), rows = 524,288:
//   prep: read o, dO, q 3 * 2n = 402.7 MB, write rot(q) 2n = 134.2 MB, read the stats 2 * rows * 4 =
//     4.2 MB, write delta, m2, log2l 3 * rows * 4 = 6.3 MB: 547.4 MB (+ cos / sin 1 MB, L2-resident).
//     rot(k) is no longer here (issue 16 item 3): the kv kernel rotates its K block in its prologue,
//     reading k where it read the copy, which saves reading k and writing rot(k), 268.4 MB (the
//     deterministic mode still writes rot(k) for its q kernel, which streams every key block).
//   zeroing dq_accum: 4n = 268.4 MB written, in prep's pass (once its own memset launch). Not written
//     at all would need the first adder of each dQ element known, and the kv CTAs that add to one query
//     block run in no set order.
//   dq_finish (below): read 4n, write 2n: 402.7 MB (+ 1 MB cos / sin).
//   In all 1,218.5 MB (1,487.9 MB before). Issue 16's 0.45 GB is out of reach of this design: delta alone
//   reads o and dO (268.4 MB) and an fp32 dQ accumulator costs zeroing plus the finish (671.1 MB); only
//   the deterministic mode (no accumulator) or a dQ reduced without fp32 atomics gets under it.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void attention_backward_prep(AttentionBackwardArgs a, Workspace<T> w) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t S = a.seq_len, S_pad = padded_rows(S), D = a.head_dim, half = D / 2;
  const int64_t q_rows = a.batch * a.num_heads * S_pad;
  if (row < q_rows) {
    const int64_t bh = row / S_pad, s = row % S_pad, b = bh / a.num_heads, h = bh % a.num_heads;
    if (s >= S) {
      if (lane == 0) w.delta[row] = w.m2[row] = w.log2l[row] = 0.f;
      return;
    }
    const T* o = static_cast<const T*>(a.out) + b * a.out_stride[0] + s * a.out_stride[1] + h * a.out_stride[2];
    const T* g = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + s * a.dout_stride[1] + h * a.dout_stride[2];
    float sum = 0.f;
    for (int64_t d = lane; d < D; d += 32) sum += to_float(o[d]) * to_float(g[d]);
    sum = warp_sum(sum);
    if (lane == 0) {
      w.delta[row] = sum;
      w.m2[row] = a.stats[bh * S + s];
      w.log2l[row] = a.stats[a.batch * a.num_heads * S + bh * S + s];
    }
    if (w.dq_accum != nullptr) {  // non-deterministic mode: zero this row's fp32 dQ accumulator
      float* acc = w.dq_accum + ((b * S + s) * a.num_heads + h) * D;
      if (D % 4 == 0) {  // 16-byte aligned rows (the workspace's parts are)
        for (int64_t d = 4 * lane; d < D; d += 128) *reinterpret_cast<Pack<float, 4>*>(acc + d) = Pack<float, 4>{};
      } else {
        for (int64_t d = lane; d < D; d += 32) acc[d] = 0.f;
      }
    }
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + s * a.q_stride[1] + h * a.q_stride[2];
    rotate_row(w.qr + (bh * S + s) * D, q, a.cos + s * a.cs_stride, a.sin + s * a.cs_stride, int(half), lane);
    return;
  }
  const int64_t krow = row - q_rows;
  if (w.kr == nullptr || krow >= a.batch * a.num_kv_heads * S) return;
  const int64_t bh = krow / S, s = krow % S, b = bh / a.num_kv_heads, h = bh % a.num_kv_heads;
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + s * a.k_stride[1] + h * a.k_stride[2];
  rotate_row(w.kr + krow * D, k, a.cos + s * a.cs_stride, a.sin + s * a.cs_stride, int(half), lane);
}

// ---------------------------------------------------------------------------------------------
// Shared building blocks of the kv and q kernels.
// ---------------------------------------------------------------------------------------------

// The visible entries of one warp's part of the tile of query block m0 (BM queries) and key block n0
// (BN keys): for each of its two row halves h (tile rows r0 + g + 8h, g = lane / 4) the visible tile
// columns [lo[h], hi[h]). Key j is visible to query i iff both are below S, j <= i when causal, and,
// with packed documents, doc_start[i] <= j (equivalently i < doc_end[j]). `any` is false where the tile
// holds no hidden entry at all: then nothing is masked and no bound is read.
struct TileMask {
  bool any;
  int lo[2], hi[2];
  __device__ __forceinline__ bool hides(int col, int h) const { return any && (col < lo[h] || col >= hi[h]); }
};

// QUERY_ROWS: the tile's rows are queries and its columns keys (q kernel; `doc` is doc_start), otherwise
// rows are keys and columns queries (kv kernel; `doc` is doc_end). doc: nullptr without documents.
// Both bounds are non-decreasing, so the block's extreme row decides whether any document boundary
// crosses the tile: the last query's start (q kernel) or the first key's end (kv kernel).
template <int BM, int BN, bool QUERY_ROWS>
__device__ __forceinline__ TileMask tile_mask(int64_t m0, int64_t n0, int64_t S, bool causal, const int32_t* doc,
                                              int r0) {
  TileMask m;
  const int64_t q_end = m0 + BM < S ? m0 + BM : S, k_end = n0 + BN < S ? n0 + BN : S;
  m.any = (causal && m0 < n0 + BN) || m0 + BM > S || n0 + BN > S;
  if (doc != nullptr && !m.any) m.any = QUERY_ROWS ? doc[q_end - 1] > n0 : doc[n0] < q_end;
  if (!m.any) return m;
  const int g = threadIdx.x % 32 / 4;
  constexpr int NC = QUERY_ROWS ? BN : BM;
  const int64_t c0 = QUERY_ROWS ? n0 : m0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = (QUERY_ROWS ? m0 : n0) + r0 + g + 8 * h;  // this row's query (key) index
    const int64_t at = row < S ? row : S - 1;
    int64_t lo, hi;  // visible columns, as key (query) indices
    if (QUERY_ROWS) {  // keys doc_start[i] .. i (causal) below S
      lo = doc != nullptr && doc[at] > n0 ? doc[at] : n0;
      hi = causal && row + 1 < k_end ? row + 1 : k_end;
    } else {  // queries j (causal) .. doc_end[j] - 1 below S
      lo = causal && row > m0 ? row : m0;
      hi = doc != nullptr && doc[at] < q_end ? doc[at] : q_end;
    }
    if (row >= S) hi = lo;  // past the end: nothing visible
    lo -= c0;
    hi -= c0;
    m.lo[h] = int(lo < 0 ? 0 : lo > NC ? NC : lo);
    m.hi[h] = int(hi < 0 ? 0 : hi > NC ? NC : hi);
  }
  return m;
}

// Rows [row0, row0 + ROWS) of one head (row stride row_stride, head dim D contiguous) into a
// swizzled [ROWS, DP] tile. Rows >= seq_len and columns >= D are zero. With `vec` (D % 8 == 0 and
// 16-byte aligned rows) through cp.async, to be waited for by the caller; otherwise plain loads.
template <typename T, int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int64_t row_stride, int64_t row0,
                                          int64_t seq_len, int D, bool vec) {
  constexpr int kChunks = DP / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    T* dst = tile + swz<DP>(r, c);
    const int64_t pos = row0 + r;
    const bool in_rows = pos < seq_len;
    const T* src = head + (in_rows ? pos : 0) * row_stride + c;
    if (vec) {
      cp_async_16(dst, in_rows && c < D ? src : head, in_rows && c < D ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = in_rows && c + e < D ? src[e] : from_float<T>(0.f);
    }
  }
}

// Rows row0 .. row0 + ROWS - 1 of one head of k (row stride row_stride, contiguous head dim), rotated by
// their positions' cos / sin rows (rotate_pair: the workspace's rounding) into a swizzled [ROWS, DP]
// tile; rows past seq_len and columns past D are zero. Element by element: it runs once per CTA.
template <typename T, int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_rotated_tile(T* tile, const T* head, int64_t row_stride, int64_t row0,
                                                  int64_t seq_len, int D, const float* cos, const float* sin,
                                                  int64_t cs_stride) {
  const int half = D / 2;
#pragma unroll 4  // independent iterations: four rows' loads in flight at once
  for (int idx = threadIdx.x; idx < ROWS * (DP / 2); idx += THREADS) {
    const int r = idx / (DP / 2), d = idx % (DP / 2);
    const int64_t pos = row0 + r;
    if (pos < seq_len && d < half) {
      const T* x = head + pos * row_stride;
      rotate_pair(x[d], x[d + half], cos[pos * cs_stride + d], sin[pos * cs_stride + d], tile[swz<DP>(r, d)],
                  tile[swz<DP>(r, d + half)]);
    } else {  // the padding: columns from D on (two per idx past half) and rows past the sequence
      const T zero = from_float<T>(0.f);
      if (pos >= seq_len) {
        tile[swz<DP>(r, d)] = zero;
        tile[swz<DP>(r, d + DP / 2)] = zero;
      } else {
        tile[swz<DP>(r, d + half)] = zero;  // d in [half, DP / 2): columns half + d in [D, DP / 2 + half)
        if (d + DP / 2 >= D) tile[swz<DP>(r, d + DP / 2)] = zero;
      }
    }
  }
}

// N fp32 values (N % 4 == 0, 16-byte aligned, padded rows: always in range) into shared memory.
template <int N, int THREADS>
__device__ __forceinline__ void load_floats_async(float* dst, const float* src) {
  for (int i = threadIdx.x; i < N / 4; i += THREADS) cp_async_16(dst + 4 * i, src + 4 * i, 16);
}

// For one warp: acc1 = X1[r0:r0+16] Y1^T and acc2 = X2[r0:r0+16] Y2^T over the padded head dim,
// X and Y swizzled [*, DP] tiles, NC columns (rows of Y). acc[j] is the 16 x 8 accumulator tile of
// columns 8j .. 8j+7.
template <typename T, int DP, int NC>
__device__ __forceinline__ void two_products(float (&acc1)[NC / 8][4], float (&acc2)[NC / 8][4], const T* x1,
                                             const T* x2, const T* y1, const T* y2, int r0) {
  const int lane = threadIdx.x % 32, i = lane % 8, j = lane / 8;
#pragma unroll
  for (int n = 0; n < NC / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc1[n][e] = acc2[n][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a1[4], a2[4];
    const int a_off = swz<DP>(r0 + i + 8 * (j & 1), kk * 16 + 8 * (j >> 1));  // A, row-major
    ldmatrix_x4(a1, x1 + a_off);
    ldmatrix_x4(a2, x2 + a_off);
#pragma unroll
    for (int nn = 0; nn < NC / 16; ++nn) {
      uint32_t b1[4], b2[4];
      const int b_off = swz<DP>(nn * 16 + i + 8 * (j >> 1), kk * 16 + 8 * (j & 1));  // B from [n][k] rows
      ldmatrix_x4(b1, y1 + b_off);
      ldmatrix_x4(b2, y2 + b_off);
      mma_16816<T>(acc1[2 * nn], a1, {b1[0], b1[1]});
      mma_16816<T>(acc1[2 * nn + 1], a1, {b1[2], b1[3]});
      mma_16816<T>(acc2[2 * nn], a2, {b2[0], b2[1]});
      mma_16816<T>(acc2[2 * nn + 1], a2, {b2[2], b2[3]});
    }
  }
}

// P = exp2((S * scale_log2 - m2) - log2l) under the tile's mask and dS = P * (dP - delta), in place
// over one warp's accumulator tiles of NC columns (s becomes P, dp becomes dS). m2 first: exact near
// the row max however large the scores; never m2 + log2l in one number. m2, log2l and delta are
// indexed by query. QUERY_ROWS: the tiles' rows r0.. are queries and their columns keys (q kernel); otherwise
// the rows are keys and the columns queries (kv kernel, transposed tiles).
template <bool QUERY_ROWS, int NC>
__device__ __forceinline__ void probs_and_ds(float (&s)[NC / 8][4], float (&dp)[NC / 8][4], const float* m2,
                                             const float* log2l, const float* delta, const TileMask& mask,
                                             float scale_log2, int r0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < NC / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + g + 8 * (e >> 1), c = n * 8 + 2 * t + (e & 1);
      const int query = QUERY_ROWS ? r : c;
      float p = fast_exp2(__fsub_rn(__fmul_rn(s[n][e], scale_log2), m2[query]) - log2l[query]);
      if (mask.hides(c, e >> 1)) p = 0.f;
      s[n][e] = p;
      dp[n][e] = p * (dp[n][e] - delta[query]);
    }
}

// acc[16, NCOLS] += A[16, 16] * Y[k0:k0+16, c0:c0+NCOLS], Y a swizzled [*, DP] tile read as [k][n].
template <typename T, int DP, int NCOLS>
__device__ __forceinline__ void mma_rows_of(float (&acc)[NCOLS / 8][4], const uint32_t (&a)[4], const T* y, int k0,
                                            int c0) {
  const int lane = threadIdx.x % 32, i = lane % 8, j = lane / 8;
#pragma unroll
  for (int nn = 0; nn < NCOLS / 16; ++nn) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, y + swz<DP>(k0 + i + 8 * (j & 1), c0 + nn * 16 + 8 * (j >> 1)));
    mma_16816<T>(acc[2 * nn], a, {b[0], b[1]});
    mma_16816<T>(acc[2 * nn + 1], a, {b[2], b[3]});
  }
}

// The A operand for k-chunk kk (columns 16kk .. 16kk+15) of a 16-row accumulator, rounded to T.
template <typename T, int NC>
__device__ __forceinline__ void as_operand(uint32_t (&a)[4], const float (&acc)[NC / 8][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Writes a warp's accumulator (rows r0 .. r0+15, NC columns) into an fp32 [*, LDA] shared array.
template <int NC, int LDA>
__device__ __forceinline__ void spill_acc(float* dst, const float (&acc)[NC / 8][4], int r0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < NC / 8; ++n) {
    float* p = dst + (r0 + g) * LDA + n * 8 + 2 * t;
    p[0] = acc[n][0];
    p[1] = acc[n][1];
    p[8 * LDA] = acc[n][2];
    p[8 * LDA + 1] = acc[n][3];
  }
}

// Stores rows [row0, row0 + ROWS) of a gradient from an fp32 shared array (row stride LDA) to the
// contiguous output rows of one head (row stride row_stride): times `scale`, then rotated by -theta
// when ROTATE.
template <typename T, int LDA, int ROWS, int THREADS, bool ROTATE>
__device__ __forceinline__ void store_grad(T* head, int64_t row_stride, const float* acc, float scale, int64_t row0,
                                           int64_t seq_len, int head_dim, const float* cos, const float* sin,
                                           int64_t cs_stride) {
  const int half = head_dim / 2;
  const int cols = ROTATE ? half : head_dim;
  for (int idx = threadIdx.x; idx < ROWS * cols; idx += THREADS) {
    const int r = idx / cols, d = idx % cols;
    const int64_t pos = row0 + r;
    if (pos >= seq_len) continue;
    T* row = head + pos * row_stride;
    if (ROTATE) {
      const float g1 = acc[r * LDA + d] * scale, g2 = acc[r * LDA + d + half] * scale;
      const float c = cos[pos * cs_stride + d], s = sin[pos * cs_stride + d];
      row[d] = from_float<T>(g1 * c + g2 * s);
      row[d + half] = from_float<T>(g2 * c - g1 * s);
    } else {
      row[d] = from_float<T>(acc[r * LDA + d] * scale);
    }
  }
}

// Shared memory of the kv kernel: K, V, two stages of (Q, dO, m2, log2l, delta), dS^T.
template <typename T, int DP, bool SMALL>
struct KvSmem {
  static constexpr int BM = Config<DP, SMALL>::KV_BM, BN = Config<DP, SMALL>::BN;
  static constexpr int SPLIT = Config<DP, SMALL>::KV_SPLIT, THREADS = Config<DP, SMALL>::KV_THREADS;
  static constexpr size_t kKeyTile = size_t(BN) * DP * sizeof(T);
  static constexpr size_t kQueryTile = size_t(BM) * DP * sizeof(T);
  static constexpr size_t kStage = 2 * kQueryTile + 3 * BM * sizeof(float);
  static constexpr size_t kK = 0, kV = kKeyTile, kStages = 2 * kKeyTile, kDs = kStages + 2 * kStage;
  static constexpr size_t kBytes = kDs + size_t(BN) * BM * sizeof(T);
  static constexpr int LDA = DP + 4;  // fp32 epilogue rows (dK then dV, over the whole buffer)
  static_assert(2 * size_t(BN) * LDA * sizeof(float) <= kBytes, "the epilogue reuses the tiles' memory");
};

// Shared memory of the q kernel: Q, dO, m2, log2l, delta, two stages of (K, V).
template <typename T, int DP, bool SMALL>
struct QSmem {
  static constexpr int BM = Config<DP, SMALL>::BM, BN = Config<DP, SMALL>::BN;
  static constexpr size_t kQueryTile = size_t(BM) * DP * sizeof(T);
  static constexpr size_t kKeyTile = size_t(BN) * DP * sizeof(T);
  static constexpr size_t kQ = 0, kDo = kQueryTile, kM2 = 2 * kQueryTile, kLog2l = kM2 + BM * sizeof(float);
  static constexpr size_t kDelta = kLog2l + BM * sizeof(float);
  static constexpr size_t kStages = kDelta + BM * sizeof(float), kStage = 2 * kKeyTile;
  static constexpr size_t kBytes = kStages + 2 * kStage;
  static constexpr int LDA = DP + 4;
  static_assert(size_t(BM) * LDA * sizeof(float) <= kBytes, "the epilogue reuses the tiles' memory");
};

// Whether the head-dim rows of a [B, S, H, D] tensor can be streamed with 16-byte copies.
inline bool rows_vectorizable(const void* p, const int64_t (&stride)[4], int64_t head_dim, int elem) {
  const int64_t per16 = 16 / elem;
  return head_dim % per16 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride[0] % per16 == 0 &&
         stride[1] % per16 == 0 && stride[2] % per16 == 0;
}

// ---------------------------------------------------------------------------------------------
// Step 2: dK and dV (and atomic dQ). grid (key blocks, Hkv, B): a head's key blocks run side by
// side and share its query tiles in L2.
// ---------------------------------------------------------------------------------------------
template <typename T, int DP, bool SMALL, bool ATOMIC_DQ>
__global__ void __launch_bounds__(Config<DP, SMALL>::KV_THREADS)
    attention_backward_kv(AttentionBackwardArgs a, Workspace<T> w, bool vec_in) {
  using C = KvSmem<T, DP, SMALL>;
  constexpr int BM = C::BM, BN = C::BN, WARPS = BN / 16 * C::SPLIT, THREADS = WARPS * 32;
  constexpr int NCOL = DP / C::SPLIT;  // columns of dK and dV a warp accumulates
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + C::kK);
  T* sV = reinterpret_cast<T*>(smem + C::kV);
  T* sDs = reinterpret_cast<T*>(smem + C::kDs);  // dS^T [BN, BM]
  auto stage = [&](int st) { return smem + C::kStages + st * C::kStage; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t S = a.seq_len, S_pad = padded_rows(S), Hq = a.num_heads, Hkv = a.num_kv_heads, group = Hq / Hkv;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * BN;
  const int D = static_cast<int>(a.head_dim);
  const float scale_log2 = float(1.4426950408889634 / sqrt(double(D)));  // the forward's fp32 factor
  const bool vec_rot = D % 8 == 0;

  const T* v_head = static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[2];
  load_tile<T, BN, DP, THREADS>(sV, v_head, a.v_stride[1], n0, S, D, vec_in);

  // Work items: (query head of the group, query block), the query blocks from the diagonal down to the
  // last query that sees a key of this block: with packed documents the end of the last key's document
  // (doc_end does not decrease), so a key block never loads a query block of a later document.
  const int64_t m_first = a.causal ? n0 / BM : 0;
  int64_t q_stop = S;
  if (a.doc_end != nullptr) {
    const int64_t e = a.doc_end[(n0 + BN < S ? n0 + BN : S) - 1];
    q_stop = e < S ? e : S;  // clamped: bad bounds never send a load out of the sequence
  }
  int64_t m_blocks = (q_stop + BM - 1) / BM;
  if (m_blocks <= m_first) m_blocks = m_first + 1;
  const int64_t per_head = m_blocks - m_first, items = group * per_head;
  auto issue = [&](int64_t item, int st) {
    const int64_t h = hk * group + item / per_head, m0 = (m_first + item % per_head) * BM;
    unsigned char* p = stage(st);
    load_tile<T, BM, DP, THREADS>(reinterpret_cast<T*>(p), w.qr + (b * Hq + h) * S * D, D, m0, S, D, vec_rot);
    const T* do_head = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[2];
    load_tile<T, BM, DP, THREADS>(reinterpret_cast<T*>(p + C::kQueryTile), do_head, a.dout_stride[1], m0, S, D,
                                  vec_in);
    float* rows = reinterpret_cast<float*>(p + 2 * C::kQueryTile);
    load_floats_async<BM, THREADS>(rows, w.m2 + (b * Hq + h) * S_pad + m0);
    load_floats_async<BM, THREADS>(rows + BM, w.log2l + (b * Hq + h) * S_pad + m0);
    load_floats_async<BM, THREADS>(rows + 2 * BM, w.delta + (b * Hq + h) * S_pad + m0);
  };
  issue(0, 0);  // V and the first item travel in the first group
  cp_async_commit();
  // K rotated here, once per key row (no kv CTA shares a key block): no rot(k) workspace to write and read
  // back. After the copies above are in flight, so their latency overlaps the rotation's loads; plain
  // stores to shared memory (sK is apart from V and the stages), published by the first item's __syncthreads.
  const T* k_head = static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[2];
  load_rotated_tile<T, BN, DP, THREADS>(sK, k_head, a.k_stride[1], n0, S, D, a.cos, a.sin, a.cs_stride);

  float dk[NCOL / 8][4], dv[NCOL / 8][4];
#pragma unroll
  for (int n = 0; n < NCOL / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  const int r0 = warp % (BN / 16) * 16;  // this warp's key rows within the block
  const int c_lo = warp / (BN / 16) * NCOL;  // and its first column of dK and dV

  for (int64_t item = 0; item < items; ++item) {
    cp_async_wait<0>();
    // This item's tiles, from every thread, are in shared memory, and every warp is done with the
    // previous item: its stage (next to be refilled) and dS^T are free.
    __syncthreads();
    if (item + 1 < items) {
      issue(item + 1, (item + 1) & 1);  // lands while this item computes
      cp_async_commit();
    }
    const unsigned char* p = stage(item & 1);
    const T* sQ = reinterpret_cast<const T*>(p);
    const T* sDo = reinterpret_cast<const T*>(p + C::kQueryTile);
    const float* sM2 = reinterpret_cast<const float*>(p + 2 * C::kQueryTile);
    const float* sLog2l = sM2 + BM;
    const float* sDelta = sM2 + 2 * BM;
    const int64_t h = hk * group + item / per_head, m0 = (m_first + item % per_head) * BM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
    float st[BM / 8][4], dpt[BM / 8][4];
    two_products<T, DP, BM>(st, dpt, sK, sV, sQ, sDo, r0);

    // P^T and dS^T in place; a mask only where the block can hold masked or out-of-range entries.
    probs_and_ds<false, BM>(st, dpt, sM2, sLog2l, sDelta, tile_mask<BM, BN, false>(m0, n0, S, a.causal, a.doc_end, r0),
                            scale_log2, r0);

    // Rounded to T as A operands (half the registers of the fp32 tiles), then dV += P^T dO and
    // dK += dS^T Q (queries are the reduction dimension).
    uint32_t ap[BM / 16][4], ads[BM / 16][4];
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      as_operand<T, BM>(ap[kk], st, kk);
      as_operand<T, BM>(ads[kk], dpt, kk);
    }
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      mma_rows_of<T, DP, NCOL>(dv, ap[kk], sDo, kk * 16, c_lo);
      mma_rows_of<T, DP, NCOL>(dk, ads[kk], sQ, kk * 16, c_lo);
    }

    if constexpr (ATOMIC_DQ) {
      // dS^T to shared memory (the A-operand registers are its rows g and g + 8 in column pairs),
      // then dQ[BM, DP] += dS K split over the warps: row groups of 16 queries, each with
      // DP / COL_GROUPS columns. Of two warps with the same key rows (KV_SPLIT), the first writes.
      if (c_lo == 0) {
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            *reinterpret_cast<uint32_t*>(sDs + swz<BM>(r0 + g + 8 * (e & 1), kk * 16 + 8 * (e >> 1) + 2 * t)) =
                ads[kk][e];
      }
      __syncthreads();
      constexpr int ROW_GROUPS = BM / 16, COL_GROUPS = WARPS / ROW_GROUPS, DC = DP / COL_GROUPS;
      static_assert(WARPS % ROW_GROUPS == 0 && DC % 16 == 0, "dQ tiles must split evenly over the warps");
      // In chunks of at most 64 columns (32 registers beside dK and dV; DP = 256 spilled with 128 at once).
      constexpr int DQC = DC < 64 ? DC : 64;
      const int q0 = (warp % ROW_GROUPS) * 16;
      const int i = lane % 8, j = lane / 8;
      float* dq_rows = w.dq_accum + ((b * S + m0) * Hq + h) * int64_t(D);
#pragma unroll 1
      for (int c0 = (warp / ROW_GROUPS) * DC; c0 < (warp / ROW_GROUPS + 1) * DC; c0 += DQC) {
        float dq[DQC / 8][4];
#pragma unroll
        for (int n = 0; n < DQC / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t ads[4];  // A = dS [queries, keys] read from dS^T [keys, queries]
          ldmatrix_x4_trans(ads, sDs + swz<BM>(kk * 16 + i + 8 * (j >> 1), q0 + 8 * (j & 1)));
          mma_rows_of<T, DP, DQC>(dq, ads, sK, kk * 16, c0);
        }
#pragma unroll
        for (int n = 0; n < DQC / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; e += 2) {  // column pairs (d, d + 1); D is even
            const int r = q0 + g + 4 * e, d = c0 + n * 8 + 2 * t;
            if (m0 + r < S && d < D) atomic_add2(dq_rows + int64_t(r) * Hq * D + d, dq[n][e], dq[n][e + 1]);
          }
      }
    }
  }

  // Epilogue: dK and dV through fp32 shared rows; scale, rotate, store.
  constexpr int LDA = C::LDA;
  float* sdK = reinterpret_cast<float*>(smem);
  float* sdV = sdK + BN * LDA;
  __syncthreads();
  spill_acc<NCOL, LDA>(sdK + c_lo, dk, r0);
  spill_acc<NCOL, LDA>(sdV + c_lo, dv, r0);
  __syncthreads();
  T* dk_head = static_cast<T*>(a.dk) + (b * S * Hkv + hk) * D;
  T* dv_head = static_cast<T*>(a.dv) + (b * S * Hkv + hk) * D;
  store_grad<T, LDA, BN, THREADS, true>(dk_head, Hkv * D, sdK, rsqrtf(float(D)), n0, S, D, a.cos, a.sin,
                                        a.cs_stride);
  store_grad<T, LDA, BN, THREADS, false>(dv_head, Hkv * D, sdV, 1.f, n0, S, D, a.cos, a.sin, a.cs_stride);
}

// ---------------------------------------------------------------------------------------------
// Step 3 (deterministic mode): dQ. grid (query blocks, Hq, B), the longest rows first.
// ---------------------------------------------------------------------------------------------
template <typename T, int DP, bool SMALL>
__global__ void __launch_bounds__(Config<DP, SMALL>::BM * 2)
    attention_backward_q(AttentionBackwardArgs a, Workspace<T> w, bool vec_in) {
  using C = QSmem<T, DP, SMALL>;
  constexpr int BM = C::BM, BN = C::BN, WARPS = BM / 16, THREADS = WARPS * 32;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + C::kQ);
  T* sDo = reinterpret_cast<T*>(smem + C::kDo);
  float* sM2 = reinterpret_cast<float*>(smem + C::kM2);
  float* sLog2l = reinterpret_cast<float*>(smem + C::kLog2l);
  float* sDelta = reinterpret_cast<float*>(smem + C::kDelta);
  auto stage = [&](int st) { return smem + C::kStages + st * C::kStage; };

  const int warp = threadIdx.x / 32;
  const int64_t S = a.seq_len, S_pad = padded_rows(S), Hq = a.num_heads, Hkv = a.num_kv_heads;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (Hq / Hkv);
  const int64_t m0 = int64_t(gridDim.x - 1 - blockIdx.x) * BM;  // causal: the longest rows start first
  const int D = static_cast<int>(a.head_dim);
  const float scale_log2 = float(1.4426950408889634 / sqrt(double(D)));  // the forward's fp32 factor
  const bool vec_rot = D % 8 == 0;

  load_tile<T, BM, DP, THREADS>(sQ, w.qr + (b * Hq + h) * S * D, D, m0, S, D, vec_rot);
  const T* do_head = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[2];
  load_tile<T, BM, DP, THREADS>(sDo, do_head, a.dout_stride[1], m0, S, D, vec_in);
  load_floats_async<BM, THREADS>(sM2, w.m2 + (b * Hq + h) * S_pad + m0);
  load_floats_async<BM, THREADS>(sLog2l, w.log2l + (b * Hq + h) * S_pad + m0);
  load_floats_async<BM, THREADS>(sDelta, w.delta + (b * Hq + h) * S_pad + m0);

  const T* k_head = w.kr + (b * Hkv + hk) * S * D;
  const T* v_head = static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[2];
  auto issue = [&](int64_t n0, int st) {
    T* p = reinterpret_cast<T*>(stage(st));
    load_tile<T, BN, DP, THREADS>(p, k_head, D, n0, S, D, vec_rot);
    load_tile<T, BN, DP, THREADS>(p + BN * DP, v_head, a.v_stride[1], n0, S, D, vec_in);
  };
  // Causal: key blocks after this query block's last row are never loaded. Packed documents: nor those
  // before its first query's document start (doc_start does not decrease).
  const int64_t n_end = a.causal ? (m0 + BM < S ? m0 + BM : S) : S;
  int64_t n_first = 0;
  if (a.doc_start != nullptr) {
    const int64_t start = a.doc_start[m0];
    n_first = (start < 0 ? 0 : start > m0 ? m0 : start) / BN * BN;  // clamped: never out of the sequence
  }
  const int64_t items = (n_end + BN - 1) / BN - n_first / BN;
  issue(n_first, 0);  // Q, dO, m2, log2l and delta travel in the same first group
  cp_async_commit();

  float dq[DP / 8][4];
#pragma unroll
  for (int n = 0; n < DP / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;
  const int r0 = warp * 16;  // this warp's query rows within the block

  for (int64_t item = 0; item < items; ++item) {
    cp_async_wait<0>();
    __syncthreads();  // this key block is in shared memory; every warp is done with the previous one
    if (item + 1 < items) {
      issue(n_first + (item + 1) * BN, (item + 1) & 1);  // lands while this block computes
      cp_async_commit();
    }
    const T* sK = reinterpret_cast<const T*>(stage(item & 1));
    const T* sV = sK + BN * DP;
    const int64_t n0 = n_first + item * BN;

    // S = Q K^T and dP = dO V^T for this warp's 16 queries x BN keys.
    float s[BN / 8][4], dp[BN / 8][4];
    two_products<T, DP, BN>(s, dp, sQ, sDo, sK, sV, r0);
    probs_and_ds<true, BN>(s, dp, sM2, sLog2l, sDelta, tile_mask<BM, BN, true>(m0, n0, S, a.causal, a.doc_start, r0),
                           scale_log2, r0);
    // dQ += dS K (keys are the reduction dimension).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t ads[4];
      as_operand<T, BN>(ads, dp, kk);
      mma_rows_of<T, DP, DP>(dq, ads, sK, kk * 16, 0);
    }
  }

  constexpr int LDA = C::LDA;
  float* sAcc = reinterpret_cast<float*>(smem);
  __syncthreads();
  spill_acc<DP, LDA>(sAcc, dq, r0);
  __syncthreads();
  T* dq_head = static_cast<T*>(a.dq) + (b * S * Hq + h) * D;
  store_grad<T, LDA, BM, THREADS, true>(dq_head, Hq * D, sAcc, rsqrtf(float(D)), m0, S, D, a.cos, a.sin,
                                        a.cs_stride);
}

// Non-deterministic mode: dq = rot^-1(dq_accum * scale), a grid-stride loop over (row, column group)
// items, rows (b, s, h) flattened as in the contiguous dq. VEC (dq_finish_vectorizable): a group is 8
// columns d .. d+7 of the first half and the same of the second, loaded as 16-byte fp32 quads and
// stored as 16-byte packs of 8 outputs; otherwise one column pair (d, d + half) an item.
// HBM bytes at B8 H32 S2048 D128 bf16 (rows = 8 * 2048 * 32 = 524,288; 128 columns):
//   before (one 64-thread CTA per row, scalar): 524,288 * 128 * (4 read + 2 written) = 402.7 MB in
//   524,288 CTAs, + cos / sin 2048 * 64 * 4 * 2 = 1 MB (L2-resident).
//   now: the same 402.7 MB + 1 MB, all 16-byte accesses, in SMs * 8 CTAs of 256 threads.
template <typename T, bool VEC>
__global__ void attention_backward_dq_finish(AttentionBackwardArgs a, const float* dq_accum) {
  constexpr int CPI = VEC ? 8 : 1;  // columns of each half an item covers
  const int D = static_cast<int>(a.head_dim), half = D / 2, per_row = half / CPI;
  const int64_t items = a.batch * a.seq_len * a.num_heads * per_row;
  const float scale = rsqrtf(float(D));
  T* dq = static_cast<T*>(a.dq);
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = item / per_row;
    const int d = int(item % per_row) * CPI;
    const int64_t pos = (row / a.num_heads) % a.seq_len;
    const float* acc = dq_accum + row * D + d;
    const float* cos = a.cos + pos * a.cs_stride + d;
    const float* sin = a.sin + pos * a.cs_stride + d;
    T* out = dq + row * D + d;
    if constexpr (VEC) {
      float g1[8], g2[8], c[8], s[8];
#pragma unroll
      for (int k = 0; k < 8; k += 4) {
        const Pack<float, 4> x1 = *reinterpret_cast<const Pack<float, 4>*>(acc + k);
        const Pack<float, 4> x2 = *reinterpret_cast<const Pack<float, 4>*>(acc + half + k);
        const Pack<float, 4> xc = *reinterpret_cast<const Pack<float, 4>*>(cos + k);
        const Pack<float, 4> xs = *reinterpret_cast<const Pack<float, 4>*>(sin + k);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          g1[k + e] = x1.v[e] * scale;
          g2[k + e] = x2.v[e] * scale;
          c[k + e] = xc.v[e];
          s[k + e] = xs.v[e];
        }
      }
      Pack<uint32_t, 4> lo, hi;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        lo.v[e] = pack2<T>(g1[2 * e] * c[2 * e] + g2[2 * e] * s[2 * e],
                           g1[2 * e + 1] * c[2 * e + 1] + g2[2 * e + 1] * s[2 * e + 1]);
        hi.v[e] = pack2<T>(g2[2 * e] * c[2 * e] - g1[2 * e] * s[2 * e],
                           g2[2 * e + 1] * c[2 * e + 1] - g1[2 * e + 1] * s[2 * e + 1]);
      }
      *reinterpret_cast<Pack<uint32_t, 4>*>(out) = lo;
      *reinterpret_cast<Pack<uint32_t, 4>*>(out + half) = hi;
    } else {
      const float g1 = acc[0] * scale, g2 = acc[half] * scale;
      out[0] = from_float<T>(g1 * cos[0] + g2 * sin[0]);
      out[half] = from_float<T>(g2 * cos[0] - g1 * sin[0]);
    }
  }
}

// Whether dq_finish can take 16-byte steps: 8-column groups per half, 16-byte aligned rows of dq (its
// own rows are D * 2 bytes) and of the cos / sin tables. dq_accum is 16-byte aligned in the workspace.
inline bool dq_finish_vectorizable(const AttentionBackwardArgs& a) {
  return a.head_dim % 16 == 0 && a.cs_stride % 4 == 0 && reinterpret_cast<uintptr_t>(a.dq) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a.cos) % 16 == 0 && reinterpret_cast<uintptr_t>(a.sin) % 16 == 0;
}

template <typename Kernel>
int set_smem(Kernel kernel, size_t bytes) {
  return static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T, int DP, bool SMALL>
int launch(const AttentionBackwardArgs& a, float* workspace, cudaStream_t stream) {
  const Workspace<T> w = carve<T>(a, workspace);
  const bool vec_in = rows_vectorizable(a.v, a.v_stride, a.head_dim, sizeof(T)) &&
                      rows_vectorizable(a.dout, a.dout_stride, a.head_dim, sizeof(T));
  const int64_t prep_rows = prep_row_count(a);
  attention_backward_prep<T><<<static_cast<unsigned>((prep_rows + 7) / 8), 256, 0, stream>>>(a, w);

  using KV = KvSmem<T, DP, SMALL>;
  const unsigned key_blocks = static_cast<unsigned>((a.seq_len + KV::BN - 1) / KV::BN);
  const dim3 kv_grid(key_blocks, static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.batch));
  int err;
  if (a.deterministic) {
    if ((err = set_smem(attention_backward_kv<T, DP, SMALL, false>, KV::kBytes))) return err;
    attention_backward_kv<T, DP, SMALL, false><<<kv_grid, KV::THREADS, KV::kBytes, stream>>>(a, w, vec_in);
    using QS = QSmem<T, DP, SMALL>;
    if ((err = set_smem(attention_backward_q<T, DP, SMALL>, QS::kBytes))) return err;
    const unsigned query_blocks = static_cast<unsigned>((a.seq_len + QS::BM - 1) / QS::BM);
    const dim3 q_grid(query_blocks, static_cast<unsigned>(a.num_heads), static_cast<unsigned>(a.batch));
    attention_backward_q<T, DP, SMALL><<<q_grid, QS::BM * 2, QS::kBytes, stream>>>(a, w, vec_in);
  } else {
    if ((err = set_smem(attention_backward_kv<T, DP, SMALL, true>, KV::kBytes))) return err;
    attention_backward_kv<T, DP, SMALL, true><<<kv_grid, KV::THREADS, KV::kBytes, stream>>>(a, w, vec_in);
    const bool vec = dq_finish_vectorizable(a);
    const int64_t items = a.batch * a.seq_len * a.num_heads * (a.head_dim / 2) / (vec ? 8 : 1);
    int device = 0, sms = 0;
    if ((err = cudaGetDevice(&device))) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device))) return err;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, int64_t(sms) * 8));
    if (vec)
      attention_backward_dq_finish<T, true><<<blocks, 256, 0, stream>>>(a, w.dq_accum);
    else
      attention_backward_dq_finish<T, false><<<blocks, 256, 0, stream>>>(a, w.dq_accum);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_head_dim(const AttentionBackwardArgs& a, float* workspace, cudaStream_t stream) {
  if (a.head_dim <= 64) return launch<T, 64, false>(a, workspace, stream);
  if (a.head_dim <= 256 && a.head_dim > 128) return launch<T, 256, false>(a, workspace, stream);
  if (a.head_dim > 256) return static_cast<int>(cudaErrorInvalidValue);
  int device = 0, smem_optin = 0, err;
  if ((err = cudaGetDevice(&device))) return err;
  if ((err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device))) return err;
  const size_t need = std::max(KvSmem<T, 128, false>::kBytes, QSmem<T, 128, false>::kBytes);
  return need <= size_t(smem_optin) ? launch<T, 128, false>(a, workspace, stream)
                                    : launch<T, 128, true>(a, workspace, stream);
}

}  // namespace

int64_t attention_backward_cuda_workspace(const AttentionBackwardArgs& a) {
  int64_t off[7];
  workspace_layout(a, off);
  return off[6];
}

int attention_backward_cuda(const AttentionBackwardArgs& a, float* workspace, void* stream_ptr) {
  if (a.batch * a.seq_len * a.num_heads * a.head_dim == 0) return 0;
  if (a.head_dim % 2 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads) return static_cast<int>(cudaErrorInvalidValue);
  // Grid limits: heads and batch are grid.y / grid.z (<= 65535), rows (b, s, h) < 2^31.
  if (a.batch > 65535 || a.num_heads > 65535 || a.batch * a.seq_len * a.num_heads >= (int64_t(1) << 31))
    return static_cast<int>(cudaErrorInvalidConfiguration);
  if (reinterpret_cast<uintptr_t>(workspace) % 16) return static_cast<int>(cudaErrorMisalignedAddress);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (a.dtype) {
    case DType::F16: return launch_head_dim<__half>(a, workspace, stream);
    case DType::BF16: return launch_head_dim<__nv_bfloat16>(a, workspace, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace llama_fast
