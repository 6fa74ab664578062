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

}  // namespace asa

#endif  // ASA_INTERNAL_H_
