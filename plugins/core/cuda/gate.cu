// Learned gate of the CUDA router (SPEC.md "Router (learned gate)"): the block embeddings that
// replace q̄ / k̄ in the logits GEMM when the params carry gate weights. All float32:
//   f_k  = concat(mean, max, min) of the kept keys of key block k          [B, Hkv, NK, 3·D]
//   qemb = q̄ · gate_q_weight[h]                                            [B, Hq, NQ, Dg]
//   kemb = f_k · gate_k_weight[h / G]                                      [B, Hkv, NK, Dg]
// The router then computes logits = qemb · kemb (no scale) with its usual GEMM.
#include "common.cuh"
#include "kernels.h"

namespace asa {
namespace cuda {
namespace {

constexpr int kFeatThreads = 128;
constexpr int kProjThreads = 256;

// Key features of blocks k = first + blockIdx.x into kfeat [B, Hkv, cap, 3·D]; one CTA per
// (key block, KV head, batch); thread d walks the block's keys in order, so the mean's float32
// sum is sequential over keys like the CPU core's. A block without a kept key gets zeros (it is
// invisible; zeros keep inf out of the projection).
template <typename T>
__global__ void key_features_kernel(AsaParams p, float* kfeat, int first, int cap) {
  const int k = first + blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int D = p.head_dim;
  const int j0 = k * p.block_size;
  const int j1 = min(j0 + p.block_size, p.seq_kv);
  const T* key = static_cast<const T*>(p.k) + n * p.k_stride_b + h * p.k_stride_h;
  float* out = kfeat + ((static_cast<int64_t>(n) * p.heads_kv + h) * cap + k) * 3 * D;
  for (int d = threadIdx.x; d < D; d += kFeatThreads) {
    float sum = 0.f, mx = -INFINITY, mn = INFINITY;
    int count = 0;
    for (int j = j0; j < j1; ++j) {
      if (!key_kept(p, n, j)) continue;
      const float x = to_float(key[j * p.k_stride_s + d]);
      sum += x;
      mx = fmaxf(mx, x);
      mn = fminf(mn, x);
      ++count;
    }
    out[d] = count > 0 ? sum / static_cast<float>(count) : 0.f;
    out[D + d] = count > 0 ? mx : 0.f;
    out[2 * D + d] = count > 0 ? mn : 0.f;
  }
}

// y[row, g] = Σ_i x[row, i] · w[head(row), i, g] for rows of x laid out [B, H, NB, in], where
// rows with block index < cached_blocks come from `cached` ([B, H, cap, in]) instead: one thread
// per output element; lanes of a warp share the row (broadcast reads of x) and read consecutive
// columns of w (coalesced). The sum runs over i in order, as in the CPU core.
__global__ void project_kernel(const float* x, const float* cached, int cached_blocks, int cap,
                               const float* w, int heads, int nb, int in_dim, int out_dim,
                               int64_t total, float* y) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kProjThreads + threadIdx.x;
  if (t >= total) return;
  const int64_t row = t / out_dim;
  const int g = static_cast<int>(t % out_dim);
  const int64_t bh = row / nb;
  const int blk = static_cast<int>(row % nb);
  const int h = static_cast<int>(bh % heads);
  const float* xr = blk < cached_blocks ? cached + (bh * cap + blk) * in_dim : x + row * in_dim;
  const float* wh = w + static_cast<int64_t>(h) * in_dim * out_dim + g;
  float acc = 0.f;
  for (int i = 0; i < in_dim; ++i) acc += xr[i] * wh[static_cast<int64_t>(i) * out_dim];
  y[t] = acc;
}

template <typename T>
void launch_key_features_t(const AsaParams& p, float* kfeat, int first, int cap,
                           cudaStream_t stream) {
  const int nk = cdiv(p.seq_kv, p.block_size);
  if (first >= nk) return;
  key_features_kernel<T><<<dim3(nk - first, p.heads_kv, p.batch), kFeatThreads, 0, stream>>>(
      p, kfeat, first, cap);
}

}  // namespace

void launch_key_features(const AsaParams& p, float* kfeat, int first, int cap,
                         cudaStream_t stream) {
  switch (p.dtype) {
    case ASA_FLOAT32: launch_key_features_t<float>(p, kfeat, first, cap, stream); break;
    case ASA_FLOAT16: launch_key_features_t<__half>(p, kfeat, first, cap, stream); break;
    default: launch_key_features_t<__nv_bfloat16>(p, kfeat, first, cap, stream); break;
  }
}

void launch_gate_project(const float* x, const float* cached, int cached_blocks, int cap,
                         const float* w, int batch, int heads, int nb, int in_dim, int out_dim,
                         float* y, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(batch) * heads * nb * out_dim;
  const int64_t blocks = (total + kProjThreads - 1) / kProjThreads;
  project_kernel<<<static_cast<unsigned>(blocks), kProjThreads, 0, stream>>>(
      x, cached, cached_blocks, cap, w, heads, nb, in_dim, out_dim, total, y);
}

cudaError_t launch_gate(const AsaParams& p, const float* qbar, const GateScratch& g,
                        cudaStream_t stream) {
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  launch_key_features(p, g.kfeat, 0, nk, stream);
  launch_gate_project(qbar, nullptr, 0, 1, p.gate_q_weight, p.batch, p.heads_q, nq, p.head_dim,
                      p.gate_dim, g.qemb, stream);
  launch_gate_project(g.kfeat, nullptr, 0, 1, p.gate_k_weight, p.batch, p.heads_kv, nk,
                      3 * p.head_dim, p.gate_dim, g.kemb, stream);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace asa
