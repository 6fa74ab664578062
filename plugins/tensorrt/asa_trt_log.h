// Logging for the TensorRT adapter: messages go to the logger of the TensorRT (or TensorRT-RTX)
// library that loaded the plugin, found through the ILoggerFinder it hands to setLoggerFinder().
// The plugin links no TensorRT library, so one binary loads into either.
#ifndef ASA_TRT_LOG_H_
#define ASA_TRT_LOG_H_

#include <string>

#include "NvInferRuntime.h"

namespace asa {
namespace trt {

// Stores the finder given by the loading library (nullptr resets).
void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;

// Logs `message` prefixed with the plugin name; falls back to stderr when no logger is known.
void log(nvinfer1::ILogger::Severity severity, const std::string& message) noexcept;

inline void log_error(const std::string& message) noexcept {
  log(nvinfer1::ILogger::Severity::kERROR, message);
}

}  // namespace trt
}  // namespace asa

#endif  // ASA_TRT_LOG_H_
