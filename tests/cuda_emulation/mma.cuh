// Host stand-in of csrc/cuda/mma.cuh for the CUDA emulation (emu.h): same names, signatures and
// semantics, found first because tests put -I tests/cuda_emulation before -I csrc/cuda.
//
// The semantics are read from the PTX ISA, independently of csrc/cuda/mma.cuh's comment:
//  * "Warp-level matrix load instruction: ldmatrix": for .x4, threads 8j .. 8j+7 give the addresses
//    of rows 0..7 of matrix j (each row 8 x 16 bits, 16-byte aligned); every thread receives one
//    32-bit fragment per matrix in register j, "a group of four consecutive threads loads an entire
//    row": lane l gets row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1, lower column in the low 16
//    bits. .trans loads the matrix column-major, i.e. lane l gets M[2 (l % 4)][l / 4] (low half) and
//    M[2 (l % 4) + 1][l / 4] (high half).
//  * "Matrix Fragments for mma.m16n8k16 with floating point type" (groupID g = lane >> 2,
//    threadID_in_group t = lane % 4, elements low to high, two per 32-bit register):
//      A a0..a7: row g for a0, a1, a4, a5, g + 8 otherwise; col 2t + (i & 1), + 8 for i >= 4
//      B b0..b3: row 2t + (i & 1), + 8 for i >= 2; col g
//      C c0..c3: row g for i < 2, g + 8 otherwise; col 2t + (i & 1)
//  * cp.async (.cg, cp-size 16): copies src-size bytes, zero-fills the rest of the 16; commit_group
//    batches this thread's uncommitted copies into a group; wait_group N waits until at most the N
//    most recent groups of this thread are pending; the writes are visible to the issuing thread
//    after the wait, to other threads after a barrier that follows it. Empty groups are complete.
//
// Warp-collective ops exchange registers through emu.h's per-warp scratch (emu_warp_exchange): a
// lane contributes only its own row address / registers and computes only its own results. mma
// rounds nothing: operands are 16-bit values, products are exact in fp32 and are summed in fp32 in
// the fixed order c + a[.][0] b[0][.] + ... + a[.][15] b[15][.] (the GPU's order is unspecified).
//
// cp.async has two modes, LLAMA_FAST_EMU_CP_ASYNC=late (default) or early. A GPU completes a copy
// anywhere between its issue and the wait that covers it; the modes are the two extremes:
//  * late: a copy is performed only when cp_async_wait<N> retires its group, so reading the
//    destination before the wait (or, from another thread, before the barrier after the wait) sees
//    the old bytes;
//  * early: the copy happens at issue, so prefetching into a buffer that other threads still read
//    (a missing __syncthreads before the buffer's reuse) corrupts what they read.
// Run a kernel under both. In either mode a thread that returns with copies never waited for aborts
// (emu_thread_exit). Addresses are checked: 16-byte alignment of ldmatrix rows and of both cp.async
// addresses, and that ldmatrix rows and cp.async destinations lie in the block's dynamic shared
// memory (when the runner set emu_smem_bytes).
//
// Not checked: speed, register and shared-memory limits, bank conflicts, the GPU memory model
// (a race between threads is at most seen when the host threads happen to interleave badly), and
// the compiler reordering plain shared-memory accesses across these inline-asm wrappers (the real
// ones carry no "memory" clobber; __syncthreads does).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace llama_fast {

inline uint32_t smem_addr(const void* p) {
  emu_check_smem(p, 1, "smem_addr of an address outside shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu_smem_ptr);
}

namespace emu_detail {

inline uint16_t load16(const unsigned char* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16) emu_fail("ldmatrix row address not 16-byte aligned");
  emu_check_smem(row, 16, "ldmatrix row outside shared memory");
  auto& s = emu_warp_exchange(trans ? kEmuLdmatrixTrans : kEmuLdmatrix, [&](EmuWarpScratch::Slot& s, uint32_t lane) {
    s.row[lane] = static_cast<const unsigned char*>(row);
  });
  const uint32_t lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    const unsigned char* const* rows = s.row + 8 * j;  // rows 0..7 of matrix j
    uint16_t lo, hi;
    if (trans) { lo = load16(rows[2 * t] + 2 * g); hi = load16(rows[2 * t + 1] + 2 * g); }
    else { lo = load16(rows[g] + 4 * t); hi = load16(rows[g] + 4 * t + 2); }
    r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

template <typename T> float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) { _Float16 h; std::memcpy(&h, &bits, 2); return float(h); }
  else { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
}

inline uint16_t half_of(uint32_t reg, int i) { return uint16_t(i ? reg >> 16 : reg & 0xffffu); }

}  // namespace emu_detail

// Four 8 x 8 matrices of 16-bit elements from shared memory; `row` is this lane's row address.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu_detail::ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emu_detail::ldmatrix_x4(r, row, true); }

// d += a * b for one 16 x 8 x 16 tile, fp32 accumulate; T (__half or __nv_bfloat16) is the operand type.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816 operand type");
  using namespace emu_detail;
  auto& s = emu_warp_exchange(kEmuMma, [&](EmuWarpScratch::Slot& s, uint32_t lane) {
    for (int i = 0; i < 4; ++i) s.a[lane][i] = a[i];
    for (int i = 0; i < 2; ++i) s.b[lane][i] = b[i];
  });
  // A[row][k]: element a_i of lane 4 (row % 8) + (k % 8) / 2 with i = 4 (k >= 8) + 2 (row >= 8) + k % 2,
  // i.e. register i / 2 = 2 (k >= 8) + (row >= 8), half k % 2. B[k][col]: element b_i of lane
  // 4 col + (k % 8) / 2 with i = 2 (k >= 8) + k % 2, i.e. register k >= 8, half k % 2.
  auto A = [&](int row, int k) {
    return to_float<T>(half_of(s.a[4 * (row % 8) + (k % 8) / 2][2 * (k >= 8) + (row >= 8)], k % 2));
  };
  auto B = [&](int k, int col) { return to_float<T>(half_of(s.b[4 * col + (k % 8) / 2][k >= 8], k % 2)); };
  const int lane = int(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Two floats rounded to T and packed into one register, `lo` in the low 16 bits.
template <typename T>
inline uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "pack2 type");
  uint16_t l, h;
  if constexpr (std::is_same_v<T, __half>) {
    const __half a = __float2half_rn(lo), b = __float2half_rn(hi);
    std::memcpy(&l, &a, 2); std::memcpy(&h, &b, 2);
  } else {
    l = __float2bfloat16_rn(lo).bits; h = __float2bfloat16_rn(hi).bits;
  }
  return uint32_t(l) | (uint32_t(h) << 16);
}

namespace emu_detail {
inline bool cp_async_early() {
  static const bool early = [] {
    const char* m = std::getenv("LLAMA_FAST_EMU_CP_ASYNC");
    if (!m || !std::strcmp(m, "late")) return false;
    if (!std::strcmp(m, "early")) return true;
    std::fprintf(stderr, "cuda emulation: LLAMA_FAST_EMU_CP_ASYNC must be late or early, got %s\n", m);
    std::abort();
  }();
  return early;
}
inline void perform(const EmuCpAsync::Copy& c) {
  if (c.src_bytes) std::memcpy(c.dst, c.src, size_t(c.src_bytes));  // src_bytes 0: src is not read
  std::memset(c.dst + c.src_bytes, 0, size_t(16 - c.src_bytes));
}
}  // namespace emu_detail

// 16 bytes global -> shared without passing through registers; the first `src_bytes` (0 or 16)
// bytes come from `src`, the rest are zero. Both addresses 16-byte aligned.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    emu_fail("cp_async_16 address not 16-byte aligned");
  if (src_bytes != 0 && src_bytes != 16) emu_fail("cp_async_16 src_bytes must be 0 or 16");
  emu_check_smem(dst, 16, "cp_async_16 destination outside shared memory");
  const EmuCpAsync::Copy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes};
  if (emu_detail::cp_async_early()) emu_detail::perform(c);
  emu_cp_async.open.push_back(c);
}

inline void cp_async_commit() {
  emu_cp_async.groups.push_back(std::move(emu_cp_async.open));
  emu_cp_async.open.clear();
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait<N>: N >= 0");
  auto& q = emu_cp_async.groups;
  while (q.size() > size_t(N)) {
    if (!emu_detail::cp_async_early())
      for (const auto& c : q.front()) emu_detail::perform(c);
    q.pop_front();
  }
}

}  // namespace llama_fast
