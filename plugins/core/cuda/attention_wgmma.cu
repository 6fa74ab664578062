// Block-sparse flash attention forward for Hopper (sm_90a): TMA loads and wgmma tensor-core
// instructions with operands in 128-byte-swizzled shared memory, SPEC.md "Attention". The fast
// path only: fp16/bf16, D = Dv in {64, 128}, block_size 128, prefill (Sq > 16), no key padding
// mask, bias or softcap; attention_mma.cu's kernels handle everything else (and every
// non-Hopper GPU).
//
// One CTA = the 128 query rows of one router query block of one (batch, query head), 3
// warpgroups (FA3 layout): a producer (one thread issuing cp.async.bulk.tensor copies of Q and
// of each kept K/V block into a 3-stage ring, mbarrier-tracked) and two consumers of 64 rows
// each, which walk the same kept-block list (ws.block_indices), one 128-key tile per block:
//   S = Q K^T     wgmma m64n128k16, A = Q and B = K both K-major in shared memory
//   online softmax on the S accumulators in registers (log2 domain, exp2)
//   O += P V      wgmma m64nDk16, A = P from registers, B = V "N-major" (transposed) in smem
// Raw PTX rather than CuTe/CUTLASS: no third-party headers to fetch at build time (the GPU
// machine has no network), and the kernel needs two descriptor shapes and four PTX idioms.
//
// Shared-memory layout of a [128 rows][D] tile: D / 64 "atoms" of [128 rows][64 elements] (128
// bytes a row), each one TMA box; 16-byte chunk c of row r sits at chunk (c ^ (r % 8)) of that
// row (CU_TENSOR_MAP_SWIZZLE_128B = the 128B swizzle wgmma expects; atoms 1024-byte aligned).
// Descriptors (PTX ISA "Matrix Descriptor"): K-major operand: SBO = 1024 (8 rows), one k16
// step = +32 bytes inside the atom, the next 64 columns = the next atom. V as N-major B
// operand: LBO = 16384 (next 64 columns = next atom), SBO = 1024 (next 8 keys), one k16 step
// (16 keys) = +2048 bytes.
#include "bulk_copy.cuh"
#include "common.cuh"
#include "kernels.h"

#include <cuda.h>  // CUtensorMap (types only; the encoder comes from the runtime)
#include <stdlib.h>

#include <type_traits>

namespace asa {
namespace cuda {
namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ASA_WGMMA_DEVICE 1
#endif

constexpr int kRows = 128;     // query rows per CTA (= the router block)
constexpr int kKeys = 128;     // keys per tile (= the router block)
constexpr int kAtomBytes = kRows * 128;  // one [128][64] 16-bit atom
constexpr float kLog2e = 1.4426950408889634f;

// wgmma operand lists (64 or 32 fp32 accumulators per thread; generated, one operand per
// accumulator). SS: A and B descriptors, both K-major; RS: A from four 32-bit registers, B
// descriptor transposed (N-major). scale_d = 0 overwrites D.
#ifdef ASA_WGMMA_DEVICE
#define ASA_WGMMA_RS_64(TYPES) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16." TYPES " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))

#define ASA_WGMMA_SS_128(TYPES) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16." TYPES " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(da), "l"(db), "r"(scale_d))

#define ASA_WGMMA_RS_128(TYPES) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16." TYPES " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))
#endif

template <typename T>
struct Types;
template <>
struct Types<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct Types<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

#ifdef ASA_WGMMA_DEVICE
// S (64 x 128) += A (64 x 16) * B (16 x 128)^T, both operands K-major in shared memory.
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128(float* d, uint64_t da, uint64_t db, int scale_d) {
  if constexpr (std::is_same<T, __half>::value) {
    ASA_WGMMA_SS_128("f32.f16.f16");
  } else {
    ASA_WGMMA_SS_128("f32.bf16.bf16");
  }
}

// O (64 x N) += P (64 x 16, registers) * V (16 x N), V N-major in shared memory.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t* a, uint64_t db, int scale_d) {
  if constexpr (N == 128) {
    if constexpr (std::is_same<T, __half>::value) {
      ASA_WGMMA_RS_128("f32.f16.f16");
    } else {
      ASA_WGMMA_RS_128("f32.bf16.bf16");
    }
  } else {
    if constexpr (std::is_same<T, __half>::value) {
      ASA_WGMMA_RS_64("f32.f16.f16");
    } else {
      ASA_WGMMA_RS_64("f32.bf16.bf16");
    }
  }
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from touching accumulators before the wgmma that writes them completed.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
#endif  // ASA_WGMMA_DEVICE

// 128B-swizzle matrix descriptor (layout type 1 in bits 62-63).
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = (saddr & 0x3FFFF) >> 4;
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= 1ull << 62;
  return d;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

enum TileKind { kFull = 1, kPartial = 2 };

// Classifies key tile [j0, j0 + 128) for query positions [pos_lo, pos_hi]: kFull when every row
// sees every key (no per-element mask), else kPartial. Blocks no row sees are not skipped: they
// only come from caller-made lists, and masking them fully gives the same (zero) contribution
// while producer and consumers walk the list in lockstep without shared bookkeeping.
__device__ __forceinline__ int classify(const AsaParams& p, int j0, int pos_lo, int pos_hi) {
  const int j1 = j0 + kKeys - 1;
  if (j1 >= p.seq_kv) return kPartial;
  if (p.causal && j1 > pos_lo) return kPartial;
  if (p.window > 0) {
    if (j0 <= pos_hi - p.window) return kPartial;
    if (!p.causal && j1 >= pos_lo + p.window) return kPartial;
  }
  return kFull;
}

#ifdef ASA_WGMMA_DEVICE
// Bulk-tensor copy (TMA), PTX ISA "cp.async.bulk.tensor"; the mbarrier helpers are in
// bulk_copy.cuh.
// Named barrier `id` over the two consumer warpgroups (256 threads): wait, or only arrive.
__device__ __forceinline__ void named_sync(int id) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void named_arrive(int id) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}
// One [128 rows][64 columns] box of a 4-D tensor map (D, S, H, B) into a swizzled atom.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int row,
                                         int head, int batch, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(row), "r"(head), "r"(batch), "r"(bar)
      : "memory");
}
#endif  // ASA_WGMMA_DEVICE


#ifdef ASA_WGMMA_DEVICE
// S = Q K^T for one 128-key tile: Q rows of this warpgroup at `qa`, K at `kt` (both K-major).
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float* s, uint32_t qa, uint32_t kt) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = (kk / 4) * kAtomBytes + (kk % 4) * 32;
    wgmma_ss_n128<T>(s, make_desc(qa + koff, 16, 1024), make_desc(kt + koff, 16, 1024), kk > 0);
  }
  wgmma_commit();
}

// P (fp32 probabilities in S accumulator order) to the A-operand registers of the P V wgmma.
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (*pa)[4], const float* s) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) pa[kk][e] = Types<T>::pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
  }
}

// O += P V for one 128-key tile: P (this warpgroup's 64 rows) from registers, V N-major at `vt`.
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float* o, const uint32_t (*pa)[4], uint32_t vt) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    wgmma_rs<T, D>(o, pa[kk], make_desc(vt + kk * 2048, kAtomBytes, 1024), 1);
  }
  wgmma_commit();
}

// Online softmax of one S tile held as wgmma accumulators (rows r0 and r0 + 8 of this thread,
// columns j0 + 8 i + 2 tq + {0, 1}): mask partial tiles, update the running max m (log2
// domain) and sum l, leave P = 2^(s * scale_log2 - m) in s and the O rescale factors in alpha.
// The scale is folded into the exponent's FMA (the max of raw scores, scaled once, is the max
// of the scaled ones because the dispatch requires scale > 0).
__device__ __forceinline__ void softmax_tile(const AsaParams& p, float* s, float* m, float* l,
                                             float* alpha, int kind, int r0, int j0, int tq,
                                             int shift, float scale_log2) {
  if (kind != kFull) {
#pragma unroll
    for (int i = 0; i < kKeys / 2; ++i) {
      const int r = r0 + ((i & 2) ? 8 : 0);
      const int j = j0 + (i / 4) * 8 + 2 * tq + (i & 1);
      const bool vis = r < p.seq_q && j < p.seq_kv && position_visible(p, r + shift, j);
      if (!vis) s[i] = -INFINITY;
    }
  }
  // A row lives in the 4 threads of a quad.
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < kKeys / 8; ++i) {
    mx[0] = fmaxf(mx[0], fmaxf(s[4 * i], s[4 * i + 1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[4 * i + 2], s[4 * i + 3]));
  }
  float mu[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
    mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
    mx[rr] = fmaxf(m[rr], mx[rr] * scale_log2);
    alpha[rr] = m[rr] == -INFINITY ? 0.f : fast_exp2(m[rr] - mx[rr]);
    mu[rr] = mx[rr] == -INFINITY ? 0.f : mx[rr];
    m[rr] = mx[rr];
  }
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kKeys / 2; ++i) {
    s[i] = fast_exp2(fmaf(s[i], scale_log2, -mu[(i >> 1) & 1]));
    rs[(i >> 1) & 1] += s[i];
  }
  l[0] = l[0] * alpha[0] + rs[0];
  l[1] = l[1] * alpha[1] + rs[1];
}
#endif  // ASA_WGMMA_DEVICE

constexpr int kStages = 3;  // K/V ring depth (D = 128: Q 32 KB + 3 x 64 KB = 224 KB)

// Tensor maps of Q, K and V (4-D: D, S, H, B; 128-row x 64-column boxes, 128B swizzle).
struct Maps {
  CUtensorMap q, k, v;
};

// Warp-specialized CTA of 3 warpgroups: warpgroup 0 is the producer (one thread issues the TMA
// loads of Q and of each kept K/V tile into a kStages-deep ring, gated by "empty" mbarriers),
// warpgroups 1 and 2 are consumers of 64 query rows each (wait on the "full" mbarriers, wgmma,
// softmax, wgmma, then release the stage). setmaxnreg moves registers from the producer (24)
// to the consumers (240), which hold S and O accumulators (128 fp32) plus P.
template <typename T, int D>
__global__ void __launch_bounds__(384, 1)
    attn_wgmma_kernel(AsaParams p, Workspace ws, const __grid_constant__ Maps maps) {
#ifdef ASA_WGMMA_DEVICE
  constexpr int kTileBytes = (D / 64) * kAtomBytes;
  extern __shared__ unsigned char smem_raw[];
  // mbarriers: q_full, k_full[kStages], v_full[kStages], empty[kStages].
  __shared__ __align__(8) uint64_t bars[1 + 3 * kStages];
  // 1024-byte alignment for the 128B swizzle (the launch asks for 1 KB of slack).
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sq = base;
  const uint32_t sk = sq + kTileBytes;             // [kStages]
  const uint32_t sv = sk + kStages * kTileBytes;  // [kStages]
  const uint32_t bar0 = smem_addr(bars);
  const uint32_t q_full = bar0;
  auto k_full = [&](int st) { return bar0 + 8 * (1 + st); };
  auto v_full = [&](int st) { return bar0 + 8 * (1 + kStages + st); };
  auto empty = [&](int st) { return bar0 + 8 * (1 + 2 * kStages + st); };

  // Heaviest causal query blocks first: the tail of the grid is made of short CTAs.
  const int qb = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, n = blockIdx.z;
  const int wg = threadIdx.x / 128;
  const int G = p.heads_q / p.heads_kv;
  const int hkv = h / G;
  const int q0 = qb * kRows;
  const int nq = cdiv(p.seq_q, kRows), nk = cdiv(p.seq_kv, kKeys);
  const int hsel = p.select_per ? hkv : h;
  const int hsel_count = p.select_per ? p.heads_kv : p.heads_q;
  const int64_t row = (static_cast<int64_t>(n) * hsel_count + hsel) * nq + qb;
  const int count = ws.block_counts[row];
  const int32_t* list = ws.block_indices + row * nk;
  const int shift = p.seq_kv - p.seq_q;
  const int pos_lo = q0 + shift, pos_hi = min(q0 + kRows, p.seq_q) - 1 + shift;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(k_full(st), 1);
      mbar_init(v_full(st), 1);
      mbar_init(empty(st), 8);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      int st = 0;
      uint32_t phase = 0;
      // Q only when there is a tile: the consumers wait for it only then, and no copy may be
      // in flight when the CTA exits.
      if (count > 0) {
        mbar_expect_tx(q_full, kTileBytes);
#pragma unroll
        for (int a = 0; a < D / 64; ++a) {
          tma_load(sq + a * kAtomBytes, &maps.q, a * 64, q0, h, n, q_full);
        }
      }
      for (int t = 0; t < count; ++t) {
        const int j0 = list[t] * kKeys;
        mbar_wait(empty(st), phase ^ 1);  // a fresh barrier's "previous phase" is complete
        mbar_expect_tx(k_full(st), kTileBytes);
#pragma unroll
        for (int a = 0; a < D / 64; ++a) {
          tma_load(sk + st * kTileBytes + a * kAtomBytes, &maps.k, a * 64, j0, hkv, n, k_full(st));
        }
        mbar_expect_tx(v_full(st), kTileBytes);
#pragma unroll
        for (int a = 0; a < D / 64; ++a) {
          tma_load(sv + st * kTileBytes + a * kAtomBytes, &maps.v, a * 64, j0, hkv, n, v_full(st));
        }
        if (++st == kStages) {
          st = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int cw = wg - 1;  // consumer warpgroup: rows [64 cw, 64 cw + 64)
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int rho0 = cw * 64 + warp * 16 + g;  // rows of this thread: rho0 (e < 2), rho0 + 8
  float o[D / 2];                             // D / 8 column groups x 4
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  // Software pipeline (FA3 "intra-warpgroup overlap"): iteration t issues S_t = Q K_t^T and
  // O += P_{t-1} V_{t-1} back to back, then runs the softmax of S_t while the tensor cores do
  // P_{t-1} V_{t-1}; O is rescaled once that product is done.
  // Ping-pong between the two consumers (named barriers 1 and 2): each issues its wgmmas
  // only after the other issued its own, so one warpgroup's softmax runs while the other's
  // products occupy the tensor cores.
  const int my_turn = 1 + cw, other_turn = 2 - cw;
  float s[kKeys / 2];
  uint32_t pa[kKeys / 16][4];
  float alpha[2];
  // List entries are read one tile ahead into a register (the load's latency hides behind a
  // whole iteration).
  int next_block = count > 1 ? list[1] : 0;
  const bool any = count > 0;
  if (any) {
    // Prologue: S_0 and its softmax.
    const int j0 = list[0] * kKeys;
    mbar_wait(q_full, 0);
    mbar_wait(k_full(0), 0);
    issue_qk<T, D>(s, sq + cw * 64 * 128, sk);
    wgmma_wait<0>();
    fence_regs<kKeys / 2>(s);
    softmax_tile(p, s, m, l, alpha, classify(p, j0, pos_lo, pos_hi), q0 + rho0, j0, tq, shift,
                 scale_log2);
    pack_p<T>(pa, s);
  }
  int st = 1, prev_st = 0;
  uint32_t phase = 0, prev_phase = 0;
  if (cw == 1) named_arrive(1);  // the first consumer goes first
  for (int t = 1; t < count; ++t) {
    const int j0 = next_block * kKeys;
    next_block = t + 1 < count ? list[t + 1] : 0;
    mbar_wait(k_full(st), phase);
    mbar_wait(v_full(prev_st), prev_phase);
    named_sync(my_turn);
    issue_qk<T, D>(s, sq + cw * 64 * 128, sk + st * kTileBytes);
    issue_pv<T, D>(o, pa, sv + prev_st * kTileBytes);
    named_arrive(other_turn);
    wgmma_wait<1>();
    fence_regs<kKeys / 2>(s);
    softmax_tile(p, s, m, l, alpha, classify(p, j0, pos_lo, pos_hi), q0 + rho0, j0, tq, shift,
                 scale_log2);
    wgmma_wait<0>();
    fence_regs<D / 2>(o);
    if (lane == 0) mbar_arrive(empty(prev_st));  // this warp is done with that stage
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
    pack_p<T>(pa, s);
    prev_st = st;
    prev_phase = phase;
    if (++st == kStages) {
      st = 0;
      phase ^= 1;
    }
  }
  if (cw == 0) named_sync(1);  // takes the second consumer's last arrival
  if (any) {  // epilogue: the last tile's P V
    mbar_wait(v_full(prev_st), prev_phase);
    issue_pv<T, D>(o, pa, sv + prev_st * kTileBytes);
    wgmma_wait<0>();
    fence_regs<D / 2>(o);
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lsum = l[rr];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    const int r = q0 + rho0 + rr * 8;
    if (r >= p.seq_q) continue;
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    T* out = static_cast<T*>(p.out) + n * p.o_stride_b + h * p.o_stride_h + r * p.o_stride_s;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const uint32_t v = Types<T>::pack(o[4 * i + 2 * rr] * inv, o[4 * i + 2 * rr + 1] * inv);
      *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * tq) = v;
    }
  }
#endif  // ASA_WGMMA_DEVICE
}

template <typename T, int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(1 + 2 * kStages) * (D / 64) * kAtomBytes + 1024;  // + alignment
}

// Whether the wgmma kernel's sm_90a machine code is in the library and runs on this device
// (an sm_80 build running on a Hopper GPU has only an empty body).
template <typename T, int D>
bool kernel_runs_here() {
  static int state = -1;  // per template instance; device properties do not change
  if (state < 0) {
    cudaFuncAttributes attr{};
    int device = 0, major = 0;
    const bool ok = cudaGetDevice(&device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
                        cudaSuccess &&
                    cudaFuncGetAttributes(&attr, attn_wgmma_kernel<T, D>) == cudaSuccess;
    cudaGetLastError();  // a failed query must not leak into the caller's error check
    state = ok && major == 9 && attr.binaryVersion == 90 ? 1 : 0;
  }
  return state == 1;
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
EncodeTiled encode_fn() {
  static EncodeTiled fn = nullptr;
  static bool tried = false;
  if (!tried) {
    tried = true;
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult res{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                         cudaEnableDefault, &res) == cudaSuccess &&
        res == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<EncodeTiled>(ptr);
    }
    cudaGetLastError();
  }
  return fn;
}

// 4-D map (D, S, H, B) of a [B, H, S, D] tensor with element strides (b, h, s), unit stride
// in D, 128-row x 64-column boxes with the 128B swizzle; rows past S read as zeros.
bool make_map(CUtensorMap* map, AsaDType dtype, const void* ptr, int d, int s, int heads,
              int batch, int64_t sb, int64_t sh, int64_t ss) {
  const EncodeTiled fn = encode_fn();
  if (fn == nullptr) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(s),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(ss) * 2, static_cast<cuuint64_t>(sh) * 2,
                                 static_cast<cuuint64_t>(sb) * 2};
  const cuuint32_t box[4] = {64, 128, 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = dtype == ASA_FLOAT16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                        : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return fn(map, type, 4, const_cast<void*>(ptr), dims, strides, box, unit,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

bool make_maps(const AsaParams& p, Maps* maps) {
  return make_map(&maps->q, p.dtype, p.q, p.head_dim, p.seq_q, p.heads_q, p.batch, p.q_stride_b,
                  p.q_stride_h, p.q_stride_s) &&
         make_map(&maps->k, p.dtype, p.k, p.head_dim, p.seq_kv, p.heads_kv, p.batch,
                  p.k_stride_b, p.k_stride_h, p.k_stride_s) &&
         make_map(&maps->v, p.dtype, p.v, p.head_dim_v, p.seq_kv, p.heads_kv, p.batch,
                  p.v_stride_b, p.v_stride_h, p.v_stride_s);
}

template <typename T, int D>
cudaError_t launch(const AsaParams& p, const Workspace& ws, const Maps& maps,
                   cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<T, D>();
  cudaError_t err = cudaFuncSetAttribute(attn_wgmma_kernel<T, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(cdiv(p.seq_q, kRows), p.heads_q, p.batch);
  attn_wgmma_kernel<T, D><<<grid, 384, smem, stream>>>(p, ws, maps);
  return cudaGetLastError();
}

template <typename T>
bool runs_here(int head_dim) {
  return head_dim == 64 ? kernel_runs_here<T, 64>() : kernel_runs_here<T, 128>();
}

}  // namespace

bool wgmma_path_supported(const AsaParams& p, const Workspace& ws) {
  // ASA_CUDA_WGMMA=0 forces the mma.sync kernels (tests compare both paths).
  const char* env = getenv("ASA_CUDA_WGMMA");
  if (env != nullptr && env[0] == '0') return false;
  if (!mma_path_supported(p)) return false;  // dtype, D = Dv in {64, 128}, 16-byte rows
  if (p.block_size != kKeys || p.seq_q <= 16 || ws.splits != 1) return false;
  if (p.mask_dtype != ASA_MASK_NONE || p.bias != nullptr || p.softcap > 0.f) return false;
  if (!(p.scale > 0.f)) return false;  // the softmax folds the scale into its max
  // 32-bit output stores of column pairs.
  if ((reinterpret_cast<uintptr_t>(p.out) & 3) != 0 || p.o_stride_b % 2 != 0 ||
      p.o_stride_h % 2 != 0 || p.o_stride_s % 2 != 0) {
    return false;
  }
  return p.dtype == ASA_FLOAT16 ? runs_here<__half>(p.head_dim)
                                : runs_here<__nv_bfloat16>(p.head_dim);
}

cudaError_t launch_wgmma(const AsaParams& p, const Workspace& ws, cudaStream_t stream) {
  Maps maps;
  // Tensor maps the driver rejects (unusual strides): the mma.sync kernel instead.
  if (!make_maps(p, &maps)) return launch_mma_kernels(p, ws, stream);
  if (p.dtype == ASA_FLOAT16) {
    return p.head_dim == 64 ? launch<__half, 64>(p, ws, maps, stream)
                            : launch<__half, 128>(p, ws, maps, stream);
  }
  return p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, ws, maps, stream)
                          : launch<__nv_bfloat16, 128>(p, ws, maps, stream);
}

}  // namespace cuda
}  // namespace asa
