// Parameter validation and the per-thread error text shared by both implementations.
#include <cmath>
#include <cstdarg>
#include <cstdio>

#include "internal.h"

namespace asa {
namespace {
thread_local char g_last_error[512] = "";
}

void set_last_error(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
}

void clear_last_error() { g_last_error[0] = '\0'; }

namespace {
// Block dimension of the caller's key_block_stats buffer (0 = NK of this call).
int key_stats_capacity(const AsaParams& p) {
  return p.key_block_stats_capacity > 0 ? p.key_block_stats_capacity : num_key_blocks(p);
}

// The caller-kept router statistics (SPEC.md "Acceleration (kernel ABI only)").
bool validate_key_block_stats(const AsaParams& p) {
  const int nk = num_key_blocks(p);
  if (!p.key_block_stats && p.key_block_stats_blocks != 0) {
    set_last_error("ASA: key_block_stats_blocks is %d but key_block_stats is NULL (set the "
                   "pointer or pass 0 blocks)", p.key_block_stats_blocks);
    return false;
  }
  if (p.key_block_stats_blocks < 0 || p.key_block_stats_blocks > nk) {
    set_last_error("ASA: key_block_stats_blocks must be in [0, NK = ceil(Skv / block_size) = %d], "
                   "got %d", nk, p.key_block_stats_blocks);
    return false;
  }
  if (p.key_block_stats_capacity < 0) {
    set_last_error("ASA: key_block_stats_capacity must be >= 0 (0 = NK), got %d",
                   p.key_block_stats_capacity);
    return false;
  }
  const int capacity = key_stats_capacity(p);
  if (p.key_block_stats && capacity < p.key_block_stats_blocks) {
    set_last_error("ASA: key_block_stats_capacity (%d) is smaller than key_block_stats_blocks "
                   "(%d): the buffer is [B, Hkv, capacity, F]", capacity,
                   p.key_block_stats_blocks);
    return false;
  }
  return true;
}
}  // namespace

bool validate_params(const AsaParams& p) {
  if (p.batch < 1 || p.heads_q < 1 || p.heads_kv < 1 || p.seq_q < 1 || p.seq_kv < 1 ||
      p.head_dim < 1 || p.head_dim_v < 1) {
    set_last_error("ASA: sizes must be >= 1 (B=%d Hq=%d Hkv=%d Sq=%d Skv=%d D=%d Dv=%d)", p.batch,
                   p.heads_q, p.heads_kv, p.seq_q, p.seq_kv, p.head_dim, p.head_dim_v);
    return false;
  }
  if (p.heads_q % p.heads_kv != 0) {
    set_last_error("ASA: query heads (%d) must be a multiple of key/value heads (%d)", p.heads_q,
                   p.heads_kv);
    return false;
  }
  if (p.dtype != ASA_FLOAT32 && p.dtype != ASA_FLOAT16 && p.dtype != ASA_BFLOAT16) {
    set_last_error("ASA: unknown dtype %d", static_cast<int>(p.dtype));
    return false;
  }
  if (!p.q || !p.k || !p.v || !p.out) {
    set_last_error("ASA: query, key, value and output pointers must be set");
    return false;
  }
  if ((p.key_padding_mask == nullptr) != (p.mask_dtype == ASA_MASK_NONE)) {
    set_last_error("ASA: key_padding_mask pointer and mask_dtype disagree");
    return false;
  }
  if (p.block_size != 64 && p.block_size != 128) {
    set_last_error("ASA: block_size must be 64 or 128, got %d", p.block_size);
    return false;
  }
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) {
    set_last_error("ASA: scale must be a resolved finite value > 0, got %g", p.scale);
    return false;
  }
  if (!(p.threshold > 0.f) || !std::isfinite(p.threshold)) {
    set_last_error("ASA: threshold must be finite and > 0, got %g", p.threshold);
    return false;
  }
  if (p.sink_blocks < 0 || p.local_blocks < 0) {
    set_last_error("ASA: sink_blocks and local_blocks must be >= 0");
    return false;
  }
  if (p.window == 0 || p.window < -1) {
    set_last_error("ASA: window must be -1 (none) or > 0, got %d", p.window);
    return false;
  }
  if (!(p.softcap >= 0.f) || !std::isfinite(p.softcap)) {
    set_last_error("ASA: softcap must be finite and >= 0, got %g", p.softcap);
    return false;
  }
  if (p.select_per != 0 && p.select_per != 1) {
    set_last_error("ASA: select_per must be 0 or 1, got %d", p.select_per);
    return false;
  }
  if ((p.gate_q_weight == nullptr) != (p.gate_k_weight == nullptr)) {
    set_last_error("ASA: gate_q_weight and gate_k_weight come together (inputs 6 and 7): got "
                   "only %s", p.gate_q_weight ? "gate_q_weight" : "gate_k_weight");
    return false;
  }
  if (p.gate_q_weight && p.gate_dim < 1) {
    set_last_error("ASA: gate_dim (Dg of gate_q_weight [Hq, D, Dg] = [%d, %d, Dg]) must be >= 1 "
                   "when the gate weights are set, got %d", p.heads_q, p.head_dim, p.gate_dim);
    return false;
  }
  if (!validate_key_block_stats(p)) return false;
  clear_last_error();
  return true;
}

}  // namespace asa

extern "C" const char* asa_last_error(void) { return asa::g_last_error; }
