// AsaPlugin: shapes, formats, workspace and enqueue of the ASA op in TensorRT (see the header).
// Every TensorRT-facing method is noexcept: errors are caught, logged through the loading
// library's logger and turned into the failure value TensorRT expects.
#include "asa_trt_plugin.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "asa/asa_cuda.h"
#include "asa_trt_fields.h"
#include "asa_trt_log.h"

namespace asa {
namespace trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::Dims;

constexpr int32_t kFirstOptional = kMask;

int32_t popcount(int32_t bits) {
  int32_t n = 0;
  for (; bits > 0; bits >>= 1) n += bits & 1;
  return n;
}

// Input index of each contract slot (-1 = absent); false when nbInputs cannot match `optional`.
bool compute_slots(int32_t optional, int32_t nbInputs, int32_t slots[kNumSlots]) {
  if (nbInputs < 3 || nbInputs > kNumSlots) return false;
  int32_t bits = optional;
  if (bits < 0) bits = (1 << (nbInputs - 3)) - 1;  // present inputs fill the first slots
  if (3 + popcount(bits) != nbInputs) return false;
  int32_t next = 0;
  for (int32_t s = 0; s < kNumSlots; ++s) {
    const bool present = s < kFirstOptional || (bits >> (s - kFirstOptional)) & 1;
    slots[s] = present ? next++ : -1;
  }
  return true;
}

std::string slot_error(int32_t optional, int32_t nbInputs) {
  std::ostringstream why;
  why << "the node has " << nbInputs << " inputs but optional_inputs=" << optional
      << " asks for " << (optional < 0 ? -1 : 3 + popcount(optional))
      << " (query, key, value + present optional inputs, no empty names)";
  return why.str();
}

bool is_float_type(DataType t) {
  return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

AsaDType to_asa(DataType t) {
  return t == DataType::kHALF ? ASA_FLOAT16 : t == DataType::kBF16 ? ASA_BFLOAT16 : ASA_FLOAT32;
}

AsaMaskDType to_asa_mask(DataType t) {
  switch (t) {
    case DataType::kBOOL: return ASA_MASK_BOOL;
    case DataType::kINT32: return ASA_MASK_INT32;
    case DataType::kINT64: return ASA_MASK_INT64;
    default: return ASA_MASK_NONE;
  }
}

// Row-major strides of a dense tensor with `d` dims, in elements.
void dense_strides(const Dims& d, int64_t strides[nvinfer1::Dims::MAX_DIMS]) {
  int64_t s = 1;
  for (int32_t i = d.nbDims - 1; i >= 0; --i) {
    strides[i] = s;
    s *= std::max<int64_t>(d.d[i], 1);
  }
}

// Known dims that disagree (both >= 0 and different).
bool differ(int64_t a, int64_t b) { return a >= 0 && b >= 0 && a != b; }

// Stand-in pointer for workspace queries: the core checks pointers are set, never reads them.
void* placeholder() { return reinterpret_cast<void*>(static_cast<uintptr_t>(256)); }

std::string dims_text(const Dims& d) {
  std::ostringstream t;
  t << "[";
  for (int32_t i = 0; i < d.nbDims; ++i) t << (i ? ", " : "") << d.d[i];
  t << "]";
  return t.str();
}

}  // namespace

AsaPlugin::AsaPlugin(std::string name, const Config& config)
    : name_(std::move(name)), config_(config) {
  std::fill(slots_, slots_ + kNumSlots, -1);
}

nvinfer1::IPluginCapability* AsaPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  try {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
  } catch (const std::exception& e) {
    log_error(e.what());
  }
  return nullptr;
}

nvinfer1::IPluginV3* AsaPlugin::clone() noexcept {
  try {
    auto* copy = new AsaPlugin(name_, config_);
    std::copy(slots_, slots_ + kNumSlots, copy->slots_);
    copy->nb_inputs_ = nb_inputs_;
    return copy;
  } catch (const std::exception& e) {
    log_error(std::string("clone: ") + e.what());
  }
  return nullptr;
}

int32_t AsaPlugin::getNbOutputs() const noexcept { return 1 + config_.telemetry_outputs; }

int32_t AsaPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                      const DataType* inputTypes, int32_t nbInputs) const noexcept {
  try {
    if (nbInputs < 3 || nbOutputs != getNbOutputs()) {
      throw std::invalid_argument("unexpected input/output count");
    }
    outputTypes[0] = inputTypes[kQuery];
    for (int32_t i = 1; i < nbOutputs; ++i) outputTypes[i] = DataType::kINT32;
    return 0;
  } catch (const std::exception& e) {
    log_error(name_ + ": getOutputDataTypes: " + e.what());
  }
  return -1;
}

int32_t AsaPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                   const nvinfer1::DimsExprs*, int32_t,
                                   nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                   nvinfer1::IExprBuilder& expr) noexcept {
  try {
    if (nbInputs < 3 || nbOutputs != getNbOutputs() || inputs[kQuery].nbDims != 4 ||
        inputs[kKey].nbDims != 4 || inputs[kValue].nbDims != 4) {
      log_error(name_ + ": query, key and value must be 4-D [B, H, S, D]");
      return -1;
    }
    const auto& q = inputs[kQuery];
    const auto* block = expr.constant(config_.attrs.block_size);
    const auto* nq = expr.operation(nvinfer1::DimensionOperation::kCEIL_DIV, *q.d[2], *block);
    const auto* nk =
        expr.operation(nvinfer1::DimensionOperation::kCEIL_DIV, *inputs[kKey].d[2], *block);
    const auto* hsel = config_.attrs.select_per ? inputs[kKey].d[1] : q.d[1];
    outputs[0].nbDims = 4;  // [B, Hq, Sq, Dv]
    outputs[0].d[0] = q.d[0];
    outputs[0].d[1] = q.d[1];
    outputs[0].d[2] = q.d[2];
    outputs[0].d[3] = inputs[kValue].d[3];
    const nvinfer1::IDimensionExpr* telemetry[3][4] = {
        {q.d[0], hsel, nq, nk},  // block_indices [B, Hsel, NQ, NK]
        {q.d[0], hsel, nq},      // block_counts [B, Hsel, NQ]
        {q.d[0], nq}};           // visible_counts [B, NQ]
    const int32_t ranks[3] = {4, 3, 2};
    for (int32_t i = 1; i < nbOutputs; ++i) {
      outputs[i].nbDims = ranks[i - 1];
      for (int32_t a = 0; a < ranks[i - 1]; ++a) outputs[i].d[a] = telemetry[i - 1][a];
    }
    return 0;
  } catch (const std::exception& e) {
    log_error(name_ + ": getOutputShapes: " + e.what());
  }
  return -1;
}

void AsaPlugin::resolve_slots(int32_t nbInputs) {
  if (nb_inputs_ == nbInputs) return;
  if (!compute_slots(config_.optional_inputs, nbInputs, slots_)) {
    throw std::invalid_argument(slot_error(config_.optional_inputs, nbInputs));
  }
  nb_inputs_ = nbInputs;
}

bool AsaPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                          int32_t nbInputs, int32_t nbOutputs) noexcept {
  try {
    resolve_slots(nbInputs);
    const auto& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
    const DataType t = inOut[0].desc.type;
    if (pos >= nbInputs) return pos == nbInputs ? desc.type == t : desc.type == DataType::kINT32;
    if (pos == slot(kQuery)) return is_float_type(desc.type);
    if (pos == slot(kMask)) return to_asa_mask(desc.type) != ASA_MASK_NONE;
    // head_thresholds and the learned gate are float32 whatever the attention type.
    if (pos == slot(kThresholds) || pos == slot(kGateQ) || pos == slot(kGateK)) {
      return desc.type == DataType::kFLOAT;
    }
    return desc.type == t;  // key, value, bias share the query's type
  } catch (const std::exception& e) {
    log_error(name_ + ": " + e.what());
  }
  return false;
}

std::string AsaPlugin::check_shapes(const Dims* in, int32_t nbInputs) const {
  const Dims &q = in[slot(kQuery)], &k = in[slot(kKey)], &v = in[slot(kValue)];
  if (q.nbDims != 4 || k.nbDims != 4 || v.nbDims != 4) {
    return "query, key and value must be 4-D [B, H, S, D]";
  }
  if (differ(q.d[0], k.d[0]) || differ(q.d[0], v.d[0])) return "query, key, value batch sizes differ";
  if (differ(k.d[1], v.d[1]) || differ(k.d[2], v.d[2])) return "key and value shapes disagree";
  if (differ(q.d[3], k.d[3])) return "query and key head dims differ";
  if (q.d[1] > 0 && k.d[1] > 0 && q.d[1] % k.d[1] != 0) return "query heads must be a multiple of KV heads";
  if (slot(kMask) >= 0) {
    const Dims& m = in[slot(kMask)];
    if (m.nbDims != 2 || differ(m.d[1], k.d[2]) || (m.d[0] != 1 && differ(m.d[0], q.d[0]))) {
      return "key_padding_mask must be [B, Skv]";
    }
  }
  if (slot(kBias) >= 0) {
    const Dims& b = in[slot(kBias)];
    if (b.nbDims < 1 || b.nbDims > 4) return "attn_bias must have rank 1 to 4";
  }
  if (slot(kThresholds) >= 0) {
    const Dims& h = in[slot(kThresholds)];
    if (h.nbDims != 1 || differ(h.d[0], q.d[1])) return "head_thresholds must be [Hq]";
  }
  return check_gate_shapes(in);
}

std::string AsaPlugin::check_gate_shapes(const Dims* in) const {
  if ((slot(kGateQ) >= 0) != (slot(kGateK) >= 0)) {
    return "gate_q_weight and gate_k_weight (inputs 6 and 7) come together";
  }
  if (slot(kGateQ) < 0) return "";
  const Dims &q = in[slot(kQuery)], &k = in[slot(kKey)];
  const Dims &wq = in[slot(kGateQ)], &wk = in[slot(kGateK)];
  if (wq.nbDims != 3 || differ(wq.d[0], q.d[1]) || differ(wq.d[1], q.d[3]) ||
      (wq.d[2] >= 0 && wq.d[2] < 1)) {
    return "gate_q_weight must be [Hq, D, Dg], got " + dims_text(wq);
  }
  if (wk.nbDims != 3 || differ(wk.d[0], k.d[1]) ||
      (k.d[3] >= 0 && differ(wk.d[1], 3 * k.d[3])) || differ(wk.d[2], wq.d[2])) {
    return "gate_k_weight must be [Hkv, 3*D, Dg] (Dg of gate_q_weight), got " + dims_text(wk);
  }
  return "";
}

int32_t AsaPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                                   const nvinfer1::DynamicPluginTensorDesc*, int32_t nbOutputs) noexcept {
  try {
    resolve_slots(nbInputs);
    if (nbOutputs != getNbOutputs()) throw std::invalid_argument("unexpected output count");
    std::vector<Dims> dims(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i) dims[i] = in[i].desc.dims;
    const std::string why = check_shapes(dims.data(), nbInputs);
    if (!why.empty()) throw std::invalid_argument(why);
    return 0;
  } catch (const std::exception& e) {
    log_error(name_ + ": configurePlugin: " + e.what());
  }
  return -1;
}

AsaParams AsaPlugin::make_params(const Dims* in, DataType type, DataType maskType) const {
  const Dims &q = in[slot(kQuery)], &k = in[slot(kKey)], &v = in[slot(kValue)];
  AsaParams p{};
  p.batch = static_cast<int32_t>(q.d[0]);
  p.heads_q = static_cast<int32_t>(q.d[1]);
  p.heads_kv = static_cast<int32_t>(k.d[1]);
  p.seq_q = static_cast<int32_t>(q.d[2]);
  p.seq_kv = static_cast<int32_t>(k.d[2]);
  p.head_dim = static_cast<int32_t>(q.d[3]);
  p.head_dim_v = static_cast<int32_t>(v.d[3]);
  p.dtype = to_asa(type);
  p.q_stride_s = p.head_dim, p.q_stride_h = p.q_stride_s * p.seq_q, p.q_stride_b = p.q_stride_h * p.heads_q;
  p.k_stride_s = p.head_dim, p.k_stride_h = p.k_stride_s * p.seq_kv, p.k_stride_b = p.k_stride_h * p.heads_kv;
  p.v_stride_s = p.head_dim_v, p.v_stride_h = p.v_stride_s * p.seq_kv, p.v_stride_b = p.v_stride_h * p.heads_kv;
  p.o_stride_s = p.head_dim_v, p.o_stride_h = p.o_stride_s * p.seq_q, p.o_stride_b = p.o_stride_h * p.heads_q;
  if (slot(kMask) >= 0) {
    p.mask_dtype = to_asa_mask(maskType);
    p.mask_stride_b = in[slot(kMask)].d[0] == 1 ? 0 : p.seq_kv;
  }
  if (slot(kBias) >= 0) {  // right-aligned broadcast onto [B, Hq, Sq, Skv]; size-1 dims stride 0
    const Dims& b = in[slot(kBias)];
    int64_t dense[nvinfer1::Dims::MAX_DIMS];
    dense_strides(b, dense);
    int64_t* strides[4] = {&p.bias_stride_b, &p.bias_stride_h, &p.bias_stride_q, &p.bias_stride_k};
    for (int32_t a = 0; a < 4; ++a) {
      const int32_t i = a - (4 - b.nbDims);
      *strides[a] = (i < 0 || b.d[i] == 1) ? 0 : dense[i];
    }
  }
  if (slot(kGateQ) >= 0) p.gate_dim = static_cast<int32_t>(in[slot(kGateQ)].d[2]);
  fill_attributes(config_.attrs, p);
  return p;
}

size_t AsaPlugin::workspace_for(const Dims* in, DataType type, DataType maskType) const {
  AsaParams p = make_params(in, type, maskType);
  p.q = p.k = p.v = placeholder();
  p.out = placeholder();
  if (p.mask_dtype != ASA_MASK_NONE) p.key_padding_mask = placeholder();
  if (slot(kGateQ) >= 0) {  // the gate's scratch is part of the workspace
    p.gate_q_weight = p.gate_k_weight = static_cast<const float*>(placeholder());
  }
  return asa_cuda_workspace_size(&p);
}

size_t AsaPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                   const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept {
  try {
    int32_t slots[kNumSlots];
    if (!compute_slots(config_.optional_inputs, nbInputs, slots)) {
      throw std::invalid_argument(slot_error(config_.optional_inputs, nbInputs));
    }
    std::vector<Dims> dims(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i) dims[i] = inputs[i].max;
    const DataType type = inputs[slots[kQuery]].desc.type;
    const DataType maskType = slots[kMask] >= 0 ? inputs[slots[kMask]].desc.type : DataType::kBOOL;
    // The core's split-K decode path (Sq <= 16) needs scratch that grows as B shrinks, so the
    // maximum is taken over every batch size of the profile and both Sq regimes.
    const int64_t b_lo = std::max<int64_t>(inputs[slots[kQuery]].min.d[0], 1);
    const int64_t b_hi = dims[slots[kQuery]].d[0];
    const int64_t sq_lo = std::max<int64_t>(inputs[slots[kQuery]].min.d[2], 1);
    const int64_t sq_hi = dims[slots[kQuery]].d[2];
    AsaPlugin probe(name_, config_);
    std::copy(slots, slots + kNumSlots, probe.slots_);
    size_t need = 0;
    for (int64_t b = std::max(b_lo, b_hi - 255); b <= b_hi; ++b) {
      for (int64_t sq : {sq_hi, std::min<int64_t>(sq_hi, std::max<int64_t>(sq_lo, 16))}) {
        std::vector<Dims> cand = dims;
        for (Slot s : {kQuery, kKey, kValue, kMask}) {  // the inputs with a batch axis
          if (slots[s] >= 0) cand[slots[s]].d[0] = b;
        }
        cand[slots[kQuery]].d[2] = sq;
        need = std::max(need, probe.workspace_for(cand.data(), type, maskType));
      }
    }
    return need;
  } catch (const std::exception& e) {
    log_error(name_ + ": getWorkspaceSize: " + e.what());
  }
  return 0;
}

int32_t AsaPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                                 const nvinfer1::PluginTensorDesc*, int32_t nbOutputs) noexcept {
  try {
    resolve_slots(nbInputs);
    if (nbOutputs != getNbOutputs()) throw std::invalid_argument("unexpected output count");
    std::vector<Dims> dims(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i) dims[i] = in[i].dims;
    const std::string why = check_shapes(dims.data(), nbInputs);
    if (!why.empty()) throw std::invalid_argument(why);
    return 0;
  } catch (const std::exception& e) {
    log_error(name_ + ": onShapeChange: " + e.what());
  }
  return -1;
}

int32_t AsaPlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc,
                           const nvinfer1::PluginTensorDesc* outputDesc, const void* const* inputs,
                           void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  try {
    const int32_t nbInputs = nb_inputs_;
    if (nbInputs < 3) throw std::logic_error("enqueue before onShapeChange");
    std::vector<Dims> dims(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i) dims[i] = inputDesc[i].dims;
    const DataType maskType = slot(kMask) >= 0 ? inputDesc[slot(kMask)].type : DataType::kBOOL;
    AsaParams p = make_params(dims.data(), inputDesc[slot(kQuery)].type, maskType);
    p.q = inputs[slot(kQuery)];
    p.k = inputs[slot(kKey)];
    p.v = inputs[slot(kValue)];
    p.out = outputs[0];
    if (slot(kMask) >= 0) p.key_padding_mask = inputs[slot(kMask)];
    if (slot(kBias) >= 0) p.bias = inputs[slot(kBias)];
    if (slot(kThresholds) >= 0) p.head_thresholds = static_cast<const float*>(inputs[slot(kThresholds)]);
    if (slot(kGateQ) >= 0) {
      p.gate_q_weight = static_cast<const float*>(inputs[slot(kGateQ)]);
      p.gate_k_weight = static_cast<const float*>(inputs[slot(kGateK)]);
    }
    const int32_t nbOutputs = getNbOutputs();
    if (nbOutputs > 1) p.block_indices = static_cast<int32_t*>(outputs[1]);
    if (nbOutputs > 2) p.block_counts = static_cast<int32_t*>(outputs[2]);
    if (nbOutputs > 3) p.visible_counts = static_cast<int32_t*>(outputs[3]);
    (void)outputDesc;
    const size_t need = asa_cuda_workspace_size(&p);
    const cudaError_t err = asa_cuda_forward(&p, workspace, need, stream);
    if (err == cudaSuccess) return 0;
    log_error(name_ + ": asa_cuda_forward: " + asa_last_error());
  } catch (const std::exception& e) {
    log_error(name_ + ": enqueue: " + e.what());
  }
  return -1;
}

nvinfer1::IPluginV3* AsaPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept {
  return clone();
}

const nvinfer1::PluginFieldCollection* AsaPlugin::getFieldsToSerialize() noexcept {
  try {
    serial_fields_ = serialize_fields(config_);
    serial_fc_.nbFields = static_cast<int32_t>(serial_fields_.size());
    serial_fc_.fields = serial_fields_.data();
    return &serial_fc_;
  } catch (const std::exception& e) {
    log_error(name_ + ": getFieldsToSerialize: " + e.what());
  }
  return nullptr;
}

AsaPluginCreator::AsaPluginCreator() : fields_(field_names()) {
  fc_.nbFields = static_cast<int32_t>(fields_.size());
  fc_.fields = fields_.data();
}

nvinfer1::IPluginV3* AsaPluginCreator::createPlugin(const char* name,
                                                     const nvinfer1::PluginFieldCollection* fc,
                                                     nvinfer1::TensorRTPhase) noexcept {
  try {
    Config config;
    std::string error;
    const std::string node = name ? name : kPluginName;
    if (!parse_fields(fc, &config, &error)) {
      log_error(node + ": invalid AdaptiveSparseAttention attributes: " + error);
      return nullptr;
    }
    return new AsaPlugin(node, config);
  } catch (const std::exception& e) {
    log_error(std::string("createPlugin: ") + e.what());
  }
  return nullptr;
}

}  // namespace trt
}  // namespace asa
