// Dynamic-library entry points of libasa_trt.so, as TensorRT 10 looks them up when it loads a
// plugin library (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary, Polygraphy --plugins,
// ONNX Runtime's trt_extra_plugin_lib_paths, engines that embed the library):
//   setLoggerFinder(finder)  -- the library hands over its logger before anything else
//   getCreators(n)           -- the IPluginCreatorV3One instances to register
// The library links no TensorRT library, so the same binary loads into TensorRT and TensorRT-RTX.
#include <atomic>
#include <cstdio>
#include <exception>
#include <string>

#include "asa_trt_log.h"
#include "asa_trt_plugin.h"

#define ASA_TRT_EXPORT extern "C" __attribute__((visibility("default")))

namespace asa {
namespace trt {
namespace {

std::atomic<nvinfer1::ILoggerFinder*> g_finder{nullptr};

}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept { g_finder.store(finder); }

void log(nvinfer1::ILogger::Severity severity, const std::string& message) noexcept {
  try {
    const std::string text = std::string("[asa::AdaptiveSparseAttention] ") + message;
    nvinfer1::ILoggerFinder* finder = g_finder.load();
    nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger) {
      logger->log(severity, text.c_str());
    } else if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
      std::fprintf(stderr, "%s\n", text.c_str());
    }
  } catch (...) {
    // Logging must never throw into TensorRT.
  }
}

}  // namespace trt
}  // namespace asa

ASA_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  asa::trt::set_logger_finder(finder);
}

ASA_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  nbCreators = 0;
  try {
    // Static storage: TensorRT keeps the pointers for the lifetime of the library.
    static asa::trt::AsaPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
  } catch (const std::exception& e) {
    asa::trt::log_error(std::string("getCreators: ") + e.what());
  }
  return nullptr;
}
