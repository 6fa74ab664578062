// Entry point of libasa_ort.so: SessionOptions.register_custom_ops_library() calls
// RegisterCustomOps, which adds AdaptiveSparseAttention (domain "asa", version 1) for every
// execution provider this build supports. Built with ORT_API_MANUAL_INIT: the library does not
// link libonnxruntime; it uses the API table of the runtime that loads it.
#include <mutex>

#include "asa_ort_cpu.h"
#ifdef ASA_ORT_WITH_CUDA
#include "asa_ort_cuda.h"
#endif

namespace {

// Ops and the domain live for the whole process: sessions keep pointers to them.
struct Registry {
  asa::ort::CpuOp cpu_op;
#ifdef ASA_ORT_WITH_CUDA
  asa::ort::CudaOp cuda_op;
#endif
};

Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even build a status: the runtime is older than our headers
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(asa::ort::kDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &registry().cpu_op)) return st;
#ifdef ASA_ORT_WITH_CUDA
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &registry().cuda_op)) return st;
#endif
  // The domain must outlive every session using it; ORT does not take ownership, so it is
  // intentionally leaked (one small object per registration).
  return api->AddCustomOpDomain(options, domain);
}
