// Logging: spdlog behind one init call, so every binary formats lines the same way.
#pragma once

#include <string_view>

#include <spdlog/spdlog.h>

namespace tandem {

// level: trace|debug|info|warn|error. Unknown names fall back to info.
void InitLogging(std::string_view level);

}  // namespace tandem
