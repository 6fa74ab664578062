// Simple block-sparse attention: one warp per query row, float32 arithmetic, any dtype and any
// head dims up to 256. The path for float32 models and tests, and the fallback for shapes the
// tensor-core kernel does not take (other head dims, unaligned strides).
#include "common.cuh"
#include "kernels.h"

namespace asa {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head dims up to 8 * 32 = 256

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) attn_simple_kernel(AsaParams p, Workspace ws) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = blockIdx.x * kWarps + warp, h = blockIdx.y, n = blockIdx.z;
  if (r >= p.seq_q) return;
  const int G = p.heads_q / p.heads_kv, hkv = h / G;
  const int bs = p.block_size;
  const int nq = cdiv(p.seq_q, bs), nk = cdiv(p.seq_kv, bs);
  const int hsel_count = p.select_per ? p.heads_kv : p.heads_q;
  const int64_t row =
      (static_cast<int64_t>(n) * hsel_count + (p.select_per ? hkv : h)) * nq + r / bs;
  const int count = ws.block_counts[row];
  const int32_t* list = ws.block_indices + row * nk;
  const int pos = r + p.seq_kv - p.seq_q;

  const T* qg = static_cast<const T*>(p.q) + n * p.q_stride_b + h * p.q_stride_h +
                static_cast<int64_t>(r) * p.q_stride_s;
  const T* kg = static_cast<const T*>(p.k) + n * p.k_stride_b + hkv * p.k_stride_h;
  const T* vg = static_cast<const T*>(p.v) + n * p.v_stride_b + hkv * p.v_stride_h;
  const T* bias = static_cast<const T*>(p.bias);

  float q[kMaxPerLane], o[kMaxPerLane];
#pragma unroll
  for (int u = 0; u < kMaxPerLane; ++u) {
    const int d = lane + 32 * u;
    q[u] = d < p.head_dim ? to_float(qg[d]) : 0.f;
    o[u] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int c = 0; c < count; ++c) {
    const int j0 = list[c] * bs;
    const int j1 = min(j0 + bs, p.seq_kv);
    for (int j = j0; j < j1; ++j) {
      if (!position_visible(p, pos, j) || !key_kept(p, n, j)) continue;
      const T* kj = kg + static_cast<int64_t>(j) * p.k_stride_s;
      float s = 0.f;
#pragma unroll
      for (int u = 0; u < kMaxPerLane; ++u) {
        const int d = lane + 32 * u;
        if (d < p.head_dim) s += q[u] * to_float(kj[d]);
      }
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      s *= p.scale;
      if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
      if (bias) {
        s += to_float(bias[n * p.bias_stride_b + h * p.bias_stride_h + r * p.bias_stride_q +
                           j * p.bias_stride_k]);
      }
      const float m_new = fmaxf(m, s);
      const float alpha = m == -INFINITY ? 0.f : expf(m - m_new);
      const float pj = expf(s - m_new);
      l = l * alpha + pj;
      const T* vj = vg + static_cast<int64_t>(j) * p.v_stride_s;
#pragma unroll
      for (int u = 0; u < kMaxPerLane; ++u) {
        const int d = lane + 32 * u;
        o[u] = o[u] * alpha + (d < p.head_dim_v ? pj * to_float(vj[d]) : 0.f);
      }
      m = m_new;
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + n * p.o_stride_b + h * p.o_stride_h +
           static_cast<int64_t>(r) * p.o_stride_s;
#pragma unroll
  for (int u = 0; u < kMaxPerLane; ++u) {
    const int d = lane + 32 * u;
    if (d < p.head_dim_v) out[d] = from_float<T>(o[u] * inv);
  }
}

template <typename T>
cudaError_t launch(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  const dim3 grid(cdiv(p.seq_q, kWarps), p.heads_q, p.batch);
  attn_simple_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p, ws);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_simple(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  if (p.head_dim > 32 * kMaxPerLane || p.head_dim_v > 32 * kMaxPerLane) {
    return cudaErrorNotSupported;
  }
  switch (p.dtype) {
    case ASA_FLOAT32: return launch<float>(p, ws, stream);
    case ASA_FLOAT16: return launch<__half>(p, ws, stream);
    default: return launch<__nv_bfloat16>(p, ws, stream);
  }
}

}  // namespace cuda
}  // namespace asa
