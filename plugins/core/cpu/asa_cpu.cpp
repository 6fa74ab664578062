// CPU implementation of the ASA kernel core: entry points, router, thread dispatch.
// Semantics: asa_export/contract/SPEC.md. The attention tile kernel is in attention_kernel.cpp.
#include "asa/asa_cpu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
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

// ---------------------------------------------------------------- profiling
// ASA_CPU_PROFILE=1 prints one line per call to stderr: wall time of every phase and, for the
// parallel ones, the summed time of their tasks (busy) and the task count, so that idle threads
// and serial parts show. Off (the default) it costs one getenv per call.

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

struct Profile {
  bool on = false;
  char text[512] = {0};
  size_t len = 0;
  double t0 = 0.0;

  void start() {
    const char* e = std::getenv("ASA_CPU_PROFILE");
    on = e && e[0] && std::strcmp(e, "0") != 0;
    len = 0;
    t0 = on ? now_ms() : 0.0;
  }
  void add(const char* name, double wall, double busy, size_t tasks) {
    if (!on || len >= sizeof(text)) return;
    const int n = tasks ? std::snprintf(text + len, sizeof(text) - len, " %s=%.2f(busy %.2f/%zu)",
                                        name, wall, busy, tasks)
                        : std::snprintf(text + len, sizeof(text) - len, " %s=%.2f", name, wall);
    if (n > 0) len += static_cast<size_t>(n);
  }
  void finish(const AsaParams& p) {
    if (on)
      std::fprintf(stderr, "asa_cpu profile S=%d total=%.2f ms:%s\n", p.seq_q, now_ms() - t0,
                   text);
  }
};

thread_local Profile* g_profile = nullptr;  // the calling thread's profile while forward() runs

struct TimedTask {
  void (*fn)(void*, size_t);
  void* user;
  std::atomic<int64_t> busy_ns{0};
};

void timed_task(void* user, size_t i) {
  auto* t = static_cast<TimedTask*>(user);
  const auto a = std::chrono::steady_clock::now();
  t->fn(t->user, i);
  t->busy_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::steady_clock::now() - a).count();
}

// Wall time of a serial step, recorded under `name` when profiling.
template <typename F>
void serial_step(const char* name, F&& body) {
  Profile* prof = g_profile;
  if (!prof || !prof->on) {
    body();
    return;
  }
  const double a = now_ms();
  body();
  prof->add(name, now_ms() - a, 0.0, 0);
}

void run_parallel_raw(const TaskPool& tp, int num_threads, size_t total,
                      void (*fn)(void*, size_t), void* user) {
  if (tp.parallel_for) {
    tp.parallel_for(tp.pool, total, fn, user);
  } else {
    own_parallel_for(num_threads, total, fn, user);
  }
}

// `name` labels the phase in the profile line.
void run_parallel(const TaskPool& tp, int num_threads, size_t total, void (*fn)(void*, size_t),
                  void* user, const char* name) {
  if (total == 0) return;
  Profile* prof = g_profile;
  if (!prof || !prof->on) {
    run_parallel_raw(tp, num_threads, total, fn, user);
    return;
  }
  TimedTask timed;
  timed.fn = fn;
  timed.user = user;
  const double a = now_ms();
  run_parallel_raw(tp, num_threads, total, timed_task, &timed);
  prof->add(name, now_ms() - a, timed.busy_ns.load() * 1e-6, total);
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

// acc[d] = Σ_r x[off + r·stride + d] over r < rows, for d < n, summed in row order (acc starts
// at zero). fp32 keeps 16 columns in registers across the rows instead of re-reading acc.
void sum_rows(const void* x, int64_t off, int64_t stride, int rows, int n, AsaDType dt,
              float* acc) {
  std::fill(acc, acc + n, 0.0f);
  if (dt != ASA_FLOAT32) {
    for (int r = 0; r < rows; ++r) add_row(x, off + r * stride, n, dt, acc);
    return;
  }
  const float* src = static_cast<const float*>(x) + off;
  int d0 = 0;
  for (; d0 + 16 <= n; d0 += 16) {
    float a[16] = {0.0f};
    for (int r = 0; r < rows; ++r) {
      const float* row = src + r * stride + d0;
      for (int d = 0; d < 16; ++d) a[d] += row[d];
    }
    std::memcpy(acc + d0, a, sizeof(a));
  }
  for (int r = 0; r < rows && d0 < n; ++r)
    for (int d = d0; d < n; ++d) acc[d] += src[r * stride + d];
}

// ---------------------------------------------------------------- router

struct RouterCtx {
  const AsaParams* p;
  const uint8_t* keep;       // [B][Skv] or NULL
  int nq, nk, hsel, group;
  int emb;                   // router_dim(p): D, or Dg with the learned gate
  // Key block embeddings k̄ (or f_k · gate_k_weight with the gate), transposed to
  // [B][Hkv][emb][NK] so that one query block's logits against every key block are a loop over
  // blocks that vectorises.
  std::vector<float> kemb;
  std::vector<uint8_t> vis;  // [B][NQ][NK] block visibility
  int32_t* indices;          // [B][Hsel][NQ][NK]
  int32_t* counts;           // [B][Hsel][NQ]
};

// Key blocks per pooling task (one task per (batch, KV head, run of blocks)).
constexpr int kPoolBlocks = 8;

// Per-thread buffers of the router: its tasks run on the caller's pool threads, so nothing is
// allocated per task once a thread has seen the largest problem.
struct RouterScratch {
  std::vector<float> qbar, qemb, prob, acc, feat, kacc;
  std::vector<int> rows;
  std::vector<uint64_t> rest;  // walk keys of the blocks that are not forced
  std::vector<uint8_t> kept;
};

RouterScratch& router_scratch() {
  thread_local RouterScratch s;
  return s;
}

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

// Embedding of key block k of (n, hkv) into column k of the transposed table: k̄ (mean of the
// kept keys, fp32 sequential sums), or with the learned gate f_k · gate_k_weight[hkv].
void pool_block(RouterCtx& c, int n, int hkv, int k, RouterScratch& s) {
  const AsaParams& p = *c.p;
  const int b = p.block_size, dim = p.head_dim;
  s.rows.clear();
  for (int j = k * b; j < std::min(p.seq_kv, (k + 1) * b); ++j)
    if (!c.keep || c.keep[static_cast<size_t>(n) * p.seq_kv + j]) s.rows.push_back(j);
  s.kacc.resize(c.emb);
  float* acc = s.kacc.data();
  if (has_gate(p)) {
    s.feat.resize(3 * dim);
    key_features(p, n, hkv, s.rows, s.feat.data());
    const float* w = p.gate_k_weight + static_cast<size_t>(hkv) * 3 * dim * p.gate_dim;
    project(s.feat.data(), w, 3 * dim, p.gate_dim, acc);
  } else {
    std::fill(acc, acc + dim, 0.0f);
    for (int j : s.rows)
      add_row(p.k, n * p.k_stride_b + hkv * p.k_stride_h + j * p.k_stride_s, dim, p.dtype, acc);
    if (!s.rows.empty())
      for (int d = 0; d < dim; ++d) acc[d] /= static_cast<float>(s.rows.size());
  }
  float* dst = &c.kemb[(static_cast<size_t>(n) * p.heads_kv + hkv) * c.emb * c.nk];
  for (int e = 0; e < c.emb; ++e) dst[static_cast<size_t>(e) * c.nk + k] = acc[e];
}

// Pooling task: kPoolBlocks consecutive key blocks of one (batch, KV head).
void pool_task(void* user, size_t task) {
  RouterCtx& c = *static_cast<RouterCtx*>(user);
  const int runs = ceil_div(c.nk, kPoolBlocks);
  const int run = static_cast<int>(task % runs);
  const int slot = static_cast<int>(task / runs);
  const int n = slot / c.p->heads_kv, hkv = slot % c.p->heads_kv;
  RouterScratch& s = router_scratch();
  for (int k = run * kPoolBlocks; k < std::min(c.nk, (run + 1) * kPoolBlocks); ++k)
    pool_block(c, n, hkv, k, s);
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

// dot[k] = q·kt[:, k] for k < kend (kt is [emb][nk]; dot starts at zero). Lane k accumulates in
// embedding order, the order of a scalar dot product, so vectorising over blocks does not
// reassociate any sum.
void block_dots(const float* __restrict q, const float* __restrict kt, int emb, int nk, int kend,
                float* __restrict dot) {
  for (int e = 0; e < emb; ++e) {
    const float qv = q[e];
    const float* row = kt + static_cast<size_t>(e) * nk;
    for (int k = 0; k < kend; ++k) dot[k] += qv * row[k];
  }
}

// Softmax over the visible blocks of the router logits (scale·q̄·k̄, or with the learned gate
// (q̄·Wq[h])·(f_k·Wk[h/G])) for one query head and block; P = 0 elsewhere. Blocks from `kend`
// on are invisible.
void head_probs(const RouterCtx& c, int n, int h, int i, const uint8_t* vis, int kend,
                float* prob, RouterScratch& s) {
  const AsaParams& p = *c.p;
  const int dim = p.head_dim, b = p.block_size;
  const int r0 = i * b, r1 = std::min(p.seq_q, r0 + b);
  s.qbar.resize(dim);
  float* qbar = s.qbar.data();
  sum_rows(p.q, n * p.q_stride_b + h * p.q_stride_h + r0 * p.q_stride_s, p.q_stride_s, r1 - r0,
           dim, p.dtype, qbar);
  for (int d = 0; d < dim; ++d) qbar[d] /= static_cast<float>(r1 - r0);
  const float* qe = qbar;
  if (has_gate(p)) {
    s.qemb.resize(p.gate_dim);
    project(qbar, p.gate_q_weight + static_cast<size_t>(h) * dim * p.gate_dim, dim, p.gate_dim,
            s.qemb.data());
    qe = s.qemb.data();
  }
  const float* kt = &c.kemb[(static_cast<size_t>(n) * p.heads_kv + h / c.group) * c.emb * c.nk];
  std::fill(prob, prob + c.nk, 0.0f);
  block_dots(qe, kt, c.emb, c.nk, kend, prob);
  const float scale = router_scale(p);
  float mx = -INFINITY;
  for (int k = 0; k < kend; ++k) {
    if (!vis[k]) continue;
    prob[k] = scale * prob[k];
    mx = std::max(mx, prob[k]);
  }
  float sum = 0.0f;
  for (int k = 0; k < kend; ++k) {
    prob[k] = vis[k] ? std::exp(prob[k] - mx) : 0.0f;
    sum += prob[k];
  }
  for (int k = 0; k < kend; ++k) prob[k] = vis[k] ? prob[k] / sum : 0.0f;
}

bool is_forced(const AsaParams& p, int k, int ci) {
  if (k < p.sink_blocks) return true;
  if (p.causal) return ci - p.local_blocks < k && k <= ci;
  return std::abs(k - ci) < p.local_blocks;
}

// Sort key of a block in the selection walk: ascending keys = descending probability, ties by
// ascending index. Probabilities are >= 0, whose IEEE bit patterns order like the values.
inline uint64_t walk_key(float prob, int k) {
  uint32_t bits;
  std::memcpy(&bits, &prob, 4);
  return (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(k);
}

// Selection walk of SPEC.md for one list: writes ascending indices (-1 padded) and the count.
// Forced blocks first (summed in index order), then the others by descending probability (ties:
// lower index first) while the sum is below τ.
void select_blocks(const RouterCtx& c, int i, const uint8_t* vis, const float* prob, float tau,
                   int32_t* out_idx, int32_t* out_count, RouterScratch& s) {
  const AsaParams& p = *c.p;
  const int last_pos = std::min(p.seq_q, (i + 1) * p.block_size) - 1 + p.seq_kv - p.seq_q;
  const int ci = std::max(0, std::min(c.nk - 1, last_pos >= 0 ? last_pos / p.block_size : 0));
  s.kept.assign(c.nk, 0);
  uint8_t* kept = s.kept.data();
  if (tau >= 1.0f) {
    for (int k = 0; k < c.nk; ++k) kept[k] = vis[k];
  } else {
    float acc = 0.0f;
    s.rest.clear();
    for (int k = 0; k < c.nk; ++k) {
      if (!vis[k]) continue;
      if (is_forced(p, k, ci)) {
        kept[k] = 1;
        acc += prob[k];
      } else {
        s.rest.push_back(walk_key(prob[k], k));
      }
    }
    // Sorted only when the forced blocks do not reach τ already.
    if (acc < tau) std::sort(s.rest.begin(), s.rest.end());
    for (size_t t = 0; t < s.rest.size() && acc < tau; ++t) {
      const int k = static_cast<int>(s.rest[t] & 0xffffffffu);
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

// Router task: one list, i.e. one (batch, selection head, query block).
void route_list(void* user, size_t task) {
  RouterCtx& c = *static_cast<RouterCtx*>(user);
  const AsaParams& p = *c.p;
  const int i = static_cast<int>(task % c.nq);
  const size_t nh = task / c.nq;
  const int hs = static_cast<int>(nh % c.hsel), n = static_cast<int>(nh / c.hsel);
  const int h_first = p.select_per ? hs * c.group : hs;
  const int h_count = p.select_per ? c.group : 1;
  const uint8_t* vis = &c.vis[(static_cast<size_t>(n) * c.nq + i) * c.nk];
  int kend = c.nk;
  while (kend > 0 && !vis[kend - 1]) --kend;
  RouterScratch& s = router_scratch();
  s.prob.resize(c.nk);
  s.acc.assign(c.nk, 0.0f);
  float* acc = s.acc.data();
  float tau = 0.0f;
  for (int h = h_first; h < h_first + h_count; ++h)
    tau = std::max(tau, p.head_thresholds ? p.head_thresholds[h] : p.threshold);
  // τ >= 1 keeps every visible block: probabilities are not needed (nor pooled).
  for (int h = h_first; tau < 1.0f && h < h_first + h_count; ++h) {
    head_probs(c, n, h, i, vis, kend, s.prob.data(), s);
    for (int k = 0; k < kend; ++k) acc[k] += s.prob[k];
  }
  if (h_count > 1)
    for (int k = 0; k < c.nk; ++k) acc[k] /= static_cast<float>(h_count);
  const size_t slot = task;  // (n * Hsel + hs) * NQ + i
  select_blocks(c, i, vis, acc, tau, c.indices + slot * c.nk, c.counts + slot, s);
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
  serial_step("visibility", [&]() {
    for (int n = 0; n < p.batch; ++n) block_visibility(c, n);
  });
  // τ >= 1 everywhere keeps every visible block: no need to pool.
  bool dense = !p.head_thresholds && p.threshold >= 1.0f;
  if (!dense) {
    c.kemb.assign(static_cast<size_t>(p.batch) * p.heads_kv * c.nk * c.emb, 0.0f);
    const size_t tasks = static_cast<size_t>(p.batch) * p.heads_kv * ceil_div(c.nk, kPoolBlocks);
    run_parallel(tp, num_threads, tasks, pool_task, &c, "pool");
  }
  run_parallel(tp, num_threads, static_cast<size_t>(p.batch) * c.hsel * c.nq, route_list, &c,
               "route");
  return ASA_OK;
}

// ---------------------------------------------------------------- attention

// Uninitialised float storage (std::vector would zero megabytes that pack_one overwrites).
struct FloatBuffer {
  std::unique_ptr<float[]> ptr;
  size_t count = 0;
  bool empty() const { return count == 0; }
  float* data() const { return ptr.get(); }
  void resize(size_t n) {
    ptr.reset(new float[n]);
    count = n;
  }
};

struct AttnCtx {
  const AsaParams* p;
  const uint8_t* keep;
  Isa isa;
  int nq, nk, hsel, group;
  std::vector<int64_t> order;   // tile ids, most kept blocks first (load balance)
  std::vector<uint8_t> used;    // [B][Hkv][NK] key block kept by some tile
  FloatBuffer kt;               // [B][Hkv][NK][D][b] packed keys
  FloatBuffer v;                // [B][Hkv][NK*b][dvp] packed values (unless read in place)
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
  serial_step("plan", [&]() { plan_tiles(c); });
  const size_t blocks = static_cast<size_t>(p.batch) * p.heads_kv * c.nk;
  // Unused blocks stay uninitialised: no tile reads them.
  const bool pack_keys = !keys_read_in_place(p);
  const bool pack_values = !values_usable_in_place(p);
  serial_step("alloc", [&]() {
    if (pack_keys) c.kt.resize(blocks * packed_key_block_floats(p));
    if (pack_values) c.v.resize(blocks * p.block_size * packed_value_row_floats(p));
  });
  if (pack_keys || pack_values)
    run_parallel(tp, num_threads, c.packs.size(), pack_one, &c, "pack");
  run_parallel(tp, num_threads, c.order.size(), attend_one, &c, "attend");
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
    Profile prof;
    prof.start();
    g_profile = &prof;
    struct Reset {
      ~Reset() { g_profile = nullptr; }
    } reset;
    const std::vector<uint8_t> keep = keep_bytes(p);
    const uint8_t* kp = keep.empty() ? nullptr : keep.data();
    int rc = route(p, kp, tp, num_threads);
    if (rc == ASA_OK) rc = attend(p, kp, tp, num_threads);
    prof.finish(p);
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
