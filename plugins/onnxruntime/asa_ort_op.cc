// Attribute parsing, validation and AsaParams fill of the ONNX Runtime adapter.
#include "asa_ort_op.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace asa {
namespace ort {
namespace {

[[noreturn]] void fail(const Attributes& a, const char* fmt, ...) {
  char msg[768];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(msg, sizeof(msg), fmt, args);
  va_end(args);
  std::string text = std::string("asa::AdaptiveSparseAttention node '") + a.node_name + "': " + msg;
  throw Ort::Exception(std::move(text), ORT_INVALID_ARGUMENT);
}

// Turns the status of an attribute read into: absent (keep the default, returns false), read
// (true), or an error for an attribute of the wrong type.
bool attr_status(const OrtApi& api, OrtStatus* st, const char* name, const char* type,
                 const std::string& node) {
  if (!st) return true;
  const std::string msg = api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  if (msg.find("No attribute") != std::string::npos) return false;
  throw Ort::Exception("asa::AdaptiveSparseAttention node '" + node + "': attribute " + name +
                           " must be a " + type + " (" + msg + ")",
                       ORT_INVALID_ARGUMENT);
}

// Reads one contract attribute (the shared table's entry `d`): absent keeps the default, a
// wrong type or an integer outside int32 is an error.
void read_contract_attr(const OrtApi& api, const OrtKernelInfo* info, const AttributeDesc& d,
                        Attributes& a) {
  double value = 0.0;
  if (d.is_float) {
    float x = 0.0f;
    if (!attr_status(api, api.KernelInfoGetAttribute_float(info, d.name, &x), d.name, "float",
                     a.node_name))
      return;
    value = x;
  } else {
    int64_t x = 0;
    if (!attr_status(api, api.KernelInfoGetAttribute_int64(info, d.name, &x), d.name, "int",
                     a.node_name))
      return;
    value = static_cast<double>(x);
  }
  const std::string why = set_attribute(a.values, d, value);
  if (!why.empty()) fail(a, "attribute %s", why.c_str());
}

// Reads an informational string attribute (plugin_namespace / plugin_version); odd types are
// ignored.
void read_string_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name,
                      std::string& v) {
  size_t size = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st) {
    api.ReleaseStatus(st);
    return;
  }
  std::string buf(size, '\0');
  st = api.KernelInfoGetAttribute_string(info, name, &buf[0], &size);
  if (st) {
    api.ReleaseStatus(st);
    return;
  }
  buf.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  v = buf;
}

std::string node_name(const OrtApi& api, const OrtKernelInfo* info) {
  size_t size = 0;
  OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &size);
  if (st) {
    api.ReleaseStatus(st);
    return "?";
  }
  std::string buf(size, '\0');
  st = api.KernelInfo_GetNodeName(info, &buf[0], &size);
  if (st) {
    api.ReleaseStatus(st);
    return "?";
  }
  buf.resize(size > 0 ? size - 1 : 0);
  return buf;
}

void check_attributes(const Attributes& a) {
  const std::string why = validation_errors(a.values);
  if (!why.empty()) fail(a, "invalid attributes: %s", why.c_str());
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    default: return "another type";
  }
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

struct TensorView {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
};

bool view_input(Ort::KernelContext& ctx, size_t index, TensorView& view) {
  if (index >= ctx.GetInputCount()) return false;
  Ort::ConstValue value = ctx.GetInput(index);
  if (value == nullptr) return false;
  auto info = value.GetTensorTypeAndShapeInfo();
  view.type = info.GetElementType();
  view.shape = info.GetShape();
  view.data = value.GetTensorRawData();
  return true;
}

AsaDType to_asa_dtype(const Attributes& a, const TensorView& q) {
  switch (q.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return ASA_FLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return ASA_FLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return ASA_BFLOAT16;
    default:
      fail(a, "query must be float32, float16 or bfloat16, got %s", type_name(q.type));
  }
}

void check_qkv(const Attributes& a, const TensorView& q, const TensorView& k, const TensorView& v) {
  const char* names[3] = {"query", "key", "value"};
  const TensorView* t[3] = {&q, &k, &v};
  for (int x = 0; x < 3; ++x) {
    if (t[x]->shape.size() != 4)
      fail(a, "%s must be 4-D [B, H, S, D], got rank %zu with shape %s", names[x],
           t[x]->shape.size(), shape_text(t[x]->shape).c_str());
    if (t[x]->type != q.type)
      fail(a, "%s has type %s but query has type %s; all three must match", names[x],
           type_name(t[x]->type), type_name(q.type));
  }
  if (k.shape[0] != q.shape[0] || v.shape[0] != q.shape[0])
    fail(a, "batch sizes differ: query %s, key %s, value %s", shape_text(q.shape).c_str(),
         shape_text(k.shape).c_str(), shape_text(v.shape).c_str());
  if (k.shape[3] != q.shape[3])
    fail(a, "query head dim %lld and key head dim %lld differ", (long long)q.shape[3],
         (long long)k.shape[3]);
  if (v.shape[1] != k.shape[1] || v.shape[2] != k.shape[2])
    fail(a, "key %s and value %s disagree on [Hkv, Skv]", shape_text(k.shape).c_str(),
         shape_text(v.shape).c_str());
  if (k.shape[1] < 1 || q.shape[1] % k.shape[1] != 0)
    fail(a, "query heads (%lld) must be a multiple of key/value heads (%lld)",
         (long long)q.shape[1], (long long)k.shape[1]);
  if (q.shape[3] < 1 || v.shape[3] < 1) fail(a, "head dims must be >= 1");
  for (int x = 0; x < 3; ++x)
    for (int64_t d : t[x]->shape)
      if (d > INT32_MAX) fail(a, "%s dimension %lld is too large", names[x], (long long)d);
}

void set_mask(const Attributes& a, const TensorView& m, AsaParams& p) {
  if (m.shape.size() != 2 || m.shape[0] != p.batch || m.shape[1] != p.seq_kv)
    fail(a, "key_padding_mask must have shape [B, Skv] = [%d, %d], got %s", p.batch, p.seq_kv,
         shape_text(m.shape).c_str());
  switch (m.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: p.mask_dtype = ASA_MASK_BOOL; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: p.mask_dtype = ASA_MASK_INT32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: p.mask_dtype = ASA_MASK_INT64; break;
    default: fail(a, "key_padding_mask must be bool, int32 or int64, got %s", type_name(m.type));
  }
  p.key_padding_mask = m.data;
  p.mask_stride_b = p.seq_kv;
}

// Broadcast strides of a bias right-aligned against [B, Hq, Sq, Skv].
void set_bias(const Attributes& a, const TensorView& bias, const TensorView& q, AsaParams& p) {
  if (bias.type != q.type)
    fail(a, "attn_bias has type %s but query has type %s", type_name(bias.type), type_name(q.type));
  const int64_t full[4] = {p.batch, p.heads_q, p.seq_q, p.seq_kv};
  if (bias.shape.size() > 4)
    fail(a, "attn_bias must have rank <= 4, got shape %s", shape_text(bias.shape).c_str());
  int64_t strides[4] = {0, 0, 0, 0};
  int64_t stride = 1;
  const int off = 4 - static_cast<int>(bias.shape.size());
  for (int d = 3; d >= off; --d) {
    const int64_t n = bias.shape[d - off];
    if (n != 1 && n != full[d])
      fail(a, "attn_bias shape %s is not broadcastable to [B, Hq, Sq, Skv] = [%lld, %lld, %lld, %lld]",
           shape_text(bias.shape).c_str(), (long long)full[0], (long long)full[1],
           (long long)full[2], (long long)full[3]);
    strides[d] = n == 1 ? 0 : stride;
    stride *= n;
  }
  p.bias = bias.data;
  p.bias_stride_b = strides[0];
  p.bias_stride_h = strides[1];
  p.bias_stride_q = strides[2];
  p.bias_stride_k = strides[3];
}

// `on_host`: the values can be read here (CPU); device thresholds are checked by the core.
void set_thresholds(const Attributes& a, const TensorView& t, AsaParams& p, bool on_host) {
  if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    fail(a, "head_thresholds must be float32, got %s", type_name(t.type));
  if (t.shape.size() != 1 || t.shape[0] != p.heads_q)
    fail(a, "head_thresholds must have shape [Hq] = [%d], got %s", p.heads_q,
         shape_text(t.shape).c_str());
  const float* tau = static_cast<const float*>(t.data);
  for (int h = 0; on_host && h < p.heads_q; ++h)
    if (!(tau[h] > 0.0f) || !std::isfinite(tau[h]))
      fail(a, "head_thresholds[%d] must be finite and > 0, got %g", h, tau[h]);
  p.head_thresholds = tau;
}

// The learned gate (inputs 6-7): both or neither, float32, [Hq, D, Dg] and [Hkv, 3·D, Dg].
void set_gate(const Attributes& a, bool has_q, const TensorView& wq, bool has_k,
              const TensorView& wk, AsaParams& p) {
  if (!has_q && !has_k) return;
  if (has_q != has_k)
    fail(a, "the learned gate needs both gate_q_weight (input 6) and gate_k_weight (input 7); "
            "got only %s", has_q ? "gate_q_weight" : "gate_k_weight");
  if (wq.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || wk.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    fail(a, "gate_q_weight and gate_k_weight must be float32, got %s and %s", type_name(wq.type),
         type_name(wk.type));
  if (wq.shape.size() != 3 || wq.shape[0] != p.heads_q || wq.shape[1] != p.head_dim ||
      wq.shape[2] < 1 || wq.shape[2] > INT32_MAX)
    fail(a, "gate_q_weight must have shape [Hq, D, Dg] = [%d, %d, Dg >= 1], got %s", p.heads_q,
         p.head_dim, shape_text(wq.shape).c_str());
  const int64_t dg = wq.shape[2];
  if (wk.shape.size() != 3 || wk.shape[0] != p.heads_kv || wk.shape[1] != 3 * int64_t{p.head_dim} ||
      wk.shape[2] != dg)
    fail(a, "gate_k_weight must have shape [Hkv, 3*D, Dg] = [%d, %lld, %lld] (Dg from "
            "gate_q_weight), got %s", p.heads_kv, 3 * (long long)p.head_dim, (long long)dg,
         shape_text(wk.shape).c_str());
  p.gate_q_weight = static_cast<const float*>(wq.data);
  p.gate_k_weight = static_cast<const float*>(wk.data);
  p.gate_dim = static_cast<int32_t>(dg);
}

void fill_sizes(const Attributes& a, const TensorView& q, const TensorView& k,
                const TensorView& v, AsaParams& p) {
  std::memset(&p, 0, sizeof(p));
  p.batch = static_cast<int32_t>(q.shape[0]);
  p.heads_q = static_cast<int32_t>(q.shape[1]);
  p.seq_q = static_cast<int32_t>(q.shape[2]);
  p.head_dim = static_cast<int32_t>(q.shape[3]);
  p.heads_kv = static_cast<int32_t>(k.shape[1]);
  p.seq_kv = static_cast<int32_t>(k.shape[2]);
  p.head_dim_v = static_cast<int32_t>(v.shape[3]);
  p.dtype = to_asa_dtype(a, q);
  p.q = q.data;
  p.q_stride_s = p.head_dim;
  p.q_stride_h = p.q_stride_s * p.seq_q;
  p.q_stride_b = p.q_stride_h * p.heads_q;
  p.k = k.data;
  p.k_stride_s = p.head_dim;
  p.k_stride_h = p.k_stride_s * p.seq_kv;
  p.k_stride_b = p.k_stride_h * p.heads_kv;
  p.v = v.data;
  p.v_stride_s = p.head_dim_v;
  p.v_stride_h = p.v_stride_s * p.seq_kv;
  p.v_stride_b = p.v_stride_h * p.heads_kv;
  p.o_stride_s = p.head_dim_v;
  p.o_stride_h = p.o_stride_s * p.seq_q;
  p.o_stride_b = p.o_stride_h * p.heads_q;
  fill_attributes(a.values, p);
}

int32_t* int_output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& dims) {
  if (index >= ctx.GetOutputCount()) return nullptr;
  Ort::UnownedValue out = ctx.GetOutput(index, dims);
  if (out == nullptr) return nullptr;
  return out.GetTensorMutableData<int32_t>();
}

int64_t numel(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

using Dim = Ort::ShapeInferContext::SymbolicInteger;

int64_t attr_or(Ort::ShapeInferContext& ctx, const char* name, int64_t fallback) {
  try {
    return ctx.GetAttrInt(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

Dim blocks_of(const Dim& length, int64_t block_size) {
  if (!length.IsInt() || length.AsInt() < 0) return Dim(int64_t{-1});
  return Dim((length.AsInt() + block_size - 1) / block_size);
}

// Sets one output's type and shape through the C API. (The C++ wrapper of the 1.21 headers
// marks symbolic dims with -2, which newer runtimes reject; -1 + a name works everywhere.)
OrtStatus* set_output(OrtShapeInferContext* context, size_t index,
                      const Ort::ShapeInferContext::Shape& shape, ONNXTensorElementDataType type) {
  const OrtApi& api = Ort::GetApi();
  std::vector<int64_t> dims;
  std::vector<const char*> names;
  for (const Dim& d : shape) {
    const bool named = !d.IsInt() && d.AsSym() && d.AsSym()[0] != '\0';
    dims.push_back(named ? -1 : (d.IsInt() && d.AsInt() >= 0 ? d.AsInt() : -1));
    names.push_back(named ? d.AsSym() : "");
  }
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&info);
  if (!st) st = api.SetTensorElementType(info, type);
  if (!st) st = api.SetDimensions(info, dims.data(), dims.size());
  if (!st) st = api.SetSymbolicDimensions(info, names.data(), names.size());
  if (!st) st = api.ShapeInferContext_SetOutputTypeShape(context, index, info);
  if (info) api.ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

void set_optional_output(OrtShapeInferContext* context, size_t index,
                         const Ort::ShapeInferContext::Shape& shape) {
  // The node may not have this output: that is not an error.
  if (OrtStatus* st = set_output(context, index, shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32))
    Ort::GetApi().ReleaseStatus(st);
}

}  // namespace

OrtStatusPtr infer_output_shapes(OrtShapeInferContext* context) {
  const OrtApi& api = Ort::GetApi();
  try {
    Ort::ShapeInferContext ctx(&api, context);
    OrtTensorTypeAndShapeInfo* qinfo = nullptr;
    Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(context, 0, &qinfo));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    // The info belongs to the context (the C++ wrapper releases its own copy, not this one).
    if (OrtStatus* st = api.GetTensorElementType(qinfo, &type)) return st;
    const Dim unknown(int64_t{-1});
    Ort::ShapeInferContext::Shape q = ctx.GetInputShape(0), k, v;
    if (ctx.GetInputCount() >= 3) {
      k = ctx.GetInputShape(1);
      v = ctx.GetInputShape(2);
    }
    if (q.size() != 4 || k.size() != 4 || v.size() != 4) {
      // Wrong ranks: the kernel reports them; give the output its type so the graph resolves.
      return set_output(context, 0, {unknown, unknown, unknown, unknown}, type);
    }
    const int64_t b = attr_or(ctx, "block_size", 64);
    const bool per_group = attr_or(ctx, "select_per", 0) == 1;
    const Dim nq = (b == 64 || b == 128) ? blocks_of(q[2], b) : unknown;
    const Dim nk = (b == 64 || b == 128) ? blocks_of(k[2], b) : unknown;
    const Dim hsel = per_group ? k[1] : q[1];
    if (OrtStatus* st = set_output(context, 0, {q[0], q[1], q[2], v[3]}, type)) return st;
    set_optional_output(context, 1, {q[0], hsel, nq, nk});
    set_optional_output(context, 2, {q[0], hsel, nq});
    set_optional_output(context, 3, {q[0], nq});
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, e.what());
  }
}

Attributes read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
  Attributes a;
  a.node_name = node_name(api, info);
  for (const AttributeDesc& d : kContractAttributes) read_contract_attr(api, info, d, a);
  read_string_attr(api, info, "plugin_namespace", a.plugin_namespace);
  read_string_attr(api, info, "plugin_version", a.plugin_version);
  check_attributes(a);
  return a;
}

bool prepare(const Attributes& a, Ort::KernelContext& ctx, AsaParams& p, Scratch* scratch) {
  TensorView q, k, v, mask, bias, thr, gate_q, gate_k;
  if (!view_input(ctx, 0, q) || !view_input(ctx, 1, k) || !view_input(ctx, 2, v))
    fail(a, "query, key and value are required inputs");
  check_qkv(a, q, k, v);
  fill_sizes(a, q, k, v, p);
  if (view_input(ctx, 3, mask)) set_mask(a, mask, p);
  if (view_input(ctx, 4, bias)) set_bias(a, bias, q, p);
  if (view_input(ctx, 5, thr)) set_thresholds(a, thr, p, scratch != nullptr);
  const bool has_gate_q = view_input(ctx, 6, gate_q);
  set_gate(a, has_gate_q, gate_q, view_input(ctx, 7, gate_k), gate_k, p);

  const int64_t nq = (p.seq_q + p.block_size - 1) / p.block_size;
  const int64_t nk = (p.seq_kv + p.block_size - 1) / p.block_size;
  const int64_t hsel = p.select_per ? p.heads_kv : p.heads_q;
  const std::vector<int64_t> out_dims = {p.batch, p.heads_q, p.seq_q, p.head_dim_v};
  Ort::UnownedValue out = ctx.GetOutput(0, out_dims);
  p.out = out.GetTensorMutableRawData();
  p.block_indices = int_output(ctx, 1, {p.batch, hsel, nq, nk});
  p.block_counts = int_output(ctx, 2, {p.batch, hsel, nq});
  p.visible_counts = int_output(ctx, 3, {p.batch, nq});

  if (numel(out_dims) == 0) return false;
  if (p.seq_kv == 0) {
    if (!scratch) fail(a, "key length 0 is not supported on this execution provider");
    // Nothing to attend: rows with no key are zeros; telemetry counts are zero.
    const size_t elem = p.dtype == ASA_FLOAT32 ? 4 : 2;
    if (p.out) std::memset(p.out, 0, numel(out_dims) * elem);
    if (p.block_counts) std::fill(p.block_counts, p.block_counts + p.batch * hsel * nq, 0);
    if (p.visible_counts) std::fill(p.visible_counts, p.visible_counts + p.batch * nq, 0);
    return false;
  }
  if (!scratch) return true;
  if (!p.block_indices) {
    scratch->block_indices.resize(p.batch * hsel * nq * nk);
    p.block_indices = scratch->block_indices.data();
  }
  if (!p.block_counts) {
    scratch->block_counts.resize(p.batch * hsel * nq);
    p.block_counts = scratch->block_counts.data();
  }
  return true;
}

}  // namespace ort
}  // namespace asa
