// Hopper (sm_90a) primitives as thin inline-PTX wrappers, in the style of mma.cuh: warpgroup MMA
// (wgmma) with shared-memory descriptors, mbarriers, TMA tile loads, bulk copies and the bulk
// reduce-add, named barriers, setmaxnreg. Only csrc/cuda/attention_backward_sm90.cu includes it, and
// only nvcc -arch=sm_90a compiles it (wgmma and setmaxnreg exist on sm_90a alone).
//
// Layout rules, from the PTX ISA (section names of the PTX ISA 8.x manual):
//  * "Register Fragments and Shared Memory Matrix Layouts" for wgmma .m64nNk16: a warpgroup is 4
//    consecutive warps (128 threads, the first warp's index a multiple of 4); warp w of it owns rows
//    16w .. 16w+15. With lane l, g = l / 4, t = l % 4, the fp32 accumulator register d[i] holds
//      row 16w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2t + (i % 2)            (N / 2 registers)
//    and the 16-bit A operand from registers is mma.m16n8k16's A fragment per warp:
//      a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//    so accumulator registers 8kk .. 8kk+7 (columns 16kk .. 16kk+15), rounded and packed in pairs,
//    are the A operand of k-step kk (the flash-attention register reuse, as with mma.sync).
//  * "Matrix Descriptor Format": 64-bit; bits 0-13 start address >> 4, 16-29 leading-dimension
//    byte offset (LBO) >> 4, 32-45 stride-dimension byte offset (SBO) >> 4, 49-51 base offset (0:
//    the 128-byte-swizzled tiles here start 1024-byte aligned), 62-63 swizzle mode (1 = 128 bytes).
//  * "Shared Memory Matrix Layout" with 128-byte swizzling, for 16-bit elements (T = 8 elements =
//    16 bytes), as byte offsets before the swizzle is applied to the address:
//      K-major  (K contiguous): element (mn, k), k < 16 of one instruction:
//                 start + (mn % 8) * 128 + (mn / 8) * SBO + 2k                 (LBO unused)
//      MN-major (M or N contiguous, "transposed", imm-trans = 1): element (mn, k):
//                 start + 2 (mn % 64) + (mn / 64) * LBO + (k % 8) * 128 + (k / 8) * SBO
//    and the 128-byte swizzle XORs address bits 4-6 (the 16-byte chunk) with bits 7-9 (the row in
//    a 1024-byte atom). This is the placement TMA's CU_TENSOR_MAP_SWIZZLE_128B gives a box whose
//    inner dimension is 128 bytes: box row r (all outer coordinates flattened), chunk c at
//    r * 128 + ((c ^ (r % 8)) * 16), from a 1024-byte aligned destination. A tile of 16-bit values
//    with D columns is therefore stored as D / 64 panels of [rows][64], each loaded by one TMA copy.
//  * mbarrier ("Parallel Synchronization and Communication Instructions: mbarrier"): a phase
//    completes when its pending arrival count reaches 0 and its transaction count is 0; then the
//    next phase starts with the init count. try_wait.parity P is true once the phase of parity P has
//    completed, i.e. while the current phase's parity differs from P.
//  * cp.async.bulk.tensor: the whole box counts toward complete_tx, out-of-bounds elements
//    (coordinates < 0 or >= the dimension) are written as zeros (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE).
//  * cp.reduce.async.bulk .add.f32: element-wise global += shared; the source may be overwritten
//    after cp.async.bulk.wait_group.read, the global result is complete after cp.async.bulk.wait_group.
//
// tests/cuda_emulation/hopper.cuh is the host stand-in (same names and semantics) and
// tests/test_cuda_hopper_emulation.py checks each primitive there against plain loops.
#pragma once
#include <cuda.h>

#include <type_traits>

#include "mma.cuh"

namespace llama_fast {

// ---- registers, barriers, fences -------------------------------------------------------------
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// threadIdx.x / 128, made warp-uniform for the compiler (a branch on it is then not divergent,
// which keeps ptxas from serializing the wgmmas behind it).
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0); }

// bar.sync on barrier `id` (1..15; 0 is __syncthreads') for `threads` threads, a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Generic-proxy shared-memory writes become visible to the async proxy (wgmma, TMA, bulk copies).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// The low / high 16-bit value of a pack2 register as a float.
template <typename T>
__device__ __forceinline__ float unpack_lo(uint32_t r) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(r << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(r & 0xffffu)));
}
template <typename T>
__device__ __forceinline__ float unpack_hi(uint32_t r) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(r & 0xffff0000u);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(r >> 16)));
}

// ---- mbarrier ----------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes initialized mbarriers visible to the async proxy and the other threads (with a __syncthreads after).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// One arrival that also expects `bytes` more of transactions (TMA / bulk copies) in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
// Waits until the phase of parity `parity` has completed.
// The retry loop is inside the asm, so the compiler sees no data-dependent (divergent) branch.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT_%=;\n}\n" ::"r"(
          smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---- TMA and bulk copies -----------------------------------------------------------------------
// One box of a 4-D tensor map (coordinates innermost first) into shared memory; the box's bytes
// complete on `bar`. `map` lives in kernel-parameter space (__grid_constant__).
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared, completing on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
// global[0 .. bytes / 4) += shared[...] (fp32), asynchronously, in this thread's current bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(smem_addr(src)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// At most N of this thread's bulk groups still reading their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// At most N of this thread's bulk groups not yet complete (their global writes done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- a global semaphore (deterministic ordering of the dQ reductions) --------------------------
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("fence.proxy.async.global;\nred.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// ---- wgmma -------------------------------------------------------------------------------------
// A descriptor of a 128-byte-swizzled operand at `p` (see "Matrix Descriptor Format" above).
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait.
template <int K>
__device__ __forceinline__ void fence_operand(float (&acc)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

#define LLAMA_FAST_WGMMA_SS_N64(TY)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"  \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
               "%32, %33, p, 1, 1, %35, %36;\n}\n"                                     \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))

#define LLAMA_FAST_WGMMA_RS_N64(TY)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"  \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
               "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                     \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))

#define LLAMA_FAST_WGMMA_RS_N128(TY)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"  \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"  \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"  \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
               "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                     \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))

// d[64 x N] (+)= A B for one k-step of 16, A and B from shared memory. TRANS_A / TRANS_B: 1 for an
// MN-major operand (see the layout rules above). accumulate = 0 overwrites d.
template <typename T, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) LLAMA_FAST_WGMMA_SS_N64("bf16");
  else LLAMA_FAST_WGMMA_SS_N64("f16");
}

// d[64 x N] (+)= A B for one k-step of 16, A from registers (the accumulator-shaped fragment).
template <typename T, int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N 64 or 128");
  if constexpr (N == 64) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) LLAMA_FAST_WGMMA_RS_N64("bf16");
    else LLAMA_FAST_WGMMA_RS_N64("f16");
  } else {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) LLAMA_FAST_WGMMA_RS_N128("bf16");
    else LLAMA_FAST_WGMMA_RS_N128("f16");
  }
}

}  // namespace llama_fast
