// Plugin fields of AdaptiveSparseAttention: the contract attributes of the adapters' shared table
// (plugins/core/common/attributes.h) plus the plugin-only fields drive the creator's field list,
// parsing (ONNX parser: INT attributes arrive as kINT32, FLOAT as kFLOAT32) and serialization.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <sstream>

#include "asa_trt_fields.h"
#include "asa_trt_plugin.h"

namespace asa {
namespace trt {
namespace {

// Plugin-only int32 fields of Config.
struct PluginField {
  const char* name;
  size_t offset;  // into Config
};

const PluginField kPluginFields[] = {
    {"optional_inputs", offsetof(Config, optional_inputs)},
    {"telemetry_outputs", offsetof(Config, telemetry_outputs)},
};

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

// Stores `value` into the field called `name`; "" or why not. Unknown names are ignored
// (plugin_namespace / plugin_version arrive as node attributes too).
std::string store(Config* config, const char* name, double value) {
  for (const AttributeDesc& d : kContractAttributes) {
    if (std::strcmp(d.name, name) == 0) return set_attribute(config->attrs, d, value);
  }
  for (const PluginField& f : kPluginFields) {
    if (std::strcmp(f.name, name) != 0) continue;
    if (value != std::floor(value) || value < INT32_MIN || value > INT32_MAX) {
      return std::string(name) + " must be an int32 integer";
    }
    *reinterpret_cast<int32_t*>(reinterpret_cast<char*>(config) + f.offset) =
        static_cast<int32_t>(value);
  }
  return "";
}

}  // namespace

std::string Config::validate() const {
  std::ostringstream why;
  const std::string contract = validation_errors(attrs);
  if (!contract.empty()) why << contract << "; ";
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
    if (field.name == nullptr || field.data == nullptr || field.length < 1) continue;
    double value = 0.0;
    if (!read_number(field, &value)) {
      // Strings (plugin_namespace / plugin_version) and other non-numbers are not ours.
      bool ours = false;
      for (const AttributeDesc& d : kContractAttributes) ours |= std::strcmp(d.name, field.name) == 0;
      for (const PluginField& f : kPluginFields) ours |= std::strcmp(f.name, field.name) == 0;
      if (!ours) continue;
      *error = std::string("field '") + field.name + "' has a non-numeric type";
      return false;
    }
    *error = store(config, field.name, value);
    if (!error->empty()) {
      *error = "field " + *error;
      return false;
    }
  }
  *error = config->validate();
  return error->empty();
}

std::vector<nvinfer1::PluginField> serialize_fields(const Config& config) {
  using T = nvinfer1::PluginFieldType;
  std::vector<nvinfer1::PluginField> fields;
  for (const AttributeDesc& d : kContractAttributes) {
    fields.emplace_back(d.name, attribute_address(config.attrs, d),
                        d.is_float ? T::kFLOAT32 : T::kINT32, 1);
  }
  for (const PluginField& f : kPluginFields) {
    fields.emplace_back(f.name, reinterpret_cast<const char*>(&config) + f.offset, T::kINT32, 1);
  }
  return fields;
}

std::vector<nvinfer1::PluginField> field_names() {
  std::vector<nvinfer1::PluginField> fields = serialize_fields(Config());
  for (nvinfer1::PluginField& f : fields) f.data = nullptr;
  return fields;
}

}  // namespace trt
}  // namespace asa
