// Runs csrc/cuda/attention_backward_sm90.cu's kernels under the host emulation (emu.h, mma.cuh,
// hopper.cuh), in the order its launcher runs them on a GPU: prep, main, dq_finish.
//   attention_backward_sm90_emulated IN OUT B S Hq Hkv D causal deterministic dtype(1 = fp16, 2 = bf16) [bhsd]
// bhsd = 1 stores v and dout as [B, H, S, D] and passes them as strided [B, S, H, D] views (the TMA
// tensor maps' strides), as transpose(1, 2) views come from a model.
// IN holds, contiguous: q, k, v, dout, out as 16-bit words ([B, S, H, D]), then fp32 stats
// [2, B, Hq, S] (the row max m2 and log2 of the row sum, base-2 units), cos and sin [S, D / 2].
// OUT receives dq, dk, dv as 16-bit words. kernel_emu.cpp is the .cu with its host launcher cut off
// and dynamic shared memory pointed at the emulated block's buffer (tests/test_cuda_emulation_sm90.py).
#include "kernel_emu.cpp"
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

using namespace llama_fast;

template <typename F>
void run_grid(dim3 grid, int threads, size_t smem_bytes, F body) {
  std::vector<unsigned char> smem(smem_bytes + 2048);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 1023) & ~uintptr_t(1023));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(smem.data(), 0xff, smem.size());  // NaN garbage: an unwritten tile element shows
        std::barrier<> block_bar(threads);
        std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
        for (int w = 0; w < (threads + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
        std::vector<EmuWarpScratch> warp_scratch((threads + 31) / 32);
        auto hopper = std::make_unique<EmuHopperBlock>(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t); blockIdx = dim3(bx, by, bz); blockDim = dim3(threads); gridDim = grid;
            emu_block_barrier = &block_bar; emu_warp_barrier = warp_bars[t / 32].get(); emu_smem_ptr = base;
            emu_warp_scratch = &warp_scratch[t / 32]; emu_smem_bytes = smem_bytes; emu_hopper = hopper.get();
            body();
            emu_hopper_thread_exit();
            emu_thread_exit();
          });
        for (auto& th : pool) th.join();
      }
}

bool encode(CUtensorMap* map, const void* base, const uint64_t (&dims)[4], const uint64_t (&strides)[4], const uint32_t (&box)[4]) {
  *map = CUtensorMap{static_cast<const unsigned char*>(base), {}, {}, {}, true};
  for (int i = 0; i < 4; ++i) { map->dims[i] = dims[i]; map->strides[i] = strides[i]; map->box[i] = box[i]; }
  return true;
}

template <typename T, int D>
void run(const AttentionBackwardArgs& a, const float* stats, float* workspace) {
  const Sm90Workspace<T> w = sm90_carve<T>(a, workspace);
  const int64_t S_pad = sm90_padded(a.seq_len);
  const int64_t prep_rows = a.batch * a.num_heads * S_pad + a.batch * a.num_kv_heads * a.seq_len;
  run_grid(dim3(unsigned((prep_rows + 1) / 2)), 64, 0, [&] { attention_backward_sm90_prep<T>(a, stats, w); });
  std::fill(w.dq_accum, w.dq_accum + a.batch * a.num_heads * S_pad * a.head_dim, 0.f);
  std::fill(w.sem, w.sem + a.batch * a.num_heads * (S_pad / kBM), 0);
  Sm90Params p;
  if (!sm90_params<T>(a, w, encode, p)) std::abort();
  const dim3 grid(unsigned((a.seq_len + kBN - 1) / kBN), unsigned(a.num_kv_heads), unsigned(a.batch));
  run_grid(grid, kThreads, Sm90Smem<D>::kBytes, [&] { attention_backward_sm90_main<T, D>(p); });
  for (int64_t row = 0; row < a.batch * a.seq_len * a.num_heads; ++row)  // no barriers: threads in turn
    for (unsigned t = 0; t < 64; ++t) {
      threadIdx = dim3(t); blockIdx = dim3(unsigned(row)); blockDim = dim3(64);
      attention_backward_sm90_dq_finish<T>(a, w.dq_accum);
    }
}

int main(int argc, char** argv) {
  if (argc != 11 && argc != 12) return 2;
  const bool bhsd = argc == 12 && atoi(argv[11]);
  const int64_t B = atol(argv[3]), S = atol(argv[4]), Hq = atol(argv[5]), Hkv = atol(argv[6]), D = atol(argv[7]);
  const bool causal = atoi(argv[8]), deterministic = atoi(argv[9]);
  const int dtype = atoi(argv[10]);
  FILE* f = fopen(argv[1], "rb");
  const size_t nq = B * S * Hq * D, nk = B * S * Hkv * D, nl = 2 * B * Hq * S, nc = S * (D / 2);
  auto rd16 = [&](size_t n) {
    auto v = std::make_shared<std::vector<uint16_t>>(n + 8);
    if (fread(v->data(), 2, n, f) != n) std::abort();
    return v;
  };
  auto rd32 = [&](size_t n) { std::vector<float> v(n); if (fread(v.data(), 4, n, f) != n) std::abort(); return v; };
  auto q = rd16(nq), k = rd16(nk), v = rd16(nk), dout = rd16(nq), out = rd16(nq);
  auto stats = rd32(nl), cs = rd32(nc), sn = rd32(nc);
  fclose(f);
  std::vector<uint16_t> dq(nq, 0xffff), dk(nk, 0xffff), dv(nk, 0xffff);  // NaN: an unwritten element shows
  AttentionBackwardArgs a{};
  a.dtype = dtype == 1 ? DType::F16 : DType::BF16;
  auto set = [](const std::shared_ptr<std::vector<uint16_t>>& p, const void*& ptr, int64_t (&st)[4], int64_t H, int64_t D_) {
    ptr = p->data(); st[0] = 0; st[1] = H * D_; st[2] = D_; st[3] = 1;
  };
  set(dout, a.dout, a.dout_stride, Hq, D); a.dout_stride[0] = S * Hq * D;
  set(q, a.q, a.q_stride, Hq, D); a.q_stride[0] = S * Hq * D;
  set(k, a.k, a.k_stride, Hkv, D); a.k_stride[0] = S * Hkv * D;
  set(v, a.v, a.v_stride, Hkv, D); a.v_stride[0] = S * Hkv * D;
  set(out, a.out, a.out_stride, Hq, D); a.out_stride[0] = S * Hq * D;
  std::vector<uint16_t> v_t, dout_t;  // [B, H, S, D] copies, seen as [B, S, H, D] through strides
  auto to_bhsd = [&](const std::vector<uint16_t>& src, std::vector<uint16_t>& dst, const void*& ptr, int64_t (&st)[4], int64_t H) {
    dst.resize(B * H * S * D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s_ = 0; s_ < S; ++s_)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) dst[((b * H + h) * S + s_) * D + d] = src[((b * S + s_) * H + h) * D + d];
    ptr = dst.data(); st[0] = H * S * D; st[1] = D; st[2] = S * D; st[3] = 1;
  };
  if (bhsd) {
    to_bhsd(*v, v_t, a.v, a.v_stride, Hkv);
    to_bhsd(*dout, dout_t, a.dout, a.dout_stride, Hq);
  }
  a.cos = cs.data(); a.sin = sn.data(); a.cs_stride = D / 2;
  a.dq = dq.data(); a.dk = dk.data(); a.dv = dv.data();
  a.batch = B; a.seq_len = S; a.num_heads = Hq; a.num_kv_heads = Hkv; a.head_dim = D;
  a.causal = causal; a.deterministic = deterministic;
  std::vector<float> workspace(attention_backward_sm90_workspace(a), std::nanf(""));  // NaN: a read before its write shows
  if (!attention_backward_sm90_supported(a)) return 3;
  if (dtype == 1) { if (D == 64) run<__half, 64>(a, stats.data(), workspace.data()); else run<__half, 128>(a, stats.data(), workspace.data()); }
  else { if (D == 64) run<__nv_bfloat16, 64>(a, stats.data(), workspace.data()); else run<__nv_bfloat16, 128>(a, stats.data(), workspace.data()); }
  FILE* o = fopen(argv[2], "wb");
  fwrite(dq.data(), 2, nq, o); fwrite(dk.data(), 2, nk, o); fwrite(dv.data(), 2, nk, o);
  fclose(o);
  return 0;
}
