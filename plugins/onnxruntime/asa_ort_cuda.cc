// CUDA execution provider kernel: validate, fill AsaParams with device pointers, run the CUDA
// kernel core on ONNX Runtime's compute stream with a workspace from the EP's allocator.
//
// Status: compiles everywhere (no CUDA header needed); running it needs onnxruntime-gpu on a GPU,
// which this project's environment cannot provide, so it has not been executed yet.
#include "asa_ort_cuda.h"

#include <dlfcn.h>

#include <exception>
#include <mutex>
#include <string>
#include <vector>

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions*, const OrtApiBase*);

namespace asa {
namespace ort {
namespace {

// Folder of this shared library (to find libasa_cuda.so beside it or in the build tree).
std::string own_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&RegisterCustomOps), &info) == 0 || !info.dli_fname)
    return "";
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::vector<std::string> candidates() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("ASA_CUDA_LIB")) out.push_back(env);
  const std::string dir = own_dir();
  if (!dir.empty()) {
    out.push_back(dir + "/libasa_cuda.so");
    out.push_back(dir + "/../core/cuda/libasa_cuda.so");
  }
  out.push_back("libasa_cuda.so");
  return out;
}

template <typename F>
bool bind(void* handle, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  return fn != nullptr;
}

}  // namespace

const CudaCore* CudaCore::load(std::string* why) {
  static std::once_flag once;
  static CudaCore core;
  static const CudaCore* loaded = nullptr;
  static std::string reason;
  std::call_once(once, []() {
    for (const std::string& path : candidates()) {
      void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!handle) {
        const char* err = dlerror();
        reason += path + ": " + (err ? err : "not loadable") + "; ";
        continue;
      }
      if (bind(handle, "asa_cuda_workspace_size", core.workspace_size) &&
          bind(handle, "asa_cuda_forward", core.forward) &&
          bind(handle, "asa_last_error", core.last_error)) {
        loaded = &core;
        return;
      }
      reason += path + ": missing asa_cuda_* symbols; ";
      dlclose(handle);
    }
  });
  if (!loaded && why) *why = reason;
  return loaded;
}

CudaKernel::CudaKernel(const OrtApi& api, const OrtKernelInfo* info, const CudaCore* core)
    : attrs_(read_attributes(api, info)), core_(core) {}

OrtStatusPtr CudaKernel::ComputeV2(OrtKernelContext* context) {
  return guarded([&]() -> OrtStatusPtr {
    Ort::KernelContext ctx(context);
    AsaParams params;
    if (!prepare(attrs_, ctx, params, /*host_scratch=*/nullptr)) return nullptr;
    const size_t bytes = core_->workspace_size(&params);
    void* workspace = nullptr;
    OrtAllocator* allocator = nullptr;
    if (bytes > 0) {
      // The query's device is the one this node runs on.
      const int device = ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId();
      Ort::MemoryInfo ws_info("Cuda", OrtArenaAllocator, device, OrtMemTypeDefault);
      allocator = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(ws_info));
      workspace = allocator->Alloc(allocator, bytes);
      if (!workspace) return to_status("ASA CUDA: workspace allocation failed", ORT_FAIL);
    }
    const int rc = core_->forward(&params, workspace, bytes, ctx.GetGPUComputeStream());
    // ONNX Runtime's CUDA arena is stream-ordered: freeing after an asynchronous launch on the
    // compute stream is how its own kernels release scratch memory.
    if (workspace) allocator->Free(allocator, workspace);
    if (allocator) Ort::GetApi().ReleaseAllocator(allocator);
    if (rc != 0) {
      return to_status("asa::AdaptiveSparseAttention node '" + attrs_.node_name +
                           "': CUDA kernel failed (cudaError " + std::to_string(rc) +
                           "): " + core_->last_error(),
                       ORT_FAIL);
    }
    return nullptr;
  });
}

OrtStatusPtr CudaOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                                    void** kernel) const {
  return guarded([&]() -> OrtStatusPtr {
    *kernel = new CudaKernel(api, info, core_);
    return nullptr;
  });
}

}  // namespace ort
}  // namespace asa
