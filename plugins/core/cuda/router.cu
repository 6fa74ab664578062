// Training-free ASA router on the GPU (SPEC.md "Router", "Threshold", "Selection").
//
// Three steps, all in float32:
//   1. pool: q̄ per (batch, query head, query block), k̄ per (batch, KV head, key block) over the
//      kept keys; with a padding mask also a running count of kept keys per batch; key blocks
//      below params.key_block_stats_blocks are not pooled but read from the caller's
//      key_block_stats (SPEC.md "Acceleration (kernel ABI only)"), which
//      asa_cuda_key_block_stats fills with these same kernels;
//   2. logits: a batched float32 GEMM q̄ . k̄ (scaled) into the workspace; with the learned gate
//      (gate.cu) the same GEMM over the gate's embeddings qemb . kemb (width Dg, no scale);
//   3. select: one CTA (or, for many short lists, one warp) per (batch, selection head, query
//      block) softmaxes over visible blocks (averaging the group's heads for select_per 1), and
//      walks the contract's order (forced blocks, then descending probability, ties to the lower
//      index) with a sequential float32 running sum so that the kept set matches the reference;
//      decode (few query blocks, no gate) computes q̄ and the logits in one kernel;
//   4. write the ascending kept lists (padded with -1), their counts and the visible counts.
// With τ ≥ 1 from the attribute (no head_thresholds) every visible block is kept: steps 1-3 are
// skipped and dense_lists_kernel writes the visible blocks directly (ASA_CUDA_DENSE_FASTPATH=0
// forces the full router).
#include <algorithm>
#include <cstdlib>

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "fused_decode.cuh"
#include "kernels.h"

namespace asa {
namespace cuda {
namespace {

// Phase marks of select_kernel for tools/select_phases.cu, which defines this macro to record a
// clock per phase; empty in the library.
#ifndef ASA_SELECT_PHASE
#define ASA_SELECT_PHASE(i)
#endif
// The same for route_decode_kernel (tools/route_phases.cu).
#ifndef ASA_ROUTE_PHASE
#define ASA_ROUTE_PHASE(i)
#endif

constexpr int kPoolThreads = 256;
constexpr int kSelectThreads = 256;
constexpr int kPrefixThreads = 1024;

__host__ __device__ inline int next_pow2(int x) {
  int v = 1;
  while (v < x) v <<= 1;
  return v;
}

// Running count of kept keys: prefix[n][j] = number of kept keys among [0, j).
__global__ void prefix_kernel(AsaParams p, int32_t* prefix) {
  using Scan = cub::BlockScan<int, kPrefixThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int n = blockIdx.x;
  const int chunk = cdiv(p.seq_kv, kPrefixThreads);
  const int begin = threadIdx.x * chunk;
  const int end = min(begin + chunk, p.seq_kv);
  int count = 0;
  for (int j = begin; j < end; ++j) count += key_kept(p, n, j);
  int base = 0;
  Scan(tmp).ExclusiveSum(count, base);
  int32_t* row = prefix + static_cast<int64_t>(n) * (p.seq_kv + 1);
  if (threadIdx.x == 0) row[0] = 0;
  for (int j = begin; j < end; ++j) {
    base += key_kept(p, n, j);
    row[j + 1] = base;
  }
}

// Number of kept keys in [a, b] of batch n.
__device__ __forceinline__ int kept_in_range(const AsaParams& p, const int32_t* prefix, int n,
                                             int a, int b) {
  if (a > b) return 0;
  if (p.mask_dtype == ASA_MASK_NONE) return b - a + 1;
  const int32_t* row = prefix + static_cast<int64_t>(n) * (p.seq_kv + 1);
  return row[b + 1] - row[a];
}

// Keys [lo, hi] that some row of query block i sees (SPEC.md "Geometry": bottom-right alignment,
// causal / window), and c, the key block of its last row (clamped to [0, nk)).
__device__ __forceinline__ void query_block_keys(const AsaParams& p, int i, int nk, int* lo,
                                                 int* hi, int* c) {
  const int bs = p.block_size;
  const int r1 = min((i + 1) * bs, p.seq_q) - 1;
  const int p0 = i * bs + p.seq_kv - p.seq_q;
  const int p1 = r1 + p.seq_kv - p.seq_q;
  visible_key_range(p, p0, p1, lo, hi);
  *c = min(max(p1 >= 0 ? p1 / bs : 0, 0), nk - 1);
}

// Whether key block k is visible to a query block seeing keys [lo, hi]: it must hold a kept key
// in that range (with a padding mask this depends on which keys are kept, not only on geometry).
// The one visibility rule of the router and of the dense lists (bit-identical telemetry).
__device__ __forceinline__ bool key_block_visible(const AsaParams& p, const int32_t* prefix,
                                                  int n, int k, int lo, int hi) {
  const int a = max(lo, k * p.block_size);
  const int b = min(hi, min((k + 1) * p.block_size, p.seq_kv) - 1);
  return kept_in_range(p, prefix, n, a, b) > 0;
}

// Whether key block k is forced (SPEC.md "Selection": a sink block, or in the local band around
// c, the key block of the query block's last row); kept only where visible.
__device__ __forceinline__ bool block_forced(const AsaParams& p, int k, int c) {
  if (k < p.sink_blocks) return true;
  return p.causal ? (k <= c && k > c - p.local_blocks) : abs(k - c) < p.local_blocks;
}

// Sum of rows [r0, r1) of a [S, D] slice (rows kept by `keep_row`), times `inv`, into out[D].
// 16-byte loads: thread t reads chunk t % cpr of rows r0 + t / cpr, r0 + t / cpr + rows_par...;
// the row groups are then added in order through shared memory.
template <typename T, typename Keep>
__device__ void pool_rows(const T* base, int64_t stride, int r0, int r1, int D, float inv,
                          Keep keep_row, float* out) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ float partial[kPoolThreads * kVec];
  const bool vec_ok = D % kVec == 0 && D / kVec <= kPoolThreads &&
                      (reinterpret_cast<uintptr_t>(base) & 15) == 0 && (stride % kVec) == 0;
  if (!vec_ok) {
    for (int d = threadIdx.x; d < D; d += kPoolThreads) {
      float s = 0.f;
      for (int r = r0; r < r1; ++r) {
        if (keep_row(r)) s += to_float(base[r * stride + d]);
      }
      out[d] = s * inv;
    }
    return;
  }
  const int cpr = D / kVec, rows_par = kPoolThreads / cpr;
  const int c = threadIdx.x % cpr, rg = threadIdx.x / cpr;
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
  if (rg < rows_par) {
#pragma unroll 4
    for (int r = r0 + rg; r < r1; r += rows_par) {
      if (!keep_row(r)) continue;
      const uint4 raw = *reinterpret_cast<const uint4*>(base + r * stride + c * kVec);
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += to_float(x[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) partial[threadIdx.x * kVec + e] = acc[e];
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kPoolThreads) {
    const int cc = d / kVec, e = d % kVec;
    float s = 0.f;
    for (int g = 0; g < rows_par; ++g) s += partial[(g * cpr + cc) * kVec + e];
    out[d] = s * inv;
  }
}

// q̄ = mean of the query rows of block i (float32).
template <typename T>
__global__ void pool_q_kernel(AsaParams p, float* qbar) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int i = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int nq = gridDim.x;
  const int r0 = i * p.block_size;
  const int r1 = min(r0 + p.block_size, p.seq_q);
  const T* q = static_cast<const T*>(p.q) + n * p.q_stride_b + h * p.q_stride_h;
  float* out = qbar + ((static_cast<int64_t>(n) * p.heads_q + h) * nq + i) * p.head_dim;
  pool_rows(q, p.q_stride_s, r0, r1, p.head_dim, 1.f / static_cast<float>(r1 - r0),
            [](int) { return true; }, out);
}

// k̄ = mean of the kept keys of block k of (batch n, KV head h) into out[D] (zeros when none is
// kept: such a block is invisible), by the CTA's kPoolThreads threads. The router's own scratch
// (cap = NK) and the caller's key_block_stats both come from pool_k_kernel, so they agree bit
// for bit.
template <typename T>
__device__ void pool_key_block(const AsaParams& p, int n, int h, int k, float* out) {
  const int j0 = k * p.block_size;
  const int j1 = min(j0 + p.block_size, p.seq_kv);
  const T* key = static_cast<const T*>(p.k) + n * p.k_stride_b + h * p.k_stride_h;
  int count = j1 - j0;
  if (p.mask_dtype != ASA_MASK_NONE) {
    count = 0;
    for (int j = j0; j < j1; ++j) count += key_kept(p, n, j);
  }
  const float inv = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
  pool_rows(key, p.k_stride_s, j0, j1, p.head_dim, inv,
            [&p, n](int j) { return key_kept(p, n, j); }, out);
}

template <typename T>
__global__ void pool_k_kernel(AsaParams p, float* kbar, int first, int cap) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int k = first + blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  pool_key_block<T>(p, n, h, k,
                    kbar + ((static_cast<int64_t>(n) * p.heads_kv + h) * cap + k) * p.head_dim);
}

enum : uint8_t { kVisible = 1, kForced = 2, kKept = 4 };

struct SelectSmem {
  float* prob;     // [NK] probabilities of the current head
  float* pavg;     // [NK] group-summed probabilities (select_per 1)
  uint64_t* keys;  // [nk_pow2] sort keys
  uint8_t* flags;  // [NK]
};

__device__ float block_sum(float v) {
  using Reduce = cub::BlockReduce<float, kSelectThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float result;
  const float r = Reduce(tmp).Sum(v);
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  const float out = result;
  __syncthreads();
  return out;
}

// Who sorts one list: every thread of the CTA, or one warp (its lanes).
enum class Sorter { kBlock, kWarp };

// Ascending bitonic sort of n (a power of two) keys in shared memory by the CTA's kSelectThreads
// threads (kBlock) or the calling warp's 32 lanes (kWarp). kBlock gives each warp the pairs of
// one contiguous chunk of n / warps keys: a stage whose pairs stay inside the chunks (2·stride ≤
// chunk) needs only __syncwarp, so of the 55 stages of n = 1024 only 6 wait for the whole CTA.
// (Measured on an H200: this saved little; the sort's ~11 µs at n = 1024 is shared-memory
// traffic, not barriers. BENCHMARKS.md optimization step 16.)
template <Sorter kBy, typename Key>
__device__ void bitonic_sort(Key* keys, int n) {
  constexpr int kWarps = kBy == Sorter::kBlock ? kSelectThreads / 32 : 1;
  const int lane = threadIdx.x % 32, warp = kBy == Sorter::kBlock ? threadIdx.x / 32 : 0;
  const int pairs = n / 2;
  const int per_warp = pairs >= kWarps ? pairs / kWarps : 1;  // pairs of one warp's chunk
  const int chunk = 2 * per_warp;
  const bool active = warp * per_warp < pairs;
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (active) {
        for (int j = lane; j < per_warp; j += 32) {
          const int t = warp * per_warp + j;
          const int lo = 2 * t - (t & (stride - 1));
          const int hi = lo + stride;
          const bool ascending = (lo & size) == 0;
          const Key a = keys[lo], b = keys[hi];
          if ((a > b) == ascending) {
            keys[lo] = b;
            keys[hi] = a;
          }
        }
      }
      // The next stage reads across chunks when its pairs span more than one chunk.
      const int next = stride > 1 ? stride >> 1 : size;  // stride of the next stage
      if (kBy == Sorter::kBlock && (2 * next > chunk || (stride == 1 && size == n))) {
        __syncthreads();
      } else {
        __syncwarp();
      }
    }
  }
}

// Ascending bitonic sort of n = kSelectThreads · E keys with the keys in registers: thread t
// holds keys [t·E, t·E + E). Partners inside the thread swap in registers, partners in another
// lane of the warp come by shuffles, and only strides of 32·E and more go through shared memory
// with CTA barriers (6 of the 55 stages at n = 1024), which makes the sort several times faster
// than the shared-memory sort for the few-lists (decode) case.
template <int E, typename Key>
__device__ void bitonic_sort_registers(Key* keys, int n) {
  const int t = threadIdx.x;
  Key a[E];
#pragma unroll
  for (int e = 0; e < E; ++e) a[e] = keys[t * E + e];
  for (int size = 2; size <= n; size <<= 1) {
    int stride = size >> 1;
    if (stride >= 32 * E) {  // partners in other warps
#pragma unroll
      for (int e = 0; e < E; ++e) keys[t * E + e] = a[e];
      __syncthreads();
      for (; stride >= 32 * E; stride >>= 1) {
        for (int q = t; q < n / 2; q += kSelectThreads) {
          const int lo = 2 * q - (q & (stride - 1)), hi = lo + stride;
          const Key x = keys[lo], y = keys[hi];
          if ((x > y) == ((lo & size) == 0)) {
            keys[lo] = y;
            keys[hi] = x;
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int e = 0; e < E; ++e) a[e] = keys[t * E + e];
      __syncthreads();  // nobody writes keys again before everyone has read them
    }
    for (; stride >= E; stride >>= 1) {  // partners in another lane
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int i = t * E + e;
        const Key b = __shfl_xor_sync(0xffffffffu, a[e], stride / E);
        const bool keep_min = ((i & stride) == 0) == ((i & size) == 0);
        a[e] = keep_min ? (a[e] < b ? a[e] : b) : (a[e] < b ? b : a[e]);
      }
    }
#pragma unroll
    for (int st = E / 2; st > 0; st >>= 1) {  // partners in this thread
      if (st >= size) continue;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (e & st) continue;
        const bool ascending = ((t * E + e) & size) == 0;
        if ((a[e] > a[e | st]) == ascending) {
          const Key x = a[e];
          a[e] = a[e | st];
          a[e | st] = x;
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) keys[t * E + e] = a[e];
  __syncthreads();
}

// The CTA's sort of n keys: in registers when n is 1, 2, 4 or 8 keys per thread, else in shared
// memory.
template <typename Key>
__device__ void bitonic_sort_block(Key* keys, int n) {
  switch (n / kSelectThreads) {
    case 8: if (n == 8 * kSelectThreads) return bitonic_sort_registers<8>(keys, n); break;
    case 4: if (n == 4 * kSelectThreads) return bitonic_sort_registers<4>(keys, n); break;
    case 2: if (n == 2 * kSelectThreads) return bitonic_sort_registers<2>(keys, n); break;
    case 1: if (n == kSelectThreads) return bitonic_sort_registers<1>(keys, n); break;
    default: break;
  }
  bitonic_sort<Sorter::kBlock>(keys, n);
}

// One warp step of the walk: the 32 lanes' values x are added to acc in lane order (every lane
// runs the same float32 chain, each x_j fetched by a shuffle off the chain); returns, in each
// lane, the running sum before its own value.
__device__ __forceinline__ float walk_step(float x, float& acc) {
  const int lane = threadIdx.x % 32;
  float before = acc;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const float xj = __shfl_sync(0xffffffffu, x, j);
    if (lane == j) before = acc;
    acc += xj;
  }
  return before;
}

// The contract's walk over the sorted keys (~bits(P) above the index, ~0 past the visible
// non-forced blocks) by one full warp: acc starts at the forced blocks' sum and adds P left to
// right in float32 exactly as the reference does. The warp takes 32 keys at a time: every lane
// runs the same chain acc + x_0 + x_1 + ... (each x_j comes by a shuffle, off the chain, so the
// chain is one dependent add per key) and keeps the sum before its own key; a ballot finds the
// first lane whose key ends the walk. The lanes then mark the kept blocks in parallel.
__device__ void walk_sorted_warp(const uint64_t* keys, int nk, float acc, float tau,
                                 uint8_t* flags) {
  const int lane = threadIdx.x % 32;
  int stop = nk;
  for (int base = 0; base < nk; base += 32) {
    const int t = base + lane;
    const uint64_t key = t < nk ? keys[t] : ~0ull;
    const float before = walk_step(__uint_as_float(~static_cast<uint32_t>(key >> 32)), acc);
    const unsigned ends = __ballot_sync(0xffffffffu, key == ~0ull || !(before < tau));
    if (ends != 0) {
      const int j = __ffs(ends) - 1;
      stop = min(base + j, nk);
      acc = __shfl_sync(0xffffffffu, before, j);  // the sum where the walk stopped
      break;
    }
  }
  for (int t = lane; t < stop; t += 32) flags[static_cast<int>(keys[t] & 0xffffffffu)] |= kKept;
  __syncwarp();
}

// Where the walk over sorted values stopped: the kept candidates are those with a key below
// `key` plus, of the candidates whose key equals `key`, all of them (all_ties) or the `ties`
// ones of lowest block index. kept = 0: no candidate is kept.
struct WalkCut {
  uint32_t key;
  int ties;
  int kept;
  bool all_ties;
};

// walk_sorted_warp for 32-bit value keys (~bits(P), ascending) of n candidates: the same float32
// chain, then the cut (where the equal-value run around the last kept key starts and ends).
__device__ void walk_sorted_values_warp(const uint32_t* keys, int n, float acc, float tau,
                                        WalkCut* cut) {
  const int lane = threadIdx.x % 32;
  int stop = n;
  for (int base = 0; base < n; base += 32) {
    const int t = base + lane;
    const uint32_t key = t < n ? keys[t] : ~0u;
    const float before = walk_step(__uint_as_float(~key), acc);
    const unsigned ends = __ballot_sync(0xffffffffu, t >= n || !(before < tau));
    if (ends != 0) {
      stop = min(base + __ffs(ends) - 1, n);
      break;
    }
  }
  if (lane == 0) {
    cut->kept = stop;
    if (stop > 0) {
      const uint32_t last = keys[stop - 1];
      int first = stop - 1, end = stop;
      while (first > 0 && keys[first - 1] == last) --first;
      while (end < n && keys[end] == last) ++end;
      cut->key = last;
      cut->ties = stop - first;
      cut->all_ties = end == stop;
    }
  }
  __syncwarp();
}

// Where the contract's walk starts (SPEC.md "Selection"): the sum of P over the visible forced
// blocks, sequential in ascending index order. They lie in [0, sink) and the local band around
// c, the key block of the query block's last row (block_forced), so only those are read.
__device__ float forced_sum(const AsaParams& p, const uint8_t* flags, const float* prob, int nk,
                            int c) {
  constexpr uint8_t kVF = kVisible | kForced;
  const int sink_end = min(p.sink_blocks, nk);
  const int local_lo = max(c - p.local_blocks + 1, 0);
  const int local_hi = min(p.causal ? c : c + p.local_blocks - 1, nk - 1);
  float acc = 0.f;
  for (int k = 0; k < sink_end; ++k) {
    if ((flags[k] & kVF) == kVF) acc += prob[k];
  }
  for (int k = max(sink_end, local_lo); k <= local_hi; ++k) {
    if ((flags[k] & kVF) == kVF) acc += prob[k];
  }
  return acc;
}

// Marks kKept in flags by the contract's walk and writes one list row.
__device__ void select_and_write(const AsaParams& p, const Workspace& ws, const SelectSmem& sm,
                                 const float* prob, float tau, int nk, int nk_pow2,
                                 int64_t row, int c) {
  __shared__ float forced_acc;
  ASA_SELECT_PHASE(3);
  for (int k = threadIdx.x; k < nk; k += kSelectThreads) {
    const uint8_t f = sm.flags[k] & (kVisible | kForced);
    const bool keep = (f & kVisible) && (tau >= 1.f || (f & kForced));
    sm.flags[k] = f | (keep ? kKept : 0);
  }
  __syncthreads();
  if (tau < 1.f) {
    if (threadIdx.x == 0) forced_acc = forced_sum(p, sm.flags, prob, nk, c);
    // Sort the candidates' values only (32-bit keys ~bits(P), ascending = P descending): the
    // walk's sums depend on the values, not on which of two equal values comes first, and the
    // index order of ties is settled when marking (WalkCut).
    __shared__ int num_cand;
    __shared__ WalkCut cut;
    if (threadIdx.x == 0) num_cand = 0;
    __syncthreads();
    uint32_t* keys = reinterpret_cast<uint32_t*>(sm.keys);
    int cand = 0;
    for (int t = threadIdx.x; t < nk_pow2; t += kSelectThreads) {
      uint32_t key = ~0u;
      if (t < nk && sm.flags[t] == kVisible) {
        key = ~__float_as_uint(prob[t]);
        ++cand;
      }
      keys[t] = key;
    }
    if (cand) atomicAdd(&num_cand, cand);
    __syncthreads();
    ASA_SELECT_PHASE(4);
    bitonic_sort_block(keys, nk_pow2);
    ASA_SELECT_PHASE(5);
    if (threadIdx.x < 32) walk_sorted_values_warp(keys, num_cand, forced_acc, tau, &cut);
    __syncthreads();
    ASA_SELECT_PHASE(6);
    if (cut.kept > 0) {
      for (int k = threadIdx.x; k < nk; k += kSelectThreads) {
        if (sm.flags[k] != kVisible) continue;
        const uint32_t key = ~__float_as_uint(prob[k]);
        if (key < cut.key || (cut.all_ties && key == cut.key)) sm.flags[k] |= kKept;
      }
      if (!cut.all_ties) {  // the walk stopped inside a run of equal values: lowest indices first
        __syncthreads();
        if (threadIdx.x == 0) {
          int left = cut.ties;
          for (int k = 0; k < nk && left > 0; ++k) {
            if (sm.flags[k] == kVisible && ~__float_as_uint(prob[k]) == cut.key) {
              sm.flags[k] |= kKept;
              --left;
            }
          }
        }
      }
    }
    __syncthreads();
  }
  // Ascending compaction of the kept flags.
  ASA_SELECT_PHASE(7);
  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int total;
  const int per = cdiv(nk, kSelectThreads);
  const int begin = threadIdx.x * per;
  const int end = min(begin + per, nk);
  int count = 0;
  for (int k = begin; k < end; ++k) count += (sm.flags[k] & kKept) ? 1 : 0;
  int pos = 0;
  Scan(scan_tmp).ExclusiveSum(count, pos);
  int32_t* out = ws.block_indices + row * nk;
  for (int k = begin; k < end; ++k) {
    if (sm.flags[k] & kKept) out[pos++] = k;
  }
  if (threadIdx.x == kSelectThreads - 1) total = pos;
  __syncthreads();
  for (int t = total + threadIdx.x; t < nk; t += kSelectThreads) out[t] = -1;
  if (threadIdx.x == 0) ws.block_counts[row] = total;
  __syncthreads();
  ASA_SELECT_PHASE(8);
}

// logits[n, h, i, k] = scale * q̄[n, h, i] . k̄[n, h / G, k] over `D` columns (the head dim, or
// the gate width Dg with scale 1 on the gate's embeddings): a batched float32 GEMM in 32x32
// tiles, one (batch, query head) per grid z. Spread over many CTAs so that decode (one query
// block) does not serialize on a handful of selection CTAs.
constexpr int kLogitTile = 32;

// Where the logits read key block k of (batch, KV head) bh: the caller's key_block_stats for
// k < cached_blocks, else the rows this call pooled ([B, Hkv, NK, D]).
struct KeyRows {
  const float* fresh;
  const float* cached;  // [B, Hkv, cap, D] or NULL
  int cached_blocks;
  int cap;
  __device__ __forceinline__ const float* row(int64_t bh, int k, int nk, int D) const {
    return k < cached_blocks ? cached + (bh * cap + k) * D : fresh + (bh * nk + k) * D;
  }
};

__global__ void logits_kernel(AsaParams p, const float* qbar, KeyRows kbar, int D,
                              float scale, float* logits) {
  __shared__ float qs[kLogitTile][kLogitTile + 1];
  __shared__ float ks[kLogitTile][kLogitTile + 1];
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  const int G = p.heads_q / p.heads_kv;
  const int nh = blockIdx.z, n = nh / p.heads_q, h = nh % p.heads_q;
  const int i0 = blockIdx.y * kLogitTile, k0 = blockIdx.x * kLogitTile;
  const float* qb = qbar + (static_cast<int64_t>(n) * p.heads_q + h) * nq * D;
  const int64_t bh = static_cast<int64_t>(n) * p.heads_kv + h / G;
  const int tx = threadIdx.x % kLogitTile, ty = threadIdx.x / kLogitTile;  // 32 x 8 threads
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int d0 = 0; d0 < D; d0 += kLogitTile) {
    for (int r = ty; r < kLogitTile; r += 8) {
      const int d = d0 + tx;
      qs[r][tx] = (i0 + r < nq && d < D) ? qb[(i0 + r) * D + d] : 0.f;
      ks[r][tx] = (k0 + r < nk && d < D) ? kbar.row(bh, k0 + r, nk, D)[d] : 0.f;
    }
    __syncthreads();
    // One ks read serves four rows (qs reads are broadcasts): shared-memory reads per FMA
    // 1.25 instead of 2.
#pragma unroll 8
    for (int dd = 0; dd < kLogitTile; ++dd) {
      const float kv = ks[tx][dd];
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] += qs[ty + 8 * e][dd] * kv;
    }
    __syncthreads();
  }
  float* out = logits + (static_cast<int64_t>(n) * p.heads_q + h) * nq * nk;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int i = i0 + ty + 8 * e, k = k0 + tx;
    if (i < nq && k < nk) out[static_cast<int64_t>(i) * nk + k] = scale * acc[e];
  }
}

// Few query blocks (decode): one warp per (batch, KV head, key block) computes the logits of
// every query block of the group's G query heads, reading k̄ once (not once per head), coalesced.
__global__ void logits_rows_kernel(AsaParams p, const float* qbar, KeyRows kbar, int D,
                                   float scale, float* logits) {
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  const int G = p.heads_q / p.heads_kv;
  const int k = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, n = bh / p.heads_kv, hk = bh % p.heads_kv;
  if (k >= nk) return;
  const float* kb = kbar.row(bh, k, nk, D);
  for (int h = hk * G; h < (hk + 1) * G; ++h) {
    const float* qb = qbar + (static_cast<int64_t>(n) * p.heads_q + h) * nq * D;
    float* out = logits + (static_cast<int64_t>(n) * p.heads_q + h) * nq * nk + k;
    for (int i = 0; i < nq; ++i) {
      float s = 0.f;
      for (int d = lane; d < D; d += 32) s += qb[i * D + d] * kb[d];
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) out[static_cast<int64_t>(i) * nk] = scale * s;
    }
  }
}

// Decode without the learned gate (few query blocks): q̄ and the logits in one launch. A key
// block's k̄ row is shared by L = D / 32 lanes, each holding 8 of its float4 columns (column
// b·L + lane % L), so every lane issues its 8 loads at once and the whole CTA's rows are in
// flight together: one round trip to memory, which is what this step costs at decode. The CTA
// first pools q̄ of its KV group's G heads into shared memory (rows added in order, then scaled;
// with a chained launch this overlaps the previous kernel). Each lane accumulates its columns
// for the G · NQ query rows, and L-lane shuffles finish the sums. Every decode call takes this
// kernel, so its logits agree between calls (with or without caller-kept statistics); they may
// differ in the last bits from logits_rows_kernel's.
constexpr int kDecodeLogitsWarps = 4;
constexpr int kDecodeLogitsCols = 8;  // float4 columns of a k̄ row per lane
constexpr int kDecodeLogitsRows = 8;  // G · NQ query rows at most (register accumulators)

// One lane's part of q̄ · k̄ for a k̄ row shared by L lanes: its kDecodeLogitsCols float4 columns
// b·L + part of the row (already loaded into kv) against the same columns of q̄ (shared memory).
__device__ __forceinline__ float lane_dot(const float* qbar_row,
                                          const float4 (&kv)[kDecodeLogitsCols], int L,
                                          int part) {
  const float4* qb = reinterpret_cast<const float4*>(qbar_row);
  float acc = 0.f;
#pragma unroll
  for (int b = 0; b < kDecodeLogitsCols; ++b) {
    const float4 a = qb[b * L + part];
    acc = fmaf(a.x, kv[b].x, acc);
    acc = fmaf(a.y, kv[b].y, acc);
    acc = fmaf(a.z, kv[b].z, acc);
    acc = fmaf(a.w, kv[b].w, acc);
  }
  return acc;
}

// q̄ of `heads` consecutive query heads from h_first, NQ query blocks each, into qs[hr · D + d]
// (hr = head · NQ + block), by the CTA's threads: each value's rows added in order from 0, then
// scaled. A thread takes kQbarBatch values at a time and runs the row loop outside them, so the
// loads of all its values issue together: one load round trip per row instead of one per
// (head, block) and row (BENCHMARKS.md optimization steps 36, 37: 2–3 µs of the 128K decode
// step on an H100).
constexpr int kQbarBatch = 4;

template <typename T>
__device__ void pool_query_means(const AsaParams& p, int n, int h_first, int heads, int nq,
                                 float* qs) {
  const int D = p.head_dim, total = heads * nq * D;
  const T* q = static_cast<const T*>(p.q) + n * p.q_stride_b;
  for (int base = threadIdx.x; base < total; base += kQbarBatch * blockDim.x) {
    const T* src[kQbarBatch];
    int len[kQbarBatch];
    float sum[kQbarBatch];
    int rows = 0;
#pragma unroll
    for (int b = 0; b < kQbarBatch; ++b) {
      const int v = base + b * blockDim.x, hr = v / D, d = v % D;
      const int h = h_first + hr / nq, r0 = (hr % nq) * p.block_size;
      len[b] = v < total ? min(p.block_size, p.seq_q - r0) : 0;
      src[b] = q + h * p.q_stride_h + r0 * p.q_stride_s + d;
      sum[b] = 0.f;
      rows = max(rows, len[b]);
    }
    for (int r = 0; r < rows; ++r) {
#pragma unroll
      for (int b = 0; b < kQbarBatch; ++b) {
        if (r < len[b]) sum[b] += to_float(src[b][r * p.q_stride_s]);
      }
    }
#pragma unroll
    for (int b = 0; b < kQbarBatch; ++b) {
      if (len[b] > 0) qs[base + b * blockDim.x] = sum[b] * (1.f / static_cast<float>(len[b]));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kDecodeLogitsWarps) logits_decode_kernel(
    AsaParams p, KeyRows kbar, float* logits) {
  extern __shared__ __align__(16) float qs[];  // [G · NQ][D]
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  const int G = p.heads_q / p.heads_kv, D = p.head_dim;
  const int L = D / (4 * kDecodeLogitsCols);  // lanes per key block
  const int per_cta = kDecodeLogitsWarps * 32 / L;
  const int bh = blockIdx.y, n = bh / p.heads_kv, hk = bh % p.heads_kv;
  const int k = blockIdx.x * per_cta + threadIdx.x / L, part = threadIdx.x % L;
  // q̄ first: q is the caller's input, which no kernel of the chain writes, so it is pooled
  // before the wait for the previous kernel (chained launch, common.cuh), which may write k̄.
  const int rows = G * nq;  // (head of the group, query block) pairs, hr = head · NQ + block
  pool_query_means<T>(p, n, hk * G, G, nq, qs);
  wait_for_previous_kernel();
  allow_next_kernel();
  float4 kv[kDecodeLogitsCols];
  const float4* kb = k < nk ? reinterpret_cast<const float4*>(kbar.row(bh, k, nk, D)) : nullptr;
#pragma unroll
  for (int b = 0; b < kDecodeLogitsCols; ++b) {
    kv[b] = kb != nullptr ? kb[b * L + part] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();
  float acc[kDecodeLogitsRows];
#pragma unroll
  for (int hr = 0; hr < kDecodeLogitsRows; ++hr) {
    acc[hr] = 0.f;
    if (hr >= rows) continue;
    acc[hr] = lane_dot(qs + hr * D, kv, L, part);
  }
#pragma unroll
  for (int hr = 0; hr < kDecodeLogitsRows; ++hr) {
    if (hr >= rows) continue;
    for (int o = 1; o < L; o <<= 1) acc[hr] += __shfl_xor_sync(0xffffffffu, acc[hr], o);
    if (part == 0 && k < nk) {
      const int h = hk * G + hr / nq, i = hr % nq;
      logits[((static_cast<int64_t>(n) * p.heads_q + h) * nq + i) * nk + k] = p.scale * acc[hr];
    }
  }
}

// Whether logits_decode_kernel serves these params: decode (Sq ≤ kDecodeLogitsMaxSeqQ; its q̄
// pooling takes one memory round trip per query row, so a short prefill of 256 rows spent 25 µs
// there on an H100 against 7.5 µs for pool_q + logits_rows), at most kDecodeLogitsRows query
// rows per KV group, D = 32 · L with L lanes per key block dividing a warp, 16-byte k̄ rows (the
// caller's key_block_stats must be 16-byte aligned).
constexpr int kDecodeLogitsMaxSeqQ = 16;

bool decode_logits_fits(const AsaParams& p, int nq) {
  const int G = p.heads_q / p.heads_kv;
  const int lanes = p.head_dim / (4 * kDecodeLogitsCols);
  const bool aligned = p.key_block_stats == nullptr ||
                       (reinterpret_cast<uintptr_t>(p.key_block_stats) & 15) == 0;
  return p.seq_q <= kDecodeLogitsMaxSeqQ && G * nq <= kDecodeLogitsRows &&
         p.head_dim % (4 * kDecodeLogitsCols) == 0 && lanes >= 1 && 32 % lanes == 0 && aligned;
}

// Heads of one list whose softmax statistics share a CTA reduction in select_kernel. 4 = one
// pass for GQA groups of 4 (Llama-3-8B); 8 made the unrolled per-head code twice as long and
// the 128K decode select 2.2 µs slower on an H200 (BENCHMARKS.md optimization step 29).
constexpr int kHeadsPerPass = 4;

// CTA-wide max (kMax) or sum of each of the kHeadsPerPass values, returned in every thread.
template <bool kMax>
__device__ void reduce_heads(float (&v)[kHeadsPerPass],
                             float (*red)[kSelectThreads / 32]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kHeadsPerPass; ++j) {
    float x = v[j];
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = kMax ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) red[j][warp] = x;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kHeadsPerPass; ++j) {
    float x = red[j][0];
    for (int w = 1; w < kSelectThreads / 32; ++w) x = kMax ? fmaxf(x, red[j][w]) : x + red[j][w];
    v[j] = x;
  }
  __syncthreads();  // `red` is reused by the next reduction
}

// One CTA per (batch, selection head, query block): softmax of the logits row(s) over the visible
// blocks, the group average for select_per 1, then the contract's walk.
__global__ void select_kernel(AsaParams p, Workspace ws, const float* logits, int nk_pow2) {
  // Without a padding mask the flags below are arithmetic on the params, done before the wait
  // for the logits (chained launch, common.cuh); the mask's kept-key prefix comes from the chain.
  ASA_SELECT_PHASE(0);
  if (p.mask_dtype != ASA_MASK_NONE) wait_for_previous_kernel();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int i = blockIdx.x, hs = blockIdx.y, n = blockIdx.z;
  const int nq = gridDim.x;
  const int nk = cdiv(p.seq_kv, p.block_size);
  const int G = p.heads_q / p.heads_kv;
  const int heads = p.select_per ? G : 1;       // query heads behind this list
  const int h_first = p.select_per ? hs * G : hs;
  SelectSmem sm;
  sm.keys = reinterpret_cast<uint64_t*>(smem_raw);
  sm.prob = reinterpret_cast<float*>(sm.keys + nk_pow2);
  sm.pavg = sm.prob + nk;
  sm.flags = reinterpret_cast<uint8_t*>(sm.pavg + nk);

  // Visibility and forced flags of every key block for this query block.
  int lo, hi, c;
  query_block_keys(p, i, nk, &lo, &hi, &c);
  int nvis_local = 0;
  for (int k = threadIdx.x; k < nk; k += kSelectThreads) {
    const bool vis = key_block_visible(p, ws.kept_prefix, n, k, lo, hi);
    const bool forced = block_forced(p, k, c);
    sm.flags[k] = (vis ? kVisible : 0) | (forced ? kForced : 0);
    sm.pavg[k] = 0.f;
    nvis_local += vis;
  }
  const float nvis = block_sum(static_cast<float>(nvis_local));
  ASA_SELECT_PHASE(1);
  wait_for_previous_kernel();
  allow_next_kernel();
  if (hs == 0 && threadIdx.x == 0 && ws.visible_counts) {
    ws.visible_counts[static_cast<int64_t>(n) * nq + i] = static_cast<int32_t>(nvis);
  }

  // Softmax of each head's row over the visible blocks; for select_per 1 the group's heads are
  // added in order h = 0..G-1 and divided by G, as the reference does. The maxima and sums of up
  // to kHeadsPerPass heads come from one CTA reduction each (a reduction per head and step cost
  // ~2 µs per head of a decode step on an H200).
  __shared__ float red[kHeadsPerPass][kSelectThreads / 32];
  const float* head_rows = logits + ((static_cast<int64_t>(n) * p.heads_q + h_first) * nq + i) * nk;
  const int64_t head_stride = static_cast<int64_t>(nq) * nk;
  float tau = 0.f;
  for (int h0 = 0; h0 < heads; h0 += kHeadsPerPass) {
    const int hn = min(kHeadsPerPass, heads - h0);
    const float* rows = head_rows + h0 * head_stride;
    float mx[kHeadsPerPass], sum[kHeadsPerPass];
#pragma unroll
    for (int j = 0; j < kHeadsPerPass; ++j) mx[j] = -INFINITY, sum[j] = 0.f;
    // The loads do not wait for the visibility flag, so one loop step has all its loads in
    // flight at once (the first pass is bound by their latency).
#pragma unroll 2
    for (int k = threadIdx.x; k < nk; k += kSelectThreads) {
      const bool vis = sm.flags[k] & kVisible;
#pragma unroll
      for (int j = 0; j < kHeadsPerPass; ++j) {
        const float x = j < hn ? rows[j * head_stride + k] : -INFINITY;
        if (vis) mx[j] = fmaxf(mx[j], x);
      }
    }
    reduce_heads<true>(mx, red);
#pragma unroll 2
    for (int k = threadIdx.x; k < nk; k += kSelectThreads) {
      const bool vis = sm.flags[k] & kVisible;
#pragma unroll
      for (int j = 0; j < kHeadsPerPass; ++j) {
        const float x = j < hn ? rows[j * head_stride + k] : 0.f;
        if (vis && j < hn) sum[j] += expf(x - mx[j]);
      }
    }
    reduce_heads<false>(sum, red);
    for (int k = threadIdx.x; k < nk; k += kSelectThreads) {
      const bool vis = sm.flags[k] & kVisible;
      float acc = sm.pavg[k];
#pragma unroll
      for (int j = 0; j < kHeadsPerPass; ++j) {
        if (j >= hn) continue;
        const float pk = vis ? expf(rows[j * head_stride + k] - mx[j]) / sum[j] : 0.f;
        if (heads == 1) sm.prob[k] = pk;
        acc += pk;
      }
      sm.pavg[k] = acc;
    }
    for (int j = 0; j < hn; ++j) {
      const int h = h_first + h0 + j;
      tau = fmaxf(tau, p.head_thresholds ? p.head_thresholds[h] : p.threshold);
    }
  }
  ASA_SELECT_PHASE(2);
  const float* prob = sm.prob;
  if (heads > 1) {
    for (int k = threadIdx.x; k < nk; k += kSelectThreads) sm.pavg[k] /= static_cast<float>(G);
    prob = sm.pavg;
  }
  __syncthreads();
  const int64_t row = (static_cast<int64_t>(n) * gridDim.y + hs) * nq + i;
  select_and_write(p, ws, sm, prob, tau, nk, nk_pow2, row, c);
}

// The same selection with one warp per list (key blocks <= kWarpListMax): no CTA barriers, eight
// lists in flight per CTA. The serial parts (forced sum, walk) are latency-bound, so more lists in
// flight per multiprocessor is what pays.
constexpr int kWarpListMax = 512;
constexpr int kListsPerCta = 8;


// Writes the key blocks k < nk with keep(k) to out ascending, then -1 up to out[nk - 1], by the
// calling warp's 32 lanes (compaction with ballots); returns the count in every lane.
template <typename Keep>
__device__ int write_list_warp(int32_t* out, int nk, int lane, Keep keep) {
  int total = 0;
  for (int k0 = 0; k0 < nk; k0 += 32) {
    const int k = k0 + lane;
    const bool kept = k < nk && keep(k);
    const unsigned ballot = __ballot_sync(0xffffffffu, kept);
    if (kept) out[total + __popc(ballot & ((1u << lane) - 1))] = k;
    total += __popc(ballot);
  }
  for (int t = total + lane; t < nk; t += 32) out[t] = -1;
  return total;
}

__global__ void __launch_bounds__(32 * kListsPerCta) select_warp_kernel(
    AsaParams p, Workspace ws, const float* logits, int nk_pow2, int num_lists) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int list = blockIdx.x * kListsPerCta + warp;
  if (list >= num_lists) return;
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  const int hsel_count = p.select_per ? p.heads_kv : p.heads_q;
  const int i = list % nq, hs = (list / nq) % hsel_count, n = list / (nq * hsel_count);
  const int G = p.heads_q / p.heads_kv;
  const int heads = p.select_per ? G : 1;
  const int h_first = p.select_per ? hs * G : hs;
  // Per-warp slice: keys [nk_pow2] u64, prob [nk], pavg [nk], flags [nk].
  const size_t slice = static_cast<size_t>(nk_pow2) * 8 + static_cast<size_t>(nk) * 9 + 16;
  unsigned char* base = smem_raw + warp * ((slice + 15) / 16 * 16);
  uint64_t* keys = reinterpret_cast<uint64_t*>(base);
  float* prob = reinterpret_cast<float*>(keys + nk_pow2);
  float* pavg = prob + nk;
  uint8_t* flags = reinterpret_cast<uint8_t*>(pavg + nk);

  int lo, hi, c;
  query_block_keys(p, i, nk, &lo, &hi, &c);
  int nvis = 0;
  for (int k = lane; k < nk; k += 32) {
    const bool vis = key_block_visible(p, ws.kept_prefix, n, k, lo, hi);
    const bool forced = block_forced(p, k, c);
    flags[k] = (vis ? kVisible : 0) | (forced ? kForced : 0);
    pavg[k] = 0.f;
    nvis += vis;
  }
  nvis = __reduce_add_sync(0xffffffffu, nvis);
  if (hs == 0 && lane == 0 && ws.visible_counts) {
    ws.visible_counts[static_cast<int64_t>(n) * nq + i] = nvis;
  }
  __syncwarp();

  float tau = 0.f;
  for (int hh = 0; hh < heads; ++hh) {
    const int h = h_first + hh;
    const float* row = logits + ((static_cast<int64_t>(n) * p.heads_q + h) * nq + i) * nk;
    float mx = -INFINITY;
    for (int k = lane; k < nk; k += 32) {
      const float x = row[k];
      prob[k] = x;
      if (flags[k] & kVisible) mx = fmaxf(mx, x);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int k = lane; k < nk; k += 32) {
      if (flags[k] & kVisible) sum += expf(prob[k] - mx);
    }
    sum = warp_sum(sum);
    for (int k = lane; k < nk; k += 32) {
      const float pk = (flags[k] & kVisible) ? expf(prob[k] - mx) / sum : 0.f;
      prob[k] = pk;
      pavg[k] += pk;  // heads added in order h = 0..G-1
    }
    tau = fmaxf(tau, p.head_thresholds ? p.head_thresholds[h] : p.threshold);
  }
  const float* pr = prob;
  if (heads > 1) {
    for (int k = lane; k < nk; k += 32) pavg[k] /= static_cast<float>(G);
    pr = pavg;
  }
  __syncwarp();

  for (int k = lane; k < nk; k += 32) {
    const uint8_t f = flags[k] & (kVisible | kForced);
    const bool keep = (f & kVisible) && (tau >= 1.f || (f & kForced));
    flags[k] = f | (keep ? kKept : 0);
  }
  __syncwarp();
  if (tau < 1.f) {
    for (int t = lane; t < nk_pow2; t += 32) {
      uint64_t key = ~0ull;
      if (t < nk && flags[t] == kVisible) {
        key = (static_cast<uint64_t>(~__float_as_uint(pr[t])) << 32) | static_cast<uint32_t>(t);
      }
      keys[t] = key;
    }
    __syncwarp();
    bitonic_sort<Sorter::kWarp>(keys, nk_pow2);
    const float acc = lane == 0 ? forced_sum(p, flags, pr, nk, c) : 0.f;
    walk_sorted_warp(keys, nk, __shfl_sync(0xffffffffu, acc, 0), tau, flags);
  }
  const int64_t lrow = (static_cast<int64_t>(n) * hsel_count + hs) * nq + i;
  const int total = write_list_warp(ws.block_indices + lrow * nk, nk, lane,
                                    [&](int k) { return (flags[k] & kKept) != 0; });
  if (lane == 0) ws.block_counts[lrow] = total;
}

// Decode router in one launch, one thread-block cluster per list (compute capability 9.0+).
//
// Decode has one query block and few lists (B · Hkv for select_per 1), so the separate pool,
// logits and select kernels kept most multiprocessors idle and put a kernel boundary between
// each step: one select CTA sorting 1024 key blocks took ~12 µs of a 52 µs step on an H100
// (BENCHMARKS.md optimization step 35). Here the C CTAs of a cluster split the list's key blocks
// (CTA r owns blocks [r·per, r·per + per)) and exchange what the whole list needs through
// distributed shared memory, in four cluster barriers:
//   1. q̄ of the list's heads and the k̄ of the fresh key blocks (the last, partial block of a
//      decode step, by pool_key_block as pool_k_kernel computes it, so the bits agree with the
//      caller's key_block_stats), both before the chained-launch wait (the caller's cached k̄
//      rows are loaded first of all); then the logits of the own blocks (the arithmetic of
//      logits_decode_kernel); each head's (maximum, sum of exponentials) over the own visible
//      blocks goes to every CTA, which combines the pairs in rank order (the same bits in all);
//   2. the probabilities of the own blocks (averaged over the group's heads as select_kernel
//      does), written into every CTA;
//   3. ranks instead of a sort: a candidate's rank is the number of candidates before it in the
//      contract's order (descending probability, ties to the lower index), counted over 32-bit
//      values; each CTA ranks its own candidates against all and writes their values, in rank
//      order, into every CTA;
//   4. every CTA walks the sorted values with select_kernel's float32 chain (the same stop in
//      all), keeps its own blocks of rank below the stop, and the CTAs' kept counts give each its
//      offset in the ascending list.
// Opt-in (ASA_CUDA_FUSED_ROUTE=1; the tests compare both paths): it made the one-call decode
// step slower on an H100, 53 -> 62 µs at 128K / density 0.1 (BENCHMARKS.md optimization step
// 36); step 37 (b) timed its phases: the ranking 7.5 µs of ~24, the rest ~1–3 µs of latency per
// barrier-separated step. Step 51 (32-bit ranks, one exchange fewer, early k̄ loads) has not
// run on a GPU yet. With kAttend the same kernel is the whole fused decode step
// (fused_decode.cuh, opt-in ASA_CUDA_FUSED_DECODE=1, step 52; not yet run on a GPU either).
constexpr int kRouteThreads = kPoolThreads;  // pool_key_block's thread count (the same bits)
constexpr int kRouteClusterMax = 16;         // a non-portable cluster size on Hopper
constexpr int kRouteMaxBlocks = 2048;        // ranking costs NK² / C comparisons per CTA
constexpr int kRouteFoldMax = 2;             // fresh key blocks pooled inside the kernel
constexpr int kRouteHeadsMax = kDecodeLogitsRows;
static_assert(kRouteThreads == kSelectThreads, "one CTA shape for the router's reductions");
static_assert(kRouteThreads == step::kThreads && kRouteHeadsMax == step::kHeadsMax &&
                  kRouteClusterMax == step::kClusterMax,
              "fused_decode.cuh runs inside route_decode_kernel");

// Dynamic shared memory of route_decode_kernel, in the order the kernel carves it.
__host__ __device__ inline int route_rank_slots(int nk) { return (nk + 31) / 32 * 32; }
__host__ __device__ inline size_t route_decode_smem(int heads, int D, int per, int nk) {
  return static_cast<size_t>(heads + kRouteFoldMax) * D * 4  // q̄ rows, fresh k̄ rows
         + static_cast<size_t>(route_rank_slots(nk)) * 4      // rank values
         + static_cast<size_t>(heads + 2) * per * 4           // logits, own P, own ranks
         + static_cast<size_t>(nk) * 9;                       // every P, sorted keys, flags
}
// route_decode_kernel<T, true> (the fused decode step) puts its state after the router's region
// and its K/V slots after that. The step's merge reuses the router's region after the q̄ rows
// (which the attention still reads), so the region is at least that large.
__host__ __device__ inline size_t fused_state_offset(const step::StepSizes& z) {
  const size_t router = route_decode_smem(z.heads, z.D, z.per, z.nk);
  const size_t merge = static_cast<size_t>(z.heads) * z.D * 4 + z.merge_bytes();
  return step::align_up(router > merge ? router : merge, 128);
}
__host__ __device__ inline size_t fused_decode_smem(const step::StepSizes& z) {
  return fused_state_offset(z) + z.state_bytes() + z.nslots * z.slot_bytes();
}

// kAttend: the fused decode step (fused_decode.cuh) — the same router, then the attention of
// the kept blocks and the cluster merge into p.out; one CTA per multiprocessor (its K/V slots
// fill shared memory). `z` sizes its shared memory (unused without kAttend).
template <typename T, bool kAttend = false>
__global__ void __launch_bounds__(kRouteThreads, kAttend ? 1 : 2)
    route_decode_kernel(AsaParams p, Workspace ws, KeyRows kbar, int fold, step::StepSizes z) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // Every CTA of the cluster must have started before one writes into another's shared memory:
  // arrive now, wait just before the first remote write.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  ASA_ROUTE_PHASE(0);
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int list = blockIdx.x / C;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int nk = cdiv(p.seq_kv, p.block_size);
  const int G = p.heads_q / p.heads_kv, D = p.head_dim;
  const int hsel_count = p.select_per ? p.heads_kv : p.heads_q;
  const int hs = list % hsel_count, n = list / hsel_count;
  const int heads = p.select_per ? G : 1;
  const int h_first = p.select_per ? hs * G : hs;
  const int64_t bh = static_cast<int64_t>(n) * p.heads_kv + h_first / G;
  const int per = cdiv(nk, C);
  const int k_begin = min(rank * per, nk), cnt = min(k_begin + per, nk) - k_begin;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qs = reinterpret_cast<float*>(smem_raw);                         // [heads][D]
  float* fresh = qs + heads * D;                                          // [kRouteFoldMax][D]
  const int slots = route_rank_slots(nk);
  uint32_t* vals = reinterpret_cast<uint32_t*>(fresh + kRouteFoldMax * D);  // [slots]
  float* lg = reinterpret_cast<float*>(vals + slots);                     // [heads][per]
  float* pv_own = lg + heads * per;                                       // [per]
  int* rank_own = reinterpret_cast<int*>(pv_own + per);                   // [per]
  float* pv_all = reinterpret_cast<float*>(rank_own + per);               // [nk]
  uint32_t* sorted = reinterpret_cast<uint32_t*>(pv_all + nk);            // [nk]
  uint8_t* flags = reinterpret_cast<uint8_t*>(sorted + nk);               // [nk]
  __shared__ float2 part_stats[kRouteHeadsMax][kRouteClusterMax];  // (max, sum of exp) per CTA
  __shared__ int part_kept[kRouteClusterMax];
  __shared__ int part_spec[kRouteClusterMax];  // kAttend: kept blocks each CTA had speculated
  __shared__ float head_max[kRouteHeadsMax], head_sum[kRouteHeadsMax];
  __shared__ int rank_part[kRouteThreads / 32][64];
  __shared__ int scratch[kRouteThreads / 32];
  __shared__ WalkCut cut;
  auto cta_sum = [&](int v) {  // over the CTA's threads, returned in every thread
    v = __reduce_add_sync(0xffffffffu, v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int s = 0;
    for (int w = 0; w < kRouteThreads / 32; ++w) s += scratch[w];
    __syncthreads();
    return s;
  };
  unsigned char* state_base = smem_raw + fused_state_offset(z);
  [[maybe_unused]] const step::StepState st(state_base, state_base + z.state_bytes(), z);
  if constexpr (kAttend) step::step_init(st, heads);

  // The first pass of the logits loop below reads L lanes per k̄ row, 8 float4 columns each
  // (logits_decode_kernel's layout). Its rows from the caller's key_block_stats are loaded now,
  // so that their latency overlaps the flags and q̄: without the learned gate (never routed
  // here) no kernel of the chain writes that buffer, so like q and k it may be read before the
  // wait (common.cuh). Fresh rows are pooled here or read after the wait.
  const int L = D / (4 * kDecodeLogitsCols);
  const int part = tid % L;
  float4 kv_first[kDecodeLogitsCols];
  const bool first_cached = tid / L < cnt && k_begin + tid / L < kbar.cached_blocks;
  {
    const float* row = first_cached ? kbar.row(bh, k_begin + tid / L, nk, D) : nullptr;
#pragma unroll
    for (int b = 0; b < kDecodeLogitsCols; ++b) {
      kv_first[b] = row != nullptr ? reinterpret_cast<const float4*>(row)[b * L + part]
                                   : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  // Flags of every key block (each CTA keeps the whole list's): arithmetic on the params, so
  // before the wait unless a padding mask makes them read the chain's kept-key prefix.
  if (p.mask_dtype != ASA_MASK_NONE) wait_for_previous_kernel();
  int lo, hi, c;
  query_block_keys(p, 0, nk, &lo, &hi, &c);
  int nvis = 0, num_cand = 0;
  for (int k = tid; k < nk; k += kRouteThreads) {
    const bool vis = key_block_visible(p, ws.kept_prefix, n, k, lo, hi);
    const uint8_t f = (vis ? kVisible : 0) | (block_forced(p, k, c) ? kForced : 0);
    flags[k] = f;
    nvis += vis;
    num_cand += f == kVisible;
  }
  nvis = cta_sum(nvis);
  num_cand = cta_sum(num_cand);
  ASA_ROUTE_PHASE(1);
  float tau = 0.f;
  for (int hr = 0; hr < heads; ++hr) {
    tau = fmaxf(tau, p.head_thresholds ? p.head_thresholds[h_first + hr] : p.threshold);
  }

  // q̄ (one query block) and the fresh blocks' k̄ read only the caller's q and k, which no kernel
  // of the chain writes (common.cuh).
  pool_query_means<T>(p, n, h_first, heads, 1, qs);
  const int first_fresh = kbar.cached_blocks;
  if (fold) {
    for (int k = max(first_fresh, k_begin); k < k_begin + cnt; ++k) {
      pool_key_block<T>(p, n, h_first / G, k, fresh + (k - first_fresh) * D);
      __syncthreads();  // pool_rows' partial sums are reused by the next block
    }
  }
  ASA_ROUTE_PHASE(2);
  wait_for_previous_kernel();
  allow_next_kernel();
  __syncthreads();

  // Logits of the own blocks (the first pass's cached rows are in kv_first already).
  for (int j0 = 0; j0 < cnt; j0 += kRouteThreads / L) {
    const int j = j0 + tid / L, k = k_begin + j;
    const bool loaded = j0 == 0 && first_cached;
    const float* row = nullptr;
    if (j < cnt && !loaded) {
      row = fold && k >= first_fresh ? fresh + (k - first_fresh) * D : kbar.row(bh, k, nk, D);
    }
    float4 kv[kDecodeLogitsCols];
#pragma unroll
    for (int b = 0; b < kDecodeLogitsCols; ++b) {
      kv[b] = loaded ? kv_first[b]
              : row != nullptr ? reinterpret_cast<const float4*>(row)[b * L + part]
                               : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int hr = 0; hr < kRouteHeadsMax; ++hr) {
      if (hr >= heads) continue;
      float acc = lane_dot(qs + hr * D, kv, L, part);
      for (int o = 1; o < L; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (part == 0 && j < cnt) lg[hr * per + j] = p.scale * acc;
    }
  }
  __syncthreads();
  // The fused step's K/V stream starts here, under the rest of the router (the last warp, which
  // has no head of the exchange below unless the group has 8).
  if constexpr (kAttend) {
    if (warp == kRouteThreads / 32 - 1) {
      step::speculate<T>(p, st, lg, flags, kVisible, kForced, heads, per, k_begin, cnt, n,
                         h_first / G);
    }
  }

  ASA_ROUTE_PHASE(3);
  // Softmax statistics in one exchange: warp hr takes head hr and sends the CTA's (max, sum of
  // exp(x - max)) over its visible blocks to every CTA (lane r to CTA r); every CTA combines the
  // pairs in rank order, rescaling each sum to the list's maximum, so all hold the same bits.
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  if (warp < heads) {
    float mx = -INFINITY;
    for (int j = lane; j < cnt; j += 32) {
      if (flags[k_begin + j] & kVisible) mx = fmaxf(mx, lg[warp * per + j]);
    }
    mx = warp_max(mx);
    float s = 0.f;
    if (mx != -INFINITY) {
      for (int j = lane; j < cnt; j += 32) {
        if (flags[k_begin + j] & kVisible) s += expf(lg[warp * per + j] - mx);
      }
    }
    s = warp_sum(s);
    if (lane < C) *cluster.map_shared_rank(&part_stats[warp][rank], lane) = make_float2(mx, s);
  }
  cluster.sync();
  ASA_ROUTE_PHASE(4);
  if (tid < heads) {
    float mx = -INFINITY;
    for (int r = 0; r < C; ++r) mx = fmaxf(mx, part_stats[tid][r].x);
    float s = 0.f;
    for (int r = 0; r < C; ++r) {
      const float2 ms = part_stats[tid][r];
      if (ms.x != -INFINITY) s += ms.y * expf(ms.x - mx);
    }
    head_max[tid] = mx;
    head_sum[tid] = s;
  }
  __syncthreads();
  ASA_ROUTE_PHASE(5);

  // P of the own blocks (heads added in order h = 0..G-1, then divided by G), into every CTA.
  for (int j = tid; j < cnt; j += kRouteThreads) {
    const bool vis = flags[k_begin + j] & kVisible;
    float acc = 0.f;
    for (int hr = 0; hr < heads; ++hr) {
      acc += vis ? expf(lg[hr * per + j] - head_max[hr]) / head_sum[hr] : 0.f;
    }
    pv_own[j] = heads > 1 ? acc / static_cast<float>(G) : acc;
  }
  __syncthreads();
  for (int idx = tid; idx < cnt * C; idx += kRouteThreads) {
    const int r = idx / cnt, j = idx % cnt;
    *cluster.map_shared_rank(&pv_all[k_begin + j], r) = pv_own[j];
  }
  cluster.sync();
  ASA_ROUTE_PHASE(6);

  int stop = num_cand;  // τ >= 1: every visible block is kept
  if (tau < 1.f) {
    // Rank values: ~bits(P) - 1 for candidates (visible, not forced; at most 0xFFFFFFFE, and
    // ascending in the walk's order: descending P), 0xFFFFFFFF for the rest and the padding
    // slots, which therefore never count. A candidate's rank is the number of candidates before
    // it: smaller values, and equal values at lower indices.
    for (int k = tid; k < slots; k += kRouteThreads) {
      vals[k] = k < nk && flags[k] == kVisible ? ~__float_as_uint(pv_all[k]) - 1u : ~0u;
    }
    __syncthreads();
    // Lane = two own blocks (j, j + 32); the 8 warps split the values they are counted against
    // (chunk: a multiple of 4, read 16 bytes at a time). Where a warp's chunk lies wholly before
    // or after the own blocks, the index order is known without comparing indices.
    const int chunk = slots / (kRouteThreads / 32);
    const int c0 = warp * chunk, c1 = c0 + chunk;
    for (int g0 = 0; g0 < cnt; g0 += 64) {
      const int j_a = g0 + lane, j_b = j_a + 32;
      const uint32_t v_a = j_a < cnt ? vals[k_begin + j_a] : ~0u;
      const uint32_t v_b = j_b < cnt ? vals[k_begin + j_b] : ~0u;
      if (__ballot_sync(0xffffffffu, v_a != ~0u || v_b != ~0u) == 0) continue;  // every warp
      int below_a = 0, below_b = 0;
      const uint4* src = reinterpret_cast<const uint4*>(vals + c0);
      const bool before = c1 <= k_begin + g0, after = c0 >= k_begin + min(g0 + 64, cnt);
      if (before || after) {
        // Before both own blocks ties count (w <= v, i.e. w < v + 1: a candidate's v is at most
        // 0xFFFFFFFE); after them they don't. A lane without a candidate counts nothing used.
        const uint32_t bound_a = v_a + (before ? 1u : 0u), bound_b = v_b + (before ? 1u : 0u);
#pragma unroll 4
        for (int t = 0; t < chunk / 4; ++t) {
          const uint4 w = src[t];
          below_a += (w.x < bound_a) + (w.y < bound_a) + (w.z < bound_a) + (w.w < bound_a);
          below_b += (w.x < bound_b) + (w.y < bound_b) + (w.z < bound_b) + (w.w < bound_b);
        }
      } else {
        const int k_a = k_begin + j_a, k_b = k_begin + j_b;
        for (int k = c0; k < c1; ++k) {
          const uint32_t v = vals[k];
          below_a += v < v_a || (v == v_a && k < k_a);
          below_b += v < v_b || (v == v_b && k < k_b);
        }
      }
      rank_part[warp][lane] = below_a;
      rank_part[warp][lane + 32] = below_b;
      __syncthreads();
      if (warp < 2) {
        const int j = g0 + tid;
        int r = 0;
        for (int w = 0; w < kRouteThreads / 32; ++w) r += rank_part[w][tid];
        if (j < cnt) rank_own[j] = r;
      }
      __syncthreads();
    }
    for (int idx = tid; idx < cnt * C; idx += kRouteThreads) {
      const int r = idx / cnt, j = idx % cnt;
      const uint32_t v = vals[k_begin + j];
      if (v != ~0u) *cluster.map_shared_rank(&sorted[rank_own[j]], r) = v + 1u;
    }
    cluster.sync();
    ASA_ROUTE_PHASE(7);
    // The walk, in every CTA: forced blocks first in ascending index order (the sink blocks,
    // then the local band), then the candidates in rank order.
    if (warp == 0) {
      const float acc = lane == 0 ? forced_sum(p, flags, pv_all, nk, c) : 0.f;
      walk_sorted_values_warp(sorted, num_cand, __shfl_sync(0xffffffffu, acc, 0), tau, &cut);
    }
    __syncthreads();
    stop = cut.kept;
    ASA_ROUTE_PHASE(8);
  }

  // Kept own blocks; their count goes to every CTA for the list offsets. The fused step also
  // sends every CTA its kept bits (which of them it speculated) and the speculated kept count.
  int kept = 0, spec_kept = 0;
  for (int j = tid; j < cnt; j += kRouteThreads) {
    const uint8_t f = flags[k_begin + j];
    const bool keep = (f & kVisible) &&
                      (tau >= 1.f || (f & kForced) || (f == kVisible && rank_own[j] < stop));
    flags[k_begin + j] = f | (keep ? kKept : 0);
    kept += keep;
    if constexpr (kAttend) {
      const bool spec = keep && step::speculated(st, k_begin + j);
      st.kept[k_begin + j] = keep ? (step::kKeptBit | (spec ? step::kSpecKeptBit : 0)) : 0;
      spec_kept += spec;
    }
  }
  kept = cta_sum(kept);
  if constexpr (kAttend) {
    spec_kept = cta_sum(spec_kept);  // its barriers also order the st.kept writes before these
    for (int idx = tid; idx < cnt * C; idx += kRouteThreads) {
      const int r = idx / cnt, j = idx % cnt;
      if (r != rank) *cluster.map_shared_rank(&st.kept[k_begin + j], r) = st.kept[k_begin + j];
    }
    if (tid < C) *cluster.map_shared_rank(&part_spec[rank], tid) = spec_kept;
  }
  if (tid < C) *cluster.map_shared_rank(&part_kept[rank], tid) = kept;
  cluster.sync();  // the router's last access to another CTA's shared memory is before this
  ASA_ROUTE_PHASE(9);
  int offset = 0, total = 0;
  for (int r = 0; r < C; ++r) {
    offset += r < rank ? part_kept[r] : 0;
    total += part_kept[r];
  }
  int32_t* out = ws.block_indices + static_cast<int64_t>(list) * nk;
  for (int j0 = 0; j0 < cnt; j0 += kRouteThreads) {
    const int j = j0 + tid;
    const bool keep = j < cnt && (flags[k_begin + j] & kKept);
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) scratch[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, chunk_total = 0;
    for (int w = 0; w < kRouteThreads / 32; ++w) {
      before += w < warp ? scratch[w] : 0;
      chunk_total += scratch[w];
    }
    if (keep) out[offset + before + __popc(ballot & ((1u << lane) - 1))] = k_begin + j;
    offset += chunk_total;
    __syncthreads();
  }
  for (int t = max(total, k_begin) + tid; t < k_begin + cnt; t += kRouteThreads) out[t] = -1;
  if (rank == 0 && tid == 0) {
    ws.block_counts[list] = total;
    if (hs == 0 && ws.visible_counts) ws.visible_counts[n] = nvis;
  }
  ASA_ROUTE_PHASE(10);
  if constexpr (kAttend) {
    const int items = step::plan_items<T>(p, st, part_spec, C, rank, total, nk, n, h_first / G);
    // This CTA no longer reads its router region past the q̄ rows, where the merge lands: other
    // CTAs may write there once every CTA has arrived (merge_heads waits).
    asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
    ASA_ROUTE_PHASE(11);
    float2 acc[step::kPvHeads];
    step::attend_items<T>(p, st, qs, items, heads, n, h_first / G, acc);
    ASA_ROUTE_PHASE(12);
    step::merge_heads<T>(p, st, qs + heads * D, acc, heads, C, rank, n, h_first);
    ASA_ROUTE_PHASE(13);
  }
#endif
}

// Dense lists (τ ≥ 1, no head_thresholds: SPEC.md "Selection" keeps every visible block): one
// warp per (batch, selection head, query block) writes its visible key blocks ascending, padded
// with -1, the count and the visible count; no pooling, logits, softmax or walk. The lists equal
// select_warp_kernel's / select_kernel's at τ ≥ 1 bit for bit (same visibility function), and
// are the same for every selection head.
__global__ void __launch_bounds__(32 * kListsPerCta) dense_lists_kernel(AsaParams p, Workspace ws,
                                                                        int num_lists) {
  const int lane = threadIdx.x % 32;
  const int list = blockIdx.x * kListsPerCta + threadIdx.x / 32;
  if (list >= num_lists) return;
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  const int hsel_count = p.select_per ? p.heads_kv : p.heads_q;
  const int i = list % nq, hs = (list / nq) % hsel_count, n = list / (nq * hsel_count);
  int lo, hi, c;
  query_block_keys(p, i, nk, &lo, &hi, &c);
  const int total =
      write_list_warp(ws.block_indices + static_cast<int64_t>(list) * nk, nk, lane,
                      [&](int k) { return key_block_visible(p, ws.kept_prefix, n, k, lo, hi); });
  if (lane == 0) {
    ws.block_counts[list] = total;
    if (hs == 0 && ws.visible_counts) ws.visible_counts[static_cast<int64_t>(n) * nq + i] = total;
  }
}

// Whether the router can write dense lists without routing: τ ≥ 1 from the attribute (per-head
// thresholds go through the full router). ASA_CUDA_DENSE_FASTPATH=0 in the environment forces the
// full router (read at each launch; the tests compare both).
bool dense_fastpath(const AsaParams& p) {
  const char* env = getenv("ASA_CUDA_DENSE_FASTPATH");
  if (env != nullptr && env[0] == '0') return false;
  return p.head_thresholds == nullptr && p.threshold >= 1.f;
}

// Launch configuration of route_decode_kernel: `ctas` CTAs in clusters of C with `smem` bytes of
// dynamic shared memory, chained (programmatic dependent launch) when `chained`. cfg.attrs
// points into the object, so it is built in place and never copied.
struct RouteLaunch {
  cudaLaunchAttribute attrs[2] = {};
  cudaLaunchConfig_t cfg = {};
  RouteLaunch(int C, int ctas, size_t smem, cudaStream_t stream, bool chained) {
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = C;
    attrs[0].val.clusterDim.y = 1;
    attrs[0].val.clusterDim.z = 1;
    attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(ctas);
    cfg.blockDim = dim3(kRouteThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attrs;
    cfg.numAttrs = chained ? 2 : 1;
  }
  RouteLaunch(const RouteLaunch&) = delete;
  RouteLaunch& operator=(const RouteLaunch&) = delete;
};

// Whether the code this device runs for `kernel` was compiled for compute capability 9.0+ (its
// attributes into *attr): the cluster kernels' bodies are empty otherwise (a device of a later
// major version without its own code in the library runs the sm_80 PTX, JIT-compiled).
bool has_cluster_code(const void* kernel, cudaFuncAttributes* attr) {
  if (cudaFuncGetAttributes(attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr->ptxVersion >= 90;
}

// The largest cluster route_decode_kernel can co-schedule on this device (16, 8, 4 or 2 CTAs;
// with its largest shared memory), 0 below compute capability 9.0 or when none fits. Cached.
int max_route_cluster() {
  static int best = -1;
  if (best >= 0) return best;
  best = 0;
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (major < 9) return best;
  auto kernel = route_decode_kernel<__nv_bfloat16>;
  cudaFuncAttributes attr{};
  if (!has_cluster_code(reinterpret_cast<const void*>(kernel), &attr)) return best;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
      cudaSuccess) {
    cudaGetLastError();
    return best;
  }
  for (int C = kRouteClusterMax; C >= 2; C /= 2) {
    const size_t smem =
        route_decode_smem(kRouteHeadsMax, 256, cdiv(kRouteMaxBlocks, C), kRouteMaxBlocks);
    const RouteLaunch one(C, C, smem, nullptr, false);  // one cluster
    int clusters = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) == cudaSuccess &&
        cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.cfg) == cudaSuccess &&
        clusters > 0) {
      best = C;
      break;
    }
    cudaGetLastError();
  }
  return best;
}

// Cluster size for route_decode_kernel, or 0 when the separate kernels route. Opt-in with
// ASA_CUDA_FUSED_ROUTE=1 (read at each launch): measured slower than the separate kernels on an
// H100 (BENCHMARKS.md optimization steps 36, 37). It needs one query block, no learned gate, logits
// that fit logits_decode_kernel's layout (head dim <= 256), at most kRouteMaxBlocks key blocks,
// no more lists than multiprocessors and a device that co-schedules clusters; about two CTAs per
// multiprocessor in all.
int route_decode_cluster(const AsaParams& p, int nq, int lists) {
  const char* env = getenv("ASA_CUDA_FUSED_ROUTE");
  if (env == nullptr || env[0] != '1') return 0;
  const int nk = cdiv(p.seq_kv, p.block_size);
  if (nq != 1 || !decode_logits_fits(p, nq) || p.head_dim > 256 || nk > kRouteMaxBlocks ||
      lists > sm_count()) {
    return 0;
  }
  int C = max_route_cluster();
  while (C > 2 && (lists * C > 2 * sm_count() || C > nk)) C /= 2;
  return C;
}

// route_decode_kernel over `lists` clusters of C CTAs (with kAttend the fused decode step, sized
// by z). With more fresh key blocks than the kernel pools itself (a call without
// key_block_stats), pool_k_kernel writes them to the workspace first.
template <typename T, bool kAttend = false>
cudaError_t launch_route_decode(const AsaParams& p, const Workspace& ws, const KeyRows& ke, int C,
                                int lists, cudaStream_t stream, step::StepSizes z = {}) {
  const int nk = cdiv(p.seq_kv, p.block_size);
  const int fresh = nk - ke.cached_blocks;
  const bool fold = fresh <= kRouteFoldMax;
  if (!fold) {
    launch_chained(pool_k_kernel<T>, dim3(fresh, p.heads_kv, p.batch), kPoolThreads, 0, stream, p,
                   ws.kbar, ke.cached_blocks, nk);
  }
  const int heads = p.select_per ? p.heads_q / p.heads_kv : 1;
  const size_t smem =
      kAttend ? fused_decode_smem(z) : route_decode_smem(heads, p.head_dim, cdiv(nk, C), nk);
  auto kernel = route_decode_kernel<T, kAttend>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  if (err != cudaSuccess) return err;
  const RouteLaunch launch(C, lists * C, smem, stream, next_launch_chained());
  return cudaLaunchKernelEx(&launch.cfg, kernel, p, ws, ke, fold ? 1 : 0, z);
}

// The fused decode step (fused_decode.cuh): what the host asks the device once, per device.
struct FusedDecodeDevice {
  size_t smem_limit = 0;                   // dynamic shared memory a CTA may take; 0 = not asked
  int clusters[kRouteClusterMax + 1] = {}; // co-resident clusters of C CTAs + 1; 0 = not asked
};
constexpr int kFusedDevicesCached = 16;

FusedDecodeDevice* fused_decode_device() {
  static FusedDecodeDevice devices[kFusedDevicesCached];
  int device = 0;
  cudaGetDevice(&device);
  return device >= 0 && device < kFusedDevicesCached ? &devices[device] : nullptr;
}

// Shared memory a CTA of route_decode_kernel<T, true> may take dynamically: the device's opt-in
// limit less the kernel's static shared memory (that limit bounds static + dynamic; the 1 KB
// the device reserves per CTA is outside it). 0 when the device runs no cluster code for it.
// At 128K keys, D = 128, block 128, G = 4 three 64 KB slots fit with about 1 KB to spare.
size_t fused_decode_smem_limit() {
  FusedDecodeDevice* cache = fused_decode_device();
  if (cache != nullptr && cache->smem_limit > 0) return cache->smem_limit;
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  auto kernel = route_decode_kernel<__nv_bfloat16, true>;
  cudaFuncAttributes attr{};
  if (!has_cluster_code(reinterpret_cast<const void*>(kernel), &attr)) return 0;
  const size_t fixed = attr.sharedSizeBytes;
  const size_t limit = static_cast<size_t>(optin) > fixed ? optin - fixed : 0;
  if (cache != nullptr) cache->smem_limit = limit;
  return limit;
}

// The step's sizes with clusters of C: as many K/V slots (up to step::kSlotsMax) as fit beside
// the router's region and the step's state; nslots = 0 when none fits.
step::StepSizes fused_decode_sizes(const AsaParams& p, int C) {
  step::StepSizes z{};
  z.heads = p.select_per ? p.heads_q / p.heads_kv : 1;
  z.D = p.head_dim;
  z.Dv = p.head_dim_v;
  z.block = p.block_size;
  z.nk = cdiv(p.seq_kv, p.block_size);
  z.per = cdiv(z.nk, C);
  z.C = C;
  z.elem = 2;
  z.nslots = 0;
  const size_t avail = fused_decode_smem_limit(), fixed = fused_decode_smem(z);
  if (avail > fixed) {
    const size_t fit = (avail - fixed) / z.slot_bytes();
    z.nslots = static_cast<int>(std::min<size_t>(step::kSlotsMax, fit));
  }
  return z;
}

// Clusters of C CTAs of the step the device co-schedules, each CTA with the largest shared memory
// (one per multiprocessor), so any launch of the step with C co-schedules at least as many.
// Cached per device and C (a failed query is not cached: it answers 0 this time).
int fused_decode_clusters(int C) {
  FusedDecodeDevice* cache = fused_decode_device();
  if (cache != nullptr && cache->clusters[C] > 0) return cache->clusters[C] - 1;
  auto kernel = route_decode_kernel<__nv_bfloat16, true>;
  const size_t smem = fused_decode_smem_limit();
  if (smem == 0) return 0;
  int clusters = 0;
  const RouteLaunch one(C, C, smem, nullptr, false);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
          cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.cfg) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (cache != nullptr) cache->clusters[C] = clusters + 1;
  return clusters;
}

// Whether the params are in the fused step's scope (fused_decode.cuh): one query row, fp16 /
// bf16, D = Dv in {64, 128}, K/V rows contiguous and 16-byte aligned (whole-block bulk copies),
// no padding mask, bias, window, softcap or learned gate, the router's decode limits, and not the
// dense fast path (which needs no router).
bool fused_decode_fits(const AsaParams& p) {
  const bool half = p.dtype == ASA_FLOAT16 || p.dtype == ASA_BFLOAT16;
  const bool rows = p.k_stride_s == p.head_dim && p.v_stride_s == p.head_dim_v &&
                    p.k_stride_b % 8 == 0 && p.k_stride_h % 8 == 0 && p.v_stride_b % 8 == 0 &&
                    p.v_stride_h % 8 == 0 && (reinterpret_cast<uintptr_t>(p.k) & 15) == 0 &&
                    (reinterpret_cast<uintptr_t>(p.v) & 15) == 0;
  return half && rows && p.seq_q == 1 && p.gate_q_weight == nullptr &&
         (p.head_dim == 64 || p.head_dim == 128) && p.head_dim_v == p.head_dim &&
         p.mask_dtype == ASA_MASK_NONE && p.bias == nullptr && p.window < 0 &&
         p.softcap == 0.f && !dense_fastpath(p) && decode_logits_fits(p, 1) &&
         cdiv(p.seq_kv, p.block_size) <= kRouteMaxBlocks;
}

// Cluster size of the fused step for these params (and its sizes in *z), or 0 when it does not
// run them: opt-in with ASA_CUDA_FUSED_DECODE=1 (read at each call), in scope, at least two K/V
// slots, and every list's cluster co-resident: the largest such C in [2, 16], any size (the
// router splits the blocks over any C), since at one CTA per multiprocessor a GPC holds only one
// cluster of 16 or fewer (an H100 co-schedules 14 clusters of 16 at two CTAs per multiprocessor,
// BENCHMARKS.md step 37, so likely 6-7 at one) and every multiprocessor left out streams nothing.
int fused_decode_cluster(const AsaParams& p, step::StepSizes* z) {
  const char* env = getenv("ASA_CUDA_FUSED_DECODE");
  if (env == nullptr || env[0] != '1' || !fused_decode_fits(p) || max_route_cluster() == 0) {
    return 0;
  }
  const int nk = cdiv(p.seq_kv, p.block_size);
  const int lists = p.batch * (p.select_per ? p.heads_kv : p.heads_q);
  for (int C = kRouteClusterMax; C >= 2; --C) {
    if (C > nk) continue;
    *z = fused_decode_sizes(p, C);
    if (z->nslots >= 2 && fused_decode_clusters(C) >= lists) return C;
  }
  return 0;
}

// q̄ always; k̄ only for the training-free router (the gate pools its own key features), and
// only for the blocks from `first_key_block` on (those before come from key_block_stats).
template <typename T>
void launch_pool(const AsaParams& p, const Workspace& ws, bool queries, bool keys,
                 int first_key_block, cudaStream_t stream) {
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  if (queries) {
    launch_chained(pool_q_kernel<T>, dim3(nq, p.heads_q, p.batch), kPoolThreads, 0, stream, p,
                   ws.qbar);
  }
  if (keys && first_key_block < nk) {
    launch_chained(pool_k_kernel<T>, dim3(nk - first_key_block, p.heads_kv, p.batch),
                   kPoolThreads, 0, stream, p, ws.kbar, first_key_block, nk);
  }
}

template <typename T>
void launch_key_stats_t(const AsaParams& p, float* stats, int first, int cap, bool gate,
                        cudaStream_t stream) {
  const int nk = cdiv(p.seq_kv, p.block_size);
  if (first >= nk) return;
  if (gate) {
    launch_key_features(p, stats, first, cap, stream);
  } else {
    launch_chained(pool_k_kernel<T>, dim3(nk - first, p.heads_kv, p.batch), kPoolThreads, 0,
                   stream, p, stats, first, cap);
  }
}

// The learned gate's embeddings when the caller keeps key features (key_block_stats): only the
// blocks from key_block_stats_blocks on are pooled; the key projection reads the rest from the
// caller's rows. Without key_block_stats, gate.cu's launch_gate does the same from scratch.
cudaError_t launch_gate_with_stats(const AsaParams& p, const float* qbar, const GateScratch& g,
                                   cudaStream_t stream) {
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  const int first = p.key_block_stats_blocks;
  const int cap = p.key_block_stats_capacity > 0 ? p.key_block_stats_capacity : nk;
  const cudaError_t err = launch_key_block_stats(p, g.kfeat, first, nk, stream);
  if (err != cudaSuccess) return err;
  launch_gate_project(qbar, nullptr, 0, 1, p.gate_q_weight, p.batch, p.heads_q, nq, p.head_dim,
                      p.gate_dim, g.qemb, stream);
  launch_gate_project(g.kfeat, p.key_block_stats, first, cap, p.gate_k_weight, p.batch,
                      p.heads_kv, nk, 3 * p.head_dim, p.gate_dim, g.kemb, stream);
  return cudaGetLastError();
}

}  // namespace

size_t select_smem_bytes(const AsaParams& p) {
  const int nk = cdiv(p.seq_kv, p.block_size);
  return static_cast<size_t>(next_pow2(nk)) * 8 + static_cast<size_t>(nk) * 9 + 16;
}

cudaError_t launch_key_block_stats(const AsaParams& p, float* stats, int first_block,
                                   int capacity, cudaStream_t stream) {
  const bool gate = p.gate_q_weight != nullptr;
  switch (p.dtype) {
    case ASA_FLOAT32: launch_key_stats_t<float>(p, stats, first_block, capacity, gate, stream); break;
    case ASA_FLOAT16: launch_key_stats_t<__half>(p, stats, first_block, capacity, gate, stream); break;
    default: launch_key_stats_t<__nv_bfloat16>(p, stats, first_block, capacity, gate, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_route(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  return launch_route_gated(p, ws, nullptr, stream);
}

cudaError_t launch_route_gated(const AsaParams& p, const Workspace& ws, const GateScratch* gate,
                               cudaStream_t stream) {
  const int nq = cdiv(p.seq_q, p.block_size), nk = cdiv(p.seq_kv, p.block_size);
  int device = 0, smem_limit = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // Keep some room for cub's static shared memory.
  const size_t smem = select_smem_bytes(p);
  if (smem + 4096 > static_cast<size_t>(smem_limit)) return cudaErrorInvalidConfiguration;

  if (p.mask_dtype != ASA_MASK_NONE) {
    prefix_kernel<<<p.batch, kPrefixThreads, 0, stream>>>(p, ws.kept_prefix);
  }
  const int hsel = p.select_per ? p.heads_kv : p.heads_q;
  if (dense_fastpath(p)) {  // every visible block is kept: the gate and the scores do not matter
    const int lists = p.batch * hsel * nq;
    dense_lists_kernel<<<cdiv(lists, kListsPerCta), 32 * kListsPerCta, 0, stream>>>(p, ws, lists);
    return cudaGetLastError();
  }
  // Key blocks before `cached` come from the caller's key_block_stats (no key is read for them).
  const int cached = p.key_block_stats ? p.key_block_stats_blocks : 0;
  const int cap = p.key_block_stats_capacity > 0 ? p.key_block_stats_capacity : nk;
  const int lists = p.batch * hsel * nq;
  if (gate == nullptr) {  // decode: the whole router in one cluster launch where it fits
    const int C = route_decode_cluster(p, nq, lists);
    const KeyRows rows{ws.kbar, p.key_block_stats, cached, cap};
    if (C > 0) {
      switch (p.dtype) {
        case ASA_FLOAT32: return launch_route_decode<float>(p, ws, rows, C, lists, stream);
        case ASA_FLOAT16: return launch_route_decode<__half>(p, ws, rows, C, lists, stream);
        default: return launch_route_decode<__nv_bfloat16>(p, ws, rows, C, lists, stream);
      }
    }
  }
  // Decode without the gate: q̄ is pooled inside logits_decode_kernel (one launch fewer).
  const bool fused = gate == nullptr && decode_logits_fits(p, nq);
  switch (p.dtype) {
    case ASA_FLOAT32: launch_pool<float>(p, ws, !fused, gate == nullptr, cached, stream); break;
    case ASA_FLOAT16: launch_pool<__half>(p, ws, !fused, gate == nullptr, cached, stream); break;
    default: launch_pool<__nv_bfloat16>(p, ws, !fused, gate == nullptr, cached, stream); break;
  }
  // The logits GEMM runs on q̄ / k̄ (width D, the score scale) or on the gate's embeddings
  // (width Dg, no scale: SPEC.md "Router (learned gate)").
  const float* qe = ws.qbar;
  KeyRows ke{ws.kbar, p.key_block_stats, cached, cap};
  int width = p.head_dim;
  float scale = p.scale;
  if (gate) {
    const cudaError_t err = p.key_block_stats ? launch_gate_with_stats(p, ws.qbar, *gate, stream)
                                              : launch_gate(p, ws.qbar, *gate, stream);
    if (err != cudaSuccess) return err;
    qe = gate->qemb;
    ke = KeyRows{gate->kemb, nullptr, 0, nk};  // the embeddings of every block are fresh
    width = p.gate_dim;
    scale = 1.f;
  }
  if (fused) {
    const int per_cta = kDecodeLogitsWarps * 32 / (p.head_dim / (4 * kDecodeLogitsCols));
    const dim3 grid(cdiv(nk, per_cta), p.batch * p.heads_kv);
    const size_t qsmem = static_cast<size_t>(p.heads_q / p.heads_kv) * nq * p.head_dim * 4;
    switch (p.dtype) {
      case ASA_FLOAT32:
        launch_chained(logits_decode_kernel<float>, grid, 32 * kDecodeLogitsWarps, qsmem,
                       stream, p, ke, ws.logits);
        break;
      case ASA_FLOAT16:
        launch_chained(logits_decode_kernel<__half>, grid, 32 * kDecodeLogitsWarps, qsmem,
                       stream, p, ke, ws.logits);
        break;
      default:
        launch_chained(logits_decode_kernel<__nv_bfloat16>, grid, 32 * kDecodeLogitsWarps, qsmem,
                       stream, p, ke, ws.logits);
        break;
    }
  } else if (nq < 8) {
    logits_rows_kernel<<<dim3(cdiv(nk, 8), p.batch * p.heads_kv), 256, 0, stream>>>(
        p, qe, ke, width, scale, ws.logits);
  } else {
    const dim3 lgrid(cdiv(nk, kLogitTile), cdiv(nq, kLogitTile), p.batch * p.heads_q);
    logits_kernel<<<lgrid, 256, 0, stream>>>(p, qe, ke, width, scale, ws.logits);
  }
  // One warp per list when the lists are many (prefill); with fewer lists than multiprocessors
  // (decode: B × Hkv lists) a whole CTA per list finishes sooner.
  if (nk <= kWarpListMax && lists >= sm_count()) {
    const size_t slice = (select_smem_bytes(p) + 15) / 16 * 16;
    const size_t wsmem = slice * kListsPerCta;
    cudaError_t err = cudaFuncSetAttribute(select_warp_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(wsmem));
    if (err != cudaSuccess) return err;
    select_warp_kernel<<<cdiv(lists, kListsPerCta), 32 * kListsPerCta, wsmem, stream>>>(
        p, ws, ws.logits, next_pow2(nk), lists);
    return cudaGetLastError();
  }
  cudaError_t err = cudaFuncSetAttribute(select_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  return launch_chained(select_kernel, dim3(nq, hsel, p.batch), kSelectThreads, smem, stream, p,
                        ws, ws.logits, next_pow2(nk));
}

cudaError_t launch_fused_decode(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  step::StepSizes z;
  const int C = fused_decode_cluster(p, &z);
  if (C == 0) return cudaErrorNotSupported;
  const int nk = cdiv(p.seq_kv, p.block_size);
  const int cached = p.key_block_stats ? p.key_block_stats_blocks : 0;
  const int cap = p.key_block_stats_capacity > 0 ? p.key_block_stats_capacity : nk;
  const KeyRows rows{ws.kbar, p.key_block_stats, cached, cap};
  const int lists = p.batch * (p.select_per ? p.heads_kv : p.heads_q);
  if (p.dtype == ASA_FLOAT16) {
    return launch_route_decode<__half, true>(p, ws, rows, C, lists, stream, z);
  }
  return launch_route_decode<__nv_bfloat16, true>(p, ws, rows, C, lists, stream, z);
}

}  // namespace cuda
}  // namespace asa
