// Where the decode selection's time goes: builds router.cu with a clock mark per phase of
// select_kernel (ASA_SELECT_PHASE) and runs it on one decode step's logits (B = 1, Hq = 32,
// Hkv = 8, select_per 1, block_size 128, causal), printing the mean cycles of each phase over the
// 8 CTAs and many launches, and the kernel's time from CUDA events.
//
// Build and run on the GPU machine (links the library for the rest of the core):
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -Iplugins/core/include -Iplugins/core/cuda -Iplugins/core/common tools/select_phases.cu \
//     -o /tmp/select_phases -L<lib dir> -lasa_cuda -Xlinker -rpath=<lib dir>
//   /tmp/select_phases [kv=131072] [tau=0.1] [logit std]
// The logits are those of tools/bench_kernels.py's decode inputs: scale · q_h · k̄, q_h ~ N(0, 1)
// per query head and k̄ ~ N(0, 1 / block_size) per (KV head, key block), shared by the group's
// heads (standard deviation ~0.09). A logit std given instead draws every logit on its own,
// the model before BENCHMARKS.md optimization step 41, where this tool and the real step
// disagreed about select_kernel's time.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

constexpr int kPhases = 9;
constexpr int kMaxCtas = 64;
__device__ long long g_phase_clock[kMaxCtas][kPhases];

// Thread 0 of each CTA stamps the SM clock at mark i.
#define ASA_SELECT_PHASE(i)                                                                   \
  do {                                                                                        \
    if (threadIdx.x == 0) g_phase_clock[blockIdx.y % kMaxCtas][i] = clock64();                \
  } while (0)

#include "../plugins/core/cuda/router.cu"
#include "decode_step.cuh"

int main(int argc, char** argv) {
  const int kv = argc > 1 ? std::atoi(argv[1]) : 131072;
  const float tau = argc > 2 ? static_cast<float>(std::atof(argv[2])) : 0.1f;
  const float sd = argc > 3 ? static_cast<float>(std::atof(argv[3])) : 0.f;  // 0: q · k̄ model
  AsaParams p = decode_step_params(kv, tau);
  const int nk = asa::cuda::cdiv(kv, p.block_size);
  const int lists = p.heads_kv;
  const int D = p.head_dim, G = p.heads_q / p.heads_kv;

  std::vector<float> host(static_cast<size_t>(p.heads_q) * nk);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  if (sd > 0.f) {
    for (float& x : host) x = sd * normal(gen);
  } else {
    std::vector<float> q(static_cast<size_t>(p.heads_q) * D), kbar(static_cast<size_t>(nk) * D);
    for (float& x : q) x = normal(gen);
    const float kbar_sd = 1.f / std::sqrt(static_cast<float>(p.block_size));
    for (int hk = 0; hk < p.heads_kv; ++hk) {
      for (float& x : kbar) x = kbar_sd * normal(gen);
      for (int h = hk * G; h < (hk + 1) * G; ++h) {
        for (int k = 0; k < nk; ++k) {
          float dot = 0.f;
          const float* qh = q.data() + static_cast<size_t>(h) * D;
          const float* kk = kbar.data() + static_cast<size_t>(k) * D;
          for (int d = 0; d < D; ++d) dot += qh[d] * kk[d];
          host[static_cast<size_t>(h) * nk + k] = p.scale * dot;
        }
      }
    }
  }
  float* logits = nullptr;
  int32_t *indices = nullptr, *counts = nullptr, *visible = nullptr;
  CHECK(cudaMalloc(&logits, host.size() * sizeof(float)));
  CHECK(cudaMalloc(&indices, static_cast<size_t>(lists) * nk * sizeof(int32_t)));
  CHECK(cudaMalloc(&counts, lists * sizeof(int32_t)));
  CHECK(cudaMalloc(&visible, sizeof(int32_t)));
  CHECK(cudaMemcpy(logits, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  asa::cuda::Workspace ws{};
  ws.logits = logits;
  ws.block_indices = indices;
  ws.block_counts = counts;
  ws.visible_counts = visible;

  const size_t smem = asa::cuda::select_smem_bytes(p);
  auto kernel = asa::cuda::select_kernel;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)));
  const int reps = 200;
  std::vector<double> sum(kPhases, 0.0);
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  float total_ms = 0.f;
  for (int r = 0; r < reps + 10; ++r) {
    CHECK(cudaEventRecord(start));
    kernel<<<dim3(1, lists, 1), asa::cuda::kSelectThreads, smem>>>(p, ws, logits,
                                                                   asa::cuda::next_pow2(nk));
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    CHECK(cudaGetLastError());
    long long clocks[kMaxCtas][kPhases];
    CHECK(cudaMemcpyFromSymbol(clocks, g_phase_clock, sizeof(clocks)));
    if (r < 10) continue;  // warm-up
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    total_ms += ms;
    for (int c = 0; c < lists; ++c) {
      for (int i = 1; i < kPhases; ++i) sum[i] += clocks[c][i] - clocks[c][i - 1];
      sum[0] += clocks[c][kPhases - 1] - clocks[c][0];
    }
  }
  int count_host[64] = {};
  CHECK(cudaMemcpy(count_host, counts, lists * sizeof(int32_t), cudaMemcpyDeviceToHost));
  int kept = 0;
  for (int c = 0; c < lists; ++c) kept += count_host[c];
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const char* names[kPhases] = {"total (first to last mark)", "flags + visible count",
                                "softmax (3 passes)", "group average",
                                "forced flags + sum, sort keys", "sort", "walk",
                                "mark kept (+ ties)", "compaction + -1 fill"};
  std::printf("select_kernel, KV %d (NK %d), tau %.3f, logits %s: density %.3f, "
              "event time %.2f us per launch (incl. launch), SM clock attr %d MHz\n",
              kv, nk, tau, sd > 0.f ? "independent" : "q . shared k-bar",
              static_cast<double>(kept) / (lists * nk),
              1e3 * total_ms / reps, clock_khz / 1000);
  for (int i = 0; i < kPhases; ++i) {
    const double cycles = sum[i] / (reps * lists);
    std::printf("  %-30s %9.0f cycles  %6.2f us at %d MHz\n", names[i], cycles,
                cycles * 1e3 / clock_khz, clock_khz / 1000);
  }
  return 0;
}
