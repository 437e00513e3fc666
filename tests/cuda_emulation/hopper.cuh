// Host stand-in of csrc/cuda/hopper.cuh for the CUDA emulation (emu.h): same names, signatures and
// semantics, found first because tests put -I tests/cuda_emulation before -I csrc/cuda.
//
// The semantics are read from the PTX ISA 8.x (section names), independently of csrc/cuda/hopper.cuh:
//  * "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions" / "Register Fragments
//    and Shared Memory Matrix Layouts", wgmma .m64nNk16 with 16-bit inputs and an fp32 accumulator:
//    a warpgroup is 128 threads, warp w (of 4) owns accumulator rows 16w .. 16w+15; with lane l,
//    g = l / 4, t = l % 4, register d[i] is row 16w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) +
//    2t + (i & 1). The A operand from registers: per warp, mma.m16n8k16's A fragment of rows
//    16w .. 16w+15 (a0: row g, cols 2t, 2t+1; a1: row g+8; a2: row g, cols 2t+8, 2t+9; a3: row g+8).
//  * "Matrix Descriptor Format": bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4,
//    49-51 base offset, 62-63 swizzle (1 = 128B). Only the 128-byte swizzle with base offset 0 is
//    emulated (anything else aborts).
//  * "Shared Memory Matrix Layout", 128B swizzle, 16-bit elements (T = 8 elements per 16 bytes):
//      K-major:  ((8, m), (T, 2)) : ((8T, SBO), (1, T))        -> (mn, k) at start + 128 (mn % 8) + SBO (mn / 8) + 2k
//      MN-major: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) -> (mn, k) at start + 2 (mn % 64) + LBO (mn / 64)
//                                                                   + 128 (k % 8) + SBO (k / 8)
//    then "the swizzling is applied to the address": bits 4-6 ^= bits 7-9 (the 16-byte chunk in a
//    128-byte row is XORed with the row in its 1024-byte atom).
//  * wgmma.mma_async is asynchronous: the accumulators must not be read before wgmma.wait_group
//    retires its group. Here a wgmma computes at issue (reading shared memory then, as the GPU may)
//    but its result lands in the accumulator registers only at the wait that retires its commit
//    group; later wgmmas of the same accumulators chain on the pending value (the in-order
//    accumulation the ISA guarantees). A read before the wait sees the old registers.
//  * mbarrier ("Parallel Synchronization and Communication Instructions: mbarrier"): init sets the
//    expected arrival count; the current phase completes when its pending arrivals reach zero and
//    its tx-count is zero, and the next phase starts (pending = count). arrive.expect_tx adds to the
//    tx-count, then arrives; complete_tx (TMA / bulk copies) subtracts. try_wait.parity P is true
//    while the current phase's parity differs from P (the phase of parity P has completed).
//  * "Data Movement and Conversion Instructions: cp.async.bulk.tensor" with a tiled tensor map: the
//    box is copied in order, innermost coordinate fastest; elements out of bounds (coordinate < 0 or
//    >= dimension) are zeros (OOB fill NONE); the full box size counts toward complete_tx. With
//    CU_TENSOR_MAP_SWIZZLE_128B the inner box dimension is 128 bytes and the destination 1024-byte
//    aligned; box row r's 16-byte chunk c lands at 128 r + 16 (c ^ (r % 8)). Copies land at issue
//    (the earliest a GPU may), then complete_tx.
//  * cp.async.bulk (1-D): `bytes` global -> shared, a multiple of 16, both 16-byte aligned, lands at issue.
//  * cp.reduce.async.bulk .add.f32: queued per thread; bulk commit_group closes a group;
//    wait_group(.read) N performs (reads the source and adds) the oldest groups until at most N
//    remain, so overwriting the source before the wait shows as a wrong sum.
//  * bar.sync id, n: the n threads (a multiple of 32) meet at barrier id; every use of an id within
//    a block must give the same n. setmaxnreg: a no-op here (registers are not emulated).
//
// Runner contract (in addition to emu.h's): per block one EmuHopperBlock; per thread before the
// kernel body: emu_hopper = &block; and after it returns emu_hopper_thread_exit() (before
// emu_thread_exit()), which aborts on wgmma or bulk groups never waited for and drops the thread
// from its warpgroup barrier. Nothing here checks speed, register or shared-memory limits, or the
// GPU memory model beyond what the waits above make visible.
#pragma once
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>

#include "mma.cuh"

#define __grid_constant__

// The emulated tensor map (the real one is the driver's opaque CUtensorMap, made by
// cuTensorMapEncodeTiled on the host): 4 dimensions, innermost first, of 16-bit elements.
struct CUtensorMap {
  const unsigned char* base;
  uint64_t dims[4];
  uint64_t strides[4];  // bytes; strides[0] = 2 (the element size)
  uint32_t box[4];
  bool swizzle128;
};

namespace llama_fast {

struct EmuMbar {
  uint32_t count = 0, pending = 0, phase = 0;
  int64_t tx = 0;
};

struct EmuHopperBlock {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint32_t, EmuMbar> mbars;  // by shared-memory offset
  std::map<int, std::pair<int, std::unique_ptr<std::barrier<>>>> named;
  // warpgroup-collective exchange, like emu.h's per-warp scratch: two slots used alternately
  struct Slot {
    uint32_t tag[128];
    uint64_t desc_a[128], desc_b[128];
    uint32_t a[128][4];
  } slot[4][2];
  std::unique_ptr<std::barrier<>> wg_bar[4];
  explicit EmuHopperBlock(int threads) {
    for (int w = 0; w < 4; ++w) wg_bar[w].reset(new std::barrier<>(w * 128 < threads ? 128 : 1));
  }
};
inline thread_local EmuHopperBlock* emu_hopper;

struct EmuPendingWgmma {
  float* d;
  int n;
  std::vector<float> v;
};
struct EmuBulkReduce {
  float* dst;
  const float* src;
  uint32_t floats;
};
struct EmuHopperThread {
  uint32_t wg_ops = 0;
  std::vector<EmuPendingWgmma> open;               // issued, not yet committed
  std::deque<std::vector<EmuPendingWgmma>> groups;  // committed, not yet retired
  std::vector<EmuBulkReduce> bulk_open;
  std::deque<std::vector<EmuBulkReduce>> bulk_groups;
};
inline thread_local EmuHopperThread emu_hopper_thread;

inline void emu_hopper_thread_exit() {
  EmuHopperThread& t = emu_hopper_thread;
  if (!t.open.empty() || !t.groups.empty()) emu_fail("kernel returned with wgmma results never waited for (wgmma_commit + wgmma_wait)");
  if (!t.bulk_open.empty() || !t.bulk_groups.empty()) emu_fail("kernel returned with bulk reductions never waited for (bulk_commit + bulk_wait)");
  emu_hopper_thread = EmuHopperThread{};
  if (emu_hopper) emu_hopper->wg_bar[threadIdx.x / 128 % 4]->arrive_and_drop();
}

// ---- registers, barriers, fences -------------------------------------------------------------
template <int N> inline void setmaxnreg_inc() { static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8"); }
template <int N> inline void setmaxnreg_dec() { static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8"); }

inline int warpgroup_index() { return int(threadIdx.x) / 128; }

inline void named_barrier_sync(int id, int threads) {
  if (id < 1 || id > 15 || threads <= 0 || threads % 32) emu_fail("named_barrier_sync: id 1..15, threads a multiple of 32");
  std::barrier<>* bar;
  {
    std::lock_guard<std::mutex> lock(emu_hopper->mu);
    auto& e = emu_hopper->named[id];
    if (!e.second) e = {threads, std::make_unique<std::barrier<>>(threads)};
    if (e.first != threads) emu_fail("named_barrier_sync: one barrier id used with different thread counts");
    bar = e.second.get();
  }
  bar->arrive_and_wait();
}

inline void fence_proxy_async_shared() {}
inline void fence_proxy_async_global() {}

template <typename T> inline float unpack_lo(uint32_t r) { return emu_detail::to_float<T>(emu_detail::half_of(r, 0)); }
template <typename T> inline float unpack_hi(uint32_t r) { return emu_detail::to_float<T>(emu_detail::half_of(r, 1)); }

// ---- mbarrier ----------------------------------------------------------------------------------
namespace emu_detail {
inline EmuMbar& mbar_of(uint64_t* bar, const char* what) {  // caller holds emu_hopper->mu
  if (reinterpret_cast<uintptr_t>(bar) % 8) emu_fail("mbarrier not 8-byte aligned");
  auto it = emu_hopper->mbars.find(smem_addr(bar));
  if (it == emu_hopper->mbars.end()) emu_fail(what);
  return it->second;
}
inline void mbar_settle(EmuMbar& m) {  // caller holds the lock
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.count;
    emu_hopper->cv.notify_all();
  }
}
inline void mbar_arrive_tx(uint64_t* bar, int64_t expect) {
  std::lock_guard<std::mutex> lock(emu_hopper->mu);
  EmuMbar& m = mbar_of(bar, "mbarrier arrive on an uninitialized mbarrier");
  if (m.pending == 0) emu_fail("mbarrier: more arrivals than its count in one phase");
  m.tx += expect;
  --m.pending;
  mbar_settle(m);
}
inline void mbar_complete_tx(uint64_t* bar, int64_t bytes) {
  std::lock_guard<std::mutex> lock(emu_hopper->mu);
  EmuMbar& m = mbar_of(bar, "complete_tx on an uninitialized mbarrier");
  m.tx -= bytes;
  if (m.pending == 0 && m.tx < 0) emu_fail("mbarrier: more transaction bytes completed than expected");
  mbar_settle(m);
}
inline int wait_timeout_s() {
  const char* s = std::getenv("LLAMA_FAST_EMU_WAIT_TIMEOUT");
  return s ? std::atoi(s) : 60;
}
}  // namespace emu_detail

inline void mbar_init(uint64_t* bar, uint32_t count) {
  emu_check_smem(bar, 8, "mbarrier outside shared memory");
  if (count == 0) emu_fail("mbarrier init count 0");
  std::lock_guard<std::mutex> lock(emu_hopper->mu);
  emu_hopper->mbars[smem_addr(bar)] = EmuMbar{count, count, 0, 0};
}
inline void mbar_init_fence() {}
inline void mbar_arrive(uint64_t* bar) { emu_detail::mbar_arrive_tx(bar, 0); }
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { emu_detail::mbar_arrive_tx(bar, bytes); }
inline bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  std::lock_guard<std::mutex> lock(emu_hopper->mu);
  return (emu_detail::mbar_of(bar, "try_wait on an uninitialized mbarrier").phase & 1) != (parity & 1);
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  std::unique_lock<std::mutex> lock(emu_hopper->mu);
  EmuMbar& m = emu_detail::mbar_of(bar, "wait on an uninitialized mbarrier");
  if (!emu_hopper->cv.wait_for(lock, std::chrono::seconds(emu_detail::wait_timeout_s()),
                               [&] { return (m.phase & 1) != (parity & 1); }))
    emu_fail("mbarrier wait timed out (a phase that never completes: deadlock)");
}

// ---- TMA and bulk copies -----------------------------------------------------------------------
inline void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  unsigned char* d = static_cast<unsigned char*>(dst);
  const uint32_t* box = map->box;
  const size_t bytes = size_t(box[0]) * box[1] * box[2] * box[3] * 2;
  emu_check_smem(d, bytes, "TMA destination outside shared memory");
  if (map->swizzle128 && (box[0] * 2 != 128 || smem_addr(d) % 1024))
    emu_fail("TMA 128B swizzle: inner box of 128 bytes and a 1024-byte aligned destination");
  if (!map->swizzle128 && smem_addr(d) % 128) emu_fail("TMA destination not 128-byte aligned");
  const int c[4] = {c0, c1, c2, c3};
  size_t lin = 0;
  for (uint32_t i3 = 0; i3 < box[3]; ++i3)
    for (uint32_t i2 = 0; i2 < box[2]; ++i2)
      for (uint32_t i1 = 0; i1 < box[1]; ++i1)
        for (uint32_t i0 = 0; i0 < box[0]; ++i0, lin += 2) {
          const int64_t x[4] = {int64_t(c[0]) + i0, int64_t(c[1]) + i1, int64_t(c[2]) + i2, int64_t(c[3]) + i3};
          bool in = true;
          int64_t off = 0;
          for (int k = 0; k < 4; ++k) {
            in = in && x[k] >= 0 && x[k] < int64_t(map->dims[k]);
            off += x[k] * int64_t(map->strides[k]);
          }
          const size_t to = map->swizzle128 ? lin ^ (((lin >> 7) & 7) << 4) : lin;
          if (in) std::memcpy(d + to, map->base + off, 2);
          else std::memset(d + to, 0, 2);
        }
  emu_detail::mbar_complete_tx(bar, int64_t(bytes));
}

inline void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  if (bytes % 16 || reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    emu_fail("bulk_load: size a multiple of 16, addresses 16-byte aligned");
  emu_check_smem(dst, bytes, "bulk_load destination outside shared memory");
  std::memcpy(dst, src, bytes);
  emu_detail::mbar_complete_tx(bar, bytes);
}

inline void bulk_reduce_add_f32(float* dst, const float* src, uint32_t bytes) {
  if (bytes % 16 || reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    emu_fail("bulk_reduce_add_f32: size a multiple of 16, addresses 16-byte aligned");
  emu_check_smem(src, bytes, "bulk_reduce_add_f32 source outside shared memory");
  emu_hopper_thread.bulk_open.push_back({dst, src, bytes / 4});
}
inline void bulk_commit() {
  emu_hopper_thread.bulk_groups.push_back(std::move(emu_hopper_thread.bulk_open));
  emu_hopper_thread.bulk_open.clear();
}
namespace emu_detail {
inline void bulk_retire(size_t keep) {
  auto& q = emu_hopper_thread.bulk_groups;
  while (q.size() > keep) {
    for (const auto& r : q.front())
      for (uint32_t i = 0; i < r.floats; ++i) std::atomic_ref<float>(r.dst[i]).fetch_add(r.src[i]);
    q.pop_front();
  }
}
}  // namespace emu_detail
template <int N> inline void bulk_wait_read() { emu_detail::bulk_retire(N); }
template <int N> inline void bulk_wait() { emu_detail::bulk_retire(N); }

// ---- a global semaphore ------------------------------------------------------------------------
inline int ld_acquire(const int* p) { return std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire); }
inline void red_release_add(int* p, int v) { std::atomic_ref<int>(*p).fetch_add(v, std::memory_order_release); }

// ---- wgmma -------------------------------------------------------------------------------------
inline uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

inline void wgmma_fence() {}
inline void wgmma_commit() {
  emu_hopper_thread.groups.push_back(std::move(emu_hopper_thread.open));
  emu_hopper_thread.open.clear();
}
template <int N>
inline void wgmma_wait() {
  auto& q = emu_hopper_thread.groups;
  while (q.size() > size_t(N)) {
    for (const auto& p : q.front()) std::memcpy(p.d, p.v.data(), sizeof(float) * p.n);
    q.pop_front();
  }
}
template <int K> inline void fence_operand(float (&)[K]) {}

namespace emu_detail {

enum : uint32_t { kEmuWgmmaSS = 1, kEmuWgmmaRS = 2 };

// The 16-bit element (mn, k) of an operand described by `desc` (K-major or, with trans, MN-major).
inline uint16_t desc_element(uint64_t desc, int mn, int k, bool trans) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4, lbo = uint32_t((desc >> 16) & 0x3FFF) << 4,
                 sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  if ((desc >> 62) != 1 || ((desc >> 49) & 7)) emu_fail("wgmma descriptor: only the 128B swizzle with base offset 0 is emulated");
  uint32_t off = trans ? start + 2 * (mn % 64) + lbo * (mn / 64) + 128 * (k % 8) + sbo * (k / 8)
                       : start + 128 * (mn % 8) + sbo * (mn / 8) + 2 * k;
  off ^= ((off >> 7) & 7) << 4;
  if (emu_smem_bytes && off + 2 > emu_smem_bytes) emu_fail("wgmma operand outside shared memory");
  return load16(emu_smem_ptr + off);
}

// Publishes this thread's operands for a warpgroup-collective op and waits for its warpgroup.
template <typename Fill>
inline EmuHopperBlock::Slot& wg_exchange(uint32_t kind, Fill fill) {
  if (!emu_hopper) emu_fail("warpgroup op without an EmuHopperBlock (runner contract)");
  const uint32_t wg = threadIdx.x / 128, t = threadIdx.x % 128, op = emu_hopper_thread.wg_ops++;
  auto& s = emu_hopper->slot[wg][op % 2];
  s.tag[t] = (kind << 24) | (op & 0xffffffu);
  fill(s, t);
  emu_hopper->wg_bar[wg]->arrive_and_wait();
  for (int l = 0; l < 128; ++l)
    if (s.tag[l] != s.tag[t]) emu_fail("threads of a warpgroup in different wgmma ops (or one has returned)");
  return s;
}

// d (+)= A B for this thread's accumulator registers; A(row, k) and B(k, col) read by the callers.
template <typename T, int N, typename FA, typename FB>
inline void wgmma_issue(float* d, int accumulate, FA A, FB B) {
  auto& th = emu_hopper_thread;
  const float* base = d;  // the latest pending value of these registers, if any, else the registers
  for (auto it = th.open.rbegin(); it != th.open.rend(); ++it)
    if (it->d == d) { base = it->v.data(); goto found; }
  for (auto g = th.groups.rbegin(); g != th.groups.rend(); ++g)
    for (auto it = g->rbegin(); it != g->rend(); ++it)
      if (it->d == d) { base = it->v.data(); goto found; }
found:
  const int t = int(threadIdx.x % 128), w = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
  float a[2][16];
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) a[h][k] = to_float<T>(A(16 * w + g + 8 * h, k));
  float b[N / 4][16];  // this thread's columns 8 c + 2 q + j (index 2 c + j) of B
  for (int c = 0; c < N / 8; ++c)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 16; ++k) b[2 * c + j][k] = to_float<T>(B(k, 8 * c + 2 * q + j));
  std::vector<float> out(N / 2);
  for (int i = 0; i < N / 2; ++i) {
    const int h = (i >> 1) & 1, bc = 2 * (i >> 2) + (i & 1);
    float acc = accumulate ? base[i] : 0.f;
    for (int k = 0; k < 16; ++k) acc += a[h][k] * b[bc][k];
    out[i] = acc;
  }
  th.open.push_back({d, N / 2, std::move(out)});
}

}  // namespace emu_detail

template <typename T, int TRANS_A, int TRANS_B>
inline void wgmma_ss_n64(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  using namespace emu_detail;
  auto& s = wg_exchange(kEmuWgmmaSS, [&](EmuHopperBlock::Slot& s, uint32_t t) { s.desc_a[t] = desc_a; s.desc_b[t] = desc_b; });
  for (int l = 0; l < 128; ++l)
    if (s.desc_a[l] != desc_a || s.desc_b[l] != desc_b) emu_fail("wgmma: descriptors differ across the warpgroup");
  wgmma_issue<T, 64>(d, accumulate, [&](int m, int k) { return desc_element(desc_a, m, k, TRANS_A); },
                     [&](int k, int n) { return desc_element(desc_b, n, k, TRANS_B); });
}

template <typename T, int N, int TRANS_B>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N 64 or 128");
  using namespace emu_detail;
  auto& s = wg_exchange(kEmuWgmmaRS, [&](EmuHopperBlock::Slot& s, uint32_t t) {
    s.desc_b[t] = desc_b;
    for (int i = 0; i < 4; ++i) s.a[t][i] = a[i];
  });
  for (int l = 0; l < 128; ++l)
    if (s.desc_b[l] != desc_b) emu_fail("wgmma: descriptors differ across the warpgroup");
  // A(row, k): warp row / 16, lane 4 (row % 8) + (k % 8) / 2, register 2 (k >= 8) + (row % 16 >= 8), half k % 2
  wgmma_issue<T, N>(d, accumulate,
                    [&](int row, int k) {
                      const int r = row % 16;
                      return half_of(s.a[32 * (row / 16) + 4 * (r % 8) + (k % 8) / 2][2 * (k >= 8) + (r >= 8)], k % 2);
                    },
                    [&](int k, int n) { return desc_element(desc_b, n, k, TRANS_B); });
}

}  // namespace llama_fast
