// tandem-model: make, inspect and run DSV4 checkpoints offline.
#include <iostream>

#include "common/core/logging.h"
#include "tools/model/commands.h"

#ifdef TANDEM_HAVE_TEXT
#include "common/text/cli.h"
#endif

int main(int argc, char** argv) {
  CLI::App app{"tandem-model: generate, inspect and run DeepSeek-V4 checkpoints"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error");
  int exit_code = 0;
  tandem::tools::AddGenerateCommand(app, exit_code);
  tandem::tools::AddInspectCommand(app, exit_code);
  tandem::tools::AddQuantVectorsCommand(app, exit_code);
  tandem::tools::AddRunCommands(app, exit_code);
#ifdef TANDEM_HAVE_TEXT
  for (bool detokenize : {false, true}) {
    auto* cmd = app.add_subcommand(detokenize ? "detokenize" : "tokenize",
                                   detokenize ? "ids on stdin -> text on stdout" : "text on stdin -> ids on stdout");
    cmd->allow_extras();
    cmd->footer(std::string(tandem::text::TokenizeCommandUsage()));
    cmd->callback([cmd, detokenize, &exit_code] {
      exit_code = tandem::text::RunTokenizeCommand(cmd->remaining(), detokenize);
    });
  }
#endif
  app.parse_complete_callback([&] { tandem::InitLogging(log_level); });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
