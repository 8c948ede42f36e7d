// The CPU chunk pass alone (row_stats.h's row_stats, with the entropy term),
// timed in C++ on one thread: no Python, no allocation, no thread pool, so
// two builds of the row mathematics compare within a few percent where the
// Python benchmark's read floor drifts by 2x. Built against a source tree:
//
//   g++ -std=c++17 -O3 -ffp-contract=off -fno-trapping-math -fno-math-errno -Wno-psabi
//       -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mprefer-vector-width=512
//       -DPGEST_KERNEL_NS=avx512 -I<tree>/csrc/include -I<tree>/csrc/cpu bench/row_pass_loop.cpp -o /tmp/loop
//   (one command)
//   /tmp/loop [rows] [cols] [entropy 0|1]
//
// (-mavx2 -mfma -mf16c -DPGEST_KERNEL_NS=avx2 for AVX2; the CMake flags of
// each copy are in CMakeLists.txt.) Prints the best of 30 passes over
// randn * 2 rows and a checksum of the statistics: equal checksums, equal sums.
#include "row_stats.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace pgest::PGEST_KERNEL_NS;

template <bool kEntropy>
double pass(const std::vector<float>& x, int rows, int cols, double& check) {
  const int64_t nc = num_chunks(cols);
  std::vector<float> w(2 * nc), cm(nc), pad(kChunk);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < rows; ++i) {
    const auto rs = row_stats<kEntropy>(x.data() + size_t(i) * cols, cols, w.data(), cm.data(), pad.data());
    check += rs.z + rs.ex_dot;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 256, cols = argc > 2 ? std::atoi(argv[2]) : 32000;
  const bool entropy = argc > 3 ? std::atoi(argv[3]) != 0 : true;
  std::vector<float> x(size_t(rows) * cols);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (auto& v : x) v = normal(rng);
  double best = 1e30, check = 0;
  for (int rep = 0; rep < 30; ++rep) {
    const double t = entropy ? pass<true>(x, rows, cols, check) : pass<false>(x, rows, cols, check);
    best = t < best ? t : best;
  }
  std::printf("%d x %d, entropy %d: %.3f ms, %.2f ns per 16 entries, checksum %.17g\n", rows, cols, int(entropy),
              best * 1e3, best * 1e9 / (double(rows) * cols / 16), check);
}
