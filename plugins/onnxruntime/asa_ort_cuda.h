// AdaptiveSparseAttention for ONNX Runtime's CUDA execution provider.
//
// The CUDA kernel core (libasa_cuda.so, plugins/core/cuda) is loaded with dlopen when the library
// is registered, so libasa_ort.so needs neither the CUDA toolkit to build nor the CUDA runtime to
// load: without libasa_cuda.so (or its CUDA runtime) only the CPU kernel is registered.
// Lookup order: $ASA_CUDA_LIB, libasa_cuda.so beside libasa_ort.so, ../core/cuda/libasa_cuda.so
// (the build tree), then the dynamic loader's search path.
#ifndef ASA_ORT_CUDA_H_
#define ASA_ORT_CUDA_H_

#include <string>

#include "asa_ort_op.h"

namespace asa {
namespace ort {

// Entry points of the CUDA kernel core (asa/asa_cuda.h), with the stream as void* and
// cudaError_t as int so that no CUDA header is needed here.
struct CudaCore {
  size_t (*workspace_size)(const AsaParams*);
  int (*forward)(const AsaParams*, void* workspace, size_t bytes, void* stream);
  const char* (*last_error)();

  // The process-wide core, or NULL (then *why says what is missing).
  static const CudaCore* load(std::string* why);
};

struct CudaKernel {
  CudaKernel(const OrtApi& api, const OrtKernelInfo* info, const CudaCore* core);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  Attributes attrs_;
  const CudaCore* core_;
};

struct CudaOp : Ort::CustomOpBase<CudaOp, CudaKernel, /*WithStatus=*/true> {
  explicit CudaOp(const CudaCore* core) : core_(core) {
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) {
      return infer_output_shapes(ctx);
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return contract_input_type(i); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return contract_input_characteristic(i);
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return contract_output_type(i); }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return contract_output_characteristic(i);
  }

 private:
  const CudaCore* core_;
};

}  // namespace ort
}  // namespace asa

#endif  // ASA_ORT_CUDA_H_
