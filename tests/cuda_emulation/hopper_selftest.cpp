// Self-test of the hopper.cuh stand-in (tests/test_cuda_hopper_emulation.py): one emulated block
// runs one scenario; results are compared here with plain loops over the layouts written out from
// the PTX ISA (hopper.cuh's header comment), and the program prints "ok" or what differed.
//   hopper_selftest wgmma_ss_kk f16|bf16      S = A B^T, A and B K-major (2 k-panels of 64)
//   hopper_selftest wgmma_ss_mm f16|bf16      D = A B, A and B MN-major (A stored [k][m], B [k][n])
//   hopper_selftest wgmma_rs N f16|bf16       D = A B, A from registers (accumulator layout), B MN-major, N 64 / 128
//   hopper_selftest tma | mbarrier | bulk_reduce | named
//   hopper_selftest wgmma_pending | bulk_pending | named_count | extra_arrive | desc_nonuniform | deadlock
//                                             misuse that must abort
#include "hopper.cuh"

#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace llama_fast;

namespace {

constexpr size_t kSmem = 64 * 1024;

struct Smem {
  std::vector<unsigned char> buf = std::vector<unsigned char>(kSmem + 1024);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buf.data()) + 1023) & ~uintptr_t(1023));
  Smem() { std::memset(base, 0xff, kSmem); }
};

// One block of `threads` threads, set up as the attention driver's run_grid does.
void run_block(int threads, Smem& s, const std::function<void()>& body) {
  std::barrier<> block_bar(threads);
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  for (int w = 0; w < (threads + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
  std::vector<EmuWarpScratch> scratch((threads + 31) / 32);
  EmuHopperBlock hb(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t); blockIdx = dim3(0, 0, 0); blockDim = dim3(threads); gridDim = dim3(1);
      emu_block_barrier = &block_bar; emu_warp_barrier = warp_bars[t / 32].get(); emu_smem_ptr = s.base;
      emu_warp_scratch = &scratch[t / 32]; emu_smem_bytes = kSmem; emu_hopper = &hb;
      body();
      emu_hopper_thread_exit();
      emu_thread_exit();
    });
  for (auto& th : pool) th.join();
}

template <typename T> uint16_t bits(float f) {
  if constexpr (std::is_same_v<T, __half>) { __half h = __float2half_rn(f); uint16_t b; std::memcpy(&b, &h, 2); return b; }
  else return __float2bfloat16_rn(f).bits;
}
template <typename T> float val(uint16_t b) { return emu_detail::to_float<T>(b); }

// A [rows][64] panel of 16-bit elements with the 128-byte swizzle TMA writes (CU_TENSOR_MAP_SWIZZLE_128B):
// element (r, c) at 128 r + 16 ((c / 8) ^ (r % 8)) + 2 (c % 8).
size_t swz128(int r, int c) { return size_t(128 * r + 16 * ((c / 8) ^ (r % 8)) + 2 * (c % 8)); }

struct Mat {  // row-major 16-bit values and their floats
  int rows, cols;
  std::vector<uint16_t> b;
  template <typename T> static Mat random(int rows, int cols, std::mt19937& gen) {
    std::normal_distribution<float> n;
    Mat m{rows, cols, std::vector<uint16_t>(size_t(rows) * cols)};
    for (auto& x : m.b) x = bits<T>(n(gen));
    return m;
  }
  uint16_t at(int r, int c) const { return b[size_t(r) * cols + c]; }
};

// Stores m ([rows][cols], cols a multiple of 64) as cols / 64 swizzled panels from `at`.
void store_panels(unsigned char* at, const Mat& m) {
  for (int r = 0; r < m.rows; ++r)
    for (int c = 0; c < m.cols; ++c) std::memcpy(at + (c / 64) * size_t(m.rows) * 128 + swz128(r, c % 64), &m.b[size_t(r) * m.cols + c], 2);
}

// The accumulator element (row, col) register i of warpgroup thread t holds (PTX ISA wgmma D fragment).
void acc_pos(int t, int i, int& row, int& col) {
  const int w = t / 32, lane = t % 32;
  row = 16 * w + lane / 4 + 8 * ((i >> 1) & 1);
  col = 8 * (i >> 2) + 2 * (lane % 4) + (i & 1);
}

int compare(const char* what, const std::vector<float>& got, const std::vector<double>& want, const std::vector<double>& mag) {
  for (size_t i = 0; i < got.size(); ++i)
    if (std::abs(got[i] - want[i]) > 64 * 0x1p-24 * mag[i] + 1e-30) {
      std::printf("%s: element %zu got %g want %g\n", what, i, got[i], want[i]);
      return 1;
    }
  return 0;
}

// S[64][64] = A[64][128] B[64][128]^T, both K-major in two 64-column panels.
template <typename T> int wgmma_ss_kk() {
  std::mt19937 gen(1);
  const Mat A = Mat::random<T>(64, 128, gen), B = Mat::random<T>(64, 128, gen);
  Smem s;
  store_panels(s.base, A);
  store_panels(s.base + 16384, B);
  std::vector<float> got(64 * 64, NAN);
  run_block(128, s, [&] {
    float d[32];
    for (float& x : d) x = 1e9f;  // overwritten: the first k-step does not accumulate
    wgmma_fence();
    for (int kk = 0; kk < 8; ++kk)
      wgmma_ss_n64<T, 0, 0>(d, smem_desc(s.base + (kk / 4) * 8192 + 32 * (kk % 4), 16, 1024),
                            smem_desc(s.base + 16384 + (kk / 4) * 8192 + 32 * (kk % 4), 16, 1024), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < 32; ++i) { int r, c; acc_pos(threadIdx.x, i, r, c); got[r * 64 + c] = d[i]; }
  });
  std::vector<double> want(64 * 64), mag(64 * 64);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c)
      for (int k = 0; k < 128; ++k) {
        const double p = double(val<T>(A.at(r, k))) * val<T>(B.at(c, k));
        want[r * 64 + c] += p; mag[r * 64 + c] += std::abs(p);
      }
  return compare("wgmma_ss K-major", got, want, mag);
}

// D[64][64] = A[64][64] B[64][64], A stored [k][m] (MN-major), B stored [k][n] (MN-major).
template <typename T> int wgmma_ss_mm() {
  std::mt19937 gen(2);
  const Mat At = Mat::random<T>(64, 64, gen), B = Mat::random<T>(64, 64, gen);  // At[k][m], B[k][n]
  Smem s;
  store_panels(s.base, At);
  store_panels(s.base + 8192, B);
  std::vector<float> got(64 * 64, NAN);
  run_block(128, s, [&] {
    float d[32] = {};
    wgmma_fence();
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss_n64<T, 1, 1>(d, smem_desc(s.base + 2048 * kk, 8192, 1024), smem_desc(s.base + 8192 + 2048 * kk, 8192, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < 32; ++i) { int r, c; acc_pos(threadIdx.x, i, r, c); got[r * 64 + c] = d[i]; }
  });
  std::vector<double> want(64 * 64), mag(64 * 64);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c)
      for (int k = 0; k < 64; ++k) {
        const double p = double(val<T>(At.at(k, r))) * val<T>(B.at(k, c));
        want[r * 64 + c] += p; mag[r * 64 + c] += std::abs(p);
      }
  return compare("wgmma_ss MN-major", got, want, mag);
}

// D[64][N] = P[64][64] B[64][N]: P given as fp32 in the accumulator layout, packed to A fragments;
// B stored [k][n] MN-major in N / 64 panels (LBO = one panel). Also: the accumulators keep their old
// values until the wait.
template <typename T, int N> int test_wgmma_rs() {
  std::mt19937 gen(3);
  const Mat P = Mat::random<T>(64, 64, gen), B = Mat::random<T>(64, N, gen);
  Smem s;
  store_panels(s.base, B);
  std::vector<float> got(64 * N, NAN);
  int stale = 0;
  run_block(128, s, [&] {
    float p[32], d[N / 2];
    for (int i = 0; i < 32; ++i) { int r, c; acc_pos(threadIdx.x, i, r, c); p[i] = val<T>(P.at(r, c)); }
    for (float& x : d) x = 0.5f;
    wgmma_fence();
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t a[4] = {pack2<T>(p[8 * kk], p[8 * kk + 1]), pack2<T>(p[8 * kk + 2], p[8 * kk + 3]),
                             pack2<T>(p[8 * kk + 4], p[8 * kk + 5]), pack2<T>(p[8 * kk + 6], p[8 * kk + 7])};
      wgmma_rs<T, N, 1>(d, a, smem_desc(s.base + 2048 * kk, 64 * 128, 1024), 1);
    }
    wgmma_commit();
    if (d[0] != 0.5f) stale = 1;
    wgmma_wait<0>();
    for (int i = 0; i < N / 2; ++i) { int r, c; acc_pos(threadIdx.x, i, r, c); got[r * N + c] = d[i]; }
  });
  if (stale) { std::printf("wgmma_rs: accumulator changed before the wait\n"); return 1; }
  std::vector<double> want(64 * N, 0.5), mag(64 * N, 0.5);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < N; ++c)
      for (int k = 0; k < 64; ++k) {
        const double x = double(val<T>(P.at(r, k))) * val<T>(B.at(k, c));
        want[r * N + c] += x; mag[r * N + c] += std::abs(x);
      }
  return compare("wgmma_rs", got, want, mag);
}

// A 4-D tensor [batch 2][seq 20][heads 3][64] with a padded head stride (80 elements), box
// (64, 1, 16, 1) at (0, 1, 12, 1): rows 20..27 are out of bounds. Checks bytes and the mbarrier.
int tma() {
  std::vector<uint16_t> g(2 * 20 * 3 * 80);
  for (size_t i = 0; i < g.size(); ++i) g[i] = uint16_t(i * 7 + 1);
  CUtensorMap map{reinterpret_cast<const unsigned char*>(g.data()), {64, 3, 20, 2}, {2, 160, 480, 9600}, {64, 1, 16, 1}, true};
  Smem s;
  int fails = 0;
  run_block(32, s, [&] {
    if (threadIdx.x) return;
    uint64_t* bar = reinterpret_cast<uint64_t*>(s.base + 8192);
    mbar_init(bar, 1);
    mbar_arrive_expect_tx(bar, 16 * 128);
    if (mbar_try_wait(bar, 0)) { std::printf("tma: phase completed before the bytes arrived\n"); ++fails; }
    tma_load_4d(s.base, &map, bar, 0, 1, 12, 1);
    if (!mbar_try_wait(bar, 0) || mbar_try_wait(bar, 1)) { std::printf("tma: phase parity wrong after complete_tx\n"); ++fails; }
    mbar_wait(bar, 0);
  });
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 64; ++c) {
      uint16_t got, want = 0;
      std::memcpy(&got, s.base + swz128(r, c), 2);
      if (12 + r < 20) want = g[((1 * 20 + 12 + r) * 3 + 1) * 80 + c];
      if (got != want) { std::printf("tma: row %d col %d got %u want %u\n", r, c, got, want); return 1; }
    }
  return fails;
}

// Producer / consumer through full and empty mbarriers (2 stages, 6 items), as the kernel's pipeline.
int mbarrier() {
  Smem s;
  int bad = 0;
  run_block(64, s, [&] {
    uint64_t* full = reinterpret_cast<uint64_t*>(s.base);
    uint64_t* empty = full + 2;
    int* data = reinterpret_cast<int*>(s.base + 64);
    if (threadIdx.x == 0) {
      for (int i = 0; i < 2; ++i) { mbar_init(full + i, 1); mbar_init(empty + i, 32); }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int it = 0; it < 6; ++it) {
        const int st = it % 2;
        mbar_wait(empty + st, ((it / 2) & 1) ^ 1);  // a fresh barrier: parity 1 counts as completed
        data[st] = 100 + it;
        mbar_arrive(full + st);
      }
    } else if (threadIdx.x >= 32) {
      for (int it = 0; it < 6; ++it) {
        const int st = it % 2;
        mbar_wait(full + st, (it / 2) & 1);
        if (data[st] != 100 + it) bad = 1;
        mbar_arrive(empty + st);
      }
    }
  });
  if (bad) std::printf("mbarrier: a consumer saw the wrong item\n");
  return bad;
}

int bulk_reduce() {
  Smem s;
  alignas(16) static float g[64];
  for (int i = 0; i < 64; ++i) g[i] = float(i);
  int bad = 0;
  run_block(32, s, [&] {
    if (threadIdx.x) return;
    float* src = reinterpret_cast<float*>(s.base);
    for (int i = 0; i < 64; ++i) src[i] = 1000.f;
    bulk_reduce_add_f32(g, src, 256);
    bulk_commit();
    if (g[5] != 5.f) bad = 1;  // not yet performed
    bulk_wait_read<0>();
    for (int i = 0; i < 64; ++i) src[i] = 0.5f;  // the source may be reused now
    bulk_reduce_add_f32(g + 32, src, 128);
    bulk_commit();
    bulk_wait<0>();
  });
  for (int i = 0; i < 64; ++i)
    if (g[i] != float(i) + 1000.f + (i >= 32 ? 0.5f : 0.f)) bad = 1;
  if (bad) std::printf("bulk_reduce: wrong sums\n");
  return bad;
}

// Two groups of 128 threads meet at their own barrier ids; each reads what its group wrote.
int named() {
  Smem s;
  int bad = 0;
  run_block(256, s, [&] {
    int* v = reinterpret_cast<int*>(s.base);
    const int grp = threadIdx.x / 128;
    for (int round = 0; round < 3; ++round) {
      v[threadIdx.x] = round * 1000 + int(threadIdx.x);
      named_barrier_sync(1 + grp, 128);
      const int other = grp * 128 + (threadIdx.x + 37) % 128;
      if (v[other] != round * 1000 + other) bad = 1;
      named_barrier_sync(1 + grp, 128);
    }
  });
  if (bad) std::printf("named: a thread read before its group wrote\n");
  return bad;
}

int misuse(const std::string& what) {
  Smem s;
  run_block(128, s, [&] {
    uint64_t* bar = reinterpret_cast<uint64_t*>(s.base + 32768);
    float d[32] = {};
    if (what == "wgmma_pending") {
      wgmma_ss_n64<__nv_bfloat16, 0, 0>(d, smem_desc(s.base, 16, 1024), smem_desc(s.base, 16, 1024), 0);
      wgmma_commit();
    } else if (what == "desc_nonuniform") {
      wgmma_ss_n64<__nv_bfloat16, 0, 0>(d, smem_desc(s.base + 32 * (threadIdx.x == 5), 16, 1024), smem_desc(s.base, 16, 1024), 0);
      wgmma_commit();
      wgmma_wait<0>();
    } else if (what == "bulk_pending" && threadIdx.x == 0) {
      bulk_reduce_add_f32(reinterpret_cast<float*>(s.buf.data()), reinterpret_cast<float*>(s.base), 16);
      bulk_commit();
    } else if (what == "named_count") {
      named_barrier_sync(1, threadIdx.x < 64 ? 64 : 128);
    } else if (what == "extra_arrive" && threadIdx.x == 0) {
      mbar_init(bar, 1);
      mbar_arrive_expect_tx(bar, 16);
      mbar_arrive(bar);
    } else if (what == "deadlock" && threadIdx.x == 0) {
      mbar_init(bar, 2);
      mbar_arrive(bar);
      mbar_wait(bar, 0);
    }
  });
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string what = argv[1];
  const bool f16 = argc > 2 && std::string(argv[argc - 1]) == "f16";
  int fails;
  if (what == "wgmma_ss_kk") fails = f16 ? wgmma_ss_kk<__half>() : wgmma_ss_kk<__nv_bfloat16>();
  else if (what == "wgmma_ss_mm") fails = f16 ? wgmma_ss_mm<__half>() : wgmma_ss_mm<__nv_bfloat16>();
  else if (what == "wgmma_rs" && argc > 2 && std::string(argv[2]) == "64") fails = f16 ? test_wgmma_rs<__half, 64>() : test_wgmma_rs<__nv_bfloat16, 64>();
  else if (what == "wgmma_rs") fails = f16 ? test_wgmma_rs<__half, 128>() : test_wgmma_rs<__nv_bfloat16, 128>();
  else if (what == "tma") fails = tma();
  else if (what == "mbarrier") fails = mbarrier();
  else if (what == "bulk_reduce") fails = bulk_reduce();
  else if (what == "named") fails = named();
  else fails = misuse(what);
  if (!fails) std::printf("ok\n");
  return fails ? 1 : 0;
}
