// CPU implementation of the ASA kernel core (contract v1, asa_export/contract/SPEC.md).
// Synchronous; `num_threads` <= 0 means one thread per hardware core. Returns an AsaStatus;
// asa_last_error() holds the message of a failure.
#ifndef ASA_CPU_H_
#define ASA_CPU_H_

#include "asa/asa_core.h"

#ifdef __cplusplus
extern "C" {
#endif

// Router only: fills block_indices / block_counts / visible_counts.
int asa_cpu_route(const AsaParams* params, int num_threads);

// Block-sparse attention only, consuming block_indices / block_counts.
int asa_cpu_attention(const AsaParams* params, int num_threads);

// Router then attention; when params->block_indices is NULL the lists live in internal scratch.
int asa_cpu_forward(const AsaParams* params, int num_threads);

#ifdef __cplusplus
}
#endif

#endif  // ASA_CPU_H_
