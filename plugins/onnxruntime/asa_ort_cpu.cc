// AdaptiveSparseAttention for ONNX Runtime's CPU execution provider: validate, fill AsaParams,
// call the CPU kernel core on ONNX Runtime's intra-op thread pool.
#include "asa_ort_cpu.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "asa/asa_cpu.h"
#include "asa_cpu_ext.h"

namespace asa {
namespace ort {
namespace {

// AsaParallelFor over the kernel context's intra-op pool (sequential when the session has one
// thread).
void ort_parallel_for(void* pool, size_t total, void (*fn)(void*, size_t), void* user) {
  auto* ctx = static_cast<const OrtKernelContext*>(pool);
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, fn, total, 0, user));
}

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// ASA_CPU_PROFILE=1: the adapter's own share of a call (validation and output allocation) on
// stderr, next to the kernel core's phase line.
bool profiling() {
  const char* e = std::getenv("ASA_CPU_PROFILE");
  return e && e[0] && std::strcmp(e, "0") != 0;
}

}  // namespace

CpuKernel::CpuKernel(const OrtApi& api, const OrtKernelInfo* info)
    : attrs_(read_attributes(api, info)) {}

OrtStatusPtr CpuKernel::ComputeV2(OrtKernelContext* context) {
  return guarded([&]() -> OrtStatusPtr {
    const bool prof = profiling();
    const double t0 = prof ? now_ms() : 0.0;
    Ort::KernelContext ctx(context);
    AsaParams params;
    Scratch scratch;
    if (!prepare(attrs_, ctx, params, &scratch)) return nullptr;
    const double t1 = prof ? now_ms() : 0.0;
    const int rc = asa_cpu_forward_with(&params, ort_parallel_for, context);
    if (prof)
      std::fprintf(stderr, "asa_ort profile prepare=%.2f compute=%.2f ms\n", t1 - t0,
                   now_ms() - t1);
    if (rc != ASA_OK) {
      const std::string text = "asa::AdaptiveSparseAttention node '" + attrs_.node_name +
                               "': CPU kernel failed: " + asa_last_error();
      return to_status(text, rc == ASA_ERR_INVALID_ARGUMENT ? ORT_INVALID_ARGUMENT : ORT_FAIL);
    }
    return nullptr;
  });
}

OrtStatusPtr CpuOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                                   void** kernel) const {
  return guarded([&]() -> OrtStatusPtr {
    *kernel = new CpuKernel(api, info);
    return nullptr;
  });
}

}  // namespace ort
}  // namespace asa
