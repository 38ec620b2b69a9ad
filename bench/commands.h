// Subcommands of tandem-bench; each sets the process exit code and prints its own errors.
#pragma once

#include <CLI/CLI.hpp>

namespace tandem::bench {

void AddKernelsCommand(CLI::App& app, int& exit_code);  // tandem-bench kernels
void AddServeCommand(CLI::App& app, int& exit_code);    // tandem-bench serve

}  // namespace tandem::bench
