// IPluginV3 adapter of the ASA kernel core for TensorRT 10.x (and TensorRT-RTX, same API).
//
//   ONNX node asa::AdaptiveSparseAttention  --(ONNX parser: op_type + plugin_namespace/version)-->
//   AsaPlugin (fields = contract attributes)  --enqueue-->  asa_cuda_forward(params, stream)
//
// The plugin holds no math: it checks shapes and types, lays out the workspace and fills
// AsaParams (plugins/core/include/asa/asa_core.h). Semantics: asa_export/contract/SPEC.md.
#ifndef ASA_TRT_PLUGIN_H_
#define ASA_TRT_PLUGIN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "asa/asa_core.h"
#include "attributes.h"

namespace asa {
namespace trt {

constexpr char kPluginName[] = "AdaptiveSparseAttention";
constexpr char kPluginVersion[] = "1";
constexpr char kPluginNamespace[] = "asa";

// Contract input slots (SPEC.md "Inputs").
enum Slot { kQuery = 0, kKey, kValue, kMask, kBias, kThresholds, kGateQ, kGateK, kNumSlots };
// Bits of Config::optional_inputs, one per optional slot (bit s - 3 for slot s).
constexpr int32_t kHasMask = 1, kHasBias = 2, kHasThresholds = 4, kHasGateQ = 8, kHasGateK = 16;
constexpr int32_t kAllOptional = 31;

// Every field the plugin serializes: the contract attributes (the adapters' shared table,
// plugins/core/common/attributes.h) plus two plugin-only fields that tell which optional tensors
// are wired (TensorRT drops empty ONNX inputs and outputs).
struct Config {
  ContractAttributes attrs;
  // Which optional inputs are present (kHas* bits); -1 = the first nbInputs-3 optional slots in
  // contract order (a node whose present inputs leave no gap).
  int32_t optional_inputs = -1;
  // Telemetry outputs after `output`: 0..3 (block_indices, block_counts, visible_counts).
  int32_t telemetry_outputs = 0;

  // Reasons this config breaks the contract ("" when it is valid).
  std::string validate() const;
};

// Parses a field collection (int fields as int32 or int64, float fields as float32 or float64);
// unknown fields are ignored (plugin_namespace / plugin_version arrive as node attributes too).
// Returns false and sets `error` on a bad type or value.
bool parse_fields(const nvinfer1::PluginFieldCollection* fc, Config* config, std::string* error);

class AsaPlugin : public nvinfer1::IPluginV3,
                  public nvinfer1::IPluginV3OneCore,
                  public nvinfer1::IPluginV3OneBuild,
                  public nvinfer1::IPluginV3OneRuntime {
 public:
  AsaPlugin(std::string name, const Config& config);
  ~AsaPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(
      nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             const nvinfer1::DataType* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                          const nvinfer1::DimsExprs* shapeInputs, int32_t nbShapeInputs,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                 int32_t nbInputs, int32_t nbOutputs) noexcept override;
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                          const nvinfer1::DynamicPluginTensorDesc* out,
                          int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs,
                          int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                        const nvinfer1::PluginTensorDesc* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* inputDesc,
                  const nvinfer1::PluginTensorDesc* outputDesc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

  const Config& config() const { return config_; }

 private:
  // Input index of each contract slot for this node, -1 when absent.
  int32_t slot(Slot s) const { return slots_[s]; }
  void resolve_slots(int32_t nbInputs);
  // Checks ranks and sizes; returns "" or the reason.
  std::string check_shapes(const nvinfer1::Dims* in, int32_t nbInputs) const;
  // The learned gate's part of check_shapes (SPEC.md inputs 6-7).
  std::string check_gate_shapes(const nvinfer1::Dims* in) const;
  // Fills sizes, attributes and strides of `p` from input dims (pointers are left null).
  AsaParams make_params(const nvinfer1::Dims* in, nvinfer1::DataType type,
                        nvinfer1::DataType maskType) const;
  size_t workspace_for(const nvinfer1::Dims* in, nvinfer1::DataType type,
                       nvinfer1::DataType maskType) const;

  std::string name_;
  Config config_;
  int32_t slots_[kNumSlots];
  int32_t nb_inputs_ = -1;
  std::vector<nvinfer1::PluginField> serial_fields_;
  nvinfer1::PluginFieldCollection serial_fc_{};
};

class AsaPluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  AsaPluginCreator();
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &fc_; }
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

}  // namespace trt
}  // namespace asa

#endif  // ASA_TRT_PLUGIN_H_
