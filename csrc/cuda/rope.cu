// RoPE backward on the GPU: the gradients of q and k rotated back by -theta in one launch.
//
// Layout: dq [batch, seq, q_heads, head_dim] and dk [batch, seq, k_heads, head_dim] with arbitrary
// element strides (b, s, h, d): split views of a fused qkv gradient and transposed tensors work
// without copies. dq_out and dk_out are contiguous. cos and sin are fp32 [>= seq, head_dim / 2]
// with contiguous columns and one row stride; position p uses row p. Half-split convention: a head
// vector's first half pairs with its second half.
// dtypes: gradients in fp32, fp16 or bf16; math in fp32.
//
// Grid: one block per token (b, s), with a grid stride past kMaxBlocks tokens; the block's threads
// walk the (q_heads + k_heads) * (head_dim / 2 / VEC) packs of that token, q heads first. Fast path
// (VEC = 16 / sizeof(T)): the head dim is contiguous and every stride and pointer keeps 16-byte
// packs aligned; otherwise VEC = 1 with strided element accesses. Token offsets are int64.
#include "common.cuh"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope_backward_kernel(RopeBackwardArgs a) {
  const int half = static_cast<int>(a.head_dim / 2);
  const int packs = half / VEC;
  const int tasks = static_cast<int>(a.q_heads + a.k_heads) * packs;
  const int64_t tokens = a.batch * a.seq;
  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    const int64_t b = token / a.seq, s = token % a.seq;
    const float* cos_row = a.cos + s * a.table_row_stride;
    const float* sin_row = a.sin + s * a.table_row_stride;
    for (int t = threadIdx.x; t < tasks; t += kThreads) {
      const int head = t / packs, i = (t % packs) * VEC;
      const bool is_q = head < a.q_heads;
      const int h = is_q ? head : head - static_cast<int>(a.q_heads);
      const int64_t* st = is_q ? a.dq_stride : a.dk_stride;
      const T* src = static_cast<const T*>(is_q ? a.dq : a.dk) + b * st[0] + s * st[1] + h * st[2];
      const int64_t heads = is_q ? a.q_heads : a.k_heads;
      T* dst = static_cast<T*>(is_q ? a.dq_out : a.dk_out) + (token * heads + h) * a.head_dim;
      float d1[VEC], d2[VEC], c[VEC], sn[VEC], o1[VEC], o2[VEC];
      if constexpr (VEC > 1) {
        load_floats<T, VEC>(src + i, d1);
        load_floats<T, VEC>(src + half + i, d2);
        load_floats<float, VEC>(cos_row + i, c);
        load_floats<float, VEC>(sin_row + i, sn);
      } else {
        d1[0] = to_float(src[int64_t(i) * st[3]]);
        d2[0] = to_float(src[int64_t(half + i) * st[3]]);
        c[0] = cos_row[i];
        sn[0] = sin_row[i];
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        o1[v] = d1[v] * c[v] + d2[v] * sn[v];
        o2[v] = d2[v] * c[v] - d1[v] * sn[v];
      }
      store_floats<T, VEC>(dst + i, o1);
      store_floats<T, VEC>(dst + half + i, o2);
    }
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
int launch(const RopeBackwardArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t half = a.head_dim / 2;
  bool vectorizable = half % VEC == 0 && a.dq_stride[3] == 1 && a.dk_stride[3] == 1 && aligned(a.dq, 16) &&
                      aligned(a.dk, 16) && aligned(a.dq_out, 16) && aligned(a.dk_out, 16) &&
                      aligned(a.cos, VEC * 4) && aligned(a.sin, VEC * 4) && a.table_row_stride % VEC == 0;
  for (int d = 0; d < 3; ++d) vectorizable = vectorizable && a.dq_stride[d] % VEC == 0 && a.dk_stride[d] % VEC == 0;
  const int64_t tokens = a.batch * a.seq;
  const unsigned grid = static_cast<unsigned>(tokens < kMaxBlocks ? tokens : kMaxBlocks);
  if (vectorizable) {
    rope_backward_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(a);
  } else {
    rope_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int rope_backward_cuda(const RopeBackwardArgs& args, void* stream_ptr) {
  if (args.batch <= 0 || args.seq <= 0 || args.head_dim <= 0 || args.q_heads + args.k_heads <= 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  return dispatch_dtype(args.dtype, [&](auto tag) { return launch<decltype(tag)>(args, stream); });
}

}  // namespace llama_fast
