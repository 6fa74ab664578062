// Field tables of the ASA plugin (creator field names, serialization); see asa_trt_fields.cpp.
#ifndef ASA_TRT_FIELDS_H_
#define ASA_TRT_FIELDS_H_

#include <vector>

#include "NvInferRuntime.h"

namespace asa {
namespace trt {

struct Config;

// Every field name with its type (data = nullptr): the creator's getFieldNames().
std::vector<nvinfer1::PluginField> field_names();

// Every field pointing into `config` (which must outlive the result): getFieldsToSerialize().
std::vector<nvinfer1::PluginField> serialize_fields(const Config& config);

}  // namespace trt
}  // namespace asa

#endif  // ASA_TRT_FIELDS_H_
