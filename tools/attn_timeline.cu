// Where the decode attention's time goes: builds attention_mma.cu with a global-timer mark per
// CTA at the split-KV kernel's milestones (ASA_ATTN_MARK) and the merge kernel's
// (ASA_MERGE_MARK), routes one decode step with the library (B = 1, Hq = 32, Hkv = 8, D = 128,
// bf16, select_per 1, block_size 128, causal, threshold tau), then times the attention and merge
// launches alone. Prints, relative to the first CTA's start and averaged over launches: when the
// CTAs pass the wait, hold their slice's list, have their first K/V tile, leave the tile loop and
// end (min / median / max over CTAs), the end by tiles per CTA (the split's imbalance), the K/V
// bytes over the streaming span, and the merge kernel's marks.
//
// Build and run on the GPU machine (links the library for the router and the rest of the core):
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -Iplugins/core/include -Iplugins/core/cuda -Iplugins/core/common tools/attn_timeline.cu \
//     -o /tmp/attn_timeline -L<lib dir> -lasa_cuda -Xlinker -rpath=<lib dir>
//   /tmp/attn_timeline [kv=131072] [tau=0.1]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

constexpr int kAttnMarks = 6;
constexpr int kMergeMarks = 3;
constexpr int kMaxCtas = 1024;
__device__ unsigned long long g_attn_ns[kMaxCtas][kAttnMarks];
__device__ unsigned long long g_merge_ns[kMaxCtas][kMergeMarks];

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ int linear_cta() {
  return static_cast<int>(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
}

// Thread 0 of each CTA stamps the global timer (one clock for all SMs). The arrays are zeroed
// before each launch: a CTA whose slice has no tile leaves the tile mark at 0 (not counted).
#define ASA_ATTN_MARK(i)                                                                      \
  do {                                                                                        \
    if (threadIdx.x == 0) g_attn_ns[linear_cta() % kMaxCtas][i] = global_ns();                \
  } while (0)
#define ASA_MERGE_MARK(i)                                                                     \
  do {                                                                                        \
    if (threadIdx.x == 0) g_merge_ns[linear_cta() % kMaxCtas][i] = global_ns();               \
  } while (0)

#include "../plugins/core/cuda/attention_mma.cu"
#include "asa/asa_cuda.h"
#include "decode_step.cuh"

namespace {

struct Spread {
  double min = 0, median = 0, max = 0;
};

Spread spread_of(std::vector<double> v) {
  Spread s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.min = v.front();
  s.median = v[v.size() / 2];
  s.max = v.back();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const int kv = argc > 1 ? std::atoi(argv[1]) : 131072;
  const float tau = argc > 2 ? static_cast<float>(std::atof(argv[2])) : 0.1f;
  AsaParams p = decode_step_params(kv, tau);
  const int nk = asa::cuda::cdiv(kv, p.block_size);
  const int lists = p.batch * p.heads_kv;  // select_per 1, one query block
  alloc_decode_tensors(p, /*v_is_k=*/false);
  int32_t *indices = nullptr, *counts = nullptr;
  CHECK(cudaMalloc(&indices, static_cast<size_t>(lists) * nk * sizeof(int32_t)));
  CHECK(cudaMalloc(&counts, lists * sizeof(int32_t)));
  p.block_indices = indices;
  p.block_counts = counts;
  const size_t bytes = asa_cuda_workspace_size(&p);
  void* workspace = nullptr;
  CHECK(cudaMalloc(&workspace, bytes));
  CHECK(asa_cuda_route(&p, workspace, bytes, nullptr));  // the library's router, once

  asa::cuda::Workspace ws{};
  ws.block_indices = indices;
  ws.block_counts = counts;
  ws.splits = asa::cuda::choose_splits(p);
  const size_t rows = static_cast<size_t>(p.batch) * p.heads_q * p.seq_q;
  CHECK(cudaMalloc(&ws.part_o, ws.splits * rows * p.head_dim_v * sizeof(float)));
  CHECK(cudaMalloc(&ws.part_lse, ws.splits * rows * sizeof(float)));
  std::vector<int32_t> count_host(lists);
  CHECK(cudaMemcpy(count_host.data(), counts, lists * sizeof(int32_t), cudaMemcpyDeviceToHost));

  // Tiles of each attention CTA (grid 1 x Hkv x B·splits, packed decode): split s of list l
  // takes tiles [s·T/S, (s+1)·T/S) of the list's T = count · (block_size / 64).
  const int ctas = lists * ws.splits;
  std::vector<int> tiles(ctas);
  long long total_tiles = 0;
  for (int c = 0; c < ctas; ++c) {
    const int hkv = c % p.heads_kv, z = c / p.heads_kv;
    const int n = z / ws.splits, s = z % ws.splits;
    const long long T = static_cast<long long>(count_host[n * p.heads_kv + hkv]) *
                        (p.block_size / asa::cuda::kBN);
    tiles[c] = static_cast<int>((s + 1) * T / ws.splits - s * T / ws.splits);
    total_tiles += tiles[c];
  }
  const double kv_bytes = static_cast<double>(total_tiles) * 2 * asa::cuda::kBN * p.head_dim * 2;

  void* attn_marks = nullptr;
  void* merge_marks = nullptr;
  CHECK(cudaGetSymbolAddress(&attn_marks, g_attn_ns));
  CHECK(cudaGetSymbolAddress(&merge_marks, g_merge_ns));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  const int reps = 200, warmup = 10;
  const char* names[kAttnMarks] = {"start", "past the wait", "slice's list in shared memory",
                                   "first K/V tile landed", "tile loop done", "end"};
  std::vector<std::vector<double>> attn_sum(kAttnMarks, std::vector<double>(3, 0.0));
  std::vector<double> merge_sum(kMergeMarks * 2, 0.0);
  std::vector<double> end_by_tiles(64, 0.0), n_by_tiles(64, 0.0);
  double event_us = 0.0, stream_span = 0.0;
  for (int r = 0; r < reps + warmup; ++r) {
    CHECK(cudaMemset(attn_marks, 0, sizeof(g_attn_ns)));
    CHECK(cudaMemset(merge_marks, 0, sizeof(g_merge_ns)));
    CHECK(cudaEventRecord(start));
    CHECK(asa::cuda::launch_mma_kernels(p, ws, nullptr));
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    CHECK(cudaGetLastError());
    if (r < warmup) continue;
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    event_us += 1e3 * ms;
    std::vector<unsigned long long> a(static_cast<size_t>(kMaxCtas) * kAttnMarks);
    std::vector<unsigned long long> m(static_cast<size_t>(kMaxCtas) * kMergeMarks);
    CHECK(cudaMemcpy(a.data(), attn_marks, a.size() * 8, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(m.data(), merge_marks, m.size() * 8, cudaMemcpyDeviceToHost));
    unsigned long long t0 = ~0ull;
    for (int c = 0; c < ctas; ++c) t0 = std::min(t0, a[c * kAttnMarks]);
    double first_tile = 1e30, last_end = 0;
    for (int i = 0; i < kAttnMarks; ++i) {
      std::vector<double> v;
      for (int c = 0; c < ctas; ++c) {
        const unsigned long long t = a[c * kAttnMarks + i];
        if (t != 0) v.push_back(static_cast<double>(t - t0) / 1e3);
      }
      const Spread s = spread_of(v);
      attn_sum[i][0] += s.min;
      attn_sum[i][1] += s.median;
      attn_sum[i][2] += s.max;
      if (i == 3) first_tile = s.min;
      if (i == kAttnMarks - 1) last_end = s.max;
    }
    stream_span += last_end - first_tile;
    for (int c = 0; c < ctas; ++c) {
      const int t = std::min(tiles[c], 63);
      end_by_tiles[t] += static_cast<double>(a[c * kAttnMarks + kAttnMarks - 1] - t0) / 1e3;
      n_by_tiles[t] += 1;
    }
    const int merges = p.batch * p.heads_q * p.seq_q;
    for (int i = 0; i < kMergeMarks; ++i) {
      double lo = 1e30, hi = 0;
      for (int c = 0; c < merges; ++c) {
        const double t = (static_cast<double>(m[c * kMergeMarks + i]) - static_cast<double>(t0)) / 1e3;
        lo = std::min(lo, t);
        hi = std::max(hi, t);
      }
      merge_sum[2 * i] += lo;
      merge_sum[2 * i + 1] += hi;
    }
  }
  std::printf("decode attention, KV %d (NK %d), tau %.3f: %d CTAs (%d splits x %d lists), "
              "%lld K/V tiles (%.1f MB), event %.2f us per launch (attention + merge)\n",
              kv, nk, tau, ctas, ws.splits, lists, total_tiles, kv_bytes / 1e6, event_us / reps);
  std::printf("  us from the first CTA's start        min   median      max\n");
  for (int i = 0; i < kAttnMarks; ++i) {
    std::printf("  %-34s %7.2f %8.2f %8.2f\n", names[i], attn_sum[i][0] / reps,
                attn_sum[i][1] / reps, attn_sum[i][2] / reps);
  }
  std::printf("  K/V bytes / (last end - first tile landed): %.2f TB/s over %.2f us\n",
              kv_bytes / (stream_span / reps * 1e-6) / 1e12, stream_span / reps);
  std::printf("  mean end by tiles per CTA:");
  for (int t = 0; t < 64; ++t) {
    if (n_by_tiles[t] > 0) {
      std::printf("  %d tiles: %.2f us (%d CTAs)", t, end_by_tiles[t] / n_by_tiles[t],
                  static_cast<int>(n_by_tiles[t] / reps));
    }
  }
  std::printf("\n  merge (first CTA .. last CTA): start %.2f .. %.2f, past the wait %.2f .. %.2f, "
              "end %.2f .. %.2f us\n",
              merge_sum[0] / reps, merge_sum[1] / reps, merge_sum[2] / reps, merge_sum[3] / reps,
              merge_sum[4] / reps, merge_sum[5] / reps);
  return 0;
}
