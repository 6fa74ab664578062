// Entry point of libasa_ort.so: SessionOptions.register_custom_ops_library() calls
// RegisterCustomOps, which adds AdaptiveSparseAttention (domain "asa", version 1) for the CPU
// execution provider, and for the CUDA execution provider when the CUDA kernel core
// (libasa_cuda.so) can be loaded. Built with ORT_API_MANUAL_INIT: the library does not link
// libonnxruntime; it uses the API table of the runtime that loads it.
#include <memory>
#include <mutex>

#include "asa_ort_cpu.h"
#include "asa_ort_cuda.h"

namespace {

// Ops live for the whole process: sessions keep pointers to them.
struct Registry {
  asa::ort::CpuOp cpu_op;
  std::unique_ptr<asa::ort::CudaOp> cuda_op;  // NULL when libasa_cuda.so is not loadable
};

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry();
    if (const asa::ort::CudaCore* core = asa::ort::CudaCore::load(nullptr))
      reg->cuda_op.reset(new asa::ort::CudaOp(core));
    return reg;
  }();
  return *r;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even build a status: the runtime is older than our headers
  Ort::InitApi(api);
  Registry& reg = registry();
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(asa::ort::kDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &reg.cpu_op)) return st;
  if (reg.cuda_op) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, reg.cuda_op.get())) return st;
  }
  // The domain must outlive every session using it and ONNX Runtime does not take ownership:
  // it is intentionally leaked (one small object per registration).
  return api->AddCustomOpDomain(options, domain);
}
