// Status: the error channel of the C++ API. Every failure names the offending argument.
#pragma once

#include <string>
#include <utility>

namespace flash_attention {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // a malformed call (message names the argument)
  kNotSupported = 2,     // a valid call this build / device / backend cannot serve
  kCudaError = 3,        // a CUDA runtime error
  kInternal = 4,
};

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotSupported(std::string m) { return {StatusCode::kNotSupported, std::move(m)}; }
  static Status CudaError(std::string m) { return {StatusCode::kCudaError, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace flash_attention

// Early-return helper for functions returning Status.
#define FA_RETURN_IF_ERROR(expr)                      \
  do {                                                \
    ::flash_attention::Status _fa_status = (expr);    \
    if (!_fa_status.ok()) return _fa_status;          \
  } while (0)
