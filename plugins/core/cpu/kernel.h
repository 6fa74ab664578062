// Internal interface between the CPU dispatcher (asa_cpu.cpp, compiled for the baseline ISA) and
// the attention tile kernel (attention_kernel.cpp, compiled once per ISA level in its own
// namespace). Only plain structs and raw pointers cross it: no std templates, so the per-ISA
// object files cannot leak an AVX instantiation into baseline code through the linker.
#ifndef ASA_CPU_KERNEL_H_
#define ASA_CPU_KERNEL_H_

#include <stddef.h>
#include <stdint.h>

#include "asa/asa_core.h"

namespace asa {
namespace cpu {

// Scratch sizes are in floats, aligned to 16 floats.
constexpr int kMaxBlock = 128;
constexpr int kVec = 16;  // micro-kernel width (keys and value columns)

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One (batch, query head, query block) tile of block-sparse attention.
struct TileJob {
  const AsaParams* p;
  const uint8_t* keep;        // [Skv] key_padding_mask of this batch as 0/1, or NULL
  const int32_t* blocks;      // kept key blocks of this tile, ascending
  int32_t num_blocks;
  int32_t n, h, i;            // batch, query head, query block
  float* scratch;             // tile_scratch_floats(p) floats, 64-byte aligned
};

// Floats of per-thread scratch one tile needs.
static inline int64_t tile_scratch_floats(const AsaParams& p) {
  const int64_t b = kMaxBlock;
  const int64_t d = round_up(p.head_dim, kVec), dv = round_up(p.head_dim_v, kVec);
  // Q tile [b][d], K^T block [d][b], V block [b][dv], scores [b][b], O [b][dv], m, l, lo, hi.
  return b * d + d * b + b * dv + b * b + b * dv + 4 * b + 64;
}

// ISA levels the kernel is compiled for; each namespace holds the same function.
namespace base {
void attention_tile(const TileJob& job);
}
namespace avx2 {
void attention_tile(const TileJob& job);
}
namespace avx512 {
void attention_tile(const TileJob& job);
}

}  // namespace cpu
}  // namespace asa

#endif  // ASA_CPU_KERNEL_H_
