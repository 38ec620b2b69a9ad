#include "common/text/cli.h"

#include <charconv>
#include <cstdio>
#include <iostream>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/text/tokenizer.h"

namespace tandem::text {
namespace {

constexpr std::string_view kUsage =
    "usage: tandem-model tokenize DIR [--json]\n"
    "       tandem-model detokenize DIR [--json] [--skip-special-tokens]\n"
    "  tokenize:   each stdin line (a JSON string per line with --json) -> space-separated ids\n"
    "  detokenize: each stdin line of space-separated ids (or a JSON array) -> text\n"
    "              (a JSON string per line with --json)\n";

struct Options {
  std::string dir;
  bool json = false;
  bool skip_special = false;
  bool help = false;
};

absl::StatusOr<Options> ParseArgs(const std::vector<std::string>& args) {
  Options options;
  for (const std::string& arg : args) {
    if (arg == "--json") {
      options.json = true;
    } else if (arg == "--skip-special-tokens") {
      options.skip_special = true;
    } else if (arg == "--help" || arg == "-h") {
      options.help = true;
    } else if (!arg.empty() && arg[0] == '-') {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", arg));
    } else if (options.dir.empty()) {
      options.dir = arg;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument ", arg));
    }
  }
  if (options.dir.empty() && !options.help) return absl::InvalidArgumentError("missing model DIR");
  return options;
}

absl::StatusOr<std::string> TextOfJsonLine(const std::string& line) {
  const nlohmann::json value = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("text") && value["text"].is_string()) {
    return value["text"].get<std::string>();
  }
  return absl::InvalidArgumentError("expected a JSON string (or an object with a \"text\" string)");
}

absl::StatusOr<std::vector<TokenId>> IdsOfLine(const std::string& line, const Tokenizer& tokenizer) {
  std::vector<TokenId> ids;
  std::string_view rest = line;
  const size_t first = rest.find_first_not_of(" \t\r");
  if (first != std::string_view::npos && rest[first] == '[') {
    const nlohmann::json value = nlohmann::json::parse(line, nullptr, false);
    if (!value.is_array()) return absl::InvalidArgumentError("expected a JSON array of token ids");
    for (const auto& id : value) {
      if (!id.is_number_integer()) return absl::InvalidArgumentError("token ids must be integers");
      const int64_t number = id.get<int64_t>();
      if (number < 0 || number > INT32_MAX || !tokenizer.IsKnown(static_cast<TokenId>(number))) {
        return absl::InvalidArgumentError(absl::StrCat("unknown token id ", number));
      }
      ids.push_back(static_cast<TokenId>(number));
    }
    return ids;
  }
  while (!rest.empty()) {
    const size_t begin = rest.find_first_not_of(" \t\r,");
    if (begin == std::string_view::npos) break;
    rest.remove_prefix(begin);
    const size_t end = std::min(rest.find_first_of(" \t\r,"), rest.size());
    const std::string_view word = rest.substr(0, end);
    int64_t number = 0;
    const auto [ptr, error] = std::from_chars(word.data(), word.data() + word.size(), number);
    if (error != std::errc() || ptr != word.data() + word.size()) {
      return absl::InvalidArgumentError(absl::StrCat("not a token id: \"", std::string(word), "\""));
    }
    if (number < 0 || number > INT32_MAX || !tokenizer.IsKnown(static_cast<TokenId>(number))) {
      return absl::InvalidArgumentError(absl::StrCat("unknown token id ", number));
    }
    ids.push_back(static_cast<TokenId>(number));
    rest.remove_prefix(end);
  }
  return ids;
}

int Run(const std::vector<std::string>& args, bool detokenize) {
  const char* command = detokenize ? "detokenize" : "tokenize";
  auto options = ParseArgs(args);
  if (!options.ok()) {
    std::cerr << "tandem-model " << command << ": " << options.status().message() << "\n" << kUsage;
    return 2;
  }
  if (options->help) {
    std::cout << kUsage;
    return 0;
  }
  auto tokenizer = Tokenizer::Load(options->dir);
  if (!tokenizer.ok()) {
    std::cerr << "tandem-model " << command << ": " << tokenizer.status().message() << "\n";
    return 1;
  }
  std::ios::sync_with_stdio(false);
  std::string line;
  std::string out;
  size_t line_number = 0;
  while (std::getline(std::cin, line)) {
    ++line_number;
    out.clear();
    if (!detokenize) {
      std::string text = line;
      if (options->json) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) {
          text.clear();
        } else {
          auto parsed = TextOfJsonLine(line);
          if (!parsed.ok()) {
            std::cerr << "tandem-model tokenize: line " << line_number << ": " << parsed.status().message() << "\n";
            return 1;
          }
          text = std::move(parsed).value();
        }
      }
      const std::vector<TokenId> ids = (*tokenizer)->Encode(text);
      for (size_t i = 0; i < ids.size(); ++i) {
        if (i > 0) out.push_back(' ');
        out.append(std::to_string(ids[i]));
      }
    } else {
      auto ids = IdsOfLine(line, **tokenizer);
      if (!ids.ok()) {
        std::cerr << "tandem-model detokenize: line " << line_number << ": " << ids.status().message() << "\n";
        return 1;
      }
      const std::string text = (*tokenizer)->Decode(*ids, options->skip_special);
      out = options->json ? nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                          : text;
    }
    out.push_back('\n');
    std::cout.write(out.data(), static_cast<std::streamsize>(out.size()));
  }
  std::cout.flush();
  if (!std::cout) {
    std::cerr << "tandem-model " << command << ": failed writing stdout\n";
    return 1;
  }
  return 0;
}

}  // namespace

std::string_view TokenizeCommandUsage() { return kUsage; }

int RunTokenizeCommand(const std::vector<std::string>& args, bool detokenize) {
  try {
    return Run(args, detokenize);
  } catch (const std::exception& error) {
    std::cerr << "tandem-model " << (detokenize ? "detokenize" : "tokenize") << ": " << error.what() << "\n";
    return 1;
  } catch (...) {
    std::cerr << "tandem-model: unexpected error\n";
    return 1;
  }
}

}  // namespace tandem::text
