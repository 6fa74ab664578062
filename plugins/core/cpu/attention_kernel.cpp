// Block-sparse attention for one (batch, query head, query block) tile, fused like a flash
// kernel: walk only the kept key blocks, S = Q·Kᵀ for one b×b block in registers/L1, masks at
// element level only in boundary blocks, online softmax in fp32, O += P·V.
//
// This file is compiled once per ISA level (CMake sets ASA_ISA_NS and the -m flags); the
// dispatcher picks one at run time, so no instruction beyond the baseline runs on an older CPU.
// Everything here has internal linkage except attention_tile, so the per-ISA copies never mix.
#include <math.h>
#include <string.h>

#include "kernel.h"

#ifndef ASA_ISA_NS
#error "ASA_ISA_NS must name the ISA namespace (base, avx2, avx512)"
#endif
#ifndef ASA_ROWS
#define ASA_ROWS 4  // query rows per micro-kernel step (register blocking)
#endif
#ifndef ASA_VBYTES
#define ASA_VBYTES 16  // bytes of one native vector register
#endif

namespace asa {
namespace cpu {
namespace ASA_ISA_NS {
namespace {

// One native vector: xmm on the baseline, ymm on AVX2, zmm on AVX-512 (CMake sets ASA_VBYTES).
// A chunk of kVec = 16 keys or value columns is NV such vectors.
typedef float vf __attribute__((vector_size(ASA_VBYTES)));
typedef int32_t vi __attribute__((vector_size(ASA_VBYTES)));
constexpr int VW = ASA_VBYTES / 4;
constexpr int NV = kVec / VW;
static_assert(kVec % VW == 0, "chunk must be whole vectors");

#define ASA_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -__builtin_inff();

ASA_INLINE vf load(const float* p) {
  vf v;
  memcpy(&v, p, sizeof(v));
  return v;
}
ASA_INLINE void store(float* p, vf v) { memcpy(p, &v, sizeof(v)); }
ASA_INLINE vf splat(float x) { return vf{} + x; }
ASA_INLINE vf as_vf(vi x) {
  vf r;
  memcpy(&r, &x, sizeof(r));
  return r;
}

// exp(x) to about 1 ulp for x <= 88; exactly 0 below -87.3 (masked scores are -inf).
ASA_INLINE vf vexp(vf x) {
  // Callers pass x <= 0 (scores minus the running max), so only underflow needs a clamp.
  const vf lo = splat(-87.3f);
  const auto underflow = x < lo;
  x = x < lo ? lo : x;
  // Round x·log2(e) to nearest with the 1.5·2^23 trick (no floor instruction needed).
  const vf magic = splat(12582912.0f);
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf poly = splat(1.0f / 720);
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const vi ni = __builtin_convertvector(n, vi);
  const vf scale = as_vf((ni + 127) << 23);
  const vf y = poly * scale;
  return underflow ? splat(0.0f) : y;
}

// c·tanh(s/c) through exp(-2|y|), accurate to a few ulp.
ASA_INLINE vf vsoftcap(vf s, float c) {
  const vf y = s * (1.0f / c);
  const vf ay = y < 0.0f ? -y : y;
  const vf e = vexp(ay * -2.0f);  // argument <= 0, as vexp wants
  const vf t = (1.0f - e) / (1.0f + e);
  return (y < 0.0f ? -t : t) * c;
}

inline float half_to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = em << 13;
  float f;
  memcpy(&f, &bits, 4);
  f *= 0x1p112f;  // rebias the exponent; also right for subnormals
  memcpy(&bits, &f, 4);
  if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;  // inf / nan
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne).
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= 0x47800000u) {  // overflow, inf or nan
    o = (u > 0x7f800000u) ? 0x7e00 : 0x7c00;
  } else if (u < 0x38800000u) {  // subnormal or zero
    float g;
    memcpy(&g, &u, 4);
    g += 0.5f;
    uint32_t gu;
    memcpy(&gu, &g, 4);
    o = static_cast<uint16_t>(gu - 0x3f000000u);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += 0xc8000fffu + mant_odd;  // exponent rebias + rounding bias
    o = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Loads n elements of type `dt` starting at element offset `off` of `base` into fp32.
inline void load_row(const void* base, int64_t off, int n, AsaDType dt, float* dst) {
  if (dt == ASA_FLOAT32) {
    memcpy(dst, static_cast<const float*>(base) + off, sizeof(float) * n);
  } else if (dt == ASA_FLOAT16) {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int d = 0; d < n; ++d) dst[d] = half_to_float(s[d]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int d = 0; d < n; ++d) dst[d] = bf16_to_float(s[d]);
  }
}

inline float load_one(const void* base, int64_t off, AsaDType dt) {
  if (dt == ASA_FLOAT32) return static_cast<const float*>(base)[off];
  const uint16_t h = static_cast<const uint16_t*>(base)[off];
  return dt == ASA_FLOAT16 ? half_to_float(h) : bf16_to_float(h);
}

inline void store_row(void* base, int64_t off, int n, AsaDType dt, const float* src) {
  if (dt == ASA_FLOAT32) {
    memcpy(static_cast<float*>(base) + off, src, sizeof(float) * n);
  } else if (dt == ASA_FLOAT16) {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    for (int c = 0; c < n; ++c) d[c] = float_to_half(src[c]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    for (int c = 0; c < n; ++c) d[c] = float_to_bf16(src[c]);
  }
}

inline int imin(int a, int b) { return a < b ? a : b; }
inline int imax(int a, int b) { return a > b ? a : b; }

// Pointers into one thread's scratch, sized by tile_scratch_floats.
struct Scratch {
  float* q;   // [b][dp]  query rows, pre-multiplied by scale
  float* s;   // [b][b]   scores, then probabilities
  float* o;   // [b][dvp] output accumulator
  float* m;   // [b] running max
  float* l;   // [b] running sum
  int* lo;    // [b] first visible key of the row (geometry only)
  int* hi;    // [b] one past the last visible key
};

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

Scratch carve(float* base, int dp, int dvp) {
  const int b = kMaxBlock, rows = kMaxBlock + kMaxRows;
  Scratch sc;
  float* p = align64(base);
  sc.q = p;  p += rows * dp;
  sc.s = p;  p += rows * b;
  sc.o = p;  p += rows * dvp;
  sc.m = p;  p += b;
  sc.l = p;  p += b;
  sc.lo = reinterpret_cast<int*>(p); p += b;
  sc.hi = reinterpret_cast<int*>(p);
  return sc;
}

// Horizontal max / sum: fold the vector in halves (constant extracts, no index vectors).
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));

ASA_INLINE vf4 fold_to_4(vf x, bool is_max) {
#if ASA_VBYTES == 64
  const vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  const vf8 b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf8 y = is_max ? (a > b ? a : b) : a + b;
#elif ASA_VBYTES == 32
  const vf8 y = x;
#endif
#if ASA_VBYTES >= 32
  const vf4 c = __builtin_shufflevector(y, y, 0, 1, 2, 3);
  const vf4 d = __builtin_shufflevector(y, y, 4, 5, 6, 7);
  return is_max ? (c > d ? c : d) : c + d;
#else
  (void)is_max;
  return x;
#endif
}

ASA_INLINE float hmax(vf x) {
  const vf4 v = fold_to_4(x, true);
  const float a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
  return a > b ? a : b;
}

ASA_INLINE float hsum(vf x) {
  const vf4 v = fold_to_4(x, false);
  return (v[0] + v[1]) + (v[2] + v[3]);
}

// Visible key interval [lo, hi) of each row from causal / window geometry (padding aside).
void row_intervals(const AsaParams& p, int r0, int nr, int* lo, int* hi) {
  for (int r = 0; r < nr; ++r) {
    const int pos = r0 + r + p.seq_kv - p.seq_q;
    int a = 0, z = p.seq_kv;
    if (p.causal) z = imin(z, pos + 1);
    if (p.window > 0) {
      a = imax(a, pos - p.window + 1);
      if (!p.causal) z = imin(z, pos + p.window);
    }
    lo[r] = a;
    hi[r] = z > a ? z : a;
  }
}

// S[r][0..nkp) = (scale·q_r)·k_j for rows in groups of R and keys in chunks of kVec;
// the R × NV accumulators stay in registers over the whole head dimension.
// lim[g]: keys of the block that row group g can see at all (causal: the rest is skipped).
template <int R>
void qk_block(const Scratch& sc, const float* kt, int ldk, int nr_pad, const int* lim, int dim,
              int dp) {
  const int b = kMaxBlock;
  for (int r0 = 0; r0 < nr_pad; r0 += R) {
    const float* qr = sc.q + r0 * dp;
    const int nkp = static_cast<int>(round_up(lim[r0 / R], kVec));
    for (int jc = 0; jc < nkp; jc += kVec) {
      vf acc[R][NV];
      for (int x = 0; x < R; ++x)
        for (int u = 0; u < NV; ++u) acc[x][u] = splat(0.0f);
      const float* kc = kt + jc;
      for (int d = 0; d < dim; ++d) {
        vf kv[NV];
        for (int u = 0; u < NV; ++u) kv[u] = load(kc + d * ldk + u * VW);
        for (int x = 0; x < R; ++x) {
          const float qs = qr[x * dp + d];
          for (int u = 0; u < NV; ++u) acc[x][u] += qs * kv[u];
        }
      }
      for (int x = 0; x < R; ++x)
        for (int u = 0; u < NV; ++u) store(sc.s + (r0 + x) * b + jc + u * VW, acc[x][u]);
    }
  }
}

// O[r] += Σ_j P[r][j]·V[j] over the block's nk keys, R rows × kVec columns at a time.
template <int R>
void pv_block(const Scratch& sc, const float* v, int64_t ldv, int nr_pad, const int* lim,
              int dvp) {
  const int b = kMaxBlock;
  for (int r0 = 0; r0 < nr_pad; r0 += R) {
    const float* pr = sc.s + r0 * b;
    const int nk = lim[r0 / R];
    for (int dc = 0; dc < dvp; dc += kVec) {
      vf acc[R][NV];
      for (int x = 0; x < R; ++x)
        for (int u = 0; u < NV; ++u) acc[x][u] = load(sc.o + (r0 + x) * dvp + dc + u * VW);
      const float* vc = v + dc;
      for (int j = 0; j < nk; ++j) {
        vf vv[NV];
        for (int u = 0; u < NV; ++u) vv[u] = load(vc + j * ldv + u * VW);
        for (int x = 0; x < R; ++x) {
          const float ps = pr[x * b + j];
          for (int u = 0; u < NV; ++u) acc[x][u] += ps * vv[u];
        }
      }
      for (int x = 0; x < R; ++x)
        for (int u = 0; u < NV; ++u) store(sc.o + (r0 + x) * dvp + dc + u * VW, acc[x][u]);
    }
  }
}

// Scores of the first nr rows against key rows read in place (decode calls): one dot product
// per (row, key), keys [0, lim) of the block.
void qk_direct(const Scratch& sc, const float* k, int64_t ldk, int nr, int lim, int dim, int dp) {
  const int b = kMaxBlock;
  const int dvec = dim / VW * VW;
  for (int r = 0; r < nr; ++r) {
    const float* qr = sc.q + r * dp;
    float* srow = sc.s + r * b;
    for (int j = 0; j < lim; ++j) {
      const float* kr = k + j * ldk;
      vf acc = splat(0.0f);
      for (int d = 0; d < dvec; d += VW) acc += load(qr + d) * load(kr + d);
      float tail = 0.0f;
      for (int d = dvec; d < dim; ++d) tail += qr[d] * kr[d];
      srow[j] = hsum(acc) + tail;
    }
  }
}

// True when every row sees every key of [j0, j0+nk): no element mask needed.
bool block_fully_visible(const int* lo, const int* hi, int nr, const uint8_t* keep, int j0,
                         int nk) {
  for (int r = 0; r < nr; ++r)
    if (lo[r] > j0 || hi[r] < j0 + nk) return false;
  if (keep)
    for (int j = 0; j < nk; ++j)
      if (!keep[j0 + j]) return false;
  return true;
}

// Softcap, bias and masks on the scores of one block, in place.
void transform_scores(const AsaParams& p, const TileJob& job, const Scratch& sc, int r0, int nr,
                      int j0, int nk, int nkp) {
  const int b = kMaxBlock;
  if (p.softcap > 0.0f) {
    for (int r = 0; r < nr; ++r)
      for (int jc = 0; jc < nkp; jc += VW)
        store(sc.s + r * b + jc, vsoftcap(load(sc.s + r * b + jc), p.softcap));
  }
  if (p.bias) {
    const int64_t base = job.n * p.bias_stride_b + job.h * p.bias_stride_h;
    for (int r = 0; r < nr; ++r) {
      const int64_t roff = base + (r0 + r) * p.bias_stride_q;
      float* srow = sc.s + r * b;
      if (p.bias_stride_k == 1 && p.dtype == ASA_FLOAT32) {
        const float* brow = static_cast<const float*>(p.bias) + roff + j0;
        for (int j = 0; j < nk; ++j) srow[j] += brow[j];
      } else {
        for (int j = 0; j < nk; ++j)
          srow[j] += load_one(p.bias, roff + (j0 + j) * p.bias_stride_k, p.dtype);
      }
    }
  }
  if (!block_fully_visible(sc.lo, sc.hi, nr, job.keep, j0, nk)) {
    for (int r = 0; r < nr; ++r) {
      float* srow = sc.s + r * b;
      // Row r sees [a, z) of the block (geometry), then the padding mask within it.
      const int a = imin(nk, imax(0, sc.lo[r] - j0));
      const int z = imin(nk, imax(a, sc.hi[r] - j0));
      for (int j = 0; j < a; ++j) srow[j] = kNegInf;
      for (int j = z; j < nk; ++j) srow[j] = kNegInf;
      if (job.keep)
        for (int j = a; j < z; ++j) srow[j] = job.keep[j0 + j] ? srow[j] : kNegInf;
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int j = nk; j < nkp; ++j) sc.s[r * b + j] = kNegInf;
}

// Online-softmax update of rows [0, nr): scores become probabilities relative to the new
// running max; O rows are rescaled. Rows with no visible key in this block get P = 0.
void softmax_update(const Scratch& sc, int nr, int nr_pad, int nkp, int dvp) {
  const int b = kMaxBlock;
  for (int r = 0; r < nr; ++r) {
    float* srow = sc.s + r * b;
    vf mx = load(srow);
    for (int jc = VW; jc < nkp; jc += VW) {
      const vf x = load(srow + jc);
      mx = x > mx ? x : mx;
    }
    const float bmax = hmax(mx);
    if (bmax == kNegInf) {
      memset(srow, 0, sizeof(float) * nkp);
      continue;
    }
    const float m_old = sc.m[r];
    const float m_new = bmax > m_old ? bmax : m_old;
    const vf mv = splat(m_new);
    vf sum = splat(0.0f);
    for (int jc = 0; jc < nkp; jc += VW) {
      const vf e = vexp(load(srow + jc) - mv);
      store(srow + jc, e);
      sum += e;
    }
    const float bsum = hsum(sum);
    if (m_new != m_old) {
      const float alpha = m_old == kNegInf ? 0.0f : expf(m_old - m_new);
      sc.l[r] *= alpha;
      float* orow = sc.o + r * dvp;
      for (int c = 0; c < dvp; ++c) orow[c] *= alpha;
      sc.m[r] = m_new;
    }
    sc.l[r] += bsum;
  }
  for (int r = nr; r < nr_pad; ++r) memset(sc.s + r * b, 0, sizeof(float) * nkp);
}

}  // namespace

void pack_kv(const AsaParams& p, int n, int hkv, int kb, float* kt_dst, float* v_dst) {
  const int bs = p.block_size, j0 = kb * bs;
  const int nk = imin(bs, p.seq_kv - j0);
  float row[256];
  const int64_t kbase = n * p.k_stride_b + hkv * p.k_stride_h;
  if (kt_dst && p.dtype == ASA_FLOAT32) {
    // fp32: 16 keys at a time, written as contiguous runs of the transposed block (the 16 key
    // rows being read stay in L1).
    const float* k = static_cast<const float*>(p.k) + kbase + static_cast<int64_t>(j0) * p.k_stride_s;
    for (int jt = 0; jt < nk; jt += 16) {
      const int jn = imin(16, nk - jt);
      for (int d = 0; d < p.head_dim; ++d) {
        float* dst = kt_dst + d * bs + jt;
        const float* src = k + static_cast<int64_t>(jt) * p.k_stride_s + d;
        for (int j = 0; j < jn; ++j) dst[j] = src[j * p.k_stride_s];
      }
    }
  }
  for (int j = 0; kt_dst && p.dtype != ASA_FLOAT32 && j < nk; ++j) {
    const int64_t off = kbase + (j0 + j) * p.k_stride_s;
    for (int d0 = 0; d0 < p.head_dim; d0 += 256) {
      const int cnt = imin(256, p.head_dim - d0);
      load_row(p.k, off + d0, cnt, p.dtype, row);
      for (int d = 0; d < cnt; ++d) kt_dst[(d0 + d) * bs + j] = row[d];
    }
  }
  for (int d = 0; kt_dst && d < p.head_dim; ++d)
    for (int j = nk; j < bs; ++j) kt_dst[d * bs + j] = 0.0f;  // keys past Skv score 0, masked
  if (!v_dst) return;
  const int dvp = static_cast<int>(round_up(p.head_dim_v, kVec));
  const int64_t vbase = n * p.v_stride_b + hkv * p.v_stride_h;
  for (int j = 0; j < nk; ++j) {
    float* dst = v_dst + static_cast<int64_t>(j) * dvp;
    load_row(p.v, vbase + (j0 + j) * p.v_stride_s, p.head_dim_v, p.dtype, dst);
    for (int c = p.head_dim_v; c < dvp; ++c) dst[c] = 0.0f;
  }
}

namespace {

template <int R>
void tile_impl(const TileJob& job) {
  const AsaParams& p = *job.p;
  const int bs = p.block_size;
  const int r0 = job.i * bs;
  const int nr = imin(bs, p.seq_q - r0);
  const int nr_pad = static_cast<int>(round_up(nr, R));
  const int dp = static_cast<int>(round_up(p.head_dim, kVec));
  const int dvp = static_cast<int>(round_up(p.head_dim_v, kVec));
  const Scratch sc = carve(job.scratch, dp, dvp);

  const int64_t qbase = job.n * p.q_stride_b + job.h * p.q_stride_h;
  for (int r = 0; r < nr; ++r) {
    float* qr = sc.q + r * dp;
    const int64_t off = qbase + (r0 + r) * p.q_stride_s;
    if (p.dtype == ASA_FLOAT32) {  // one pass: load and scale
      const float* src = static_cast<const float*>(p.q) + off;
      for (int d = 0; d < p.head_dim; ++d) qr[d] = src[d] * p.scale;
    } else {
      load_row(p.q, off, p.head_dim, p.dtype, qr);
      for (int d = 0; d < p.head_dim; ++d) qr[d] *= p.scale;
    }
  }
  for (int r = nr; r < nr_pad; ++r) memset(sc.q + r * dp, 0, sizeof(float) * dp);
  memset(sc.o, 0, sizeof(float) * nr_pad * dvp);
  for (int r = 0; r < nr; ++r) {
    sc.m[r] = kNegInf;
    sc.l[r] = 0.0f;
  }
  row_intervals(p, r0, nr, sc.lo, sc.hi);

  for (int t = 0; t < job.num_blocks; ++t) {
    const int j0 = job.blocks[t] * bs;
    if (j0 < 0 || j0 >= p.seq_kv) continue;
    const int nk = imin(bs, p.seq_kv - j0);
    const int nkp = static_cast<int>(round_up(nk, kVec));
    const float* kt = job.kt ? job.kt + static_cast<int64_t>(job.blocks[t]) * p.head_dim * bs
                             : nullptr;
    // Keys past the last row's horizon (causal diagonal) are neither scored nor summed; the
    // element mask turns whatever their score slots hold into -inf.
    int lim[kMaxBlock / R + 1];
    for (int g = 0; g * R < nr; ++g) {
      int far = 0;
      for (int r = g * R; r < imin(nr, (g + 1) * R); ++r) far = imax(far, sc.hi[r] - j0);
      lim[g] = imax(0, imin(nk, far));
    }
    if (job.kt) {
      qk_block<R>(sc, kt, bs, nr_pad, lim, p.head_dim, dp);
    } else {
      int far = 0;
      for (int g = 0; g * R < nr; ++g) far = imax(far, lim[g]);
      qk_direct(sc, job.k + static_cast<int64_t>(j0) * job.k_ld, job.k_ld, nr, far, p.head_dim,
                dp);
    }
    transform_scores(p, job, sc, r0, nr, j0, nk, nkp);
    softmax_update(sc, nr, nr_pad, nkp, dvp);
    pv_block<R>(sc, job.v + j0 * job.v_ld, job.v_ld, nr_pad, lim, dvp);
  }

  const int64_t obase = job.n * p.o_stride_b + job.h * p.o_stride_h;
  for (int r = 0; r < nr; ++r) {
    float* orow = sc.o + r * dvp;
    // A row that saw no key keeps l = 0 and outputs zeros, never NaN.
    const float inv = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;
    if (p.dtype == ASA_FLOAT32) {  // one pass: normalise into the output row
      float* dst = static_cast<float*>(p.out) + obase + (r0 + r) * p.o_stride_s;
      for (int c = 0; c < p.head_dim_v; ++c) dst[c] = orow[c] * inv;
      continue;
    }
    for (int c = 0; c < p.head_dim_v; ++c) orow[c] *= inv;
    store_row(p.out, obase + (r0 + r) * p.o_stride_s, p.head_dim_v, p.dtype, orow);
  }
}

}  // namespace

void attention_tile(const TileJob& job) {
  // Tiles of a few rows (decode steps) use one-row steps instead of padding to ASA_ROWS.
  const int nr = imin(job.p->block_size, job.p->seq_q - job.i * job.p->block_size);
  if (ASA_ROWS > 1 && nr * 2 <= ASA_ROWS) {
    tile_impl<1>(job);
  } else {
    tile_impl<ASA_ROWS>(job);
  }
}

}  // namespace ASA_ISA_NS
}  // namespace cpu
}  // namespace asa
