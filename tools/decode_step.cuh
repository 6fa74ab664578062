// Shared by tools/select_phases.cu, tools/route_phases.cu and tools/attn_timeline.cu (include
// after the kernel source they time): the decode step they time, its tensors, and their error
// check.
#ifndef ASA_TOOLS_DECODE_STEP_CUH_
#define ASA_TOOLS_DECODE_STEP_CUH_

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                          \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// One decode step of tools/bench_kernels.py's decode shapes: B = 1, Hq = 32, Hkv = 8, D = 128,
// bf16, one query row against `kv` keys, causal, block_size 128, select_per 1, one sink and one
// local block, threshold `tau`. The tensors and strides are the caller's.
inline AsaParams decode_step_params(int kv, float tau) {
  AsaParams p{};
  p.batch = 1;
  p.heads_q = 32;
  p.heads_kv = 8;
  p.seq_q = 1;
  p.seq_kv = kv;
  p.head_dim = p.head_dim_v = 128;
  p.dtype = ASA_BFLOAT16;
  p.scale = 0.0883883f;  // 1 / sqrt(D)
  p.causal = 1;
  p.block_size = 128;
  p.threshold = tau;
  p.sink_blocks = 1;
  p.local_blocks = 1;
  p.window = -1;
  p.select_per = 1;
  p.mask_dtype = ASA_MASK_NONE;
  return p;
}

// Uniform bf16 in [-1, 1) from a hash of the index and `seed`.
__global__ void fill_random(__nv_bfloat16* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.f - 1.f);
  }
}

// The step's tensors, contiguous: q and out [B, Hq, 1, D], k and v [B, Hkv, Skv, D] (v = k when
// `v_is_k`: the router reads no values), filled with fill_random (seeds 1, 2, 3) and set in `p`
// with their strides.
inline void alloc_decode_tensors(AsaParams& p, bool v_is_k) {
  const size_t qn = static_cast<size_t>(p.batch) * p.heads_q * p.seq_q * p.head_dim;
  const size_t kn = static_cast<size_t>(p.batch) * p.heads_kv * p.seq_kv * p.head_dim;
  __nv_bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  CHECK(cudaMalloc(&q, qn * 2));
  CHECK(cudaMalloc(&out, qn * 2));
  CHECK(cudaMalloc(&k, kn * 2));
  fill_random<<<256, 256>>>(q, qn, 1);
  fill_random<<<1024, 256>>>(k, kn, 2);
  v = k;
  if (!v_is_k) {
    CHECK(cudaMalloc(&v, kn * 2));
    fill_random<<<1024, 256>>>(v, kn, 3);
  }
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.q_stride_s = p.o_stride_s = p.head_dim;
  p.q_stride_h = p.o_stride_h = static_cast<int64_t>(p.seq_q) * p.head_dim;
  p.q_stride_b = p.o_stride_b = static_cast<int64_t>(p.heads_q) * p.seq_q * p.head_dim;
  p.k_stride_s = p.v_stride_s = p.head_dim;
  p.k_stride_h = p.v_stride_h = static_cast<int64_t>(p.seq_kv) * p.head_dim;
  p.k_stride_b = p.v_stride_b = static_cast<int64_t>(p.heads_kv) * p.seq_kv * p.head_dim;
  CHECK(cudaDeviceSynchronize());
}

#endif  // ASA_TOOLS_DECODE_STEP_CUH_
