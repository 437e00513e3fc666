// Host emulation of the CUDA device API the csrc/cuda kernels use, so tests can run them on a CPU
// (tests/test_cuda_emulation.py). Force-included (g++ -include emu.h) before the kernel source.
// Each CUDA thread of a block is a std::thread; __syncthreads / __syncwarp are std::barrier waits;
// shared memory is one host buffer per block. fp16 is _Float16, bf16 is rounded to nearest even.
// Warp-collective primitives (ldmatrix, mma.sync: tests/cuda_emulation/mma.cuh) exchange data
// through a per-warp scratch area (EmuWarpScratch) and the warp barrier, and cp.async copies are
// queued per thread (EmuCpAsync); a grid runner must set up both (see "Runner contract" below).
// This checks indexing, masking, operand layouts and barrier placement, not speed, not the memory
// model of a GPU, and not the shared-memory or register limits of one.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <deque>
#include <vector>
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
#define LLAMA_FAST_CUDA_EMULATION 1
inline thread_local std::barrier<>* emu_block_barrier;
// A cooperative launch's grid-wide barrier: the runner starts every block of the grid at once and
// points each thread at one barrier over all of their threads (nullptr: not a cooperative launch).
inline thread_local std::barrier<>* emu_grid_barrier;
inline thread_local std::barrier<>* emu_warp_barrier;
inline thread_local unsigned char* emu_smem_ptr;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barrier->arrive_and_wait(); }
[[noreturn]] inline void emu_fail(const char* what);
inline void grid_sync() {
  if (!emu_grid_barrier) emu_fail("grid_sync outside a cooperative launch (its blocks would deadlock on a GPU)");
  emu_grid_barrier->arrive_and_wait();
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// Round-to-nearest product and difference that a compiler may not fuse into a multiply-add.
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }  // one rounding
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline void __trap() { std::abort(); }
constexpr int cudaErrorInvalidValue = 1;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x)
inline float emu_f(float v) { return v; }
inline float emu_f(__half v) { return __half2float(v); }
inline float emu_f(__nv_bfloat16 v) { return __bfloat162float(v); }


// ---- Runner contract (driver.cpp's run_grid; tests/cuda_emulation/mma_selftest.cpp) ----------
// Per block: one EmuWarpScratch per warp (threads / 32 of them, block size a multiple of 32 when
// warp-collective ops are used). Per thread, before the kernel body:
//   emu_warp_scratch = &scratch[t / 32]; emu_smem_bytes = <dynamic shared memory bytes>;
// and after it returns: emu_thread_exit();  (aborts if cp.async copies were never waited for, and
// drops the thread from its warp barrier).

// Data exchanged by one warp-collective op: each lane writes its own slot, all lanes pass the warp
// barrier, each lane reads the slots it needs. Two buffers used alternately make one barrier per op
// enough: a lane writes buffer i % 2 for op i only after the barrier of op i - 1, which every lane
// reaches only once it has finished reading buffer i % 2 for op i - 2.
enum EmuWarpOp : uint32_t { kEmuLdmatrix = 1, kEmuLdmatrixTrans, kEmuMma, kEmuShfl };
struct EmuWarpScratch {
  struct Slot {
    uint32_t tag[32];         // (op kind << 24) | op count: all 32 lanes must be in the same op
    const unsigned char* row[32];  // ldmatrix row addresses
    uint32_t a[32][4], b[32][2];   // mma operand registers
    float f[32];                   // __shfl_xor_sync values
  } slot[2];
};
inline thread_local EmuWarpScratch* emu_warp_scratch;
inline thread_local uint32_t emu_warp_ops;  // warp-collective ops this thread has executed
inline thread_local size_t emu_smem_bytes;  // dynamic shared memory of the block; 0: not checked

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, threadIdx.x);
  std::abort();
}

// `bytes` at p must lie in the block's dynamic shared memory (when its size is known).
inline void emu_check_smem(const void* p, size_t bytes, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (emu_smem_bytes && (c < emu_smem_ptr || c + bytes > emu_smem_ptr + emu_smem_bytes)) emu_fail(what);
}

// Publishes this lane's slot for collective op `kind` and waits for the warp; returns the slot all
// lanes wrote, after checking that every lane is in the same op (PTX .aligned: all 32 lanes must
// execute the same instruction, and a lane sitting in __syncwarp or in another op is a bug).
template <typename Fill>
inline EmuWarpScratch::Slot& emu_warp_exchange(uint32_t kind, Fill fill) {
  if (!emu_warp_scratch) emu_fail("warp-collective op without a per-warp scratch (runner contract)");
  const uint32_t lane = threadIdx.x % 32, op = emu_warp_ops++;
  EmuWarpScratch::Slot& s = emu_warp_scratch->slot[op % 2];
  s.tag[lane] = (kind << 24) | (op & 0xffffffu);
  fill(s, lane);
  emu_warp_barrier->arrive_and_wait();
  for (int l = 0; l < 32; ++l)
    if (s.tag[l] != s.tag[lane]) emu_fail("lanes of a warp in different warp-collective ops (or one has returned)");
  return s;
}

// cp.async copies of this thread: `open` not yet committed, `groups` committed and not yet waited for.
struct EmuCpAsync {
  struct Copy { unsigned char* dst; const unsigned char* src; int src_bytes; };
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};
inline thread_local EmuCpAsync emu_cp_async;

inline void emu_thread_exit() {
  bool pending = !emu_cp_async.open.empty();
  for (const auto& g : emu_cp_async.groups) pending = pending || !g.empty();
  if (pending) emu_fail("kernel returned with cp.async copies never waited for (cp_async_commit + cp_async_wait<0>)");
  emu_cp_async = EmuCpAsync{};
  // A returned lane no longer takes part in warp barriers: the rest of its warp then fails the
  // check in emu_warp_exchange (or passes a __syncwarp) instead of waiting for it forever.
  if (emu_warp_barrier) emu_warp_barrier->arrive_and_drop();
}

// Full-warp butterfly shuffle: lane l receives v of lane l ^ lane_mask (width 32 only).
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32 || lane_mask < 0 || lane_mask > 31)
    emu_fail("__shfl_xor_sync: only the full mask, width 32 and lane_mask 0..31 are emulated");
  auto& s = emu_warp_exchange(kEmuShfl, [&](EmuWarpScratch::Slot& s, uint32_t lane) { s.f[lane] = v; });
  return s.f[(threadIdx.x % 32) ^ uint32_t(lane_mask)];
}
