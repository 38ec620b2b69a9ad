// Subcommands of tandem-model; each returns the process exit code and prints its own errors.
#pragma once

#include <CLI/CLI.hpp>

namespace tandem::tools {

void AddGenerateCommand(CLI::App& app, int& exit_code);
void AddInspectCommand(CLI::App& app, int& exit_code);
void AddQuantVectorsCommand(CLI::App& app, int& exit_code);
void AddRunCommands(CLI::App& app, int& exit_code);  // run, forward

}  // namespace tandem::tools
