// C ABI entry points of the CUDA kernel core (asa/asa_cuda.h): validation, workspace layout,
// dispatch to the router and attention launchers.
#include <cstdint>

#include "asa/asa_cuda.h"
#include "internal.h"
#include "kernels.h"

namespace asa {
namespace cuda {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Carves the scratch regions out of `base` (NULL = only measure). Returns the bytes needed.
// With the learned gate, k̄ is not pooled; the gate's features and embeddings go to `gate`.
size_t layout_workspace(const AsaParams& p, unsigned char* base, Workspace* ws,
                        GateScratch* gate) {
  const size_t nq = num_query_blocks(p), nk = num_key_blocks(p);
  const size_t B = p.batch, hsel = num_select_heads(p);
  size_t off = 0;
  auto take = [&](size_t bytes) -> unsigned char* {
    unsigned char* ptr = base ? base + off : nullptr;
    off += align_up(bytes);
    return ptr;
  };
  Workspace w{};
  w.qbar = reinterpret_cast<float*>(take(B * p.heads_q * nq * p.head_dim * sizeof(float)));
  GateScratch g{};
  if (has_gate(p)) {
    g.kfeat = reinterpret_cast<float*>(take(B * p.heads_kv * nk * 3 * p.head_dim * sizeof(float)));
    g.qemb = reinterpret_cast<float*>(take(B * p.heads_q * nq * p.gate_dim * sizeof(float)));
    g.kemb = reinterpret_cast<float*>(take(B * p.heads_kv * nk * p.gate_dim * sizeof(float)));
  } else {
    w.kbar = reinterpret_cast<float*>(take(B * p.heads_kv * nk * p.head_dim * sizeof(float)));
  }
  w.logits = reinterpret_cast<float*>(take(B * p.heads_q * nq * nk * sizeof(float)));
  if (p.mask_dtype != ASA_MASK_NONE) {
    w.kept_prefix = reinterpret_cast<int32_t*>(take(B * (p.seq_kv + 1) * sizeof(int32_t)));
  }
  w.block_indices = p.block_indices;
  if (!w.block_indices) {
    w.block_indices = reinterpret_cast<int32_t*>(take(B * hsel * nq * nk * sizeof(int32_t)));
  }
  w.block_counts = p.block_counts;
  if (!w.block_counts) {
    w.block_counts = reinterpret_cast<int32_t*>(take(B * hsel * nq * sizeof(int32_t)));
  }
  w.visible_counts = p.visible_counts;
  w.splits = choose_splits(p);
  if (w.splits > 1) {
    const size_t rows = static_cast<size_t>(w.splits) * B * p.heads_q * p.seq_q;
    w.part_o = reinterpret_cast<float*>(take(rows * p.head_dim_v * sizeof(float)));
    w.part_lse = reinterpret_cast<float*>(take(rows * sizeof(float)));
  }
  if (ws) *ws = w;
  if (gate) *gate = g;
  return off;
}

// Validates and lays out; on failure records the reason and returns cudaErrorInvalidValue.
cudaError_t prepare(const AsaParams* params, void* workspace, size_t bytes, Workspace* ws,
                    GateScratch* gate) {
  if (!params) {
    set_last_error("ASA: params is NULL");
    return cudaErrorInvalidValue;
  }
  if (!validate_params(*params)) return cudaErrorInvalidValue;
  const size_t need =
      layout_workspace(*params, static_cast<unsigned char*>(workspace), ws, gate);
  if (bytes < need || (need > 0 && !workspace)) {
    set_last_error("ASA: workspace of %zu bytes is too small, asa_cuda_workspace_size says %zu",
                   bytes, need);
    return cudaErrorInvalidValue;
  }
  int device = 0, smem_limit = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (select_smem_bytes(*params) + 4096 > static_cast<size_t>(smem_limit)) {
    set_last_error("ASA: %d key blocks (Skv/block_size) exceed the CUDA router's limit of 8192",
                   num_key_blocks(*params));
    return cudaErrorNotSupported;
  }
  if (!mma_path_supported(*params) &&
      (params->head_dim > 256 || params->head_dim_v > 256)) {
    set_last_error("ASA: head dims above 256 are not supported by the CUDA core (D=%d Dv=%d)",
                   params->head_dim, params->head_dim_v);
    return cudaErrorNotSupported;
  }
  return cudaSuccess;
}

cudaError_t report(cudaError_t err, const char* what) {
  if (err != cudaSuccess) set_last_error("ASA: %s failed: %s", what, cudaGetErrorString(err));
  return err;
}

cudaError_t route(const AsaParams& p, const Workspace& ws, const GateScratch& gate,
                  cudaStream_t stream) {
  const GateScratch* g = has_gate(p) ? &gate : nullptr;
  return report(launch_route_gated(p, ws, g, stream), "router launch");
}

}  // namespace
}  // namespace cuda
}  // namespace asa

extern "C" {

size_t asa_cuda_workspace_size(const AsaParams* params) {
  if (!params || !asa::validate_params(*params)) return 0;
  return asa::cuda::layout_workspace(*params, nullptr, nullptr, nullptr);
}

cudaError_t asa_cuda_route(const AsaParams* params, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  asa::cuda::begin_chain();
  asa::cuda::Workspace ws;
  asa::cuda::GateScratch gate;
  cudaError_t err = asa::cuda::prepare(params, workspace, workspace_bytes, &ws, &gate);
  if (err != cudaSuccess) return err;
  return asa::cuda::route(*params, ws, gate, stream);
}

cudaError_t asa_cuda_attention(const AsaParams* params, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  asa::cuda::begin_chain();
  asa::cuda::Workspace ws;
  asa::cuda::GateScratch gate;
  cudaError_t err = asa::cuda::prepare(params, workspace, workspace_bytes, &ws, &gate);
  if (err != cudaSuccess) return err;
  return asa::cuda::report(asa::cuda::launch_attention(*params, ws, stream), "attention launch");
}

cudaError_t asa_cuda_forward(const AsaParams* params, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  asa::cuda::begin_chain();
  asa::cuda::Workspace ws;
  asa::cuda::GateScratch gate;
  cudaError_t err = asa::cuda::prepare(params, workspace, workspace_bytes, &ws, &gate);
  if (err != cudaSuccess) return err;
  err = asa::cuda::launch_fused_decode(*params, ws, stream);  // opt-in; most calls: not run
  if (err != cudaErrorNotSupported) return asa::cuda::report(err, "fused decode step launch");
  err = asa::cuda::route(*params, ws, gate, stream);
  if (err != cudaSuccess) return err;
  return asa::cuda::report(asa::cuda::launch_attention(*params, ws, stream), "attention launch");
}

cudaError_t asa_cuda_key_block_stats(const AsaParams* params, float* stats, int first_block,
                                     cudaStream_t stream) {
  if (!params) {
    asa::set_last_error("ASA: params is NULL");
    return cudaErrorInvalidValue;
  }
  if (!asa::validate_params(*params)) return cudaErrorInvalidValue;
  const int nk = asa::num_key_blocks(*params);
  const int capacity =
      params->key_block_stats_capacity > 0 ? params->key_block_stats_capacity : nk;
  if (!stats) {
    asa::set_last_error("ASA: asa_cuda_key_block_stats needs a stats buffer [B, Hkv, capacity, "
                        "F] (got NULL)");
    return cudaErrorInvalidValue;
  }
  if (first_block < 0 || first_block > nk) {
    asa::set_last_error("ASA: first_block must be in [0, NK = ceil(Skv / block_size) = %d], got "
                        "%d", nk, first_block);
    return cudaErrorInvalidValue;
  }
  if (capacity < nk) {
    asa::set_last_error("ASA: key_block_stats_capacity (%d) must hold every key block of the "
                        "call (NK = %d) to write their statistics", capacity, nk);
    return cudaErrorInvalidValue;
  }
  asa::cuda::begin_chain();
  return asa::cuda::report(
      asa::cuda::launch_key_block_stats(*params, stats, first_block, capacity, stream),
      "key block statistics launch");
}

}  // extern "C"
