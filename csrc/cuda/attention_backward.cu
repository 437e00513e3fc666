// Attention backward with RoPE fused in, on the tensor cores (wmma 16x16x16, sm_80 and newer).
//
// Math (see llama_fast.h): P = exp2(S * scale * log2(e) - LSE * log2(e)) recomputed from the saved
// LSE; delta = rowsum(dO * O); dV = P^T dO; dP = dO V^T; dS = P * (dP - delta);
// dQ = rot^-1(dS rot(K)) * scale; dK = rot^-1(dS^T rot(Q)) * scale; dK, dV summed over a group.
//
// Layout: q, dout, out [B, S, Hq, D] and k, v [B, S, Hkv, D] with any batch / seq / head strides and
// a contiguous head dim; lse fp32 [B, Hq, S]; cos / sin fp32 [>= S, D / 2] (row stride cs_stride);
// dq, dk, dv contiguous. The workspace holds delta (fp32 [B, Hq, S]) and, when not deterministic,
// an fp32 dQ accumulator [B, S, Hq, D].
// dtypes: fp16 or bf16 in and out. Matmul operands in the input dtype (as the forward and the
// reference use them), every accumulation fp32 (wmma accumulator fragments); rotation, softmax
// recomputation and dS in fp32, rounded to the input dtype only to feed the next matmul.
//
// Tiling: a CTA has WARPS warps; each warp owns 16 rows of the CTA's block. The head dim is padded
// with zeros to DP in {64, 128, 256} (shared-memory tiles are DP + 8 wide against bank conflicts).
// Rotated q and k tiles are built while loading global -> shared (rows past S and columns past D
// are zero), so no rotated copy exists in global memory.
//  * kv kernel: one CTA per (key block, batch, kv head). Loops over the group's query heads and the
//    query blocks that can see the key block (causal: from the diagonal down; blocks above it are
//    never loaded). Per query block: S^T = K Q^T and dP^T = V dO^T per warp into shared fp32, the
//    elementwise step forms P^T and dS^T (masked only on the diagonal block), then dV += P^T dO and
//    dK += dS^T Q stay in register fragments. Not deterministic: the CTA also forms dS K for the
//    query block and adds it into the fp32 dQ accumulator with atomics.
//  * q kernel (deterministic mode): one CTA per (query block, batch, query head), loops over the
//    key blocks up to the diagonal and accumulates dQ in register fragments. No atomics anywhere, so
//    every gradient is bitwise reproducible.
//  * epilogues multiply by scale, rotate by -theta in fp32 and store in the input dtype.
#include <mma.h>

#include "common.cuh"

namespace llama_fast {
namespace {

using namespace nvcuda;

constexpr float kLog2e = 1.4426950408889634f;

// Rows per block (queries and keys alike): 64, or 32 for DP = 256 so the tiles fit in shared memory.
template <int DP> constexpr int block_rows() { return DP == 256 ? 32 : 64; }

template <typename T, int DP>
struct Tiles {
  static constexpr int BLOCK = block_rows<DP>();
  static constexpr int WARPS = BLOCK / 16;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int LD = DP + 8;        // row stride (elements) of the [BLOCK, DP] input-dtype tiles
  static constexpr int LDS = BLOCK + 4;    // row stride of the fp32 [BLOCK, BLOCK] score tiles
  static constexpr int LDP = BLOCK + 8;    // row stride of the input-dtype [BLOCK, BLOCK] P / dS tiles
  static constexpr size_t kTile = size_t(BLOCK) * LD * sizeof(T);
  static constexpr size_t kScore = size_t(BLOCK) * LDS * sizeof(float);
  static constexpr size_t kProb = size_t(BLOCK) * LDP * sizeof(T);
  // Four [BLOCK, DP] tiles, two fp32 score tiles, two P / dS tiles, lse and delta rows.
  static constexpr size_t kSmem = 4 * kTile + 2 * kScore + 2 * kProb + 2 * BLOCK * sizeof(float);
};

using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename T> using FragARow = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <typename T> using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;

// Loads rows [row0, row0 + ROWS) of one head into a [ROWS, DP] shared tile (row stride LD),
// rotating them when ROTATE. Rows >= seq_len and columns >= D read as zero.
template <typename T, int DP, int LD, int ROWS, int THREADS, bool ROTATE>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int64_t row_stride, int64_t row0, int64_t seq_len,
                                          int head_dim, const float* cos, const float* sin, int64_t cs_stride) {
  const int half = head_dim / 2;
  for (int idx = threadIdx.x; idx < ROWS * DP; idx += THREADS) {
    const int r = idx / DP, d = idx % DP;
    const int64_t pos = row0 + r;
    float val = 0.f;
    if (pos < seq_len && d < head_dim) {
      const T* row = head + pos * row_stride;
      if (ROTATE) {
        const int d1 = d < half ? d : d - half;  // index into the first half and the tables
        const float x1 = to_float(row[d1]), x2 = to_float(row[d1 + half]);
        const float c = cos[pos * cs_stride + d1], s = sin[pos * cs_stride + d1];
        val = d < half ? x1 * c - x2 * s : x2 * c + x1 * s;
      } else {
        val = to_float(row[d]);
      }
    }
    tile[r * LD + d] = from_float<T>(val);
  }
}

// Stores rows [row0, row0 + ROWS) of a gradient from an fp32 shared tile (row stride LDA) to the
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

// C[16, 16] = A[16, KDIM] B[KDIM, 16] for one warp; A rows at `a` (row-major, lda), B at `b` in the
// given layout. Both operands in shared memory.
template <typename T, int KDIM, typename FragA, typename FragB, int LDA, int LDB, bool B_COL_MAJOR, bool A_COL_MAJOR>
__device__ __forceinline__ void warp_mma(FragAcc& c, const T* a, const T* b) {
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
    FragA fa;
    FragB fb;
    wmma::load_matrix_sync(fa, A_COL_MAJOR ? a + kk * 16 * LDA : a + kk * 16, LDA);
    wmma::load_matrix_sync(fb, B_COL_MAJOR ? b + kk * 16 : b + kk * 16 * LDB, LDB);
    wmma::mma_sync(c, fa, fb, c);
  }
}

// delta[b, h, s] = sum_d dO[b, s, h, d] * O[b, s, h, d]: one warp per row, fp32.
template <typename T>
__global__ void attention_backward_delta(AttentionBackwardArgs a, float* delta) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // (b, h, s) flattened
  const int lane = threadIdx.x % 32;
  const int64_t rows = a.batch * a.num_heads * a.seq_len;
  if (row >= rows) return;
  const int64_t s = row % a.seq_len, h = (row / a.seq_len) % a.num_heads, b = row / (a.seq_len * a.num_heads);
  const T* o = static_cast<const T*>(a.out) + b * a.out_stride[0] + s * a.out_stride[1] + h * a.out_stride[2];
  const T* g = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + s * a.dout_stride[1] + h * a.dout_stride[2];
  float sum = 0.f;
  for (int d = lane; d < a.head_dim; d += 32) sum += to_float(o[d]) * to_float(g[d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// One CTA per (batch * kv head, key block): grid.x = B * Hkv, grid.y = key blocks: dK and dV (and, not deterministic, atomic dQ partials).
template <typename T, int DP>
__global__ void __launch_bounds__(Tiles<T, DP>::THREADS)
    attention_backward_kv(AttentionBackwardArgs a, const float* delta, float* dq_accum) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // wmma on bf16 needs sm_80; the launcher is never reached on older GPUs by design
#else
  using C = Tiles<T, DP>;
  constexpr int BLOCK = C::BLOCK, LD = C::LD, LDS = C::LDS, LDP = C::LDP, THREADS = C::THREADS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + C::kTile);
  T* sQ = reinterpret_cast<T*>(smem + 2 * C::kTile);
  T* sdO = reinterpret_cast<T*>(smem + 3 * C::kTile);
  float* sS = reinterpret_cast<float*>(smem + 4 * C::kTile);
  float* sdP = reinterpret_cast<float*>(smem + 4 * C::kTile + C::kScore);
  T* sP = reinterpret_cast<T*>(smem + 4 * C::kTile + 2 * C::kScore);
  T* sdS = reinterpret_cast<T*>(smem + 4 * C::kTile + 2 * C::kScore + C::kProb);
  float* sLse = reinterpret_cast<float*>(smem + 4 * C::kTile + 2 * C::kScore + 2 * C::kProb);
  float* sDelta = sLse + BLOCK;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t S = a.seq_len, Hq = a.num_heads, Hkv = a.num_kv_heads, group = Hq / Hkv;
  const int64_t b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv;
  const int64_t n0 = int64_t(blockIdx.y) * BLOCK;
  const int D = static_cast<int>(a.head_dim);
  const float scale = rsqrtf(float(D)), scale_log2 = scale * kLog2e;

  const T* k_head = static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[2];
  const T* v_head = static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[2];
  load_tile<T, DP, LD, BLOCK, THREADS, true>(sK, k_head, a.k_stride[1], n0, S, D, a.cos, a.sin, a.cs_stride);
  load_tile<T, DP, LD, BLOCK, THREADS, false>(sV, v_head, a.v_stride[1], n0, S, D, a.cos, a.sin, a.cs_stride);

  FragAcc dk_acc[DP / 16], dv_acc[DP / 16];
#pragma unroll
  for (int j = 0; j < DP / 16; ++j) {
    wmma::fill_fragment(dk_acc[j], 0.f);
    wmma::fill_fragment(dv_acc[j], 0.f);
  }
  const int row0 = warp * 16;  // this warp's key rows within the block

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const T* q_head = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[2];
    const T* do_head = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[2];
    const float* lse_row = a.lse + (b * Hq + h) * S;
    const float* delta_row = delta + (b * Hq + h) * S;
    // Causal: query blocks before this key block see none of it and are skipped.
    for (int64_t m0 = a.causal ? n0 : 0; m0 < S; m0 += BLOCK) {
      __syncthreads();  // every warp is done with the previous query block's tiles
      load_tile<T, DP, LD, BLOCK, THREADS, true>(sQ, q_head, a.q_stride[1], m0, S, D, a.cos, a.sin, a.cs_stride);
      load_tile<T, DP, LD, BLOCK, THREADS, false>(sdO, do_head, a.dout_stride[1], m0, S, D, a.cos, a.sin,
                                                  a.cs_stride);
      for (int i = threadIdx.x; i < BLOCK; i += THREADS) {
        const bool ok = m0 + i < S;
        sLse[i] = ok ? lse_row[m0 + i] * kLog2e : 0.f;
        sDelta[i] = ok ? delta_row[m0 + i] : 0.f;
      }
      __syncthreads();

      // S^T[keys, queries] = K Q^T and dP^T = V dO^T for this warp's 16 key rows.
#pragma unroll
      for (int j = 0; j < BLOCK / 16; ++j) {
        FragAcc st, dpt;
        wmma::fill_fragment(st, 0.f);
        wmma::fill_fragment(dpt, 0.f);
        warp_mma<T, DP, FragARow<T>, FragBCol<T>, LD, LD, true, false>(st, sK + row0 * LD, sQ + j * 16 * LD);
        warp_mma<T, DP, FragARow<T>, FragBCol<T>, LD, LD, true, false>(dpt, sV + row0 * LD, sdO + j * 16 * LD);
        wmma::store_matrix_sync(sS + row0 * LDS + j * 16, st, LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(sdP + row0 * LDS + j * 16, dpt, LDS, wmma::mem_row_major);
      }
      __syncwarp();
      // P^T and dS^T; a mask only where the block can hold masked or out-of-range entries.
      const bool needs_mask = (a.causal && m0 < n0 + BLOCK) || m0 + BLOCK > S || n0 + BLOCK > S;
      for (int idx = lane; idx < 16 * BLOCK; idx += 32) {
        const int r = row0 + idx / BLOCK, c = idx % BLOCK;
        float p = exp2f(sS[r * LDS + c] * scale_log2 - sLse[c]);
        if (needs_mask && (m0 + c >= S || n0 + r >= S || (a.causal && m0 + c < n0 + r))) p = 0.f;
        sP[r * LDP + c] = from_float<T>(p);
        sdS[r * LDP + c] = from_float<T>(p * (sdP[r * LDS + c] - sDelta[c]));
      }
      __syncwarp();
      // dV += P^T dO and dK += dS^T Q over this warp's rows.
#pragma unroll
      for (int j = 0; j < DP / 16; ++j) {
        warp_mma<T, BLOCK, FragARow<T>, FragBRow<T>, LDP, LD, false, false>(dv_acc[j], sP + row0 * LDP, sdO + j * 16);
        warp_mma<T, BLOCK, FragARow<T>, FragBRow<T>, LDP, LD, false, false>(dk_acc[j], sdS + row0 * LDP, sQ + j * 16);
      }
      if (!a.deterministic) {
        // dQ[queries] += dS K: this warp takes 16 query rows; dS = (dS^T)^T is read column-major.
        __syncthreads();  // every warp's dS^T rows are written
        float* scratch = sS + row0 * LDS;  // this warp's own 16 x BLOCK fp32 rows, free again
        float* dq_rows = dq_accum + ((b * S + m0 + row0) * Hq + h) * int64_t(D);
        for (int j = 0; j < DP / 16; ++j) {
          if (j * 16 >= D) break;
          FragAcc dq;
          wmma::fill_fragment(dq, 0.f);
          warp_mma<T, BLOCK, FragACol<T>, FragBRow<T>, LDP, LD, false, true>(dq, sdS + row0, sK + j * 16);
          wmma::store_matrix_sync(scratch, dq, LDS, wmma::mem_row_major);
          __syncwarp();
          for (int idx = lane; idx < 256; idx += 32) {
            const int r = idx / 16, d = j * 16 + idx % 16;
            if (m0 + row0 + r < S && d < D) atomicAdd(dq_rows + int64_t(r) * Hq * D + d, scratch[r * LDS + idx % 16]);
          }
          __syncwarp();
        }
      }
    }
  }

  // Epilogue: fragments -> fp32 shared rows (over the sQ and sdO tiles), then scale, rotate, store.
  constexpr int LDA = LD;  // fp32 [BLOCK, DP] with row stride LD fits exactly in 2 * kTile bytes
  float* sAcc = reinterpret_cast<float*>(sQ);
  T* dk_head = static_cast<T*>(a.dk) + (b * S * Hkv + hk) * D;
  T* dv_head = static_cast<T*>(a.dv) + (b * S * Hkv + hk) * D;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < DP / 16; ++j) wmma::store_matrix_sync(sAcc + row0 * LDA + j * 16, dk_acc[j], LDA, wmma::mem_row_major);
  __syncthreads();
  store_grad<T, LDA, BLOCK, THREADS, true>(dk_head, Hkv * D, sAcc, scale, n0, S, D, a.cos, a.sin, a.cs_stride);
  __syncthreads();
#pragma unroll
  for (int j = 0; j < DP / 16; ++j) wmma::store_matrix_sync(sAcc + row0 * LDA + j * 16, dv_acc[j], LDA, wmma::mem_row_major);
  __syncthreads();
  store_grad<T, LDA, BLOCK, THREADS, false>(dv_head, Hkv * D, sAcc, 1.f, n0, S, D, a.cos, a.sin, a.cs_stride);
#endif
}

// One CTA per (batch * query head, query block): grid.x = B * Hq, grid.y = query blocks: dQ without atomics (deterministic mode).
template <typename T, int DP>
__global__ void __launch_bounds__(Tiles<T, DP>::THREADS) attention_backward_q(AttentionBackwardArgs a, const float* delta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using C = Tiles<T, DP>;
  constexpr int BLOCK = C::BLOCK, LD = C::LD, LDS = C::LDS, LDP = C::LDP, THREADS = C::THREADS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = reinterpret_cast<T*>(smem + C::kTile);
  T* sK = reinterpret_cast<T*>(smem + 2 * C::kTile);
  T* sV = reinterpret_cast<T*>(smem + 3 * C::kTile);
  float* sS = reinterpret_cast<float*>(smem + 4 * C::kTile);
  float* sdP = reinterpret_cast<float*>(smem + 4 * C::kTile + C::kScore);
  T* sdS = reinterpret_cast<T*>(smem + 4 * C::kTile + 2 * C::kScore);
  float* sLse = reinterpret_cast<float*>(smem + 4 * C::kTile + 2 * C::kScore + 2 * C::kProb);
  float* sDelta = sLse + BLOCK;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t S = a.seq_len, Hq = a.num_heads, Hkv = a.num_kv_heads, group = Hq / Hkv;
  const int64_t b = blockIdx.x / Hq, h = blockIdx.x % Hq, hk = h / group;
  const int64_t m0 = int64_t(blockIdx.y) * BLOCK;
  const int D = static_cast<int>(a.head_dim);
  const float scale = rsqrtf(float(D)), scale_log2 = scale * kLog2e;

  const T* q_head = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[2];
  const T* do_head = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[2];
  const T* k_head = static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[2];
  const T* v_head = static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[2];
  load_tile<T, DP, LD, BLOCK, THREADS, true>(sQ, q_head, a.q_stride[1], m0, S, D, a.cos, a.sin, a.cs_stride);
  load_tile<T, DP, LD, BLOCK, THREADS, false>(sdO, do_head, a.dout_stride[1], m0, S, D, a.cos, a.sin, a.cs_stride);
  for (int i = threadIdx.x; i < BLOCK; i += THREADS) {
    const bool ok = m0 + i < S;
    sLse[i] = ok ? a.lse[(b * Hq + h) * S + m0 + i] * kLog2e : 0.f;
    sDelta[i] = ok ? delta[(b * Hq + h) * S + m0 + i] : 0.f;
  }

  FragAcc dq_acc[DP / 16];
#pragma unroll
  for (int j = 0; j < DP / 16; ++j) wmma::fill_fragment(dq_acc[j], 0.f);
  const int row0 = warp * 16;  // this warp's query rows within the block
  // Causal: key blocks after this query block are never loaded.
  const int64_t n_end = a.causal ? (m0 + BLOCK < S ? m0 + BLOCK : S) : S;
  for (int64_t n0 = 0; n0 < n_end; n0 += BLOCK) {
    __syncthreads();  // every warp is done with the previous key block (and sQ / sLse are loaded)
    load_tile<T, DP, LD, BLOCK, THREADS, true>(sK, k_head, a.k_stride[1], n0, S, D, a.cos, a.sin, a.cs_stride);
    load_tile<T, DP, LD, BLOCK, THREADS, false>(sV, v_head, a.v_stride[1], n0, S, D, a.cos, a.sin, a.cs_stride);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < BLOCK / 16; ++j) {
      FragAcc s, dp;
      wmma::fill_fragment(s, 0.f);
      wmma::fill_fragment(dp, 0.f);
      warp_mma<T, DP, FragARow<T>, FragBCol<T>, LD, LD, true, false>(s, sQ + row0 * LD, sK + j * 16 * LD);
      warp_mma<T, DP, FragARow<T>, FragBCol<T>, LD, LD, true, false>(dp, sdO + row0 * LD, sV + j * 16 * LD);
      wmma::store_matrix_sync(sS + row0 * LDS + j * 16, s, LDS, wmma::mem_row_major);
      wmma::store_matrix_sync(sdP + row0 * LDS + j * 16, dp, LDS, wmma::mem_row_major);
    }
    __syncwarp();
    const bool needs_mask = (a.causal && n0 + BLOCK > m0) || n0 + BLOCK > S;
    for (int idx = lane; idx < 16 * BLOCK; idx += 32) {
      const int r = row0 + idx / BLOCK, c = idx % BLOCK;
      float p = exp2f(sS[r * LDS + c] * scale_log2 - sLse[r]);
      if (needs_mask && (n0 + c >= S || m0 + r >= S || (a.causal && n0 + c > m0 + r))) p = 0.f;
      sdS[r * LDP + c] = from_float<T>(p * (sdP[r * LDS + c] - sDelta[r]));
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < DP / 16; ++j)
      warp_mma<T, BLOCK, FragARow<T>, FragBRow<T>, LDP, LD, false, false>(dq_acc[j], sdS + row0 * LDP, sK + j * 16);
  }

  constexpr int LDA = LD;
  float* sAcc = reinterpret_cast<float*>(sQ);  // over the sQ and sdO tiles
  __syncthreads();
#pragma unroll
  for (int j = 0; j < DP / 16; ++j) wmma::store_matrix_sync(sAcc + row0 * LDA + j * 16, dq_acc[j], LDA, wmma::mem_row_major);
  __syncthreads();
  T* dq_head = static_cast<T*>(a.dq) + (b * S * Hq + h) * D;
  store_grad<T, LDA, BLOCK, THREADS, true>(dq_head, Hq * D, sAcc, scale, m0, S, D, a.cos, a.sin, a.cs_stride);
#endif
}

// Non-deterministic mode: dq = rot^-1(dq_accum * scale), one thread per (row, first-half column).
template <typename T>
__global__ void attention_backward_dq_finish(AttentionBackwardArgs a, const float* dq_accum) {
  const int half = static_cast<int>(a.head_dim / 2);
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = a.batch * a.seq_len * a.num_heads * half;
  if (idx >= total) return;
  const int d = static_cast<int>(idx % half);
  const int64_t row = idx / half;  // (b, s, h) flattened, as in the contiguous dq
  const int64_t pos = (row / a.num_heads) % a.seq_len;
  const float scale = rsqrtf(float(a.head_dim));
  const float* acc = dq_accum + row * a.head_dim;
  const float g1 = acc[d] * scale, g2 = acc[d + half] * scale;
  const float c = a.cos[pos * a.cs_stride + d], s = a.sin[pos * a.cs_stride + d];
  T* out = static_cast<T*>(a.dq) + row * a.head_dim;
  out[d] = from_float<T>(g1 * c + g2 * s);
  out[d + half] = from_float<T>(g2 * c - g1 * s);
}

template <typename T, int DP>
int launch(const AttentionBackwardArgs& a, float* workspace, cudaStream_t stream) {
  using C = Tiles<T, DP>;
  float* delta = workspace;
  float* dq_accum = workspace + a.batch * a.num_heads * a.seq_len;
  const int64_t rows = a.batch * a.num_heads * a.seq_len;
  attention_backward_delta<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(a, delta);
  const unsigned blocks = static_cast<unsigned>((a.seq_len + C::BLOCK - 1) / C::BLOCK);
  int err = cudaFuncSetAttribute(attention_backward_kv<T, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(C::kSmem));
  if (err) return err;
  if (!a.deterministic) {
    err = cudaMemsetAsync(dq_accum, 0, sizeof(float) * rows * a.head_dim, stream);
    if (err) return err;
  }
  attention_backward_kv<T, DP><<<dim3(static_cast<unsigned>(a.batch * a.num_kv_heads), blocks), C::THREADS, C::kSmem,
                                 stream>>>(a, delta, dq_accum);
  if (a.deterministic) {
    err = cudaFuncSetAttribute(attention_backward_q<T, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(C::kSmem));
    if (err) return err;
    attention_backward_q<T, DP><<<dim3(static_cast<unsigned>(a.batch * a.num_heads), blocks), C::THREADS, C::kSmem,
                                  stream>>>(a, delta);
  } else {
    const int64_t total = rows * (a.head_dim / 2);
    attention_backward_dq_finish<T><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(a, dq_accum);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_head_dim(const AttentionBackwardArgs& a, float* workspace, cudaStream_t stream) {
  if (a.head_dim <= 64) return launch<T, 64>(a, workspace, stream);
  if (a.head_dim <= 128) return launch<T, 128>(a, workspace, stream);
  if (a.head_dim <= 256) return launch<T, 256>(a, workspace, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int64_t attention_backward_cuda_workspace(const AttentionBackwardArgs& a) {
  const int64_t rows = a.batch * a.num_heads * a.seq_len;
  return rows + (a.deterministic ? 0 : rows * a.head_dim);
}

int attention_backward_cuda(const AttentionBackwardArgs& a, float* workspace, void* stream_ptr) {
  if (a.batch * a.seq_len * a.num_heads * a.head_dim == 0) return 0;
  if (a.head_dim % 2 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads) return static_cast<int>(cudaErrorInvalidValue);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (a.dtype) {
    case DType::F16: return launch_head_dim<__half>(a, workspace, stream);
    case DType::BF16: return launch_head_dim<__nv_bfloat16>(a, workspace, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace llama_fast
