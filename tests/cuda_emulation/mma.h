// nvcuda::wmma for the host emulation (see emu.h). Every lane holds and computes the whole 16 x 16
// tile, loaded by the documented semantics: row_major element (r, c) at p[r * ldm + c], col_major at
// p[c * ldm + r]. Pointers must be 256-bit aligned, as on the GPU; products accumulate in fp32.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <type_traits>
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment { float m[16][16]; };
template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) { for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) f.m[i][j] = v; }
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same_v<T, P>, "operand type");
  if ((reinterpret_cast<uintptr_t>(p) % 32) != 0) std::abort();  // wmma needs 256-bit aligned pointers
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    f.m[r][c] = emu_f(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (layout != mem_row_major || (reinterpret_cast<uintptr_t>(p) % 32) != 0) std::abort();
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.m[r][c];
}
template <typename FA, typename FB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const FA& a, const FB& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float t[16][16];
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) { float s = c.m[i][j]; for (int k = 0; k < 16; ++k) s += a.m[i][k] * b.m[k][j]; t[i][j] = s; }
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) d.m[i][j] = t[i][j];
}
}}
