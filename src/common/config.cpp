// dtype helpers and the KernelConfig string form ("auto", "sm80:m128n64w4s2[q]").
#include "flash_attention/config.h"

#include <cctype>
#include <cstdlib>

#include "flash_attention/flash_attention.h"

namespace flash_attention {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat8E4M3:
      return "float8_e4m3";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat8E4M3:
      return 1;
  }
  return 0;
}

std::string KernelConfig::to_string() const {
  if (is_auto()) return "auto";
  std::string s = "sm" + std::to_string(static_cast<int>(path)) + ":m" + std::to_string(block_m) + "n" +
                  std::to_string(block_n) + "w" + std::to_string(num_warps) + "s" + std::to_string(stages);
  if (q_in_regs) s += "q";
  return s;
}

namespace {

// Reads "<letter><positive int>" at text[*pos]; advances *pos.
bool read_field(const std::string& text, std::size_t* pos, char letter, int* value) {
  if (*pos >= text.size() || text[*pos] != letter) return false;
  std::size_t end = *pos + 1;
  while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
  if (end == *pos + 1 || end - *pos > 6) return false;
  *value = std::atoi(text.c_str() + *pos + 1);
  *pos = end;
  return *value > 0;
}

}  // namespace

Status KernelConfig::parse(const std::string& text, KernelConfig* out) {
  if (out == nullptr) return Status::InvalidArgument("KernelConfig::parse: out is null");
  const Status bad = Status::InvalidArgument(
      "config: cannot parse '" + text +
      "' (expected \"auto\" or e.g. \"sm80:m128n64w4s2\", \"sm90:m128n128w12s2\", optional trailing 'q')");
  if (text.empty() || text == "auto") {
    *out = KernelConfig();
    return Status::Ok();
  }
  KernelConfig c;
  if (text.rfind("sm80:", 0) == 0) {
    c.path = KernelPath::kSm80;
  } else if (text.rfind("sm90:", 0) == 0) {
    c.path = KernelPath::kSm90;
  } else {
    return bad;
  }
  std::size_t pos = 5;
  if (!read_field(text, &pos, 'm', &c.block_m) || !read_field(text, &pos, 'n', &c.block_n) ||
      !read_field(text, &pos, 'w', &c.num_warps) || !read_field(text, &pos, 's', &c.stages)) {
    return bad;
  }
  if (pos < text.size() && text[pos] == 'q') {
    c.q_in_regs = true;
    ++pos;
  }
  if (pos != text.size()) return bad;
  *out = c;
  return Status::Ok();
}

}  // namespace flash_attention
