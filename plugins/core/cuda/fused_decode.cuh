// The attention half of the fused decode step (BENCHMARKS.md "Next" (4), optimization step
// 52): route_decode_kernel (router.cu) instantiated with kAttend routes one list per thread-block
// cluster and then, in the same launch, attends the list's kept key blocks and merges the
// partial results through distributed shared memory. No list is read back from global memory
// and no attention or merge kernel runs.
//
// The K/V stream starts inside the router. Once a CTA has the logits of its own key blocks (about
// a fifth into the router), it bulk-copies the K and V rows of its likeliest own blocks (the
// forced ones first, then by the group's summed logits) into shared-memory slots while the
// router's later phases, which touch only shared memory, run. After the walk every CTA knows the
// whole list's kept blocks (exchanged in the router's last cluster barrier) and attends
//   - its speculated blocks that were kept (already in shared memory), then
//   - an even share of the kept blocks nobody speculated, loaded into the slots as they free up,
// so that every CTA attends about ceil(kept / C) blocks. Each CTA keeps, per query head of the
// list, a running maximum and sum (log2 domain) and a float32 accumulator; the heads' partials
// go to the CTA that owns the head (head % C), which combines them in rank order and writes the
// output row.
//
// Scope (decode_step_supported in router.cu): one query row (Sq = 1), fp16 / bf16, D = Dv in
// {64, 128}, contiguous K/V rows, no padding mask, bias, window or softcap, and a device that
// co-schedules the clusters with one CTA per multiprocessor. Device code for compute capability
// 9.0+ only (the caller guards it).
#ifndef ASA_CUDA_FUSED_DECODE_CUH_
#define ASA_CUDA_FUSED_DECODE_CUH_

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include "bulk_copy.cuh"
#include "common.cuh"

namespace asa {
namespace cuda {
namespace step {

constexpr int kThreads = 256;      // route_decode_kernel's CTA
constexpr int kHeadsMax = 8;       // query heads per list (the router's kRouteHeadsMax)
constexpr int kClusterMax = 16;
constexpr int kSlotsMax = 6;       // K/V slots per CTA (shared memory holds 3 of 128 x 128 bf16)
constexpr int kPvHeads = 2;        // heads per thread in P·V: cdiv(kHeadsMax, 256 / (Dv / 2))
constexpr uint8_t kKeptBit = 1, kSpecKeptBit = 2;  // StepState::kept

__host__ __device__ inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Shared memory of the step beside the router's own (which it reuses for the merge), in bytes.
// `items` bounds the blocks one CTA attends: its speculated ones plus its share of the rest.
struct StepSizes {
  int heads, D, Dv, block, nk, per, C, elem, nslots;
  __host__ __device__ int items() const { return per + kSlotsMax; }
  __host__ __device__ size_t merge_bytes() const {  // C partial rows per head a CTA combines
    return static_cast<size_t>(C) * ((heads + C - 1) / C) * (Dv + 2) * 4;
  }
  __host__ __device__ size_t state_bytes() const {
    return align_up(kSlotsMax * 8                  // mbarriers
                        + 3 * kHeadsMax * 4        // running max, sum, rescale per head
                        + heads * block * 4        // scores, then probabilities, of one block
                        + kSlotsMax * 4            // speculated block per slot
                        + 3 * items() * 4          // item blocks, slots | parity, issue points
                        + nk,                      // kept bits of every block of the list
                    128);
  }
  __host__ __device__ size_t slot_bytes() const {
    return align_up(static_cast<size_t>(block) * (D + Dv) * elem, 128);
  }
};

// Pointers into the step's state (carved in StepSizes::state_bytes' order).
struct StepState {
  uint64_t* bar;     // [kSlotsMax] one mbarrier per slot, one phase per copy into it
  float* m;          // [kHeadsMax] running maximum of the scores (log2 units)
  float* l;          // [kHeadsMax] running sum of exp2(score - m)
  float* corr;       // [kHeadsMax] rescale of the accumulators for the current block
  float* scores;     // [heads][block] (16-byte aligned: P·V reads four at a time)
  int* spec_block;   // [kSlotsMax] the key block speculated into each slot, -1 = none
  int* item_block;   // [items] key blocks this CTA attends, in order
  int* item_slot;    // [items] slot | parity << 8 of the copy that holds each item
  int* issue_after;  // [items] when its copy is issued: -2 speculated, -1 at the start, else
                     // after item issue_after[i] has freed the slot
  uint8_t* kept;     // [nk] kKeptBit | kSpecKeptBit of every key block of the list
  unsigned char* slots;
  size_t slot_bytes;
  int nslots;

  __device__ StepState(unsigned char* base, unsigned char* slot_base, const StepSizes& z) {
    bar = reinterpret_cast<uint64_t*>(base);
    m = reinterpret_cast<float*>(bar + kSlotsMax);  // 48 + 96 bytes: scores stay 16-aligned
    l = m + kHeadsMax;
    corr = l + kHeadsMax;
    scores = corr + kHeadsMax;
    spec_block = reinterpret_cast<int*>(scores + z.heads * z.block);
    item_block = spec_block + kSlotsMax;
    item_slot = item_block + z.items();
    issue_after = item_slot + z.items();
    kept = reinterpret_cast<uint8_t*>(issue_after + z.items());
    slots = slot_base;
    slot_bytes = z.slot_bytes();
    nslots = z.nslots;
  }
  __device__ uint32_t bar_addr(int s) const { return smem_addr(bar + s); }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// Thread 0: the slots' mbarriers and the speculation markers (before the CTA's first barrier).
__device__ inline void step_init(const StepState& st, int heads) {
  if (threadIdx.x != 0) return;
  for (int s = 0; s < kSlotsMax; ++s) {
    mbar_init(st.bar_addr(s), 1);
    st.spec_block[s] = -1;
  }
  for (int hr = 0; hr < heads; ++hr) {
    st.m[hr] = -INFINITY;
    st.l[hr] = 0.f;
  }
  mbar_init_fence();
}

// One thread: the K and V rows of key block k (the last block may be partial) into slot s.
template <typename T>
__device__ inline void load_block(const AsaParams& p, const StepState& st, int s, int n, int hkv,
                                  int k) {
  const int rows = min(p.block_size, p.seq_kv - k * p.block_size);
  const int64_t row0 = static_cast<int64_t>(k) * p.block_size;
  const T* ksrc = static_cast<const T*>(p.k) + n * p.k_stride_b + hkv * p.k_stride_h +
                  row0 * p.k_stride_s;
  const T* vsrc = static_cast<const T*>(p.v) + n * p.v_stride_b + hkv * p.v_stride_h +
                  row0 * p.v_stride_s;
  const uint32_t kb = rows * p.head_dim * sizeof(T), vb = rows * p.head_dim_v * sizeof(T);
  unsigned char* dst = st.slots + s * st.slot_bytes;
  const uint32_t bar = st.bar_addr(s);
  mbar_expect_tx(bar, kb + vb);
  bulk_copy_g2s(smem_addr(dst), ksrc, kb, bar);
  bulk_copy_g2s(smem_addr(dst + static_cast<size_t>(p.block_size) * p.head_dim * sizeof(T)),
                vsrc, vb, bar);
}

// One warp: picks up to nslots of the CTA's own blocks [k_begin, k_begin + cnt) and starts their
// copies. Visible forced blocks first (always kept), then visible blocks by the group's summed
// logits lg[hr · per + j] (the order the walk is likeliest to keep), ties to the lower block.
template <typename T>
__device__ inline void speculate(const AsaParams& p, const StepState& st, const float* lg,
                                 const uint8_t* flags, uint8_t visible_bit, uint8_t forced_bit,
                                 int heads, int per, int k_begin, int cnt, int n, int hkv) {
  const int lane = threadIdx.x % 32;
  for (int s = 0; s < st.nslots; ++s) {
    float best = -INFINITY;
    int best_j = -1;
    for (int j = lane; j < cnt; j += 32) {
      const uint8_t f = flags[k_begin + j];
      bool taken = !(f & visible_bit);
      for (int t = 0; t < s; ++t) taken |= st.spec_block[t] == k_begin + j;
      if (taken) continue;
      float score = INFINITY;
      if (!(f & forced_bit)) {
        score = 0.f;
        for (int hr = 0; hr < heads; ++hr) score += lg[hr * per + j];
      }
      if (best_j < 0 || score > best) {  // j ascends: ties keep the lower block
        best = score;
        best_j = j;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oj = __shfl_xor_sync(0xffffffffu, best_j, o);
      if (oj >= 0 && (best_j < 0 || ob > best || (ob == best && oj < best_j))) {
        best = ob;
        best_j = oj;
      }
    }
    if (best_j < 0) break;  // same in every lane
    if (lane == 0) {
      st.spec_block[s] = k_begin + best_j;
      load_block<T>(p, st, s, n, hkv, k_begin + best_j);
    }
    __syncwarp();  // the next round reads spec_block
  }
}

// Whether key block k was speculated into a slot of this CTA.
__device__ inline bool speculated(const StepState& st, int k) {
  bool hit = false;
  for (int s = 0; s < kSlotsMax; ++s) hit |= st.spec_block[s] == k;
  return hit;
}

// The CTA's work after the walk (every thread; part_spec[r] = kept blocks CTA r had speculated,
// kept = the list's count). Items: this CTA's speculated kept blocks in slot order, then its
// share of the others in ascending block order: with target = ceil(kept / C), CTA r takes
// max(0, target - part_spec[r]) of them, after those of the CTAs before it. Thread 0 then plans
// which slot each item's copy uses (a freed slot is reused in the order items finish) and starts
// the copies that have a free slot. Returns the number of items.
template <typename T>
__device__ inline int plan_items(const AsaParams& p, const StepState& st, const int* part_spec,
                                 int C, int rank, int kept, int nk, int n, int hkv) {
  const int tid = threadIdx.x;
  const int target = (kept + C - 1) / C;
  int lo = 0, spec_all = 0;
  for (int r = 0; r < C; ++r) {
    lo += r < rank ? max(0, target - part_spec[r]) : 0;
    spec_all += part_spec[r];
  }
  const int rest = kept - spec_all;
  const int own_spec = part_spec[rank];
  const int hi = min(lo + max(0, target - own_spec), rest);
  lo = min(lo, rest);
  // Ordinal of each unspeculated kept block: a count per thread over a contiguous chunk, then an
  // exclusive scan over the CTA.
  const int chunk = (nk + kThreads - 1) / kThreads;
  const int k0 = min(tid * chunk, nk), k1 = min(k0 + chunk, nk);
  int mine = 0;
  for (int k = k0; k < k1; ++k) mine += st.kept[k] == kKeptBit;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  int ord = 0;
  Scan(scan_tmp).ExclusiveSum(mine, ord);
  for (int k = k0; k < k1; ++k) {
    if (st.kept[k] != kKeptBit) continue;
    if (ord >= lo && ord < hi) st.item_block[own_spec + ord - lo] = k;
    ++ord;
  }
  const int items = own_spec + (hi - lo);
  __syncthreads();  // thread 0 reads the rest items' blocks
  if (tid == 0) {
    // Speculated kept blocks are items [0, own_spec), each in its slot with the copy of parity 0.
    int uses[kSlotsMax], queue[kSlotsMax], queued = 0, waste = 0, s_item = 0;
    for (int s = 0; s < kSlotsMax; ++s) {
      const int k = st.spec_block[s];
      uses[s] = k >= 0 ? 1 : 0;
      if (s >= st.nslots) continue;
      if (k >= 0 && (st.kept[k] & kSpecKeptBit)) {
        st.item_block[s_item] = k;
        st.item_slot[s_item] = s;
        st.issue_after[s_item++] = -2;
      } else {
        queue[queued++] = s;  // never used, or a speculation the walk did not keep
        waste |= k >= 0 ? 1 << s : 0;
      }
    }
    int head = 0, recycled = 0;
    for (int i = own_spec; i < items; ++i) {
      int s;
      if (head < queued) {
        s = queue[head++];
        st.issue_after[i] = -1;
      } else {
        s = st.item_slot[recycled] & 0xff;
        st.issue_after[i] = recycled++;
      }
      st.item_slot[i] = s | ((uses[s] & 1) << 8);
      ++uses[s];
    }
    // Copies with a free slot start now; a slot that holds an unkept speculation is refilled only
    // once that copy has landed (long since: it was issued before the walk).
    for (int i = own_spec; i < items && st.issue_after[i] == -1; ++i) {
      const int s = st.item_slot[i] & 0xff;
      if (waste & (1 << s)) mbar_wait(st.bar_addr(s), 0);
      waste &= ~(1 << s);
      load_block<T>(p, st, s, n, hkv, st.item_block[i]);
    }
    // Unkept speculations whose slot is not refilled must land before the CTA reuses or frees
    // its shared memory.
    for (int s = 0; s < kSlotsMax; ++s) {
      if (waste & (1 << s)) mbar_wait(st.bar_addr(s), 0);
    }
  }
  __syncthreads();
  return items;
}

// Two consecutive elements of a 16-bit type as float2.
template <typename T>
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits);
template <>
__device__ __forceinline__ float2 pair_to_float2<__half>(uint32_t bits) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}
template <>
__device__ __forceinline__ float2 pair_to_float2<__nv_bfloat16>(uint32_t bits) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

// Attends the items in order (every thread). q (one row per head, float32: the router's q̄ of a
// one-row query block is that row exactly) is qs[hr · D + d]. Scores: L = D / 8 lanes per key,
// each with 8 columns (one 16-byte shared load), summed over the L lanes by shuffles. Softmax:
// warp hr updates head hr's running max and sum and turns the block's scores into
// probabilities. P·V: thread t owns columns 2 (t % (Dv / 2)) + {0, 1} of heads t / (Dv / 2) +
// a · 256 / (Dv / 2). acc[a] returns the unnormalized output (scaled to st.m).
template <typename T>
__device__ inline void attend_items(const AsaParams& p, const StepState& st, const float* qs,
                                    int items, int heads, int n, int hkv, float2 (&acc)[kPvHeads]) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int D = p.head_dim, Dv = p.head_dim_v, bs = p.block_size;
  const int L = D / 8, keys_per_warp = 32 / L, c = lane % L;
  const float scale_log2 = p.scale * 1.4426950408889634f;
  // This lane's 8 columns of q for every head, in registers for the whole loop.
  float qr[kHeadsMax][8];
#pragma unroll
  for (int hr = 0; hr < kHeadsMax; ++hr) {
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[hr][e] = hr < heads ? qs[hr * D + c * 8 + e] : 0.f;
  }
  const int pairs = Dv / 2, cp = tid % pairs, slice = tid / pairs, slices = kThreads / pairs;
#pragma unroll
  for (int a = 0; a < kPvHeads; ++a) acc[a] = make_float2(0.f, 0.f);

  for (int i = 0; i < items; ++i) {
    const int s = st.item_slot[i] & 0xff, parity = st.item_slot[i] >> 8;
    const int k = st.item_block[i];
    const int rows = min(bs, p.seq_kv - k * bs);
    const unsigned char* slot = st.slots + s * st.slot_bytes;
    const uint4* kt = reinterpret_cast<const uint4*>(slot);
    const uint32_t* vt = reinterpret_cast<const uint32_t*>(slot + static_cast<size_t>(bs) * D *
                                                                      sizeof(T));
    mbar_wait(st.bar_addr(s), parity);

    for (int r0 = warp * keys_per_warp; r0 < rows; r0 += (kThreads / 32) * keys_per_warp) {
      const int r = r0 + lane / L;
      const uint4 raw = r < rows ? kt[r * L + c] : make_uint4(0, 0, 0, 0);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      float x[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = pair_to_float2<T>(w[e]);
        x[2 * e] = f.x;
        x[2 * e + 1] = f.y;
      }
#pragma unroll
      for (int hr = 0; hr < kHeadsMax; ++hr) {
        if (hr >= heads) continue;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += x[e] * qr[hr][e];
        for (int o = 1; o < L; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (c == 0 && r < rows) st.scores[hr * bs + r] = dot * scale_log2;
      }
    }
    __syncthreads();
    if (warp < heads) {
      float* sc = st.scores + warp * bs;
      float mx = -INFINITY;
      for (int r = lane; r < rows; r += 32) mx = fmaxf(mx, sc[r]);
      mx = warp_max(mx);
      const float m_old = st.m[warp], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int r = lane; r < rows; r += 32) {
        const float e = exp2f(sc[r] - m_new);
        sc[r] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float corr = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
        st.corr[warp] = corr;
        st.l[warp] = st.l[warp] * corr + sum;
        st.m[warp] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < kPvHeads; ++a) {
      const int hr = slice + a * slices;
      if (hr >= heads) continue;
      const float corr = st.corr[hr];
      const float* pr = st.scores + hr * bs;
      float2 o = make_float2(acc[a].x * corr, acc[a].y * corr);
      int r = 0;
      for (; r + 4 <= rows; r += 4) {
        const float4 p4 = *reinterpret_cast<const float4*>(pr + r);
        const float pv[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float2 v = pair_to_float2<T>(vt[(r + u) * pairs + cp]);
          o.x += pv[u] * v.x;
          o.y += pv[u] * v.y;
        }
      }
      for (; r < rows; ++r) {
        const float2 v = pair_to_float2<T>(vt[r * pairs + cp]);
        o.x += pr[r] * v.x;
        o.y += pr[r] * v.y;
      }
      acc[a] = o;
    }
    __syncthreads();  // the slot and the scores are free
    if (tid == 0) {
      for (int j = i + 1; j < items; ++j) {
        if (st.issue_after[j] == i) {
          load_block<T>(p, st, st.item_slot[j] & 0xff, n, hkv, st.item_block[j]);
        }
      }
    }
  }
}

// The cluster merge (every thread of every CTA). Head hr's partials go to CTA hr % C, row
// (hr / C) · C + rank of its merge area (Dv accumulator columns, then m and l); after a cluster
// barrier that CTA combines the C rows in rank order and writes the output row of head
// h_first + hr. The caller arrived on the cluster barrier once its merge area (the router's
// shared memory past the q̄ rows) was free; the wait here, before the first remote write, holds
// every CTA until all have.
template <typename T>
__device__ inline void merge_heads(const AsaParams& p, const StepState& st, float* merge,
                                   const float2 (&acc)[kPvHeads], int heads, int C, int rank,
                                   int n, int h_first) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x, Dv = p.head_dim_v, row_len = Dv + 2;
  const int pairs = Dv / 2, cp = tid % pairs, slice = tid / pairs, slices = kThreads / pairs;
  __syncwarp();  // thread 0 may come from the refills of attend_items' last item
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#pragma unroll
  for (int a = 0; a < kPvHeads; ++a) {
    const int hr = slice + a * slices;
    if (hr >= heads) continue;
    float* row = merge + static_cast<size_t>((hr / C) * C + rank) * row_len;
    float2* dst = cluster.map_shared_rank(reinterpret_cast<float2*>(row), hr % C);
    dst[cp] = acc[a];
    if (cp == 0) dst[pairs] = make_float2(st.m[hr], st.l[hr]);
  }
  cluster.sync();  // the last access to another CTA's shared memory is before this barrier
  for (int hr = rank; hr < heads; hr += C) {
    const float* rows = merge + static_cast<size_t>((hr / C) * C) * row_len;
    float mx = -INFINITY;
    for (int r = 0; r < C; ++r) mx = fmaxf(mx, rows[r * row_len + Dv]);
    float l = 0.f;
    for (int r = 0; r < C; ++r) {
      const float m_r = rows[r * row_len + Dv];
      if (m_r != -INFINITY) l += rows[r * row_len + Dv + 1] * exp2f(m_r - mx);
    }
    T* out = static_cast<T*>(p.out) + n * p.o_stride_b + (h_first + hr) * p.o_stride_h;
    for (int d = tid; d < Dv; d += kThreads) {
      float o = 0.f;
      for (int r = 0; r < C; ++r) {
        const float m_r = rows[r * row_len + Dv];
        if (m_r != -INFINITY) o += rows[r * row_len + d] * exp2f(m_r - mx);
      }
      out[d] = from_float<T>(l > 0.f ? o / l : 0.f);
    }
  }
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace step
}  // namespace cuda
}  // namespace asa

#endif  // ASA_CUDA_FUSED_DECODE_CUH_
