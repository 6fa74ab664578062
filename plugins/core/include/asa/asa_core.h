// ASA kernel core: the framework-free C ABI that every adapter (TensorRT plugin, ONNX Runtime
// custom op, torch binding) calls. Semantics: asa_export/contract/SPEC.md (contract v1).
//
// No framework types cross this boundary: raw pointers, explicit strides, a stream, an error code.
// Adapters validate shapes and dtypes and fill AsaParams; the core holds all the math.
#ifndef ASA_CORE_H_
#define ASA_CORE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ASA_CONTRACT_VERSION 1

typedef enum AsaDType {
  ASA_FLOAT32 = 0,
  ASA_FLOAT16 = 1,
  ASA_BFLOAT16 = 2,
} AsaDType;

typedef enum AsaMaskDType {
  ASA_MASK_NONE = 0,  // no key_padding_mask input
  ASA_MASK_BOOL = 1,  // uint8, nonzero = keep
  ASA_MASK_INT32 = 2,
  ASA_MASK_INT64 = 3,
} AsaMaskDType;

// Status of the CPU entry points (the CUDA ones return cudaError_t).
typedef enum AsaStatus {
  ASA_OK = 0,
  ASA_ERR_INVALID_ARGUMENT = 1,  // a field of AsaParams breaks the contract
  ASA_ERR_UNSUPPORTED = 2,       // valid by the contract, not implemented by this backend
  ASA_ERR_WORKSPACE = 3,         // workspace too small
  ASA_ERR_BACKEND = 4,           // threading / allocation error
} AsaStatus;

// One call's problem. Strides are in elements; the innermost (head-dim) stride is 1.
typedef struct AsaParams {
  // ---- sizes ----
  int32_t batch;        // B
  int32_t heads_q;      // Hq
  int32_t heads_kv;     // Hkv; heads_q % heads_kv == 0
  int32_t seq_q;        // Sq
  int32_t seq_kv;       // Skv (past KV included); query row r sits at position r + Skv - Sq
  int32_t head_dim;     // D  (query/key)
  int32_t head_dim_v;   // Dv (value/output)
  AsaDType dtype;       // element type of q, k, v, bias and out

  // ---- tensors ----
  const void* q;        // [B, Hq, Sq, D]
  int64_t q_stride_b, q_stride_h, q_stride_s;
  const void* k;        // [B, Hkv, Skv, D]
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const void* v;        // [B, Hkv, Skv, Dv]
  int64_t v_stride_b, v_stride_h, v_stride_s;
  void* out;            // [B, Hq, Sq, Dv]
  int64_t o_stride_b, o_stride_h, o_stride_s;

  const void* key_padding_mask;  // [B, Skv] or NULL; element type mask_dtype; nonzero = keep
  AsaMaskDType mask_dtype;
  int64_t mask_stride_b;

  const void* bias;     // broadcast view of [B, Hq, Sq, Skv] or NULL; dtype; stride 0 = broadcast
  int64_t bias_stride_b, bias_stride_h, bias_stride_q, bias_stride_k;

  const float* head_thresholds;  // [Hq] or NULL (then `threshold` is used)

  // ---- attributes (contract) ----
  float scale;          // resolved score scale (> 0); adapters turn the attribute 0.0 into 1/sqrt(D)
  int32_t causal;       // 0 / 1
  int32_t block_size;   // 64 or 128
  float threshold;      // tau; >= 1 keeps every visible block
  int32_t sink_blocks;
  int32_t local_blocks;
  int32_t window;       // -1 = none
  float softcap;        // 0 = none
  int32_t select_per;   // 0 = query head, 1 = KV group

  // ---- router outputs (written by asa_route, read by asa_attention) ----
  // Hsel = Hq (select_per 0) or Hkv (select_per 1); NQ = ceil(Sq/b), NK = ceil(Skv/b).
  int32_t* block_indices;   // [B, Hsel, NQ, NK] ascending kept blocks, padded with -1
  int32_t* block_counts;    // [B, Hsel, NQ]
  int32_t* visible_counts;  // [B, NQ] or NULL

  // ---- learned gate (SPEC.md "Router (learned gate)"; contract inputs 6-7) ----
  // Both NULL (training-free router) or both set. Always float32 and dense row-major, whatever
  // `dtype` is; on the device of q/k for the CUDA implementation. With the gate, the router's
  // block logit is (q̄ · gate_q_weight[h]) · (f_k · gate_k_weight[h / G]), with
  // f_k = concat(mean, max, min) of the block's kept keys, and no scale.
  const float* gate_q_weight;  // [Hq, D, Dg] query projection, or NULL
  const float* gate_k_weight;  // [Hkv, 3 * D, Dg] key-feature projection, or NULL
  int32_t gate_dim;            // Dg >= 1 when the gate is set; ignored when it is not

  // ---- acceleration (kernel ABI only; SPEC.md "Acceleration (kernel ABI only)") ----
  // Router statistics of past key blocks kept by the caller across calls (decode), so that the
  // router does not pool every key on every step. Not a contract input: semantics unchanged,
  // the caller guarantees that each valid row equals what the router would pool from the keys
  // and key_padding_mask of this call (asa_cuda_key_block_stats computes them). F = D (mean of
  // the block's kept keys) without the learned gate, 3 * D (mean, max, min) with it; a block
  // with no kept key has a zero row. NULL (and blocks 0) = the router pools every block itself.
  const float* key_block_stats;      // [B, Hkv, capacity, F] float32, dense, on the device
  int32_t key_block_stats_blocks;    // rows [0, blocks) are read; the router pools the rest
  int32_t key_block_stats_capacity;  // block dimension of the buffer; 0 = NK of this call
} AsaParams;

// Entry points live in asa_cuda.h (CUDA implementation, returns cudaError_t on a cudaStream_t)
// and asa_cpu.h (CPU implementation, multi-threaded). Both take this struct unchanged.

// Text of the last error on the calling thread ("" when none), for either implementation.
const char* asa_last_error(void);

#ifdef __cplusplus
}
#endif

#endif  // ASA_CORE_H_
