// Runs csrc/cuda/rms_norm.cu's kernels under the host emulation (emu.h), as its launcher runs them on a GPU:
// the folded kernel as a cooperative launch (every block started at once, one grid-wide barrier over
// all their threads), or the unfolded kernel followed by the stand-alone reduce kernel.
//   rms_norm_backward_emulated IN OUT rows cols dtype(0 = fp32, 1 = fp16, 2 = bf16) w_fp32 residual grid folded
//                              general
// IN holds, contiguous: dy, x [rows, cols] in the dtype, w [cols] (fp32 if w_fp32, else the dtype), fp32 rstd
// [rows], then dresidual [rows, cols] if residual. OUT receives dx then dw, in their dtypes.
// general = 1 runs the any-width kernel even where the register kernel would serve.
// kernel_emu.cpp is the .cu with its launchers cut off (tests/test_cuda_emulation.py).
#include "kernel_emu.cpp"
#include <memory>
#include <thread>
#include <vector>

using namespace llama_fast;

// Every block of `grid` at once when `cooperative` (the grid barrier needs them all), else block by block.
template <typename F>
void run_grid(int grid, int threads, bool cooperative, F body) {
  const int waves = cooperative ? 1 : grid, per_wave = cooperative ? grid : 1;
  std::barrier<> grid_bar(per_wave * threads);
  for (int wave = 0; wave < waves; ++wave) {
    std::vector<std::unique_ptr<std::barrier<>>> block_bars, warp_bars;
    std::vector<EmuWarpScratch> scratch(per_wave * ((threads + 31) / 32));
    std::vector<std::vector<float>> smem(per_wave, std::vector<float>(threads / 32 + 1));  // __shared__ scratch
    for (int b = 0; b < per_wave; ++b) block_bars.emplace_back(new std::barrier<>(threads));
    for (size_t w = 0; w < scratch.size(); ++w) warp_bars.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> pool;
    for (int b = 0; b < per_wave; ++b)
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, b, t] {
          const int warp = b * ((threads + 31) / 32) + t / 32;
          threadIdx = dim3(t); blockIdx = dim3(unsigned(wave * per_wave + b)); blockDim = dim3(threads);
          gridDim = dim3(grid);
          emu_block_barrier = block_bars[b].get(); emu_warp_barrier = warp_bars[warp].get();
          emu_warp_scratch = &scratch[warp]; emu_grid_barrier = cooperative ? &grid_bar : nullptr;
          emu_smem_ptr = reinterpret_cast<unsigned char*>(smem[b].data()); emu_smem_bytes = 0;
          body();
          emu_thread_exit();
        });
    for (auto& th : pool) th.join();
  }
}

// The launcher's choice of phase-one kernel (pick_kernel in rms_norm.cu), or the general one if asked.
template <typename T, typename W, bool FOLD>
void phase_one(const RmsNormBackwardArgs& a, float* partials, int grid, bool general) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t per_iter = int64_t(kThreads) * VEC;
  const bool vec = !general && a.cols % VEC == 0;  // the driver's buffers are 16-byte aligned
  run_grid(grid, kThreads, FOLD, [&] {
    if (vec && a.cols <= per_iter) rms_norm_backward_registers<T, W, VEC, 1, FOLD>(a, partials);
    else if (vec && a.cols <= 2 * per_iter) rms_norm_backward_registers<T, W, VEC, 2, FOLD>(a, partials);
    else if (vec && a.cols <= 4 * per_iter) rms_norm_backward_registers<T, W, VEC, 4, FOLD>(a, partials);
    else rms_norm_backward_general<T, W, FOLD>(a, partials);
  });
}

template <typename T, typename W>
void run(FILE* in, FILE* out, int64_t rows, int64_t cols, bool residual, int grid, bool folded, bool general) {
  auto read = [&](auto& v, size_t n) { v.resize(n); if (fread(v.data(), sizeof(v[0]), n, in) != n) std::abort(); };
  std::vector<T> dy, x, dres, dx(rows * cols);
  std::vector<W> w, dw(cols);
  std::vector<float> rstd;
  read(dy, rows * cols); read(x, rows * cols); read(w, cols); read(rstd, rows);
  if (residual) read(dres, rows * cols);
  std::memset(dx.data(), 0xff, dx.size() * sizeof(T));  // NaN: an unwritten element shows
  std::memset(dw.data(), 0xff, dw.size() * sizeof(W));
  std::vector<float> partials(size_t(grid) * cols, std::nanf(""));  // read before written: NaN shows
  RmsNormBackwardArgs a{};
  a.dy = dy.data(); a.dy_row_stride = cols; a.x = x.data(); a.x_row_stride = cols; a.w = w.data();
  a.rstd = rstd.data(); a.dresidual = residual ? dres.data() : nullptr; a.dx = dx.data(); a.dw = dw.data();
  a.rows = rows; a.cols = cols;
  if (folded) {
    phase_one<T, W, true>(a, partials.data(), grid, general);
  } else {
    phase_one<T, W, false>(a, partials.data(), grid, general);
    const int blocks = int((cols + 255) / 256);
    run_grid(blocks, 256, false, [&] { rms_norm_backward_reduce<W>(partials.data(), grid, cols, static_cast<W*>(a.dw)); });
  }
  fwrite(dx.data(), sizeof(T), dx.size(), out);
  fwrite(dw.data(), sizeof(W), dw.size(), out);
}

template <typename T>
void with_w(bool w_fp32, FILE* in, FILE* out, int64_t rows, int64_t cols, bool res, int grid, bool fold, bool gen) {
  if (w_fp32) run<T, float>(in, out, rows, cols, res, grid, fold, gen);
  else run<T, T>(in, out, rows, cols, res, grid, fold, gen);
}

int main(int argc, char** argv) {
  if (argc != 11) return 2;
  const int64_t rows = atol(argv[3]), cols = atol(argv[4]);
  const int dtype = atoi(argv[5]), grid = atoi(argv[8]);
  const bool w_fp32 = atoi(argv[6]), residual = atoi(argv[7]), folded = atoi(argv[9]), general = atoi(argv[10]);
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (dtype == 0) run<float, float>(in, out, rows, cols, residual, grid, folded, general);
  else if (dtype == 1) with_w<__half>(w_fp32, in, out, rows, cols, residual, grid, folded, general);
  else with_w<__nv_bfloat16>(w_fp32, in, out, rows, cols, residual, grid, folded, general);
  fclose(in);
  fclose(out);
  return 0;
}
