// The CPU execution provider's AdaptiveSparseAttention kernel and op definition.
#ifndef ASA_ORT_CPU_H_
#define ASA_ORT_CPU_H_

#include "asa_ort_op.h"

namespace asa {
namespace ort {

struct CpuKernel {
  CpuKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  Attributes attrs_;
};

struct CpuOp : Ort::CustomOpBase<CpuOp, CpuKernel, /*WithStatus=*/true> {
  CpuOp() {
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) {
      return infer_output_shapes(ctx);
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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
};

}  // namespace ort
}  // namespace asa

#endif  // ASA_ORT_CPU_H_
