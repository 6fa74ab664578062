// Launchers of the CUDA kernel core, shared between its translation units (host code).
#ifndef ASA_CUDA_KERNELS_H_
#define ASA_CUDA_KERNELS_H_

#include <cuda_runtime.h>

#include "asa/asa_core.h"
#include "common.cuh"

namespace asa {
namespace cuda {

// Router: pooling, scoring, selection; writes ws.block_indices / block_counts / visible_counts.
// At τ ≥ 1 from the attribute (no head_thresholds) it only writes every visible block (no
// pooling or scoring; ASA_CUDA_DENSE_FASTPATH=0 forces the full router).
cudaError_t launch_route(const AsaParams& p, const Workspace& ws, cudaStream_t stream);

// The whole decode step (router, attention of the kept blocks, merge) in one launch of thread-
// block clusters (fused_decode.cuh): opt-in with ASA_CUDA_FUSED_DECODE=1, for the params in its
// scope on a device that co-schedules its clusters (compute capability 9.0+). Writes the lists,
// counts and visible counts as launch_route does, and p.out; returns cudaErrorNotSupported,
// having launched nothing and set no error, for a call it does not run.
cudaError_t launch_fused_decode(const AsaParams& p, const Workspace& ws, cudaStream_t stream);

// Block-sparse attention over the lists in ws (tensor-core path when supported, else the
// simple path), then the split-KV merge when ws.splits > 1.
cudaError_t launch_attention(const AsaParams& p, const Workspace& ws, cudaStream_t stream);

// Whether the tensor-core kernel handles these params (dtype, head dims, alignment).
bool mma_path_supported(const AsaParams& p);

// Whether the Hopper wgmma kernel (attention_wgmma.cu) handles these params on this device:
// fp16/bf16, D = Dv in {64, 128}, block_size 128, prefill without split-KV, no padding mask /
// bias / softcap, sm_90a code present and a compute capability 9.x GPU, ASA_CUDA_WGMMA != 0.
bool wgmma_path_supported(const AsaParams& p, const Workspace& ws);

// Launches the wgmma kernel (only when wgmma_path_supported; falls back to the mma.sync
// kernels when the driver rejects a tensor map).
cudaError_t launch_wgmma(const AsaParams& p, const Workspace& ws, cudaStream_t stream);

// The mma.sync kernels (attention_mma.cu) for params that mma_path_supported accepts.
cudaError_t launch_mma_kernels(const AsaParams& p, const Workspace& ws, cudaStream_t stream);

// Scratch of the learned gate (SPEC.md "Router (learned gate)"), carved out of the workspace by
// layout_workspace only when the params carry gate weights; all float32.
struct GateScratch {
  float* kfeat;  // [B, Hkv, NK, 3 * D] concat(mean, max, min) of the kept keys of each block
  float* qemb;   // [B, Hq, NQ, Dg] q̄ · gate_q_weight[h]
  float* kemb;   // [B, Hkv, NK, Dg] f_k · gate_k_weight[h / G]
};

// Gate embeddings (gate.cu): key features, then both projections; reads q̄ from `qbar`.
cudaError_t launch_gate(const AsaParams& p, const float* qbar, const GateScratch& g,
                        cudaStream_t stream);

// The gate's key features concat(mean, max, min) of key blocks [first, NK) into kfeat
// [B, Hkv, cap, 3 * D] (gate.cu; also fills caller-kept key_block_stats rows).
void launch_key_features(const AsaParams& p, float* kfeat, int first, int cap,
                         cudaStream_t stream);

// y = x · w[head] per row of x [B, H, NB, in] (w [H, in, out]); rows with block index <
// cached_blocks are read from `cached` [B, H, cap, in] instead of x (gate.cu).
void launch_gate_project(const float* x, const float* cached, int cached_blocks, int cap,
                         const float* w, int batch, int heads, int nb, int in_dim, int out_dim,
                         float* y, cudaStream_t stream);

// launch_route with the learned gate: logits = qemb · kemb instead of scale · q̄ · k̄
// (`gate` NULL = the training-free router, same as launch_route).
cudaError_t launch_route_gated(const AsaParams& p, const Workspace& ws, const GateScratch* gate,
                               cudaStream_t stream);

// Router statistics of key blocks [first_block, NK) into stats [B, Hkv, capacity, F]
// (AsaParams.key_block_stats; F = D, or 3 * D with the learned gate): the same kernels as the
// router's own pooling, so the rows agree bit for bit.
cudaError_t launch_key_block_stats(const AsaParams& p, float* stats, int first_block,
                                   int capacity, cudaStream_t stream);

// Dynamic shared memory of the router's selection kernel for one list (bounds NK).
size_t select_smem_bytes(const AsaParams& p);

// Split-KV factor used by launch_attention (depends on sizes and the device only, never on data).
int choose_splits(const AsaParams& p);

// Multiprocessors of the current device (queried once).
int sm_count();

// Whether launch_chained uses programmatic dependent launch: a compute capability 9.x+ device
// and ASA_CUDA_PDL unset or not "0" (read at each launch; the tests and benchmarks compare both).
bool chained_launch_enabled();

// The kernels one C entry point launches form a chain in the caller's stream, and only their
// links may start early. The first kernel must not: the caller's kernel before it may signal its
// dependents while it still writes q, k or v (a GEMM with programmatic dependent launch does so
// once its MMAs are issued, before its epilogue stores), and some of our kernels read those
// before their wait (common.cuh). So every entry point calls begin_chain() before its first
// launch; next_launch_chained() then answers false once (the first launch of the call, which
// runs as an ordinary launch) and chained_launch_enabled() after that. Per host thread. A
// kernel launched with <<<>>> does not count: a chained kernel right after one of ours is also
// launched as an ordinary one when it is the call's first through launch_chained (safe; only a
// launch gap is not hidden).
void begin_chain();
bool next_launch_chained();

// Launches `kernel` so that it may start before the previous kernel in the stream ends unless it
// is the first of its entry point's chain (next_launch_chained); the kernel must call
// wait_for_previous_kernel() before it touches what the chain writes (the rule is in
// common.cuh).
template <typename... Params, typename... Args>
cudaError_t launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = next_launch_chained() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace cuda
}  // namespace asa

#endif  // ASA_CUDA_KERNELS_H_
