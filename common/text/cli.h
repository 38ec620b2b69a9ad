// `tandem-model tokenize DIR` / `detokenize DIR`: stdin → stdout conversions between text and ids.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace tandem::text {

// args: everything after the subcommand: DIR [--json] [--skip-special-tokens] [--help].
// tokenize: one input line of text (a JSON string per line with --json) → one line of
// space-separated ids. detokenize: one line of space-separated ids (or a JSON array) → the text
// (a JSON string per line with --json, so newlines survive). Returns the exit code; never throws.
int RunTokenizeCommand(const std::vector<std::string>& args, bool detokenize);

// The usage text of both commands (for the caller's --help).
std::string_view TokenizeCommandUsage();

}  // namespace tandem::text
