// The contract's node attributes (SPEC.md "Attributes") in one table that every adapter iterates
// (ONNX Runtime op, TensorRT plugin): names, types, defaults, validation and the AsaParams fill
// are written once here. Header-only, so an adapter needs nothing but this include.
#ifndef ASA_ATTRIBUTES_H_
#define ASA_ATTRIBUTES_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "asa/asa_core.h"

namespace asa {

// Values of the contract attributes; the initializers are SPEC.md's defaults.
struct ContractAttributes {
  float scale = 0.f;         // 0 = 1/sqrt(D)
  int32_t causal = 0;        // 0 / 1
  int32_t block_size = 64;   // 64 or 128
  float threshold = 1.f;     // tau; >= 1 keeps every visible block
  int32_t sink_blocks = 1;
  int32_t local_blocks = 1;
  int32_t window = -1;       // -1 = none
  float softcap = 0.f;       // 0 = none
  int32_t select_per = 0;    // 0 = query head, 1 = KV group
};

// One attribute: its ONNX name, whether it is a float (else an integer held as int32), and where
// it lives in ContractAttributes.
struct AttributeDesc {
  const char* name;
  bool is_float;
  size_t offset;
};

// Every contract attribute, in SPEC.md order.
inline constexpr AttributeDesc kContractAttributes[] = {
    {"scale", true, offsetof(ContractAttributes, scale)},
    {"causal", false, offsetof(ContractAttributes, causal)},
    {"block_size", false, offsetof(ContractAttributes, block_size)},
    {"threshold", true, offsetof(ContractAttributes, threshold)},
    {"sink_blocks", false, offsetof(ContractAttributes, sink_blocks)},
    {"local_blocks", false, offsetof(ContractAttributes, local_blocks)},
    {"window", false, offsetof(ContractAttributes, window)},
    {"softcap", true, offsetof(ContractAttributes, softcap)},
    {"select_per", false, offsetof(ContractAttributes, select_per)},
};

inline float& float_attribute(ContractAttributes& a, const AttributeDesc& d) {
  return *reinterpret_cast<float*>(reinterpret_cast<char*>(&a) + d.offset);
}
inline int32_t& int_attribute(ContractAttributes& a, const AttributeDesc& d) {
  return *reinterpret_cast<int32_t*>(reinterpret_cast<char*>(&a) + d.offset);
}
inline const void* attribute_address(const ContractAttributes& a, const AttributeDesc& d) {
  return reinterpret_cast<const char*>(&a) + d.offset;
}

// Stores a number read from a node into attribute `d`. Returns "" or why it cannot be stored
// (an integer attribute given a fraction or a value outside int32).
inline std::string set_attribute(ContractAttributes& a, const AttributeDesc& d, double value) {
  if (d.is_float) {
    float_attribute(a, d) = static_cast<float>(value);
    return "";
  }
  if (value != std::floor(value)) return std::string(d.name) + " must be an integer";
  if (value < INT32_MIN || value > INT32_MAX) return std::string(d.name) + " is out of range";
  int_attribute(a, d) = static_cast<int32_t>(value);
  return "";
}

// Why the values break the contract, "; "-separated ("" when they are valid).
inline std::string validation_errors(const ContractAttributes& a) {
  std::ostringstream why;
  auto item = [&why]() -> std::ostringstream& {
    if (why.tellp() > 0) why << "; ";
    return why;
  };
  if (a.block_size != 64 && a.block_size != 128)
    item() << "block_size must be 64 or 128, got " << a.block_size;
  if (!(a.scale >= 0.f) || !std::isfinite(a.scale))
    item() << "scale must be finite and >= 0 (0 = 1/sqrt(D)), got " << a.scale;
  if (!(a.threshold > 0.f) || !std::isfinite(a.threshold))
    item() << "threshold must be finite and > 0, got " << a.threshold;
  if (a.causal != 0 && a.causal != 1) item() << "causal must be 0 or 1, got " << a.causal;
  if (a.sink_blocks < 0 || a.local_blocks < 0) item() << "sink_blocks and local_blocks must be >= 0";
  if (a.window == 0 || a.window < -1) item() << "window must be -1 (none) or > 0, got " << a.window;
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap))
    item() << "softcap must be finite and >= 0, got " << a.softcap;
  if (a.select_per != 0 && a.select_per != 1)
    item() << "select_per must be 0 or 1, got " << a.select_per;
  return why.str();
}

// Copies the attributes into `p`, resolving scale 0 to 1/sqrt(D) (p.head_dim must be set).
inline void fill_attributes(const ContractAttributes& a, AsaParams& p) {
  p.scale = a.scale > 0.f ? a.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
  p.causal = a.causal;
  p.block_size = a.block_size;
  p.threshold = a.threshold;
  p.sink_blocks = a.sink_blocks;
  p.local_blocks = a.local_blocks;
  p.window = a.window;
  p.softcap = a.softcap;
  p.select_per = a.select_per;
}

}  // namespace asa

#endif  // ASA_ATTRIBUTES_H_
