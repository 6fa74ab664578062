// CPU implementation of the ASA kernel core: entry points, router, thread dispatch.
// Semantics: asa_export/contract/SPEC.md. The attention tile kernel is in attention_kernel.cpp.
#include "asa/asa_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "asa_cpu_ext.h"
#include "internal.h"
#include "kernel.h"

namespace asa {
namespace cpu {
namespace {

// ---------------------------------------------------------------- threads

struct TaskPool {
  AsaParallelFor parallel_for;
  void* pool;
};

// The core's own parallel loop: num_threads workers pulling indices from one atomic counter.
void own_parallel_for(int num_threads, size_t total, void (*fn)(void*, size_t), void* user) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads = std::max(1, std::min<int>(num_threads, static_cast<int>(total)));
  if (num_threads == 1) {
    for (size_t i = 0; i < total; ++i) fn(user, i);
    return;
  }
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) fn(user, i);
  };
  std::vector<std::thread> threads;
  threads.reserve(num_threads - 1);
  for (int t = 0; t < num_threads - 1; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
}

void run_parallel(const TaskPool& tp, int num_threads, size_t total, void (*fn)(void*, size_t),
                  void* user) {
  if (total == 0) return;
  if (tp.parallel_for) {
    tp.parallel_for(tp.pool, total, fn, user);
  } else {
    own_parallel_for(num_threads, total, fn, user);
  }
}

// ---------------------------------------------------------------- ISA dispatch

typedef void (*TileFn)(const TileJob&);
typedef void (*PackFn)(const AsaParams&, int, int, int, float*, float*);

struct Isa {
  const char* name;
  TileFn fn;
  PackFn pack;
};

#if defined(ASA_HAVE_AVX2)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
}
#endif

#if defined(ASA_HAVE_AVX512)
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

// Highest level the CPU supports, capped by ASA_CPU_ISA (read on every call: tests switch it).
Isa pick_isa() {
  const char* cap = std::getenv("ASA_CPU_ISA");
  const int limit = !cap ? 2 : std::strcmp(cap, "base") == 0 ? 0 : std::strcmp(cap, "avx2") == 0 ? 1 : 2;
  (void)limit;  // unused where only the baseline kernel is built
#if defined(ASA_HAVE_AVX512)
  if (limit >= 2 && cpu_has_avx512()) return {"avx512", avx512::attention_tile, avx512::pack_kv};
#endif
#if defined(ASA_HAVE_AVX2)
  if (limit >= 1 && cpu_has_avx2()) return {"avx2", avx2::attention_tile, avx2::pack_kv};
#endif
  return {"base", base::attention_tile, base::pack_kv};
}

// ---------------------------------------------------------------- geometry

// Keys visible to some row of query block i, as [lo, hi) from causal / window geometry.
void block_key_range(const AsaParams& p, int i, int* lo, int* hi) {
  const int r0 = i * p.block_size;
  const int r1 = std::min(p.seq_q, r0 + p.block_size) - 1;
  const int p0 = r0 + p.seq_kv - p.seq_q, p1 = r1 + p.seq_kv - p.seq_q;
  int a = 0, z = p.seq_kv;
  if (p.causal) z = std::min(z, p1 + 1);
  if (p.window > 0) {
    a = std::max(a, p0 - p.window + 1);
    if (!p.causal) z = std::min(z, p1 + p.window);
  }
  *lo = a;
  *hi = std::max(a, z);
}

// key_padding_mask as 0/1 bytes, [B][Skv]; empty when there is no mask.
std::vector<uint8_t> keep_bytes(const AsaParams& p) {
  std::vector<uint8_t> keep;
  if (!p.key_padding_mask) return keep;
  keep.resize(static_cast<size_t>(p.batch) * p.seq_kv);
  for (int n = 0; n < p.batch; ++n) {
    for (int j = 0; j < p.seq_kv; ++j) {
      const int64_t off = n * p.mask_stride_b + j;
      bool k;
      switch (p.mask_dtype) {
        case ASA_MASK_BOOL: k = static_cast<const uint8_t*>(p.key_padding_mask)[off] != 0; break;
        case ASA_MASK_INT32: k = static_cast<const int32_t*>(p.key_padding_mask)[off] != 0; break;
        default: k = static_cast<const int64_t*>(p.key_padding_mask)[off] != 0; break;
      }
      keep[static_cast<size_t>(n) * p.seq_kv + j] = k;
    }
  }
  return keep;
}

float load_elem(const void* base, int64_t off, AsaDType dt) {
  if (dt == ASA_FLOAT32) return static_cast<const float*>(base)[off];
  uint16_t h = static_cast<const uint16_t*>(base)[off];
  uint32_t bits;
  if (dt == ASA_BFLOAT16) {
    bits = static_cast<uint32_t>(h) << 16;
  } else {
    const uint32_t em = h & 0x7fffu;
    float f;
    bits = em << 13;
    std::memcpy(&f, &bits, 4);
    f *= 0x1p112f;
    std::memcpy(&bits, &f, 4);
    if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;
    bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// acc[d] += x[off + d] for d < n (per-d sums stay sequential over rows: the SPEC's fp32 order).
void add_row(const void* x, int64_t off, int n, AsaDType dt, float* acc) {
  if (dt == ASA_FLOAT32) {
    const float* src = static_cast<const float*>(x) + off;
    for (int d = 0; d < n; ++d) acc[d] += src[d];
  } else {
    for (int d = 0; d < n; ++d) acc[d] += load_elem(x, off + d, dt);
  }
}

// ---------------------------------------------------------------- router

struct RouterCtx {
  const AsaParams* p;
  const uint8_t* keep;      // [B][Skv] or NULL
  int nq, nk, hsel, group;
  int emb;                  // router_dim(p): D, or Dg with the learned gate
  std::vector<float> kemb;  // [B][Hkv][NK][emb] k̄, or f_k · gate_k_weight with the gate
  std::vector<uint8_t> vis; // [B][NQ][NK] block visibility
  int32_t* indices;         // [B][Hsel][NQ][NK]
  int32_t* counts;          // [B][Hsel][NQ]
};

// out[g] = Σ_x x[x] · w[x][g] over x < rows (w row-major [rows][cols]; sequential over x).
void project(const float* x, const float* w, int rows, int cols, float* out) {
  std::fill(out, out + cols, 0.0f);
  for (int r = 0; r < rows; ++r) {
    const float xr = x[r];
    const float* wr = w + static_cast<size_t>(r) * cols;
    for (int g = 0; g < cols; ++g) out[g] += xr * wr[g];
  }
}

// Gate key feature of one block: feat = concat(mean, max, min) [3·D] over the kept keys `rows`
// (zeros when none is kept: such a block is invisible and never scored).
void key_features(const AsaParams& p, int n, int hkv, const std::vector<int>& rows, float* feat) {
  const int dim = p.head_dim;
  float* mean = feat;
  float* mx = feat + dim;
  float* mn = feat + 2 * dim;
  std::fill(feat, feat + 3 * dim, 0.0f);
  if (rows.empty()) return;
  std::fill(mx, mx + dim, -INFINITY);
  std::fill(mn, mn + dim, INFINITY);
  for (int j : rows) {
    const int64_t off = n * p.k_stride_b + hkv * p.k_stride_h + j * p.k_stride_s;
    for (int d = 0; d < dim; ++d) {
      const float x = load_elem(p.k, off + d, p.dtype);
      mean[d] += x;
      mx[d] = std::max(mx[d], x);
      mn[d] = std::min(mn[d], x);
    }
  }
  for (int d = 0; d < dim; ++d) mean[d] /= static_cast<float>(rows.size());
}

// Key embedding of every key block: k̄ (mean of the kept keys, fp32 sequential sums), or with
// the learned gate f_k · gate_k_weight[hkv].
void pool_keys(RouterCtx& c, int n, int hkv) {
  const AsaParams& p = *c.p;
  const int b = p.block_size, dim = p.head_dim;
  float* dst = &c.kemb[((static_cast<size_t>(n) * p.heads_kv + hkv) * c.nk) * c.emb];
  std::vector<int> rows;
  std::vector<float> feat(has_gate(p) ? 3 * dim : 0);
  for (int k = 0; k < c.nk; ++k) {
    float* acc = dst + static_cast<size_t>(k) * c.emb;
    rows.clear();
    for (int j = k * b; j < std::min(p.seq_kv, (k + 1) * b); ++j)
      if (!c.keep || c.keep[static_cast<size_t>(n) * p.seq_kv + j]) rows.push_back(j);
    if (has_gate(p)) {
      key_features(p, n, hkv, rows, feat.data());
      const float* w = p.gate_k_weight + static_cast<size_t>(hkv) * 3 * dim * p.gate_dim;
      project(feat.data(), w, 3 * dim, p.gate_dim, acc);
      continue;
    }
    std::fill(acc, acc + dim, 0.0f);
    for (int j : rows)
      add_row(p.k, n * p.k_stride_b + hkv * p.k_stride_h + j * p.k_stride_s, dim, p.dtype, acc);
    if (!rows.empty())
      for (int d = 0; d < dim; ++d) acc[d] /= static_cast<float>(rows.size());
  }
}

// Which key blocks each query block of batch n can see, and visible_counts.
void block_visibility(RouterCtx& c, int n) {
  const AsaParams& p = *c.p;
  const int b = p.block_size;
  std::vector<int> kept_prefix(p.seq_kv + 1, 0);
  for (int j = 0; j < p.seq_kv; ++j)
    kept_prefix[j + 1] = kept_prefix[j] + (c.keep ? c.keep[static_cast<size_t>(n) * p.seq_kv + j] : 1);
  for (int i = 0; i < c.nq; ++i) {
    int lo, hi, count = 0;
    block_key_range(p, i, &lo, &hi);
    uint8_t* v = &c.vis[(static_cast<size_t>(n) * c.nq + i) * c.nk];
    for (int k = 0; k < c.nk; ++k) {
      const int a = std::max(lo, k * b), z = std::min(hi, std::min(p.seq_kv, (k + 1) * b));
      v[k] = a < z && kept_prefix[z] - kept_prefix[a] > 0;
      count += v[k];
    }
    if (p.visible_counts) p.visible_counts[n * c.nq + i] = count;
  }
}

// Softmax over the visible blocks of the router logits (scale·q̄·k̄, or with the learned gate
// (q̄·Wq[h])·(f_k·Wk[h/G])) for one query head and block; P = 0 elsewhere.
void head_probs(const RouterCtx& c, int n, int h, int i, const uint8_t* vis, float* prob) {
  const AsaParams& p = *c.p;
  const int dim = p.head_dim, b = p.block_size;
  const int r0 = i * b, r1 = std::min(p.seq_q, r0 + b);
  std::vector<float> qbar(dim, 0.0f);
  for (int r = r0; r < r1; ++r) {
    const int64_t off = n * p.q_stride_b + h * p.q_stride_h + r * p.q_stride_s;
    add_row(p.q, off, dim, p.dtype, qbar.data());
  }
  for (int d = 0; d < dim; ++d) qbar[d] /= static_cast<float>(r1 - r0);
  std::vector<float> qemb;
  const float* qe = qbar.data();
  if (has_gate(p)) {
    qemb.resize(p.gate_dim);
    project(qbar.data(), p.gate_q_weight + static_cast<size_t>(h) * dim * p.gate_dim, dim,
            p.gate_dim, qemb.data());
    qe = qemb.data();
  }
  const float* kb = &c.kemb[((static_cast<size_t>(n) * p.heads_kv + h / c.group) * c.nk) * c.emb];
  const float scale = router_scale(p);
  float mx = -INFINITY;
  for (int k = 0; k < c.nk; ++k) {
    if (!vis[k]) continue;
    float dot = 0.0f;
    for (int d = 0; d < c.emb; ++d) dot += qe[d] * kb[static_cast<size_t>(k) * c.emb + d];
    prob[k] = scale * dot;
    mx = std::max(mx, prob[k]);
  }
  float sum = 0.0f;
  for (int k = 0; k < c.nk; ++k) {
    prob[k] = vis[k] ? std::exp(prob[k] - mx) : 0.0f;
    sum += prob[k];
  }
  for (int k = 0; k < c.nk; ++k) prob[k] = vis[k] ? prob[k] / sum : 0.0f;
}

bool is_forced(const AsaParams& p, int k, int ci) {
  if (k < p.sink_blocks) return true;
  if (p.causal) return ci - p.local_blocks < k && k <= ci;
  return std::abs(k - ci) < p.local_blocks;
}

// Selection walk of SPEC.md for one list: writes ascending indices (-1 padded) and the count.
void select_blocks(const RouterCtx& c, int i, const uint8_t* vis, const float* prob, float tau,
                   int32_t* out_idx, int32_t* out_count) {
  const AsaParams& p = *c.p;
  const int last_pos = std::min(p.seq_q, (i + 1) * p.block_size) - 1 + p.seq_kv - p.seq_q;
  const int ci = std::max(0, std::min(c.nk - 1, last_pos >= 0 ? last_pos / p.block_size : 0));
  std::vector<uint8_t> kept(c.nk, 0);
  if (tau >= 1.0f) {
    for (int k = 0; k < c.nk; ++k) kept[k] = vis[k];
  } else {
    std::vector<int> order;
    std::vector<int> rest;
    for (int k = 0; k < c.nk; ++k) {
      if (!vis[k]) continue;
      (is_forced(p, k, ci) ? order : rest).push_back(k);
    }
    const size_t nforced = order.size();
    std::stable_sort(rest.begin(), rest.end(),
                     [&](int a, int b) { return prob[a] > prob[b]; });
    order.insert(order.end(), rest.begin(), rest.end());
    float acc = 0.0f;
    for (size_t t = 0; t < order.size(); ++t) {
      const int k = order[t];
      if (t >= nforced && !(acc < tau)) break;
      kept[k] = 1;
      acc += prob[k];
    }
  }
  int cnt = 0;
  for (int k = 0; k < c.nk; ++k)
    if (kept[k]) out_idx[cnt++] = k;
  for (int k = cnt; k < c.nk; ++k) out_idx[k] = -1;
  *out_count = cnt;
}

// Router for one (batch, selection head): every query block.
void route_one(void* user, size_t task) {
  RouterCtx& c = *static_cast<RouterCtx*>(user);
  const AsaParams& p = *c.p;
  const int n = static_cast<int>(task / c.hsel), hs = static_cast<int>(task % c.hsel);
  const int h_first = p.select_per ? hs * c.group : hs;
  const int h_count = p.select_per ? c.group : 1;
  std::vector<float> prob(c.nk), acc(c.nk);
  for (int i = 0; i < c.nq; ++i) {
    const uint8_t* vis = &c.vis[(static_cast<size_t>(n) * c.nq + i) * c.nk];
    std::fill(acc.begin(), acc.end(), 0.0f);
    float tau = 0.0f;
    for (int h = h_first; h < h_first + h_count; ++h)
      tau = std::max(tau, p.head_thresholds ? p.head_thresholds[h] : p.threshold);
    // τ >= 1 keeps every visible block: probabilities are not needed (nor pooled).
    for (int h = h_first; tau < 1.0f && h < h_first + h_count; ++h) {
      head_probs(c, n, h, i, vis, prob.data());
      for (int k = 0; k < c.nk; ++k) acc[k] += prob[k];
    }
    if (h_count > 1)
      for (int k = 0; k < c.nk; ++k) acc[k] /= static_cast<float>(h_count);
    const size_t slot = (static_cast<size_t>(n) * c.hsel + hs) * c.nq + i;
    select_blocks(c, i, vis, acc.data(), tau, c.indices + slot * c.nk, c.counts + slot);
  }
}

void pool_one(void* user, size_t task) {
  RouterCtx& c = *static_cast<RouterCtx*>(user);
  pool_keys(c, static_cast<int>(task / c.p->heads_kv), static_cast<int>(task % c.p->heads_kv));
}

int route(const AsaParams& p, const uint8_t* keep, const TaskPool& tp, int num_threads) {
  RouterCtx c;
  c.p = &p;
  c.keep = keep;
  c.nq = num_query_blocks(p);
  c.nk = num_key_blocks(p);
  c.hsel = num_select_heads(p);
  c.group = p.heads_q / p.heads_kv;
  c.emb = router_dim(p);
  c.indices = p.block_indices;
  c.counts = p.block_counts;
  c.vis.assign(static_cast<size_t>(p.batch) * c.nq * c.nk, 0);
  for (int n = 0; n < p.batch; ++n) block_visibility(c, n);
  // τ >= 1 everywhere keeps every visible block: no need to pool.
  bool dense = !p.head_thresholds && p.threshold >= 1.0f;
  if (!dense) {
    c.kemb.assign(static_cast<size_t>(p.batch) * p.heads_kv * c.nk * c.emb, 0.0f);
    run_parallel(tp, num_threads, static_cast<size_t>(p.batch) * p.heads_kv, pool_one, &c);
  }
  run_parallel(tp, num_threads, static_cast<size_t>(p.batch) * c.hsel, route_one, &c);
  return ASA_OK;
}

// ---------------------------------------------------------------- attention

struct AttnCtx {
  const AsaParams* p;
  const uint8_t* keep;
  Isa isa;
  int nq, nk, hsel, group;
  std::vector<int64_t> order;   // tile ids, most kept blocks first (load balance)
  std::vector<uint8_t> used;    // [B][Hkv][NK] key block kept by some tile
  std::vector<float> kt;        // [B][Hkv][NK][D][b] packed keys
  std::vector<float> v;         // [B][Hkv][NK*b][dvp] packed values (unless read in place)
  std::vector<int64_t> packs;   // (n, hkv, kb) ids of the blocks to pack
};

float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

int64_t kv_slot(const AttnCtx& c, int n, int hkv) {
  return static_cast<int64_t>(n) * c.p->heads_kv + hkv;
}

void pack_one(void* user, size_t task) {
  AttnCtx& c = *static_cast<AttnCtx*>(user);
  const AsaParams& p = *c.p;
  const int64_t id = c.packs[task];
  const int kb = static_cast<int>(id % c.nk);
  const int64_t slot = id / c.nk;
  const int n = static_cast<int>(slot / p.heads_kv), hkv = static_cast<int>(slot % p.heads_kv);
  float* kt = c.kt.empty() ? nullptr : c.kt.data() + id * packed_key_block_floats(p);
  float* v = c.v.empty() ? nullptr
                         : c.v.data() + id * p.block_size * packed_value_row_floats(p);
  c.isa.pack(p, n, hkv, kb, kt, v);
}

void attend_one(void* user, size_t task) {
  const AttnCtx& c = *static_cast<const AttnCtx*>(user);
  const AsaParams& p = *c.p;
  const int64_t tile = c.order[task];
  const int i = static_cast<int>(tile % c.nq);
  const int h = static_cast<int>((tile / c.nq) % p.heads_q);
  const int n = static_cast<int>(tile / (static_cast<int64_t>(c.nq) * p.heads_q));
  const int hs = p.select_per ? h / c.group : h;
  const int hkv = h / c.group;
  const size_t slot = (static_cast<size_t>(n) * c.hsel + hs) * c.nq + i;
  TileJob job;
  job.p = &p;
  job.keep = c.keep ? c.keep + static_cast<size_t>(n) * p.seq_kv : nullptr;
  job.blocks = p.block_indices + slot * c.nk;
  job.num_blocks = std::max(0, std::min(p.block_counts[slot], c.nk));
  job.n = n;
  job.h = h;
  job.i = i;
  if (c.kt.empty()) {
    job.kt = nullptr;
    job.k = static_cast<const float*>(p.k) + n * p.k_stride_b + hkv * p.k_stride_h;
    job.k_ld = p.k_stride_s;
  } else {
    job.kt = c.kt.data() + kv_slot(c, n, hkv) * c.nk * packed_key_block_floats(p);
    job.k = nullptr;
    job.k_ld = 0;
  }
  if (c.v.empty()) {
    job.v = static_cast<const float*>(p.v) + n * p.v_stride_b + hkv * p.v_stride_h;
    job.v_ld = p.v_stride_s;
  } else {
    job.v_ld = packed_value_row_floats(p);
    job.v = c.v.data() + kv_slot(c, n, hkv) * c.nk * p.block_size * job.v_ld;
  }
  job.scratch = thread_scratch(tile_scratch_floats(p));
  c.isa.fn(job);
}

// Orders tiles by cost and marks the key blocks some tile keeps (only those are packed).
void plan_tiles(AttnCtx& c) {
  const AsaParams& p = *c.p;
  const int64_t tiles = static_cast<int64_t>(p.batch) * p.heads_q * c.nq;
  c.order.resize(tiles);
  c.used.assign(static_cast<size_t>(p.batch) * p.heads_kv * c.nk, 0);
  std::vector<int32_t> cost(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    const int i = static_cast<int>(t % c.nq), h = static_cast<int>((t / c.nq) % p.heads_q);
    const int n = static_cast<int>(t / (static_cast<int64_t>(c.nq) * p.heads_q));
    const int hs = p.select_per ? h / c.group : h;
    const size_t slot = (static_cast<size_t>(n) * c.hsel + hs) * c.nq + i;
    const int cnt = std::max(0, std::min(p.block_counts[slot], c.nk));
    uint8_t* used = &c.used[kv_slot(c, n, h / c.group) * c.nk];
    for (int x = 0; x < cnt; ++x) {
      const int kb = p.block_indices[slot * c.nk + x];
      if (kb >= 0 && kb < c.nk) used[kb] = 1;
    }
    cost[t] = cnt;
    c.order[t] = t;
  }
  std::stable_sort(c.order.begin(), c.order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  for (size_t id = 0; id < c.used.size(); ++id)
    if (c.used[id]) c.packs.push_back(static_cast<int64_t>(id));
}

int attend(const AsaParams& p, const uint8_t* keep, const TaskPool& tp, int num_threads) {
  AttnCtx c;
  c.p = &p;
  c.keep = keep;
  c.isa = pick_isa();
  c.nq = num_query_blocks(p);
  c.nk = num_key_blocks(p);
  c.hsel = num_select_heads(p);
  c.group = p.heads_q / p.heads_kv;
  plan_tiles(c);
  const size_t blocks = static_cast<size_t>(p.batch) * p.heads_kv * c.nk;
  // Unused blocks stay uninitialised: no tile reads them.
  const bool pack_keys = !keys_read_in_place(p);
  const bool pack_values = !values_usable_in_place(p);
  if (pack_keys) c.kt.resize(blocks * packed_key_block_floats(p));
  if (pack_values) c.v.resize(blocks * p.block_size * packed_value_row_floats(p));
  if (pack_keys || pack_values) run_parallel(tp, num_threads, c.packs.size(), pack_one, &c);
  run_parallel(tp, num_threads, c.order.size(), attend_one, &c);
  return ASA_OK;
}

// NULL check and contract validation of an entry point's params; `need_lists` for the entry
// points that read or write caller-owned block lists.
bool valid_call(const AsaParams* params, bool need_lists) {
  if (!params) {
    set_last_error("ASA: params is NULL");
    return false;
  }
  if (!validate_params(*params)) return false;
  if (need_lists && (!params->block_indices || !params->block_counts)) {
    set_last_error("ASA: block_indices and block_counts must be set");
    return false;
  }
  return true;
}

// Runs `body`, turning C++ exceptions (allocation, threads) into ASA_ERR_BACKEND.
template <typename F>
int guarded(F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    set_last_error("ASA CPU: out of memory");
  } catch (const std::exception& e) {
    set_last_error("ASA CPU: %s", e.what());
  } catch (...) {
    set_last_error("ASA CPU: unknown error");
  }
  return ASA_ERR_BACKEND;
}

int forward(const AsaParams* params, const TaskPool& tp, int num_threads) {
  if (!valid_call(params, false)) return ASA_ERR_INVALID_ARGUMENT;
  return guarded([&]() {
    AsaParams p = *params;
    std::vector<int32_t> idx, cnt;
    if (!p.block_indices || !p.block_counts) {
      const size_t lists = static_cast<size_t>(p.batch) * num_select_heads(p) * num_query_blocks(p);
      idx.resize(lists * num_key_blocks(p));
      cnt.resize(lists);
      p.block_indices = idx.data();
      p.block_counts = cnt.data();
    }
    const std::vector<uint8_t> keep = keep_bytes(p);
    const uint8_t* kp = keep.empty() ? nullptr : keep.data();
    int rc = route(p, kp, tp, num_threads);
    if (rc == ASA_OK) rc = attend(p, kp, tp, num_threads);
    return rc;
  });
}

}  // namespace
}  // namespace cpu
}  // namespace asa

extern "C" {

int asa_cpu_route(const AsaParams* params, int num_threads) {
  using namespace asa;
  if (!cpu::valid_call(params, true)) return ASA_ERR_INVALID_ARGUMENT;
  return cpu::guarded([&]() {
    const std::vector<uint8_t> keep = cpu::keep_bytes(*params);
    return cpu::route(*params, keep.empty() ? nullptr : keep.data(), cpu::TaskPool{nullptr, nullptr},
                      num_threads);
  });
}

int asa_cpu_attention(const AsaParams* params, int num_threads) {
  using namespace asa;
  if (!cpu::valid_call(params, true)) return ASA_ERR_INVALID_ARGUMENT;
  return cpu::guarded([&]() {
    const std::vector<uint8_t> keep = cpu::keep_bytes(*params);
    return cpu::attend(*params, keep.empty() ? nullptr : keep.data(),
                       cpu::TaskPool{nullptr, nullptr}, num_threads);
  });
}

int asa_cpu_forward(const AsaParams* params, int num_threads) {
  return asa::cpu::forward(params, asa::cpu::TaskPool{nullptr, nullptr}, num_threads);
}

int asa_cpu_forward_with(const AsaParams* params, AsaParallelFor parallel_for, void* pool) {
  return asa::cpu::forward(params, asa::cpu::TaskPool{parallel_for, pool}, 0);
}

const char* asa_cpu_isa(void) { return asa::cpu::pick_isa().name; }

}  // extern "C"
