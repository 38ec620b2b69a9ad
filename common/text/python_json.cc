#include "common/text/python_json.h"

#include <charconv>
#include <cmath>
#include <cstdio>

namespace tandem::text {
namespace {

void AppendQuoted(std::string& out, const std::string& text) {
  out.push_back('"');
  for (const char c : text) {
    switch (c) {
      case '"': out.append("\\\""); break;
      case '\\': out.append("\\\\"); break;
      case '\n': out.append("\\n"); break;
      case '\r': out.append("\\r"); break;
      case '\t': out.append("\\t"); break;
      case '\b': out.append("\\b"); break;
      case '\f': out.append("\\f"); break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof(buffer), "\\u%04x", static_cast<unsigned>(c));
          out.append(buffer);
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

void Dump(std::string& out, const nlohmann::ordered_json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null: out.append("null"); break;
    case nlohmann::json::value_t::boolean: out.append(value.get<bool>() ? "true" : "false"); break;
    case nlohmann::json::value_t::number_integer: out.append(std::to_string(value.get<int64_t>())); break;
    case nlohmann::json::value_t::number_unsigned: out.append(std::to_string(value.get<uint64_t>())); break;
    case nlohmann::json::value_t::number_float: out.append(PythonFloatRepr(value.get<double>())); break;
    case nlohmann::json::value_t::string: AppendQuoted(out, value.get_ref<const std::string&>()); break;
    case nlohmann::json::value_t::array: {
      out.push_back('[');
      bool first = true;
      for (const auto& item : value) {
        if (!first) out.append(", ");
        first = false;
        Dump(out, item);
      }
      out.push_back(']');
      break;
    }
    case nlohmann::json::value_t::object: {
      out.push_back('{');
      bool first = true;
      for (const auto& [key, item] : value.items()) {
        if (!first) out.append(", ");
        first = false;
        AppendQuoted(out, key);
        out.append(": ");
        Dump(out, item);
      }
      out.push_back('}');
      break;
    }
    default: out.append("null"); break;  // binary / discarded never come from parsed requests
  }
}

}  // namespace

std::string PythonFloatRepr(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::scientific);
  const std::string scientific(buffer, result.ptr);
  // scientific = [-]d[.ddd]e(+|-)XX
  std::string out;
  size_t pos = 0;
  if (scientific[0] == '-') {
    out.push_back('-');
    pos = 1;
  }
  const size_t e = scientific.find('e');
  std::string digits;
  for (size_t i = pos; i < e; ++i) {
    if (scientific[i] != '.') digits.push_back(scientific[i]);
  }
  const int exponent = std::stoi(scientific.substr(e + 1));
  if (exponent >= -4 && exponent < 16) {
    const int point = exponent + 1;  // digits before the decimal point
    const int count = static_cast<int>(digits.size());
    if (point <= 0) {
      out.append("0.").append(static_cast<size_t>(-point), '0').append(digits);
    } else if (point >= count) {
      out.append(digits).append(static_cast<size_t>(point - count), '0').append(".0");
    } else {
      out.append(digits.substr(0, static_cast<size_t>(point))).push_back('.');
      out.append(digits.substr(static_cast<size_t>(point)));
    }
    return out;
  }
  out.push_back(digits[0]);
  if (digits.size() > 1) out.append(".").append(digits.substr(1));
  char exponent_text[16];
  std::snprintf(exponent_text, sizeof(exponent_text), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
  out.append(exponent_text);
  return out;
}

std::string PythonJsonDumps(const nlohmann::ordered_json& value) {
  std::string out;
  Dump(out, value);
  return out;
}

}  // namespace tandem::text
