// Runs csrc/cuda/attention_backward.cu's kernels under the host emulation (emu.h, mma.cuh), in the
// order its launcher runs them on a GPU: prep, kv, then q (deterministic) or dq_finish.
//   attention_backward_emulated IN OUT B S Hq Hkv D causal deterministic dtype(1 = fp16, 2 = bf16) misalign small [docs]
// IN holds, contiguous: q, dout, out [B, S, Hq, D] and k, v [B, S, Hkv, D] as 16-bit words (in the
// order q, k, v, dout, out), then fp32 stats [2, B, Hq, S] (m2, log2l), cos and sin [S, D / 2].
// misalign = 1 places v and dout one element past a 16-byte boundary, so the kernels must take their
// plain-load path instead of cp.async for them. small = 1 runs the 32-row query-block variant that
// GPUs with less shared memory per block get for head dims 65 to 128. docs = 1 (packed documents, B = 1):
// IN ends with int32 doc_start [S] and doc_end [S], passed to the kernels as AttentionBackwardArgs' bounds.
// OUT receives dq, dk, dv as 16-bit words. kernel_emu.cpp is the .cu with its launchers cut off
// and dynamic shared memory pointed at the emulated block's buffer (tests/test_cuda_emulation.py).
#include "kernel_emu.cpp"
#include <algorithm>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

using namespace llama_fast;

template <typename F>
void run_grid(dim3 grid, int threads, size_t smem_bytes, F body) {
  std::vector<unsigned char> smem(smem_bytes + 256);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t(127));
  for (unsigned bz = 0; bz < grid.z; ++bz)
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
            threadIdx = dim3(t); blockIdx = dim3(bx, by, bz); blockDim = dim3(threads); gridDim = grid;
            emu_block_barrier = &block_bar; emu_warp_barrier = warp_bars[t / 32].get(); emu_smem_ptr = base;
            emu_warp_scratch = &warp_scratch[t / 32]; emu_smem_bytes = smem_bytes;
            body();
            emu_thread_exit();
          });
        for (auto& th : pool) th.join();
      }
}

template <typename T, int DP, bool SMALL>
void run(AttentionBackwardArgs& a, float* workspace) {
  const Workspace<T> w = carve<T>(a, workspace);
  const bool vec_in = rows_vectorizable(a.v, a.v_stride, a.head_dim, sizeof(T)) &&
                      rows_vectorizable(a.dout, a.dout_stride, a.head_dim, sizeof(T));
  const int64_t prep_rows = prep_row_count(a);
  run_grid(dim3(unsigned((prep_rows + 1) / 2)), 64, 0, [&] { attention_backward_prep<T>(a, w); });
  using KV = KvSmem<T, DP, SMALL>;
  const dim3 kv_grid(unsigned((a.seq_len + KV::BN - 1) / KV::BN), unsigned(a.num_kv_heads), unsigned(a.batch));
  if (a.deterministic) {
    run_grid(kv_grid, KV::THREADS, KV::kBytes, [&] { attention_backward_kv<T, DP, SMALL, false>(a, w, vec_in); });
    using QS = QSmem<T, DP, SMALL>;
    const dim3 q_grid(unsigned((a.seq_len + QS::BM - 1) / QS::BM), unsigned(a.num_heads), unsigned(a.batch));
    run_grid(q_grid, QS::BM * 2, QS::kBytes, [&] { attention_backward_q<T, DP, SMALL>(a, w, vec_in); });
  } else {
    run_grid(kv_grid, KV::THREADS, KV::kBytes, [&] { attention_backward_kv<T, DP, SMALL, true>(a, w, vec_in); });
    // No barriers: threads in turn. Three blocks of 64 threads, so the grid-stride loop takes turns
    // (the launcher's grid is SMs * 8 blocks of 256).
    const bool vec = dq_finish_vectorizable(a);
    for (unsigned bx = 0; bx < 3; ++bx)
      for (unsigned t = 0; t < 64; ++t) {
        threadIdx = dim3(t); blockIdx = dim3(bx); blockDim = dim3(64); gridDim = dim3(3);
        if (vec) attention_backward_dq_finish<T, true>(a, w.dq_accum);
        else attention_backward_dq_finish<T, false>(a, w.dq_accum);
      }
  }
}

// The launcher's choice of instantiation; `small` forces the 32-row query blocks that GPUs with
// under ~105 KB of shared memory per block get for head dims 65 to 128.
template <typename T>
void dispatch(AttentionBackwardArgs& a, float* workspace, bool small) {
  if (a.head_dim <= 64) run<T, 64, false>(a, workspace);
  else if (a.head_dim <= 128 && small) run<T, 128, true>(a, workspace);
  else if (a.head_dim <= 128) run<T, 128, false>(a, workspace);
  else run<T, 256, false>(a, workspace);
}

int main(int argc, char** argv) {
  if (argc != 13 && argc != 14) return 2;
  const int64_t B = atol(argv[3]), S = atol(argv[4]), Hq = atol(argv[5]), Hkv = atol(argv[6]), D = atol(argv[7]);
  const bool causal = atoi(argv[8]), deterministic = atoi(argv[9]);
  const int dtype = atoi(argv[10]);
  const bool misalign = atoi(argv[11]), small = atoi(argv[12]);
  FILE* f = fopen(argv[1], "rb");
  const size_t nq = B * S * Hq * D, nk = B * S * Hkv * D, nl = 2 * B * Hq * S, nc = S * (D / 2);
  // 16-byte aligned 16-bit buffers, optionally starting one element late.
  auto rd16 = [&](size_t n, bool shift) {
    auto v = std::make_shared<std::vector<uint16_t>>(n + 8);
    uint16_t* p = v->data() + (shift ? 1 : 0);
    if (fread(p, 2, n, f) != n) std::abort();
    return std::pair{v, p};
  };
  auto rd32 = [&](size_t n) { std::vector<float> v(n); if (fread(v.data(), 4, n, f) != n) std::abort(); return v; };
  auto q = rd16(nq, false), k = rd16(nk, false), v = rd16(nk, misalign), dout = rd16(nq, misalign),
       out = rd16(nq, false);
  auto stats = rd32(nl), cs = rd32(nc), sn = rd32(nc);
  const bool docs = argc == 14 && atoi(argv[13]);
  std::vector<int32_t> doc_start(docs ? S : 0), doc_end(docs ? S : 0);
  if (docs && (fread(doc_start.data(), 4, S, f) != size_t(S) || fread(doc_end.data(), 4, S, f) != size_t(S)))
    std::abort();
  fclose(f);
  std::vector<uint16_t> dq(nq, 0xffff), dk(nk, 0xffff), dv(nk, 0xffff);  // NaN: an unwritten element shows
  AttentionBackwardArgs a{};
  a.dtype = dtype == 1 ? DType::F16 : DType::BF16;
  auto set = [](const uint16_t* p, const void*& ptr, int64_t (&st)[4], int64_t H, int64_t S_, int64_t D_) {
    ptr = p; st[0] = S_ * H * D_; st[1] = H * D_; st[2] = D_; st[3] = 1;
  };
  set(dout.second, a.dout, a.dout_stride, Hq, S, D);
  set(q.second, a.q, a.q_stride, Hq, S, D);
  set(k.second, a.k, a.k_stride, Hkv, S, D);
  set(v.second, a.v, a.v_stride, Hkv, S, D);
  set(out.second, a.out, a.out_stride, Hq, S, D);
  a.stats = stats.data();
  a.cos = cs.data();
  a.sin = sn.data();
  a.cs_stride = D / 2;
  a.dq = dq.data(); a.dk = dk.data(); a.dv = dv.data();
  a.batch = B; a.seq_len = S; a.num_heads = Hq; a.num_kv_heads = Hkv; a.head_dim = D;
  a.causal = causal; a.deterministic = deterministic;
  if (docs) { a.doc_start = doc_start.data(); a.doc_end = doc_end.data(); }
  int64_t off[7];
  workspace_layout(a, off);
  std::vector<float> workspace(off[6], std::nanf(""));  // NaN: a workspace read before its write shows
  if (dtype == 1) dispatch<__half>(a, workspace.data(), small);
  else dispatch<__nv_bfloat16>(a, workspace.data(), small);
  FILE* o = fopen(argv[2], "wb");
  fwrite(dq.data(), 2, nq, o); fwrite(dk.data(), 2, nk, o); fwrite(dv.data(), 2, nk, o);
  fclose(o);
  return 0;
}
