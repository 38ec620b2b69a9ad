#include "common/text/dsml_structure.h"

#include "absl/strings/str_cat.h"
#include "common/text/dsml_parser.h"

namespace tandem::text {

DsmlCallStructure DsmlStructureFor(std::string_view tool_name) {
  // std::string_view does not convert to Debian's absl::string_view, so no StrCat here.
  DsmlCallStructure structure;
  structure.begin.append(dsml::kInvokeStart).append(" name=\"").append(tool_name).append("\">\n");
  structure.end.append(dsml::kInvokeEnd).append("\n");
  structure.trigger = std::string(dsml::kStructureTrigger);
  return structure;
}

absl::StatusOr<nlohmann::ordered_json> DsmlStructuralTag(const nlohmann::ordered_json& tools,
                                                         const std::optional<std::string>& only_tool) {
  using Json = nlohmann::ordered_json;
  if (!tools.is_array()) return absl::InvalidArgumentError("structural tag: tools must be a list");
  Json structures = Json::array();
  bool found = false;
  for (size_t i = 0; i < tools.size(); ++i) {
    const Json& tool = tools[i];
    const Json* function = tool.is_object() && tool.contains("function") ? &tool["function"] : nullptr;
    if (function == nullptr || !function->is_object() || !function->contains("name") ||
        !(*function)["name"].is_string() || (*function)["name"].get_ref<const std::string&>().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("structural tag: tools[", i, "] has no function name"));
    }
    const std::string& name = (*function)["name"].get_ref<const std::string&>();
    if (only_tool.has_value() && name != *only_tool) continue;
    found = true;
    const DsmlCallStructure structure = DsmlStructureFor(name);
    Json schema = function->contains("parameters") && (*function)["parameters"].is_object()
                      ? (*function)["parameters"]
                      : Json{{"type", "object"}};
    structures.push_back(Json{{"begin", structure.begin}, {"schema", std::move(schema)}, {"end", structure.end}});
  }
  if (only_tool.has_value() && !found) {
    return absl::InvalidArgumentError(absl::StrCat("structural tag: tool_choice names \"", *only_tool,
                                                   "\", which is not in tools"));
  }
  return Json{{"type", "structural_tag"},
              {"structures", std::move(structures)},
              {"triggers", Json::array({std::string(dsml::kStructureTrigger)})}};
}

}  // namespace tandem::text
