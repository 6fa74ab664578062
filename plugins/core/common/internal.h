// Internal helpers shared by the CPU and CUDA implementations of the kernel core (host code only).
#ifndef ASA_INTERNAL_H_
#define ASA_INTERNAL_H_

#include "asa/asa_core.h"

namespace asa {

// Records the message returned by asa_last_error() on this thread.
void set_last_error(const char* fmt, ...);
void clear_last_error();

// Checks every AsaParams field against the contract; on failure records the reason and
// returns false.
bool validate_params(const AsaParams& p);

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
inline int num_query_blocks(const AsaParams& p) { return ceil_div(p.seq_q, p.block_size); }
inline int num_key_blocks(const AsaParams& p) { return ceil_div(p.seq_kv, p.block_size); }
inline int num_select_heads(const AsaParams& p) { return p.select_per ? p.heads_kv : p.heads_q; }
// The learned gate is in use (validate_params has checked both weights are set).
inline bool has_gate(const AsaParams& p) { return p.gate_q_weight != nullptr; }
// Width of the router's block embeddings: Dg with the gate, else D (q̄ and k̄ themselves).
inline int router_dim(const AsaParams& p) { return has_gate(p) ? p.gate_dim : p.head_dim; }
// Factor of the router's logits: none with the gate (SPEC.md), else the score scale.
inline float router_scale(const AsaParams& p) { return has_gate(p) ? 1.0f : p.scale; }

}  // namespace asa

#endif  // ASA_INTERNAL_H_
