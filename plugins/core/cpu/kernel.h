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
constexpr int kVec = 32;      // micro-kernel chunk: keys of S and value columns of O
constexpr int kMaxRows = 16;  // largest register-blocked row group (query rows padded to it)

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One (batch, query head, query block) tile of block-sparse attention.
struct TileJob {
  const AsaParams* p;
  const uint8_t* keep;        // [Skv] key_padding_mask of this batch as 0/1, or NULL
  const int32_t* blocks;      // kept key blocks of this tile, ascending
  int32_t num_blocks;
  int32_t n, h, i;            // batch, query head, query block
  const float* kt;            // packed keys of (n, h's KV head): [NK][D][block_size], fp32;
                              //   NULL: read fp32 key rows in place (k + j * k_ld), decode calls
  const float* k;
  int64_t k_ld;
  const float* v;             // values of (n, KV head) as fp32 rows: v + j * v_ld, j < Skv;
  int64_t v_ld;               //   rows hold >= round_up(Dv, kVec) floats (zero padded)
  float* scratch;             // tile_scratch_floats(p) floats
};

// Floats of per-thread scratch one tile needs.
static inline int64_t tile_scratch_floats(const AsaParams& p) {
  const int64_t b = kMaxBlock;
  const int64_t d = round_up(p.head_dim, kVec), dv = round_up(p.head_dim_v, kVec);
  const int64_t rows = b + kMaxRows;
  // Q tile [rows][d], scores [rows][b], O [rows][dv], m, l, lo, hi.
  return rows * d + rows * b + rows * dv + 4 * b + 64;
}

// Floats of one packed key block ([D][block_size]) and of one packed value row.
static inline int64_t packed_key_block_floats(const AsaParams& p) {
  return static_cast<int64_t>(p.head_dim) * p.block_size;
}
static inline int64_t packed_value_row_floats(const AsaParams& p) {
  return round_up(p.head_dim_v, kVec);
}
// Calls with at most this many query rows read fp32 keys in place instead of packing them
// (a decode step would spend more time packing the cache than attending to it).
constexpr int kDirectKeyMaxRows = 4;
static inline bool keys_read_in_place(const AsaParams& p) {
  return p.dtype == ASA_FLOAT32 && p.seq_q <= kDirectKeyMaxRows;
}

// True when the value tensor can be read in place (fp32 rows of whole kVec chunks).
static inline bool values_usable_in_place(const AsaParams& p) {
  return p.dtype == ASA_FLOAT32 && p.head_dim_v % kVec == 0;
}

// ISA levels the kernel is compiled for; each namespace holds the same function.
// attention_tile: one tile. pack_kv: key block `kb` of (n, hkv) transposed to fp32 [D][b] at
// kt_dst (when not NULL), and (when v_dst is not NULL) its value rows as fp32 [b][round_up(Dv, kVec)] at v_dst.
#define ASA_DECLARE_ISA(ns)                                                          \
  namespace ns {                                                                     \
  void attention_tile(const TileJob& job);                                           \
  void pack_kv(const AsaParams& p, int n, int hkv, int kb, float* kt_dst, float* v_dst); \
  }
ASA_DECLARE_ISA(base)
ASA_DECLARE_ISA(avx2)
ASA_DECLARE_ISA(avx512)
#undef ASA_DECLARE_ISA

}  // namespace cpu
}  // namespace asa

#endif  // ASA_CPU_KERNEL_H_
