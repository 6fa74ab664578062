// Shared by tools/select_phases.cu and tools/route_phases.cu (include after router.cu): the
// decode step both time, and their error check.
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

#endif  // ASA_TOOLS_DECODE_STEP_CUH_
