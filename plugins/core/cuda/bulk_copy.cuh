// mbarrier and bulk-copy primitives of compute capability 9.0 (PTX ISA "mbarrier",
// "cp.async.bulk"), shared by the wgmma attention kernel and the fused decode step. Every
// function takes a shared-memory address as a 32-bit shared-window address (smem_addr).
// Except smem_addr, device code for compute capability 9.0+ only: callers guard their use with
// __CUDA_ARCH__.
#ifndef ASA_CUDA_BULK_COPY_CUH_
#define ASA_CUDA_BULK_COPY_CUH_

#include <stdint.h>

namespace asa {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the CTA's mbarrier initializations visible to the async proxy (the copies that signal
// them) and to the cluster; the CTA still needs a barrier before other threads wait on them.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrives once and adds `bytes` to the transaction count the current phase waits for.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Returns once the phase with this parity has completed (a fresh barrier is in phase 0).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory into this
// CTA's shared memory; completion is counted as transactions on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
#endif

}  // namespace cuda
}  // namespace asa

#endif  // ASA_CUDA_BULK_COPY_CUH_
