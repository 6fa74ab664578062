// Extension of the CPU kernel core for adapters that own a thread pool (ONNX Runtime's intra-op
// pool): the same entry points as asa_cpu.h, with the parallel loop supplied by the caller.
#ifndef ASA_CPU_EXT_H_
#define ASA_CPU_EXT_H_

#include <stddef.h>

#include "asa/asa_core.h"

#ifdef __cplusplus
extern "C" {
#endif

// Runs fn(user, i) for every i in [0, total), in any order and on any threads, and returns when
// all calls have finished. `pool` is the adapter's own context.
typedef void (*AsaParallelFor)(void* pool, size_t total, void (*fn)(void* user, size_t i),
                               void* user);

// asa_cpu_forward with the caller's parallel loop (NULL = the core's own threads, one per core).
int asa_cpu_forward_with(const AsaParams* params, AsaParallelFor parallel_for, void* pool);

// Name of the ISA level the attention kernel runs at here ("avx512", "avx2" or "base"). The
// environment variable ASA_CPU_ISA=base|avx2|avx512 caps it (tests exercise every level).
const char* asa_cpu_isa(void);

#ifdef __cplusplus
}
#endif

#endif  // ASA_CPU_EXT_H_
