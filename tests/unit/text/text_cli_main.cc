// `tandem-text-cli tokenize|detokenize DIR`: the same commands as tandem-model's, for builds without
// tools/ (core-only) so the tokenizer parity test can run there too.
#include <string>
#include <vector>

#include "common/text/cli.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || (args[0] != "tokenize" && args[0] != "detokenize")) {
    return tandem::text::RunTokenizeCommand({"--help"}, false) == 0 ? 2 : 2;
  }
  const bool detokenize = args[0] == "detokenize";
  args.erase(args.begin());
  return tandem::text::RunTokenizeCommand(args, detokenize);
}
