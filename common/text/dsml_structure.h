// What constrained decoding needs to know about DSML tool calls (sglang's structure_info and
// structural tag for the deepseekv4 detector): how one call begins and ends, and what triggers it.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/core/status.h"

namespace tandem::text {

struct DsmlCallStructure {
  std::string begin;    // <｜DSML｜invoke name="NAME">  + "\n"
  std::string end;      // </｜DSML｜invoke> + one "\n": the next invoke or the section end follows
  std::string trigger;  // <｜DSML｜invoke
};

DsmlCallStructure DsmlStructureFor(std::string_view tool_name);

// The structural tag sglang sends with tool_choice "auto" (a response_format of type
// "structural_tag"): one structure per tool whose body is the JSON arguments, constrained by the
// tool's `parameters` schema, triggered by the invoke tag. `tools` is the request's OpenAI tools
// list; `only_tool` (a named tool_choice) keeps that tool alone. A tool without a function name,
// or a named tool missing from the list, is InvalidArgument. Thinking-aware and "required" forms
// (xgrammar's built-in deepseek_v4 tag) are the grammar layer's and not built here.
absl::StatusOr<nlohmann::ordered_json> DsmlStructuralTag(const nlohmann::ordered_json& tools,
                                                         const std::optional<std::string>& only_tool = std::nullopt);

}  // namespace tandem::text
