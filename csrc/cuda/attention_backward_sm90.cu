// Attention backward with RoPE fused in for Hopper (sm_90a): wgmma, TMA, mbarrier pipelines, warp
// specialization and the bulk reduce-add of dQ (issue 18). Opt-in beside the sm_80 kernel
// (attention_backward.cu), which stays the fallback; head dims 64 and 128 only.
//
// Math as attention_backward.cu, with the saved row statistics of the forward (the stats contract):
// stats fp32 [2, B, Hq, S]: m2 = the row max of S2 = S * scale * log2(e), log2l = log2 of the row
// sum; P = exp2((S2 - m2) - log2l); delta = rowsum(dO * O); dV = P^T dO; dP = dO V^T;
// dS = P * (dP - delta); dQ = rot^-1(dS rot(K)) * scale; dK = rot^-1(dS^T rot(Q)) * scale; dK and
// dV summed over the query heads of a kv head.
//
// Three kernels:
//  1. prep (one warp per row): delta, m2 and log2l into row arrays padded to a multiple of 64 (the
//     padding is zero), rot(q) and rot(k) in the input dtype ([B, H, S, D]) in the workspace.
//  2. main, one CTA per (key block of 128, kv head, batch), 3 warpgroups:
//     - warpgroup 0 is the producer (setmaxnreg down to 24 registers): one thread loads K and V once
//       and then streams (query head of the group, query block of 64) items through a two-stage
//       pipeline: Q and dO tiles by TMA (4-D tensor maps over [B, S, H, D] with any strides;
//       rows past the end are zero-filled) and m2, log2l, delta by bulk copies, all completing on
//       the stage's `full` mbarrier (transaction bytes); it waits on the stage's `empty` mbarrier
//       before refilling it. Causal: only the query blocks from the diagonal down.
//     - warpgroups 1 and 2 are the MMA warpgroups (setmaxnreg up to 240), each owning 64 key rows.
//       Per item: S^T = K Q^T (wgmma, both operands from shared memory), P^T in registers (masked:
//       causal, past the end), rounded to the input dtype as the A operand of dV; then dP^T = V dO^T
//       and dS^T = P^T (dP^T - delta) from that rounded P^T (one fp32 tile live at a time beside
//       dK and dV: with D = 128 the 240 registers hold no more without spilling); dV += P^T dO and
//       dK += dS^T Q (wgmma with the A operand from registers), dS^T to shared memory, then
//       dQ = dS K (wgmma from shared memory, dS^T read MN-major): for D = 128 each warpgroup
//       computes 64 of the 128 columns over all 128 keys, for D = 64 each its own 64 keys over all
//       columns. The dQ tile (fp32)
//       goes to shared memory and one thread adds it to the fp32 accumulator in global memory with
//       one cp.reduce.async.bulk (16 KB). Deterministic mode: the additions to each dQ tile are
//       ordered by a global semaphore (key block, then warpgroup), so every bit is reproducible.
//     Epilogue: dK (scaled) and dV through fp32 shared memory, inverse rotation of dK, stores.
//  3. finish: dq = rot^-1(dq_accum * scale) in the input dtype.
//
// Shared-memory tiles are the TMA 128-byte-swizzled layout: a [rows, D] tile is D / 64 panels of
// [rows][64] (128-byte rows), each 1024-byte aligned (hopper.cuh describes the wgmma descriptors
// that read them). 128 key rows, 64 query rows: for D = 128, K and V 64 KB, two stages of Q, dO and
// row statistics 66 KB, dS^T 16 KB, two dQ tiles 32 KB: 178 KB, one CTA per SM.
//
// Expected speed: not yet measured on a GPU (benchmarks/bench_attention.py times it beside the
// sm_80 kernel and Triton). Causal work is longest first already (key block 0 sees every query
// block and starts first). Known gaps to FlashAttention-3's design: the two fp32 tiles are formed
// one after the other and each item's matmuls wait for the previous step (no overlap of one item's
// softmax with the next item's wgmmas), and dS^T goes through shared memory once per item.
// Verified only in the host emulation (tests/test_cuda_emulation_sm90.py) and by ptxas so far:
// no spills, 168 registers at launch (24 / 240 after setmaxnreg).
#include <algorithm>
#include <atomic>

#include "common.cuh"
#include "hopper.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma nv_diag_suppress 177  // compiled for another architecture the main kernel is a stub: its helpers go unused
#endif

namespace llama_fast {
namespace {

constexpr int kBM = 64;           // query rows per item
constexpr int kWgKeys = 64;       // key rows per MMA warpgroup
constexpr int kMmaWgs = 2;        // MMA warpgroups
constexpr int kBN = kWgKeys * kMmaWgs;
constexpr int kThreads = 128 * (kMmaWgs + 1);
constexpr int kStages = 2;

template <int D>
struct Sm90Smem {
  static constexpr int P = D / 64;                    // 64-column panels of a tile
  static constexpr int kKV = kBN * D * 2;             // the K or the V tile
  static constexpr int kQ = kBM * D * 2;              // one Q or dO tile
  static constexpr int kStage = 2 * kQ + 1024;        // Q, dO, then m2 | log2l | delta (3 x 64 floats)
  static constexpr int kK = 0, kV = kKV, kStages0 = 2 * kKV;
  static constexpr int kDs = kStages0 + kStages * kStage;  // dS^T [128 keys][64 queries], 16-bit
  static constexpr int kDq = kDs + kBN * kBM * 2;          // per MMA warpgroup a [64][64] fp32 dQ tile
  static constexpr int kBar = kDq + kMmaWgs * kBM * 64 * 4;
  static constexpr int kBytes = kBar + 64 + 1024;          // mbarriers, then slack to align the base
  static_assert(kBN * D * 4 <= 2 * kKV && kBN * D * 4 <= kStages * kStage, "epilogue staging must fit");
};

// The workspace, carved out of one fp32 buffer (attention_backward_sm90_workspace).
template <typename T>
struct Sm90Workspace {
  float* rows;      // m2 | log2l | delta, each [B * Hq][S_pad]
  float* dq_accum;  // [B * Hq][D / 64][S_pad][64]
  int* sem;         // [B * Hq][S_pad / 64], deterministic mode
  T* qr;            // rot(q) [B, Hq, S, D]
  T* kr;            // rot(k) [B, Hkv, S, D]
};

__host__ __device__ inline int64_t sm90_padded(int64_t s) { return (s + kBM - 1) / kBM * kBM; }
inline int64_t sm90_align4(int64_t n) { return (n + 3) / 4 * 4; }

inline void sm90_workspace_layout(const AttentionBackwardArgs& a, int64_t (&off)[6]) {
  const int64_t bh = a.batch * a.num_heads, S_pad = sm90_padded(a.seq_len);
  off[0] = 0;
  off[1] = off[0] + sm90_align4(3 * bh * S_pad);
  off[2] = off[1] + sm90_align4(bh * S_pad * a.head_dim);
  off[3] = off[2] + sm90_align4(bh * (S_pad / kBM));
  off[4] = off[3] + sm90_align4((bh * a.seq_len * a.head_dim + 1) / 2);
  off[5] = off[4] + sm90_align4((a.batch * a.num_kv_heads * a.seq_len * a.head_dim + 1) / 2);
}

template <typename T>
Sm90Workspace<T> sm90_carve(const AttentionBackwardArgs& a, float* base) {
  int64_t off[6];
  sm90_workspace_layout(a, off);
  return {base + off[0], base + off[1], reinterpret_cast<int*>(base + off[2]), reinterpret_cast<T*>(base + off[3]),
          reinterpret_cast<T*>(base + off[4])};
}

// The main kernel's parameters; the tensor maps must live in parameter space (__grid_constant__).
struct Sm90Params {
  CUtensorMap tq, tdo, tk, tv;  // rot(q), dout, rot(k), v: 4-D, innermost first
  const float* rows;
  float* dq_accum;
  int* sem;
  void* dk;
  void* dv;
  const float* cos;
  const float* sin;
  int64_t cs_stride, batch, seq_len, s_pad, num_heads, num_kv_heads;
  bool causal, deterministic;
};

// ---------------------------------------------------------------------------------------------
// 1. prep: rows [0, B*Hq*S_pad) are query rows (padding rows get zeros), then B*Hkv*S key rows.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void attention_backward_sm90_prep(AttentionBackwardArgs a, const float* stats, Sm90Workspace<T> w) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t S = a.seq_len, S_pad = sm90_padded(S), D = a.head_dim, half = D / 2;
  const int64_t q_rows = a.batch * a.num_heads * S_pad, plane = q_rows;
  if (row < q_rows) {
    const int64_t bh = row / S_pad, s = row % S_pad, b = bh / a.num_heads, h = bh % a.num_heads;
    if (s >= S) {
      if (lane == 0) w.rows[row] = w.rows[plane + row] = w.rows[2 * plane + row] = 0.f;
      return;
    }
    const T* o = static_cast<const T*>(a.out) + b * a.out_stride[0] + s * a.out_stride[1] + h * a.out_stride[2];
    const T* g = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + s * a.dout_stride[1] + h * a.dout_stride[2];
    float sum = 0.f;
    for (int64_t d = lane; d < D; d += 32) sum += to_float(o[d]) * to_float(g[d]);
    sum = warp_sum(sum);
    if (lane == 0) {
      const int64_t stat_plane = a.batch * a.num_heads * S;
      w.rows[row] = stats[bh * S + s];                        // m2
      w.rows[plane + row] = stats[stat_plane + bh * S + s];   // log2l
      w.rows[2 * plane + row] = sum;                          // delta
    }
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + s * a.q_stride[1] + h * a.q_stride[2];
    rotate_row(w.qr + (bh * S + s) * D, q, a.cos + s * a.cs_stride, a.sin + s * a.cs_stride, int(half), lane);
    return;
  }
  const int64_t krow = row - q_rows;
  if (krow >= a.batch * a.num_kv_heads * S) return;
  const int64_t bh = krow / S, s = krow % S, b = bh / a.num_kv_heads, h = bh % a.num_kv_heads;
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + s * a.k_stride[1] + h * a.k_stride[2];
  rotate_row(w.kr + krow * D, k, a.cos + s * a.cs_stride, a.sin + s * a.cs_stride, int(half), lane);
}

// Byte offset of element (r, c) (c < 64) in a [rows][64] panel with the 128-byte swizzle.
__device__ __forceinline__ int swz128(int r, int c) { return 128 * r + 16 * ((c / 8) ^ (r % 8)) + 2 * (c % 8); }

// ---------------------------------------------------------------------------------------------
// 2. main kernel. grid (key blocks, Hkv, B), kThreads threads.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_sm90_main(const __grid_constant__ Sm90Params p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another architecture: the launcher only starts this kernel on sm_90a
#else
  using L = Sm90Smem<D>;
  constexpr int P = L::P;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // swizzled tiles: 1024-aligned
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint64_t* empty = full + kStages;
  uint64_t* kv_bar = full + 2 * kStages;
  auto stage = [&](int st) { return smem + L::kStages0 + st * L::kStage; };

  const int wg = warpgroup_index(), tid = threadIdx.x % 128;
  const int64_t S = p.seq_len, S_pad = p.s_pad, Hq = p.num_heads, Hkv = p.num_kv_heads;
  const int64_t b = blockIdx.z, hk = blockIdx.y, nb = blockIdx.x, n0 = nb * kBN;
  const int64_t group = Hq / Hkv, m_blocks = S_pad / kBM, m_first = p.causal ? n0 / kBM : 0;
  const int64_t per_head = m_blocks - m_first, items = group * per_head;

  if (threadIdx.x == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full + st, 1);
      mbar_init(empty + st, kMmaWgs * 128);
    }
    mbar_init(kv_bar, 1);
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    setmaxnreg_dec<24>();
    if (tid != 0) return;
    mbar_arrive_expect_tx(kv_bar, 2 * L::kKV);
    for (int pn = 0; pn < P; ++pn) {
      tma_load_4d(smem + L::kK + pn * kBN * 128, &p.tk, kv_bar, 64 * pn, int(n0), int(hk), int(b));
      tma_load_4d(smem + L::kV + pn * kBN * 128, &p.tv, kv_bar, 64 * pn, int(hk), int(n0), int(b));
    }
    // 32-bit indices here: this warpgroup runs on 24 registers.
    const int plane = int(p.batch * Hq * S_pad), per_head32 = int(per_head), group32 = int(group);
    const int h0 = int(hk) * group32, mf = int(m_first), bi = int(b), sp = int(S_pad);
    const float* rows_b = p.rows + int64_t(bi) * int(Hq) * sp;
    for (int item = 0; item < int(items); ++item) {
      const int st = item % kStages;
      mbar_wait(empty + st, uint32_t((item / kStages) & 1) ^ 1);  // a fresh barrier counts as emptied
      const int hg = item / per_head32, h = h0 + hg, m0 = (mf + item - hg * per_head32) * kBM;
      unsigned char* s = stage(st);
      mbar_arrive_expect_tx(full + st, 2 * L::kQ + 3 * kBM * 4);
#pragma unroll
      for (int pn = 0; pn < P; ++pn) {
        tma_load_4d(s + pn * kBM * 128, &p.tq, full + st, 64 * pn, m0, h, bi);
        tma_load_4d(s + L::kQ + pn * kBM * 128, &p.tdo, full + st, 64 * pn, h, m0, bi);
      }
      const float* rows = rows_b + h * sp + m0;
      float* srows = reinterpret_cast<float*>(s + 2 * L::kQ);
#pragma unroll
      for (int r = 0; r < 3; ++r) bulk_load(srows + r * kBM, rows + int64_t(r) * plane, kBM * 4, full + st);
    }
    return;
  }

  // ---- MMA warpgroups ----
  setmaxnreg_inc<240>();
  const int cw = wg - 1, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  constexpr bool kSplitDq = D == 128;  // dQ columns split over the warpgroups (else keys)
  // Consumer-wide barrier around the shared dS^T (D = 128 reads both warpgroups' rows).
  auto sync_ds = [&] { kSplitDq ? named_barrier_sync(1, kMmaWgs * 128) : named_barrier_sync(2 + cw, 128); };
  const float scale_log2 = float(1.4426950408889634 / sqrt(double(D)));  // the forward's fp32 factor
  unsigned char* sK = smem + L::kK;
  unsigned char* sV = smem + L::kV;
  unsigned char* sDs = smem + L::kDs;
  float* sDq = reinterpret_cast<float*>(smem + L::kDq) + cw * kBM * 64;

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  mbar_wait(kv_bar, 0);

  for (int64_t item = 0; item < items; ++item) {
    const int st = int(item % kStages);
    const int64_t h = hk * group + item / per_head, m0 = (m_first + item % per_head) * kBM;
    mbar_wait(full + st, uint32_t((item / kStages) & 1));
    unsigned char* sQ = stage(st);
    unsigned char* sDo = sQ + L::kQ;
    const float* srows = reinterpret_cast<const float*>(sQ + 2 * L::kQ);

    // S^T = K Q^T, then P^T; then dP^T = V dO^T, then dS^T: this warpgroup's 64 keys x 64 queries,
    // k over the head dim. One after the other so that only one fp32 tile is live beside dK and dV
    // (with D = 128 those hold 128 of the 240 registers).
    // Register i holds key row 16 warp + g + 8 ((i >> 1) & 1), query column 8 (i >> 2) + 2 t4 + (i & 1).
    const bool any_mask = (p.causal && m0 < n0 + kBN) || m0 + kBM > S || n0 + kBN > S;
    uint32_t ap[4][4], ads[4][4];  // P^T and dS^T as the A operands of the 4 query k-steps
    {
      float s[32];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int panel = kk / 4, col = 32 * (kk % 4);
        wgmma_ss_n64<T, 0, 0>(s, smem_desc(sK + panel * kBN * 128 + cw * kWgKeys * 128 + col, 16, 1024),
                              smem_desc(sQ + panel * kBM * 128 + col, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operand(s);
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int key = int(n0) + cw * kWgKeys + 16 * warp + g + 8 * ((i >> 1) & 1);
        const int qc = 8 * (i >> 2) + 2 * t4 + (i & 1), query = int(m0) + qc;
        // S2 rounded as the forward rounds it, never fused into the subtraction (row-statistics contract)
        float pr = fast_exp2(__fsub_rn(__fmul_rn(s[i], scale_log2), srows[qc]) - srows[kBM + qc]);
        if (any_mask && (query >= S || key >= S || (p.causal && key > query))) pr = 0.f;
        s[i] = pr;
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) ap[kk][e] = pack2<T>(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
    }
    {
      float dp[32];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int panel = kk / 4, col = 32 * (kk % 4);
        wgmma_ss_n64<T, 0, 0>(dp, smem_desc(sV + panel * kBN * 128 + cw * kWgKeys * 128 + col, 16, 1024),
                              smem_desc(sDo + panel * kBM * 128 + col, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operand(dp);
      // dS^T = P^T * (dP^T - delta), P^T taken back from its rounded registers (as dS uses P)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 8 * kk + 2 * e, qc = 8 * (i >> 2) + 2 * t4;
          const float p0 = unpack_lo<T>(ap[kk][e]), p1 = unpack_hi<T>(ap[kk][e]);
          ads[kk][e] = pack2<T>(p0 * (dp[i] - srows[2 * kBM + qc]), p1 * (dp[i + 1] - srows[2 * kBM + qc + 1]));
        }
    }

    // dS^T into shared memory, [128 keys][64 queries] swizzled: the MN-major A operand of dQ = dS K.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = cw * kWgKeys + 16 * warp + g + 8 * (e & 1), qc = 16 * kk + 8 * (e >> 1) + 2 * t4;
        *reinterpret_cast<uint32_t*>(sDs + swz128(key, qc)) = ads[kk][e];
      }

    // dV += P^T dO and dK += dS^T Q (queries are the reduction dimension; dO and Q read MN-major).
    wgmma_fence();  // the A-operand registers were just written
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_rs<T, D, 1>(dv, ap[kk], smem_desc(sDo + kk * 16 * 128, kBM * 128, 1024), 1);
      wgmma_rs<T, D, 1>(dk, ads[kk], smem_desc(sQ + kk * 16 * 128, kBM * 128, 1024), 1);
    }
    wgmma_commit();
    // Waited for here, not after dQ: the A-operand registers (P^T, dS^T) stay live until the wgmmas
    // reading them complete, and holding them through dQ would not fit the register budget.
    wgmma_wait<0>();
    fence_operand(dk);
    fence_operand(dv);
    fence_proxy_async_shared();  // dS^T written by this thread -> visible to wgmma (async proxy)
    sync_ds();

    // dQ tile [64 queries][64 columns] = dS K.
    float dq[32];
    wgmma_fence();
    if constexpr (kSplitDq) {
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_ss_n64<T, 1, 1>(dq, smem_desc(sDs + kk * 16 * 128, kBN * 128, 1024),
                              smem_desc(sK + cw * kBN * 128 + kk * 16 * 128, kBN * 128, 1024), kk > 0);
    } else {
#pragma unroll
      for (int kk = 0; kk < kWgKeys / 16; ++kk) {
        const int key0 = cw * kWgKeys + 16 * kk;
        wgmma_ss_n64<T, 1, 1>(dq, smem_desc(sDs + key0 * 128, kBN * 128, 1024),
                              smem_desc(sK + key0 * 128, kBN * 128, 1024), kk > 0);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(dq);
    fence_operand(dk);
    fence_operand(dv);
    sync_ds();                // every warpgroup is done reading dS^T: the next item may overwrite it
    mbar_arrive(empty + st);  // and this thread with the stage's Q, dO and rows

    // dQ tile -> shared memory -> one bulk reduce-add into the fp32 accumulator.
    if (tid == 0) bulk_wait_read<0>();  // the previous reduction has read the tile buffer
    named_barrier_sync(2 + cw, 128);
#pragma unroll
    for (int i = 0; i < 32; ++i)
      sDq[(16 * warp + g + 8 * ((i >> 1) & 1)) * 64 + 8 * (i >> 2) + 2 * t4 + (i & 1)] = dq[i];
    fence_proxy_async_shared();
    named_barrier_sync(2 + cw, 128);
    if (tid == 0) {
      const int panel = kSplitDq ? cw : 0;
      float* dst = p.dq_accum + (((b * Hq + h) * P + panel) * S_pad + m0) * 64;
      int* sem = p.sem + (b * Hq + h) * m_blocks + m0 / kBM;
      if (p.deterministic) {
        const int turn = int(nb) * kMmaWgs + cw;  // key blocks 0.. add in order, then warpgroups
        while (ld_acquire(sem) != turn) {
        }
        fence_proxy_async_global();  // the bulk reduction (async proxy) after the acquire
      }
      bulk_reduce_add_f32(dst, sDq, kBM * 64 * 4);
      bulk_commit();
      if (p.deterministic) {
        bulk_wait<0>();
        red_release_add(sem, 1);
      }
    }
  }
  if (tid == 0) bulk_wait<0>();

  // Epilogue: dK and dV (fp32) over the K / V tiles and the stages, then scale, rotate, store.
  named_barrier_sync(1, kMmaWgs * 128);  // both warpgroups are done with K, V and the stages
  float* sdk = reinterpret_cast<float*>(smem + L::kK);
  float* sdv = reinterpret_cast<float*>(smem + L::kStages0);
#pragma unroll
  for (int i = 0; i < D / 2; ++i) {
    const int r = cw * kWgKeys + 16 * warp + g + 8 * ((i >> 1) & 1), c = 8 * (i >> 2) + 2 * t4 + (i & 1);
    sdk[r * D + c] = dk[i];
    sdv[r * D + c] = dv[i];
  }
  named_barrier_sync(1, kMmaWgs * 128);
  constexpr int half = D / 2;
  const float scale = rsqrtf(float(D));
  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
  for (int idx = threadIdx.x - 128; idx < kBN * half; idx += kMmaWgs * 128) {
    const int r = idx / half, d = idx % half;
    const int64_t pos = n0 + r;
    if (pos >= S) continue;
    const float c = p.cos[pos * p.cs_stride + d], sn = p.sin[pos * p.cs_stride + d];
    const float g1 = sdk[r * D + d] * scale, g2 = sdk[r * D + d + half] * scale;
    const int64_t o = ((b * S + pos) * Hkv + hk) * D + d;
    dk_out[o] = from_float<T>(g1 * c + g2 * sn);
    dk_out[o + half] = from_float<T>(g2 * c - g1 * sn);
    dv_out[o] = from_float<T>(sdv[r * D + d]);
    dv_out[o + half] = from_float<T>(sdv[r * D + d + half]);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// 3. finish: dq = rot^-1(dq_accum * scale). One block of 64 threads per (b, s, h) row (grid.x).
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void attention_backward_sm90_dq_finish(AttentionBackwardArgs a, const float* dq_accum) {
  const int D = static_cast<int>(a.head_dim), half = D / 2, P = D / 64;
  const int64_t row = blockIdx.x, S = a.seq_len, S_pad = sm90_padded(S);
  const int64_t h = row % a.num_heads, pos = (row / a.num_heads) % S, b = row / (a.num_heads * S);
  const float scale = rsqrtf(float(D));
  const float* acc = dq_accum + (b * a.num_heads + h) * P * S_pad * 64 + pos * 64;
  auto at = [&](int d) { return acc[(d / 64) * S_pad * 64 + d % 64]; };
  const float* cos = a.cos + pos * a.cs_stride;
  const float* sin = a.sin + pos * a.cs_stride;
  T* out = static_cast<T*>(a.dq) + row * D;
  for (int d = threadIdx.x; d < half; d += blockDim.x) {
    const float g1 = at(d) * scale, g2 = at(d + half) * scale;
    out[d] = from_float<T>(g1 * cos[d] + g2 * sin[d]);
    out[d + half] = from_float<T>(g2 * cos[d] - g1 * sin[d]);
  }
}

// The main kernel's parameters for `a`; `encode(map, base, dims, strides_bytes, box)` fills one
// 4-D tensor map (dims innermost first; strides_bytes[0] is the element size). Returns false when a
// tensor's layout cannot be a tensor map (16-byte aligned base and strides).
template <typename T, typename Encode>
bool sm90_params(const AttentionBackwardArgs& a, const Sm90Workspace<T>& w, Encode encode, Sm90Params& p) {
  const uint64_t D = uint64_t(a.head_dim), S = uint64_t(a.seq_len), B = uint64_t(a.batch);
  const uint64_t Hq = uint64_t(a.num_heads), Hkv = uint64_t(a.num_kv_heads), e = sizeof(T);
  auto strided_ok = [&](const void* ptr, const int64_t (&st)[4]) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && st[3] == 1 && (st[0] * e) % 16 == 0 &&
           (st[1] * e) % 16 == 0 && (st[2] * e) % 16 == 0;
  };
  if (!strided_ok(a.dout, a.dout_stride) || !strided_ok(a.v, a.v_stride)) return false;
  bool ok = true;
  {  // rot(q) [B, Hq, S, D]: coordinates (d, s, h, b), box 64 x 64 rows
    const uint64_t dims[4] = {D, S, Hq, B}, strides[4] = {e, D * e, S * D * e, Hq * S * D * e};
    const uint32_t box[4] = {64, uint32_t(kBM), 1, 1};
    ok = ok && encode(&p.tq, w.qr, dims, strides, box);
  }
  {  // rot(k) [B, Hkv, S, D]: (d, s, h, b), box 64 x 128 rows
    const uint64_t dims[4] = {D, S, Hkv, B}, strides[4] = {e, D * e, S * D * e, Hkv * S * D * e};
    const uint32_t box[4] = {64, uint32_t(kBN), 1, 1};
    ok = ok && encode(&p.tk, w.kr, dims, strides, box);
  }
  {  // dout [B, S, Hq, D] strided: (d, h, s, b), box 64 x 1 x 64 rows
    const uint64_t dims[4] = {D, Hq, S, B};
    const uint64_t strides[4] = {e, uint64_t(a.dout_stride[2]) * e, uint64_t(a.dout_stride[1]) * e,
                                 uint64_t(a.dout_stride[0]) * e};
    const uint32_t box[4] = {64, 1, uint32_t(kBM), 1};
    ok = ok && encode(&p.tdo, a.dout, dims, strides, box);
  }
  {  // v [B, S, Hkv, D] strided: (d, h, s, b), box 64 x 1 x 128 rows
    const uint64_t dims[4] = {D, Hkv, S, B};
    const uint64_t strides[4] = {e, uint64_t(a.v_stride[2]) * e, uint64_t(a.v_stride[1]) * e,
                                 uint64_t(a.v_stride[0]) * e};
    const uint32_t box[4] = {64, 1, uint32_t(kBN), 1};
    ok = ok && encode(&p.tv, a.v, dims, strides, box);
  }
  p.rows = w.rows;
  p.dq_accum = w.dq_accum;
  p.sem = w.sem;
  p.dk = a.dk;
  p.dv = a.dv;
  p.cos = a.cos;
  p.sin = a.sin;
  p.cs_stride = a.cs_stride;
  p.batch = a.batch;
  p.seq_len = a.seq_len;
  p.s_pad = sm90_padded(a.seq_len);
  p.num_heads = a.num_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.causal = a.causal;
  p.deterministic = a.deterministic;
  return ok;
}

}  // namespace

bool attention_backward_sm90_supported(const AttentionBackwardArgs& a) {
  return (a.head_dim == 64 || a.head_dim == 128) && (a.dtype == DType::F16 || a.dtype == DType::BF16) &&
         a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0 && a.batch <= 65535 && a.num_kv_heads <= 65535 &&
         a.seq_len < (int64_t(1) << 30) && a.batch * a.seq_len * a.num_heads < (int64_t(1) << 31);
}

int64_t attention_backward_sm90_workspace(const AttentionBackwardArgs& a) {
  int64_t off[6];
  sm90_workspace_layout(a, off);
  return off[5];
}

namespace {
// ---- host launcher: the emulation tests cut the file here and run the kernels above ----------
#ifndef LLAMA_FAST_CUDA_EMULATION
// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

bool encode_map(CUtensorMap* map, const void* base, const uint64_t (&dims)[4], const uint64_t (&strides)[4],
                const uint32_t (&box)[4]) {
  EncodeTiled fn = encode_tiled();
  if (!fn) return false;
  const cuuint64_t gdims[4] = {dims[0], dims[1], dims[2], dims[3]};
  const cuuint64_t gstrides[3] = {strides[1], strides[2], strides[3]};
  const cuuint32_t gbox[4] = {box[0], box[1], box[2], box[3]}, estrides[4] = {1, 1, 1, 1};
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), gdims, gstrides, gbox, estrides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int D>
int sm90_launch(const AttentionBackwardArgs& a, const float* stats, float* workspace, cudaStream_t stream) {
  const Sm90Workspace<T> w = sm90_carve<T>(a, workspace);
  Sm90Params p;
  if (!sm90_params<T>(a, w, encode_map, p)) return static_cast<int>(cudaErrorNotSupported);
  const int64_t S_pad = sm90_padded(a.seq_len);
  const int64_t prep_rows = a.batch * a.num_heads * S_pad + a.batch * a.num_kv_heads * a.seq_len;
  attention_backward_sm90_prep<T><<<static_cast<unsigned>((prep_rows + 7) / 8), 256, 0, stream>>>(a, stats, w);
  int err;
  if ((err = cudaMemsetAsync(w.dq_accum, 0, sizeof(float) * a.batch * a.num_heads * S_pad * a.head_dim, stream)))
    return err;
  if ((err = cudaMemsetAsync(w.sem, 0, sizeof(int) * a.batch * a.num_heads * (S_pad / kBM), stream))) return err;
  constexpr int kBytes = Sm90Smem<D>::kBytes;
  if ((err = cudaFuncSetAttribute(attention_backward_sm90_main<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kBytes)))
    return err;
  const dim3 grid(static_cast<unsigned>((a.seq_len + kBN - 1) / kBN), static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.batch));
  attention_backward_sm90_main<T, D><<<grid, kThreads, kBytes, stream>>>(p);
  const unsigned rows = static_cast<unsigned>(a.batch * a.seq_len * a.num_heads);
  attention_backward_sm90_dq_finish<T><<<rows, 64, 0, stream>>>(a, w.dq_accum);
  return static_cast<int>(cudaGetLastError());
}

// Whether this build holds the sm_90a code of the main kernel for the current device (an sm_90
// device, and the extension built with -gencode arch=compute_90a,code=sm_90a: otherwise the kernel
// is the __trap() stub). Found out once per device by a one-thread probe kernel.
__global__ void attention_backward_sm90_probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

bool sm90a_code_loaded() {
  static std::atomic<int> known[64];  // 0 unknown, 1 yes, 2 no
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (const int k = known[device].load()) return k == 1;
  bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
             cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
             major == 9 && minor == 0;
  if (yes) {
    int* flag = nullptr;
    int host = 0;
    yes = cudaMalloc(&flag, sizeof(int)) == cudaSuccess;
    if (yes) {
      attention_backward_sm90_probe<<<1, 1>>>(flag);
      yes = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess && host == 1;
      cudaFree(flag);
    }
    cudaGetLastError();  // a failed probe (e.g. no kernel image) leaves no sticky error behind
  }
  known[device].store(yes ? 1 : 2);
  return yes;
}
#endif
}  // namespace

#ifndef LLAMA_FAST_CUDA_EMULATION
bool attention_backward_sm90_available() { return sm90a_code_loaded(); }

int attention_backward_sm90(const AttentionBackwardArgs& a, const float* stats, float* workspace, void* stream_ptr) {
  if (a.batch * a.seq_len * a.num_heads * a.head_dim == 0) return 0;
  if (!attention_backward_sm90_supported(a) || !sm90a_code_loaded()) return static_cast<int>(cudaErrorNotSupported);
  if (reinterpret_cast<uintptr_t>(workspace) % 16) return static_cast<int>(cudaErrorMisalignedAddress);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool f16 = a.dtype == DType::F16;
  if (a.head_dim == 64)
    return f16 ? sm90_launch<__half, 64>(a, stats, workspace, stream)
               : sm90_launch<__nv_bfloat16, 64>(a, stats, workspace, stream);
  return f16 ? sm90_launch<__half, 128>(a, stats, workspace, stream)
             : sm90_launch<__nv_bfloat16, 128>(a, stats, workspace, stream);
}
#endif

}  // namespace llama_fast
