// CUDA implementation of the ASA kernel core (contract v1, asa_export/contract/SPEC.md).
// Every entry point is asynchronous on `stream`, validates params, and returns cudaSuccess,
// cudaErrorInvalidValue (params break the contract; asa_last_error() says which field) or the
// CUDA error of a failed launch.
#ifndef ASA_CUDA_H_
#define ASA_CUDA_H_

#include <cuda_runtime.h>

#include "asa/asa_core.h"

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of device scratch memory asa_cuda_forward / asa_cuda_route need for these params.
size_t asa_cuda_workspace_size(const AsaParams* params);

// Router only: fills block_indices / block_counts / visible_counts.
cudaError_t asa_cuda_route(const AsaParams* params, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

// Block-sparse attention only, consuming block_indices / block_counts.
cudaError_t asa_cuda_attention(const AsaParams* params, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

// Router then attention (sparse speed figures are measured through this entry point).
cudaError_t asa_cuda_forward(const AsaParams* params, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// Router statistics of key blocks [first_block, NK) of these params' keys (and padding mask)
// into `stats`, laid out as AsaParams.key_block_stats ([B, Hkv, capacity, F], F = D, or 3 * D
// when the params carry the learned gate; capacity = key_block_stats_capacity, 0 = NK). The
// rows equal what asa_cuda_route pools, bit for bit. A decode loop calls it with first_block =
// the block of the first new key, then routes with key_block_stats_blocks = NK. Needs no
// workspace; params.key_block_stats itself is not read.
cudaError_t asa_cuda_key_block_stats(const AsaParams* params, float* stats, int first_block,
                                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // ASA_CUDA_H_
