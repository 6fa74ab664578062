// Plugin fields of AdaptiveSparseAttention: one table drives the creator's field list, parsing
// (ONNX parser: INT attributes arrive as kINT32, FLOAT as kFLOAT32) and serialization.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <sstream>

#include "asa_trt_fields.h"
#include "asa_trt_plugin.h"

namespace asa {
namespace trt {
namespace {

struct FieldDesc {
  const char* name;
  bool is_float;  // float32 field, else int32
  size_t offset;  // into Config
};

const FieldDesc kFields[] = {
    {"scale", true, offsetof(Config, scale)},
    {"causal", false, offsetof(Config, causal)},
    {"block_size", false, offsetof(Config, block_size)},
    {"threshold", true, offsetof(Config, threshold)},
    {"sink_blocks", false, offsetof(Config, sink_blocks)},
    {"local_blocks", false, offsetof(Config, local_blocks)},
    {"window", false, offsetof(Config, window)},
    {"softcap", true, offsetof(Config, softcap)},
    {"select_per", false, offsetof(Config, select_per)},
    {"optional_inputs", false, offsetof(Config, optional_inputs)},
    {"telemetry_outputs", false, offsetof(Config, telemetry_outputs)},
};

const FieldDesc* find_field(const char* name) {
  for (const FieldDesc& f : kFields) {
    if (std::strcmp(f.name, name) == 0) return &f;
  }
  return nullptr;
}

// Reads one scalar of `field` as double; false when the type cannot carry a number.
bool read_number(const nvinfer1::PluginField& field, double* value) {
  using T = nvinfer1::PluginFieldType;
  switch (field.type) {
    case T::kFLOAT32: *value = *static_cast<const float*>(field.data); return true;
    case T::kFLOAT64: *value = *static_cast<const double*>(field.data); return true;
    case T::kINT32: *value = *static_cast<const int32_t*>(field.data); return true;
    case T::kINT64: *value = static_cast<double>(*static_cast<const int64_t*>(field.data)); return true;
    case T::kINT16: *value = *static_cast<const int16_t*>(field.data); return true;
    case T::kINT8: *value = *static_cast<const int8_t*>(field.data); return true;
    default: return false;
  }
}

}  // namespace

std::string Config::validate() const {
  std::ostringstream why;
  if (block_size != 64 && block_size != 128) why << "block_size must be 64 or 128, got " << block_size << "; ";
  if (!(scale >= 0.f) || !std::isfinite(scale)) why << "scale must be finite and >= 0; ";
  if (!(threshold > 0.f) || !std::isfinite(threshold)) why << "threshold must be finite and > 0; ";
  if (sink_blocks < 0 || local_blocks < 0) why << "sink_blocks and local_blocks must be >= 0; ";
  if (window == 0 || window < -1) why << "window must be -1 (none) or > 0, got " << window << "; ";
  if (!(softcap >= 0.f) || !std::isfinite(softcap)) why << "softcap must be finite and >= 0; ";
  if (causal != 0 && causal != 1) why << "causal must be 0 or 1, got " << causal << "; ";
  if (select_per != 0 && select_per != 1) why << "select_per must be 0 or 1, got " << select_per << "; ";
  if (optional_inputs < -1 || optional_inputs > kAllOptional) {
    why << "optional_inputs must be -1 or a 5-bit mask, got " << optional_inputs << "; ";
  } else if (optional_inputs >= 0 &&
             ((optional_inputs & kHasGateQ) != 0) != ((optional_inputs & kHasGateK) != 0)) {
    why << "optional_inputs wires only one of gate_q_weight / gate_k_weight (inputs 6 and 7 "
           "come together); ";
  }
  if (telemetry_outputs < 0 || telemetry_outputs > 3) why << "telemetry_outputs must be 0..3; ";
  return why.str();
}

bool parse_fields(const nvinfer1::PluginFieldCollection* fc, Config* config, std::string* error) {
  if (fc == nullptr) return true;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    const nvinfer1::PluginField& field = fc->fields[i];
    const FieldDesc* desc = field.name ? find_field(field.name) : nullptr;
    if (desc == nullptr || field.data == nullptr || field.length < 1) continue;
    double value = 0.0;
    if (!read_number(field, &value)) {
      *error = std::string("field '") + field.name + "' has a non-numeric type";
      return false;
    }
    char* base = reinterpret_cast<char*>(config) + desc->offset;
    if (desc->is_float) {
      *reinterpret_cast<float*>(base) = static_cast<float>(value);
    } else if (value != std::floor(value)) {
      *error = std::string("field '") + field.name + "' must be an integer";
      return false;
    } else {
      *reinterpret_cast<int32_t*>(base) = static_cast<int32_t>(value);
    }
  }
  *error = config->validate();
  return error->empty();
}

std::vector<nvinfer1::PluginField> field_names() {
  std::vector<nvinfer1::PluginField> fields;
  for (const FieldDesc& f : kFields) {
    fields.emplace_back(f.name, nullptr,
                        f.is_float ? nvinfer1::PluginFieldType::kFLOAT32
                                   : nvinfer1::PluginFieldType::kINT32,
                        1);
  }
  return fields;
}

std::vector<nvinfer1::PluginField> serialize_fields(const Config& config) {
  std::vector<nvinfer1::PluginField> fields = field_names();
  for (size_t i = 0; i < fields.size(); ++i) {
    fields[i].data = reinterpret_cast<const char*>(&config) + kFields[i].offset;
  }
  return fields;
}

}  // namespace trt
}  // namespace asa
