#include "common/text/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <spdlog/spdlog.h>

#include "common/text/unicode_additions.h"

namespace tandem::text {
namespace {

// Unicode White_Space (what Oniguruma's \s matches on UTF-8 text), as class members.
constexpr std::string_view kWhiteSpaceMembers =
    R"(\t\n\x0B\f\r\x20\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// GPT-2's pattern, used when a ByteLevel step has use_regex=true.
constexpr std::string_view kByteLevelPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string Pcre2Error(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return std::string(reinterpret_cast<const char*>(buffer));
}

// Quotes a literal string for use as a pattern.
std::string QuoteLiteral(std::string_view literal) {
  std::string out = "\\Q";
  size_t pos = 0;
  while (true) {
    const size_t end = literal.find("\\E", pos);
    if (end == std::string_view::npos) break;
    out.append(literal.substr(pos, end - pos));
    out.append("\\E\\\\E\\Q");
    pos = end + 2;
  }
  out.append(literal.substr(pos));
  out.append("\\E");
  return out;
}

// Per-thread PCRE2 state: match data plus a JIT stack (a JIT stack must not be shared between
// threads). Nested split levels reuse it: each level copies the offsets out before emitting.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(16, nullptr);
  pcre2_jit_stack* jit_stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);

  MatchScratch() {
    if (jit_stack != nullptr && context != nullptr) pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchScratch() {
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_data_free(data);
  }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
};

MatchScratch& ThreadScratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

}  // namespace

class SplitPattern {
 public:
  ~SplitPattern() {
    if (code_ != nullptr) pcre2_code_free(code_);
  }

  static absl::StatusOr<std::unique_ptr<SplitPattern>> Compile(const std::string& pattern) {
    auto result = std::unique_ptr<SplitPattern>(new SplitPattern());
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    result->code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                  PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &error_code,
                                  &error_offset, nullptr);
    if (result->code_ == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer regex \"", pattern, "\": ",
                                                     Pcre2Error(error_code), " at offset ",
                                                     error_offset));
    }
    result->jit_ = pcre2_jit_compile(result->code_, PCRE2_JIT_COMPLETE) == 0;
    if (!result->jit_) spdlog::warn("tokenizer regex: PCRE2 JIT unavailable, using the interpreter");
    return result;
  }

  // Calls emit(begin, end) for every match and every gap between matches (HF "Isolated").
  template <typename Emit>
  void Split(std::string_view text, Emit&& emit) const {
    MatchScratch& scratch = ThreadScratch();
    size_t cursor = 0;  // end of the last emitted piece
    size_t start = 0;
    while (start < text.size()) {
      const int rc = Match(text, start, scratch);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        // Resource limits on pathological input: keep the rest as one piece rather than fail.
        spdlog::warn("tokenizer regex: match failed ({}), keeping {} bytes as one piece",
                     Pcre2Error(rc), text.size() - cursor);
        break;
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
      const size_t match_begin = ovector[0];
      const size_t match_end = ovector[1];
      if (match_begin > cursor) emit(cursor, match_begin);
      if (match_end > match_begin) {
        emit(match_begin, match_end);
        cursor = match_end;
        start = match_end;
      } else {
        // Empty match: step over one character so the search always advances.
        start = match_begin + 1;
        while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) ++start;
      }
    }
    if (cursor < text.size()) emit(cursor, text.size());
  }

 private:
  SplitPattern() = default;

  int Match(std::string_view text, size_t start, MatchScratch& scratch) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    if (jit_) {
      const int rc = pcre2_jit_match(code_, subject, text.size(), start, 0, scratch.data, scratch.context);
      if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH) return rc;
    }
    return pcre2_match(code_, subject, text.size(), start, PCRE2_NO_UTF_CHECK, scratch.data, nullptr);
  }

  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

absl::StatusOr<std::string> OnigurumaToPcre2(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  int class_depth = 0;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[i + 1];
      ++i;
      if (next == 's') {
        if (class_depth > 0) {
          out.append(kWhiteSpaceMembers);
        } else {
          out.append("[").append(kWhiteSpaceMembers).append("]");
        }
      } else if (next == 'p' && i + 3 < pattern.size() && pattern[i + 1] == '{' && pattern[i + 3] == '}' &&
                 !Unicode16Additions(pattern[i + 2]).empty()) {
        // \p{X} of a major category, widened to Unicode 16.0 (HF's Oniguruma) from PCRE2's tables.
        const std::string members = absl::StrCat("\\p{", std::string(1, pattern[i + 2]), "}",
                                                 std::string(Unicode16Additions(pattern[i + 2])));
        out.append(class_depth > 0 ? members : absl::StrCat("[", members, "]"));
        i += 3;
      } else if (next == 'S') {
        if (class_depth > 0) return absl::UnimplementedError("tokenizer regex: \\S inside a class");
        out.append("[^").append(kWhiteSpaceMembers).append("]");
      } else {
        out.push_back('\\');
        out.push_back(next);
      }
      continue;
    }
    if (c == '[') {
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      ++class_depth;
      out.push_back(c);
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.append("\\]"), ++i;
      continue;
    }
    if (c == ']' && class_depth > 0) --class_depth;
    out.push_back(c);
  }
  return out;
}

PreTokenizer::PreTokenizer() = default;
PreTokenizer::~PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const nlohmann::json& config) {
  PreTokenizer result;
  if (config.is_null()) return result;
  std::vector<const nlohmann::json*> steps;
  if (config.value("type", "") == "Sequence") {
    if (!config.contains("pretokenizers") || !config["pretokenizers"].is_array()) {
      return absl::InvalidArgumentError("tokenizer.json: pre_tokenizer Sequence without pretokenizers");
    }
    for (const auto& step : config["pretokenizers"]) steps.push_back(&step);
  } else {
    steps.push_back(&config);
  }
  for (const nlohmann::json* step : steps) {
    const std::string type = step->value("type", "");
    if (type == "Split") {
      if (step->value("behavior", "") != "Isolated" || step->value("invert", false)) {
        return absl::UnimplementedError(absl::StrCat("tokenizer.json: Split behaviour ",
                                                     step->value("behavior", "?"),
                                                     " is not supported (only Isolated)"));
      }
      const nlohmann::json& pattern = step->contains("pattern") ? (*step)["pattern"] : nlohmann::json();
      std::string translated;
      if (pattern.contains("Regex") && pattern["Regex"].is_string()) {
        TANDEM_ASSIGN_OR_RETURN(translated, OnigurumaToPcre2(pattern["Regex"].get<std::string>()));
      } else if (pattern.contains("String") && pattern["String"].is_string()) {
        translated = QuoteLiteral(pattern["String"].get<std::string>());
      } else {
        return absl::InvalidArgumentError("tokenizer.json: Split without a Regex or String pattern");
      }
      TANDEM_ASSIGN_OR_RETURN(auto compiled, SplitPattern::Compile(translated));
      result.patterns_.push_back(std::move(compiled));
    } else if (type == "ByteLevel") {
      // The byte mapping itself happens in the model; only the optional regex and prefix matter here.
      if (step->value("use_regex", true)) {
        TANDEM_ASSIGN_OR_RETURN(std::string translated, OnigurumaToPcre2(kByteLevelPattern));
        TANDEM_ASSIGN_OR_RETURN(auto compiled, SplitPattern::Compile(translated));
        result.patterns_.push_back(std::move(compiled));
      }
      if (step->value("add_prefix_space", false)) {
        return absl::UnimplementedError("tokenizer.json: ByteLevel add_prefix_space=true is not supported");
      }
    } else {
      return absl::UnimplementedError(
          absl::StrCat("tokenizer.json: pre_tokenizer type \"", type, "\" is not supported"));
    }
  }
  return result;
}

void PreTokenizer::Split(std::string_view text, std::vector<std::string_view>& pieces) const {
  if (text.empty()) return;
  SplitFrom(0, text, pieces);
}

void PreTokenizer::SplitFrom(size_t level, std::string_view piece,
                             std::vector<std::string_view>& pieces) const {
  if (level == patterns_.size()) {
    pieces.push_back(piece);
    return;
  }
  patterns_[level]->Split(piece, [&](size_t begin, size_t end) {
    SplitFrom(level + 1, piece.substr(begin, end - begin), pieces);
  });
}

}  // namespace tandem::text
