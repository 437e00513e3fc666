// Device helpers shared by the CUDA kernels: dtype conversion, aligned vector packs, reductions.
// Plain CUDA (no torch), compiled for sm_80 and newer.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../llama_fast.h"

#ifndef LLAMA_FAST_CUDA_EMULATION  // the host emulation (tests/cuda_emulation/emu.h) has its own grid_sync
#include <cooperative_groups.h>
#endif

namespace llama_fast {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One rotated pair (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) in fp32, rounded to T, with its roundings written
// out: r1 = fma(x1, c, -rn(x2 s)), r2 = fma(x2, c, rn(x1 s)). The Triton kernels (kernels/attention.py
// _load_rotated) write the same fmas, so rot(q), rot(k) here are bitwise the forward's matmul operands; left
// to the compilers, nvcc fused x2 c + x1 s as fma(x1, s, rn(x2 c)) where Triton fused fma(x2, c, rn(x1 s)),
// and ~1e-4 of fp16 second-half elements rounded apart (the backward's S2 was then not the forward's).
// Every CUDA rotation of q and k goes through here, so a row rotated in a kernel's prologue equals the
// workspace copy.
template <typename T>
__device__ __forceinline__ void rotate_pair(T a, T b, float c, float s, T& r1, T& r2) {
  const float x1 = to_float(a), x2 = to_float(b);
  r1 = from_float<T>(__fmaf_rn(x1, c, -__fmul_rn(x2, s)));
  r2 = from_float<T>(__fmaf_rn(x2, c, __fmul_rn(x1, s)));
}

// Rotates one row of 2 * half elements by RoPE (one warp; `lane` of 32): dst = rot(src), rounded to T.
// The attention backwards' prep: rot(q) and rot(k) as the forward feeds them to its matmuls.
template <typename T>
__device__ __forceinline__ void rotate_row(T* dst, const T* src, const float* cos, const float* sin, int half,
                                           int lane) {
  for (int d = lane; d < half; d += 32) rotate_pair(src[d], src[d + half], cos[d], sin[d], dst[d], dst[d + half]);
}

// N elements of T moved as one access of up to 16 bytes (a 32-byte pack becomes two 16-byte
// accesses, so callers only ever need 16-byte alignment).
constexpr int pack_align(int bytes) { return bytes < 16 ? bytes : 16; }

template <typename T, int N>
struct alignas(pack_align(sizeof(T) * N)) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// 2^x on the special-function unit (ex2.approx, relative error about 2^-22; results below the
// normal range flush to zero). Host builds (the CPU emulation) use exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// p[0] += a and p[1] += b with p 8-byte aligned: one vector reduction on sm_90, two scalar ones
// before it.
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of THREADS threads (a multiple of 32); every thread gets the result.
// `scratch` holds THREADS / 32 floats; the call synchronizes the block twice.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int WARPS = THREADS / 32;
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) total += scratch[i];
  return total;
}

#ifndef LLAMA_FAST_CUDA_EMULATION
// Waits for every block of the grid; global writes before it are visible to every block after it. Only in
// kernels started with cudaLaunchCooperativeKernel, whose grid the device holds at once.
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
#endif

// Calls f with the CUDA type matching a DType (float, __half or __nv_bfloat16) as a tag value.
template <typename F>
inline int dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(float{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace llama_fast
