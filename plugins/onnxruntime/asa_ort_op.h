// ONNX Runtime adapter of the ASA kernel core: attribute parsing, input validation and the
// AsaParams fill shared by the execution-provider kernels (CPU now; CUDA in asa_ort_cuda.cc).
// No math here: the kernel core does it (SPEC: asa_export/contract/SPEC.md).
#ifndef ASA_ORT_OP_H_
#define ASA_ORT_OP_H_

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "asa/asa_core.h"
#include "attributes.h"

namespace asa {
namespace ort {

constexpr const char* kDomain = "asa";
constexpr const char* kOpName = "AdaptiveSparseAttention";
// query, key, value, key_padding_mask, attn_bias, head_thresholds, gate_q_weight, gate_k_weight
constexpr int kNumInputs = 8;
constexpr int kNumOutputs = 4;  // output, block_indices, block_counts, visible_counts

inline OrtStatusPtr to_status(const std::string& text, OrtErrorCode code) {
  return Ort::GetApi().CreateStatus(code, text.c_str());
}

// Runs `body` (returning OrtStatusPtr) and turns any exception into an ONNX Runtime status: no
// exception may cross the C ABI into ONNX Runtime.
template <typename Body>
OrtStatusPtr guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return to_status(e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return to_status(e.what(), ORT_FAIL);
  }
}

// The contract's input/output signature, shared by the CPU and CUDA ops. head_thresholds and
// the gate weights (inputs 5-7) are float32 and the telemetry outputs int32; the other types are
// checked in prepare() with a clear message. query, key, value and output are required, the rest
// optional.
inline ONNXTensorElementDataType contract_input_type(size_t index) {
  return index >= 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
inline ONNXTensorElementDataType contract_output_type(size_t index) {
  return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
}
inline OrtCustomOpInputOutputCharacteristic contract_input_characteristic(size_t index) {
  return index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
inline OrtCustomOpInputOutputCharacteristic contract_output_characteristic(size_t index) {
  return index < 1 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

// Node attributes: the contract's (plugins/core/common/attributes.h, SPEC.md defaults for the
// ones a node leaves out) and the TensorRT identity strings.
struct Attributes {
  ContractAttributes values;
  std::string plugin_namespace;  // accepted, unused
  std::string plugin_version;    // accepted, unused
  std::string node_name;         // for error messages
};

// Reads the attributes; throws Ort::Exception on a value the contract forbids.
Attributes read_attributes(const OrtApi& api, const OrtKernelInfo* info);

// Telemetry buffers the core writes when the node does not ask for those outputs.
struct Scratch {
  std::vector<int32_t> block_indices;
  std::vector<int32_t> block_counts;
};

// Validates the inputs of one call, allocates the outputs and fills `params`.
// Returns false when there is nothing to compute (an empty dimension; outputs are allocated and,
// where the contract defines them, filled). Throws Ort::Exception with a readable message on a
// shape or type error.
// `host_scratch` (CPU execution provider): telemetry buffers for outputs the node does not ask
// for. NULL (device execution providers): such pointers stay NULL (the CUDA core keeps the lists
// in its workspace) and nothing is written from the host.
bool prepare(const Attributes& attrs, Ort::KernelContext& ctx, AsaParams& params,
             Scratch* host_scratch);

// OrtCustomOp::InferOutputShapeFn: output 0 takes the query's element type and
// [B, Hq, Sq, Dv]; telemetry outputs are int32 with their contract shapes (dims the model leaves
// symbolic stay unknown). Shape errors are left to the kernel, which reports them clearly.
OrtStatusPtr infer_output_shapes(OrtShapeInferContext* context);

}  // namespace ort
}  // namespace asa

#endif  // ASA_ORT_OP_H_
