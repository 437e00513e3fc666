// Runs csrc/cuda/attention_backward.cu's kernels under the host emulation (emu.h, mma.h).
//   attention_backward_emulated IN OUT B S Hq Hkv D causal deterministic dtype(1 = fp16, 2 = bf16)
// IN holds, contiguous: q, dout, out [B, S, Hq, D] and k, v [B, S, Hkv, D] as 16-bit words (in the
// order q, k, v, dout, out), then fp32 lse and delta [B, Hq, S], cos and sin [S, D / 2].
// OUT receives dq, dk, dv as 16-bit words. kernel_emu.cpp is the .cu with its launchers cut off
// and dynamic shared memory pointed at the emulated block's buffer (tests/test_cuda_emulation.py).
#include "kernel_emu.cpp"
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

using namespace llama_fast;

template <typename F>
void run_grid(dim3 grid, int threads, size_t smem_bytes, F body) {
  std::vector<unsigned char> smem(smem_bytes + 256);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t(127));
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(smem.data(), 0xff, smem.size());  // NaN garbage: an unwritten tile element shows
      std::barrier<> block_bar(threads);
      std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
      for (int w = 0; w < (threads + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
      std::vector<EmuWarpScratch> warp_scratch((threads + 31) / 32);  // warp-collective ops (emu.h)
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          threadIdx = dim3(t); blockIdx = dim3(bx, by); blockDim = dim3(threads); gridDim = grid;
          emu_block_barrier = &block_bar; emu_warp_barrier = warp_bars[t / 32].get(); emu_smem_ptr = base;
          emu_warp_scratch = &warp_scratch[t / 32]; emu_smem_bytes = smem_bytes;
          body();
          emu_thread_exit();
        });
      for (auto& th : pool) th.join();
    }
}

template <typename T, int DP>
void run(AttentionBackwardArgs& a, const float* delta, float* dq_accum) {
  using C = Tiles<T, DP>;
  const unsigned blocks = unsigned((a.seq_len + C::BLOCK - 1) / C::BLOCK);
  run_grid(dim3(unsigned(a.batch * a.num_kv_heads), blocks), C::THREADS, C::kSmem,
           [&] { attention_backward_kv<T, DP>(a, delta, dq_accum); });
  if (a.deterministic) {
    run_grid(dim3(unsigned(a.batch * a.num_heads), blocks), C::THREADS, C::kSmem,
             [&] { attention_backward_q<T, DP>(a, delta); });
  } else {
    const int64_t total = a.batch * a.num_heads * a.seq_len * (a.head_dim / 2);
    for (int64_t i = 0; i < total; ++i) {
      threadIdx = dim3(unsigned(i % 256)); blockIdx = dim3(unsigned(i / 256)); blockDim = dim3(256);
      attention_backward_dq_finish<T>(a, dq_accum);
    }
  }
}

template <typename T>
void dispatch(AttentionBackwardArgs& a, const float* delta, float* dq_accum) {
  if (a.head_dim <= 64) run<T, 64>(a, delta, dq_accum);
  else if (a.head_dim <= 128) run<T, 128>(a, delta, dq_accum);
  else run<T, 256>(a, delta, dq_accum);
}

int main(int argc, char** argv) {
  if (argc != 11) return 2;
  const int64_t B = atol(argv[3]), S = atol(argv[4]), Hq = atol(argv[5]), Hkv = atol(argv[6]), D = atol(argv[7]);
  const bool causal = atoi(argv[8]), deterministic = atoi(argv[9]);
  const int dtype = atoi(argv[10]);
  FILE* f = fopen(argv[1], "rb");
  auto rd = [&](size_t n, size_t elem) { std::vector<unsigned char> v(n * elem); if (fread(v.data(), elem, n, f) != n) std::abort(); return v; };
  const size_t nq = B * S * Hq * D, nk = B * S * Hkv * D, nl = B * Hq * S, nc = S * (D / 2);
  auto q = rd(nq, 2), k = rd(nk, 2), v = rd(nk, 2), dout = rd(nq, 2), out = rd(nq, 2);
  auto lse = rd(nl, 4), delta = rd(nl, 4), cs = rd(nc, 4), sn = rd(nc, 4);
  fclose(f);
  std::vector<uint16_t> dq(nq, 0xffff), dk(nk, 0xffff), dv(nk, 0xffff);
  std::vector<float> dq_accum(nq, 0.f);
  AttentionBackwardArgs a{};
  a.dtype = dtype == 1 ? DType::F16 : DType::BF16;
  auto set = [](const void* p, const void*& ptr, int64_t (&st)[4], int64_t H, int64_t S_, int64_t D_) {
    ptr = p; st[0] = S_ * H * D_; st[1] = H * D_; st[2] = D_; st[3] = 1;
  };
  set(dout.data(), a.dout, a.dout_stride, Hq, S, D);
  set(q.data(), a.q, a.q_stride, Hq, S, D);
  set(k.data(), a.k, a.k_stride, Hkv, S, D);
  set(v.data(), a.v, a.v_stride, Hkv, S, D);
  set(out.data(), a.out, a.out_stride, Hq, S, D);
  a.lse = reinterpret_cast<const float*>(lse.data());
  a.cos = reinterpret_cast<const float*>(cs.data());
  a.sin = reinterpret_cast<const float*>(sn.data());
  a.cs_stride = D / 2;
  a.dq = dq.data(); a.dk = dk.data(); a.dv = dv.data();
  a.batch = B; a.seq_len = S; a.num_heads = Hq; a.num_kv_heads = Hkv; a.head_dim = D;
  a.causal = causal; a.deterministic = deterministic;
  const float* dl = reinterpret_cast<const float*>(delta.data());
  if (dtype == 1) dispatch<__half>(a, dl, dq_accum.data()); else dispatch<__nv_bfloat16>(a, dl, dq_accum.data());
  FILE* o = fopen(argv[2], "wb");
  fwrite(dq.data(), 2, nq, o); fwrite(dk.data(), 2, nk, o); fwrite(dv.data(), 2, nk, o);
  fclose(o);
  return 0;
}
