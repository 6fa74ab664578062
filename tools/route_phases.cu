// Where the fused decode router's time goes: builds router.cu with a timer mark per phase of
// route_decode_kernel (ASA_ROUTE_PHASE) and runs it on one decode step (B = 1, Hq = 32, Hkv = 8,
// D = 128, bf16, select_per 1, block_size 128, causal; caller-kept key statistics for all but the
// last block, which the kernel pools) with clusters of 16, 8, 4 and 2 CTAs. Prints, per cluster
// size, the clusters the device co-schedules, the mean of each phase over the CTAs (global timer,
// ns), the spread of the CTAs' start times, and the event time per launch.
//
// Build and run on the GPU machine (links the library for the rest of the core):
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -Iplugins/core/include -Iplugins/core/cuda -Iplugins/core/common tools/route_phases.cu \
//     -o /tmp/route_phases -L<lib dir> -lasa_cuda -Xlinker -rpath=<lib dir>
//   /tmp/route_phases [kv=131072] [tau=0.1]
#include <cstdio>
#include <cstdlib>
#include <vector>

constexpr int kPhases = 14;
constexpr int kMaxCtas = 256;
__device__ unsigned long long g_phase_ns[kMaxCtas][kPhases];

// Thread 0 of each CTA stamps the global timer (ns, one clock for all SMs) at mark i.
#define ASA_ROUTE_PHASE(i)                                                                    \
  do {                                                                                        \
    if (threadIdx.x == 0) {                                                                   \
      unsigned long long t_;                                                                  \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                \
      g_phase_ns[blockIdx.x % kMaxCtas][i] = t_;                                              \
    }                                                                                         \
  } while (0)

#ifndef ROUTER_CU  // another router.cu to compare (-DROUTER_CU=\"path\")
#define ROUTER_CU "../plugins/core/cuda/router.cu"
#endif
#include ROUTER_CU
#include "asa/asa_cuda.h"
#include "decode_step.cuh"

// Runs `launch` (one launch of `ctas` CTAs) 200 times after 10 warm-ups and prints the event
// time per launch, the spread of the CTAs' start times, the span from the first start to the
// last end, and the mean of phases 1..last over the CTAs.
template <typename Launch>
void time_phases(int ctas, int last, const char* const* names, Launch launch) {
  const int reps = 200;
  std::vector<double> phase(kPhases, 0.0);
  double spread = 0.0, span = 0.0;
  float total_ms = 0.f;
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int r = 0; r < reps + 10; ++r) {
    CHECK(cudaEventRecord(start));
    CHECK(launch());
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    CHECK(cudaGetLastError());
    unsigned long long ns[kMaxCtas][kPhases];
    CHECK(cudaMemcpyFromSymbol(ns, g_phase_ns, sizeof(ns)));
    if (r < 10) continue;  // warm-up
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    total_ms += ms;
    unsigned long long first = ~0ull, last_start = 0, end = 0;
    for (int c = 0; c < ctas; ++c) {
      first = ns[c][0] < first ? ns[c][0] : first;
      last_start = ns[c][0] > last_start ? ns[c][0] : last_start;
      end = ns[c][last] > end ? ns[c][last] : end;
      for (int i = 1; i <= last; ++i) phase[i] += static_cast<double>(ns[c][i] - ns[c][i - 1]);
    }
    spread += static_cast<double>(last_start - first);
    span += static_cast<double>(end - first);
  }
  std::printf("    event %.2f us per launch, CTA start spread %.2f us, first start to last end "
              "%.2f us\n", 1e3 * total_ms / reps, spread / reps / 1e3, span / reps / 1e3);
  for (int i = 1; i <= last; ++i) {
    std::printf("    %-48s %7.2f us\n", names[i], phase[i] / (reps * ctas) / 1e3);
  }
  std::fflush(stdout);  // kept if a later launch hangs and the caller's timeout kills the tool
}

int main(int argc, char** argv) {
  const int kv = argc > 1 ? std::atoi(argv[1]) : 131072;
  const float tau = argc > 2 ? static_cast<float>(std::atof(argv[2])) : 0.1f;
  AsaParams p = decode_step_params(kv, tau);
  const int nk = asa::cuda::cdiv(kv, p.block_size);
  const int lists = p.heads_kv;
  alloc_decode_tensors(p, /*v_is_k=*/true);
  float* stats = nullptr;
  CHECK(cudaMalloc(&stats, static_cast<size_t>(lists) * nk * p.head_dim * sizeof(float)));
  CHECK(asa_cuda_key_block_stats(&p, stats, 0, nullptr));
  p.key_block_stats = stats;
  p.key_block_stats_blocks = nk - 1;
  p.key_block_stats_capacity = nk;
  int32_t *indices = nullptr, *counts = nullptr, *visible = nullptr;
  CHECK(cudaMalloc(&indices, static_cast<size_t>(lists) * nk * sizeof(int32_t)));
  CHECK(cudaMalloc(&counts, lists * sizeof(int32_t)));
  CHECK(cudaMalloc(&visible, sizeof(int32_t)));
  asa::cuda::Workspace ws{};
  ws.block_indices = indices;
  ws.block_counts = counts;
  ws.visible_counts = visible;
  const asa::cuda::KeyRows rows{nullptr, stats, nk - 1, nk};
  CHECK(cudaDeviceSynchronize());

  const char* names[kPhases] = {"start",
                                "flags + visible / candidate counts",
                                "q mean + last block's k mean (before the wait)",
                                "logits of the own blocks",
                                "cluster wait + (max, sum of exp) + barrier 1",
                                "combine the pairs",
                                "P + scatter + barrier 3",
                                "rank keys + ranks + scatter + barrier 4",
                                "walk",
                                "kept + count + barrier 5",
                                "list writes",
                                "fused step: plan + first copies",
                                "fused step: attention of the items",
                                "fused step: cluster merge + output"};
  std::printf("route_decode_kernel, KV %d (NK %d), tau %.3f, %d lists\n", kv, nk, tau, lists);
  for (int C = 16; C >= 2; C /= 2) {
    const int ctas = lists * C;
    int clusters = 0;
    {
      const asa::cuda::RouteLaunch launch(
          C, ctas, asa::cuda::route_decode_smem(4, 128, asa::cuda::cdiv(nk, C), nk), nullptr,
          false);
      CHECK(cudaOccupancyMaxActiveClusters(&clusters, asa::cuda::route_decode_kernel<__nv_bfloat16>,
                                           &launch.cfg));
    }
    std::printf("C = %2d: %d co-resident clusters\n", C, clusters);
    time_phases(ctas, 10, names, [&] {
      return asa::cuda::launch_route_decode<__nv_bfloat16>(p, ws, rows, C, lists, nullptr);
    });
    int count_host[64] = {};
    CHECK(cudaMemcpy(count_host, counts, lists * sizeof(int32_t), cudaMemcpyDeviceToHost));
    int kept = 0;
    for (int c = 0; c < lists; ++c) kept += count_host[c];
    std::printf("    density %.3f\n", static_cast<double>(kept) / (lists * nk));
  }

#ifdef ASA_CUDA_FUSED_DECODE_CUH_  // not in a router.cu from before the fused step (OLD_ROUTER)
  // The fused decode step (fused_decode.cuh): the same router, then its plan, attention and
  // cluster merge, with the cluster size and K/V slots the library would choose.
  setenv("ASA_CUDA_FUSED_DECODE", "1", 1);
  std::printf("fused step: co-resident clusters of C CTAs at one CTA per multiprocessor (%zu "
              "bytes of shared memory each):", asa::cuda::fused_decode_smem_limit());
  for (int c = 16; c >= 2; --c) std::printf(" C=%d: %d", c, asa::cuda::fused_decode_clusters(c));
  std::printf("\n");
  asa::cuda::step::StepSizes z{};
  const int C = asa::cuda::fused_decode_cluster(p, &z);
  if (C == 0) {
    std::printf("fused step: not run for these params on this device\n");
    return 0;
  }
  std::printf("fused step: C = %d, %d K/V slots, %zu bytes of dynamic shared memory\n", C,
              z.nslots, asa::cuda::fused_decode_smem(z));
  std::fflush(stdout);
  time_phases(lists * C, 13, names,
              [&] { return asa::cuda::launch_fused_decode(p, ws, nullptr); });
#endif
  return 0;
}
