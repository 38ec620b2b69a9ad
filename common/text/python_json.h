// JSON text exactly as Python's json.dumps(value, ensure_ascii=False) writes it: the form the
// DeepSeek reference encoder puts into prompts (", " and ": " separators, key order kept).
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace tandem::text {

std::string PythonJsonDumps(const nlohmann::ordered_json& value);

// Python's repr() of a float (shortest round-trip digits; exponent form outside 1e-4 <= |x| < 1e16).
std::string PythonFloatRepr(double value);

}  // namespace tandem::text
