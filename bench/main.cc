// tandem-bench: Tandem's benchmarks, one subcommand each; every one prints a short table and writes
// CSV plus a PNG plot.
#include "bench/commands.h"
#include "common/core/logging.h"

int main(int argc, char** argv) {
  CLI::App app{"tandem-bench: benchmarks of the Tandem DeepSeek-V4 server"};
  app.require_subcommand(1);
  std::string log_level = "warn";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error");
  int exit_code = 0;
  tandem::bench::AddKernelsCommand(app, exit_code);
  tandem::bench::AddServeCommand(app, exit_code);
  app.parse_complete_callback([&] { tandem::InitLogging(log_level); });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
