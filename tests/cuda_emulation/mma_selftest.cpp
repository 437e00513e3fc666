// Self-test driver of the mma.cuh stand-in (tests/test_cuda_mma_emulation.py): one warp of 32
// emulated threads, set up as driver.cpp's run_grid does, runs one scenario and prints what the
// lanes received; the Python test holds the expected values (written from the PTX ISA).
//   mma_selftest ldmatrix                      per lane: r0..r3 of ldmatrix_x4, then of _trans
//   mma_selftest mma f16|bf16 K nk|kn IN OUT   D = C + A B, A [16][K], B [K][16] (smem as [n][k] or [k][n])
//   mma_selftest reuse f16|bf16 IN OUT         S = A B, then O = P V with P = S packed as A fragments
//   mma_selftest cpasync                       shared bytes after each step of a cp.async sequence
//   mma_selftest shfl                          per lane: __shfl_xor_sync of 1000 + lane for lane_mask 1, 2, 4, 8, 16
//   mma_selftest bad_ldmatrix_align | bad_ldmatrix_range | bad_cp_align | pending | uncommitted | diverge | exited
//                                              misuse that must abort
// Like emu.h, this says nothing about speed, resource limits or the GPU memory model.
#include "mma.cuh"

#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

using namespace llama_fast;

namespace {

constexpr size_t kSmem = 8192;

// One block of one warp, set up as run_grid does (emu.h "Runner contract").
void run_warp(const std::function<void()>& body, unsigned char* smem) {
  std::barrier<> block_bar(32), warp_bar(32);
  EmuWarpScratch scratch{};
  std::vector<std::thread> pool;
  for (int t = 0; t < 32; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t); blockIdx = dim3(0, 0, 0); blockDim = dim3(32); gridDim = dim3(1);
      emu_block_barrier = &block_bar; emu_warp_barrier = &warp_bar; emu_smem_ptr = smem;
      emu_warp_scratch = &scratch; emu_smem_bytes = kSmem;
      body();
      emu_thread_exit();
    });
  for (auto& th : pool) th.join();
}

struct Smem {
  std::vector<unsigned char> buf = std::vector<unsigned char>(kSmem + 128);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buf.data()) + 127) & ~uintptr_t(127));
  Smem() { std::memset(base, 0xff, kSmem); }
  uint16_t* h(size_t byte_offset) { return reinterpret_cast<uint16_t*>(base + byte_offset); }
};

std::vector<unsigned char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) std::abort();
  std::vector<unsigned char> v;
  unsigned char chunk[4096];
  for (size_t n; (n = std::fread(chunk, 1, sizeof chunk, f)) > 0;) v.insert(v.end(), chunk, chunk + n);
  std::fclose(f);
  return v;
}

void write_file(const char* path, const std::vector<float>& v) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(v.data(), 4, v.size(), f);
  std::fclose(f);
}

// ldmatrix: 8 x 8 matrix j, row r, col c holds the value 64 j + 8 r + c; its rows lie at scrambled
// 32-byte slots ((4 r + j) * 7 % 32), the 16 bytes after each row poisoned with 0xffff.
int ldmatrix_scenario() {
  Smem s;
  auto slot = [](int j, int r) { return size_t((4 * r + j) * 7 % 32) * 32; };
  for (int j = 0; j < 4; ++j)
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) *s.h(slot(j, r) + 2 * c) = uint16_t(64 * j + 8 * r + c);
  uint32_t got[32][8];
  run_warp([&] {
    const int lane = int(threadIdx.x);
    uint32_t r[4], rt[4];
    ldmatrix_x4(r, s.base + slot(lane / 8, lane % 8));
    ldmatrix_x4_trans(rt, s.base + slot(lane / 8, lane % 8));
    for (int i = 0; i < 4; ++i) { got[lane][i] = r[i]; got[lane][4 + i] = rt[i]; }
  }, s.base);
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) std::printf("%u ", got[l][i]);
    std::printf("\n");
  }
  return 0;
}

// Loads with the lane addressing a kernel uses (row-major tiles in shared memory, row stride `ld`
// elements, padded so rows are 16-byte aligned but not contiguous):
//   A fragment of the 16 x 16 block at column k0 of A [16][ld]: lane -> row lane % 16, col k0 + 8 (lane / 16)
//   B fragments of two n-tiles (n0, n0 + 8) x k-block k0 from Bt [n][k]: row n0 + 8 (lane / 16) + lane % 8,
//     col k0 + 8 ((lane / 8) % 2); tile 0 = {r0, r1}, tile 1 = {r2, r3}
//   the same from B [k][n] with .trans: row k0 + 8 ((lane / 8) % 2) + lane % 8, col n0 + 8 (lane / 16)
void load_a(uint32_t (&a)[4], const uint16_t* A, int ld, int k0) {
  const int lane = int(threadIdx.x % 32);
  ldmatrix_x4(a, A + (lane % 16) * ld + k0 + 8 * (lane / 16));
}
void load_b_nk(uint32_t (&b)[2][2], const uint16_t* Bt, int ld, int n0, int k0) {
  const int lane = int(threadIdx.x % 32);
  uint32_t r[4];
  ldmatrix_x4(r, Bt + (n0 + 8 * (lane / 16) + lane % 8) * ld + k0 + 8 * ((lane / 8) % 2));
  b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}
void load_b_kn(uint32_t (&b)[2][2], const uint16_t* B, int ld, int n0, int k0) {
  const int lane = int(threadIdx.x % 32);
  uint32_t r[4];
  ldmatrix_x4_trans(r, B + (k0 + 8 * ((lane / 8) % 2) + lane % 8) * ld + n0 + 8 * (lane / 16));
  b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}

// Accumulator tiles (two n-tiles of 8) -> / <- a row-major 16 x 16 fp32 matrix, by the C layout.
void store_c(const float (&c)[2][4], float* out) {
  const int lane = int(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 4; ++i) out[(g + 8 * (i >= 2)) * 16 + 8 * n + 2 * t + (i & 1)] = c[n][i];
}
void load_c(float (&c)[2][4], const float* in) {
  const int lane = int(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 4; ++i) c[n][i] = in[(g + 8 * (i >= 2)) * 16 + 8 * n + 2 * t + (i & 1)];
}

template <typename T>
int mma_scenario(int K, bool nk, const char* in, const char* out) {
  // IN: A [16][K], B [K][16] 16-bit words, C [16][16] fp32. OUT: D [16][16] fp32.
  const auto raw = read_file(in);
  const uint16_t* A = reinterpret_cast<const uint16_t*>(raw.data());
  const uint16_t* B = A + 16 * K;
  std::vector<float> C(256), D(256, std::nanf(""));
  std::memcpy(C.data(), B + 16 * K, 1024);
  Smem s;
  const int lda = K + 8, ldb = nk ? K + 8 : 24;
  uint16_t* sA = s.h(0);
  uint16_t* sB = s.h(2 * 16 * lda);
  for (int m = 0; m < 16; ++m) for (int k = 0; k < K; ++k) sA[m * lda + k] = A[m * K + k];
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < 16; ++n) (nk ? sB[n * ldb + k] : sB[k * ldb + n]) = B[k * 16 + n];
  run_warp([&] {
    float c[2][4];
    load_c(c, C.data());
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a[4], b[2][2];
      load_a(a, sA, lda, k0);
      if (nk) load_b_nk(b, sB, ldb, 0, k0); else load_b_kn(b, sB, ldb, 0, k0);
      mma_16816<T>(c[0], a, b[0]);
      mma_16816<T>(c[1], a, b[1]);
    }
    store_c(c, D.data());
  }, s.base);
  write_file(out, D);
  return 0;
}

template <typename T>
int reuse_scenario(const char* in, const char* out) {
  // IN: A [16][16], Bt [16 n][16 k], V [16 k][16 n] 16-bit words. OUT: S = A B, O = P V [16][16] fp32,
  // P = S rounded to T, passed from the accumulator registers straight into A fragments.
  const auto raw = read_file(in);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(raw.data());
  Smem s;
  constexpr int ld = 24;
  uint16_t* sm[3] = {s.h(0), s.h(2 * 16 * ld), s.h(4 * 16 * ld)};
  for (int m = 0; m < 3; ++m)
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) sm[m][r * ld + c] = src[256 * m + r * 16 + c];
  std::vector<float> res(512, std::nanf(""));
  run_warp([&] {
    uint32_t a[4], b[2][2];
    float sc[2][4] = {}, oc[2][4] = {};
    load_a(a, sm[0], ld, 0);
    load_b_nk(b, sm[1], ld, 0, 0);
    mma_16816<T>(sc[0], a, b[0]);
    mma_16816<T>(sc[1], a, b[1]);
    store_c(sc, res.data());
    const uint32_t p[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                           pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
    load_b_kn(b, sm[2], ld, 0, 0);
    mma_16816<T>(oc[0], p, b[0]);
    mma_16816<T>(oc[1], p, b[1]);
    store_c(oc, res.data() + 256);
  }, s.base);
  write_file(out, res);
  return 0;
}

// Lane 0 copies global bytes 1..64 into four 16-byte shared chunks holding 0xaa and prints the
// 64 shared bytes (hex) after each step; chunk 2 is a zero-fill copy (src_bytes 0).
int cpasync_scenario() {
  Smem s;
  alignas(16) unsigned char src[64];
  for (int i = 0; i < 64; ++i) src[i] = uint8_t(i + 1);
  std::memset(s.base, 0xaa, 64);
  run_warp([&] {
    if (threadIdx.x != 0) return;
    auto show = [&](const char* step) {
      std::printf("%s ", step);
      for (int i = 0; i < 64; ++i) std::printf("%02x", s.base[i]);
      std::printf("\n");
    };
    cp_async_16(s.base, src, 16);
    cp_async_commit();
    cp_async_16(s.base + 16, src + 16, 16);
    cp_async_16(s.base + 32, src + 32, 0);
    cp_async_commit();
    show("issued");
    cp_async_wait<1>();
    show("wait1");
    cp_async_16(s.base + 48, src + 48, 16);
    cp_async_wait<0>();
    show("wait0_uncommitted");
    cp_async_commit();
    cp_async_wait<0>();
    show("wait0");
  }, s.base);
  return 0;
}

int shfl_scenario() {
  Smem s;
  float got[32][5];
  run_warp([&] {
    for (int i = 0; i < 5; ++i) got[threadIdx.x][i] = __shfl_xor_sync(0xffffffffu, 1000.f + float(threadIdx.x), 1 << i);
  }, s.base);
  for (int l = 0; l < 32; ++l) std::printf("%g %g %g %g %g\n", got[l][0], got[l][1], got[l][2], got[l][3], got[l][4]);
  return 0;
}

int misuse_scenario(const std::string& what) {
  Smem s;
  alignas(16) unsigned char src[32] = {};
  run_warp([&] {
    const unsigned lane = threadIdx.x;
    uint32_t r[4];
    if (what == "bad_ldmatrix_align") ldmatrix_x4(r, s.base + 16 * lane + (lane == 5 ? 8 : 0));
    if (what == "bad_ldmatrix_range") ldmatrix_x4(r, s.base + (lane == 7 ? kSmem : 16 * lane));
    if (what == "bad_cp_align" && lane == 3) { cp_async_16(s.base + 8, src, 16); cp_async_commit(); cp_async_wait<0>(); }
    if (what == "pending" && lane == 2) { cp_async_16(s.base, src, 16); cp_async_commit(); }
    if (what == "uncommitted" && lane == 2) { cp_async_16(s.base, src, 16); cp_async_wait<0>(); }
    if (what == "diverge") { if (lane < 16) ldmatrix_x4(r, s.base + 16 * lane); else __syncwarp(); }
    if (what == "exited" && lane != 3) ldmatrix_x4(r, s.base + 16 * lane);
  }, s.base);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "ldmatrix") return ldmatrix_scenario();
  if (cmd == "cpasync") return cpasync_scenario();
  if (cmd == "shfl") return shfl_scenario();
  if (cmd == "mma" && argc == 7) {
    const bool f16 = std::string(argv[2]) == "f16", nk = std::string(argv[4]) == "nk";
    return f16 ? mma_scenario<__half>(atoi(argv[3]), nk, argv[5], argv[6])
               : mma_scenario<__nv_bfloat16>(atoi(argv[3]), nk, argv[5], argv[6]);
  }
  if (cmd == "reuse" && argc == 5)
    return std::string(argv[2]) == "f16" ? reuse_scenario<__half>(argv[3], argv[4]) : reuse_scenario<__nv_bfloat16>(argv[3], argv[4]);
  if (cmd.rfind("bad_", 0) == 0 || cmd == "pending" || cmd == "uncommitted" || cmd == "diverge" || cmd == "exited") return misuse_scenario(cmd);
  std::fprintf(stderr, "usage: see the comment at the top of mma_selftest.cpp\n");
  return 2;
}
