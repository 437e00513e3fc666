// Host emulation of the CUDA device API the csrc/cuda kernels use, so tests can run them on a CPU
// (tests/test_cuda_emulation.py). Force-included (g++ -include emu.h) before the kernel source.
// Each CUDA thread of a block is a std::thread; __syncthreads / __syncwarp are std::barrier waits;
// shared memory is one host buffer per block. fp16 is _Float16, bf16 is rounded to nearest even.
// This checks indexing, masking, operand layouts and barrier placement, not speed, not the memory
// model of a GPU, and not the shared-memory or register limits of one.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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
inline thread_local std::barrier<>* emu_block_barrier;
inline thread_local std::barrier<>* emu_warp_barrier;
inline thread_local unsigned char* emu_smem_ptr;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barrier->arrive_and_wait(); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float __shfl_xor_sync(unsigned, float, int) { std::abort(); }
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
