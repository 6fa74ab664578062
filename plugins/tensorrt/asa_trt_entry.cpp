// Dynamic-library entry points of libasa_trt.so, as TensorRT 10 looks them up when it loads a
// plugin library (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary, Polygraphy --plugins,
// ONNX Runtime's trt_extra_plugin_lib_paths, engines that embed the library):
//   setLoggerFinder(finder)  -- the library hands over its logger before anything else
//   getCreators(n)           -- the IPluginCreatorV3One instances to register
// The library links no TensorRT library, so the same binary loads into TensorRT and TensorRT-RTX.
//
// Loaders that only dlopen the library (Polygraphy --plugins uses ctypes.CDLL) never call
// getCreators; for them a load-time initializer registers the creator with the registry of a
// TensorRT library already in the process (found with RTLD_NOLOAD: it never loads one). When
// TensorRT then loads us through loadLibrary, getCreators first withdraws that registration so
// TensorRT registers the creator under the library's handle, once. Only libnvinfer qualifies:
// calling a registry means using its vtable, and TensorRT-RTX's IPluginRegistry is laid out
// differently from TensorRT 10.14's headers (seen here: getAllCreators through those headers
// leaves its count untouched and getCreator crashes). TensorRT-RTX loads us via loadLibrary.
#include <dlfcn.h>

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

AsaPluginCreator& the_creator() {
  static AsaPluginCreator creator;  // TensorRT keeps pointers for the library's lifetime
  return creator;
}

// Registry of a TensorRT / TensorRT-RTX library already loaded in this process, or nullptr.
nvinfer1::IPluginRegistry* loaded_registry() noexcept {
  static const char* const kLibraries[] = {"libnvinfer.so.10", "libnvinfer.so.11"};
  using GetRegistry = nvinfer1::IPluginRegistry* (*)();
  for (const char* name : kLibraries) {
    void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == nullptr) continue;
    auto get = reinterpret_cast<GetRegistry>(dlsym(handle, "getPluginRegistry"));
    nvinfer1::IPluginRegistry* registry = get ? get() : nullptr;
    dlclose(handle);  // drops only the reference RTLD_NOLOAD added
    if (registry != nullptr) return registry;
  }
  return nullptr;
}

std::atomic<nvinfer1::IPluginRegistry*> g_self_registered{nullptr};

// Runs when the library is loaded.
__attribute__((constructor)) void register_on_load() noexcept {
  try {
    nvinfer1::IPluginRegistry* registry = loaded_registry();
    if (registry == nullptr ||
        registry->getCreator(kPluginName, kPluginVersion, kPluginNamespace) != nullptr) {
      return;
    }
    if (registry->registerCreator(the_creator(), kPluginNamespace)) {
      g_self_registered.store(registry);
    }
  } catch (...) {
    // A loader that wants the plugin will call getCreators.
  }
}

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
    if (nvinfer1::IPluginRegistry* registry = asa::trt::g_self_registered.exchange(nullptr)) {
      registry->deregisterCreator(asa::trt::the_creator());
    }
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&asa::trt::the_creator()};
    nbCreators = 1;
    return creators;
  } catch (const std::exception& e) {
    asa::trt::log_error(std::string("getCreators: ") + e.what());
  }
  return nullptr;
}
