// Block-sparse flash attention forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
// fp32 accumulate), SPEC.md "Attention".
//
// One CTA = 4 warps = 64 * MT query rows of one (batch, query head); each warp owns 16 * MT
// rows (MT = 2 when the router block is 128 rows, so K/V fragments are reused twice). The CTA
// walks the kept key blocks of its query block (ws.block_indices) in 64-key tiles, K/V tiles in a
// ring of shared-memory stages filled by cp.async (two stages; three for split-keys decode).
// Scores are kept in the log2 domain (x = s * log2 e) so the online softmax uses exp2. Tiles
// that every row sees completely take a fast path without per-element masking; boundary tiles
// and the softcap / bias / padding-mask cases check each element. With split-KV (decode,
// ws.splits > 1) each CTA handles a slice of the kept list and writes a normalized partial output
// plus its log2-sum-exp2; merge_kernel combines the slices.
#include <cstdlib>

#include "bulk_copy.cuh"  // smem_addr
#include "common.cuh"
#include "kernels.h"

namespace asa {
namespace cuda {
namespace {

// Timeline marks of the attention and merge kernels for tools/attn_timeline.cu, which defines
// these macros to record the global timer per CTA; empty in the library.
#ifndef ASA_ATTN_MARK
#define ASA_ATTN_MARK(i)
#endif
#ifndef ASA_MERGE_MARK
#define ASA_MERGE_MARK(i)
#endif

constexpr int kBM = 64;       // query rows per CTA
constexpr int kBN = 64;       // keys per tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// 2^x on the special-function unit (about 2 ulp; the inputs are rounded to 16 bits afterwards).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}

// 16-byte asynchronous copy; src_bytes = 0 zero-fills (rows past the end must be zeros: a NaN
// pattern in V would survive a zero probability).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copies rows [row0, row0 + 64) of a [S, D] tensor (row stride `stride`) into a padded smem tile,
// zero-filling rows at or past `limit` (the query tile; K/V tiles go through TileLoader).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int row0,
                                          int limit) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kPitch = D + 8;
  for (int c = threadIdx.x; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = row0 + r < limit;
    const T* s = ok ? src + static_cast<int64_t>(row0 + r) * stride + cc * 8 : src;
    cp_async16(dst + r * kPitch + cc * 8, s, ok ? 16 : 0);
  }
}

// K/V tiles are [64 rows][D] without padding, 16-byte chunk c of row r stored at chunk
// c ^ (r % 8) of that row (the 128-byte XOR swizzle). Both sides are then conflict-free: the
// eight row addresses of an ldmatrix 8x8 matrix (eight consecutive rows, one logical chunk) fall
// on the eight different 16-byte bank groups, and a warp's copy of two whole rows fills 512
// contiguous bytes. The padded layout (pitch D + 8) made each warp-level copy 24 global sectors instead of
// 16 and 2.6 times the shared wavefronts (BENCHMARKS.md optimization step 37 (c)).
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Per-thread share of copying 64-row K or V tiles: thread t always copies 16-byte chunk
// t % (D / 8) of rows t / (D / 8) + i · kRowStep, so its source and shared-memory addresses
// advance by constants and a tile costs one 64-bit multiply plus one add per copy (the generic
// index arithmetic of load_tile was half of the decode kernel's instructions). kRowStep is a
// multiple of 8, so the swizzle is the same for all of a thread's rows.
template <typename T, int D>
struct TileLoader {
  static constexpr int kChunks = D / 8;
  static constexpr int kRowStep = kThreads / kChunks;
  static constexpr int kIters = kBN / kRowStep;
  static_assert(kThreads % kChunks == 0 && kBN % kRowStep == 0 && kRowStep % 8 == 0,
                "tile split");
  const T* base;  // row 0 of the tensor slice
  int64_t stride;
  int row;        // first row of this thread in a tile
  int offset;     // element offset of (row, chunk) in a source row
  int out;        // element offset of (row, chunk) in the swizzled tile

  __device__ __forceinline__ TileLoader(const T* src, int64_t row_stride)
      : base(src), stride(row_stride), row(threadIdx.x / kChunks),
        offset((threadIdx.x % kChunks) * 8),
        out(swizzled<D>(threadIdx.x / kChunks, threadIdx.x % kChunks)) {}

  // Rows [row0, row0 + 64) into the swizzled tile `dst`; rows at or past `limit` are
  // zero-filled.
  __device__ __forceinline__ void load(T* dst, int row0, int limit) const {
    const T* src = base + static_cast<int64_t>(row0 + row) * stride + offset;
    T* to = dst + out;
    const int64_t step = kRowStep * stride;
    if (row0 + kBN <= limit) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) cp_async16(to + i * kRowStep * D, src + i * step, 16);
    } else {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const bool ok = row0 + row + i * kRowStep < limit;
        cp_async16(to + i * kRowStep * D, ok ? src + i * step : base, ok ? 16 : 0);
      }
    }
  }
};

enum TileKind { kSkip = 0, kFull = 1, kPartial = 2 };

// Classifies key tile [j0, j0 + 64) for query positions [pos_lo, pos_hi].
__device__ __forceinline__ int classify_tile(const AsaParams& p, int j0, int pos_lo, int pos_hi,
                                             bool generic) {
  const int j1 = j0 + kBN - 1;
  if (j0 >= p.seq_kv) return kSkip;
  if (p.causal && j0 > pos_hi) return kSkip;
  if (p.window > 0) {
    if (j1 <= pos_lo - p.window) return kSkip;
    if (!p.causal && j0 >= pos_hi + p.window) return kSkip;
  }
  if (generic || j1 >= p.seq_kv) return kPartial;
  if (p.causal && j1 > pos_lo) return kPartial;
  if (p.window > 0) {
    if (j0 <= pos_hi - p.window) return kPartial;
    if (!p.causal && j1 >= pos_lo + p.window) return kPartial;
  }
  return kFull;
}

// Decode (split-KV) CTAs copy their slice's list entries to shared memory before the first tile
// is issued (kCache): a slice is a few entries, and reading each from global memory in the loop
// put one dependent L2 round trip in front of every tile's copy. Prefill CTAs read the list in
// the loop, where the compute of the previous tile hides it.
constexpr int kListCache = 64;

template <bool kCache>
struct TileCursor {
  const int32_t* list;
  const int* cached;  // entries [e0, e0 + ncached) of `list`, in shared memory
  int e0, ncached;
  int bs, sub, end;  // block size, 64-key tiles per block, end of the tile range
  int pos_lo, pos_hi;
  bool generic;

  __device__ __forceinline__ int entry(int e) const {
    if constexpr (kCache) {
      const unsigned c = static_cast<unsigned>(e - e0);
      if (c < static_cast<unsigned>(ncached)) return cached[c];
    }
    return list[e];
  }

  // First tile index >= t that is not skipped, or `end`.
  __device__ __forceinline__ int next(const AsaParams& p, int t, int* kind, int* j0) const {
    for (; t < end; ++t) {
      *j0 = entry(t / sub) * bs + (t % sub) * kBN;
      *kind = classify_tile(p, *j0, pos_lo, pos_hi, generic);
      if (*kind != kSkip) return t;
    }
    return end;
  }
};

// K/V stages in flight: two for prefill (compute overlaps the next load), three for packed
// decode with split keys, which only streams K/V (more bytes in flight per multiprocessor).
template <bool split_keys>
constexpr int kv_stages() { return split_keys ? 3 : 2; }
// Query rows held in shared memory: a split-keys CTA has at most 16 (one m16 tile).
template <int MT, bool split_keys>
constexpr int q_rows() { return split_keys ? 16 : kBM * MT; }

template <typename T, int D, int MT, bool packed, bool split_keys = false>
__global__ void __launch_bounds__(kThreads, 2) attn_mma_kernel(AsaParams p, Workspace ws) {
  // packed (decode, select_per 1): the CTA serves a whole KV group; its rows are the G heads'
  // Sq <= 16 query rows (row rho = head (rho / Sq) of the group, query row rho % Sq), so each
  // K/V tile is loaded once per group.
  // MT m16 row tiles per warp: a K/V fragment read from shared memory feeds MT mma's.
  constexpr int kRows = kBM * MT;  // query rows per CTA
  constexpr int kPitch = D + 8;       // query tile rows (padded)
  constexpr int kTile = kBN * kPitch;  // one 64-row query tile
  constexpr int kKV = kBN * D;         // one swizzled K or V tile
  constexpr int kStages = kv_stages<split_keys>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + q_rows<MT, split_keys>() * kPitch;  // [kStages][kBN][D], 128-byte aligned
  T* sv = sk + kStages * kKV;                        // [kStages][kBN][D]
  static_assert(q_rows<MT, split_keys>() * kPitch * sizeof(T) % 128 == 0, "K/V tile alignment");

  ASA_ATTN_MARK(0);
  // Last query tiles first: under a causal mask they hold the most work, so the tail of the
  // grid is made of short CTAs.
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int n = blockIdx.z / ws.splits, split = blockIdx.z % ws.splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int q0 = qt * kRows;
  const int G = p.heads_q / p.heads_kv;
  const int h = packed ? blockIdx.y * G : blockIdx.y;  // first query head of the CTA
  const int hkv = h / G;
  const int packed_rows = packed ? G * p.seq_q : 0;
  // Query head and query row of CTA row rho.
  auto row_head = [&](int rho) { return packed ? h + rho / p.seq_q : h; };
  auto row_index = [&](int rho) { return packed ? rho % p.seq_q : q0 + rho; };
  auto row_valid = [&](int rho) { return packed ? rho < packed_rows : q0 + rho < p.seq_q; };
  const int bs = p.block_size;
  const int nq = cdiv(p.seq_q, bs), nk = cdiv(p.seq_kv, bs);
  const int hsel = p.select_per ? hkv : h;
  const int hsel_count = p.select_per ? p.heads_kv : p.heads_q;
  const int64_t row = (static_cast<int64_t>(n) * hsel_count + hsel) * nq + q0 / bs;

  const T* qg = static_cast<const T*>(p.q) + n * p.q_stride_b + h * p.q_stride_h;
  const T* kg = static_cast<const T*>(p.k) + n * p.k_stride_b + hkv * p.k_stride_h;
  const T* vg = static_cast<const T*>(p.v) + n * p.v_stride_b + hkv * p.v_stride_h;

  if constexpr (packed) {
    const T* qn = static_cast<const T*>(p.q) + n * p.q_stride_b;
    for (int c = threadIdx.x; c < q_rows<MT, split_keys>() * (D / 8); c += kThreads) {
      const int rho = c / (D / 8), cc = c % (D / 8);
      const bool ok = rho < packed_rows;
      const T* src = ok ? qn + row_head(rho) * p.q_stride_h +
                              static_cast<int64_t>(row_index(rho)) * p.q_stride_s + cc * 8
                        : qn;
      cp_async16(sq + rho * kPitch + cc * 8, src, ok ? 16 : 0);
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      load_tile<T, D>(sq + mt * kTile, qg, p.q_stride_s, q0 + mt * kBN, p.seq_q);
    }
  }
  // Q is the caller's input, which no kernel of the chain writes, so its copy is issued before
  // the wait for the router's lists (chained launch, common.cuh).
  wait_for_previous_kernel();
  allow_next_kernel();
  ASA_ATTN_MARK(1);
  // Split s takes tiles [s·T/S, (s+1)·T/S) of the T = count · (bs / 64) tiles of the list: the
  // slices differ by at most one tile, so every split has work (a split per whole block left
  // up to a fifth of the CTAs idle in decode at density 0.1).
  const int count = ws.block_counts[row];
  const int tiles = count * (bs / kBN);
  const int t_begin = split * tiles / ws.splits, t_end = (split + 1) * tiles / ws.splits;

  TileCursor<packed> cur;
  cur.list = ws.block_indices + row * nk;
  cur.bs = bs;
  cur.sub = bs / kBN;
  cur.end = t_end;
  const int shift = p.seq_kv - p.seq_q;
  cur.pos_lo = q0 + shift;
  cur.pos_hi = min(q0 + kRows, p.seq_q) - 1 + shift;
  // MT = 2 is launched only without padding mask, bias and softcap: its code leaves them out,
  // which keeps it within the register file.
  constexpr bool kLean = MT == 2;
  cur.generic = !kLean && (p.mask_dtype != ASA_MASK_NONE || p.bias != nullptr || p.softcap > 0.f);

  if constexpr (packed) {
    // The slice's list entries (the first kListCache of them) to shared memory for both cursors.
    __shared__ int list_cache[kListCache];
    cur.e0 = t_begin / cur.sub;
    cur.ncached = t_end > t_begin ? min(cdiv(t_end, cur.sub) - cur.e0, kListCache) : 0;
    cur.cached = list_cache;
    for (int i = threadIdx.x; i < cur.ncached; i += kThreads) list_cache[i] = cur.list[cur.e0 + i];
    __syncthreads();
  }
  ASA_ATTN_MARK(2);

  // Two cursors walk the same tiles: `tl` issues loads kStages - 1 tiles ahead of `t`, which
  // computes. Every step commits one cp.async group (empty past the end), so waiting until at
  // most kStages - 1 groups are pending means tile t (and, in the first group, Q) has landed.
  const TileLoader<T, D> kload(kg, p.k_stride_s), vload(vg, p.v_stride_s);
  int kind = kSkip, j0 = 0;
  int t = cur.next(p, t_begin, &kind, &j0);
  int tl = t, load_stage = 0, stage = 0;
  // Issue the next visible tile's K/V copy (if any) into the ring; commit one group always.
  auto load_next = [&] {
    if (tl < cur.end) {
      int kind_l, j0_l;
      tl = cur.next(p, tl, &kind_l, &j0_l);
      if (tl < cur.end) {
        kload.load(sk + load_stage * kKV, j0_l, p.seq_kv);
        vload.load(sv + load_stage * kKV, j0_l, p.seq_kv);
        load_stage = load_stage + 1 == kStages ? 0 : load_stage + 1;
        ++tl;
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_next();

  // split_keys (packed decode with G·Sq <= 16): every warp owns the same 16 rows and 16 keys
  // of each 64-key tile (keys [16·warp, 16·warp + 16)); the four partial softmax states are
  // merged at the end. Otherwise warp w owns rows [w·16·MT, (w+1)·16·MT) and every key.
  static_assert(!split_keys || (packed && MT == 1), "split_keys is a packed-decode mode");
  constexpr int kNT = split_keys ? 2 : 8;   // n8 score tiles per warp and key tile
  constexpr int kKS = split_keys ? 1 : 4;   // k16 slices of P·V per warp and key tile
  const int kofs = split_keys ? 16 * warp : 0;
  const int wrow = split_keys ? 0 : warp * 16 * MT;
  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
  }
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  const int t_first = t;  // for ASA_ATTN_MARK only
  while (t < cur.end) {
    load_next();
    cp_async_wait<kStages - 1>();
    __syncthreads();
    if (t == t_first) ASA_ATTN_MARK(3);  // the slice's first tile has landed

    const T* kt = sk + stage * kKV;
    const T* vt = sv + stage * kKV;
    float s[MT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldmatrix_x4(qf[mt], sq + (wrow + mt * 16 + lane % 16) * kPitch + kk * 16 + (lane / 16) * 8);
      }
#pragma unroll
      for (int nb = 0; nb < kNT / 2; ++nb) {
        uint32_t b[4];
        ldmatrix_x4(b, kt + swizzled<D>(kofs + nb * 16 + (lane / 16) * 8 + lane % 8,
                                        kk * 2 + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(s[mt][2 * nb], qf[mt], b[0], b[1]);
          Mma<T>::run(s[mt][2 * nb + 1], qf[mt], b[2], b[3]);
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int rho_base = wrow + mt * 16 + g;
      // Scores to the log2 domain, masked where needed.
      if (kind == kFull) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale_log2;
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int rho = rho_base + (e >= 2 ? 8 : 0);
            const int r = row_index(rho);
            const int j = j0 + kofs + nt * 8 + 2 * tq + (e & 1);
            float x = s[mt][nt][e] * p.scale;
            bool vis = row_valid(rho) && j < p.seq_kv && position_visible(p, r + shift, j);
            if constexpr (!kLean) {
              if (vis && p.mask_dtype != ASA_MASK_NONE) vis = key_kept(p, n, j);
              if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
              if (vis && p.bias != nullptr) {
                const T* bias = static_cast<const T*>(p.bias);
                x += to_float(bias[n * p.bias_stride_b + row_head(rho) * p.bias_stride_h +
                                   r * p.bias_stride_q + j * p.bias_stride_k]);
              }
            }
            s[mt][nt][e] = vis ? x * kLog2e : -INFINITY;
          }
        }
      }

      // Online softmax; each row lives in the 4 threads of a quad.
      float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
      }
      float alpha[2], mu[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
        alpha[rr] = m[mt][rr] == -INFINITY ? 0.f : fast_exp2(m[mt][rr] - mx[rr]);
        mu[rr] = mx[rr] == -INFINITY ? 0.f : mx[rr];
        m[mt][rr] = mx[rr];
      }
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] = fast_exp2(s[mt][nt][e] - mu[e >> 1]);
          rs[e >> 1] += s[mt][nt][e];
        }
      }
      l[mt][0] = l[mt][0] * alpha[0] + rs[0];
      l[mt][1] = l[mt][1] * alpha[1] + rs[1];
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[mt][dt][0] *= alpha[0];
        o[mt][dt][1] *= alpha[0];
        o[mt][dt][2] *= alpha[1];
        o[mt][dt][3] *= alpha[1];
      }
    }

    // O += P V; a V fragment serves every m-tile.
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vt + swizzled<D>(kofs + kk * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                              dp * 2 + lane / 16));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(o[mt][2 * dp], a[mt], b[0], b[1]);
          Mma<T>::run(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
    t = cur.next(p, t + 1, &kind, &j0);
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  ASA_ATTN_MARK(4);
  cp_async_wait<0>();  // only empty groups (or Q, when the slice had no tile) can be pending

  if constexpr (split_keys) {
    // Merge the four warps' softmax states of the same 16 rows into warp 0: M = max_w m_w,
    // l = Σ_w l_w 2^(m_w − M), o = Σ_w o_w 2^(m_w − M). Lane λ of every warp holds the same
    // (row, column) fragments, so the exchange is lane to lane through the free K/V buffers.
    __syncthreads();
    constexpr int kVals = D / 8 * 4 + 4;  // o fragments, m[2], l[2]
    float* xch = reinterpret_cast<float*>(sk);
    if (warp > 0) {
      float* mine = xch + ((warp - 1) * 32 + lane) * kVals;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[dt * 4 + e] = o[0][dt][e];
      }
      mine[D / 2] = m[0][0];
      mine[D / 2 + 1] = m[0][1];
      mine[D / 2 + 2] = l[0][0];
      mine[D / 2 + 3] = l[0][1];
    }
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = m[0][rr];
      for (int w = 1; w < kThreads / 32; ++w) {
        mx = fmaxf(mx, xch[((w - 1) * 32 + lane) * kVals + D / 2 + rr]);
      }
      const float mu = mx == -INFINITY ? 0.f : mx;
      const float a0 = m[0][rr] == -INFINITY ? 0.f : fast_exp2(m[0][rr] - mu);
      l[0][rr] *= a0;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[0][dt][2 * rr] *= a0;
        o[0][dt][2 * rr + 1] *= a0;
      }
      for (int w = 1; w < kThreads / 32; ++w) {
        const float* theirs = xch + ((w - 1) * 32 + lane) * kVals;
        const float mw = theirs[D / 2 + rr];
        const float aw = mw == -INFINITY ? 0.f : fast_exp2(mw - mu);
        l[0][rr] += aw * theirs[D / 2 + 2 + rr];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[0][dt][2 * rr] += aw * theirs[dt * 4 + 2 * rr];
          o[0][dt][2 * rr + 1] += aw * theirs[dt * 4 + 2 * rr + 1];
        }
      }
      m[0][rr] = mx;
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float lsum = l[mt][rr];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const int rho = wrow + mt * 16 + g + rr * 8;
      if (!row_valid(rho)) continue;
      const int r = row_index(rho), hr = row_head(rho);
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      if (ws.splits == 1) {
        T* out = static_cast<T*>(p.out) + n * p.o_stride_b + hr * p.o_stride_h + r * p.o_stride_s;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          const int d = dt * 8 + 2 * tq;
          out[d] = from_float<T>(o[mt][dt][2 * rr] * inv);
          out[d + 1] = from_float<T>(o[mt][dt][2 * rr + 1] * inv);
        }
      } else {
        const int64_t prow =
            ((static_cast<int64_t>(split) * p.batch + n) * p.heads_q + hr) * p.seq_q + r;
        float* po = ws.part_o + prow * p.head_dim_v;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          const int d = dt * 8 + 2 * tq;
          po[d] = o[mt][dt][2 * rr] * inv;
          po[d + 1] = o[mt][dt][2 * rr + 1] * inv;
        }
        if (tq == 0) ws.part_lse[prow] = lsum > 0.f ? m[mt][rr] + log2f(lsum) : -INFINITY;
      }
    }
  }
  ASA_ATTN_MARK(5);
}

// Combines split-KV partials: out = Σ_s 2^(lse_s - M) o_s / Σ_s 2^(lse_s - M); zeros when every
// slice was empty. Split-KV runs only on this file's kernels (Dv = D <= 128 = kMergeThreads,
// choose_splits). Thread d loads every slice's column d at once (kMaxSplits registers) while
// threads 0..splits-1 load the slices' lse, so the kernel waits for one L2 round trip instead of
// one per eight slices; the weights are computed once per row, and both sums run over s in
// order, as a sequential merge does.
constexpr int kMergeThreads = 128;
constexpr int kMaxSplits = 64;  // choose_splits' cap

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(AsaParams p, Workspace ws) {
  ASA_MERGE_MARK(0);
  wait_for_previous_kernel();
  allow_next_kernel();
  ASA_MERGE_MARK(1);
  __shared__ float weight[kMaxSplits];
  __shared__ float warp_max[kMergeThreads / 32];
  __shared__ float weight_sum;
  const int r = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int splits = ws.splits;
  const int64_t stride = static_cast<int64_t>(p.batch) * p.heads_q * p.seq_q;
  const int64_t base = (static_cast<int64_t>(n) * p.heads_q + h) * p.seq_q + r;
  const int tid = threadIdx.x;
  const float* po = ws.part_o + base * p.head_dim_v;
  const int64_t split_stride = stride * p.head_dim_v;
  // Column tid of every slice (an empty slice has zero partials: the attention kernel writes
  // every slice), issued before the lse loads are used.
  const bool has_col = tid < p.head_dim_v;
  float col[kMaxSplits];
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    col[s] = has_col && s < splits ? po[s * split_stride + tid] : 0.f;
  }
  const float lse = tid < splits ? ws.part_lse[tid * stride + base] : -INFINITY;
  float mx = lse;
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (tid % 32 == 0) warp_max[tid / 32] = mx;
  __syncthreads();
  mx = warp_max[0];
  for (int w = 1; w < kMergeThreads / 32; ++w) mx = fmaxf(mx, warp_max[w]);
  if (tid < splits) weight[tid] = lse == -INFINITY ? 0.f : exp2f(lse - mx);
  __syncthreads();
  if (tid == 0) {
    float wsum = 0.f;
    for (int s = 0; s < splits; ++s) wsum += weight[s];
    weight_sum = wsum;
  }
  __syncthreads();
  const float wsum = weight_sum;
  T* out = static_cast<T*>(p.out) + n * p.o_stride_b + h * p.o_stride_h + r * p.o_stride_s;
  if (!has_col) return;
  // No branch on the weight: weight 0 times a zero partial leaves the sum unchanged.
  float acc = 0.f;
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    if (s < splits) acc += weight[s] * col[s];
  }
  out[tid] = from_float<T>(wsum > 0.f ? acc / wsum : 0.f);
  ASA_MERGE_MARK(2);
}

// Decode with one list per KV group: pack the group's query rows into one 64-row tile.
bool decode_packed(const AsaParams& p) {
  const int G = p.heads_q / p.heads_kv;
  return p.select_per == 1 && p.seq_q <= 16 && G > 1 && G * p.seq_q <= kBM;
}

// A packed group of at most 16 rows fills one m16 tile: the warps split the keys instead
// (ASA_CUDA_SPLIT_KEYS=0 keeps the 64-row tile; read at each launch, the tests compare both).
bool decode_split_keys(const AsaParams& p) {
  const char* env = getenv("ASA_CUDA_SPLIT_KEYS");
  return decode_packed(p) && (p.heads_q / p.heads_kv) * p.seq_q <= 16 &&
         !(env != nullptr && env[0] == '0');
}

template <typename T, int D, int MT, bool packed, bool split_keys = false>
cudaError_t launch_mma(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  const size_t smem = (static_cast<size_t>(q_rows<MT, split_keys>()) * (D + 8) +
                       static_cast<size_t>(2 * kv_stages<split_keys>() * kBN) * D) *
                      sizeof(T);
  cudaError_t err = cudaFuncSetAttribute(attn_mma_kernel<T, D, MT, packed, split_keys>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(packed ? 1 : cdiv(p.seq_q, kBM * MT), packed ? p.heads_kv : p.heads_q,
                  p.batch * ws.splits);
  err = launch_chained(attn_mma_kernel<T, D, MT, packed, split_keys>, grid, kThreads, smem, stream,
                       p, ws);
  if (err != cudaSuccess || ws.splits == 1) return err;
  return launch_chained(merge_kernel<T>, dim3(p.seq_q, p.heads_q, p.batch), kMergeThreads, 0,
                        stream, p, ws);
}

// Query tile = the router's query block when b = 128 (two m-tiles per warp), 64 rows when
// b = 64 or when decoding (a 128-row tile would be mostly empty rows).
template <typename T>
cudaError_t launch_mma_dtype(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  // Two m-tiles per warp halve the shared-memory reads per mma, but halve the CTA count too:
  // only worth it when there are enough CTAs to fill the GPU several times.
  const int ctas_two = p.batch * p.heads_q * cdiv(p.seq_q, 2 * kBM);
  const bool generic = p.mask_dtype != ASA_MASK_NONE || p.bias != nullptr || p.softcap > 0.f;
  const bool two = p.block_size == 128 && p.seq_q > 16 && !generic &&
                   ctas_two >= 4 * sm_count();
  const bool packed = decode_packed(p);
  const bool split = decode_split_keys(p);
  if (p.head_dim == 64) {
    if (split) return launch_mma<T, 64, 1, true, true>(p, ws, stream);
    if (packed) return launch_mma<T, 64, 1, true>(p, ws, stream);
    return two ? launch_mma<T, 64, 2, false>(p, ws, stream)
               : launch_mma<T, 64, 1, false>(p, ws, stream);
  }
  if (split) return launch_mma<T, 128, 1, true, true>(p, ws, stream);
  if (packed) return launch_mma<T, 128, 1, true>(p, ws, stream);
  return two ? launch_mma<T, 128, 2, false>(p, ws, stream)
             : launch_mma<T, 128, 1, false>(p, ws, stream);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

int sm_count() {  // cached: the core runs on one device per process in practice
  static int sms = 0;
  if (sms == 0) {
    int device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (sms <= 0) sms = 108;
  }
  return sms;
}

bool chained_launch_enabled() {
  static int major = -1;
  if (major < 0) {
    int device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  }
  const char* env = getenv("ASA_CUDA_PDL");
  return major >= 9 && (env == nullptr || env[0] != '0');
}

namespace {
thread_local bool chain_started = false;  // whether this entry point call launched a kernel yet
}  // namespace

void begin_chain() { chain_started = false; }

bool next_launch_chained() {
  const bool first = !chain_started;
  chain_started = true;
  return !first && chained_launch_enabled();
}

cudaError_t launch_simple(const AsaParams& p, const Workspace& ws, cudaStream_t stream);

bool mma_path_supported(const AsaParams& p) {
  if (p.dtype != ASA_FLOAT16 && p.dtype != ASA_BFLOAT16) return false;
  if (p.head_dim != p.head_dim_v || (p.head_dim != 64 && p.head_dim != 128)) return false;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v)) return false;
  // 16-byte cp.async rows: every row start must stay 16-byte aligned.
  const int64_t strides[] = {p.q_stride_b, p.q_stride_h, p.q_stride_s, p.k_stride_b,
                             p.k_stride_h, p.k_stride_s, p.v_stride_b, p.v_stride_h,
                             p.v_stride_s};
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return true;
}

int choose_splits(const AsaParams& p) {
  if (!mma_path_supported(p) || p.seq_q > 16) return 1;
  const int sms = sm_count();
  // One query tile per head when Sq <= 16, one per KV group when packed.
  const int ctas = p.batch * (decode_packed(p) ? p.heads_kv : p.heads_q);
  const int nk = cdiv(p.seq_kv, p.block_size);
  // Two CTAs per multiprocessor, rounded down: all slices in one wave. Rounding up put a partial
  // second wave behind the first whenever 2 · SMs is not a multiple of the CTA count (batch 4,
  // 8 KV heads, 132 SMs: 9 slices = 288 CTAs for 264 places), and the decode step at batch 2-8
  // took up to 1.3x longer (BENCHMARKS.md optimization step 47).
  int splits = 2 * sms / ctas;
  splits = min(splits, min(nk, kMaxSplits));
  return max(splits, 1);
}

cudaError_t launch_mma_kernels(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  return p.dtype == ASA_FLOAT16 ? launch_mma_dtype<__half>(p, ws, stream)
                                : launch_mma_dtype<__nv_bfloat16>(p, ws, stream);
}

cudaError_t launch_attention(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  if (!mma_path_supported(p)) return launch_simple(p, ws, stream);
  if (wgmma_path_supported(p, ws)) return launch_wgmma(p, ws, stream);
  return launch_mma_kernels(p, ws, stream);
}

}  // namespace cuda
}  // namespace asa
