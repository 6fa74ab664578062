// Device helpers shared by the router and attention kernels of the CUDA kernel core:
// element conversion, the contract's visibility rule, and the workspace layout.
#ifndef ASA_CUDA_COMMON_CUH_
#define ASA_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "asa/asa_core.h"

namespace asa {
namespace cuda {

// Scratch regions carved out of the caller's workspace (see layout_workspace in asa_cuda.cu).
struct Workspace {
  float* qbar;             // [B, Hq, NQ, D] block means of the query rows
  float* kbar;             // [B, Hkv, NK, D] block means of the kept keys
  float* logits;           // [B, Hq, NQ, NK] router logits scale * q̄ . k̄
  int32_t* kept_prefix;    // [B, Skv + 1] running count of kept keys (only with a padding mask)
  int32_t* block_indices;  // params.block_indices, or scratch when the caller passed NULL
  int32_t* block_counts;
  int32_t* visible_counts;
  float* part_o;           // [splits, B, Hq, Sq, Dv] split-KV partial outputs (normalized)
  float* part_lse;         // [splits, B, Hq, Sq] their log2-sum-exp2 (-inf when empty)
  int splits;              // split-KV factor of the attention launch (1 = no merge)
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// key_padding_mask[n, j] != 0 (true when there is no mask).
__device__ __forceinline__ bool key_kept(const AsaParams& p, int n, int j) {
  if (p.mask_dtype == ASA_MASK_NONE) return true;
  const int64_t off = static_cast<int64_t>(n) * p.mask_stride_b + j;
  switch (p.mask_dtype) {
    case ASA_MASK_BOOL: return static_cast<const uint8_t*>(p.key_padding_mask)[off] != 0;
    case ASA_MASK_INT32: return static_cast<const int32_t*>(p.key_padding_mask)[off] != 0;
    default: return static_cast<const int64_t*>(p.key_padding_mask)[off] != 0;
  }
}

// Causal / window part of the visibility rule for a row at absolute position `pos` and key `j`
// (the padding mask and the Skv bound are checked separately).
__device__ __forceinline__ bool position_visible(const AsaParams& p, int pos, int j) {
  if (p.causal && j > pos) return false;
  if (p.window > 0) {
    if (p.causal) return pos - p.window < j;
    const int d = pos > j ? pos - j : j - pos;
    return d < p.window;
  }
  return true;
}

// Range [lo, hi] of key positions visible to some row with position in [p0, p1] (ignoring the
// padding mask). SPEC.md: causal j <= p; window p - W < j (causal) or |p - j| < W.
__device__ __forceinline__ void visible_key_range(const AsaParams& p, int p0, int p1, int* lo,
                                                  int* hi) {
  int l = 0, h = p.seq_kv - 1;
  if (p.causal) {
    h = min(h, p1);
    if (p.window > 0) l = max(l, p0 - p.window + 1);
  } else if (p.window > 0) {
    l = max(l, p0 - p.window + 1);
    h = min(h, p1 + p.window - 1);
  }
  *lo = l;
  *hi = h;
}

__host__ __device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Maximum / sum over the 32 lanes of a full warp, returned in every lane.
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Programmatic dependent launch (compute capability 9.0+). A kernel started by launch_chained
// (kernels.h) may become resident while the kernel before it in the stream still runs, which
// hides the launch gap between the decode step's short kernels. Such a kernel calls
// wait_for_previous_kernel() before it touches memory that a kernel of the chain writes (the
// workspace, the lists, the caller's key_block_stats, the output): it returns once the previous
// kernel has finished and its writes are visible. Before it, only the caller's inputs that no
// kernel of the chain writes (q, k, v) may be read; every kernel before the previous one has
// already finished. That holds because the first kernel of an entry point's chain is never
// chained (begin_chain, kernels.h): the caller's kernel before it may still be writing q, k, v
// when it signals. allow_next_kernel() lets the next chained kernel start before this one ends
// (that kernel still waits for this one). On older GPUs both are no-ops and the launch is an
// ordinary one.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace asa

#endif  // ASA_CUDA_COMMON_CUH_
